"""Two versions of ``memstream serve`` over one loaded stack, alternated: an A/B of the read path that the serve
benchmark's run-to-run spread (15-25% here: the load, the sink's maintenance after it) cannot resolve.

    PYTHONPATH=. .venv/bin/python tools/perf/serve_ab.py A_TREE B_TREE [--memories 100000] [--rounds 2]
        [--seconds 10] [--phases search_uncached,search_cached,search_hybrid,context] [--out FILE]

One fresh stack and ``memstream worker`` (this checkout's code), N memories over 2,000 users loaded through
``memstream publish --wait --indexed``, a read key, then a quiet minute for the sink's maintenance. Then, per
round, ``memstream serve`` from A_TREE, then from B_TREE (each tree put first on ``PYTHONPATH``), each driven
like ``bench --scenario serve``'s steady phases (wrk where installed) after its warm, each phase primed first
(``--prime`` seconds of the same load, not timed: a user's first read of a kind builds its copies). Prints one JSON line per
serve run and a summary of requests/s and serve CPU per request by tree and phase.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from infra.settings import Settings
from schemas.events import Op
from streams.runtime.stores import Stores
from streams.tools.bench_data import synthetic_events
from streams.tools.bench_user import (
    UserConfig,
    UserStack,
    create_read_key,
    measure_phase,
    memories_file,
    publish_wait,
    serve_process_pids,
    start_serve,
)


def profile(out: str | None, label: str, pids: dict[str, int], seconds: float) -> list[subprocess.Popen[bytes]]:
    """py-spy (raw, 100 Hz) on each serve process for the phase's duration, when ``--pyspy DIR`` asks for it."""
    if not out:
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    spy = [os.environ.get("PYSPY", "py-spy"), "record", "--format", "raw", "--rate", "100", "--nonblocking"]
    return [
        subprocess.Popen(
            [*spy, "--pid", str(pid), "--duration", str(round(seconds)), "-o", f"{out}/{label}-{who}.txt"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for who, pid in pids.items()
        if who != "serve"  # the supervisor of --workers N: it answers nothing
    ]


async def forget_reads(settings: Settings) -> None:
    """Delete the read cache's L2 entries (search results, context blocks) from this stack's own Redis."""
    stores = await Stores.open(settings)
    try:
        for kind in ("q", "c"):
            async for key in stores.redis.scan_iter(match=f"{stores.cache.prefix}{kind}:*", count=1000):
                await stores.redis.delete(key)
    finally:
        await stores.close()


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="memstream-serve-ab-"))
    stack = UserStack(Settings.from_env(os.environ).with_(embedder="hash"), work / "serve")
    config = UserConfig(serve_seconds=args.seconds, http_driver=args.driver)
    phases = args.phases.split(",")
    trees = {
        name: ":".join(str(Path(p).resolve()) for p in tree.split(":")) for name, tree in (("A", args.a), ("B", args.b))
    }
    runs: list[dict[str, Any]] = []
    try:
        await stack.start_worker(print)
        settings = stack.settings
        key = await create_read_key(settings, work)
        events = [e for e in synthetic_events(2 * args.memories, users=2_000, seed=43) if e.op is Op.ADD]
        path = memories_file(events[: args.memories], work / "memories.jsonl")
        seconds, _ = await publish_wait(settings, work, path, args.memories, "--indexed")
        print(f"loaded {args.memories:,} memories in {seconds:.1f}s; {args.quiet:.0f}s for the sink's maintenance")
        await asyncio.sleep(args.quiet)
        for round_no in range(args.rounds):
            for name, tree in trees.items():
                os.environ["PYTHONPATH"] = tree
                await forget_reads(settings)  # every run starts with what the load left, no other run's cache
                # `python -m streams` puts its working directory first on sys.path, before PYTHONPATH: the serve
                # starts inside the tree, or it would run this checkout's code whatever PYTHONPATH says
                code = Path(tree.split(":")[0])
                serve, url = await start_serve(settings, work / f"{name}{round_no}", key, code=code)
                try:
                    await asyncio.sleep(args.warm)  # the hot vectors' warm: one scan of the table, then idle
                    pids = serve_process_pids(serve)
                    for phase in phases:
                        if args.prime:  # each user's first read of a kind builds what the next ones use: not timed
                            primed = dataclasses.replace(config, serve_seconds=args.prime)
                            await measure_phase(url, key, phase, pids, stack.infra["redis"], primed, work)
                        spies = profile(args.pyspy, f"{name}{round_no}-{phase}", pids, args.seconds)
                        figures = await measure_phase(url, key, phase, pids, stack.infra["redis"], config, work)
                        for spy in spies:
                            spy.wait()
                        run = {"tree": name, "round": round_no, "phase": phase, **figures}
                        runs.append(run)
                        print(orjson.dumps({k: v for k, v in run.items() if k != "cpu"}).decode(), flush=True)
                finally:
                    serve.stop()
    finally:
        stack.stop()
    summary: dict[str, dict[str, list[tuple[float, float | None]]]] = {}
    for run in runs:
        summary.setdefault(run["phase"], {}).setdefault(run["tree"], []).append(
            (run["requests_per_s"], run["serve_cpu_us_per_request"])
        )
    print(orjson.dumps({"trees": trees, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **summary}).decode())
    if args.out:
        Path(args.out).write_bytes(orjson.dumps({"trees": trees, "runs": runs}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the first tree (a checkout); more than one path: joined by ':' as PYTHONPATH")
    parser.add_argument("b", help="the second tree")
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warm", type=float, default=15.0, help="seconds between serve's start and the first phase")
    parser.add_argument("--quiet", type=float, default=60.0, help="seconds after the load before the first serve")
    parser.add_argument("--prime", type=float, default=20.0, help="seconds of each phase's load before its measure")
    parser.add_argument("--phases", default="search_uncached,search_cached,search_hybrid,context")
    parser.add_argument("--driver", default="auto", choices=("auto", "wrk", "aiohttp"))
    parser.add_argument("--out")
    parser.add_argument("--pyspy", metavar="DIR", help="profile each measured phase with py-spy ($PYSPY) into DIR")
    asyncio.run(main(parser.parse_args()))
