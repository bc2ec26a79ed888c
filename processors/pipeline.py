"""The window processors: decode, embed in one batch, materialize into both stores, emit the change feed.

A window is a list of Kafka records. Processing a window either completes (every store acknowledged, every
derived record durable on the broker) or raises; the caller commits offsets only after it completes. That,
with version-guarded writes, is what makes at-least-once delivery effectively-once in the stores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from processors.embedding import CacheCounts, CachedEmbedder
from processors.hashing import event_content_hash
from processors.model import InRecord, MemoryRow, Topics, WriteOutcome, added_at, memory_key, with_first_add
from processors.ports import CacheStore, Counters, OutRecord, Publisher, VectorStore
from processors.timings import StageTimings
from schemas.consistency import Attempt, Compensation
from schemas.errors import (
    POISON_KINDS,
    CorruptBatchError,
    MemStreamError,
    PoisonBatchError,
    SchemaError,
    ScopeMismatchError,
)
from schemas.events import (
    ChangeEvent,
    DeadLetter,
    EmbeddedEvent,
    MemoryEvent,
    Op,
    SourceRef,
    decode_dead_letter,
    decode_embedded,
    decode_event,
    encode,
    encode_embedded,
)

log = logging.getLogger("memstream.processors")

T = TypeVar("T")

LANCEDB = "lancedb"
REDIS = "redis"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def describe_window(records: Sequence[InRecord]) -> str:
    """``topic[p]@first..last`` per partition: how every log line names the data it is about."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for r in records:
        lo, hi = spans.get((r.topic, r.partition), (r.offset, r.offset))
        spans[(r.topic, r.partition)] = (min(lo, r.offset), max(hi, r.offset))
    return ", ".join(f"{t}[{p}]@{lo}..{hi}" for (t, p), (lo, hi) in sorted(spans.items()))


def event_key(event: MemoryEvent) -> str:
    """The identity of the memory an event is about: its tenant and its memory id (processors.model.memory_key)."""
    return memory_key(event.scope.tenant_id, event.memory_id)


def newest_per_memory(
    items: Iterable[T], identity: Callable[[T], str], order: Callable[[T], tuple[int, str]]
) -> dict[str, T]:
    """Per memory (``identity``: its key), the item that wins by ``(version, event_id)``: what the stores keep."""
    winners: dict[str, T] = {}
    for item in items:
        key = identity(item)
        seen = winners.get(key)
        if seen is None or order(item) > order(seen):
            winners[key] = item
    return winners


def latest_per_memory(events: Sequence[EmbeddedEvent]) -> list[EmbeddedEvent]:
    """Keep, per memory, only the event that wins by ``(version, event_id)``: what the stores would keep."""
    return list(newest_per_memory(events, lambda e: event_key(e.event), lambda e: e.event.order()).values())


def split_by_owner(
    events: Iterable[EmbeddedEvent], owners: dict[str, str]
) -> tuple[list[EmbeddedEvent], list[tuple[EmbeddedEvent, str]]]:
    """Keep the events that stay within their memory's user; the others, with the user the memory belongs to.

    A memory belongs to the user of the store's row (``owners``: key -> user), or, for a memory the store does
    not hold yet, to the user of its first event in log order (``events`` are in log order, and every event of
    one memory is in one partition). The reconciler's log fold applies the same rule, so it never "repairs" a
    refused event back in. Users are compared only within a tenant: another tenant's event is another memory.
    """
    owner_of = dict(owners)
    kept: list[EmbeddedEvent] = []
    refused: list[tuple[EmbeddedEvent, str]] = []
    for item in events:
        key = event_key(item.event)
        owner = owner_of.setdefault(key, item.event.scope.user_id)
        if owner == item.event.scope.user_id:
            kept.append(item)
        else:
            refused.append((item, owner))
    return kept, refused


def keys_needing_owner(embedded: Iterable[EmbeddedEvent]) -> list[str]:
    """The memories whose owner a batch cannot decide by itself.

    A memory whose events here all name one user and begin with an add needs no lookup: new, it is that user's;
    held by another user, all of them are foreign and the stores' own checks refuse them. Any other memory needs
    its owner, or the first event here would wrongly decide it."""
    first: dict[str, Op] = {}
    users: dict[str, set[str]] = {}
    for item in embedded:
        key = event_key(item.event)
        first.setdefault(key, item.event.op)
        users.setdefault(key, set()).add(item.event.scope.user_id)
    return sorted(k for k, op in first.items() if op is not Op.ADD or len(users[k]) > 1)


