"""LanceDB on object storage beside local disk (issue 26): the index sink's rate and search latency, both ways.

Starts moto's standalone S3 server (``python -m moto.server``) on a free loopback port, makes a bucket, then runs
the same ``memstream bench`` twice on the embedded broker and Redis: once with LanceDB on local disk, once with
``MEMSTREAM_LANCEDB_URI=s3://<bucket>/lancedb`` and the standard AWS variables pointing at moto. Prints one table
of the figures that differ by where LanceDB lives; each run's JSON is kept under OUT/local and OUT/s3.

moto keeps the objects in its own process' memory and answers on the loopback: it has no network round trip
per request, as AWS S3 has, and costs this machine CPU that AWS would not.

moto also reads and copies a whole object to answer each ranged GET (moto/s3/responses.py, _handle_range_header
on key.value), so a search, a few dozen ranged reads of the table's data file, costs moto time in proportion to
the file: at 50,000 rows a search took ~4 s (see PERFORMANCE.md). Keep SEARCH_ROWS small (10,000: a ~15 MB data file) and QUERIES few.

Usage: PYTHONPATH=. .venv/bin/python tools/perf/lance_s3.py [EVENTS] [SEARCH_ROWS] [QUERIES] [OUT]
       (default 50000 10000 200 bench-results/lance-s3)
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3

from infra.services import free_port

EVENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
SEARCH_ROWS = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
QUERIES = int(sys.argv[3]) if len(sys.argv) > 3 else 200
OUT = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("bench-results/lance-s3")
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def bench(env: dict[str, str], out: Path) -> dict:
    args = ["--scenario", "stages", "--scenario", "ingest", "--scenario", "search"]
    args += ["--events", str(EVENTS), "--search-sizes", str(SEARCH_ROWS), "--search-queries", str(QUERIES), "--fresh-tail", "0", "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "streams", "bench", *args, "--json"], env=env, capture_output=True)
    if proc.returncode:
        sys.exit(f"bench failed ({proc.returncode}):\n{proc.stderr.decode()[-4000:]}")
    print(f"  {out.name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return json.loads(proc.stdout)


def figures(result: dict) -> dict[str, object]:
    s = result["scenarios"]
    ingest, search = s["ingest"], s["search"][str(SEARCH_ROWS)]
    return {
        "LanceDB": result["lancedb"],
        "stages: LanceDB upserts, rows/s": s["stages"]["lancedb_rows_per_s"],
        "ingest: sink records/s": ingest["sink_records_per_s"],
        "ingest: publish to indexed, events/s": ingest["indexed_events_per_s"],
        "ingest: LanceDB caught up after searchable, s": ingest["index_caught_up_after_s"],
        "ingest: consistent": ingest["consistency"]["consistent"],
        f"search {SEARCH_ROWS:,} rows k=10 one user, p50 ms": search["uncached"]["p50_ms"],
        f"search {SEARCH_ROWS:,} rows k=10 one user, p99 ms": search["uncached"]["p99_ms"],
        "search through the read caches, p99 ms": search["cached"]["all"]["p99_ms"],
    }


def main() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="memstream-s3-") as tmp:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MEMSTREAM_", "AWS_"))}
        base.update({"MEMSTREAM_HOME": str(Path(tmp) / "home"), "MEMSTREAM_EMBEDDER": "hash"})
        moto_log = open(Path(tmp) / "moto.log", "wb")
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=moto_log, stderr=moto_log
        )
        try:
            endpoint = f"http://127.0.0.1:{port}"
            while not answers(f"{endpoint}/moto-api/data.json"):
                if moto.poll() is not None:
                    sys.exit("moto_server exited")
                time.sleep(0.1)
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                region_name=KEYS["AWS_REGION"],
            ).create_bucket(Bucket="memstream-bench")
            s3 = {
                **base,
                **KEYS,
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ALLOW_HTTP": "true",
                "MEMSTREAM_LANCEDB_URI": "s3://memstream-bench/lancedb",
            }
            rows = [figures(bench(base, OUT / "local")), figures(bench(s3, OUT / "s3"))]
        finally:
            moto.terminate()
            moto.wait(timeout=30)
            moto_log.close()
            subprocess.run([sys.executable, "-m", "streams", "down"], env=base, capture_output=True)
    print("| | local disk | S3 API (moto, loopback) |\n| --- | --- | --- |")
    for name in rows[0]:
        print(f"| {name} | {rows[0][name]} | {rows[1][name]} |")


if __name__ == "__main__":
    main()
