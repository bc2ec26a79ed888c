"""The index sink: embedded events in, LanceDB out, on a consumer group of its own.

The ingest path commits a window once Redis (the hot copy, and the fresh tail with each row's vector), the
embedded topic (the durable record, vectors included) and the change feed hold it; nothing there waits for
LanceDB. This processor writes LanceDB from the embedded topic, in batches as large as the backlog: the
version-guarded ``merge_insert`` (a row replaces the stored one only when it wins by ``(version, event_id)``, and
only within the memory's user), so a batch written twice (a crash between the LanceDB commit and the offset commit)
changes nothing. Then it takes the rows out of the fresh tail (Redis), which searches stop merging in.

Only one sink writes a table at a time (streams/runtime/sink.py fences it): concurrent ``merge_insert`` of one
key duplicates rows (lancedb #3377) and conflicts with compaction (lance #6151), which this sink runs between its
own batches instead.

Every version of the batch (not only each memory's winner) is also kept in the history table, before LanceDB's
rows and idempotently (infra/history_store.py): once the fresh tail no longer holds a memory, its history does.

What the log no longer brings (a broker restarted empty, a log cut short) the sink takes from Redis: fresh-tail
entries older than a grace period, swept when the sink has caught up with the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from processors.model import InRecord, MemoryRow, Topics, added_at, with_first_add
from processors.ownership import newest_per_memory, owners_cache_first
from processors.pipeline import (
    RetryPolicy,
    add_counts,
    dead_letter,
    decode_all,
    describe_window,
    event_key,
    keys_needing_owner,
    row_from,
    split_by_owner,
    with_retries,
)
from processors.ports import CacheStore, Counters, HistoryStore, Publisher, VectorStore
from processors.timings import StageTimings
from schemas.errors import MemStreamError, SchemaError
from schemas.events import DeadLetter, EmbeddedEvent, Op, decode_embedded, encode

log = logging.getLogger("memstream.index")

SINK_RETRY = RetryPolicy(first_delay_s=0.1, max_delay_s=5.0, max_attempts=0)  # until it passes or the sink stops


@dataclass(slots=True)
class IndexBatch:
    """A batch of embedded records decoded and folded: the rows LanceDB must hold after it."""

    records: Sequence[InRecord]
    where: str
    embedded: list[EmbeddedEvent]
    dead: list[DeadLetter]


@dataclass(slots=True)
class IndexReport:
    """What one sink batch did."""

    records: int = 0
    rows: int = 0  # memories written (the winner of each)
    refused: int = 0  # events naming another user than the memory's (the ingest path dead-lettered them)
    dead_lettered: int = 0
    cleared: int = 0  # fresh-tail entries cleared
    versions: int = 0  # versions newly kept in the history table (0 for a batch written before)
    swept: int = 0  # fresh-tail rows written from Redis (the log did not bring them)
    positions: dict[int, int] = field(default_factory=dict)  # partition -> next offset, once committed

    def counters(self) -> dict[str, int]:
        return {
            "indexed": self.rows,
            "index_records": self.records,
            "index_refused": self.refused,
            "index_swept": self.swept,
            "dead_lettered": self.dead_lettered,
        }


AHEAD_RETRY_S = 0.5  # a row LanceDB holds ahead of Redis is cleared from the fresh tail again after this
AHEAD_GIVE_UP_S = 30.0  # and let go after this (the fresh-tail sweep covers whatever is left)


@dataclass(frozen=True, slots=True)
class AheadOfRedis:
    """A row LanceDB holds but Redis did not yet (or held older) when the sink cleared the fresh tail."""

    row: MemoryRow
    since: float  # first seen ahead
    tried: float  # last clear


class IndexProcessor:
    """Writes LanceDB from embedded events; clears what it wrote from the fresh tail."""

    def __init__(
        self,
        vectors: VectorStore,
        cache: CacheStore,
        publisher: Publisher,
        topics: Topics,
        *,
        model: str,
        dim: int,
        retry: RetryPolicy = SINK_RETRY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        counters: Counters | None = None,
        history: HistoryStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history = history  # None: no history kept (unit tests of the index alone)
        self.timings = StageTimings()  # owners, lancedb, clear: the parts of a batch's write (the sink logs them)
        self.vectors = vectors
        self.cache = cache
        self.publisher = publisher
        self.topics = topics
        self.model = model
        self.dim = dim
        self.retry = retry  # LanceDB errors are retried until they pass: the sink's lag grows, nothing is lost
        self.sleep = sleep
        self.counters = counters
        self.clock = clock
        self.ahead: dict[str, AheadOfRedis] = {}  # memory key -> the newest row indexed ahead of Redis

    def prepare(self, records: Sequence[InRecord]) -> IndexBatch:
        """Decode (CPU only): undecodable records and vectors of another model become dead letters."""
        where = describe_window(records)
        decoded, dead = decode_all(records, decode_embedded, stage="index", headers=True)
        embedded: list[EmbeddedEvent] = []
        for record, item in decoded:
            if item.event.op is not Op.DELETE and (item.model != self.model or item.dim != self.dim):
                error = SchemaError(
                    f"embedded with {item.model} ({item.dim}-d) but the store holds {self.model} ({self.dim}-d)",
                    field="embedding",
                )
                log.warning("dead-lettering %s: %s", record.source, error)
                dead.append(dead_letter(record, error, stage="index"))
                continue
            embedded.append(item)
        return IndexBatch(records, where, embedded, dead)

    async def write(self, batch: IndexBatch) -> IndexReport:
        """LanceDB first (retried until it passes), then the fresh tail is cleared of what it now holds."""
        report = IndexReport(records=len(batch.records), dead_lettered=len(batch.dead))
        if batch.dead:
            await self._dead_letters(batch.dead, batch.where)
        timed = self.timings.timed
        owners = await timed("owners", self._owners(batch.embedded, batch.where))
        kept, refused = split_by_owner(batch.embedded, owners)
        for item, owner in refused:  # the ingest path dead-lettered these already; LanceDB must not take them either
            log.info("not indexing %s: memory %s belongs to user %r", item.source, event_key(item.event), owner)
        report.refused = len(refused)
        # one row per kept event, built once: the history keeps them all, LanceDB each memory's winner
        versions = [row_from(item) for item in kept]
        report.versions = await timed("history", self.keep_history(versions, batch.where))
        winners = newest_per_memory(versions, lambda row: row.key, lambda row: row.order())
        rows = with_first_add(list(winners.values()), added_at(kept))
        await timed("lancedb", self.upsert(rows, batch.where))
        report.rows = len(rows)
        report.cleared = await timed("clear", self.clear(rows, batch.where))
        await add_counts(self.counters, report.counters())
        return report

    async def upsert(self, rows: Sequence[MemoryRow], where: str) -> None:
        if rows:
            await with_retries(
                f"indexing {len(rows)} memories from {where} in LanceDB",
                lambda: self.vectors.upsert(rows),
                self.retry,
                self.sleep,
            )

    async def keep_history(self, rows: Sequence[MemoryRow], where: str) -> int:
        """Every version in the history table, retried until it passes: the offsets are committed only after it,
        so a version is never in the stores without being in the history."""
        history = self.history
        if history is None or not rows:
            return 0
        return await with_retries(
            f"keeping {len(rows)} versions from {where} in the history",
            lambda: history.record(rows),
            self.retry,
            self.sleep,
        )

    async def clear(self, rows: Sequence[MemoryRow], where: str) -> int:
        """Best effort: an entry left in the fresh tail is only searched twice (newest wins) and swept later.

        Rows LanceDB holds ahead of Redis are noted and cleared again by ``clear_ahead``: the ingest path writes
        Redis and the embedded topic at once, so its Redis write can land after this clear and join the tail."""
        try:
            done = await self.cache.clear_pending(rows)
        except MemStreamError as exc:
            log.warning("fresh tail not cleared of %d memories from %s: %s", len(rows), where, exc)
            return 0
        now = self.clock()
        for row in done.ahead:
            noted = self.ahead.get(row.key)
            if noted is None or noted.row.order() <= row.order():
                self.ahead[row.key] = AheadOfRedis(row, noted.since if noted else now, now)
        return done.cleared

    async def clear_ahead(self) -> int:
        """Clear again the rows LanceDB held ahead of Redis, once ``AHEAD_RETRY_S`` passed since the last try;
        a row still ahead after ``AHEAD_GIVE_UP_S`` is let go (Redis forgot it, or the fresh-tail sweep writes it)."""
        now = self.clock()
        due = [noted for noted in self.ahead.values() if now - noted.tried >= AHEAD_RETRY_S]
        if not due:
            return 0
        for noted in due:
            del self.ahead[noted.row.key]
        cleared = await self.clear([noted.row for noted in due], "the rows indexed ahead of Redis")
        for noted in due:  # keep the first sighting: the give-up counts from it
            again = self.ahead.get(noted.row.key)
            if again is not None:
                if now - noted.since >= AHEAD_GIVE_UP_S:
                    del self.ahead[noted.row.key]
                else:
                    self.ahead[noted.row.key] = AheadOfRedis(again.row, noted.since, again.tried)
        return cleared

    async def sweep(
        self, older_than_ms: int, limit: int, *, owns: Callable[[MemoryRow], bool] | None = None
    ) -> IndexReport:
        """Write to LanceDB the fresh-tail rows the log did not bring within ``older_than_ms`` (Redis has them).
        ``owns``: the rows this sink's table holds (a sharded index: each shard's sink sweeps its own)."""
        report = IndexReport()
        rows = await self.cache.stale_pending(older_than_ms, limit)
        if owns is not None:
            rows = [row for row in rows if owns(row)]
        if not rows:
            return report
        log.warning("indexing %d memories from Redis' fresh tail: the log did not bring them", len(rows))
        report.versions = await self.keep_history(rows, "the fresh tail")
        await self.upsert(rows, "the fresh tail")
        report.rows = report.swept = len(rows)
        report.cleared = await self.clear(rows, "the fresh tail")
        await add_counts(self.counters, report.counters())
        return report

    async def _owners(self, embedded: Sequence[EmbeddedEvent], where: str) -> dict[str, str]:
        """Owners of the memories the batch cannot decide itself (LanceDB's merge condition refuses a foreign update
        anyway; this keeps a foreign event from being inserted as a new memory), as the ingest path asks: Redis
        first, LanceDB (retried until it answers) for what Redis does not hold. LanceDB alone grew with the table:
        80-130 ms of each 10k-row batch at 1M rows through `publish --wait`, where the rest took 1.5-2 s."""
        keys = keys_needing_owner(embedded)
        if not keys:
            return {}

        async def durable(unknown: list[str]) -> dict[str, str]:
            return await with_retries(
                f"reading the owners of {len(unknown)} memories for {where}",
                lambda: self.vectors.owners(unknown),
                self.retry,
                self.sleep,
            )

        return await owners_cache_first(self.cache, keys, durable, where)

    async def _dead_letters(self, dead: Sequence[DeadLetter], where: str) -> None:
        records = [(d.key, encode(d)) for d in dead]
        await with_retries(
            f"publishing {len(dead)} dead letters of {where}",
            lambda: self.publisher.publish(self.topics.dlq, records),
            self.retry,
            self.sleep,
        )


__all__ = ["IndexBatch", "IndexProcessor", "IndexReport"]