def scope_mismatch(item: EmbeddedEvent, owner: str | None) -> ScopeMismatchError:
    """``owner``: the user the memory belongs to, ``None`` when only Redis knew it was another one."""
    event = item.event
    belongs = f"user {owner!r}" if owner is not None else "another user"
    return ScopeMismatchError(
        f"{event.op} of memory {event.memory_id!r} (tenant {event.scope.tenant_id!r}) refused: it belongs to "
        f"{belongs}, the event names user {event.scope.user_id!r}; the memory is unchanged"
    )


def refused_letter(item: EmbeddedEvent, error: MemStreamError, stage: str = "materialize") -> DeadLetter:
    """The dead letter of an event refused after decoding: its original event as JSON, where it was read."""
    return DeadLetter(
        reason=str(error),
        error_type=type(error).__name__,
        stage=stage,
        ts=now_ms(),
        value=encode(item.event),
        key=item.event.key,
        source=item.source,
        field=error.field if isinstance(error, SchemaError) else None,
    )


def row_from(item: EmbeddedEvent) -> MemoryRow:
    event = item.event
    return MemoryRow(
        memory_id=event.memory_id,
        scope=event.scope,
        text=event.text or "",
        metadata=event.metadata,
        version=event.version,
        event_id=event.event_id,
        content_hash=item.content_hash,
        deleted=event.op is Op.DELETE,
        updated_at=event.ts,
        vector=item.vector,
        source=item.source,
        created_at=event.ts if event.op is Op.ADD else None,  # an update keeps the stores' (MemoryRow.created_at)
        expires_at=event.expires_at,
        actor=event.actor,
    )


def dead_letter(record: InRecord, error: MemStreamError, stage: str) -> DeadLetter:
    field_name = error.field if isinstance(error, SchemaError) else None
    return DeadLetter(
        reason=str(error),
        error_type=type(error).__name__,
        stage=stage,
        ts=now_ms(),
        value=record.value,
        key=record.key,
        source=record.source,
        field=field_name,
        last_offset=record.last_offset,
    )


def poison_error(record: InRecord) -> PoisonBatchError:
    """The error a stand-in for an undecodable batch is dead-lettered with: its class names the reason."""
    reason = record.poison or "corrupt-batch"
    kind = reason.split(":", 1)[0]
    last = record.last_offset if record.last_offset is not None else record.offset
    where = f"{record.topic}[{record.partition}]@{record.offset}-{last}"
    return POISON_KINDS.get(kind, CorruptBatchError)(
        f"undecodable record batch {where} ({last - record.offset + 1} offsets, raw batch attached): {reason}"
    )


def attach_vectors(
    events: Iterable[tuple[MemoryEvent, SourceRef | None]], vectors: Sequence[bytes], model: str, dim: int
) -> list[EmbeddedEvent]:
    """Each event with its vector (in order; deletes take none), the model's name and its content hash."""
    it = iter(vectors)
    return [
        EmbeddedEvent(
            event=event,
            model=model,
            dim=dim,
            vector=b"" if event.op is Op.DELETE else next(it),
            content_hash=event_content_hash(event),
            source=source,
        )
        for event, source in events
    ]


def decode_all(
    records: Sequence[InRecord], decode: Callable[..., T], *, stage: str, headers: bool = False
) -> tuple[list[tuple[InRecord, T]], list[DeadLetter]]:
    """Decode each record (``headers``: ``decode(value, headers)``, as the embedded topic's vectors need); the ones
    that fail become dead letters naming the stage, the reason and the record."""
    good: list[tuple[InRecord, T]] = []
    dead: list[DeadLetter] = []
    for record in records:
        try:
            if record.poison is not None:
                raise poison_error(record)
            good.append((record, decode(record.value, record.headers) if headers else decode(record.value)))
        except SchemaError as exc:
            log.warning("dead-lettering %s: %s", record.source, exc)
            dead.append(dead_letter(record, exc, stage=stage))
    return good, dead


