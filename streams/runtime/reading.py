"""The read path: search (vector or hybrid, scoped, filtered), get, prompt-ready context, behind two caches.

Layers, for every read kind: L1 (in-process :class:`TtlLru`), L2 (Redis), then the stores: LanceDB merged with
the fresh tail (the memories the ingest path wrote to Redis that the index sink has not written to LanceDB yet,
processors/fresh_tail.py), so a memory is found as soon as its window committed.
Freshness: every cached value records the generation of the scope it was built from; the Redis write script
bumps that generation atomically with each applied change (which enters the fresh tail in the same step), and the
sink's clearing of the tail bumps it again. A read takes the generation first, then the tail, then LanceDB, so a
value can only be cached under a generation at or older than the data it holds: a read after ``publish --wait``
(which waits for Redis to hold the new version, hence for the bump) never returns stale data. ``get`` is validated
by the memory's own ``(version, event_id)`` in Redis instead (its scope is not known before it is read).

Every read is scoped: a memory is (tenant, memory id), so ``get`` names the tenant and finds only that tenant's
memory; search and context need a tenant and a user (a search of a whole tenant says so, ``whole_tenant``); a
null, empty or malformed scope value is a :class:`SchemaError` naming the field.

Expiry: a memory whose ``expires_at`` has passed is hidden by every read from that moment (LanceDB filters it,
the fresh tail reads it as a tombstone, and a cached value that holds one is not served: it is built again), before
the expiry sweep's tombstone removes it from the stores (processors/expiry.py).

Redis down or missing keys: reads fall through to LanceDB (and refill Redis from it by compare-and-set, never
over a newer version); nothing is cached while the generation cannot be read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from infra.read_cache import RedisReadCache, scope_field
from processors.fresh_tail import (
    merge_hits,
    merge_rows,
    newest_tail,
    page_of,
    text_hits,
    vector_hits,
    without_superseded,
)
from processors.hot_vectors import KEY_OVERHEAD_BYTES, HotVectors, VectorMatrix, WarmTrigger
from processors.keyword import KeywordIndex
from processors.model import Hit, MemoryRow, ScopeQuery, memory_key
from processors.reading import (
    MAX_BUDGET,
    MAX_K,
    MIN_BUDGET,
    Condition,
    ContextBlock,
    TtlLru,
    fuse_ranks,
    matches_all,
    parse_filters,
    reciprocal_rank_fusion,
    render_context,
)
from schemas.errors import MemStreamError, SchemaError, StoreError
from schemas.events import DEFAULT_TENANT, Scope, as_integer, integral, validate_id
from streams.runtime.stores import Stores

log = logging.getLogger("memstream.reads")

MODES = ("vector", "hybrid")
FILTER_OVERFETCH = 10  # candidates per wanted hit when metadata filters apply (they filter after the search)
MAX_CANDIDATES = 10_000
HYBRID_DEPTH = 4  # each ranking of a hybrid search contributes k * this many candidates to the fusion
COUNTER_FLUSH_S = 1.0
LAYERS = ("l1", "l2", "miss")
# users' copies a warm builds between two turns of the event loop: each is a slice of the scan's normalized vectors
# (a few µs), so 50 hold a request back well under a millisecond (500 with a norm each held it 25-50 ms at load)
WARM_YIELD_EVERY = 50
WARM_PUT_OFF_S = 2.0  # a fresh tail longer than the copies' budget (the sink far behind) puts a warm off this long
BIG_USERS_TTL_S = 60.0  # a user found over MEMSTREAM_READ_HOT_VECTORS_ROWS is searched in LanceDB this long


@dataclass(frozen=True, slots=True)
class SearchRequest:
    query: str
    tenant_id: str = DEFAULT_TENANT
    user_id: str | None = None
    agent_id: str | None = None
    run_id: str | None = None
    k: int = 10
    filters: Mapping[str, Any] | None = None
    min_score: float | None = None
    mode: str = "vector"
    whole_tenant: bool = False  # search every user of the tenant (``user_id`` may then be left out)

    def __post_init__(self) -> None:
        # k=10.0 is the integer 10 (JSON Schema's integer): LanceDB's limit and the cache key want the int
        object.__setattr__(self, "k", integral(self.k))

    def validate(self) -> tuple[Condition, ...]:
        validate_id(self.tenant_id, "tenant_id")  # never optional: no search crosses tenants
        if self.user_id is None and not self.whole_tenant:
            raise SchemaError(
                "'user_id' is required: a search is scoped to a user (ask for the whole tenant explicitly)",
                field="user_id",
            )
        if not isinstance(self.query, str) or not self.query.strip():
            raise SchemaError("the query is empty", field="query")
        as_integer(self.k, "k", low=1, high=MAX_K)  # a boolean or 10.5 is refused here, not by LanceDB
        if self.mode not in MODES:
            raise SchemaError(f"mode must be one of {', '.join(MODES)}", field="mode")
        for name in ("user_id", "agent_id", "run_id"):
            validate_id(getattr(self, name), name, optional=True)
        return parse_filters(self.filters)

    @property
    def scope(self) -> ScopeQuery:
        return ScopeQuery(self.tenant_id, self.user_id, self.agent_id, self.run_id)

    def cache_key(self) -> str:
        body: list[Any] = [self.mode, self.query, self.tenant_id, self.user_id, self.agent_id, self.run_id, self.k]
        body += [self.min_score, sorted((self.filters or {}).items())]
        return hashlib.sha1(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


MAX_PAGE = 1_000


@dataclass(frozen=True, slots=True)
class ListRequest:
    """One page of a scope's live memories, in memory-id order; ``cursor`` is the last id of the page before."""

    tenant_id: str
    user_id: str
    agent_id: str | None = None
    run_id: str | None = None
    filters: Mapping[str, Any] | None = None
    limit: int = 100
    cursor: str | None = None

    def validate(self) -> tuple[Condition, ...]:
        validate_id(self.tenant_id, "tenant_id")
        validate_id(self.user_id, "user_id")  # a listing names its user: no listing of a whole tenant
        validate_id(self.agent_id, "agent_id", optional=True)
        validate_id(self.run_id, "run_id", optional=True)
        validate_id(self.cursor, "cursor", optional=True)
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_PAGE:
            raise SchemaError(f"limit must be an integer between 1 and {MAX_PAGE}", field="limit")
        return parse_filters(self.filters)

    @property
    def scope(self) -> ScopeQuery:
        return ScopeQuery(self.tenant_id, self.user_id, self.agent_id, self.run_id)


