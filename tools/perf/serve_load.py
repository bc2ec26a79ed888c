"""Searches against a running ``memstream serve``: searches/s and latency percentiles over a fixed duration.

    python tools/perf/serve_load.py URL KEY --tenant T --users 200 --connections 32 --seconds 20 [--repeat]

Each of ``--connections`` keeps one keep-alive connection and sends its next search when the last one answered.
Without ``--repeat`` every search is a new query (a random user of ``u0..u{users-1}``, random words and a
number), so no cache can answer it; with ``--repeat`` all send the same query of the same user (the L1 path).
``--pids`` also counts the answering processes (``X-Memstream-Pid``). Prints one JSON line.

``cpu_ms_per_search``: the CPU time (user + system, all threads) the answering processes spent in the measured
window, per search, read from /proc (same machine only). On a machine others share, searches/s and latency say
how much CPU was left to the server; this says what a search costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import orjson

WORDS = [
    "apple",
    "river",
    "mountain",
    "coffee",
    "tea",
    "bike",
    "music",
    "piano",
    "travel",
    "porto",
    "lisbon",
    "berlin",
    "dog",
    "cat",
    "garden",
    "book",
]


def cpu_s(pids: Iterable[str]) -> float:
    """User + system CPU seconds of these processes so far (fields 14 and 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def one_connection(
    url: str, headers: dict[str, str], args: argparse.Namespace, until: float, out: list[float], pids: Counter[str]
) -> int:
    rng = random.Random()
    errors = 0
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        while time.perf_counter() < until:
            if args.repeat:
                body = {"query": "coffee in porto", "user_id": "u1", "k": args.k}
            else:
                words = " ".join(rng.choice(WORDS) for _ in range(3))
                body = {"query": f"{words} {rng.randrange(1_000_000)}", "user_id": f"u{rng.randrange(args.users)}"}
                body["k"] = args.k
            if args.tenant:
                body["tenant_id"] = args.tenant
            started = time.perf_counter()
            async with http.post(f"{url}/v1/search", data=orjson.dumps(body)) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                pids[response.headers.get("X-Memstream-Pid", "?")] += 1
            if started >= args.measure_from:  # the warm-up's searches are not counted
                out.append(time.perf_counter() - started)
    return errors


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("--tenant", default="")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", action="store_true")
    parser.add_argument("--pids", action="store_true")
    parser.add_argument("--cpu-pid", action="append", default=[], help="also count this process (no pid header)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the measured window")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    pids: Counter[str] = Counter()
    args.measure_from = time.perf_counter() + args.warmup
    until = args.measure_from + args.seconds
    runs = asyncio.gather(
        *(one_connection(args.url, headers, args, until, latencies, pids) for _ in range(args.connections))
    )
    await asyncio.sleep(args.warmup)
    seen = [p for p in pids if p != "?"] + args.cpu_pid
    cpu_before, started = cpu_s(seen), time.perf_counter()
    errors = await runs
    cpu = cpu_s(seen) - cpu_before
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else 0.0

    report = {
        "searches": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "cpu_ms_per_search": round(cpu * 1000 / max(1, len(latencies)), 2),
        "errors": sum(errors),
        "connections": args.connections,
        "repeat": args.repeat,
    }
    if args.pids:
        report["pids"] = dict(pids)
    print(orjson.dumps(report).decode())


if __name__ == "__main__":
    asyncio.run(main())
