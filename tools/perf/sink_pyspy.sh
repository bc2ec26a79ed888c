#!/bin/bash
# The index sink's CPU through the public path: `memstream bench --scenario publish-wait --events N` (hash embedder;
# its summary gives every process' CPU per event from /proc), with py-spy on the sink child (the supervisor's child
# started with MEMSTREAM_WORKER_ROLE=sink) and the sink's CPU per thread (Python's main thread against LanceDB's
# tokio and lance-cpu threads) read from /proc/<pid>/task until it exits.
# Usage: tools/perf/sink_pyspy.sh [N] [OUT] (default 100000, /tmp/sink-pyspy); PYSPY=0 leaves py-spy out;
# PYTHON and PYSPY_BIN name other interpreters and py-spy binaries than .venv/bin/python and .venv/bin/py-spy.
# Summarise the samples with: .venv/bin/python tools/perf/pyspy_summary.py OUT/sink.raw
set -e
N=${1:-100000}
OUT=${2:-/tmp/sink-pyspy}
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
uptime > "$OUT/uptime.txt"
$PY -m streams --embedder hash bench --scenario publish-wait --events "$N" --out "$OUT/bench" > "$OUT/bench.log" 2>&1 &
BENCH=$!
sink_of() {  # the sink child among the descendants of $1
  python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1])
def parent(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1])
    except (OSError, ValueError):
        return -1
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    up = int(name)
    for _ in range(6):
        up = parent(up)
        if up == root:
            try:
                if b"MEMSTREAM_WORKER_ROLE=sink" in open(f"/proc/{name}/environ", "rb").read().split(b"\0"):
                    print(name)
                    sys.exit(0)
            except OSError:
                pass
            break
PY
}
threads_of() {  # CPU seconds per thread name of $1
  python3 - "$1" <<'PY'
import collections, os, sys
pid, tick, by = sys.argv[1], os.sysconf("SC_CLK_TCK"), collections.Counter()
for tid in os.listdir(f"/proc/{pid}/task"):
    stat = open(f"/proc/{pid}/task/{tid}/stat").read()
    fields = stat.rpartition(")")[2].split()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    by[("main thread: " if tid == pid else "") + name] += (int(fields[11]) + int(fields[12])) / tick
for name, seconds in by.most_common():
    print(f"{seconds:8.2f} s  {name}")
PY
}
SINK=""
for _ in $(seq 1 480); do SINK=$(sink_of $BENCH); [ -n "$SINK" ] && break; sleep 0.5; done
if [ -n "$SINK" ]; then
  (while [ -d /proc/$SINK ]; do threads_of $SINK > "$OUT/threads.tmp" 2>/dev/null && mv "$OUT/threads.tmp" "$OUT/threads.txt"; sleep 1; done) &
  if [ "${PYSPY:-1}" != 0 ]; then
    for _ in $(seq 1 240); do pgrep -f "streams publish" > /dev/null && break; sleep 0.5; done
    ${PYSPY_BIN:-.venv/bin/py-spy} record -p "$SINK" -r 50 --nonblocking --format raw -o "$OUT/sink.raw" -d 300 > "$OUT/pyspy.log" 2>&1 &
  fi
fi
wait $BENCH
uptime >> "$OUT/uptime.txt"
grep -A2 "events/s" "$OUT/bench.log" || tail -20 "$OUT/bench.log"
echo "sink CPU by thread (its whole life, start-up included):"
cat "$OUT/threads.txt" 2>/dev/null || true
