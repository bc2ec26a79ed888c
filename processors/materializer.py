"""The materializer: the winning event of each memory into the stores, then the change feed; a store that keeps
failing becomes compensating events; a window that cannot be written at all is dead-lettered."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from processors.clock import now_ms
from processors.counters import WindowReport, add_counts
from processors.model import InRecord, MemoryRow, Topics, WriteOutcome, added_at, with_first_add
from processors.ownership import (
    event_key,
    keys_needing_owner,
    latest_per_memory,
    owners_cache_first,
    scope_mismatch,
    split_by_owner,
)
from processors.pipeline import LANCEDB, REDIS, change_from, dead_letter, describe_window, refused_letter, row_from
from processors.ports import CacheStore, Counters, Publisher, VectorStore
from processors.retry import CompensationPolicy, RetryPolicy, with_retries
from schemas.consistency import Attempt, Compensation
from schemas.errors import MemStreamError, SchemaError
from schemas.events import ChangeEvent, EmbeddedEvent, Op, encode

log = logging.getLogger("memstream.processors")

DEFAULT_RETRY = RetryPolicy()
DEFAULT_COMPENSATION = CompensationPolicy()


# Which outcomes become change events: the live path announces applied and already-current writes (a window
# processed again after a crash re-announces what it may not have announced); a replay into the serving stores
# announces only what it changed; a rebuild into a new generation announces nothing (the log it rebuilds from
# was announced when it was first applied, and the logical state does not change).
CHANGES_ALL = "all"
CHANGES_APPLIED = "applied"
CHANGES_NONE = "none"


@dataclass(slots=True)
class StoreWrites:
    """What the two store writes of one window did: Redis' per-row outcomes, or each store's error."""

    outcomes: list[WriteOutcome] | None
    failed: dict[str, MemStreamError]
    stores: tuple[str, ...] = (LANCEDB, REDIS)

    @property
    def acked_by(self) -> tuple[str, ...]:
        return tuple(s for s in self.stores if s not in self.failed)


class Materializer:
    """Writes the winning event of each memory into the stores, then emits the change feed.

    Two ways to write. The live ingest path (``index=False``) writes Redis only, each row with its vector into
    the fresh tail (searched by exact scores, see streams/runtime/reading.py), and the index sink
    (processors/indexing.py)
    writes LanceDB from the embedded topic on its own consumer group: nothing on the window's commit path waits
    for LanceDB. Replays, rebuilds, compensations and repairs (``index=True``) write LanceDB, then Redis.

    A store that still fails after the inline retries does not hold the partition: its write becomes a
    compensating event, and the window is done once that event is durable (nothing lost, nothing blocked).
    """

    def __init__(
        self,
        vectors: VectorStore,
        cache: CacheStore,
        publisher: Publisher,
        topics: Topics,
        *,
        model: str,
        dim: int,
        retry: RetryPolicy = DEFAULT_RETRY,
        compensation: CompensationPolicy = DEFAULT_COMPENSATION,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        changes: str = CHANGES_ALL,
        index: bool = True,
    ) -> None:
        if changes not in (CHANGES_ALL, CHANGES_APPLIED, CHANGES_NONE):
            raise ValueError(f"changes must be {CHANGES_ALL}, {CHANGES_APPLIED} or {CHANGES_NONE}, not {changes!r}")
        self.changes = changes
        self.vectors = vectors
        self.cache = cache
        self.publisher = publisher
        self.topics = topics
        self.model = model
        self.dim = dim
        self.retry = retry
        self.compensation = compensation
        self.sleep = sleep
        self.rand = rand
        self.index = index  # False: LanceDB is the index sink's (only read here, for owners)

    @property
    def stores(self) -> tuple[str, ...]:
        """The stores a window writes, in the order it writes them."""
        return (LANCEDB, REDIS) if self.index else (REDIS,)

    def check_model(self, item: EmbeddedEvent) -> None:
        """Vectors of another model or dimension would make searches return nonsense: refuse them."""
        if item.event.op is Op.DELETE:
            return
        if item.model != self.model or item.dim != self.dim:
            raise SchemaError(
                f"embedded with {item.model} ({item.dim}-d) but the store holds {self.model} ({self.dim}-d)",
                field="embedding",
            )

    async def write_stores(self, rows: Sequence[MemoryRow], where: str) -> StoreWrites:
        """Both stores, each with the inline retries. A non-retriable error is raised as is.

        LanceDB first, then Redis (not at once): the Redis script bumps the scope generations that cached
        reads are validated against (streams/runtime/reading.py), so once a generation moves, LanceDB already holds
        what it stands for; a reader that sees the new generation and then reads LanceDB cannot cache older
        data under it. Costs the Redis write's time (a few ms) per window.
        """
        inline = self.compensation.inline
        if not self.index:
            return await self.write_cache_only(rows, where)
        lance: object
        redis: object
        try:
            lance = await with_retries(
                f"writing {len(rows)} memories to LanceDB from {where}",
                lambda: self.vectors.upsert(rows),
                inline,
                self.sleep,
            )
        except Exception as exc:  # judged below, with Redis' result, as the concurrent version did
            lance = exc
        try:
            redis = await with_retries(
                f"writing {len(rows)} memories to Redis from {where}",
                lambda: self.cache.apply(rows),
                inline,
                self.sleep,
            )
        except Exception as exc:
            redis = exc
        failed: dict[str, MemStreamError] = {}
        for store, result in ((LANCEDB, lance), (REDIS, redis)):
            if isinstance(result, MemStreamError) and result.retriable:
                failed[store] = result
            elif isinstance(result, BaseException):
                raise result
        return StoreWrites(outcomes=None if REDIS in failed else redis, failed=failed)  # type: ignore[arg-type]

    async def write_cache_only(self, rows: Sequence[MemoryRow], where: str) -> StoreWrites:
        """The ingest path: Redis, each applied row joining the fresh tail with its vector (LanceDB is the sink's)."""
        try:
            outcomes = await with_retries(
                f"writing {len(rows)} memories to Redis from {where}",
                lambda: self.cache.apply(rows, pending=True),
                self.compensation.inline,
                self.sleep,
            )
        except MemStreamError as exc:
            if not exc.retriable:
                raise
            return StoreWrites(outcomes=None, failed={REDIS: exc}, stores=(REDIS,))
        return StoreWrites(outcomes=outcomes, failed={}, stores=(REDIS,))

    async def owners(self, embedded: Sequence[EmbeddedEvent], where: str) -> dict[str, str]:
        """The users the window's updated and deleted memories belong to: from Redis (one pipelined read), and
        from LanceDB, the durable truth, for those Redis does not hold (usually none: no query at all).

        A memory whose events in the window all name one user and begin with an add is not looked up (most are
        new memories, and a LanceDB lookup of a whole window was measured at half the cost of the merge itself):
        if it does belong to another user, the Redis script refuses the window's winner (SCOPE_MISMATCH,
        dead-lettered; the events it superseded count as superseded) and so does LanceDB's merge condition; only
        when Redis had forgotten that memory does the refusal stay silent in LanceDB, and the reconciler then
        puts Redis back.
        If a store cannot answer, the window goes on without it (an outage never holds the partition).
        """
        keys = keys_needing_owner(embedded)
        if not keys:
            return {}

        async def durable(unknown: list[str]) -> dict[str, str]:
            try:
                return await self.vectors.owners(unknown)
            except MemStreamError as exc:
                log.warning("owners of %s unknown (LanceDB: %s): the stores' own scope checks apply", where, exc)
                return {}

        return await owners_cache_first(self.cache, keys, durable, where)

    async def materialize(
        self, embedded: Sequence[EmbeddedEvent], report: WindowReport, where: str, *, announce: bool = True
    ) -> None:
        """``announce=False``: leave ``report.changes`` for the caller to publish (the ingest path first adds where
        each change's embedded record landed)."""
        if not embedded:
            return
        kept, refused = split_by_owner(embedded, await self.owners(embedded, where))
        for item, owner in refused:
            error = scope_mismatch(item, owner)
            log.warning("dead-lettering %s: %s", item.source or where, error)
            report.refused.append(refused_letter(item, error))
        winners = latest_per_memory(kept)
        if not winners:
            return
        rows = with_first_add([row_from(item) for item in winners], added_at(kept))  # an add in the same window
        writes = await self.write_stores(rows, where)
        report.stale += len(kept) - len(winners)  # superseded inside the window itself
        if writes.failed:
            await self.hand_over(winners, writes, where, report)
        if writes.outcomes is None:
            return  # Redis decides what was applied: its compensation announces the changes
        report.changes = self.count_outcomes(winners, writes.outcomes, report, writes.acked_by)
        self.refuse_superseded(kept, winners, writes.outcomes, report)
        if announce:
            await self.announce(report.changes, where)

    @staticmethod
    def refuse_superseded(
        kept: Sequence[EmbeddedEvent],
        winners: Sequence[EmbeddedEvent],
        outcomes: Sequence[WriteOutcome],
        report: WindowReport,
    ) -> None:
        """A winner Redis refused as another user's takes down the events of that user it superseded in the
        window: they are as foreign as it is, so they are dead-lettered too (not counted as superseded)."""
        refused = {
            event_key(w.event): w
            for w, outcome in zip(winners, outcomes, strict=True)
            if outcome is WriteOutcome.SCOPE_MISMATCH
        }
        if not refused:
            return
        for item in kept:
            winner = refused.get(event_key(item.event))
            if winner is not None and item is not winner and item.event.scope.user_id == winner.event.scope.user_id:
                report.stale -= 1
                report.refused.append(refused_letter(item, scope_mismatch(item, None)))

    def count_outcomes(
        self,
        winners: Sequence[EmbeddedEvent],
        outcomes: Sequence[WriteOutcome],
        report: WindowReport,
        stores: tuple[str, ...],
    ) -> list[ChangeEvent]:
        applied_ts = now_ms()
        changes = []
        for item, outcome in zip(winners, outcomes, strict=True):
            if outcome is WriteOutcome.STALE:
                report.stale += 1
                continue
            if outcome is WriteOutcome.SCOPE_MISMATCH:  # Redis holds it under another user (LanceDB did not know)
                error = scope_mismatch(item, None)
                log.warning("dead-lettering %s: %s", item.source, error)
                report.refused.append(refused_letter(item, error))
                continue
            if outcome is WriteOutcome.APPLIED:
                report.applied += 1
            else:
                report.current += 1  # re-emitted: the change feed is at-least-once across crashes
            if self.changes == CHANGES_ALL or (self.changes == CHANGES_APPLIED and outcome is WriteOutcome.APPLIED):
                changes.append(change_from(item, applied_ts, stores))
        return changes

    async def announce(self, changes: Sequence[ChangeEvent], where: str) -> None:
        if not changes:
            return
        records = [(c.key, encode(c)) for c in changes]
        await with_retries(
            f"publishing {len(changes)} changes from {where}",
            lambda: self.publisher.publish(self.topics.changes, records),
            self.retry,
            self.sleep,
        )

    async def hand_over(
        self, winners: Sequence[EmbeddedEvent], writes: StoreWrites, where: str, report: WindowReport
    ) -> None:
        """Each failed store's write becomes compensating events; returns once they are durable."""
        failed_ts = now_ms()
        policy = self.compensation
        records: list[tuple[bytes | None, bytes]] = []
        for store, error in writes.failed.items():
            log.warning("%s write of %d memories from %s handed to compensation: %s", store, len(winners), where, error)
            attempts = (Attempt(failed_ts, type(error).__name__, str(error)),)
            for start in range(0, len(winners), policy.chunk):
                items = tuple(winners[start : start + policy.chunk])
                comp = Compensation(
                    compensation_id=uuid.uuid4().hex,
                    store=store,
                    items=items,
                    retriable=True,
                    attempts=attempts,
                    first_failed_ts=failed_ts,
                    next_attempt_ts=failed_ts + int(1000 * policy.delay_s(1, self.rand())),
                    origin=items[0].source,
                    acked_by=writes.acked_by,
                )
                records.append((comp.key, encode(comp)))
        await with_retries(
            f"publishing {len(records)} compensations for {where}",
            lambda: self.publisher.publish(self.topics.compensations, records),
            self.retry,
            self.sleep,
        )
        report.compensations += len(records)


async def quarantine(
    publisher: Publisher, topics: Topics, records: Sequence[InRecord], error: MemStreamError, counters: Counters | None
) -> WindowReport:
    """A window failed for a reason retrying cannot fix: every record goes to the dead-letter topic, with why."""
    log.error("dead-lettering the whole window %s: %s", describe_window(records), error)
    dead = [dead_letter(r, error, stage="materialize") for r in records]
    await publisher.publish(topics.dlq, [(d.key, encode(d)) for d in dead])
    report = WindowReport(records=len(records), dead_lettered=len(dead))
    await add_counts(counters, report.counters())
    return report
