"""Redis server CPU per memory for the ingest path's write into the fresh tail and the index sink's clear.

Starts its own redis-server on a free port and writes N memories of U users (one tenant, as `bench`'s synthetic
events) through ``RedisCacheStore.apply(..., pending=True)`` in windows of W rows, then clears them with
``clear_pending`` in batches of B, as the two processes do. Prints the server's CPU (``INFO cpu``, user+sys of
the main thread) per memory for each phase, and the calls per memory from ``INFO commandstats``.
Run on each side of a change: ``.venv/bin/python tools/perf/redis_tail_cost.py [N] [U] [W] [B]``.
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from infra.redis_store import RedisCacheStore, connect
from infra.services import redis_url, start_redis
from processors.model import MemoryRow
from schemas.events import Scope

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
USERS = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
WINDOW = int(sys.argv[3]) if len(sys.argv) > 3 else 2_000
BATCH = int(sys.argv[4]) if len(sys.argv) > 4 else 10_000


def rows() -> list[MemoryRow]:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((N, 384)).astype("<f4")
    now = int(time.time() * 1000)
    return [
        MemoryRow(
            memory_id=f"m{i:08d}",
            scope=Scope("default", f"user-{i % USERS:05d}", "agent-1", None),
            text=f"The user mentioned fact number {i} about the data platform migration",
            metadata={"source": "bench"},
            version=1,
            event_id=f"e{i:012d}",
            content_hash=f"{i:016x}",
            deleted=False,
            updated_at=now + i,
            vector=vectors[i].tobytes(),
        )
        for i in range(N)
    ]


async def server_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


async def calls(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def phase(client: aioredis.Redis, name: str, batches: list[list[MemoryRow]], run) -> None:  # type: ignore[no-untyped-def]
    await client.config_resetstat()
    before, started = await server_cpu(client), time.perf_counter()
    for batch in batches:
        await run(batch)
    cpu, wall = await server_cpu(client) - before, time.perf_counter() - started
    counts = {k: v for k, v in sorted((await calls(client)).items(), key=lambda kv: -kv[1]) if v >= N // 10}
    per = ", ".join(f"{k} {v / N:.2f}" for k, v in counts.items())
    print(f"{name}: redis CPU {cpu * 1e6 / N:.1f} µs/memory, wall {wall:.2f} s; calls per memory: {per}")


async def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        server = start_redis(Path(home))
        client = connect(redis_url(server.host, server.port))
        try:
            store = RedisCacheStore(client, "bench:")
            data = rows()
            windows = [data[i : i + WINDOW] for i in range(0, N, WINDOW)]
            await phase(client, "ingest apply (pending)", windows, lambda b: store.apply(b, pending=True))
            batches = [data[i : i + BATCH] for i in range(0, N, BATCH)]
            await phase(client, "sink clear_pending", batches, store.clear_pending)
            print(f"fresh tail left: {await store.pending_count()}")
        finally:
            await client.aclose()
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
