"""The compensation processor: redoes store writes that failed, until they succeed or the budget is spent.

Each record of the compensations topic holds one failed write (a store and the embedded events to write).
It is retried no earlier than its ``next_attempt_ts``. A retriable failure goes back on the topic with one
more attempt in its history and a later ``next_attempt_ts`` (backoff with jitter); once
``CompensationPolicy.max_attempts`` attempts have failed, or at once for a non-retriable error, the
compensation goes to the dead-letter topic with its whole history, and ``compensations_exhausted`` counts
it (alert on it). The writes are version-guarded, so a late retry never overwrites a newer change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from processors.model import InRecord, MemoryRow
from processors.pipeline import (
    LANCEDB,
    Materializer,
    WindowReport,
    add_counts,
    change_from,
    decode_all,
    now_ms,
    row_from,
    with_retries,
)
from processors.ports import Counters
from schemas.consistency import Attempt, Compensation, decode_compensation
from schemas.errors import MemStreamError
from schemas.events import DeadLetter, encode

log = logging.getLogger("memstream.compensation")


async def touch_caches(materializer: Materializer, rows: Sequence[MemoryRow]) -> None:
    """LanceDB caught up on rows Redis took earlier: invalidate reads cached meanwhile (best effort: if Redis is
    down, the cached entries age out by their TTL, and the next change of the scope invalidates them)."""
    try:
        await materializer.cache.touch(rows)
    except MemStreamError as exc:
        log.warning("read caches of %d memories not invalidated: %s", len(rows), exc)


@dataclass(slots=True)
class PreparedCompensations:
    records: Sequence[InRecord]
    items: list[tuple[InRecord, Compensation]]
    dead: list[DeadLetter]


class CompensationProcessor:
    """Drives the compensations topic; a window of it is written by :meth:`write` (engine protocol)."""

    def __init__(
        self,
        materializer: Materializer,
        counters: Counters | None = None,
        *,
        clock: Callable[[], int] = now_ms,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.materializer = materializer
        self.counters = counters
        self.clock = clock
        self.sleep = sleep or materializer.sleep

    async def prepare(self, records: Sequence[InRecord]) -> PreparedCompensations:
        items, dead = decode_all(records, decode_compensation, stage="compensation")
        return PreparedCompensations(records, items, dead)

    async def write(self, window: PreparedCompensations) -> WindowReport:
        report = WindowReport(records=len(window.records), dead_lettered=len(window.dead))
        counts: dict[str, int] = {"dead_lettered": len(window.dead)}
        if window.dead:
            await self._publish(self.materializer.topics.dlq, [(d.key, encode(d)) for d in window.dead])
        for record, comp in window.items:
            outcome = await self.retry_one(record, comp, report)
            counts[outcome] = counts.get(outcome, 0) + 1
        counts["materialized"] = report.applied
        counts["stale_ignored"] = report.stale
        await add_counts(self.counters, counts)
        return report

    async def retry_one(self, record: InRecord, comp: Compensation, report: WindowReport) -> str:
        """One attempt at one compensation; returns the counter it adds to."""
        wait_ms = comp.next_attempt_ts - self.clock()
        if wait_ms > 0:
            await self.sleep(wait_ms / 1000)
        m = self.materializer
        rows = [row_from(i) for i in comp.items]
        try:
            if comp.store == LANCEDB:
                await m.vectors.upsert(rows)
                outcomes = None
                await touch_caches(m, rows)
            else:
                outcomes = await m.cache.apply(rows, pending=not m.index)  # the ingest path's rows join the fresh tail
        except MemStreamError as exc:
            return await self._failed(record, comp, exc)
        stores = tuple(sorted({comp.store, *comp.acked_by}))
        if outcomes is None:  # LanceDB caught up; Redis' outcomes counted these when the window ran
            applied_ts = now_ms()
            changes = [change_from(i, applied_ts, stores) for i in comp.items]
        else:
            changes = m.count_outcomes(comp.items, outcomes, report, stores)
        await m.announce(changes, str(record.source))
        log.info(
            "compensation %s at %s: %s now holds %d memories (attempt %d)",
            comp.compensation_id,
            record.source,
            comp.store,
            len(comp.items),
            comp.attempt_count + 1,
        )
        return "compensations_applied"

    async def _failed(self, record: InRecord, comp: Compensation, exc: MemStreamError) -> str:
        policy = self.materializer.compensation
        now = self.clock()
        attempts = (*comp.attempts, Attempt(now, type(exc).__name__, str(exc)))
        if exc.retriable and len(attempts) < policy.max_attempts:
            delay = policy.delay_s(len(attempts), self.materializer.rand())
            again = dataclasses.replace(comp, attempts=attempts, next_attempt_ts=now + int(delay * 1000))
            log.warning(
                "compensation %s at %s: %s still failing (attempt %d of %d, next in %.1fs): %s",
                comp.compensation_id,
                record.source,
                comp.store,
                len(attempts),
                policy.max_attempts,
                delay,
                exc,
            )
            await self._publish(self.materializer.topics.compensations, [(again.key, encode(again))])
            return "compensations_retried"
        why = "not retriable" if not exc.retriable else f"gave up after {len(attempts)} attempts"
        log.error(
            "ALERT compensation %s at %s: %s write of %d memories %s: %s",
            comp.compensation_id,
            record.source,
            comp.store,
            len(comp.items),
            why,
            exc,
        )
        final = dataclasses.replace(comp, attempts=attempts, retriable=exc.retriable)
        letter = DeadLetter(
            reason=f"{comp.store} write {why}: {exc}",
            error_type=type(exc).__name__,
            stage="compensation",
            ts=now,
            value=encode(final),
            key=comp.key,
            source=record.source,
        )
        await self._publish(self.materializer.topics.dlq, [(letter.key, encode(letter))])
        return "compensations_exhausted"

    async def _publish(self, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
        m = self.materializer
        await with_retries(
            f"publishing {len(records)} records to {topic}",
            lambda: m.publisher.publish(topic, records),
            m.retry,
            m.sleep,
        )


__all__ = ["CompensationProcessor", "PreparedCompensations"]
