"""The operations the CLI, the demo and the tools share: publish, verify, stats, reconcile, warmup, and the exit codes.

They live apart from the CLI so that tools can use them without importing the CLI (which imports the tools)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, TextIO

from infra.kafka import KafkaPublisher, ensure_topics
from infra.log_reader import LogReader, StartAt
from infra.read_cache import SEP
from infra.redis_store import IndexProgress
from infra.settings import Settings
from infra.sharded_store import ShardedVectorStore
from processors.model import ScopeQuery
from processors.pipeline import COUNTER_NAMES
from processors.verify import compare
from schemas.consistency import ReconcileReport, ReconcileRequest, decode_reconcile
from schemas.errors import MemStreamError
from schemas.events import Scope, encode
from streams.runtime.reading import ReadService
from streams.runtime.sink import wait_for_index
from streams.runtime.stores import Stores, make_reconciler, stores_to_wait_on
from streams.surface.api import MemoryPublisher, dumps, wait_published
from streams.surface.console import progress_bar

log = logging.getLogger("memstream.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_READY = 3


INDEX_WAIT_S = 60.0  # how long verify waits for the index sink to catch up before it compares


async def publish(
    settings: Settings,
    lines: Any,
    *,
    wait: bool,
    timeout: float,
    as_json: bool,
    indexed: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """``wait``: until every event is searchable (Redis holds it); ``indexed``: until LanceDB holds it too."""
    bar = progress_bar("publishing", unit="lines", enabled=not as_json)
    async with MemoryPublisher(settings) as publisher:
        result = await publisher.publish_lines(lines, on_progress=bar.update if bar else None, remember_newest=wait)
    if bar:
        bar.close()
    report = result.to_dict()
    not_done = []
    if wait and result.newest:
        async with stores_to_wait_on(settings, indexed=indexed) as stores:
            not_done = await wait_published(settings, stores, result, timeout=timeout, indexed=indexed)
        report["materialized"] = len(result.newest) - len(not_done)
        report["not_materialized"] = [e.memory_id for e in not_done]
    if as_json:
        print(dumps(report), file=out)
    else:
        print(f"accepted {report['accepted']}, rejected {report['rejected']}", file=out)
        for r in result.rejected:
            print(f"  line {r.line}: {r.reason}", file=sys.stderr)
        if wait:
            where = "searchable and in LanceDB" if indexed else "searchable"
            print(f"materialized {report.get('materialized', 0)} memories ({where})", file=out)
            for memory_id in report.get("not_materialized", [])[:20]:
                print(f"  not materialized within {timeout:.0f}s: {memory_id}", file=sys.stderr)
    if not_done:
        return EXIT_NOT_READY
    return EXIT_FAILED if result.rejected else EXIT_OK


async def reconcile_here(settings: Settings, request: ReconcileRequest) -> ReconcileReport:
    stores = await Stores.open(settings)
    try:
        return await make_reconciler(settings, stores).run(request)
    finally:
        await stores.close()


async def request_reconcile(
    settings: Settings, request: ReconcileRequest, *, wait: float | None
) -> ReconcileReport | None:
    """Publish a request; with ``wait``, follow the reconcile topic (from before publishing) for its report."""
    await ensure_topics(settings)
    topic = settings.topics.reconcile
    reader = await LogReader.open(settings, topic) if wait is not None else None
    try:
        if reader is not None:
            await reader.seek(StartAt(at_end=True))
        publisher = await KafkaPublisher.start(settings)
        try:
            await publisher.publish(topic, [(request.key, encode(request))])
        finally:
            await publisher.stop()
        if reader is None or wait is None:
            return None
        try:
            async with asyncio.timeout(wait):
                async for window in reader.follow(poll_ms=200):
                    for record in window:
                        found = _report_for(record.value, request.request_id)
                        if found is not None:
                            return found
        except TimeoutError:
            return None
        return None
    finally:
        if reader is not None:
            await reader.close()


def _report_for(raw: bytes, request_id: str) -> ReconcileReport | None:
    try:
        message = decode_reconcile(raw)
    except MemStreamError:
        return None
    if isinstance(message, ReconcileReport) and message.request_id == request_id:
        return message
    return None


async def verify(
    settings: Settings, scope: ScopeQuery | None = None, *, index_timeout: float = INDEX_WAIT_S
) -> dict[str, Any]:
    """Compare LanceDB and Redis once the index sink has caught up (the fresh tail is empty) or ``index_timeout``
    passed: the sink's lag is not a difference, what the stores disagree on after it caught up is."""
    stores = await Stores.open(settings)
    try:
        started = time.monotonic()
        left = await wait_for_index(stores, timeout=index_timeout)
        waited = time.monotonic() - started
        durable, cached = await asyncio.gather(stores.vectors.states(scope), stores.cache.states(scope))
    finally:
        await stores.close()
    report = compare(durable, cached).to_dict()
    report["index_wait_s"] = round(waited, 2)
    report["fresh_tail"] = left  # memories still waiting for the index sink when compared (0: caught up)
    return report


