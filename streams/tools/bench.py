"""``memstream bench``: measured figures, each scenario beside its baseline in the same run.

Scenarios (``--scenario`` may repeat; default: all that need no dataset):
- ingest: publish N synthetic events through the real workers; events/s from publish to searchable (every window
  done: Redis holds them), then the time until LanceDB has caught up (the fresh tail is empty); the publisher's,
  the ingest path's and the sink's rates; first vs last 10%; every process's RSS over the first and second half
  (``--split-roles``: the sink as a process of its own); LanceDB's fragments and the sink's compactions after the
  run; the broker's and Redis' memory per stored memory.
- publish: the same N events through ``memstream publish FILE`` (alone, then ``--wait`` against the workers).
- stages: each stage alone on the same events (decode, embed, Redis write into the fresh tail, LanceDB merge in the
  sink's batches; and the CLI's publisher).
- baseline: the naive per-event path (embed one, write one LanceDB row, write Redis, next).
- latency: offered load at fixed rates on a table pre-filled with ``--latency-prefill`` memories: publish to change
  feed, to searchable (probes found by ``get`` in Redis) and to LanceDB (probes found there: the sink's lag).
- search: vector search latency with a user filter at several table sizes: LanceDB alone, with the fresh-tail
  merge (``--fresh-tail`` memories not yet in LanceDB), and through the read caches.
- recall: recall@k on LoCoMo-format conversations (``--dataset``).
- read: Zipf-distributed context reads and searches through the read caches (streams/tools/bench_reads.py).
- publish-wait, serve: as a user meets the system, on a fresh stack of their own with the default ``memstream
  worker`` (streams/tools/bench_user.py): ``memstream publish FILE --wait`` as a subprocess, and ``memstream serve``
  under concurrent HTTP reads; CPU per event (per request) of every process.
- shards: the index sink's rate over the same backlog with 1 and 2 index shards (MEMSTREAM_INDEX_SHARDS), one sink
  process per shard, and each sink's CPU per record (streams/tools/bench_shards.py; not in the default run).
- freshness: publish to found by HTTP search right after a bulk load of ``--events`` (default 1M) through
  ``memstream publish --wait``, with ``--background-rate`` events/s (2,000) from a plain producer beside
  ``--probes`` probe events (streams/tools/bench_user.py; not in the default run).

CPU per event: user + system CPU seconds of each process over the measured run (``/proc/<pid>/stat``; a finished
subprocess by ``os.wait4``), divided by the events; every scenario that runs processes reports it beside its rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from redis.exceptions import RedisError
from redis.exceptions import ResponseError as RedisResponseError

from infra.embedders import HashEmbedder, make_embedder
from infra.kafka import KafkaPublisher, ensure_topics, group_state, start_consumer
from infra.lance_store import LanceVectorStore
from infra.redis_store import IndexProgress, RedisCacheStore, RedisCounters, connect
from infra.settings import Settings
from processors.hashing import event_content_hash
from processors.model import MemoryRow, ScopeQuery
from processors.pipeline import event_key, newest_per_memory, row_from
from processors.publishing import EventFactory
from processors.reading import reciprocal_rank_fusion
from schemas.events import EmbeddedEvent, MemoryEvent, Op, Scope, decode_change, decode_event, encode
from streams.runtime.reading import HYBRID_DEPTH, ReadService, SearchRequest
from streams.runtime.sink import wait_for_index
from streams.runtime.stores import Stores, resolve_services
from streams.runtime.worker_process import sink_name, start_workers
from streams.surface.api import MemoryPublisher
from streams.surface.console import progress_bar
from streams.surface.operations import verify
from streams.tools.bench_data import synthetic_events
from streams.tools.bench_procs import (
    CpuSampler,
    RssSampler,
    infra_figures,
    infra_pids,
    maintenance_from_logs,
    port_of,
    redis_used_memory,
    rss_now_kb,
)
from streams.tools.bench_reads import ReadBenchConfig, layer_figures, scenario_read
from streams.tools.bench_shards import scenario_shards, shard_rows
from streams.tools.bench_user import (
    UserConfig,
    cpu_row,
    memstream,
    scenario_freshness,
    scenario_publish_wait,
    scenario_serve,
    user_rows,
)

SCENARIOS = (
    "ingest",
    "publish",
    "stages",
    "baseline",
    "latency",
    "search",
    "recall",
    "read",
    "publish-wait",
    "serve",
    "shards",
    "freshness",
)


@dataclass
class BenchConfig:
    scenarios: list[str]
    embedder: str = "hash"
    events: int = 200_000
    baseline_events: int = 1_000
    rates: list[int] = field(default_factory=lambda: [500, 2_000, 5_000])
    rate_seconds: float = 10.0
    search_sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    search_queries: int = 500
    dataset: Path | None = None
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    out: Path = Path("bench-results")
    quick: bool = False
    workers: int = 1
    split_roles: bool = False  # the index sink in a process of its own (--role sink) beside the ingest processes
    latency_prefill: int = 1_000_000  # memories in the table before the latency scenario's offered load
    fresh_tail: int = 5_000  # memories only in the fresh tail during the search scenario
    read: ReadBenchConfig = field(default_factory=ReadBenchConfig)
    user: UserConfig = field(default_factory=UserConfig)  # publish-wait and serve

    @classmethod
    def quick_config(cls, scenarios: list[str], embedder: str, out: Path) -> BenchConfig:
        return cls(
            scenarios=scenarios,
            embedder=embedder,
            events=5_000 if embedder == "hash" else 300,
            baseline_events=200 if embedder == "hash" else 50,
            # above a model's own rate a latency measures only the queue: MiniLM does ~90 texts/s on 2 cores
            rates=[500, 2_000] if embedder == "hash" else [20, 50],
            rate_seconds=2.0,
            search_sizes=[10_000],
            search_queries=100,
            latency_prefill=20_000 if embedder == "hash" else 200,
            fresh_tail=500,
            out=out,
            quick=True,
            read=ReadBenchConfig(users=200, memories_per_user=20, reads=2_000, search_reads=500),
            user=UserConfig(
                publish_events=300,
                serve_memories=300,
                serve_users=30,
                connections=4,
                serve_seconds=1.0,
                settle_s=1.0,
                freshness_events=300,
                freshness_rate=200,
                freshness_probes=5,
            ),
        )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    if not samples_ms:
        return {"count": 0}
    ordered = np.sort(np.asarray(samples_ms))
    return {
        "count": len(ordered),
        "p50_ms": round(float(np.percentile(ordered, 50)), 3),
        "p95_ms": round(float(np.percentile(ordered, 95)), 3),
        "p99_ms": round(float(np.percentile(ordered, 99)), 3),
        "max_ms": round(float(ordered[-1]), 3),
        "mean_ms": round(float(ordered.mean()), 3),
    }


# --------------------------------------------------------------------------------------------- the worker


class Workers:
    """The worker processes a scenario runs against (``--workers``), started and stopped together.

    By default the first runs ingest and the index sink in one process (role ``inline``) and the others ingest
    only; ``split`` runs the sink as a process of its own (``--role sink``) beside ``--workers`` ingest processes
    (``--role ingest``), so that each one's memory and CPU are measured apart: the processes `memstream worker`
    supervises by default (role ``all``), started here directly so that each is measured on its own."""

    def __init__(self, settings: Settings, log_dir: Path, *, split: bool = False) -> None:
        self.sink_groups = [settings.sink_group_id]
        if split or settings.index_shards > 1:  # a sharded index: a sink process per shard, as `memstream worker`
            ingest = start_workers(settings.with_(worker_role="ingest"), log_dir / "ingest")
            shards = settings.with_(worker_role="sink", workers=1).sink_processes()
            sinks = [(sink_name(s), start_workers(s, log_dir / sink_name(s))[0]) for s in shards]
            self.labelled = [(f"ingest-{i}", proc) for i, proc in enumerate(ingest)] + sinks
            self.ingest_members, self.sink_members = len(ingest), 1
            self.sink_groups = [s.sink_group_id for s in shards]
            split = True
        else:
            procs = start_workers(settings.with_(worker_role="inline"), log_dir)
            self.labelled = [(f"worker-{i} ({'inline' if i == 0 else 'ingest'})", p) for i, p in enumerate(procs)]
            self.ingest_members, self.sink_members = len(procs), 1
        self.procs = [proc for _, proc in self.labelled]
        self.split = split
        self.group_id = settings.group_id
        self.sink_group_id = settings.sink_group_id

    @property
    def pids(self) -> dict[str, int]:
        return {label: proc.proc.pid for label, proc in self.labelled}

    @property
    def log_paths(self) -> list[Path]:
        return [proc.log_path for proc in self.procs if proc.log_path is not None]

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive:
                raise RuntimeError(f"a worker exited with {proc.proc.returncode}; see {proc.log_path}")

    def peak_rss_mb(self) -> float | None:
        """The largest of the processes' peaks (each process is bounded on its own)."""
        peaks = [p for p in (proc.peak_rss_mb() for proc in self.procs) if p is not None]
        return max(peaks) if peaks else None

    def stop(self) -> int:
        return max(abs(proc.stop() or 0) for proc in self.procs)

    async def wait_for_group(self, settings: Settings, timeout: float) -> None:
        """Until every process holds partitions (and the sink its table): a join after the clock starts would
        stall ingestion for the rebalance (seconds) and make the figure measure the group protocol."""
        deadline = time.monotonic() + timeout
        groups = ((self.group_id, self.ingest_members), *((group, self.sink_members) for group in self.sink_groups))
        while time.monotonic() < deadline:
            self.check_alive()
            states = [await group_state(settings, group) for group, _ in groups]
            if all(s == "Stable" and m >= want for (s, m), (_, want) in zip(states, groups, strict=True)):
                return
            await asyncio.sleep(0.25)
        raise TimeoutError(f"the {len(self.procs)} workers did not form stable groups within {timeout:.0f}s")


