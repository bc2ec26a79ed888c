"""Composition: settings in, connected adapters and processors out. Every command builds on this."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from infra.embedders import make_embedder
from infra.faults import FaultSwitch
from infra.generations import ActivePointer, Generation, generation, pointer_absent_on_disk
from infra.history_store import LanceHistoryStore, history_table_name
from infra.kafka import KafkaPublisher, ensure_topics
from infra.lance_store import AnnPolicy, LanceVectorStore
from infra.log_reader import KafkaLogSource
from infra.machine import usable_cores
from infra.poison_guard import install_batch_guard
from infra.redis_store import (
    RedisCacheStore,
    RedisClient,
    RedisCounters,
    RedisEmbeddingCache,
    check_credentials,
    open_redis,
)
from infra.services import DEFAULT_KAFKA_PORT, DEFAULT_REDIS_PORT, LocalStack
from infra.settings import Settings, redact_url
from infra.sharded_store import ShardedVectorStore, check_layout, layouts_present, shard_table
from processors.compensation import CompensationProcessor
from processors.embedding import CachedEmbedder
from processors.pipeline import CompensationPolicy, IngestProcessor, Materializer, ReplayProcessor, RetryPolicy
from processors.ports import Publisher
from processors.reconcile import Reconciler
from schemas.errors import ConfigError, ServiceError, StoreError

log = logging.getLogger("memstream.runtime")


def resolve_services(settings: Settings, *, start: bool) -> Settings:
    """Fill in the broker and Redis addresses: configured ones win, else the embedded stack under ``home``.

    With ``start``, the embedded stack is started when it is not running (and the ports it got are said).
    """
    needed = [name for name, url in (("kafka", settings.kafka_bootstrap), ("redis", settings.redis_url)) if not url]
    if not needed:
        return settings
    stack = LocalStack(settings.home)
    running = {name: state for name, state in stack.running().items() if name in needed}
    missing = [name for name in needed if name not in running]
    if missing:
        if not start:
            raise ServiceError(
                f"no {' or '.join(missing)} configured and the embedded one is not running: run `memstream up`, "
                "or set MEMSTREAM_KAFKA_BOOTSTRAP and MEMSTREAM_REDIS_URL"
            )
        defaults = {"kafka": DEFAULT_KAFKA_PORT, "redis": DEFAULT_REDIS_PORT}
        started = stack.ensure({name: defaults[name] for name in missing})
        running.update(started)
        log.info("started the embedded %s", ", ".join(f"{n} {s.url}" for n, s in started.items()))
    return settings.with_(
        kafka_bootstrap=settings.kafka_bootstrap or running["kafka"].url,
        redis_url=settings.redis_url or running["redis"].url,
    )


async def preflight(settings: Settings) -> None:
    """Before a worker or server starts: refuse (AuthError) when Redis refuses the credentials.

    An unreachable Redis is not refused here: the worker starts and compensates until it is back.
    """
    client = await open_redis(settings.redis_url)
    try:
        if not await check_credentials(client, redact_url(settings.redis_url)):
            log.warning("Redis at %s does not answer yet: starting anyway", redact_url(settings.redis_url))
    finally:
        await client.aclose()


async def open_vectors(settings: Settings, table: str, model: str, dim: int, *, sink: bool) -> LanceVectorStore:
    """A generation's LanceDB table, opened as the index sink (maintenance between its batches, a small cache: it
    only probes the key index) or as anyone else (background maintenance, the readers' cache)."""
    return await LanceVectorStore.open(
        settings.lancedb_path,
        table,
        model=model,
        dim=dim,
        optimize_every=settings.optimize_every,
        index_every=settings.index_every,
        background_maintenance=not sink,
        cache_mb=settings.sink_cache_mb if sink else settings.lancedb_cache_mb,
        ann=AnnPolicy(settings.ann_min_rows, settings.ann_nprobes, settings.ann_refine_factor),
        storage_options=settings.lancedb_storage,
    )


IndexStore = LanceVectorStore | ShardedVectorStore  # the serving index: one table, or one per shard


async def open_index(settings: Settings, table: str, model: str, dim: int, *, sink: bool, shards: int) -> IndexStore:
    """A generation's index: its one table, or its ``shards`` tables (infra/sharded_store.py) read and written as
    one store, a key routed to its shard, a scope fanned out over all of them."""
    if shards == 1:
        return await open_vectors(settings, table, model, dim, sink=sink)
    opened = [await open_vectors(settings, shard_table(table, i, shards), model, dim, sink=sink) for i in range(shards)]
    return ShardedVectorStore(opened, settings.partitions)


async def index_layout(settings: Settings, pointer: ActivePointer, gen: Generation, *, serving: bool) -> int:
    """How many shards generation ``gen`` has: the serving one must have MEMSTREAM_INDEX_SHARDS (a process is
    refused, with the fix, where its tables were built with another count); one named explicitly (a rebuild
    reading the previous generation, verifying a new one) has what its tables say, or the setting if none exist."""
    names = await pointer.table_names()
    if serving:
        check_layout(gen.table, names, settings.index_shards)
        return settings.index_shards
    present = layouts_present(gen.table, names)
    if settings.index_shards in present or not present:
        return settings.index_shards
    if len(present) > 1:
        check_layout(gen.table, names, settings.index_shards)  # raises, naming what is there
    return present.pop()


async def serving_redis_prefix(settings: Settings) -> str:
    """The serving generation's Redis namespace (where the ingest path writes memories): generation 0's without
    touching LanceDB where a local deployment never switched generations, else the active pointer's."""
    if pointer_absent_on_disk(settings.lancedb_path, settings.lancedb_table):
        return generation(settings.lancedb_table, settings.redis_prefix, 0).redis_prefix
    pointer = await connect_pointer(settings)
    return (await pointer.active()).redis_prefix


async def connect_pointer(settings: Settings) -> ActivePointer:
    """The deployment's active-generation pointer (on the LanceDB location of ``settings``)."""
    return await ActivePointer.connect(
        settings.lancedb_path, settings.lancedb_table, settings.redis_prefix, settings.lancedb_storage
    )


def open_history(settings: Settings, *, sink: bool) -> LanceHistoryStore:
    """The deployment's history table (opened on first use; the sink creates it with its first batch)."""
    cache_mb = settings.sink_cache_mb if sink else settings.lancedb_cache_mb
    return LanceHistoryStore(
        settings.lancedb_path,
        history_table_name(settings.lancedb_table),
        cache_mb=cache_mb,
        storage_options=settings.lancedb_storage,
    )


@dataclass
class Stores:
    """The two stores and the Redis-backed helpers, without the broker (enough for reads and verify)."""

    settings: Settings
    redis: RedisClient
    vectors: IndexStore
    cache: RedisCacheStore
    counters: RedisCounters
    embedder: CachedEmbedder
    generation: Generation | None = None  # the generation these handles write to and read from
    pointer: ActivePointer | None = None
    _pointer_checked: float = 0.0

    sink: bool = False  # the index sink writes through these handles: LanceDB maintenance between its batches
    # every version of every memory, outside the generations (a rebuild must not lose what the log no longer has)
    history: LanceHistoryStore | None = None

    @classmethod
    async def open(cls, settings: Settings, generation: Generation | None = None, *, sink: bool = False) -> Stores:
        """Open the serving generation (the active pointer), or the one given (a rebuild fills a new one).

        ``sink``: the index sink writes LanceDB through these handles and runs its maintenance between batches
        (infra.lance_store.LanceVectorStore.maintain_if_due); every other writer keeps the background schedule."""
        base = make_embedder(
            settings.embedder,
            hash_dim=settings.hash_dim,
            batch_size=settings.embed_batch,
            threads=settings.embed_threads or usable_cores(),
        )
        redis = await open_redis(settings.redis_url)
        faults = FaultSwitch(settings.fault_file) if settings.fault_file else None
        pointer = await connect_pointer(settings)
        serving = generation is None
        generation = generation or await pointer.active()
        shards = await index_layout(settings, pointer, generation, serving=serving)
        vectors = await open_index(settings, generation.table, base.model, base.dim, sink=sink, shards=shards)
        shared = RedisEmbeddingCache(redis, settings.redis_prefix, settings.embed_cache_ttl_s)
        embedder = CachedEmbedder(
            base,
            shared if settings.shared_embed_cache else None,
            local_capacity=settings.local_embed_cache,
        )
        cache = RedisCacheStore(redis, generation.redis_prefix, settings.redis_ttl_s)
        vectors.faults = cache.faults = faults
        return cls(
            settings=settings,
            redis=redis,
            vectors=vectors,
            cache=cache,
            counters=RedisCounters(redis, settings.redis_prefix),
            embedder=embedder,
            generation=generation,
            pointer=pointer,
            sink=sink,
            history=open_history(settings, sink=sink),
            _pointer_checked=time.monotonic(),
        )

    async def follow_active(self, *, max_age_s: float | None = None) -> bool:
        """Re-resolve the active pointer (at most every ``max_age_s``); reopen the stores if it moved.

        True when the handles now point at another generation. A generation built with another embedding
        model cannot be followed: that raises a retriable :class:`StoreError` naming the model to run with
        (the worker's window waits instead of being written with vectors of the wrong model).
        """
        age = self.settings.pointer_check_ms / 1000 if max_age_s is None else max_age_s
        if self.pointer is None or time.monotonic() - self._pointer_checked < age:
            return False
        self._pointer_checked = time.monotonic()
        active = await self.pointer.active()
        if self.generation is not None and active.table == self.generation.table:
            return False
        try:
            shards = await index_layout(self.settings, self.pointer, active, serving=True)
            vectors = await open_index(
                self.settings, active.table, self.embedder.model, self.embedder.dim, sink=self.sink, shards=shards
            )
        except ConfigError as exc:
            self._pointer_checked = 0.0  # check again on the next call: never write on while the switch is pending
            raise StoreError(f"cannot follow the switch to generation {active.number}: {exc}") from exc
        old = self.vectors
        cache = RedisCacheStore(self.redis, active.redis_prefix, self.settings.redis_ttl_s)
        vectors.faults = cache.faults = old.faults
        self.vectors, self.cache = vectors, cache
        log.info(
            "following the switch to generation %d (%s, redis %s*)", active.number, active.table, active.redis_prefix
        )
        self.generation = active
        await old.close()
        return True

    @property
    def own_vectors(self) -> LanceVectorStore:
        """The one table this process' index sink writes and maintains: its shard's (settings.index_shard), or
        the generation's table when unsharded. Everything else reads and writes through :attr:`vectors`."""
        if isinstance(self.vectors, ShardedVectorStore):
            return self.vectors.shards[self.settings.sink_shard]
        return self.vectors

    def materializer(self, publisher: Publisher, **options: Any) -> Materializer:
        """The version-guarded writer of these stores (options: compensation, changes, retry, index...)."""
        return Materializer(
            self.vectors,
            self.cache,
            publisher,
            self.settings.topics,
            model=self.embedder.model,
            dim=self.embedder.dim,
            **options,
        )

    async def close(self) -> None:
        await self.vectors.close()
        await self.redis.aclose()


@dataclass(frozen=True)
class CacheOnly:
    """What waiting for "searchable" reads: the serving generation's copy in Redis, and no LanceDB handle."""

    cache: RedisCacheStore
    vectors: None = None


@asynccontextmanager
async def stores_to_wait_on(settings: Settings, *, indexed: bool) -> AsyncIterator[Stores | CacheOnly]:
    """The stores ``publish --wait`` reads: both for ``--indexed``; else Redis alone, opened without importing
    lancedb where the deployment's LanceDB is local and never switched generations (serving_redis_prefix)."""
    if indexed:
        stores = await Stores.open(settings)
        try:
            yield stores
        finally:
            await stores.close()
        return
    redis = await open_redis(settings.redis_url)
    try:
        yield CacheOnly(RedisCacheStore(redis, await serving_redis_prefix(settings), settings.redis_ttl_s))
    finally:
        await redis.aclose()


@dataclass
class Runtime:
    """Stores plus the broker publisher and the processors built on them."""

    stores: Stores
    publisher: KafkaPublisher
    materializer: Materializer
    ingest: IngestProcessor
    replay: ReplayProcessor
    compensation: CompensationProcessor

    @property
    def settings(self) -> Settings:
        return self.stores.settings

    @classmethod
    async def open(cls, settings: Settings, *, index: bool = True) -> Runtime:
        """``index=False``: the worker's ingest path, which leaves LanceDB to the index sink (streams/runtime/sink.py);
        its LanceDB handle is then the sink's when this process runs one (``settings.runs_sink``)."""
        install_batch_guard()  # in-process users (tests, tools) as well as the commands, before a consumer starts
        await ensure_topics(settings)
        stores = await Stores.open(settings, sink=settings.runs_sink and not index)
        publisher = await KafkaPublisher.start(settings)
        materializer = stores.materializer(publisher, compensation=compensation_policy(settings), index=index)
        return cls(
            stores=stores,
            publisher=publisher,
            materializer=materializer,
            ingest=IngestProcessor(stores.embedder, materializer, stores.counters),
            replay=ReplayProcessor(materializer, stores.counters),
            compensation=CompensationProcessor(materializer, stores.counters),
        )

    async def follow_active(self) -> bool:
        """The stores follow a switched pointer, and so does the materializer writing into them."""
        moved = await self.stores.follow_active()
        if moved:
            self.materializer.vectors = self.stores.vectors
            self.materializer.cache = self.stores.cache
        return moved

    async def close(self) -> None:
        await self.publisher.stop()
        await self.stores.close()


def compensation_policy(settings: Settings) -> CompensationPolicy:
    return CompensationPolicy(
        inline=RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, max_attempts=settings.store_retries),
        first_delay_s=settings.compensation_first_delay_ms / 1000,
        max_delay_s=settings.compensation_max_delay_ms / 1000,
        max_attempts=settings.compensation_attempts,
    )


def make_reconciler(settings: Settings, stores: Stores) -> Reconciler:
    """The reconciler over the embedded-events log and both stores (no broker publisher needed)."""
    return Reconciler(
        KafkaLogSource(settings, settings.topics.embedded),
        stores.vectors,
        stores.cache,
        stores.vectors,
        stores.cache,
        grace_ms=settings.reconcile_grace_s * 1000,
        duplicates=stores.vectors,
    )
