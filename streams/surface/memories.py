"""Mem0-shaped memory operations, in one place for both ways in: ``memstream.AsyncMemory`` without a server
(direct mode) and the HTTP routes ``/v1/memories*`` that ``memstream.AsyncMemory(url=...)`` talks to. Both run
this code, so both modes answer alike.

Writes are events: an add, update or delete is validated, stamped and published (keyed by memory id); it is
searchable once the worker has written it to Redis. ``wait_s`` waits until then. Shapes (as in Mem0):

- a memory: ``{"id", "memory", "score"? , "metadata", "user_id", "agent_id", "run_id", "created_at",
  "updated_at", "expires_at"}`` (times ISO 8601 UTC; ``created_at``: when it was added, ``updated_at``: its last
  change, ``expires_at``: null, or when it stops being readable and is deleted by the system);
- a write's outcome: ``{"index", "id", "event_id", "event": "ADD"|"UPDATE"|"DELETE", "status"}`` with status
  ``queued`` (published, not waited for), ``searchable`` (waited: readable now), ``not_searchable`` (waited, and
  not readable in time, or refused by the worker because the id belongs to another user of the tenant), or,
  without an event, ``not_found`` / ``invalid`` with ``error`` and ``field``.

A memory's history (``history``): every applied version, oldest first, as ``{"event", "memory",
"previous_memory", "version", "event_id", "created_at"}``. It is kept by the index sink, so it lags the fresh tail
by the sink's latency (a write waited for with ``wait`` is searchable before it is in the history); it lasts
beyond the log (a restart, retention, a broker that restarted empty).

An update or delete names only the memory: its user, agent and run are read from the stores first (an update
keeps what it does not change, its expiry included), so it addresses memories that are readable, not ones still in
flight.

Expiry: ``expires_at`` on an add or update is milliseconds since the epoch, an ISO 8601 time with a zone (or a
``datetime`` in Python); from then on no read returns the memory, and the expiry sweep deletes it (its history then
ends with a DELETE whose ``actor`` is ``memstream:expiry``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from processors.history import HistoryEntry, history_entries
from processors.model import MemoryRow, memory_key
from processors.times import utc_iso
from schemas.errors import NotFoundError, SchemaError
from schemas.events import MemoryEvent, Op, validate_expires_at, validate_id, validate_metadata, validate_text
from streams.runtime.reading import MAX_PAGE, ListRequest, ReadService, SearchRequest
from streams.runtime.stores import Stores
from streams.surface.api import MemoryPublisher, wait_until_materialized
from streams.surface.contract import MAX_BATCH_OPERATIONS, MEMORY_STATUSES

MAX_BATCH: Final = MAX_BATCH_OPERATIONS
DEFAULT_WAIT_S: Final = 60.0  # ``wait=True`` in Python
STATUSES: Final = MEMORY_STATUSES
EVENT_NAMES: Final = {Op.ADD: "ADD", Op.UPDATE: "UPDATE", Op.DELETE: "DELETE"}


@dataclass(frozen=True, slots=True)
class AddOp:
    text: str
    user_id: str
    agent_id: str | None = None
    run_id: str | None = None
    metadata: Mapping[str, Any] | None = None
    memory_id: str | None = None
    expires_at: int | None = None  # ms since the epoch (expiry_ms reads the other forms)


@dataclass(frozen=True, slots=True)
class UpdateOp:
    memory_id: str
    text: str | None = None
    metadata: Mapping[str, Any] | None = None
    expires_at: int | None = None  # None: the memory keeps its expiry (or none)


@dataclass(frozen=True, slots=True)
class DeleteOp:
    memory_id: str


Operation = AddOp | UpdateOp | DeleteOp
_OPS: Final[dict[str, type[Operation]]] = {"add": AddOp, "update": UpdateOp, "delete": DeleteOp}


def operation_to_dict(op: Operation) -> dict[str, Any]:
    """The batch route's JSON of an operation (what ``operation_from_dict`` reads back)."""
    name = next(k for k, cls in _OPS.items() if isinstance(op, cls))
    body = {k: v for k, v in dataclasses.asdict(op).items() if v is not None}
    return {"op": name, **body}


