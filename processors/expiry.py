"""Expiry: memories whose ``expires_at`` has passed are removed by tombstones the system writes itself.

Reads hide an expired memory at once (LanceDB filters by ``expires_at > now``, the read path by
``MemoryRow.hidden``); this removes it from the stores. The index sink that owns the table runs
:class:`ExpirySweeper` between its batches (one owner at a time, so one sweep): it finds live rows of LanceDB
whose expiry passed and publishes a ``delete`` for each to the events topic, as any producer would, with
``actor`` = :data:`EXPIRY_ACTOR`. The tombstone then takes the normal path: log, Redis, the change feed (its
``actor`` says "expired"), LanceDB and the history.

Safe against a concurrent update: the tombstone's version is the version the sweep saw plus one, so it beats
exactly the row it saw and loses to any later event of the memory (an update that extends or removes the
expiry, stamped by the hybrid clock in microseconds, is far greater). Its event id is derived from the row it
saw, so a sweep that runs again before its tombstone was indexed publishes the same event (a no-op in the stores).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from processors.model import MemoryRow, Topics
from processors.pipeline import add_counts
from processors.ports import Counters, Publisher
from schemas.events import EXPIRY_ACTOR, MemoryEvent, Op, encode

log = logging.getLogger("memstream.expiry")

EXPIRY_LIMIT = 1_000  # rows per sweep: a backlog of expired memories is worked off a thousand at a time
REPUBLISH_AFTER_S = 60.0  # a tombstone not indexed by then (the sink was behind) is published again


class ExpiredRows(Protocol):
    async def expired(self, now_ms: int, limit: int) -> list[MemoryRow]:
        """Live rows whose ``expires_at`` is at or before ``now_ms``, at most ``limit``."""
        ...

    async def any_expiring(self) -> bool:
        """Whether any live row has an ``expires_at`` at all."""
        ...


def expiry_event_id(row: MemoryRow) -> str:
    """The tombstone's event id: the same for the same row seen twice (the sweep's retries are no-ops)."""
    seen = f"{row.key}\x1f{row.version}\x1f{row.event_id}".encode()
    return "expired-" + hashlib.blake2b(seen, digest_size=16).hexdigest()


def tombstone_for(row: MemoryRow, now_ms: int) -> MemoryEvent:
    """The delete that removes ``row``: one version past the one seen, so that any later event wins over it."""
    return MemoryEvent(
        event_id=expiry_event_id(row),
        op=Op.DELETE,
        memory_id=row.memory_id,
        version=row.version + 1,
        ts=now_ms,
        scope=row.scope,
        actor=EXPIRY_ACTOR,
    )


def expiry_tombstones(rows: Iterable[MemoryRow], now_ms: int) -> list[MemoryEvent]:
    """Tombstones for the rows that are live and expired at ``now_ms`` (others are left alone: a store may
    return a row that changed since it was asked)."""
    return [tombstone_for(r, now_ms) for r in rows if not r.deleted and r.expired(now_ms)]


class ExpirySweeper:
    """Publishes the tombstones of expired memories; run by the one index sink that owns the table."""

    def __init__(
        self,
        publisher: Publisher,
        topics: Topics,
        counters: Counters | None = None,
        *,
        limit: int = EXPIRY_LIMIT,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.publisher = publisher
        self.topics = topics
        self.counters = counters
        self.limit = limit
        self.wall_ms = wall_ms
        self.clock = clock
        self._published: dict[str, float] = {}  # tombstone event id -> when published (not again until indexed)
        # Whether memories with an expiry exist: None until asked. The scan has no index to use (a filter over the
        # live rows), so a deployment that never sets one never pays for it: the table is asked once, then the
        # sink tells (``note``) when it indexes a memory with an expiry.
        self.active: bool | None = None

    def note(self, expiring: bool) -> None:
        """The sink indexed a batch; ``expiring``: it held a memory with an expiry."""
        if expiring:
            self.active = True

    async def sweep(self, rows: ExpiredRows) -> list[MemoryEvent]:
        """One pass: the tombstones published (none that were published in the last ``REPUBLISH_AFTER_S``)."""
        if self.active is None:
            self.active = await rows.any_expiring()
        if not self.active:
            return []
        now_ms = self.wall_ms()
        found = await rows.expired(now_ms, self.limit)
        now = self.clock()
        self._published = {e: at for e, at in self._published.items() if now - at < REPUBLISH_AFTER_S}
        events = [e for e in expiry_tombstones(found, now_ms) if e.event_id not in self._published]
        if not events:
            return []
        landed = await self.publisher.publish_positioned(self.topics.events, [(e.key, encode(e)) for e in events])
        for event, where in zip(events, landed, strict=True):
            self._published[event.event_id] = now
            log.info("expiry: memory %s/%s expired, tombstone at %s", event.scope.tenant_id, event.memory_id, where)
        await add_counts(self.counters, {"expired": len(events)})
        return events


__all__ = ["ExpiredRows", "ExpirySweeper", "expiry_event_id", "expiry_tombstones", "tombstone_for"]
