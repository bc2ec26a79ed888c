"""``memstream bench --scenario read``: Zipf-distributed reads over many users, hit rate per layer, latencies.

The table (users x memories each, hash-embedded) is written straight into LanceDB and Redis the way the worker
writes it (LanceDB first, then the Redis script that bumps the scope generations). Then, over the same Zipf(s)
sequence of users:
- context reads through ``readers`` read services (separate L1s, one shared Redis L2: like that many API
  processes), with one memory update every ``write_every`` reads; after each update the stream's rebuild
  (ContextMaintainer's ``refresh_contexts``) runs from its own read service, as the worker does;
- search, uncached (embed + LanceDB every time) and then through the caches, on the same (user, query) sequence
  (each user has a few habitual queries), with the same updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from infra.embedders import HashEmbedder
from infra.settings import Settings
from processors.hashing import event_content_hash
from processors.pipeline import row_from
from processors.publishing import EventFactory
from schemas.events import EmbeddedEvent, Scope
from streams.runtime.reading import ReadService, SearchRequest
from streams.runtime.stores import Stores
from streams.surface.operations import warmup

TOPICS = ("tea", "jazz", "running", "Lisbon", "chess", "sushi", "python", "gardening", "cycling", "opera")
QUERIES_PER_USER = 5


@dataclass
class ReadBenchConfig:
    users: int = 1_000
    memories_per_user: int = 100
    reads: int = 20_000
    zipf_s: float = 1.1
    readers: int = 2
    write_every: int = 100  # one update per this many reads (1%)
    search_reads: int = 5_000


def zipf_users(n_users: int, count: int, s: float, seed: int) -> list[int]:
    """User indexes drawn with P(rank r) proportional to r^-s (rank 1 = user 0, the hottest)."""
    ranks = np.arange(1, n_users + 1, dtype=np.float64)
    weights = ranks**-s
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(n_users, size=count, p=weights)]


def user_name(i: int) -> str:
    return f"user-{i:05d}"


def memory_text(user: int, j: int) -> str:
    return f"{user_name(user)} note {j}: likes {TOPICS[(user + j) % len(TOPICS)]} and {TOPICS[(j * 3) % len(TOPICS)]}"


async def build_table(stores: Stores, config: ReadBenchConfig, log: Any) -> int:
    embedder = HashEmbedder(stores.settings.hash_dim)
    factory = EventFactory()
    total = 0
    chunk_users = max(1, 20_000 // config.memories_per_user)
    for first in range(0, config.users, chunk_users):
        events = [
            factory.from_input(
                {"user_id": user_name(u), "memory_id": f"{user_name(u)}-m{j}", "text": memory_text(u, j)}
            )
            for u in range(first, min(config.users, first + chunk_users))
            for j in range(config.memories_per_user)
        ]
        vectors = embedder.embed_sync([e.text or "" for e in events])
        rows = [
            row_from(EmbeddedEvent(e, embedder.model, embedder.dim, v.tobytes(), event_content_hash(e)))
            for e, v in zip(events, vectors, strict=True)
        ]
        await stores.vectors.add_rows(rows)
        await stores.cache.apply(rows)
        total += len(rows)
        log(f"read: {total:,} memories written")
    log("read: building indexes")
    await stores.vectors.build_indexes()
    await stores.vectors.ensure_text_index()
    return total


async def update_memory(stores: Stores, factory: EventFactory, user: int, serial: int) -> Scope:
    """One update as the worker applies it: LanceDB, then the Redis script (which bumps the generations)."""
    embedder = HashEmbedder(stores.settings.hash_dim)
    event = factory.from_input(
        {
            "op": "update",
            "user_id": user_name(user),
            "memory_id": f"{user_name(user)}-m{serial % 7}",
            "text": f"{user_name(user)} update {serial}: now into {TOPICS[serial % len(TOPICS)]}",
        }
    )
    vector = embedder.embed_sync([event.text or ""])[0]
    row = row_from(EmbeddedEvent(event, embedder.model, embedder.dim, vector.tobytes(), event_content_hash(event)))
    await stores.vectors.upsert([row])
    await stores.cache.apply([row])
    return event.scope


def layer_figures(services: list[ReadService], kind: str, percentiles: Any) -> dict[str, Any]:
    counts = {layer: 0 for layer in ("l1", "l2", "miss")}
    samples: dict[str, list[float]] = {layer: [] for layer in counts}
    for service in services:
        for layer in counts:
            got = service.counters.latency_ms.get(f"{kind}_{layer}", [])
            counts[layer] += len(got)
            samples[layer] += got
    total = sum(counts.values()) or 1
    hits = samples["l1"] + samples["l2"]
    return {
        "all": percentiles(hits + samples["miss"]),
        "reads": sum(counts.values()),
        "hit_rate": round((counts["l1"] + counts["l2"]) / total, 4),
        "l1_hit_rate": round(counts["l1"] / total, 4),
        "l2_hit_rate": round(counts["l2"] / total, 4),
        "miss_rate": round(counts["miss"] / total, 4),
        "hits": percentiles(hits),
        "l1": percentiles(samples["l1"]),
        "l2": percentiles(samples["l2"]),
        "misses": percentiles(samples["miss"]),
    }


async def context_reads(
    stores: Stores,
    factory: EventFactory,
    readers: list[ReadService],
    stream: ReadService,
    sequence: list[int],
    config: ReadBenchConfig,
    percentiles: Any,
) -> dict[str, Any]:
    writes = 0
    for n, user in enumerate(sequence, start=1):
        await readers[n % len(readers)].context(user_id=user_name(user))
        if config.write_every and n % config.write_every == 0:
            target = zipf_users(config.users, 1, config.zipf_s, seed=n)[0]
            scope = await update_memory(stores, factory, target, n)
            await stream.refresh_contexts([scope])  # what the worker's ContextMaintainer does after the window
            writes += 1
    figures = layer_figures(readers, "context", percentiles)
    figures["writes"] = writes
    return figures


async def scenario_read(settings: Settings, config: ReadBenchConfig, log: Any, percentiles: Any) -> dict[str, Any]:
    settings = settings.with_(embedder="hash", lancedb_table="reads", optimize_every=0)
    stores = await Stores.open(settings)
    factory = EventFactory()
    readers = [ReadService(stores) for _ in range(config.readers)]
    stream = ReadService(stores)  # the worker's rebuilds of changed scopes' blocks
    for service in readers:
        service.counters.keep_latency = True
    try:
        memories = await build_table(stores, config, log)
        results: dict[str, Any] = {
            "users": config.users,
            "memories": memories,
            "zipf_s": config.zipf_s,
            "readers": config.readers,
            "writes_per_read": round(1 / config.write_every, 4) if config.write_every else 0,
        }

        sequence = zipf_users(config.users, config.reads, config.zipf_s, seed=11)
        log(f"read: {config.reads:,} context reads, Zipf({config.zipf_s}) over {config.users:,} users, cold caches")
        results["context_cold"] = await context_reads(stores, factory, readers, stream, sequence, config, percentiles)
        log("read: `memstream warmup`, then the same reads from new readers (empty L1s)")
        warmed = await warmup(settings, config.users)
        readers = [ReadService(stores) for _ in range(config.readers)]
        for service in readers:
            service.counters.keep_latency = True
        results["context"] = await context_reads(stores, factory, readers, stream, sequence, config, percentiles)
        results["context"]["after_warmup"] = warmed

        log(f"read: {config.search_reads:,} searches, uncached then cached")
        users = zipf_users(config.users, config.search_reads, config.zipf_s, seed=12)
        rng = np.random.default_rng(13)
        requests = [
            SearchRequest(
                query=f"what does {user_name(u)} like about {TOPICS[int(rng.integers(QUERIES_PER_USER))]}",
                user_id=user_name(u),
                k=10,
            )
            for u in users
        ]
        uncached = []
        for request in requests:
            started = time.perf_counter()
            await readers[0]._search_store(request, ())
            uncached.append((time.perf_counter() - started) * 1000)
        writes = 0
        for n, request in enumerate(requests, start=1):
            await readers[n % len(readers)].search(request)
            if config.write_every and n % config.write_every == 0:
                target = zipf_users(config.users, 1, config.zipf_s, seed=10_000 + n)[0]
                await update_memory(stores, factory, target, n)
                writes += 1
        results["search"] = {
            "uncached": percentiles(uncached),
            "cached": layer_figures(readers, "search", percentiles),
            "writes": writes,
        }
        return results
    finally:
        for service in readers:
            service.counters.take()
        await stores.close()