@dataclass
class ReadCounters:
    """Hits and misses per read kind and layer, plus LanceDB fallbacks when Redis failed."""

    counts: Counter[str] = field(default_factory=Counter)
    hot: Counter[str] = field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    keep_latency: bool = False

    def note(self, kind: str, layer: str, started: float, scope: str | None = None) -> None:
        self.counts[f"read_{kind}_{layer}"] += 1
        if scope is not None:
            self.hot[scope] += 1
        if self.keep_latency:
            self.latency_ms.setdefault(f"{kind}_{layer}", []).append((time.perf_counter() - started) * 1000)

    def take(self) -> tuple[dict[str, int], dict[str, int]]:
        counts, hot = dict(self.counts), dict(self.hot)
        self.counts.clear()
        self.hot.clear()
        return counts, hot


class ReadService:
    """Cached reads over the stores. One per process; safe to share between concurrent requests."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        s = stores.settings
        self.redis_cache = self._redis_cache()
        self.search_l1: TtlLru[str, tuple[bytes, list[Hit]]] = TtlLru(s.read_cache_local, s.read_cache_local_ttl_s)
        self.context_l1: TtlLru[str, tuple[bytes, ContextBlock]] = TtlLru(s.read_cache_local, s.read_cache_local_ttl_s)
        self.get_l1: TtlLru[str, MemoryRow] = TtlLru(s.read_cache_local, s.read_cache_local_ttl_s)
        # the keys of searches this process missed once (a doorkeeper, as TinyLFU's): see _admit
        self.search_missed: TtlLru[str, bool] = TtlLru(s.read_cache_local, s.read_cache_ttl_s)
        self.hot_vectors = HotVectors(s.read_hot_vectors_mb * 2**20)
        self.big_users: TtlLru[str, bool] = TtlLru(s.read_cache_local, BIG_USERS_TTL_S)
        self._building: dict[tuple[str, bytes | None], asyncio.Future[VectorMatrix | None]] = {}
        self.warm_trigger = WarmTrigger()
        self._warming: asyncio.Task[int] | None = None
        self.counters = ReadCounters()
        self.totals: Counter[str] = Counter()  # since start, for /metrics
        self._flusher: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())

    async def close(self) -> None:
        self._stop_warming()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush_counters()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(COUNTER_FLUSH_S)
            await self.flush_counters()

    async def flush_counters(self) -> None:
        counts, hot = self.counters.take()
        self.totals.update(counts)
        if not counts and not hot:
            return
        try:
            await self.redis_cache.flush_counters(counts, hot)
        except StoreError as exc:  # counters are best effort: a read never fails for them
            log.warning("read counters not recorded: %s", exc)

    # ----------------------------------------------------------------------------------------- search

    def _redis_cache(self) -> RedisReadCache:
        """L2 in the serving store generation's namespace: its write script bumps the scope generations there."""
        s = self.stores.settings
        return RedisReadCache(self.stores.redis, self.stores.cache.prefix, s.read_cache_ttl_s, s.redis_prefix)

    async def follow_store_generation(self) -> None:
        """After a rebuild or migration switched the serving store generation, read from the new one."""
        await self.stores.follow_active()
        if self.redis_cache.prefix != self.stores.cache.prefix:  # moved now, or by the worker sharing the stores
            self.redis_cache = self._redis_cache()
            for l1 in (self.search_l1, self.context_l1, self.get_l1):
                l1.clear()
            self._stop_warming()  # its copies would be filed under the previous generation's scope generations
            self.hot_vectors.clear()
            self.big_users.clear()

    async def search(self, request: SearchRequest) -> list[Hit]:
        await self.follow_store_generation()
        started = time.perf_counter()
        conditions = request.validate()
        if request.user_id is None:  # a whole-tenant search: no scope generation to validate against
            hits = await self._search_store(request, conditions)
            self.counters.note("search", "miss", started)
            return hits
        gen_field = scope_field(request.tenant_id, request.user_id, request.agent_id)
        key = request.cache_key()
        cached = self.search_l1.get(key)
        try:
            if cached is not None:
                gen = await self.redis_cache.token(gen_field)
                if gen is not None and gen == cached[0] and not _any_expired(cached[1]):
                    self.counters.note("search", "l1", started, gen_field)
                    return cached[1]
            gen, value, copy_gen = await self.redis_cache.lookup(
                gen_field, self.redis_cache.search_key(key), self._copy_field(request.tenant_id, request.user_id)
            )
        except StoreError as exc:
            log.warning("search served from LanceDB, Redis failed: %s", exc)
            self.counters.counts["read_redis_fallbacks"] += 1
            hits = await self._search_store(request, conditions)
            self.counters.note("search", "miss", started)
            return hits
        cached_hits = None if value is None else [_hit_from(d) for d in value]
        if gen is not None and cached_hits is not None and not _any_expired(cached_hits):
            self.search_l1.put(key, (gen, cached_hits))
            self.counters.note("search", "l2", started, gen_field)
            return cached_hits
        # the generation was read first: safe to cache; the user's copy is validated by the token read with it
        hits = await self._search_store(request, conditions, copy_gen=copy_gen)
        admitted = self._admit(key)
        if gen is None or admitted:
            await self._remember(gen_field, gen, self.redis_cache.search_key(key), [_hit_dict(h) for h in hits])
        if gen is not None and admitted:
            self.search_l1.put(key, (gen, hits))
        self.counters.note("search", "miss", started, gen_field)
        return hits

    def _copy_field(self, tenant_id: str, user_id: str) -> str | None:
        """The user's field whose content token validates the user's hot copy, read with a cached read's own
        generations (one round trip for both); None where no copy is kept."""
        return scope_field(tenant_id, user_id, None) if self.hot_vectors.enabled else None

    def _admit(self, key: str) -> bool:
        """Whether a search this process just missed is cached (L1 and L2): only a key it missed before. Most
        uncached searches are questions asked once. Writing each to Redis cost a round trip, the server's CPU and
        an hour of its memory for an entry nobody read; keeping each in L1 kept ~60 Python objects per search
        alive for a while, and CPython's full collections walked them all with the loop stopped (the p99 under
        uncached load). Another process asking the same question misses once more, at most once per process."""
        if self.search_missed.get(key):
            return True
        self.search_missed.put(key, True)
        self.counters.counts["read_search_cache_deferred"] += 1
        return False

    async def fresh_tail(self, scope: ScopeQuery) -> dict[str, MemoryRow]:
        """The scope's memories LanceDB does not hold yet (processors/fresh_tail.py), read before LanceDB: the
        sink writes LanceDB before it clears the tail, so every memory is in one or the other. Redis down: none
        (the read serves what LanceDB holds)."""
        try:
            return newest_tail(await self.stores.cache.pending_rows(scope), now_ms())
        except StoreError as exc:
            log.warning("fresh tail of %s not read, Redis failed: %s", scope, exc)
            return {}

    async def _search_store(
        self, request: SearchRequest, conditions: Sequence[Condition], *, copy_gen: bytes | None = None
    ) -> list[Hit]:
        """The search from the stores (the user's hot copy, the fresh tail, LanceDB), below the result caches.
        ``copy_gen``: the user's content token if the caller read it already (else it is read here)."""
        vectors, _ = await self.stores.embedder.embed([request.query])
        vector = np.frombuffer(vectors[0], dtype="<f4")
        wanted = request.k
        hot = None  # the user's hot copy: a vector search's answer, a hybrid search's vector ranking
        if request.user_id is not None and self.hot_vectors.enabled:
            if request.mode == "vector":
                hits = await self._search_hot(request, vector, conditions, copy_gen)
                if hits is not None:
                    return hits
            else:
                hot = await self._hot_matrix(request.tenant_id, request.user_id, copy_gen)
        depth = request.k * (FILTER_OVERFETCH if conditions else 1)
        tail = await self.fresh_tail(request.scope)
        extra = len(tail)  # LanceDB is asked that much deeper: the tail may hide as many of its hits
        index = None if hot is None or conditions else self.hot_vectors.keywords(scope_field(*user_of(request)), hot)
        if hot is not None and index is not None:
            fused = await self._hot_hybrid(hot, index, request, vector, tail, depth * HYBRID_DEPTH)
            if fused is not None:
                return fused if request.min_score is None else [h for h in fused if h.score >= request.min_score]
            hot = None  # a hit's row moved since the copy was built: LanceDB ranks this search, as below would
        while True:
            if request.mode == "hybrid":
                fetch = depth * HYBRID_DEPTH
                # the copy holds the tail's memories already (newest wins): its ranking is LanceDB's merged with
                # the tail's; its keyword ranking (BM25 over the user's texts) stands for LanceDB's full-text index
                by_hot = None if hot is None else await self._hot_ranking(hot, request, vector, (), fetch)
                if by_hot is None:
                    by_vector, by_text = await asyncio.gather(
                        self.stores.vectors.search(vector, request.scope, fetch + extra),
                        self._text_ranking(request.query, request.scope, fetch + extra),
                    )
                    exhausted = len(by_vector) < fetch + extra and len(by_text) < fetch + extra
                    rankings = [merge_hits(by_vector, tail, vector_hits(tail.values(), vector, fetch), fetch)]
                else:
                    assert hot is not None
                    by_copy = await self._hot_text_ranking(hot, request, tail, fetch + extra)
                    if by_copy is None:  # no texts held, or a hit moved: LanceDB's index, as without the copy
                        by_copy = await self._text_ranking(request.query, request.scope, fetch + extra)
                    by_text = by_copy
                    exhausted = len(by_hot) < fetch and len(by_text) < fetch + extra
                    rankings = [by_hot]
                rankings.append(without_superseded(by_text, tail)[:fetch])
                if tail:
                    rankings.append(text_hits(tail.values(), request.query, fetch))
                candidates = reciprocal_rank_fusion(rankings, k=fetch)
            else:
                indexed = await self.stores.vectors.search(vector, request.scope, depth + extra)
                exhausted = len(indexed) < depth + extra
                candidates = merge_hits(indexed, tail, vector_hits(tail.values(), vector, depth), depth)
            hits = [h for h in candidates if matches_all(h.row, conditions)]
            if request.min_score is not None:
                hits = [h for h in hits if h.score >= request.min_score]
            if len(hits) >= wanted or exhausted or depth >= MAX_CANDIDATES or not conditions:
                return hits[:wanted]
            depth = min(depth * 4, MAX_CANDIDATES)  # the filters kept too few: look deeper

    # ----------------------------------------------------------------------------------------- hot vectors

    async def _search_hot(
        self,
        request: SearchRequest,
        vector: np.ndarray[Any, Any],
        conditions: Sequence[Condition],
        copy_gen: bytes | None = None,
    ) -> list[Hit] | None:
        """A vector search of one user from the user's hot matrix (processors/hot_vectors.py); None when the user
        is not held and cannot be (over MEMSTREAM_READ_HOT_VECTORS_ROWS, or Redis failed), or a hit's row could
        not be read at the version the copy ranked: LanceDB answers."""
        matrix = await self._hot_matrix(request.tenant_id, request.user_id or "", copy_gen)
        if matrix is None:
            return None
        hits = await self._hot_ranking(matrix, request, vector, conditions, request.k)
        if hits is not None and request.min_score is not None:
            hits = [h for h in hits if h.score >= request.min_score]
        return hits

    async def _hot_ranking(
        self,
        matrix: VectorMatrix,
        request: SearchRequest,
        vector: np.ndarray[Any, Any],
        conditions: Sequence[Condition],
        wanted: int,
    ) -> list[Hit] | None:
        """The copy's best ``wanted`` hits of the request's sub-scope that the filters keep, with their rows.
        The copy ranks; only the rows ranked are read (filters: deeper until enough are kept, as for LanceDB)."""
        now = now_ms()  # the matrix outlives the moment it was built: what expired since is left out here
        depth = wanted * (FILTER_OVERFETCH if conditions else 1)
        while True:
            ranked = matrix.top(vector, depth, request.agent_id, request.run_id, now)
            rows = await self._hot_rows(matrix, [i for i, _ in ranked])
            if rows is None:
                return None
            hits = [
                Hit(row, score) for row, (_, score) in zip(rows, ranked, strict=True) if matches_all(row, conditions)
            ]
            if len(hits) >= wanted or len(ranked) < depth or not conditions:
                return hits[:wanted]
            depth *= 4  # the filters kept too few: look deeper

    async def _hot_hybrid(
        self,
        matrix: VectorMatrix,
        index: KeywordIndex,
        request: SearchRequest,
        vector: np.ndarray[Any, Any],
        tail: Mapping[str, MemoryRow],
        fetch: int,
    ) -> list[Hit] | None:
        """A hybrid search without filters answered from the user's copy: its vector and keyword rankings (and the
        tail's keyword ranking) fused by memory id first, the rows then read for the ``k`` hits returned only.
        The same fusion and the same hits as ranking with rows (:meth:`_hot_ranking`, :meth:`_hot_text_ranking`),
        which read the rows of up to ``fetch`` hits of each ranking: 80 rows from Redis for 10 returned, a third
        of a hybrid search's CPU. None where a hit's row moved since the copy was built."""
        now = now_ms()
        by_vector = [i for i, _ in matrix.top(vector, fetch, request.agent_id, request.run_id, now)]
        by_text = [i for i, _ in index.top(request.query, fetch, _keyword_candidates(matrix, request, tail, now))]
        tail_text = text_hits(tail.values(), request.query, fetch) if tail else []
        vector_ids = [_memory_id(matrix, i) for i in by_vector]
        text_ids = [_memory_id(matrix, i) for i in by_text]
        ranked = dict(zip([*text_ids, *vector_ids], [*by_text, *by_vector], strict=True))
        fused = fuse_ranks(
            [vector_ids, text_ids] + ([[h.row.memory_id for h in tail_text]] if tail_text else []), request.k
        )
        from_copy = [ranked[memory_id] for memory_id, _ in fused if memory_id in ranked]
        rows = await self._hot_rows(matrix, from_copy)
        if rows is None:
            return None
        self.counters.counts["read_hot_keyword_hits"] += 1
        by_id = {row.memory_id: row for row in rows}
        by_id.update({h.row.memory_id: h.row for h in tail_text if h.row.memory_id not in ranked})
        return [Hit(by_id[memory_id], score) for memory_id, score in fused]

    async def _hot_text_ranking(
        self, matrix: VectorMatrix, request: SearchRequest, tail: Mapping[str, MemoryRow], wanted: int
    ) -> list[Hit] | None:
        """The copy's BM25 ranking of the request's sub-scope (processors/keyword.py), with its rows: what LanceDB's
        full-text index gives without the copy, the tail's memories left out as there (they join the fusion as the
        tail's own keyword ranking). None where the copy holds no texts or a hit's row moved: LanceDB answers."""
        index = self.hot_vectors.keywords(scope_field(*user_of(request)), matrix)
        if index is None:
            return None
        ranked = index.top(request.query, wanted, _keyword_candidates(matrix, request, tail, now_ms()))
        rows = await self._hot_rows(matrix, [i for i, _ in ranked])
        if rows is None:
            return None
        self.counters.counts["read_hot_keyword_hits"] += 1
        return [Hit(row, score) for row, (_, score) in zip(rows, ranked, strict=True)]

    async def _hot_rows(self, matrix: VectorMatrix, ranked: Sequence[int]) -> list[MemoryRow] | None:
        """The rows of a copy's ranked hits: held by a copy built from rows, else read by key (:meth:`_rows_at`).
        Each must be the version the copy ranked: a write between the generation's read and this one moved the
        memory (the next search rebuilds the copy), and a hit must never pair one version's score with another's
        text: None then, and LanceDB answers this search."""
        if matrix.rows is not None:
            return [matrix.rows[i] for i in ranked]
        rows = await self._rows_at([str(matrix.keys[i]) for i in ranked], [matrix.order(i) for i in ranked])
        if rows is None:
            self.counters.counts["read_hot_vectors_moved"] += 1
        return rows

    async def _rows_at(
        self, keys: Sequence[str], orders: Sequence[tuple[int, str]], *, durable_too: bool = False
    ) -> list[MemoryRow] | None:
        """The rows of these memories at these (version, event id)s, or None where one is not found at its own:
        from Redis (the hot copy of every memory, one pipelined round trip), from LanceDB for those Redis does not
        hold (and, ``durable_too``, for those Redis holds at another version: a ranking LanceDB made)."""
        try:
            found: list[MemoryRow | None] = list(await self.stores.cache.get(keys)) if keys else []
        except StoreError as exc:
            log.warning("rows of %d hits read from LanceDB, Redis failed: %s", len(keys), exc)
            found = [None] * len(keys)
        again = {
            key
            for key, row, order in zip(keys, found, orders, strict=True)
            if row is None or (durable_too and (row.deleted or row.order() != order))
        }
        if again:
            durable = {row.key: row for row in await self.stores.vectors.get(sorted(again))}
            found = [durable.get(key) if key in again else row for key, row in zip(keys, found, strict=True)]
        rows: list[MemoryRow] = []
        for row, order in zip(found, orders, strict=True):
            if row is None or row.deleted or row.order() != order:
                return None
            rows.append(row)
        return rows

    async def _text_ranking(self, query: str, scope: ScopeQuery, depth: int) -> list[Hit]:
        """LanceDB's full-text ranking of the scope with its rows: the ranking from the index, the rows of its
        versions from Redis (or LanceDB); a version found nowhere now (the sink wrote a newer one meanwhile): the
        whole search with LanceDB's rows, as before."""
        ranked = await self.stores.vectors.text_search_orders(query, scope, depth)
        rows = await self._rows_at([r[0] for r in ranked], [(r[1], r[2]) for r in ranked], durable_too=True)
        if rows is None:
            self.counters.counts["read_text_rows_moved"] += 1
            return await self.stores.vectors.text_search(query, scope, depth)
        return [Hit(row, r[3]) for row, r in zip(rows, ranked, strict=True)]

    async def _hot_matrix(self, tenant_id: str, user_id: str, gen: bytes | None = None) -> VectorMatrix | None:
        """The user's matrix at the user's generation now: held, or built once for all the searches waiting on it.

        The generation is read before the data (the fresh tail, then LanceDB), as for every cached read, so a
        matrix is filed under a generation at or older than what it holds; any later write moves the generation
        and the next search rebuilds it. ``gen``: the user's content token as the caller read it in this read's
        first round trip (None: read here)."""
        user = scope_field(tenant_id, user_id, None)
        if self.big_users.get(user):
            return None
        if gen is None:
            try:
                gen = await self.redis_cache.token(user, content_only=True)
            except StoreError:
                return None  # no generation to validate a copy against: LanceDB and the tail, as without it
        if gen is not None:
            held = self.hot_vectors.get(user, gen)
            if held is not None:
                self.counters.counts["read_hot_vectors_hits"] += 1
                return held
        building = self._building.get((user, gen))
        if building is None:
            building = asyncio.ensure_future(self._build_matrix(user, gen, ScopeQuery(tenant_id, user_id)))
            self._building[(user, gen)] = building
            building.add_done_callback(lambda _: self._building.pop((user, gen), None))
        return await asyncio.shield(building)

    async def _build_matrix(self, user: str, gen: bytes | None, scope: ScopeQuery) -> VectorMatrix | None:
        try:
            tail = newest_tail(await self.stores.cache.pending_rows(scope), now_ms())
        except StoreError as exc:  # without the tail the copy would miss fresh memories: not built
            log.warning("hot vectors of %s not built, Redis failed: %s", user, exc)
            return None
        limit = self.stores.settings.read_hot_vectors_rows
        matrix = None if tail else await self._columnar_copy(scope, limit)
        if matrix is None:
            rows = await self.stores.vectors.scope_vectors(scope, limit + 1)
            if len(rows) > limit:
                self.big_users.put(user, True)
                self.counters.counts["read_hot_vectors_big_users"] += 1
                return None
            matrix = VectorMatrix.build(rows, tail)
        if gen is not None:  # a user with no generation yet: used once, not kept (the search starts one)
            self.hot_vectors.put(user, gen, matrix)
        self.counters.counts["read_hot_vectors_builds"] += 1
        if self.warm_trigger.note_build() and self._warming is None:
            self._warming = asyncio.create_task(self.warm_hot_vectors(scope.tenant_id or DEFAULT_TENANT))
            self._warming.add_done_callback(self._warmed)
        return matrix

    async def _columnar_copy(self, scope: ScopeQuery, limit: int) -> VectorMatrix | None:
        """A user's copy from a columnar scan, as a warm builds every user's: no Python object per row. Why: a
        copy built from rows cost a MemoryRow per memory to build and to keep (at 1M memories over 2,000 users,
        500 per user, more users than the budget holds were built again and again, 25-60 ms of CPU each, and the
        rows kept were what full collections walked). None (the row path decides) with a fresh tail (the general
        merge), over ``limit`` rows, a row without a vector, or a key LanceDB holds twice."""
        columns = await self.stores.vectors.users_columns(scope, limit)
        if columns is None:
            return None
        spans = columns.user_spans()
        if len(spans) != 1 or spans[0][3]:
            return None
        _, start, end, _ = spans[0]
        return VectorMatrix.from_columns(columns, start, end)

    def _stop_warming(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            self._warming = None

    def _warmed(self, task: asyncio.Task[int]) -> None:
        if self._warming is task:
            self._warming = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("hot vectors not warmed: %s", task.exception())

    async def warm_hot_vectors(self, tenant_id: str) -> int:
        """Build the copies of a tenant's users from one scan of the table, up to the reader's budget (users held
        at their generation already are kept). Called when copies are being built user by user at a high rate
        (WarmTrigger). As for one user, each user's generation is read before the data (the fresh tail, then
        LanceDB): a write meanwhile moves it and the next search rebuilds that user's copy. Returns how many
        copies it built."""
        started = time.perf_counter()
        scope = ScopeQuery(tenant_id)
        try:
            # rows the budget holds; a fresh tail as long (read whole, with its vectors) waits for the sink
            budget_rows = self.hot_vectors.budget_bytes // (self.stores.embedder.dim * 4 + KEY_OVERHEAD_BYTES)
            if await self.stores.cache.pending_count() > budget_rows:
                self.warm_trigger.put_off(WARM_PUT_OFF_S)
                return 0
            users = await self.stores.vectors.scope_users(scope)
            fields = [scope_field(tenant_id, user, None) for user in users]
            gens = await asyncio.gather(*(self.redis_cache.token(f, content_only=True) for f in fields))
            tail = newest_tail(await self.stores.cache.pending_rows(scope))
            scanned = await self.stores.vectors.users_columns(scope, budget_rows)
        except StoreError as exc:
            log.warning("hot vectors of tenant %s not warmed: %s", tenant_id, exc)
            return 0
        if scanned is None:
            log.info(
                "hot vectors of tenant %s not warmed: more live memories than MEMSTREAM_READ_HOT_VECTORS_MB holds "
                "(%d rows), or rows without vectors; copies are built user by user",
                tenant_id,
                budget_rows,
            )
            return 0
        spans = {user: (start, end, repeated) for user, start, end, repeated in scanned.user_spans()}
        with_tail = {row.scope.user_id for row in tail.values()}
        limit, built, left = self.stores.settings.read_hot_vectors_rows, 0, 0
        for user, user_field, gen in zip(users, fields, gens, strict=True):
            if gen is None or user not in spans or self.hot_vectors.get(user_field, gen) is not None:
                continue  # not cacheable yet, or held
            start, end, repeated = spans[user]
            if end - start > limit:
                self.big_users.put(user_field, True)
                continue
            if user in with_tail or repeated:
                left += 1  # the general merge needs the user's rows: built by the user's next search
                continue
            self.hot_vectors.put(user_field, gen, VectorMatrix.from_columns(scanned, start, end))
            built += 1
            if built % WARM_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # searches go on between the builds
        self.counters.counts["read_hot_vectors_warmed"] += built
        log.info(
            "hot vectors of tenant %s warmed from one scan: %d users' copies built from %d rows in %.2fs "
            "(%d left to their next search: a fresh tail or a repeated key)",
            tenant_id,
            built,
            len(scanned),
            time.perf_counter() - started,
            left,
        )
        return built

    # ----------------------------------------------------------------------------------------- list

    async def page(self, request: ListRequest) -> tuple[list[MemoryRow], str | None]:
        """A page of the scope's live memories and the cursor of the next page (None: the last one). Not cached:
        a listing walks a scope once, unlike the repeated searches the caches are for.

        The fresh tail of the whole user is read first (the sink writes LanceDB before it clears the tail, so
        every memory is in one or the other; a newer version under another agent hides the old one), then
        LanceDB in id order: ``limit + len(tail) + 1`` rows are enough to fill the page, since each tail entry
        hides at most one of them. With metadata filters, or when moved memories hid more, the whole rest of the
        scope is read."""
        await self.follow_store_generation()
        started = time.perf_counter()
        conditions = request.validate()
        tail = await self.fresh_tail(ScopeQuery(request.tenant_id, request.user_id))
        depth: int | None = None if conditions else request.limit + len(tail) + 1
        while True:
            indexed = await self.stores.vectors.page_rows(request.scope, request.cursor, depth)
            complete = depth is None or len(indexed) < depth
            page = page_of(
                indexed,
                tail,
                request.scope,
                request.cursor,
                request.limit,
                complete=complete,
                keep=lambda row: matches_all(row, conditions),
            )
            if page is not None:
                self.counters.note("list", "miss", started)
                return page
            depth = None

    # ----------------------------------------------------------------------------------------- get

    async def get(self, tenant_id: str, memory_id: str) -> MemoryRow | None:
        """The tenant's memory or ``None`` (absent, deleted, or only another tenant's: ids are per tenant).
        L1 is validated by the version Redis holds for it."""
        await self.follow_store_generation()
        started = time.perf_counter()
        validate_id(tenant_id, "tenant_id")
        validate_id(memory_id, "memory_id")
        key = memory_key(tenant_id, memory_id)
        try:
            local = self.get_l1.get(key)
            if local is not None and local.expired(now_ms()):
                self.get_l1.discard(key)
                local = None
            if local is not None:
                if await self._redis_order(key) == local.order():
                    self.counters.note("get", "l1", started)
                    return local
                self.get_l1.discard(key)
            [cached] = await self.stores.cache.get([key])
        except StoreError as exc:
            log.warning("get %s served from LanceDB, Redis failed: %s", key, exc)
            self.counters.counts["read_redis_fallbacks"] += 1
            durable = await self.stores.vectors.get([key])
            self.counters.note("get", "miss", started)
            return _live(durable[0] if durable else None)
        if cached is not None:
            self.counters.note("get", "l2", started)
            if not cached.deleted:
                self.get_l1.put(key, cached)
            return _live(cached)
        durable = await self.stores.vectors.get([key])
        row = durable[0] if durable else None
        if row is not None:
            await self._refill([row])
        self.counters.note("get", "miss", started)
        return _live(row)

    async def _redis_order(self, key: str) -> tuple[int, str] | None:
        redis_key = self.stores.cache.memory_key(key)
        v, e = await _redis_call(lambda: self.stores.redis.hmget(redis_key, ["v", "e"]))
        return None if v is None else (int(v), e.decode())

    async def _refill(self, rows: Sequence[MemoryRow]) -> None:
        """Copy LanceDB's rows into Redis by compare-and-set: a newer version there is never overwritten."""
        try:
            await self.stores.cache.apply(rows, bump=False)
        except StoreError as exc:
            log.warning("Redis not refilled with %d memories: %s", len(rows), exc)

    # ----------------------------------------------------------------------------------------- context

    async def context(
        self,
        *,
        user_id: str,
        tenant_id: str = DEFAULT_TENANT,
        agent_id: str | None = None,
        budget: int | None = None,
        rebuild: bool = False,
    ) -> ContextBlock:
        """The scope's prompt-ready block: usually one round trip (generation + block), rebuilt when stale."""
        await self.follow_store_generation()
        started = time.perf_counter()
        validate_id(tenant_id, "tenant_id")
        validate_id(user_id, "user_id")
        validate_id(agent_id, "agent_id", optional=True)
        budget = as_integer(budget or self.stores.settings.context_budget, "budget", low=MIN_BUDGET, high=MAX_BUDGET)
        gen_field = scope_field(tenant_id, user_id, agent_id)
        key = self.redis_cache.context_key(gen_field, budget)
        local = None if rebuild else self.context_l1.get(key)
        try:
            if local is not None:
                gen = await self.redis_cache.token(gen_field)
                if gen is not None and gen == local[0] and not local[1].stale(now_ms()):
                    self.counters.note("context", "l1", started, gen_field)
                    return local[1]
            gen, value, copy_gen = await self.redis_cache.lookup(gen_field, key, self._copy_field(tenant_id, user_id))
        except StoreError as exc:
            log.warning("context of %s built from LanceDB, Redis failed: %s", gen_field, exc)
            self.counters.counts["read_redis_fallbacks"] += 1
            block = await self._build_context(tenant_id, user_id, agent_id, budget)
            self.counters.note("context", "miss", started)
            return block
        cached_block = None if value is None or rebuild else ContextBlock.from_dict(value)
        if cached_block is not None and gen is not None and not cached_block.stale(now_ms()):
            self.context_l1.put(key, (gen, cached_block))
            self.counters.note("context", "l2", started, gen_field)
            return cached_block
        block = await self._build_context(tenant_id, user_id, agent_id, budget, copy_gen)
        # the default budget's blocks are kept current by the stream (refresh_contexts), once registered
        await self._remember(
            gen_field, gen, key, block.to_dict(), register_block=budget == self.stores.settings.context_budget
        )
        if gen is not None:
            self.context_l1.put(key, (gen, block))
        self.counters.note("context", "miss", started, gen_field)
        return block

    async def _build_context(
        self, tenant_id: str, user_id: str, agent_id: str | None, budget: int, copy_gen: bytes | None = None
    ) -> ContextBlock:
        rows = await self._context_rows_from_copy(tenant_id, user_id, agent_id, copy_gen)
        if rows is None:
            # a user-level block covers all the user's agents (None matches any), an agent's all its runs
            scope = ScopeQuery(tenant_id=tenant_id, user_id=user_id, agent_id=agent_id)
            tail = await self.fresh_tail(scope)
            rows = merge_rows(await self.stores.vectors.scope_rows(scope), tail)
        return render_context(rows, budget)

    async def _context_rows_from_copy(
        self, tenant_id: str, user_id: str, agent_id: str | None, copy_gen: bytes | None
    ) -> list[MemoryRow] | None:
        """The live memories of the block's scope from the user's hot copy: its rows, or for a warm's columnar copy
        the rows of its keys read from Redis at the versions it holds (one pipelined round trip). Why: a block
        built from LanceDB is a filtered scan, 15-25 ms of CPU per user's first read (issue 24: context p99 764 ms
        at 32 connections), while the copy the user's searches use knows every live memory's key and version.
        The copy's generation is read with the block's (the same HMGET) or after it, so what the copy holds is at
        least as new as the generation the block is filed under. None (LanceDB builds it) without a copy, for a
        copy that left a memory out (no vector), or where a memory moved since the copy was built."""
        if not self.hot_vectors.enabled:
            return None
        matrix = await self._hot_matrix(tenant_id, user_id, copy_gen)
        if matrix is None or not matrix.complete:
            return None
        rows = await self._hot_rows(matrix, matrix.live(agent_id, None, now_ms()).tolist())
        if rows is not None:
            self.counters.counts["read_hot_context_builds"] += 1
        return rows

    async def refresh_contexts(self, scopes: Iterable[Scope]) -> int:
        """Rebuild the default-budget blocks (user level and agent level) of the scopes a window changed, where
        someone has read them: registered when a read stored them (RedisReadCache.registered_among), and still in
        Redis (asked in one round trip, for the registered ones only; those gone leave the registry). A user's
        block shared by several changed agents is rebuilt once. Returns how many blocks were rebuilt."""
        if not await self.redis_cache.any_blocks_registered():  # nobody reads blocks: no key to make per scope
            return 0
        budget = self.stores.settings.context_budget
        candidates: dict[str, tuple[Scope, str | None]] = {}
        for scope in sorted(scopes, key=lambda s: (s.tenant_id, s.user_id, s.agent_id or "")):
            for agent in (None, scope.agent_id):
                key = self.redis_cache.context_key(scope_field(scope.tenant_id, scope.user_id, agent), budget)
                candidates.setdefault(key, (scope, agent))
        registered = await self.redis_cache.registered_among(list(candidates))
        wanted = {key: at for (key, at), read in zip(candidates.items(), registered, strict=True) if read}
        present = await self.redis_cache.exists_many(list(wanted))
        await self.redis_cache.unregister_blocks(
            [key for key, cached in zip(wanted, present, strict=True) if not cached]
        )
        rebuilt = 0
        for (scope, agent), cached in zip(wanted.values(), present, strict=True):
            if not cached:
                continue
            try:
                await self.context(tenant_id=scope.tenant_id, user_id=scope.user_id, agent_id=agent, rebuild=True)
                rebuilt += 1
            except MemStreamError as exc:  # the next read of it rebuilds it: go on with the others
                log.warning("context block of %s/%s not rebuilt: %s", scope.tenant_id, scope.user_id, exc)
        return rebuilt

    # ----------------------------------------------------------------------------------------- shared

    async def _remember(
        self, gen_field: str, gen: bytes | None, key: str, value: Any, *, register_block: bool = False
    ) -> None:
        """Cache a value built after reading ``gen``; a scope with no generation yet gets one (next read caches)."""
        try:
            if gen is None:
                await self.redis_cache.start_generation(gen_field)
            else:
                await self.redis_cache.store(key, gen, value, register_block=register_block)
        except StoreError as exc:
            log.warning("read cache not written: %s", exc)


async def _redis_call(action: Any) -> Any:
    from infra.redis_store import guarded

    return await guarded("validating a cached memory", action)


def user_of(request: SearchRequest) -> tuple[str, str, None]:
    """The user-level scope of a user's search: whose copy (and keyword index) it reads."""
    return request.tenant_id, request.user_id or "", None


def _keyword_candidates(
    matrix: VectorMatrix, request: SearchRequest, tail: Mapping[str, MemoryRow], now: int
) -> np.ndarray[Any, Any]:
    """The copy's rows a keyword ranking scores: the request's live sub-scope less the memories the fresh tail
    holds a newer version of (those join the fusion as the tail's own keyword ranking, as with LanceDB's full-text
    index, which holds only what the sink wrote)."""
    candidates = matrix.live(request.agent_id, request.run_id, now)
    if tail:
        candidates = candidates[[str(matrix.keys[i]) not in tail for i in candidates.tolist()]]
    return candidates


def _memory_id(matrix: VectorMatrix, i: int) -> str:
    """The memory id of a copy's row (its key is ``<tenant>/<memory id>``)."""
    return str(matrix.keys[i]).split("/", 1)[1]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _live(row: MemoryRow | None) -> MemoryRow | None:
    """The row if it is readable: not a tombstone, and not expired (whichever store or cache it came from)."""
    return None if row is None or row.hidden(now_ms()) else row


def _any_expired(hits: Sequence[Hit]) -> bool:
    """Whether a cached result holds a memory that has expired since: it is not served, but built again."""
    now = now_ms()
    return any(h.row.expired(now) for h in hits)


def _hit_dict(hit: Hit) -> list[Any]:
    r = hit.row
    s = r.scope
    return [
        r.memory_id,
        [s.tenant_id, s.user_id, s.agent_id, s.run_id],
        r.text,
        r.metadata,
        r.version,
        r.event_id,
        r.content_hash,
        r.updated_at,
        hit.score,
        r.created_at,
        r.expires_at,
    ]


def _hit_from(d: list[Any]) -> Hit:
    memory_id, scope, text, metadata, version, event_id, content_hash, updated_at, score = d[:9]
    created_at, expires_at = d[9:11] if len(d) >= 11 else (None, None)  # hits cached before they were kept
    row = MemoryRow(
        memory_id,
        Scope(*scope),
        text,
        metadata,
        version,
        event_id,
        content_hash,
        False,
        updated_at,
        created_at=created_at,
        expires_at=expires_at,
    )
    return Hit(row, float(score))