# Every shared counter (Redis hash `<prefix>stats`) a processor adds to, in the order `memstream stats` shows.
COUNTER_NAMES = (
    "events_in",
    "materialized",
    "replayed_current",
    "stale_ignored",
    "dead_lettered",
    "embed_cache_hits",
    "embed_cache_misses",
    "compensations_emitted",
    "compensations_applied",
    "compensations_retried",
    "compensations_exhausted",
    "reconciles",
    "reconcile_repaired",
    "scope_mismatch",
    "indexed",
    "index_records",
    "index_refused",
    "index_swept",
    "expired",  # tombstones the expiry sweep published (processors/expiry.py)
)


@dataclass(slots=True)
class WindowReport:
    """What one window did; summed into the shared counters."""

    records: int = 0
    events: int = 0
    dead_lettered: int = 0
    applied: int = 0
    current: int = 0
    stale: int = 0
    compensations: int = 0
    cache: CacheCounts = field(default_factory=CacheCounts)
    changes: list[ChangeEvent] = field(default_factory=list)
    refused: list[DeadLetter] = field(default_factory=list)  # events refused by scope (ScopeMismatchError)

    def counters(self) -> dict[str, int]:
        # events_in counts records; a refused event is one of them (in ``events``) that was then dead-lettered
        return {
            "events_in": self.events + self.dead_lettered,
            "materialized": self.applied,
            "replayed_current": self.current,
            "stale_ignored": self.stale,
            "dead_lettered": self.dead_lettered + len(self.refused),
            "scope_mismatch": len(self.refused),
            "embed_cache_hits": self.cache.hits_local + self.cache.hits_shared,
            "embed_cache_misses": self.cache.misses,
            "compensations_emitted": self.compensations,
        }


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff for retriable store and broker errors while a window is being written."""

    first_delay_s: float = 0.1
    max_delay_s: float = 5.0
    max_attempts: int = 0  # 0: until it succeeds or the worker stops (the partition waits, nothing is lost)


async def add_counts(counters: Counters | None, counts: dict[str, int]) -> None:
    """Counters are advisory: a Redis outage must not fail (and so replay) a window that was written."""
    if counters is None:
        return
    try:
        await counters.add(counts)
    except MemStreamError as exc:
        log.warning("counters not updated (%s): %s", exc, counts)


async def with_retries(
    what: str, action: Callable[[], Awaitable[T]], policy: RetryPolicy, sleep: Callable[[float], Awaitable[None]]
) -> T:
    attempt = 0
    delay = policy.first_delay_s
    while True:
        attempt += 1
        try:
            return await action()
        except MemStreamError as exc:
            if not exc.retriable or (policy.max_attempts and attempt >= policy.max_attempts):
                raise
            log.warning("%s failed (attempt %d, retrying in %.1fs): %s", what, attempt, delay, exc)
        await sleep(delay)
        delay = min(delay * 2, policy.max_delay_s)


# Which outcomes become change events: the live path announces applied and already-current writes (a window
# processed again after a crash re-announces what it may not have announced); a replay into the serving stores
# announces only what it changed; a rebuild into a new generation announces nothing (the log it rebuilds from
# was announced when it was first applied, and the logical state does not change).
CHANGES_ALL = "all"
CHANGES_APPLIED = "applied"
CHANGES_NONE = "none"


@dataclass(frozen=True, slots=True)
class CompensationPolicy:
    """How a store write that keeps failing is handed over instead of holding the partition.

    ``inline``: retries inside the window (rides out a blip without a compensation). After those, the write
    becomes a compensating event; the compensation processor retries it ``max_attempts`` times in all, with
    exponential backoff from ``first_delay_s`` up to ``max_delay_s`` and full jitter, then dead-letters it.
    """

    inline: RetryPolicy = RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, max_attempts=3)
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    max_attempts: int = 30
    chunk: int = 100  # memories per compensation record (each carries its vectors: keep records well under 1 MB)

    def delay_s(self, attempts: int, rand: float) -> float:
        """Backoff before the next try after ``attempts`` failures: half fixed, half random (jitter)."""
        ceiling = min(self.max_delay_s, self.first_delay_s * 2.0 ** max(0, attempts - 1))
        return ceiling * (0.5 + rand / 2)


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
        retry: RetryPolicy = RetryPolicy(),
        compensation: CompensationPolicy = CompensationPolicy(),
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
        found: dict[str, str] = {}
        try:
            found = await self.cache.owners(keys)
        except MemStreamError as exc:
            log.warning("owners of %s not read from Redis (%s): asking LanceDB", where, exc)
        unknown = [k for k in keys if k not in found]
        if unknown:
            try:
                found.update(await self.vectors.owners(unknown))
            except MemStreamError as exc:
                log.warning("owners of %s unknown (LanceDB: %s): the stores' own scope checks apply", where, exc)
        return found

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


def change_from(item: EmbeddedEvent, applied_ts: int, stores: tuple[str, ...] = (LANCEDB, REDIS)) -> ChangeEvent:
    event = item.event
    return ChangeEvent(
        op=event.op,
        memory_id=event.memory_id,
        scope=event.scope,
        version=event.version,
        event_id=event.event_id,
        content_hash=item.content_hash,
        stores=stores,
        event_ts=event.ts,
        applied_ts=applied_ts,
        source=item.source,
        actor=event.actor,
    )


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


@dataclass(slots=True)
class PreparedWindow:
    """A window decoded and embedded, ready to be written."""

    records: Sequence[InRecord]
    where: str
    embedded: list[EmbeddedEvent]
    dead: list[DeadLetter]
    report: WindowReport


class IngestProcessor:
    """The hot path: raw memory events in, embedded events, both stores and the change feed out."""

    def __init__(
        self,
        embedder: CachedEmbedder,
        materializer: Materializer,
        counters: Counters | None = None,
        timings: StageTimings | None = None,
    ) -> None:
        self.embedder = embedder
        self.materializer = materializer
        self.counters = counters
        self.timings = timings or StageTimings()  # the parts of a window's write (logged by its engine)

    @property
    def topics(self) -> Topics:
        return self.materializer.topics

    async def process(self, records: Sequence[InRecord]) -> WindowReport:
        return await self.write(await self.prepare(records))

    async def prepare(self, records: Sequence[InRecord]) -> PreparedWindow:
        """Decode and embed: CPU work that touches no store, so it may run while the previous window writes."""
        report = WindowReport(records=len(records))
        where = describe_window(records)
        events, dead = decode_all(records, decode_event, stage="decode")
        embedded = await self._embed(events, report, where)
        report.events = len(events)
        report.dead_lettered = len(dead)
        return PreparedWindow(records, where, embedded, dead, report)

    async def write(self, window: PreparedWindow) -> WindowReport:
        """Both stores, the log copy and the change feed. Windows are written one at a time, in order."""
        report = window.report
        # The log copy (embedded topic) and the stores are written at once: the offsets are committed only
        # after both, so a failure of either means the window is processed again, never half-forgotten.
        timed = self.timings.timed
        positions, _ = await asyncio.gather(
            timed("embedded", self._publish_derived(window.embedded, window.dead, window.where)),
            timed("redis", self.materializer.materialize(window.embedded, report, window.where, announce=False)),
        )
        if report.changes:  # each change says where its embedded record is: indexed once the sink passed it
            report.changes = with_positions(report.changes, window.embedded, positions)
            await timed("changes", self.materializer.announce(report.changes, window.where))
        if report.refused:  # known only once the stores' owners were read: after the derived records
            await self._publish_derived([], report.refused, window.where)
        await add_counts(self.counters, report.counters())
        return report

    async def quarantine(self, records: Sequence[InRecord], error: MemStreamError) -> WindowReport:
        return await quarantine(self.materializer.publisher, self.topics, records, error, self.counters)

    async def _embed(
        self, events: list[tuple[InRecord, MemoryEvent]], report: WindowReport, where: str
    ) -> list[EmbeddedEvent]:
        texts = [e.text for _, e in events if e.op is not Op.DELETE and e.text is not None]
        vectors: list[bytes] = []
        if texts:
            vectors, report.cache = await with_retries(
                f"embedding {len(texts)} texts from {where}",
                lambda: self.embedder.embed(texts),
                self.materializer.retry,
                self.materializer.sleep,
            )
        return attach_vectors(((e, r.source) for r, e in events), vectors, self.embedder.model, self.embedder.dim)

    async def _publish_derived(
        self, embedded: list[EmbeddedEvent], dead: list[DeadLetter], where: str
    ) -> list[SourceRef]:
        """The embedded events (what the index sink writes to LanceDB, and replays read without re-embedding) and
        the dead letters; returns where each embedded event landed."""
        topics = self.topics
        publisher = self.materializer.publisher
        if not embedded and not dead:
            return []
        letters = [(d.key, encode(d)) for d in dead]
        records: list[OutRecord] = [(e.event.key, *encode_embedded(e)) for e in embedded]

        async def send_all() -> list[SourceRef]:
            landed, _ = await asyncio.gather(
                publisher.publish_positioned(topics.embedded, records) if records else _nothing(),
                publisher.publish(topics.dlq, letters) if letters else _nothing(),
            )
            return list(landed or [])

        return await with_retries(
            f"publishing derived records of {where}", send_all, self.materializer.retry, self.materializer.sleep
        )


def with_positions(
    changes: Sequence[ChangeEvent], embedded: Sequence[EmbeddedEvent], positions: Sequence[SourceRef]
) -> list[ChangeEvent]:
    """Each change with where its event's embedded record landed (``indexed_after``)."""
    landed = {(event_key(e.event), e.event.event_id): p for e, p in zip(embedded, positions, strict=True)}
    return [
        dataclasses.replace(c, indexed_after=landed.get((memory_key(c.scope.tenant_id, c.memory_id), c.event_id)))
        for c in changes
    ]