async def wait_for_count(counters: RedisCounters, target: int, timeout: float, workers: Workers) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await counters.read()).get("events_in", 0) >= target:
            return time.monotonic()
        workers.check_alive()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the workers did not reach {target} events within {timeout:.0f}s")


# --------------------------------------------------------------------------------------------- scenarios


INDEX_CATCH_UP_LIMIT_S = 900.0  # after the last event is searchable, how long the bench waits for LanceDB


@dataclass
class Sample:
    """One tick of the ingest clock: events searchable (the ingest path's windows done), embedded records the
    sink has written to LanceDB, and the fresh tail (searchable, not yet in LanceDB)."""

    t: float
    searchable: int
    indexed: int
    fresh_tail: int


async def _indexed_records(progress: IndexProgress, topic: str) -> int:
    return sum((await progress.read(topic)).values())


async def _settled_indexed(progress: IndexProgress, topic: str, base: int, expected: int, wait_s: float = 10.0) -> int:
    """The sink's records since ``base`` once they reach ``expected`` (or after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        indexed = await _indexed_records(progress, topic) - base
        if indexed >= expected or time.monotonic() >= deadline:
            return indexed
        await asyncio.sleep(0.1)


async def scenario_ingest(
    settings: Settings, events: list[MemoryEvent], workers: Workers, counters: RedisCounters, stack_home: Path
) -> dict[str, Any]:
    """Publish ``events`` and time them until searchable (every window done: Redis holds them), then until
    LanceDB has caught up (the fresh tail is empty); memory of every process sampled all along."""
    payloads = [(e.key, encode(e)) for e in events]
    stores = await Stores.open(settings)
    progress_store = IndexProgress(stores.redis, settings.redis_prefix)
    infra = infra_pids(stack_home, {"broker": port_of(settings.kafka_bootstrap), "redis": port_of(settings.redis_url)})
    infra_before, redis_before = rss_now_kb(infra), await redis_used_memory(stores.redis)
    sampler = RssSampler({**workers.pids, **infra}, own=frozenset(workers.pids))
    # this process publishes (a plain Kafka producer) and polls the progress: its CPU is an upper bound of the
    # publisher's
    cpu = CpuSampler({**workers.pids, **infra, "bench (publisher, polling)": os.getpid()})
    publisher = await KafkaPublisher.start(settings)
    base = (await counters.read()).get("events_in", 0)
    indexed_base = await _indexed_records(progress_store, settings.topics.embedded)
    n = len(payloads)
    samples: list[Sample] = []
    try:
        sampler.start()
        cpu.start()
        started = time.monotonic()

        async def send() -> float:
            for i in range(0, n, 5_000):
                await publisher.publish(settings.topics.events, payloads[i : i + 5_000])
            return time.monotonic()

        sender = asyncio.create_task(send())
        bar = progress_bar("ingest", unit="events", enabled=True, total=n)
        searchable_at: float | None = None
        while True:
            done = (await counters.read()).get("events_in", 0) - base
            indexed = await _indexed_records(progress_store, settings.topics.embedded) - indexed_base
            tail = await stores.cache.pending_count()
            now = time.monotonic()
            samples.append(Sample(now - started, done, indexed, tail))
            if bar is not None:
                bar.update(done - bar.n)
            if searchable_at is None and done >= n:
                searchable_at = now
                if bar is not None:
                    bar.close()
            if searchable_at is not None and not tail:
                break  # LanceDB holds everything the ingest path wrote
            if searchable_at is not None and now - searchable_at > INDEX_CATCH_UP_LIMIT_S:
                log(f"ingest: LanceDB not caught up {INDEX_CATCH_UP_LIMIT_S:.0f}s after the last event ({tail:,} left)")
                break
            workers.check_alive()
            if now - started > 3_600:
                raise TimeoutError("ingest and indexing did not finish within an hour")
            await asyncio.sleep(0.1)
        caught_up_at = time.monotonic() if not samples[-1].fresh_tail else None
        cpu_figures = cpu.figures(len(payloads))  # from the first event sent until LanceDB caught up
        published_at = await sender
        # the sink empties the fresh tail before it commits and records its progress: read that once it has
        # (at commit 2103964 the quick bench read 0 records where one lingering batch had taken all 5,000)
        indexed_total = await _settled_indexed(progress_store, settings.topics.embedded, indexed_base, n)
    finally:
        await sampler.stop()
        await publisher.stop()
    try:
        redis_after = await redis_used_memory(stores.redis)
    finally:
        await stores.close()
    elapsed = searchable_at - started
    half = next((x.t for x in samples if x.searchable >= n / 2), None)
    # from the sink's first recorded progress; where one batch took everything before any was recorded, from the
    # first moment the fresh tail held anything for it to take
    sink_busy = next((x.t for x in samples if x.indexed > 0), None)
    if sink_busy is None:
        sink_busy = next((x.t for x in samples if x.fresh_tail > 0), None)
    indexed_s = None if caught_up_at is None else caught_up_at - started
    sink_s = indexed_s - sink_busy if indexed_s is not None and sink_busy is not None else None
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed, 1),  # publish start to searchable
        "publish_seconds": round(published_at - started, 3),
        "publisher_events_per_s": round(n / (published_at - started), 1),
        # None where LanceDB had not caught up within INDEX_CATCH_UP_LIMIT_S (fresh_tail_left says how far)
        "indexed_seconds": None if indexed_s is None else round(indexed_s, 3),
        "index_caught_up_after_s": None if indexed_s is None else round(indexed_s - elapsed, 3),
        "indexed_events_per_s": None if indexed_s is None else round(n / indexed_s, 1),
        "fresh_tail_left": samples[-1].fresh_tail,
        "sink_records": indexed_total,
        "sink_records_per_s": round(indexed_total / sink_s, 1) if sink_s else None,
        "fresh_tail_peak": max((x.fresh_tail for x in samples), default=0),
        "first_10pct_events_per_s": _segment_rate([(x.t, x.searchable) for x in samples], n, 0.0, 0.1),
        "last_10pct_events_per_s": _segment_rate([(x.t, x.searchable) for x in samples], n, 0.9, 1.0),
        "workers": len(workers.procs),
        "split_roles": workers.split,
        "worker_peak_rss_mb": workers.peak_rss_mb(),
        "processes": sampler.figures(split_at_s=half),
        "cpu": cpu_figures,
        "rss_split_at_s": None if half is None else round(half, 2),
        "_infra": (infra, infra_before, redis_before, redis_after),  # made into figures once verify counted
        "progress": [(round(x.t, 2), x.searchable, x.indexed, x.fresh_tail) for x in samples],
    }


async def after_ingest(settings: Settings, figures: dict[str, Any], workers: Workers) -> None:
    """What the run left: consistency, LanceDB's fragments, the sink's compactions, the broker's and Redis'
    memory per stored memory."""
    report = await verify(settings)
    figures["consistency"] = {k: report[k] for k in report if k != "examples"}
    stores = await Stores.open(settings)  # a fresh handle: the table as the sink left it
    try:
        figures["lancedb_fragments"] = await stores.vectors.fragments()
    finally:
        await stores.close()
    figures["maintenance"] = maintenance_from_logs(workers.log_paths)
    pids, before, redis_before, redis_after = figures.pop("_infra")
    memories = int(report.get("redis_memories") or 0)
    figures["infra"] = infra_figures(pids, before, redis_before, redis_after, memories)


def _segment_rate(progress: list[tuple[float, int]], n: int, lo: float, hi: float) -> float | None:
    def time_at(count: float) -> float | None:
        for t, c in progress:
            if c >= count:
                return t
        return None

    t0, t1 = time_at(n * lo) if lo else 0.0, time_at(n * hi)
    if t0 is None or t1 is None or t1 <= t0:
        return None
    return round(n * (hi - lo) / (t1 - t0), 1)


async def scenario_stages(settings: Settings, events: list[MemoryEvent], window: int) -> dict[str, Any]:
    raw = [encode(e) for e in events]
    out: dict[str, Any] = {}
    started = time.perf_counter()
    decoded = [decode_event(r) for r in raw]
    out["decode_events_per_s"] = round(len(raw) / (time.perf_counter() - started), 1)

    embedder = make_embedder(settings.embedder, hash_dim=settings.hash_dim, batch_size=settings.embed_batch)
    texts = [e.text or "" for e in decoded if e.op is not Op.DELETE]
    sample = texts if isinstance(embedder, HashEmbedder) else texts[: min(len(texts), 512)]
    await embedder.embed(sample[:8])  # load the model outside the timing
    started = time.perf_counter()
    batch = window if isinstance(embedder, HashEmbedder) else settings.embed_batch * 4
    for i in range(0, len(sample), batch):
        await embedder.embed(sample[i : i + batch])
    out["embed_texts_per_s"] = round(len(sample) / (time.perf_counter() - started), 1)
    out["embed_model"] = embedder.model

    rows = _rows(decoded, embedder.dim, embedder.model)
    async with scratch_lancedb(settings) as tmp:
        store = await LanceVectorStore.open(
            tmp,
            "stage",
            model=embedder.model,
            dim=embedder.dim,
            optimize_every=0,
            storage_options=settings.lancedb_storage,
        )
        started = time.perf_counter()
        batch = settings.sink_batch  # the index sink's batches under load (it takes what the backlog holds)
        for i in range(0, len(rows), batch):
            await store.upsert(_winners(rows[i : i + batch]))
        out["lancedb_rows_per_s"] = round(len(rows) / (time.perf_counter() - started), 1)

    client = connect(settings.redis_url)
    prefix = f"bench-stage-{uuid.uuid4().hex[:8]}:"
    cache = RedisCacheStore(client, prefix)
    try:
        started = time.perf_counter()
        for i in range(0, len(rows), window):
            await cache.apply(rows[i : i + window], pending=True)  # as the ingest path: into the fresh tail
        out["redis_rows_per_s"] = round(len(rows) / (time.perf_counter() - started), 1)
    finally:
        await _delete_prefix(client, prefix)
        await client.aclose()
    rates = {k: v for k, v in out.items() if k.endswith("_per_s")}
    out["publish_lines_per_s"] = await _publisher_alone(settings, events)  # not a stage of the worker's path
    slowest = min(rates, key=lambda k: rates[k])
    out["slowest_stage"] = slowest
    out["slowest_stage_per_s"] = rates[slowest]
    return out


async def _publisher_alone(settings: Settings, events: Sequence[MemoryEvent]) -> float:
    """``memstream publish``'s publisher (MemoryPublisher.publish_lines: parse, validate, send, acknowledged) on
    the events as JSON lines, into topics nobody consumes, in this process."""
    with tempfile.TemporaryDirectory(prefix="memstream-bench-") as tmp:
        path = events_file(events, Path(tmp) / "events.jsonl")
        alone = settings.with_(topic_prefix=f"{settings.topic_prefix}stage.")
        await ensure_topics(alone)
        lines = path.read_bytes().splitlines()
        async with MemoryPublisher(alone) as publisher:
            started = time.perf_counter()
            await publisher.publish_lines(lines)
            elapsed = time.perf_counter() - started
    return round(len(lines) / elapsed, 1)


def _rows(events: Sequence[MemoryEvent], dim: int, model: str) -> list[MemoryRow]:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((len(events), dim)).astype("<f4")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for event, vector in zip(events, vectors, strict=True):
        item = EmbeddedEvent(
            event=event,
            model=model,
            dim=dim,
            vector=b"" if event.op is Op.DELETE else vector.tobytes(),
            content_hash=event_content_hash(event),
        )
        rows.append(row_from(item))
    return rows


def _winners(rows: Sequence[MemoryRow]) -> list[MemoryRow]:
    return list(newest_per_memory(rows, lambda r: r.key, MemoryRow.order).values())


async def _delete_prefix(client: Any, prefix: str) -> None:
    """Remove only the keys this benchmark wrote (never a flush: the server may not be ours)."""
    batch = []
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.delete(*batch)
            batch = []
    if batch:
        await client.delete(*batch)


async def scenario_baseline(settings: Settings, events: list[MemoryEvent]) -> dict[str, Any]:
    """What memory layers do today: one event at a time, each store written before the next event."""
    embedder = make_embedder(settings.embedder, hash_dim=settings.hash_dim, batch_size=settings.embed_batch)
    await embedder.embed(["warm up"])
    client = connect(settings.redis_url)
    prefix = f"bench-base-{uuid.uuid4().hex[:8]}:"
    cache = RedisCacheStore(client, prefix)
    try:
        async with scratch_lancedb(settings) as tmp:
            store = await LanceVectorStore.open(
                tmp,
                "base",
                model=embedder.model,
                dim=embedder.dim,
                optimize_every=0,
                storage_options=settings.lancedb_storage,
            )
            started = time.perf_counter()
            for event in events:
                vector = b""
                if event.op is not Op.DELETE:
                    vector = (await embedder.embed([event.text or ""]))[0].astype("<f4").tobytes()
                row = row_from(EmbeddedEvent(event, embedder.model, embedder.dim, vector, event_content_hash(event)))
                await store.upsert([row])
                await cache.apply([row])
            elapsed = time.perf_counter() - started
    finally:
        await _delete_prefix(client, prefix)
        await client.aclose()
    return {"events": len(events), "seconds": round(elapsed, 3), "events_per_s": round(len(events) / elapsed, 1)}


# --------------------------------------------------------------------------------------------- publish (CLI)


def events_file(events: Sequence[MemoryEvent], path: Path) -> Path:
    """The events as the JSON lines a user would publish (no versions or event ids: the CLI assigns them)."""
    with path.open("wb") as out:
        for e in events:
            line: dict[str, Any] = {"op": e.op.value, "memory_id": e.memory_id, "user_id": e.scope.user_id}
            if e.scope.agent_id:
                line["agent_id"] = e.scope.agent_id
            if e.op is not Op.DELETE:
                line["text"] = e.text
            if e.metadata:
                line["metadata"] = e.metadata
            out.write(orjson.dumps(line) + b"\n")
    return path


def run_cli(settings: Settings, *args: str, timeout: float) -> tuple[float, dict[str, Any]]:
    """``memstream ARGS --json`` as a user runs it (a new Python process, these settings): seconds and its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
    env.update(settings.to_env())
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "streams", *args, "--json"],
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"memstream {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    report: dict[str, Any] = orjson.loads(proc.stdout)
    return elapsed, report


