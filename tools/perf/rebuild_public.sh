#!/bin/bash
# `memstream rebuild` of N events that came in through the public path: a fresh MEMSTREAM_HOME and embedded stack,
# the default `memstream worker`, `publish --wait --indexed` of N synthetic events (bench_data), the worker stopped,
# then the whole rebuild command timed (/usr/bin/time). Usage: tools/perf/rebuild_public.sh [N] (default 200000)
set -e
N=${1:-200000}
cd "$(dirname "$0")/../.."
export MEMSTREAM_HOME=$(mktemp -d /tmp/rb.XXXX)
M=".venv/bin/memstream --embedder hash"
$M up >/dev/null
.venv/bin/python -c "
from pathlib import Path
from streams.tools.bench_data import synthetic_events
from streams.tools.bench_user import memories_file
memories_file(list(synthetic_events($N)), Path('$MEMSTREAM_HOME/events.jsonl'))"
$M worker > $MEMSTREAM_HOME/worker.log 2>&1 &
W=$!
sleep 8
$M publish $MEMSTREAM_HOME/events.jsonl --wait --indexed --timeout 900 --json > $MEMSTREAM_HOME/publish.json
kill -INT $W; wait $W || true
echo "publish: $(python3 -c "import json;d=json.load(open('$MEMSTREAM_HOME/publish.json'));print({k:d.get(k) for k in ('accepted','materialized','rc')})")"
/usr/bin/time -f "rebuild wall %e s, cpu user %U sys %S, maxrss %M KB" $M rebuild --json > $MEMSTREAM_HOME/rebuild.json
python3 -c "import json;d=json.load(open('$MEMSTREAM_HOME/rebuild.json'));print(json.dumps(d)[:1500])"
$M down >/dev/null
echo home=$MEMSTREAM_HOME
