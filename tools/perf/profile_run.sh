#!/usr/bin/env bash
# Usage: tools/perf/profile_run.sh OUTDIR -- <bench command...>   (PYSPY=path/to/py-spy if not on PATH)
# Runs the bench command; attaches py-spy (raw) to every memstream worker child (by MEMSTREAM_WORKER_ROLE),
# to `memstream publish` and `serve` processes started after it; polls INFO commandstats of every redis-server
# started after it (last reading kept, plus the first one taken when the worker appears).
set -u
OUT=$1; shift; shift
mkdir -p "$OUT"
START=$(date +%s)
"$@" > "$OUT/bench.out" 2>&1 &
BENCH=$!
declare -A seen
while kill -0 $BENCH 2>/dev/null; do
  for pid in $(pgrep -f 'memstream|streams' ); do
    [ -n "${seen[$pid]:-}" ] && continue
    [ "$pid" = "$BENCH" ] && { seen[$pid]=1; continue; }
    st=$(stat -c %Y /proc/$pid 2>/dev/null) || continue
    [ "$st" -lt "$START" ] && { seen[$pid]=1; continue; }
    role=$(tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | sed -n 's/^MEMSTREAM_WORKER_ROLE=//p')
    cmd=$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)
    name=""
    if [ -n "$role" ]; then name="$role-$pid";
    elif [[ "$cmd" == *" publish "* ]]; then name="publish-$pid";
    elif [[ "$cmd" == *" serve"* ]]; then name="serve-$pid";
    elif [[ "$cmd" == *" rebuild"* ]]; then name="rebuild-$pid"; fi
    seen[$pid]=1
    [ -z "$name" ] && continue
    "${PYSPY:-py-spy}" record --pid $pid --format raw -o "$OUT/$name.txt" --rate 50 --nonblocking > "$OUT/$name.pyspy.log" 2>&1 &
  done
  for rp in $(pgrep -x redis-server); do
    st=$(stat -c %Y /proc/$rp 2>/dev/null) || continue
    [ "$st" -lt "$START" ] && continue
    port=$(ss -ltnp 2>/dev/null | grep "pid=$rp," | head -1 | awk '{print $4}' | sed 's/.*://')
    [ -z "$port" ] && continue
    f="$OUT/redis-$port.commandstats"
    [ -f "$f.first" ] || redis-cli -p $port INFO commandstats > "$f.first" 2>/dev/null
    redis-cli -p $port INFO commandstats > "$f.tmp" 2>/dev/null && grep -q cmdstat "$f.tmp" && mv "$f.tmp" "$f"
    redis-cli -p $port INFO cpu > "$OUT/redis-$port.cpu" 2>/dev/null
  done
  sleep 1
done
wait $BENCH; echo "bench rc $?" >> "$OUT/bench.out"
sleep 2