async def stats(settings: Settings) -> dict[str, int]:
    stores = await Stores.open(settings)
    try:
        counts = await stores.counters.read()
        live = await stores.vectors.count(live_only=True)
        rows = await stores.vectors.count(live_only=False)
        fresh_tail = await stores.cache.pending_count()
        backlog = await stores.vectors.backlog()  # fragments, and rows the indexes do not cover yet
        indexed_to = await IndexProgress(stores.redis, settings.redis_prefix).read(settings.topics.embedded)
        per_shard = await shard_rows(stores)
    finally:
        await stores.close()
    figures = {name: counts.get(name, 0) for name in COUNTER_NAMES}
    figures.update({name: value for name, value in sorted(counts.items()) if name.startswith("dlq_")})
    figures.update({name: value for name, value in sorted(counts.items()) if name.startswith("read_")})
    figures.update({"lancedb_live_memories": live, "lancedb_rows": rows, **backlog.to_dict()})
    # the index sink: memories searchable from Redis that LanceDB does not hold yet, and its position per partition
    figures["fresh_tail"] = fresh_tail
    figures.update({f"indexed_to_p{p}": offset for p, offset in sorted(indexed_to.items())})
    figures.update(per_shard)
    return figures


async def shard_rows(stores: Stores) -> dict[str, int]:
    """A sharded index (MEMSTREAM_INDEX_SHARDS): its shard count and each shard's rows (nothing when unsharded)."""
    if not isinstance(stores.vectors, ShardedVectorStore):
        return {}
    counts = [await shard.count(live_only=False) for shard in stores.vectors.shards]
    return {"index_shards": len(counts), **{f"lancedb_rows_s{i}": n for i, n in enumerate(counts)}}


async def warmup(settings: Settings, limit: int, *, progress: bool = False) -> dict[str, Any]:
    stores = await Stores.open(settings)
    reads = ReadService(stores)
    report = {"scopes": 0, "memories_refilled": 0, "blocks_built": 0, "failed": 0}
    try:
        scopes = await hottest_scopes(stores, reads, limit)
        bar = progress_bar("warming", unit="scopes", enabled=progress, total=len(scopes))
        for scope in scopes:
            try:
                rows = await stores.vectors.scope_rows(
                    ScopeQuery(tenant_id=scope.tenant_id, user_id=scope.user_id, agent_id=scope.agent_id)
                )
                outcomes = await stores.cache.apply(rows, bump=False)
                report["memories_refilled"] += sum(1 for o in outcomes if o == 2)
                before = reads.counters.counts["read_context_miss"]
                await reads.context(tenant_id=scope.tenant_id, user_id=scope.user_id, agent_id=scope.agent_id)
                report["blocks_built"] += reads.counters.counts["read_context_miss"] - before
            except MemStreamError as exc:
                log.warning("warmup of %s failed: %s", scope, exc)
                report["failed"] += 1
            report["scopes"] += 1
            if bar:
                bar.update(1)
        if bar:
            bar.close()
    finally:
        reads.counters.take()  # warmup's own reads are not reads by agents: keep them out of the hit rates
        await stores.close()
    return report


async def hottest_scopes(stores: Stores, reads: ReadService, limit: int) -> list[Scope]:
    """Most-read scopes first (Redis ranking), then the most recently changed ones from LanceDB."""
    scopes: list[Scope] = []
    seen: set[tuple[str, str, str | None]] = set()
    try:
        fields = await reads.redis_cache.hottest(limit)
    except MemStreamError as exc:
        log.warning("no read ranking in Redis (%s): warming the most recently changed scopes", exc)
        fields = []
    for field in fields:
        parts = field.split(SEP)
        if len(parts) in (2, 3):
            key = (parts[0], parts[1], parts[2] if len(parts) == 3 else None)
            seen.add(key)
            scopes.append(Scope(*key))
    if len(scopes) < limit:
        for scope in await stores.vectors.recent_scopes(limit):
            key = (scope.tenant_id, scope.user_id, scope.agent_id)
            if key not in seen and len(scopes) < limit:
                seen.add(key)
                scopes.append(scope)
    return scopes
