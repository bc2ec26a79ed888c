"""``memstream bench``: measured figures, each scenario beside its baseline in the same run.

Scenarios (``--scenario`` may repeat; default: all that need no dataset):
- ingest: publish N synthetic events and time them until both stores hold them, through the real worker.
- stages: each stage alone on the same events (decode, embed, LanceDB upsert, Redis write).
- baseline: the naive per-event path (embed one, write one LanceDB row, write Redis, next).
- latency: publish-to-change-feed latency at fixed offered rates.
- search: vector search latency with a user filter at several table sizes.
- recall: recall@k on LoCoMo-format conversations (``--dataset``).
- read: Zipf-distributed context reads and searches through the read caches (streams/bench_reads.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infra.embedders import HashEmbedder, make_embedder
from infra.kafka import KafkaPublisher, ensure_topics, group_state, start_consumer
from infra.lance_store import LanceVectorStore
from infra.redis_store import RedisCacheStore, RedisCounters, connect
from infra.settings import Settings
from processors.hashing import event_content_hash
from processors.model import MemoryRow, ScopeQuery
from processors.pipeline import newest_per_memory, row_from
from processors.reading import reciprocal_rank_fusion
from schemas.events import EmbeddedEvent, MemoryEvent, Op, Scope, decode_change, decode_event, encode
from streams.bench_data import synthetic_events
from streams.bench_reads import ReadBenchConfig, layer_figures, scenario_read
from streams.cli import progress_bar, verify
from streams.reading import HYBRID_DEPTH, ReadService, SearchRequest
from streams.runtime import Stores, resolve_services
from streams.worker_process import start_workers

SCENARIOS = ("ingest", "stages", "baseline", "latency", "search", "recall", "read")


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
    read: ReadBenchConfig = field(default_factory=ReadBenchConfig)

    @classmethod
    def quick_config(cls, scenarios: list[str], embedder: str, out: Path) -> BenchConfig:
        return cls(
            scenarios=scenarios,
            embedder=embedder,
            events=5_000 if embedder == "hash" else 300,
            baseline_events=200 if embedder == "hash" else 50,
            rates=[500, 2_000],
            rate_seconds=2.0,
            search_sizes=[10_000],
            search_queries=100,
            out=out,
            quick=True,
            read=ReadBenchConfig(users=200, memories_per_user=20, reads=2_000, search_reads=500),
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
    """The worker processes a scenario runs against (``--workers``), started and stopped together."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.procs = start_workers(settings, log_dir)
        self.group_id = settings.group_id

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
        """Until every process holds partitions: a join after the clock starts would stall ingestion for the
        rebalance (seconds) and make the figure measure the group protocol."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            state, members = await group_state(settings, self.group_id)
            if state == "Stable" and members >= len(self.procs):
                return
            await asyncio.sleep(0.25)
        raise TimeoutError(f"the {len(self.procs)} workers did not form a stable group within {timeout:.0f}s")


async def wait_for_count(counters: RedisCounters, target: int, timeout: float, workers: Workers) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await counters.read()).get("events_in", 0) >= target:
            return time.monotonic()
        workers.check_alive()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the workers did not reach {target} events within {timeout:.0f}s")


# --------------------------------------------------------------------------------------------- scenarios


async def scenario_ingest(
    settings: Settings, events: list[MemoryEvent], workers: Workers, counters: RedisCounters
) -> dict[str, Any]:
    payloads = [(e.key, encode(e)) for e in events]
    publisher = await KafkaPublisher.start(settings)
    base = (await counters.read()).get("events_in", 0)
    n = len(payloads)
    progress: list[tuple[float, int]] = []
    try:
        started = time.monotonic()

        async def send() -> float:
            for i in range(0, n, 5_000):
                await publisher.publish(settings.topics.events, payloads[i : i + 5_000])
            return time.monotonic()

        sender = asyncio.create_task(send())
        bar = progress_bar("ingest", unit="events", enabled=True, total=n)
        while True:
            done = (await counters.read()).get("events_in", 0) - base
            progress.append((time.monotonic() - started, done))
            if bar is not None:
                bar.update(done - bar.n)
            if done >= n:
                break
            workers.check_alive()
            if time.monotonic() - started > 1_800:
                raise TimeoutError("ingest did not finish within 30 minutes")
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        published_at = await sender
        if bar is not None:
            bar.close()
    finally:
        await publisher.stop()
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed, 1),
        "publish_seconds": round(published_at - started, 3),
        "first_10pct_events_per_s": _segment_rate(progress, n, 0.0, 0.1),
        "last_10pct_events_per_s": _segment_rate(progress, n, 0.9, 1.0),
        "workers": len(workers.procs),
        "worker_peak_rss_mb": workers.peak_rss_mb(),
        "progress": [(round(t, 2), c) for t, c in progress],
    }


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
    with tempfile.TemporaryDirectory(prefix="memstream-bench-") as tmp:
        store = await LanceVectorStore.open(tmp, "stage", model=embedder.model, dim=embedder.dim, optimize_every=0)
        started = time.perf_counter()
        for i in range(0, len(rows), window):
            await store.upsert(_winners(rows[i : i + window]))
        out["lancedb_rows_per_s"] = round(len(rows) / (time.perf_counter() - started), 1)

    client = connect(settings.redis_url)
    prefix = f"bench-stage-{uuid.uuid4().hex[:8]}:"
    cache = RedisCacheStore(client, prefix)
    try:
        started = time.perf_counter()
        for i in range(0, len(rows), window):
            await cache.apply(rows[i : i + window])
        out["redis_rows_per_s"] = round(len(rows) / (time.perf_counter() - started), 1)
    finally:
        await _delete_prefix(client, prefix)
        await client.aclose()
    rates = {k: v for k, v in out.items() if k.endswith("_per_s")}
    slowest = min(rates, key=lambda k: rates[k])
    out["slowest_stage"] = slowest
    out["slowest_stage_per_s"] = rates[slowest]
    return out


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
        with tempfile.TemporaryDirectory(prefix="memstream-bench-") as tmp:
            store = await LanceVectorStore.open(tmp, "base", model=embedder.model, dim=embedder.dim, optimize_every=0)
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


async def scenario_latency(settings: Settings, rates: list[int], seconds: float) -> dict[str, Any]:
    """Offered load at fixed rates; latency from the publisher's send to the change on the change feed."""
    publisher = await KafkaPublisher.start(settings)
    consumer = await start_consumer(settings, [settings.topics.changes], group_id=None)
    results: dict[str, Any] = {}
    try:
        skipped = await _catch_up(consumer)
        log(f"latency: skipped {skipped:,} earlier changes on the feed")
        for rate in rates:
            sent: dict[str, float] = {}
            seen: dict[str, float] = {}
            factory_events = synthetic_events(int(rate * seconds) + 1, users=200, seed=rate)
            watcher = asyncio.create_task(_watch_changes(consumer, sent, seen))
            started = time.monotonic()
            tick = 0.005
            total = int(rate * seconds)
            count = 0
            while count < total:
                due = min(total, int((time.monotonic() - started) * rate) + 1)
                batch = []
                while count < due:
                    event = next(factory_events)
                    batch.append(event)
                    count += 1
                if batch:
                    now = time.monotonic()
                    for event in batch:
                        sent[event.event_id] = now
                    await publisher.publish(settings.topics.events, [(e.key, encode(e)) for e in batch])
                await asyncio.sleep(tick)
            deadline = time.monotonic() + 30
            while len(seen) < _expected_changes(sent) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            watcher.cancel()
            latencies = [(seen[k] - sent[k]) * 1000 for k in seen if k in sent]
            results[str(rate)] = {
                "offered_per_s": rate,
                "seconds": seconds,
                "published": len(sent),
                **percentiles(latencies),
            }
    finally:
        await consumer.stop()
        await publisher.stop()
    return results


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


