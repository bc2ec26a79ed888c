"""Redis server CPU per memory for the ingest path's write into the fresh tail and the index sink's clear.

Starts its own redis-server on a free port and writes N memories of U users (one tenant, as `bench`'s synthetic
events) through ``RedisCacheStore.apply(..., pending=True)`` in windows of W rows, then clears them with
``clear_pending`` in batches of B, as the two processes do. Prints the server's CPU (``INFO cpu``, user+sys of
the main thread) per memory for each phase, the client's CPU per memory, and the calls per memory from
``INFO commandstats``. Run on each side of a change: ``.venv/bin/python tools/perf/redis_tail_cost.py [N] [U] [W]
[B] [URL]``. With URL (e.g. ``redis+cluster://127.0.0.1:7000`` of an empty cluster), that Redis is used instead,
and a cluster's figures are summed over its masters.
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from infra.redis_store import RedisCacheStore, connect, open_redis
from infra.services import redis_url, start_redis
from processors.model import MemoryRow
from schemas.events import Scope

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
USERS = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
WINDOW = int(sys.argv[3]) if len(sys.argv) > 3 else 2_000
BATCH = int(sys.argv[4]) if len(sys.argv) > 4 else 10_000
URL = sys.argv[5] if len(sys.argv) > 5 else ""


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


async def per_node(client, section: str) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    if isinstance(client, RedisCluster):
        found = await client.info(section, target_nodes=RedisCluster.PRIMARIES)
        return list(found.values())
    return [await client.info(section)]


async def server_cpu(client: aioredis.Redis) -> float:
    infos = await per_node(client, "cpu")
    return sum(float(i["used_cpu_user_main_thread"]) + float(i["used_cpu_sys_main_thread"]) for i in infos)


async def calls(client: aioredis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for stats in await per_node(client, "commandstats"):
        for name, v in stats.items():
            out[name.removeprefix("cmdstat_")] = out.get(name.removeprefix("cmdstat_"), 0) + int(v["calls"])
    return out


async def phase(client: aioredis.Redis, name: str, batches: list[list[MemoryRow]], run) -> None:  # type: ignore[no-untyped-def]
    if isinstance(client, RedisCluster):
        await client.config_resetstat(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.config_resetstat()
    before, started, mine = await server_cpu(client), time.perf_counter(), time.process_time()
    for batch in batches:
        await run(batch)
    cpu, wall = await server_cpu(client) - before, time.perf_counter() - started
    own = time.process_time() - mine
    counts = {k: v for k, v in sorted((await calls(client)).items(), key=lambda kv: -kv[1]) if v >= N // 10}
    per = ", ".join(f"{k} {v / N:.2f}" for k, v in counts.items())
    print(
        f"{name}: redis CPU {cpu * 1e6 / N:.1f} µs/memory, client CPU {own * 1e6 / N:.1f} µs/memory, "
        f"wall {wall:.2f} s; calls per memory: {per}"
    )


async def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        server = None if URL else start_redis(Path(home))
        client = await open_redis(URL) if URL else connect(redis_url(server.host, server.port))  # type: ignore[union-attr]
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
            if server is not None:
                server.stop()


if __name__ == "__main__":
    asyncio.run(main())
