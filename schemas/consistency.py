"""Payloads of the consistency topics: compensations, and reconcile requests and reports.

A :class:`Compensation` (topic ``<prefix>compensations``) records a store write that failed after the
window was otherwise processed: which store, which memories at which versions (the embedded events
themselves, so the retry needs nothing else), the error, and every attempt so far. The worker commits its
window only once this record is durable, so the change is never lost and the partition never blocks.

The reconcile topic (``<prefix>reconcile``) carries both :class:`ReconcileRequest` (``kind: "request"``)
and :class:`ReconcileReport` (``kind: "report"``), matched by ``request_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from schemas.errors import SchemaError
from schemas.events import (
    MAX_VERSION,
    SCHEMA_VERSION,
    EmbeddedEvent,
    SourceRef,
    embedded_from_dict,
    integral,
    loads_object,
    validate_id,
)
from schemas.events import _check_schema_version as check_schema_version
from schemas.events import _require_id as require_id
from schemas.events import _require_int as require_int
from schemas.events import _require_str as require_str
from schemas.events import _source_from as source_from

STORES: Final = ("lancedb", "redis")
MAX_HISTORY: Final = 20  # attempts kept in a compensation: enough to see a pattern, bounded in size
MAX_REQUEST_IDS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed try at a store write."""

    ts: int
    error_type: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "error_type": self.error_type, "error": self.error}


@dataclass(frozen=True, slots=True)
class Compensation:
    """A store write to redo: ``items`` are the winning embedded events whose write to ``store`` failed."""

    compensation_id: str
    store: str
    items: tuple[EmbeddedEvent, ...]
    retriable: bool
    attempts: tuple[Attempt, ...]
    first_failed_ts: int
    next_attempt_ts: int
    origin: SourceRef | None = None  # the first record of the window it came from
    acked_by: tuple[str, ...] = ()  # the stores that did acknowledge the window's write
    schema_version: int = SCHEMA_VERSION

    @property
    def key(self) -> bytes:
        return self.compensation_id.encode()

    @property
    def attempt_count(self) -> int:
        return len(self.attempts)

    @property
    def last_error(self) -> Attempt:
        return self.attempts[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "compensation_id": self.compensation_id,
            "store": self.store,
            "memories": [
                {"memory_id": i.event.memory_id, "version": i.event.version, "event_id": i.event.event_id}
                for i in self.items
            ],
            "items": [i.to_dict() for i in self.items],
            "retriable": self.retriable,
            "attempts": [a.to_dict() for a in self.attempts[-MAX_HISTORY:]],
            "first_failed_ts": self.first_failed_ts,
            "next_attempt_ts": self.next_attempt_ts,
            "origin": self.origin.to_dict() if self.origin else None,
            "acked_by": list(self.acked_by),
        }