async def _watch_changes(consumer: Any, sent: dict[str, float], seen: dict[str, float]) -> None:
    while True:
        batch = await consumer.getmany(timeout_ms=50, max_records=10_000)
        now = time.monotonic()
        for messages in batch.values():
            for message in messages:
                change = decode_change(message.value)
                if change.event_id in sent and change.event_id not in seen:
                    seen[change.event_id] = now


async def scenario_search(settings: Settings, sizes: list[int], queries: int) -> dict[str, Any]:
    """k=10 searches with a user filter at each table size: LanceDB alone, then through the read caches.

    Uncached: the store's search with a fixed query vector (LanceDB's scan after the user's BITMAP prefilter).
    Cached: `ReadService.search`, as the API serves it, over a sequence where each user asks one of a few
    habitual questions; each distinct request is asked once first (a miss that fills L1 and L2), then the
    sequence is timed: a hit costs the L1 lookup and one Redis round trip to validate the scope generation.
    (The bulk rows go straight into LanceDB; one memory per user also goes through Redis, as the worker
    writes it, because a scope that Redis never saw has no generation and its reads are not cached.)
    """
    embedder = HashEmbedder(settings.hash_dim)
    results: dict[str, Any] = {}
    users = 1_000
    with tempfile.TemporaryDirectory(prefix="memstream-bench-") as tmp:
        stores = await Stores.open(
            settings.with_(embedder="hash", lancedb_uri=tmp, lancedb_table="search", optimize_every=0)
        )
        store = stores.vectors
        reader = ReadService(stores)
        reader.counters.keep_latency = True
        have = 0
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
                results[str(size)] = {
                    "rows": await store.count(live_only=False),
                    "uncached": percentiles(timings),
                    "cached": await _cached_searches(reader, rng, users, queries),
                }
        finally:
            reader.counters.take()
            await stores.close()
    return results


