"""Plain data the processors work on: records read from Kafka, rows written to the stores, outcomes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from schemas.events import EmbeddedEvent, Headers, Op, Scope, SourceRef

# A memory's identity is (tenant, memory id): two tenants may use the same memory id without touching each other.
# Stores and folds key it as one string, ``<tenant>/<memory id>``; ``/`` is outside the id alphabet, so the
# pair is recovered unambiguously and no tenant's key can spell another's.
KEY_SEP = "/"


def memory_key(tenant_id: str, memory_id: str) -> str:
    """The store key of a memory: its tenant and its id."""
    return f"{tenant_id}{KEY_SEP}{memory_id}"


def split_key(key: str) -> tuple[str, str]:
    """``(tenant_id, memory_id)`` of a store key made by :func:`memory_key`."""
    tenant_id, _, memory_id = key.partition(KEY_SEP)
    return tenant_id, memory_id


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix (``MEMSTREAM_TOPIC_PREFIX``)."""

    prefix: str = "memstream."

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def embedded(self) -> str:
        return f"{self.prefix}embedded"

    @property
    def changes(self) -> str:
        return f"{self.prefix}changes"

    @property
    def compensations(self) -> str:
        return f"{self.prefix}compensations"

    @property
    def reconcile(self) -> str:
        return f"{self.prefix}reconcile"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}dlq"

    def all(self) -> tuple[str, ...]:
        return (self.events, self.embedded, self.changes, self.compensations, self.reconcile, self.dlq)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One applied version of a memory as the history table keeps it (``text`` None for a tombstone)."""

    version: int
    event_id: str
    text: str | None
    deleted: bool
    ts: int  # event time, milliseconds since the epoch
    actor: str | None = None  # the event's actor (schemas.events.EXPIRY_ACTOR: removed by the expiry sweep)


@dataclass(frozen=True, slots=True)
class InRecord:
    """One Kafka record as a processor sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int = 0
    # Set on the stand-in for a batch the consumer could not decode (see ``infra.kafka``): ``value`` is then
    # the batch's raw bytes, ``offset`` its first offset and ``last_offset`` its last.
    poison: str | None = None  # "<kind>: <what failed>", kind one of schemas.errors.POISON_KINDS
    last_offset: int | None = None
    headers: Headers = ()  # the embedded topic's vector travels in one (schemas.events.VECTOR_HEADER)

    @property
    def source(self) -> SourceRef:
        return SourceRef(self.topic, self.partition, self.offset)


@dataclass(frozen=True, slots=True)
class ScopeQuery:
    """A scope filter: any field left ``None`` matches everything."""

    tenant_id: str | None = None
    user_id: str | None = None
    agent_id: str | None = None
    run_id: str | None = None

    def matches(self, scope: Scope) -> bool:
        return all(
            want is None or want == have
            for want, have in (
                (self.tenant_id, scope.tenant_id),
                (self.user_id, scope.user_id),
                (self.agent_id, scope.agent_id),
                (self.run_id, scope.run_id),
            )
        )


@dataclass(frozen=True, slots=True)
class MemoryRow:
    """A memory as both stores hold it. Deleted memories stay as tombstones so that order is kept."""

    memory_id: str
    scope: Scope
    text: str
    metadata: dict[str, Any]
    version: int
    event_id: str
    content_hash: str
    deleted: bool
    updated_at: int
    vector: bytes = b""  # little-endian float32, empty for tombstones and for rows read from Redis
    source: SourceRef | None = field(default=None, compare=False)
    # When the memory was first added (its ADD's event time, ms); None on an update's row: the stores keep the
    # time they already hold (or take updated_at for a memory they do not hold). Not compared: it depends on the
    # order the stores saw the events (an update applied before its add, out of order, keeps its own time), so it
    # is not part of the state that converges whatever the order (version, event, content).
    created_at: int | None = field(default=None, compare=False)
    expires_at: int | None = None  # ms since the epoch; None: never (see expired)
    actor: str | None = field(default=None, compare=False)  # the event's (kept in the history, not the stores)

    @property
    def key(self) -> str:
        """The memory's identity in the stores: ``<tenant>/<memory id>``."""
        return memory_key(self.scope.tenant_id, self.memory_id)

    def expired(self, now_ms: int) -> bool:
        """Whether the memory's expiry has passed: reads hide it from that moment, before any tombstone."""
        return self.expires_at is not None and self.expires_at <= now_ms

    def hidden(self, now_ms: int) -> bool:
        """Not readable: a tombstone, or expired."""
        return self.deleted or self.expired(now_ms)

    def order(self) -> tuple[int, str]:
        return (self.version, self.event_id)

    def state(self) -> StoreState:
        return StoreState(self.version, self.event_id, self.content_hash, self.deleted)


def added_at(items: Iterable[EmbeddedEvent]) -> list[tuple[str, int]]:
    """``(memory key, time)`` of each add among ``items``, in order: what :func:`with_first_add` takes."""
    return [(memory_key(i.event.scope.tenant_id, i.event.memory_id), i.event.ts) for i in items if i.event.op is Op.ADD]


def with_first_add(rows: Sequence[MemoryRow], added: Iterable[tuple[str, int]]) -> list[MemoryRow]:
    """Rows of updates (created_at None) whose memory was added in the same batch, given as ``(key, add's time)``
    in order, carry the first such time as created_at: the stores hold none to keep for them yet."""
    first: dict[str, int] = {}
    for key, ts in added:
        first.setdefault(key, ts)
    return [
        r if r.created_at is not None or r.key not in first else dataclasses.replace(r, created_at=first[r.key])
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class StoreState:
    """What verification compares between the stores."""

    version: int
    event_id: str
    content_hash: str
    deleted: bool


@dataclass(frozen=True, slots=True)
class TailCleared:
    """What clearing the fresh tail did: how many entries left it, and the rows LanceDB now holds ahead of Redis
    (Redis held no copy, or an older one). The ingest path writes Redis and the embedded topic at once, so the
    index sink can commit a row before the ingest path's Redis write lands; that write then enters the fresh tail
    after the clear, and the rows ahead are cleared again a moment later."""

    cleared: int = 0
    ahead: tuple[MemoryRow, ...] = ()


class WriteOutcome(IntEnum):
    """What a compare-and-set did with one row (values shared with the Redis Lua script)."""

    STALE = 0  # the store holds a newer version: nothing written
    CURRENT = 1  # the store already holds exactly this event (a replay): nothing written
    APPLIED = 2  # written
    SCOPE_MISMATCH = 3  # the store holds this memory under another user: refused, nothing written


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result."""

    row: MemoryRow
    score: float
