"""``memstream bench --scenario shards``: the index sink's throughput with one shard and with two.

For each shard count (1, then 2) on a namespace of its own (topics, Redis keys, LanceDB tables): the ingest path
alone (``--role ingest``) takes every event into Redis and the embedded topic, so that the sinks find the whole
backlog waiting; then one sink process per shard (``--role sink --shard i``, as ``memstream worker`` runs them) is
started and timed from the moment every shard's group has its owner until the fresh tail is empty (LanceDB holds
everything). The figures: embedded records per second over that span, seconds, and the CPU per record of each sink
process (user + system, from /proc): on a machine with spare cores the two shards' rate is the one to compare, on a
loaded one the CPU per record says whether sharding costs more work per record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infra.kafka import KafkaPublisher, ensure_topics, group_state
from infra.redis_store import IndexProgress, RedisCounters
from infra.settings import Settings
from schemas.events import MemoryEvent, encode
from streams.runtime.stores import Stores
from streams.runtime.worker_process import WorkerProcess
from streams.tools.bench_procs import CpuSampler

SHARD_COUNTS = (1, 2)
READY_TIMEOUT_S = 180.0
CATCH_UP_LIMIT_S = 1_800.0


async def scenario_shards(
    settings: Settings, events: Sequence[MemoryEvent], work: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The sink's rate over the same backlog with 1 and 2 shards (each on its own namespace)."""
    out: dict[str, Any] = {"events": len(events), "partitions": settings.partitions}
    for shards in SHARD_COUNTS:
        each = settings.with_(
            topic_prefix=f"{settings.topic_prefix}shards{shards}.",
            redis_prefix=f"{settings.redis_prefix}shards{shards}:",
            lancedb_table=f"shards{shards}",
            index_shards=shards,
            log_level="INFO",
        )
        log(f"shards: {len(events):,} events into the embedded topic, then {shards} sink(s) over the backlog")
        out[f"shards_{shards}"] = await one_count(each, events, work / f"shards-{shards}")
    one, two = out["shards_1"].get("records_per_s"), out["shards_2"].get("records_per_s")
    out["two_vs_one"] = round(two / one, 3) if one and two else None
    return out


async def one_count(settings: Settings, events: Sequence[MemoryEvent], work: Path) -> dict[str, Any]:
    await ensure_topics(settings)
    ingest = WorkerProcess(settings.with_(worker_role="ingest", workers=1), work / "ingest.log")
    sinks: list[WorkerProcess] = []
    stores = await Stores.open(settings)
    try:
        await fill_backlog(settings, stores, events, ingest)
        progress = IndexProgress(stores.redis, settings.redis_prefix)
        children = settings.with_(worker_role="sink", workers=1).sink_processes()
        sinks = [WorkerProcess(s, work / f"sink-{s.sink_shard}.log") for s in children]
        await wait_owned(children, sinks)
        # from here: the processes' start (imports, opening the tables) is not the sink's work per record
        cpu = CpuSampler({f"sink-{s.sink_shard}": p.proc.pid for s, p in zip(children, sinks, strict=True)})
        cpu.start()
        started, before = time.monotonic(), await indexed(progress, settings)
        while await stores.cache.pending_count():
            if time.monotonic() - started > CATCH_UP_LIMIT_S:
                raise TimeoutError(f"{len(sinks)} sink(s) did not catch up within {CATCH_UP_LIMIT_S:.0f}s")
            check_alive(sinks)
            await asyncio.sleep(0.05)
        seconds = time.monotonic() - started
        records = await settled(progress, settings) - before
        return {
            "shards": settings.index_shards,
            "records": records,
            "seconds": round(seconds, 3),
            "records_per_s": round(records / seconds, 1) if seconds > 0 else None,
            "cpu": cpu.figures(records, unit="record"),
            "rows": await stores.vectors.count(live_only=False),
        }
    finally:
        await stores.close()
        for proc in [*sinks, ingest]:
            proc.stop()


async def fill_backlog(
    settings: Settings, stores: Stores, events: Sequence[MemoryEvent], ingest: WorkerProcess
) -> None:
    """Every event published and taken by the ingest path (in Redis, its fresh tail and the embedded topic)."""
    counters = RedisCounters(stores.redis, settings.redis_prefix)
    publisher = await KafkaPublisher.start(settings)
    try:
        payloads = [(e.key, encode(e)) for e in events]
        for i in range(0, len(payloads), 5_000):
            await publisher.publish(settings.topics.events, payloads[i : i + 5_000])
    finally:
        await publisher.stop()
    deadline = time.monotonic() + CATCH_UP_LIMIT_S
    while (await counters.read()).get("events_in", 0) < len(events):
        check_alive([ingest])
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ingest path did not take {len(events):,} events within {CATCH_UP_LIMIT_S:.0f}s")
        await asyncio.sleep(0.1)


async def wait_owned(children: Sequence[Settings], sinks: Sequence[WorkerProcess]) -> None:
    """Until each shard's group is stable with its sink in it (the sink then owns the shard's partitions)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        check_alive(sinks)
        states = [await group_state(s, s.sink_group_id) for s in children]
        if all(state == "Stable" and members >= 1 for state, members in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the sinks' groups were not stable within {READY_TIMEOUT_S:.0f}s: {states}")
        await asyncio.sleep(0.05)


async def indexed(progress: IndexProgress, settings: Settings) -> int:
    return sum((await progress.read(settings.topics.embedded)).values())


async def settled(progress: IndexProgress, settings: Settings, quiet_s: float = 1.0) -> int:
    """The sinks' recorded progress once it stopped moving (a sink records it just after the tail is cleared)."""
    last, since = await indexed(progress, settings), time.monotonic()
    while time.monotonic() - since < quiet_s:
        await asyncio.sleep(0.1)
        now = await indexed(progress, settings)
        if now != last:
            last, since = now, time.monotonic()
    return last


def check_alive(procs: Sequence[WorkerProcess]) -> None:
    for proc in procs:
        if not proc.alive:
            raise RuntimeError(f"a worker exited with {proc.proc.returncode}; see {proc.log_path}")


def shard_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary table's lines of the scenario."""
    rows: list[tuple[str, str]] = []
    for shards in SHARD_COUNTS:
        f = s.get(f"shards_{shards}")
        if not f:
            continue
        per = ", ".join(
            f"{name} {v['cpu_us_per_record']:,.1f}"
            for name, v in f["cpu"].items()
            if name != "total" and v.get("cpu_us_per_record") is not None
        )
        rows.append(
            (
                f"shards: sink over a {f['records']:,}-record backlog, {shards} shard(s)",
                f"{f['records_per_s']:,.0f} records/s ({f['seconds']:.1f}s); CPU µs/record "
                f"{f['cpu']['total']['cpu_us_per_record']:,.1f} in all ({per})",
            )
        )
    if s.get("two_vs_one") is not None:
        rows.append(("shards: 2 shards vs 1 (records/s)", f"{s['two_vs_one']:.2f}x"))
    return rows


__all__ = ["scenario_shards", "shard_rows"]
