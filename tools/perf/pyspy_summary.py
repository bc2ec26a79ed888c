import collections
import sys

for name in sys.argv[1:]:
    incl = collections.Counter()
    selfc = collections.Counter()
    total = 0
    for line in open(name):
        line = line.rstrip()
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        frames = stack.split(";")
        seen = set()
        for f in frames:
            key = f.split(" (")[0] + " " + (f.split("/")[-1].rstrip(")") if "/" in f else "")
            if key not in seen:
                incl[key] += n
                seen.add(key)
        selfc[frames[-1].split(" (")[0] + " " + frames[-1].split("/")[-1].rstrip(")")] += n
    print(f"== {name}: {total} samples")
    for k, v in incl.most_common(45):
        if any(
            x in k
            for x in (
                "pipeline",
                "lance",
                "redis_store",
                "kafka",
                "embedders",
                "engines",
                "events.py",
                "reading",
                "context",
                "app.py",
                "hashing",
                "select",
                "_run_once",
                "base_events",
            )
        ):
            print(f"  incl {100 * v / total:5.1f}%  {k}")
    print("  -- self top")
    for k, v in selfc.most_common(12):
        print(f"  self {100 * v / total:5.1f}%  {k}")