@dataclass(frozen=True, slots=True)
class ReconcileRequest:
    """Reconcile a scope: everything (no filter), a tenant, a user, or a list of memory ids."""

    request_id: str
    ts: int
    tenant_id: str | None = None
    user_id: str | None = None
    memory_ids: tuple[str, ...] | None = None
    repair: bool = True
    reason: str = "manual"
    schema_version: int = SCHEMA_VERSION

    @property
    def key(self) -> bytes:
        return self.request_id.encode()

    def describe(self) -> str:
        if self.memory_ids is not None:
            return f"{len(self.memory_ids)} memory id(s)"
        parts = [f"tenant {self.tenant_id}" if self.tenant_id else "", f"user {self.user_id}" if self.user_id else ""]
        return ", ".join(p for p in parts if p) or "everything"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "request",
            "request_id": self.request_id,
            "ts": self.ts,
            "tenant_id": self.tenant_id,
            "user_id": self.user_id,
            "memory_ids": list(self.memory_ids) if self.memory_ids is not None else None,
            "repair": self.repair,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What a reconciliation found and fixed. ``counts`` keys are documented in the JSON Schema."""

    request_id: str
    started_ts: int
    finished_ts: int
    scope: str
    consistent: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    @property
    def key(self) -> bytes:
        return self.request_id.encode()

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "report",
            "request_id": self.request_id,
            "started_ts": self.started_ts,
            "finished_ts": self.finished_ts,
            "scope": self.scope,
            "consistent": self.consistent,
            "counts": dict(self.counts),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------- decoding


def decode_compensation(raw: bytes | str) -> Compensation:
    obj = loads_object(raw)
    check_schema_version(obj)
    store = obj.get("store")
    if store not in STORES:
        raise SchemaError(f"'store' must be one of {', '.join(STORES)}, got {store!r}", field="store")
    items = obj.get("items")
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise SchemaError("'items' must be a non-empty list of embedded events", field="items")
    attempts = obj.get("attempts")
    if not isinstance(attempts, list) or not attempts or not all(isinstance(a, dict) for a in attempts):
        raise SchemaError("'attempts' must be a non-empty list of objects", field="attempts")
    acked_by = obj.get("acked_by", [])
    if not isinstance(acked_by, list) or not all(a in STORES for a in acked_by):
        raise SchemaError(f"'acked_by' must be a list of {', '.join(STORES)}", field="acked_by")
    retriable = obj.get("retriable")
    if not isinstance(retriable, bool):
        raise SchemaError("'retriable' must be a boolean", field="retriable")
    return Compensation(
        compensation_id=require_id(obj, "compensation_id"),
        store=store,
        items=tuple(embedded_from_dict(i) for i in items),
        retriable=retriable,
        attempts=tuple(_attempt(a) for a in attempts),
        first_failed_ts=require_int(obj, "first_failed_ts", low=0, high=MAX_VERSION),
        next_attempt_ts=require_int(obj, "next_attempt_ts", low=0, high=MAX_VERSION),
        origin=source_from(obj.get("origin")),
        acked_by=tuple(acked_by),
        schema_version=obj["schema_version"],
    )


def decode_reconcile(raw: bytes | str) -> ReconcileRequest | ReconcileReport:
    obj = loads_object(raw)
    check_schema_version(obj)
    kind = obj.get("kind")
    if kind == "request":
        return _request(obj)
    if kind == "report":
        return _report(obj)
    raise SchemaError(f"'kind' must be 'request' or 'report', got {kind!r}", field="kind")


def _attempt(obj: dict[str, Any]) -> Attempt:
    return Attempt(
        ts=require_int(obj, "ts", low=0, high=MAX_VERSION),
        error_type=require_str(obj, "error_type", max_len=256),
        error=require_str(obj, "error", max_len=1 << 16, allow_empty=True),
    )


def _request(obj: dict[str, Any]) -> ReconcileRequest:
    ids = obj.get("memory_ids")
    if ids is not None:
        if not isinstance(ids, list) or len(ids) > MAX_REQUEST_IDS:
            raise SchemaError(f"'memory_ids' must be null or a list of at most {MAX_REQUEST_IDS}", field="memory_ids")
        ids = tuple(str(validate_id(i, "memory_ids")) for i in ids)
    repair = obj.get("repair", True)
    if not isinstance(repair, bool):
        raise SchemaError("'repair' must be a boolean", field="repair")
    return ReconcileRequest(
        request_id=require_id(obj, "request_id"),
        ts=require_int(obj, "ts", low=0, high=MAX_VERSION),
        tenant_id=validate_id(obj.get("tenant_id"), "tenant_id", optional=True),
        user_id=validate_id(obj.get("user_id"), "user_id", optional=True),
        memory_ids=ids,
        repair=repair,
        reason=require_str(obj, "reason", max_len=256) if "reason" in obj else "manual",
        schema_version=obj["schema_version"],
    )


def _report(obj: dict[str, Any]) -> ReconcileReport:
    counts = obj.get("counts")
    if isinstance(counts, dict):  # integers as JSON Schema defines them: 3.0 is 3, true is not 1
        counts = {name: integral(value) for name, value in counts.items()}
    if not isinstance(counts, dict) or not all(type(v) is int and v >= 0 for v in counts.values()):
        raise SchemaError("'counts' must be an object of non-negative integers", field="counts")
    notes = obj.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise SchemaError("'notes' must be a list of strings", field="notes")
    consistent = obj.get("consistent")
    if not isinstance(consistent, bool):
        raise SchemaError("'consistent' must be a boolean", field="consistent")
    return ReconcileReport(
        request_id=require_id(obj, "request_id"),
        started_ts=require_int(obj, "started_ts", low=0, high=MAX_VERSION),
        finished_ts=require_int(obj, "finished_ts", low=0, high=MAX_VERSION),
        scope=require_str(obj, "scope", max_len=1024),
        consistent=consistent,
        counts=dict(counts),
        notes=tuple(notes),
        schema_version=obj["schema_version"],
    )


__all__ = [
    "STORES",
    "Attempt",
    "Compensation",
    "ReconcileReport",
    "ReconcileRequest",
    "decode_compensation",
    "decode_reconcile",
]