def operation_from_dict(body: Mapping[str, Any]) -> Operation:
    """An operation of a batch request (already validated against the contract's schema)."""
    fields = {k: v for k, v in body.items() if k != "op"}
    if "expires_at" in fields:
        fields["expires_at"] = expiry_ms(fields["expires_at"])
    return _OPS[str(body["op"])](**fields)


def expiry_ms(value: object) -> int | None:
    """An ``expires_at`` as the API takes it: None, milliseconds since the epoch, an ISO 8601 time with a zone, or
    an aware ``datetime``; milliseconds since the epoch, or a SchemaError naming ``expires_at``."""
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise SchemaError(
                f"'expires_at' must be milliseconds since the epoch or an ISO 8601 time, got {text[:40]!r}",
                field="expires_at",
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise SchemaError("'expires_at' needs a time zone (e.g. 2030-01-01T00:00:00Z)", field="expires_at")
        return validate_expires_at(round(value.timestamp() * 1000))
    return validate_expires_at(value)


def add_operations(
    text_or_messages: object,
    *,
    user_id: str,
    agent_id: str | None = None,
    run_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    memory_id: str | None = None,
    expires_at: object = None,
) -> list[AddOp]:
    """What ``add`` publishes: one memory for a text; for Mem0 messages ``[{"role", "content"}]`` one memory per
    message (no LLM extraction), each with its role in its metadata. Everything is checked here, before anything
    is published, so an ``add`` of several messages goes out whole or not at all."""
    validate_id(user_id, "user_id")
    validate_id(agent_id, "agent_id", optional=True)
    validate_id(run_id, "run_id", optional=True)
    validate_id(memory_id, "memory_id", optional=True)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise SchemaError("'metadata' must be a dict", field="metadata")
    validate_metadata(dict(metadata or {}))
    expires = expiry_ms(expires_at)
    if isinstance(text_or_messages, str):
        validate_text(text_or_messages)
        return [AddOp(text_or_messages, user_id, agent_id, run_id, metadata, memory_id, expires)]
    if not isinstance(text_or_messages, list) or not text_or_messages:
        raise SchemaError("give a text, or a non-empty list of messages {'role', 'content'}", field="messages")
    if memory_id is not None and len(text_or_messages) > 1:
        raise SchemaError("memory_id names one memory: give it with one message only", field="memory_id")
    ops = []
    for i, message in enumerate(text_or_messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise SchemaError(f"message {i} must be a dict with a string 'content'", field="messages")
        role = message.get("role")
        if role is not None and not isinstance(role, str):
            raise SchemaError(f"message {i}: 'role' must be a string", field="messages")
        try:
            validate_text(message["content"])
        except SchemaError as exc:
            raise SchemaError(f"message {i}: {exc.reason}", field="messages") from None
        meta = {**(metadata or {}), **({"role": role} if role is not None else {})}
        ops.append(AddOp(message["content"], user_id, agent_id, run_id, meta, memory_id, expires))
    return ops


def wait_seconds(wait: object) -> float:
    """``wait`` of the Python API: False (0), True (DEFAULT_WAIT_S) or seconds."""
    if isinstance(wait, bool):
        return DEFAULT_WAIT_S if wait else 0.0
    if isinstance(wait, int | float) and 0 <= wait <= 600:
        return float(wait)
    raise SchemaError("'wait' must be True, False or seconds between 0 and 600", field="wait")


def iso_time(ms: int) -> str:
    """A time of the stores (ms since the epoch) as ISO 8601 UTC; any the codec accepts (processors/times.py)."""
    return utc_iso(ms)


def memory_item(row: MemoryRow, score: float | None = None) -> dict[str, Any]:
    """A memory as Mem0 shows it."""
    item: dict[str, Any] = {"id": row.memory_id, "memory": row.text}
    if score is not None:
        item["score"] = round(score, 6)
    item.update(
        {
            "metadata": row.metadata,
            "user_id": row.scope.user_id,
            "agent_id": row.scope.agent_id,
            "run_id": row.scope.run_id,
            "created_at": iso_time(row.updated_at if row.created_at is None else row.created_at),
            "updated_at": iso_time(row.updated_at),
            "expires_at": None if row.expires_at is None else iso_time(row.expires_at),
        }
    )
    return item


def history_item(entry: HistoryEntry) -> dict[str, Any]:
    """One version of a memory as ``history`` shows it (``created_at``: when that version's event was made)."""
    return {
        "event": entry.event,
        "memory": entry.memory,
        "previous_memory": entry.previous_memory,
        "version": entry.version,
        "event_id": entry.event_id,
        "created_at": iso_time(entry.ts),
        "actor": entry.actor,  # "memstream:expiry": the system deleted the memory when it expired
    }


def failed(index: int, memory_id: str | None, exc: SchemaError) -> dict[str, Any]:
    status = "not_found" if isinstance(exc, NotFoundError) else "invalid"
    return {"index": index, "id": memory_id, "status": status, "error": exc.reason, "field": exc.field}


def raise_for(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """The exception a failed outcome stands for (the Python API raises what HTTP reports per item)."""
    if result.get("status") == "not_found":
        raise NotFoundError(str(result.get("id")))
    if result.get("status") == "invalid":
        raise SchemaError(str(result.get("error")), field=result.get("field"))
    return result


class MemoryService:
    """The operations of one process, over its read service and publisher; the tenant is given per call."""

    def __init__(self, stores: Stores, reads: ReadService, publisher: MemoryPublisher) -> None:
        self.stores = stores
        self.reads = reads
        self.publisher = publisher

    # ----------------------------------------------------------------------------------------- reads

    async def search(
        self,
        tenant_id: str,
        query: str,
        *,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: Mapping[str, Any] | None = None,
        top_k: int = 10,
        threshold: float | None = None,
        mode: str = "vector",
    ) -> dict[str, Any]:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 1_000:
            raise SchemaError("top_k must be an integer between 1 and 1000", field="top_k")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise SchemaError("threshold must be a number", field="threshold")
        validate_id(user_id, "user_id")
        request = SearchRequest(
            query, tenant_id, user_id, agent_id, run_id, top_k, filters, threshold, mode, whole_tenant=False
        )
        hits = await self.reads.search(request)
        return {"results": [memory_item(h.row, h.score) for h in hits]}

    async def get(self, tenant_id: str, memory_id: str) -> dict[str, Any] | None:
        row = await self.reads.get(tenant_id, memory_id)
        return None if row is None else memory_item(row)

    async def history(self, tenant_id: str, memory_id: str) -> list[dict[str, Any]]:
        """Every kept version of the memory, oldest first; [] when there is none (absent, not indexed yet, or
        another tenant's: the tenant is part of the key, so its history is never read)."""
        validate_id(tenant_id, "tenant_id")
        validate_id(memory_id, "memory_id")
        history = self.stores.history
        if history is None:
            return []
        rows = await history.read(memory_key(tenant_id, memory_id))
        return [history_item(entry) for entry in history_entries(rows)]

    async def page(
        self,
        tenant_id: str,
        *,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        request = ListRequest(tenant_id, user_id, agent_id, run_id, filters, limit, cursor)
        rows, next_cursor = await self.reads.page(request)
        return {"results": [memory_item(r) for r in rows], "next_cursor": next_cursor}

    # ----------------------------------------------------------------------------------------- writes

    async def apply(self, tenant_id: str, ops: Sequence[Operation], wait_s: float = 0.0) -> list[dict[str, Any]]:
        """Publish the operations; one outcome each, in order. An invalid one or an update or delete of a missing
        memory is reported in its place (the others still go out); with ``wait_s``, wait until readable."""
        validate_id(tenant_id, "tenant_id")
        if len(ops) > MAX_BATCH:
            raise SchemaError(f"at most {MAX_BATCH} operations per batch", field="operations")
        outcomes: list[dict[str, Any]] = []
        events: list[tuple[int, MemoryEvent]] = []
        for index, op in enumerate(ops):
            try:
                event = await self._event(tenant_id, op)
            except SchemaError as exc:
                outcomes.append(failed(index, op.memory_id, exc))
                continue
            events.append((len(outcomes), event))
            outcomes.append({"index": index, "id": event.memory_id, "event_id": event.event_id})
        return await self._publish(events, outcomes, wait_s)

    async def delete_all(
        self,
        tenant_id: str,
        *,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        wait_s: float = 0.0,
    ) -> dict[str, Any]:
        """Delete every live memory of the scope (a delete event each); memories added meanwhile stay."""
        rows: list[MemoryRow] = []
        cursor: str | None = None
        while True:
            request = ListRequest(tenant_id, user_id, agent_id, run_id, None, MAX_PAGE, cursor)
            page, cursor = await self.reads.page(request)
            rows += page
            if cursor is None:
                break
        events = [(i, self._delete_event(tenant_id, row)) for i, row in enumerate(rows)]
        outcomes = [{"index": i, "id": e.memory_id, "event_id": e.event_id} for i, e in events]
        return {"results": await self._publish(events, outcomes, wait_s)}

    async def _publish(
        self, events: list[tuple[int, MemoryEvent]], outcomes: list[dict[str, Any]], wait_s: float
    ) -> list[dict[str, Any]]:
        for _, event in events:
            await self.publisher.send(event)
        await self.publisher.flush()
        late: set[str] = set()
        if wait_s and events:
            missing = await wait_until_materialized(self.stores, [e for _, e in events], timeout=wait_s)
            late = {e.event_id for e in missing}
        for at, event in events:
            status = "not_searchable" if event.event_id in late else "searchable"
            if not wait_s:
                status = "queued"
            outcomes[at].update({"event": EVENT_NAMES[event.op], "status": status})
        return outcomes

    async def _event(self, tenant_id: str, op: Operation) -> MemoryEvent:
        factory = self.publisher.factory
        if isinstance(op, AddOp):
            if op.metadata is not None and not isinstance(op.metadata, Mapping):
                raise SchemaError("'metadata' must be an object", field="metadata")
            body: dict[str, Any] = {
                "op": Op.ADD.value,
                "tenant_id": tenant_id,
                "user_id": op.user_id,
                "agent_id": op.agent_id,
                "run_id": op.run_id,
                "text": op.text,
                "metadata": dict(op.metadata or {}),
            }
            if op.memory_id is not None:
                body["memory_id"] = op.memory_id
            if op.expires_at is not None:
                body["expires_at"] = op.expires_at
            return factory.from_input(body)
        row = await self._current(tenant_id, op.memory_id)
        if isinstance(op, DeleteOp):
            return self._delete_event(tenant_id, row)
        if op.text is None and op.metadata is None and op.expires_at is None:
            raise SchemaError("an update needs 'text', 'metadata' or 'expires_at'", field="text")
        if op.metadata is not None and not isinstance(op.metadata, Mapping):
            raise SchemaError("'metadata' must be an object", field="metadata")
        return factory.from_input(
            {
                **_scope_of(tenant_id, row),
                "op": Op.UPDATE.value,
                "text": row.text if op.text is None else op.text,  # an update keeps what it does not change
                "metadata": row.metadata if op.metadata is None else dict(op.metadata),
                "expires_at": row.expires_at if op.expires_at is None else op.expires_at,
            }
        )

    def _delete_event(self, tenant_id: str, row: MemoryRow) -> MemoryEvent:
        return self.publisher.factory.from_input({**_scope_of(tenant_id, row), "op": Op.DELETE.value})

    async def _current(self, tenant_id: str, memory_id: str) -> MemoryRow:
        row = await self.reads.get(tenant_id, memory_id)
        if row is None:  # absent, deleted, or another tenant's: the same answer
            raise NotFoundError(memory_id)
        return row


def _scope_of(tenant_id: str, row: MemoryRow) -> dict[str, Any]:
    return {
        "memory_id": row.memory_id,
        "tenant_id": tenant_id,
        "user_id": row.scope.user_id,
        "agent_id": row.scope.agent_id,
        "run_id": row.scope.run_id,
    }


__all__ = [
    "AddOp",
    "DeleteOp",
    "MemoryService",
    "Operation",
    "UpdateOp",
    "add_operations",
    "expiry_ms",
    "history_item",
    "memory_item",
    "operation_from_dict",
    "operation_to_dict",
]