async def _nothing() -> None:
    return None


class ReplayProcessor:
    """Re-materializes embedded events (no re-embedding): used to replay and rebuild from the log."""

    def __init__(self, materializer: Materializer, counters: Counters | None = None) -> None:
        self.materializer = materializer
        self.counters = counters

    async def quarantine(self, records: Sequence[InRecord], error: MemStreamError) -> WindowReport:
        m = self.materializer
        return await quarantine(m.publisher, m.topics, records, error, self.counters)

    async def process(self, records: Sequence[InRecord]) -> WindowReport:
        report = WindowReport(records=len(records))
        where = describe_window(records)
        good: list[EmbeddedEvent] = []
        dead: list[DeadLetter] = []
        for record in records:
            try:
                item = decode_embedded(record.value, record.headers)
                self.materializer.check_model(item)
                good.append(item)
            except SchemaError as exc:
                log.warning("dead-lettering %s: %s", record.source, exc)
                dead.append(dead_letter(record, exc, stage="replay"))
        if dead:
            batch = [(d.key, encode(d)) for d in dead]
            await self.materializer.publisher.publish(self.materializer.topics.dlq, batch)
        report.events = len(good)
        report.dead_lettered = len(dead)
        await self.materializer.materialize(good, report, where)
        if report.refused:
            batch = [(d.key, encode(d)) for d in report.refused]
            await self.materializer.publisher.publish(self.materializer.topics.dlq, batch)
        await add_counts(self.counters, report.counters())
        return report


class DeadLetterMonitor:
    """Watches the dead-letter topic: logs each record with where it came from and counts them by error type."""

    def __init__(self, counters: Counters | None = None) -> None:
        self.counters = counters

    async def process(self, records: Sequence[InRecord]) -> dict[str, int]:
        by_type: dict[str, int] = {}
        for record in records:
            try:
                letter = decode_dead_letter(record.value)
            except SchemaError as exc:
                log.error("unreadable dead letter at %s: %s", record.source, exc)
                by_type["dlq_unreadable"] = by_type.get("dlq_unreadable", 0) + 1
                continue
            origin = letter.source or record.source
            log.warning("dead letter %s from %s (%s): %s", record.source, origin, letter.stage, letter.reason)
            name = f"dlq_{letter.error_type}"
            by_type[name] = by_type.get(name, 0) + 1
        if by_type:
            await add_counts(self.counters, by_type)
        return by_type


__all__ = [
    "DeadLetterMonitor",
    "IngestProcessor",
    "Materializer",
    "PreparedWindow",
    "ReplayProcessor",
    "RetryPolicy",
    "SourceRef",
    "WindowReport",
    "describe_window",
    "keys_needing_owner",
    "latest_per_memory",
    "newest_per_memory",
]
