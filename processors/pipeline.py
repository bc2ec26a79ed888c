"""What a window's records become: rows for the stores, changes for the feed, dead letters, and how log lines
name a window (``topic[p]@first..last``).

The window processors themselves are split by role: the clock (processors/clock.py), retry policies
(processors/retry.py), the shared counters (processors/counters.py), ownership rules (processors/ownership.py),
the materializer (processors/materializer.py), the ingest processor (processors/ingest.py), the replay processor
(processors/replay_processor.py) and the dead-letter monitor (processors/dead_letters.py). Every name this module
held before the split can still be imported from it.

A window is a list of Kafka records. Processing a window either completes (every store acknowledged, every
derived record durable on the broker) or raises; the caller commits offsets only after it completes. That,
with version-guarded writes, is what makes at-least-once delivery effectively-once in the stores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from processors.clock import now_ms
from processors.counters import COUNTER_NAMES, WindowReport, add_counts
from processors.hashing import event_content_hash
from processors.model import InRecord, MemoryRow, memory_key
from processors.ownership import (
    event_key,
    keys_needing_owner,
    latest_per_memory,
    newest_per_memory,
    scope_mismatch,
    split_by_owner,
)
from processors.retry import CompensationPolicy, RetryPolicy, with_retries
from schemas.errors import (
    POISON_KINDS,
    CorruptBatchError,
    MemStreamError,
    PoisonBatchError,
    SchemaError,
)
from schemas.events import (
    ChangeEvent,
    DeadLetter,
    EmbeddedEvent,
    MemoryEvent,
    Op,
    SourceRef,
    encode,
)

if TYPE_CHECKING:
    from processors.dead_letters import DeadLetterMonitor as DeadLetterMonitor
    from processors.ingest import IngestProcessor as IngestProcessor
    from processors.ingest import PreparedWindow as PreparedWindow
    from processors.materializer import CHANGES_ALL as CHANGES_ALL
    from processors.materializer import CHANGES_APPLIED as CHANGES_APPLIED
    from processors.materializer import CHANGES_NONE as CHANGES_NONE
    from processors.materializer import Materializer as Materializer
    from processors.materializer import StoreWrites as StoreWrites
    from processors.materializer import quarantine as quarantine
    from processors.replay_processor import ReplayProcessor as ReplayProcessor

log = logging.getLogger("memstream.processors")

T = TypeVar("T")

LANCEDB = "lancedb"
REDIS = "redis"


def describe_window(records: Sequence[InRecord]) -> str:
    """``topic[p]@first..last`` per partition: how every log line names the data it is about."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for r in records:
        lo, hi = spans.get((r.topic, r.partition), (r.offset, r.offset))
        spans[(r.topic, r.partition)] = (min(lo, r.offset), max(hi, r.offset))
    return ", ".join(f"{t}[{p}]@{lo}..{hi}" for (t, p), (lo, hi) in sorted(spans.items()))


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


def with_positions(
    changes: Sequence[ChangeEvent], embedded: Sequence[EmbeddedEvent], positions: Sequence[SourceRef]
) -> list[ChangeEvent]:
    """Each change with where its event's embedded record landed (``indexed_after``)."""
    landed = {(event_key(e.event), e.event.event_id): p for e, p in zip(embedded, positions, strict=True)}
    # the constructor, not dataclasses.replace: replace introspects the fields per call (~2% of an ingest window)
    return [
        ChangeEvent(
            op=c.op,
            memory_id=c.memory_id,
            scope=c.scope,
            version=c.version,
            event_id=c.event_id,
            content_hash=c.content_hash,
            stores=c.stores,
            event_ts=c.event_ts,
            applied_ts=c.applied_ts,
            source=c.source,
            schema_version=c.schema_version,
            indexed_after=landed.get((memory_key(c.scope.tenant_id, c.memory_id), c.event_id)),
            actor=c.actor,
        )
        for c in changes
    ]


# The processors that build on this module, imported on first use: they import it, so importing them at the top
# would be circular. ``from processors.pipeline import Materializer`` keeps working (PEP 562).
_MOVED = {
    "CHANGES_ALL": "processors.materializer",
    "CHANGES_APPLIED": "processors.materializer",
    "CHANGES_NONE": "processors.materializer",
    "DeadLetterMonitor": "processors.dead_letters",
    "IngestProcessor": "processors.ingest",
    "Materializer": "processors.materializer",
    "PreparedWindow": "processors.ingest",
    "ReplayProcessor": "processors.replay_processor",
    "StoreWrites": "processors.materializer",
    "quarantine": "processors.materializer",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "CHANGES_ALL",
    "CHANGES_APPLIED",
    "CHANGES_NONE",
    "COUNTER_NAMES",
    "LANCEDB",
    "REDIS",
    "CompensationPolicy",
    "DeadLetterMonitor",
    "IngestProcessor",
    "Materializer",
    "MemStreamError",
    "PreparedWindow",
    "ReplayProcessor",
    "RetryPolicy",
    "SourceRef",
    "StoreWrites",
    "WindowReport",
    "add_counts",
    "attach_vectors",
    "change_from",
    "dead_letter",
    "decode_all",
    "describe_window",
    "event_key",
    "keys_needing_owner",
    "latest_per_memory",
    "newest_per_memory",
    "now_ms",
    "poison_error",
    "quarantine",
    "refused_letter",
    "row_from",
    "scope_mismatch",
    "split_by_owner",
    "with_positions",
    "with_retries",
]
