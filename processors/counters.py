"""The shared counters (Redis hash ``<prefix>stats``) and what one window adds to them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from processors.embedding import CacheCounts
from processors.ports import Counters
from schemas.errors import MemStreamError
from schemas.events import ChangeEvent, DeadLetter

log = logging.getLogger("memstream.processors")


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
    "reconciles_skipped",  # timer requests skipped: the last one's cost, or the sink behind (streams/runtime/app.py)
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


async def add_counts(counters: Counters | None, counts: dict[str, int]) -> None:
    """Counters are advisory: a Redis outage must not fail (and so replay) a window that was written."""
    if counters is None:
        return
    try:
        await counters.add(counts)
    except MemStreamError as exc:
        log.warning("counters not updated (%s): %s", exc, counts)
