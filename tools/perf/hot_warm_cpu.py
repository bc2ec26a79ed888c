"""CPU of one warm of the hot-vector copies (``ReadService.warm_hot_vectors``), issue 24.

USERS x PER_USER hash-embedded memories are written straight into LanceDB and Redis as the worker writes them
(streams/tools/bench_reads.py ``build_table``: LanceDB with its scalar indexes, then the Redis script that bumps
the users' generations), on a redis-server of its own started on a free port and a LanceDB in a temporary
folder; then the tenant is warmed RUNS times by fresh readers, each timed by ``getrusage`` (CPU of the process,
the warm's threads included) and the clock. Run it on each side of a change (the harness calls only
``warm_hot_vectors``, which both sides have).

Usage: PYTHONPATH=. .venv/bin/python tools/perf/hot_warm_cpu.py [USERS] [PER_USER] [RUNS]
"""

import asyncio
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra.settings import Settings
from streams.runtime.reading import ReadService
from streams.runtime.stores import Stores
from streams.tools.bench_reads import ReadBenchConfig, build_table


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(users: int, per_user: int, runs: int, home: Path, redis_url: str) -> None:
    settings = Settings.from_env({}).with_(home=home, redis_url=redis_url, embedder="hash")
    stores = await Stores.open(settings)
    try:
        rows = await build_table(stores, ReadBenchConfig(users=users, memories_per_user=per_user), lambda _: None)
        for _ in range(runs):
            reads = ReadService(stores)
            cpu, wall = cpu_s(), time.perf_counter()
            built = await reads.warm_hot_vectors("default")
            print(
                f"{rows} rows: {built} copies, CPU {cpu_s() - cpu:.2f} s, wall {time.perf_counter() - wall:.2f} s, "
                f"held {reads.hot_vectors.held_bytes / 2**20:.0f} MiB"
            )
    finally:
        await stores.close()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    users, per_user, runs = (args + [2_000, 50, 3][len(args) :])[:3]
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        with tempfile.TemporaryDirectory() as home:
            asyncio.run(main(users, per_user, runs, Path(home), f"redis://127.0.0.1:{port}/0"))
    finally:
        redis.terminate()
        redis.wait()