SEARCH_TOPICS = ("jazz", "tea", "running", "Lisbon", "chess")


async def _cached_searches(reader: ReadService, rng: random.Random, users: int, queries: int) -> dict[str, Any]:
    requests = [
        SearchRequest(query=f"what does the user say about {rng.choice(SEARCH_TOPICS)}", user_id=user, k=10)
        for user in (f"user-{rng.randrange(users):05d}" for _ in range(queries))
    ]
    for request in {r.cache_key(): r for r in requests}.values():
        await reader.search(request)  # the first ask of each: a miss, which fills L1 and L2
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
    with tempfile.TemporaryDirectory(prefix="memstream-bench-") as tmp:
        store = await LanceVectorStore.open(tmp, "recall", model=embedder.model, dim=embedder.dim, optimize_every=0)
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


async def run_bench(settings: Settings, config: BenchConfig) -> dict[str, Any]:
    settings = resolve_services(settings, start=True)
    run_id = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="memstream-bench-"))
    settings = settings.with_(
        home=work,
        lancedb_uri=str(work / "lancedb"),
        topic_prefix=f"bench-{run_id}.",
        redis_prefix=f"bench-{run_id}:",
        embedder=config.embedder,
    )
    results: dict[str, Any] = {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            k: v
            for k, v in settings.public().items()
            if k in ("embedder", "window_size", "window_ms", "partitions", "engine", "linger_ms", "fetch_max_wait_ms")
        },
        "quick": config.quick,
        "workers": config.workers,
        "scenarios": {},
    }
    scenarios = results["scenarios"]
    events: list[MemoryEvent] = []
    if {"ingest", "stages", "baseline"} & set(config.scenarios):
        log(f"generating {config.events:,} synthetic events")
        events = list(synthetic_events(config.events, users=max(100, config.events // 50)))
    if "stages" in config.scenarios:
        log("stages: each stage alone on the same events")
        scenarios["stages"] = await scenario_stages(settings, events, settings.window_records)
    if "baseline" in config.scenarios:
        log(f"baseline: {config.baseline_events:,} events one at a time")
        scenarios["baseline"] = await scenario_baseline(settings, events[: config.baseline_events])
    if {"ingest", "latency"} & set(config.scenarios):
        await ensure_topics(settings)
        redis = connect(settings.redis_url)
        counters = RedisCounters(redis, settings.redis_prefix)
        workers = Workers(settings.with_(log_level="WARNING", workers=config.workers), work)
        try:
            log(f"starting {config.workers} worker process(es)")
            publisher = await KafkaPublisher.start(settings)
            warm = next(iter(synthetic_events(1, seed=99)))
            await publisher.publish(settings.topics.events, [(warm.key, encode(warm))])
            await publisher.stop()
            await wait_for_count(counters, 1, 180, workers)
            await workers.wait_for_group(settings, 120)
            if "ingest" in config.scenarios:
                log(f"ingest: {len(events):,} events through broker, worker, LanceDB and Redis")
                scenarios["ingest"] = await scenario_ingest(settings, events, workers, counters)
                report = await verify(settings)
                scenarios["ingest"]["consistency"] = {k: report[k] for k in report if k != "examples"}
            if "latency" in config.scenarios:
                log(f"latency at {config.rates} events/s")
                scenarios["latency"] = await scenario_latency(settings, config.rates, config.rate_seconds)
        finally:
            code = workers.stop()
            results["worker_exit_code"] = code
            await _delete_prefix(redis, settings.redis_prefix)
            await redis.aclose()
    if "search" in config.scenarios:
        scenarios["search"] = await scenario_search(settings, config.search_sizes, config.search_queries)
    if "read" in config.scenarios:
        redis = connect(settings.redis_url)
        try:
            scenarios["read"] = await scenario_read(settings, config.read, log, percentiles)
        finally:
            await _delete_prefix(redis, settings.redis_prefix)
            await redis.aclose()
    if "recall" in config.scenarios:
        if config.dataset is None:
            scenarios["recall"] = {"skipped": "no --dataset given"}
        else:
            log(f"recall on {config.dataset}")
            scenarios["recall"] = await scenario_recall(settings, config.dataset, config.recall_k)
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
        i = s["ingest"]
        rows.append(("ingest events/s", f"{i['events_per_s']:,.0f} ({i['events']:,} events in {i['seconds']:.1f}s)"))
        rows.append(
            ("ingest first/last 10% events/s", f"{i['first_10pct_events_per_s']} / {i['last_10pct_events_per_s']}")
        )
        rows.append(("worker peak RSS MB", str(i["worker_peak_rss_mb"])))
        rows.append(("consistent after ingest", str(i.get("consistency", {}).get("consistent"))))
    if "stages" in s:
        for key, value in s["stages"].items():
            if key.endswith("_per_s") and key != "slowest_stage_per_s":
                rows.append((f"stage {key}", f"{value:,.0f}"))
    if "baseline" in s:
        rows.append(("baseline (per event) events/s", f"{s['baseline']['events_per_s']:,.1f}"))
    for rate, figures in s.get("latency", {}).items():
        rows.append(
            (
                f"latency @{rate}/s p50/p95/p99 ms",
                f"{figures.get('p50_ms')} / {figures.get('p95_ms')} / {figures.get('p99_ms')}",
            )
        )
    for size, figures in s.get("search", {}).items():
        u = figures["uncached"]
        rows.append((f"search @{int(size):,} p50/p99 ms (uncached)", f"{u['p50_ms']} / {u['p99_ms']}"))
        if "cached" in figures:
            c = figures["cached"]
            rows.append(
                (
                    f"search @{int(size):,} p50/p99 ms (through the caches)",
                    f"{c['all'].get('p50_ms')} / {c['all'].get('p99_ms')} at {c['hit_rate']:.1%} hits",
                )
            )
    rows += read_rows(s.get("read"))
    recall = s.get("recall", {})
    for key, value in recall.items():
        if key.startswith("recall@"):
            rows.append((f"{key} ({recall['embedder']}, {recall['mode']})", str(value)))
    for key, value in recall.get("hybrid", {}).items():
        rows.append((f"{key} ({recall['embedder']}, hybrid)", str(value)))
    for key, value in results.get("derived", {}).items():
        rows.append((key, str(value)))
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
        t, c = zip(*s["ingest"]["progress"], strict=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(t, c)
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