async def scenario_publish_cli(
    settings: Settings, n: int, workers: Workers, work: Path, stack_home: Path
) -> dict[str, Any]:
    """``memstream publish FILE`` as people bulk-load: first alone (topics nobody consumes: the publisher's own
    rate), then ``--wait`` against the running workers (until every event is searchable), then until LanceDB
    has caught up. Each is a new process, so its start-up is in the figure, as a user sees it."""
    path = events_file(list(synthetic_events(n, users=max(100, n // 50), seed=31)), work / "publish.jsonl")
    alone = settings.with_(topic_prefix=f"{settings.topic_prefix}alone.")
    await ensure_topics(alone)  # created once, as they would be after the first run
    log(f"publish: memstream publish {path.name} ({n:,} lines), nobody consuming")
    alone_s, alone_report = await asyncio.to_thread(run_cli, alone, "publish", str(path), timeout=1_800)
    log(f"publish: memstream publish {path.name} --wait, through the workers")
    stores = await Stores.open(settings)
    infra = infra_pids(stack_home, {"broker": port_of(settings.kafka_bootstrap), "redis": port_of(settings.redis_url)})
    cpu = CpuSampler({**workers.pids, **infra})
    try:
        cpu.start()
        wait_s, report, publisher_cpu = await asyncio.to_thread(
            memstream,
            settings,
            "publish",
            str(path),
            "--wait",
            "--timeout",
            "1800",
            timeout=1_900,
            out=work / "wait.json",
        )
        cpu.record("publisher", publisher_cpu)
        started = time.monotonic()
        left = await wait_for_index(stores, timeout=600, poll_s=0.05)
        caught_up_s = time.monotonic() - started
        cpu_figures = cpu.figures(n)  # from the command's start until LanceDB caught up
    finally:
        await stores.close()
    workers.check_alive()
    return {
        "events": n,
        "publisher_alone_seconds": round(alone_s, 3),
        "publisher_alone_events_per_s": round(n / alone_s, 1),
        "publisher_alone_accepted": alone_report["accepted"],
        "wait_seconds": round(wait_s, 3),
        "wait_events_per_s": round(n / wait_s, 1),  # process start to every event searchable
        "accepted": report["accepted"],
        "materialized": report.get("materialized"),
        "not_materialized": len(report.get("not_materialized", [])),
        "index_caught_up_after_s": round(caught_up_s, 3),
        "fresh_tail_left": left,
        "cpu": cpu_figures,
    }


# --------------------------------------------------------------------------------------------- latency

PROBE_EVERY = 20  # one event in this many is a probe, followed until searchable and until in LanceDB
SEARCHABLE_POLL_S = 0.005
INDEXED_POLL_S = 0.1


@dataclass
class Probe:
    key: str
    order: tuple[int, str]
    sent: float
    searchable: float | None = None
    indexed: float | None = None


async def settle_persistence(redis: Any, timeout_s: float = 120.0) -> None:
    """Let a persistent Redis finish rewriting its append-only file before the load starts.

    The prefill doubles the AOF, so Redis rewrites it (a fork that copies the whole dataset) soon after: with
    1M memories that took ~10 s of a core, during which publish-to-applied p99 went from ~100 ms to ~450 ms
    (run 2fdf79fb). A system that has held its memories a while is between rewrites; the measured load should
    start there. The rewrite under load is reported in PERFORMANCE.md, not hidden."""
    info = await redis.info("persistence")
    if not info.get("aof_enabled"):
        return
    with contextlib.suppress(RedisResponseError):  # one already running: wait for it instead
        await redis.bgrewriteaof()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        info = await redis.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
    log(f"Redis was still rewriting its append-only file after {timeout_s:.0f}s: measuring anyway")


async def prefill(settings: Settings, memories: int, *, users: int = 1_000) -> float:
    """``memories`` memories in LanceDB (appended in bulk: add_rows, then the indexes, as a table that has been
    compacted) and in Redis (the hot copy, not in the fresh tail), as if the pipeline had written them."""
    if memories <= 0:
        return 0.0
    # the workers' own embedder, so that the table's vectors are the ones they would have written
    embedder = make_embedder(settings.embedder, hash_dim=settings.hash_dim, batch_size=settings.embed_batch)
    stores = await Stores.open(settings.with_(optimize_every=0))
    started = time.monotonic()
    have = 0
    try:
        while have < memories:
            chunk = min(50_000, memories - have)
            events = [e for e in synthetic_events(2 * chunk, users=users, seed=5_000 + have) if e.op is Op.ADD][:chunk]
            vectors = await embedder.embed([e.text or "" for e in events])
            rows = [
                row_from(
                    EmbeddedEvent(e, embedder.model, embedder.dim, v.astype("<f4").tobytes(), event_content_hash(e))
                )
                for e, v in zip(events, vectors, strict=True)
            ]
            await stores.vectors.add_rows(rows)
            await stores.cache.apply(rows, bump=False)
            have += len(rows)
            log(f"latency: pre-filled {have:,} of {memories:,} memories")
        await stores.vectors.build_indexes()
        await stores.vectors.optimize()
        # as a worker that wrote them would have: without the sentinel, the worker takes this Redis for one that
        # lost its data and reconciles all of it while the load is measured (runs up to 193a31b4 did)
        await stores.cache.claim_sentinel(str(time.time()))
        await settle_persistence(stores.redis)
    finally:
        await stores.close()
    return time.monotonic() - started


async def scenario_latency(settings: Settings, rates: list[int], seconds: float, prefilled: int) -> dict[str, Any]:
    """Offered load at fixed rates on a table already holding ``prefilled`` memories. Every event: latency from
    the publisher's send to its change on the change feed. One in ``PROBE_EVERY`` (a new memory): until ``get``
    finds it in Redis (searchable: reads merge the fresh tail), and until LanceDB holds it (the sink's lag)."""
    publisher = await KafkaPublisher.start(settings)
    consumer = await start_consumer(settings, [settings.topics.changes], group_id=None)
    stores = await Stores.open(settings)
    results: dict[str, Any] = {}
    try:
        skipped = await _catch_up(consumer)
        log(f"latency: skipped {skipped:,} earlier changes on the feed")
        for rate in rates:
            sent: dict[str, float] = {}
            seen: dict[str, float] = {}
            sent_wall: dict[str, int] = {}  # ms since the epoch: compared with each change's applied_ts
            applied: dict[str, int] = {}
            probes: list[Probe] = []
            factory_events = synthetic_events(int(rate * seconds) + 1, users=200, seed=rate)
            probe_factory = EventFactory()
            watcher = asyncio.create_task(_watch_changes(consumer, sent, seen, applied))
            searchable = asyncio.create_task(_poll_probes(stores, probes, indexed=False))
            indexed = asyncio.create_task(_poll_probes(stores, probes, indexed=True))
            started = time.monotonic()
            total = int(rate * seconds)
            count = 0
            while count < total:
                due = min(total, int((time.monotonic() - started) * rate) + 1)
                batch = []
                while count < due:
                    count += 1
                    if count % PROBE_EVERY == 0:
                        batch.append(_probe_event(probe_factory, rate, count))
                    else:
                        batch.append(next(factory_events))
                if batch:
                    now, wall = time.monotonic(), time.time_ns() // 1_000_000
                    for event in batch:
                        sent[event.event_id] = now
                        sent_wall[event.event_id] = wall
                    await publisher.publish(settings.topics.events, [(e.key, encode(e)) for e in batch])
                    probes += [Probe(event_key(e), e.order(), now) for e in batch if e.memory_id.startswith("probe-")]
                await asyncio.sleep(0.005)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                len(seen) < _expected_changes(sent) or any(p.indexed is None for p in probes)
            ):
                await asyncio.sleep(0.05)
            for task in (watcher, searchable, indexed):
                task.cancel()
            latencies = [(seen[k] - sent[k]) * 1000 for k in seen if k in sent]
            results[str(rate)] = {
                "offered_per_s": rate,
                "seconds": seconds,
                "published": len(sent),
                "table_memories_before": prefilled,
                **percentiles(latencies),  # publish to change feed, every event
                # publish to the worker's Redis write (the change's applied_ts): the rest is the feed and this reader
                "applied": percentiles([applied[k] - sent_wall[k] for k in applied if k in sent_wall]),
                "applied_p99_by_second": _p99_by_second(applied, sent_wall),  # when in the run the tail happened
                "searchable": _probe_figures(probes, "searchable"),
                "indexed": _probe_figures(probes, "indexed"),
            }
    finally:
        await stores.close()
        await consumer.stop()
        await publisher.stop()
    return results


def _p99_by_second(applied: dict[str, int], sent_wall: dict[str, int]) -> list[float]:
    """Publish-to-applied p99 of the events sent in each second of the run, in order."""
    if not sent_wall:
        return []
    start = min(sent_wall.values())
    seconds: dict[int, list[float]] = {}
    for key, done in applied.items():
        if key in sent_wall:
            seconds.setdefault((sent_wall[key] - start) // 1000, []).append(done - sent_wall[key])
    return [percentiles(seconds[s]).get("p99_ms", 0.0) for s in sorted(seconds)]


def _probe_event(factory: EventFactory, rate: int, n: int) -> MemoryEvent:
    return factory.from_input(
        {"memory_id": f"probe-{rate}-{n}", "user_id": f"user-{n % 200:05d}", "text": f"probe {n} at {rate}/s"}
    )


async def _poll_probes(stores: Stores, probes: list[Probe], *, indexed: bool) -> None:
    """Marks each probe when ``get`` first finds its version: in Redis (searchable), or in LanceDB (indexed)."""
    while True:
        waiting = [p for p in probes if (p.indexed if indexed else p.searchable) is None]
        if waiting:
            keys = [p.key for p in waiting]
            if indexed:
                found: dict[str, MemoryRow | None] = {r.key: r for r in await stores.vectors.get(keys)}
            else:
                found = dict(zip(keys, await stores.cache.get(keys), strict=True))
            now = time.monotonic()
            for probe in waiting:
                row = found.get(probe.key)
                if row is not None and row.order() >= probe.order:
                    if indexed:
                        probe.indexed = now
                    else:
                        probe.searchable = now
        await asyncio.sleep(INDEXED_POLL_S if indexed else SEARCHABLE_POLL_S)


def _probe_figures(probes: list[Probe], which: str) -> dict[str, Any]:
    reached = [getattr(p, which) for p in probes]
    figures = percentiles([(t - p.sent) * 1000 for p, t in zip(probes, reached, strict=True) if t is not None])
    figures["probes"] = len(probes)
    figures["not_reached"] = sum(1 for t in reached if t is None)
    return figures


async def _catch_up(consumer: Any) -> int:
    """Read past what the change feed already holds, so the clock starts on this scenario's changes only."""
    skipped = 0
    while True:
        batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
        if not batch:
            return skipped
        skipped += sum(len(messages) for messages in batch.values())


def _expected_changes(sent: dict[str, float]) -> int:
    # Events superseded within a window produce no change of their own; wait for most, then time out.
    return int(len(sent) * 0.9)


async def _watch_changes(
    consumer: Any, sent: dict[str, float], seen: dict[str, float], applied: dict[str, int]
) -> None:
    while True:
        batch = await consumer.getmany(timeout_ms=50, max_records=10_000)
        now = time.monotonic()
        for messages in batch.values():
            for message in messages:
                change = decode_change(message.value)
                if change.event_id in sent and change.event_id not in seen:
                    seen[change.event_id] = now
                    applied[change.event_id] = change.applied_ts


async def scenario_search(settings: Settings, sizes: list[int], queries: int, fresh_tail: int = 0) -> dict[str, Any]:
    """k=10 searches with a user filter at each table size: LanceDB alone, then through the read caches.

    Uncached: the store's search with a fixed query vector (LanceDB's scan after the user's BITMAP prefilter).
    Cached: `ReadService.search`, as the API serves it, over a sequence where each user asks one of a few
    habitual questions; each distinct request is asked once first (a miss that fills L1 and L2), then the
    sequence is timed: a hit costs the L1 lookup and one Redis round trip to validate the scope generation.
    (The bulk rows go straight into LanceDB; one memory per user also goes through Redis, as the worker
    writes it, because a scope that Redis never saw has no generation and its reads are not cached.)
    With the fresh tail: ``fresh_tail`` more memories of the same users only in Redis's fresh tail (written by
    the ingest path, not yet by the sink), and ``ReadService``'s store search, the read caches bypassed, each
    query text new (no embedding-cache hit): the tail read, LanceDB's search and the exact-score merge. One
    query in ten is the text of a tail memory of that user, which must come first (``tail_exact_first``).
    """
    embedder = HashEmbedder(settings.hash_dim)
    results: dict[str, Any] = {}
    users = 1_000
    async with scratch_lancedb(settings) as tmp:
        stores = await Stores.open(
            settings.with_(embedder="hash", lancedb_uri=tmp, lancedb_table="search", optimize_every=0)
        )
        store = stores.vectors
        reader = ReadService(stores)
        reader.counters.keep_latency = True
        have = 0
        tail: dict[str, list[MemoryRow]] = {}
        try:
            for size in sorted(sizes):
                log(f"search: growing the table to {size:,} rows")
                while have < size:
                    chunk = min(50_000, size - have)
                    events = [e for e in synthetic_events(2 * chunk, users=users, seed=1_000 + have) if e.op is Op.ADD]
                    events = events[:chunk]
                    vectors = embedder.embed_sync([e.text or "" for e in events])
                    rows = [
                        row_from(EmbeddedEvent(e, embedder.model, embedder.dim, v.tobytes(), event_content_hash(e)))
                        for e, v in zip(events, vectors, strict=True)
                    ]
                    await store.add_rows(rows)
                    if not have:  # one memory per user through Redis too: its write gives the scope a generation
                        await stores.cache.apply(list({r.scope.user_id: r for r in rows}.values()))
                    have += chunk
                await store.build_indexes()
                rng = random.Random(size)
                probe = embedder.embed_sync([f"the user prefers {rng.choice(['jazz', 'tea', 'running'])}"] * 1)[0]
                timings = []
                for _ in range(queries):
                    user = f"user-{rng.randrange(users):05d}"
                    started = time.perf_counter()
                    await store.search(probe, ScopeQuery(tenant_id="default", user_id=user), 10)
                    timings.append((time.perf_counter() - started) * 1000)
                if fresh_tail and not tail:
                    tail = await _fresh_tail(stores, embedder, fresh_tail, users)
                results[str(size)] = {
                    "rows": await store.count(live_only=False),
                    "uncached": percentiles(timings),
                }
                if tail:
                    results[str(size)]["uncached_fresh_tail"] = await _tail_searches(reader, tail, rng, users, queries)
                results[str(size)]["cached"] = await _cached_searches(reader, rng, users, queries)
        finally:
            reader.counters.take()
            await stores.close()
    return results


async def _fresh_tail(stores: Stores, embedder: HashEmbedder, count: int, users: int) -> dict[str, list[MemoryRow]]:
    """``count`` new memories of the search's users written as the ingest path writes them: into Redis and its
    fresh tail, not into LanceDB. By user."""
    events = [e for e in synthetic_events(2 * count, users=users, seed=77) if e.op is Op.ADD][:count]
    events = [dataclasses.replace(e, memory_id=f"tail-{e.memory_id}") for e in events]
    vectors = embedder.embed_sync([e.text or "" for e in events])
    rows = [
        row_from(EmbeddedEvent(e, embedder.model, embedder.dim, v.tobytes(), event_content_hash(e)))
        for e, v in zip(events, vectors, strict=True)
    ]
    for i in range(0, len(rows), 5_000):
        await stores.cache.apply(rows[i : i + 5_000], pending=True)
    by_user: dict[str, list[MemoryRow]] = {}
    for row in rows:
        by_user.setdefault(row.scope.user_id, []).append(row)
    log(f"search: {len(rows):,} memories in the fresh tail ({await stores.cache.pending_count():,} pending)")
    return by_user


async def _tail_searches(
    reader: ReadService, tail: dict[str, list[MemoryRow]], rng: random.Random, users: int, queries: int
) -> dict[str, Any]:
    """Uncached store searches (tail read + LanceDB + merge), every query text new."""
    timings: list[float] = []
    with_tail_hits = exact = exact_first = 0
    tail_users = sorted(tail)
    for n in range(queries):
        if n % 10 == 0:  # a tail memory's own text: exact score 1.0, it must rank first
            user = tail_users[rng.randrange(len(tail_users))]
            wanted = tail[user][rng.randrange(len(tail[user]))]
            query = wanted.text or ""
        else:
            user, wanted = f"user-{rng.randrange(users):05d}", None
            query = f"what does the user say about {rng.choice(SEARCH_TOPICS)} ({n})"
        started = time.perf_counter()
        hits = await reader._search_store(SearchRequest(query=query, user_id=user, k=10), ())
        timings.append((time.perf_counter() - started) * 1000)
        with_tail_hits += any(h.row.memory_id.startswith("tail-") for h in hits)
        if wanted is not None:
            exact += 1
            exact_first += bool(hits) and hits[0].row.memory_id == wanted.memory_id
    return {
        **percentiles(timings),
        "fresh_tail": sum(len(rows) for rows in tail.values()),
        "searches_with_tail_hits": with_tail_hits,
        "tail_exact_queries": exact,
        "tail_exact_first": exact_first,
    }


SEARCH_TOPICS = ("jazz", "tea", "running", "Lisbon", "chess")


async def _cached_searches(reader: ReadService, rng: random.Random, users: int, queries: int) -> dict[str, Any]:
    requests = [
        SearchRequest(query=f"what does the user say about {rng.choice(SEARCH_TOPICS)}", user_id=user, k=10)
        for user in (f"user-{rng.randrange(users):05d}" for _ in range(queries))
    ]
    for request in {r.cache_key(): r for r in requests}.values():
        # the first two asks of each: misses; a search is cached on its second miss (ReadService._admit)
        await reader.search(request)
        await reader.search(request)
    reader.counters.latency_ms.clear()  # time only the sequence below
    for request in requests:
        await reader.search(request)
    figures = layer_figures([reader], "search", percentiles)
    reader.counters.latency_ms.clear()
    return {
        "all": figures["all"],
        "hit_rate": figures["hit_rate"],
        "l1_hit_rate": figures["l1_hit_rate"],
        "distinct_requests": len({r.cache_key() for r in requests}),
    }


async def scenario_recall(settings: Settings, dataset: Path, ks: list[int]) -> dict[str, Any]:
    """recall@k of evidence turns on LoCoMo: one memory per turn, one user per conversation.

    Two modes on the same table and questions: vector only, and hybrid (the read path's: the vector ranking
    and LanceDB's BM25 full-text ranking, each ``HYBRID_DEPTH`` times deeper than k, fused by reciprocal rank).
    """
    embedder = make_embedder(settings.embedder, hash_dim=settings.hash_dim, batch_size=settings.embed_batch)
    files = sorted(dataset.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no LoCoMo conversations (*.json) under {dataset}")
    modes = ("vector", "hybrid")
    hits = {mode: dict.fromkeys(ks, 0) for mode in modes}
    total = 0
    by_category: dict[str, dict[str, int]] = {}
    depth = max(ks) * HYBRID_DEPTH
    async with scratch_lancedb(settings) as tmp:
        store = await LanceVectorStore.open(
            tmp,
            "recall",
            model=embedder.model,
            dim=embedder.dim,
            optimize_every=0,
            storage_options=settings.lancedb_storage,
        )
        for path in files:
            conversation = json.loads(path.read_text())
            user = path.stem
            turns = [
                turn
                for key, value in conversation.items()
                if key.startswith("session_") and isinstance(value, list)
                for turn in value
                if turn.get("text")
            ]
            texts = [f"{t['speaker']}: {t['text']}" for t in turns]
            vectors = await embedder.embed(texts)
            rows = [
                MemoryRow(
                    memory_id=f"{user}-{t['dia_id'].replace(':', '-')}-{i}",
                    scope=_scope(user),
                    text=text,
                    metadata={"dia_id": t["dia_id"]},
                    version=1,
                    event_id="e",
                    content_hash="h",
                    deleted=False,
                    updated_at=0,
                    vector=v.astype("<f4").tobytes(),
                )
                for i, (t, text, v) in enumerate(zip(turns, texts, vectors, strict=True))
            ]
            await store.add_rows(rows)
            await store.ensure_text_index()  # built once; later conversations' rows are scanned until optimize
            questions = [q for q in conversation.get("qa", []) if q.get("evidence")]
            qvectors = await embedder.embed([q["question"] for q in questions])
            for question, qv in zip(questions, qvectors, strict=True):
                scope = ScopeQuery(user_id=user)
                by_vector = await store.search(qv, scope, depth)
                by_text = await store.text_search(question["question"], scope, depth)
                ranked = {
                    "vector": by_vector[: max(ks)],
                    "hybrid": reciprocal_rank_fusion([by_vector, by_text], k=max(ks)),
                }
                evidence = set(question["evidence"])
                total += 1
                category = by_category.setdefault(
                    str(question.get("category")), {"questions": 0, "hits_at_max_k": 0, "hybrid_hits_at_max_k": 0}
                )
                category["questions"] += 1
                for mode in modes:
                    dia = [h.row.metadata.get("dia_id") for h in ranked[mode]]
                    for k in ks:
                        if evidence & set(dia[:k]):
                            hits[mode][k] += 1
                    if evidence & set(dia):
                        category["hits_at_max_k" if mode == "vector" else "hybrid_hits_at_max_k"] += 1
    return {
        "questions": total,
        "embedder": embedder.model,
        "mode": "vector",
        **{f"recall@{k}": round(hits["vector"][k] / total, 4) for k in ks},
        "hybrid": {f"recall@{k}": round(hits["hybrid"][k] / total, 4) for k in ks},
        "by_category": by_category,
    }


def _scope(user: str) -> Scope:
    return Scope("default", user)


# --------------------------------------------------------------------------------------------- driver


def run_lancedb_uri(settings: Settings, work: Path, run_id: str) -> str:
    """Where a run's LanceDB tables go: under an object-store MEMSTREAM_LANCEDB_URI (``s3://bucket/path``) when
    one is configured, as ``<uri>/bench-<run id>`` (the storage options come with the settings), else the run's
    folder on local disk."""
    if settings.lancedb_on_object_store:
        return f"{settings.lancedb_uri.rstrip('/')}/bench-{run_id}"
    return str(work / "lancedb")


@contextlib.asynccontextmanager
async def scratch_lancedb(settings: Settings) -> AsyncIterator[str]:
    """A LanceDB location for one scenario's own tables, removed afterwards: a temporary folder on local disk, or
    a fresh prefix under the run's object-store URI."""
    if not settings.lancedb_on_object_store:
        with tempfile.TemporaryDirectory(prefix="memstream-bench-") as tmp:
            yield tmp
        return
    uri = f"{settings.lancedb_path.rstrip('/')}/scratch-{uuid.uuid4().hex[:8]}"
    try:
        yield uri
    finally:
        await drop_lancedb(uri, settings.lancedb_storage)


async def drop_lancedb(uri: str, storage_options: dict[str, str]) -> None:
    """Drop every table at an object-store LanceDB URI (the local disk's folders are removed as folders)."""
    import lancedb

    try:
        db = await lancedb.connect_async(uri, storage_options=storage_options or None)
        await db.drop_all_tables()
    except Exception as exc:  # a leftover is worth a line, not the run's results
        log(f"could not drop the LanceDB tables at {uri}: {exc}")


async def start_ready_workers(settings: Settings, work: Path, config: BenchConfig, counters: RedisCounters) -> Workers:
    """The worker processes, each having joined its group and processed one event (models loaded, tables open)."""
    split = config.split_roles or settings.index_shards > 1
    sinks = f" and {settings.index_shards} sink process(es)" if split else ""
    log(f"starting {config.workers} worker process(es){sinks}")
    await ensure_topics(settings)
    # INFO: the sink logs each compaction it runs between batches (counted afterwards)
    workers = Workers(settings.with_(log_level="INFO", workers=config.workers), work, split=config.split_roles)
    try:
        publisher = await KafkaPublisher.start(settings)
        warm = next(iter(synthetic_events(1, seed=99)))
        await publisher.publish(settings.topics.events, [(warm.key, encode(warm))])
        await publisher.stop()
        await wait_for_count(counters, 1, 180, workers)
        await workers.wait_for_group(settings, 120)
    except BaseException:
        workers.stop()
        raise
    return workers


def keep_logs(work: Path, into: Path) -> None:
    """Copy the workers' logs of a run (``worker.log``, ``<role>/worker.log`` under its work folder) to ``into``."""
    for path in [*work.glob("*.log"), *work.glob("*/*.log")]:
        target = into / (path.name if path.parent == work else f"{path.parent.name}-{path.name}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        except OSError as exc:
            log(f"could not keep {path}: {exc}")


async def run_bench(settings: Settings, config: BenchConfig) -> dict[str, Any]:
    settings = resolve_services(settings, start=True)
    stack_home = settings.home  # the embedded stack's (its broker's and Redis' pids are read from there)
    run_id = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="memstream-bench-"))
    settings = settings.with_(
        home=work,
        lancedb_uri=run_lancedb_uri(settings, work, run_id),
        topic_prefix=f"bench-{run_id}.",
        redis_prefix=f"bench-{run_id}:",
        embedder=config.embedder,
    )
    results: dict[str, Any] = {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        # where the run's LanceDB tables were: "local disk", or the object store's URI (MEMSTREAM_LANCEDB_URI)
        "lancedb": settings.lancedb_path if settings.lancedb_on_object_store else "local disk",
        "settings": {
            k: v
            for k, v in settings.public().items()
            if k
            in (
                "embedder",
                "window_size",
                "window_ms",
                "partitions",
                "engine",
                "linger_ms",
                "fetch_max_wait_ms",
                "sink_batch",
                "sink_optimize_rows",
                "sink_index_rows",
                "sink_idle_ms",
            )
        },
        "quick": config.quick,
        "workers": config.workers,
        "split_roles": config.split_roles,
        "scenarios": {},
    }
    scenarios = results["scenarios"]
    events: list[MemoryEvent] = []
    redis = connect(settings.redis_url)
    counters = RedisCounters(redis, settings.redis_prefix)
    try:
        if {"ingest", "stages", "baseline", "shards"} & set(config.scenarios):
            log(f"generating {config.events:,} synthetic events")
            events = list(synthetic_events(config.events, users=max(100, config.events // 50)))
        if "stages" in config.scenarios:
            log("stages: each stage alone on the same events")
            scenarios["stages"] = await scenario_stages(settings, events, settings.window_records)
        if "baseline" in config.scenarios:
            log(f"baseline: {config.baseline_events:,} events one at a time")
            scenarios["baseline"] = await scenario_baseline(settings, events[: config.baseline_events])
        if {"ingest", "publish"} & set(config.scenarios):
            workers = await start_ready_workers(settings, work, config, counters)
            try:
                if "ingest" in config.scenarios:
                    log(f"ingest: {len(events):,} events through broker, worker, Redis, then the sink into LanceDB")
                    scenarios["ingest"] = await scenario_ingest(settings, events, workers, counters, stack_home)
                    await after_ingest(settings, scenarios["ingest"], workers)
                if "publish" in config.scenarios:
                    scenarios["publish"] = await scenario_publish_cli(
                        settings, config.events, workers, work, stack_home
                    )
            finally:
                results["worker_exit_code"] = workers.stop()
        if "latency" in config.scenarios:
            # a table of its own (topics, Redis keys, LanceDB table), pre-filled before its workers start
            lat = settings.with_(
                topic_prefix=f"{settings.topic_prefix}latency.",
                redis_prefix=f"{settings.redis_prefix}latency:",
                lancedb_table="latency",
            )
            log(f"latency: pre-filling {config.latency_prefill:,} memories")
            prefill_s = await prefill(lat, config.latency_prefill)
            workers = await start_ready_workers(lat, work / "latency", config, RedisCounters(redis, lat.redis_prefix))
            try:
                log(f"latency at {config.rates} events/s on {config.latency_prefill:,} memories")
                scenarios["latency"] = await scenario_latency(
                    lat, config.rates, config.rate_seconds, config.latency_prefill
                )
                results["latency_prefill_s"] = round(prefill_s, 1)
            finally:
                code = workers.stop()
                results["worker_exit_code"] = max(code, results.get("worker_exit_code", 0))
        if "search" in config.scenarios:
            scenarios["search"] = await scenario_search(
                settings, config.search_sizes, config.search_queries, config.fresh_tail
            )
        if "read" in config.scenarios:
            scenarios["read"] = await scenario_read(settings, config.read, log, percentiles)
        if "publish-wait" in config.scenarios:
            scenarios["publish-wait"] = await scenario_publish_wait(settings, work, config.user, log)
        if "serve" in config.scenarios:
            scenarios["serve"] = await scenario_serve(settings, work, config.user, log)
        if "shards" in config.scenarios:
            scenarios["shards"] = await scenario_shards(settings, events, work, log)
        if "freshness" in config.scenarios:
            scenarios["freshness"] = await scenario_freshness(settings, work, config.user, log)
        if "recall" in config.scenarios:
            if config.dataset is None:
                scenarios["recall"] = {"skipped": "no --dataset given"}
            else:
                log(f"recall on {config.dataset}")
                scenarios["recall"] = await scenario_recall(settings, config.dataset, config.recall_k)
    finally:
        try:
            await _delete_prefix(redis, settings.redis_prefix)  # only this run's keys, whatever ran
        except RedisError as exc:  # the configured Redis (unused by the user scenarios) down: the figures stand
            log(f"could not remove this run's keys ({settings.redis_prefix}*) from {settings.redis_url}: {exc}")
        await redis.aclose()
        # the run's LanceDB tables: 4.3 GB after a million events, so never left behind; the worker logs (the
        # sink's memory and compaction lines explain a figure) are kept beside the results
        keep_logs(work, config.out / f"{run_id}-logs")
        shutil.rmtree(work, ignore_errors=True)
        if settings.lancedb_on_object_store:
            await drop_lancedb(settings.lancedb_path, settings.lancedb_storage)
    derive(results)
    return results


def derive(results: dict[str, Any]) -> None:
    """The ratios the targets are stated in."""
    s = results["scenarios"]
    derived: dict[str, Any] = {}
    ingest = s.get("ingest", {}).get("events_per_s")
    if ingest and "stages" in s:
        derived["efficiency_vs_slowest_stage"] = round(ingest / s["stages"]["slowest_stage_per_s"], 3)
        derived["share_of_embedder_rate"] = round(ingest / s["stages"]["embed_texts_per_s"], 3)
    if ingest and "baseline" in s:
        derived["speedup_vs_baseline"] = round(ingest / s["baseline"]["events_per_s"], 1)
    first = s.get("ingest", {}).get("first_10pct_events_per_s")
    last = s.get("ingest", {}).get("last_10pct_events_per_s")
    if first and last:
        derived["last_vs_first_10pct"] = round(last / first, 3)
    processes = s.get("ingest", {}).get("processes", {})
    workers = {k: v for k, v in processes.items() if k not in ("broker", "redis")}
    if workers:
        derived["worker_peak_rss_mb_max"] = max(v["peak_rss_mb"] or 0 for v in workers.values())
        ratios = [v["second_vs_first_half"] for v in workers.values() if v["second_vs_first_half"] is not None]
        if ratios:
            derived["worker_rss_second_vs_first_half_max"] = max(ratios)
    results["derived"] = derived


def write_outputs(results: dict[str, Any], out: Path) -> Path:
    folder = out / f"{results['started'].replace(':', '')}-{results['run_id']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    (folder / "summary.md").write_text(markdown(results))
    plot(results, folder)
    return folder


def table_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    s = results["scenarios"]
    if "ingest" in s:
        rows += ingest_rows(s["ingest"], s.get("stages"))
    if "publish" in s:
        p = s["publish"]
        rows += [
            (
                f"memstream publish FILE, alone, {p['events']:,} lines",
                f"{p['publisher_alone_events_per_s']:,.0f} events/s ({p['publisher_alone_seconds']:.1f}s)",
            ),
            (
                "memstream publish FILE --wait (to searchable)",
                f"{p['wait_events_per_s']:,.0f} events/s ({p['wait_seconds']:.1f}s; "
                f"{p['materialized']:,} memories, {p['not_materialized']} late)",
            ),
            ("  then LanceDB caught up after", f"{p['index_caught_up_after_s']:.1f}s"),
            cpu_row("  CPU per event (--wait), until LanceDB caught up", p["cpu"]),
        ]
    if "stages" in s:
        for key, value in s["stages"].items():
            if key.endswith("_per_s") and key != "slowest_stage_per_s":
                rows.append((f"stage {key}", f"{value:,.0f}"))
        rows.append(("slowest stage", f"{s['stages']['slowest_stage']} {s['stages']['slowest_stage_per_s']:,.0f}"))
    if "baseline" in s:
        rows.append(("baseline (per event) events/s", f"{s['baseline']['events_per_s']:,.1f}"))
    for rate, figures in s.get("latency", {}).items():
        on = f"@{rate}/s on {figures.get('table_memories_before', 0):,}"
        rows.append(
            (
                f"latency {on} to change feed p50/p95/p99 ms",
                f"{figures.get('p50_ms')} / {figures.get('p95_ms')} / {figures.get('p99_ms')}",
            )
        )
        for which in ("searchable", "indexed"):
            f = figures[which]
            rows.append(
                (
                    f"latency {on} to {which} p50/p99 ms",
                    f"{f.get('p50_ms')} / {f.get('p99_ms')} ({f['probes']} probes, {f['not_reached']} not reached)",
                )
            )
    for size, figures in s.get("search", {}).items():
        u = figures["uncached"]
        rows.append((f"search @{int(size):,} p50/p99 ms (uncached, LanceDB alone)", f"{u['p50_ms']} / {u['p99_ms']}"))
        if "uncached_fresh_tail" in figures:
            t = figures["uncached_fresh_tail"]
            rows.append(
                (
                    f"search @{int(size):,} p50/p99 ms (uncached, + fresh tail of {t['fresh_tail']:,})",
                    f"{t['p50_ms']} / {t['p99_ms']} (tail hits in {t['searches_with_tail_hits']}/{t['count']}; "
                    f"exact tail match first {t['tail_exact_first']}/{t['tail_exact_queries']})",
                )
            )
        if "cached" in figures:
            c = figures["cached"]
            rows.append(
                (
                    f"search @{int(size):,} p50/p99 ms (through the caches)",
                    f"{c['all'].get('p50_ms')} / {c['all'].get('p99_ms')} at {c['hit_rate']:.1%} hits",
                )
            )
    rows += read_rows(s.get("read"))
    rows += user_rows(s)
    rows += shard_rows(s.get("shards", {}))
    recall = s.get("recall", {})
    for key, value in recall.items():
        if key.startswith("recall@"):
            rows.append((f"{key} ({recall['embedder']}, {recall['mode']})", str(value)))
    for key, value in recall.get("hybrid", {}).items():
        rows.append((f"{key} ({recall['embedder']}, hybrid)", str(value)))
    for key, value in results.get("derived", {}).items():
        rows.append((key, str(value)))
    return rows


def ingest_rows(i: dict[str, Any], stages: dict[str, Any] | None) -> list[tuple[str, str]]:
    rows = [
        (
            "ingest events/s (publish to searchable)",
            f"{i['events_per_s']:,.0f} ({i['events']:,} events in {i['seconds']:.1f}s)",
        ),
        (
            "  LanceDB caught up after the last event",
            f"{i['index_caught_up_after_s']}s (all indexed at {i['indexed_events_per_s']} events/s; "
            f"fresh tail peak {i['fresh_tail_peak']:,}, left {i['fresh_tail_left']:,})",
        ),
        (
            "  stage rates: publisher / ingest / sink",
            f"{i['publisher_events_per_s']:,.0f} / {i['events_per_s']:,.0f} / "
            f"{i['sink_records_per_s'] or 0:,.0f} records/s while behind",
        ),
    ]
    if stages:
        rows.append(("  slowest stage alone", f"{stages['slowest_stage']} {stages['slowest_stage_per_s']:,.0f}"))
    if "cpu" in i:
        rows.append(cpu_row("  CPU per event, until LanceDB caught up", i["cpu"]))
    rows.append(("ingest first/last 10% events/s", f"{i['first_10pct_events_per_s']} / {i['last_10pct_events_per_s']}"))
    for label, p in i.get("processes", {}).items():
        rows.append(
            (
                f"peak RSS MB {label}",
                f"{p['peak_rss_mb']} (first/second half {p['first_half_peak_mb']} / {p['second_half_peak_mb']}: "
                f"{p['second_vs_first_half']})",
            )
        )
    if "lancedb_fragments" in i:
        m = i["maintenance"]
        rows.append(
            (
                "LanceDB fragments after the run",
                f"{i['lancedb_fragments']} ({m['compactions']} compactions, {m['compactions_failed']} failed)",
            )
        )
    for label in ("broker", "redis"):
        f = i.get("infra", {}).get(label)
        if f:
            rows.append(
                (
                    f"{label} RSS MB, bytes per memory",
                    f"{f['rss_mb']} (before {f['rss_before_mb']}); {f['bytes_per_memory']:,.0f} B/memory, "
                    f"growth {f['growth_bytes_per_memory']:,.0f} B/memory",
                )
            )
    rows.append(("consistent after ingest", str(i.get("consistency", {}).get("consistent"))))
    return rows


def read_rows(read: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not read:
        return []
    where = f"{read['users']:,} users, {read['memories']:,} memories, Zipf({read['zipf_s']})"
    c, cold = read["context"], read["context_cold"]
    rows = [
        (
            f"context reads hit rate L1/L2/total ({where}), cold",
            f"{cold['l1_hit_rate']:.1%} / {cold['l2_hit_rate']:.1%} / {cold['hit_rate']:.1%} of {cold['reads']:,}",
        ),
        (
            "context reads hit rate L1/L2/total after warmup",
            f"{c['l1_hit_rate']:.1%} / {c['l2_hit_rate']:.1%} / {c['hit_rate']:.1%} of {c['reads']:,}",
        ),
        ("context hit p50/p99 ms", f"{c['hits'].get('p50_ms')} / {c['hits'].get('p99_ms')}"),
        ("context miss p50/p99 ms (cold run)", f"{cold['misses'].get('p50_ms')} / {cold['misses'].get('p99_ms')}"),
    ]
    u, q = read["search"]["uncached"], read["search"]["cached"]
    rows += [
        ("search uncached p50/p99 ms", f"{u['p50_ms']} / {u['p99_ms']}"),
        ("search cached p50/p99 ms (all reads)", f"{_all(q, 'p50')} / {_all(q, 'p99')}"),
        ("search cache hit rate L1/L2/total", f"{q['l1_hit_rate']:.1%} / {q['l2_hit_rate']:.1%} / {q['hit_rate']:.1%}"),
        ("search hit / miss p50 ms", f"{q['hits'].get('p50_ms')} / {q['misses'].get('p50_ms')}"),
    ]
    return rows


def _all(figures: dict[str, Any], which: str) -> Any:
    return figures.get("all", {}).get(f"{which}_ms")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# memstream bench {results['run_id']} ({results['started']})",
        "",
        f"settings: `{json.dumps(results['settings'])}`",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {value} |" for name, value in table_rows(results)]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    s = results["scenarios"]
    if "ingest" in s and s["ingest"]["progress"]:
        t, searchable, indexed, _ = zip(*s["ingest"]["progress"], strict=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(t, searchable, label="searchable (events)")
        ax.plot(t, indexed, label="in LanceDB (embedded records)")
        ax.legend()
        ax.set_xlabel("seconds")
        ax.set_ylabel("events processed")
        ax.set_title(f"ingest: {s['ingest']['events_per_s']:,.0f} events/s")
        fig.tight_layout()
        fig.savefig(folder / "ingest.png", dpi=100)
        plt.close(fig)
    if s.get("latency"):
        rates = list(s["latency"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for j, key in enumerate(("p50_ms", "p95_ms", "p99_ms")):
            ax.bar(
                [i + j * 0.27 for i in range(len(rates))], [s["latency"][r].get(key, 0) for r in rates], 0.27, label=key
            )
        ax.set_xticks([i + 0.27 for i in range(len(rates))], [f"{r}/s" for r in rates])
        ax.set_ylabel("ms, publish to change feed")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "latency.png", dpi=100)
        plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    width = max((len(name) for name, _ in rows), default=10)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
