"""Turning what an agent says ("remember this for user U") into complete, valid memory events."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.errors import SchemaError
from schemas.events import (
    DEFAULT_TENANT,
    MAX_VERSION,
    SCHEMA_VERSION,
    MemoryEvent,
    Op,
    event_from_dict,
    loads_object,
    parse_op,
)

# A fixed namespace so that the same memory added twice gets the same id (Mem0 de-duplicates the same way).
_MEMORY_NAMESPACE = uuid.UUID("6f1c1f5e-5d3b-4c53-9a63-6d656d737472")

INPUT_FIELDS = frozenset(
    {
        "op",
        "memory_id",
        "tenant_id",
        "user_id",
        "agent_id",
        "run_id",
        "text",
        "metadata",
        "event_id",
        "version",
        "ts",
        "expires_at",
    }
)


class HybridClock:
    """Microsecond timestamps that never go backwards and never repeat within one process.

    Versions come from here unless the producer supplies its own, so that later events of a memory from one
    publisher always win, even when the wall clock steps back.
    """

    def __init__(self, wall_us: Callable[[], int] = lambda: time.time_ns() // 1_000) -> None:
        self._wall_us = wall_us
        self._last = 0

    def next(self) -> int:
        self._last = max(self._wall_us(), self._last + 1)
        return self._last


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input the publisher refused, with where it was and why."""

    line: int
    reason: str
    field: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "field": self.field}


class EventFactory:
    """Fills in what an input leaves out (ids, op, tenant, version, time) and validates the result."""

    def __init__(self, clock: HybridClock | None = None) -> None:
        self._clock = clock or HybridClock()

    def from_json(self, raw: bytes | str) -> MemoryEvent:
        return self.from_input(loads_object(raw))

    def from_input(self, obj: dict[str, Any]) -> MemoryEvent:
        if not INPUT_FIELDS.issuperset(obj):  # the common case without building a set per event
            unknown = sorted(set(obj) - INPUT_FIELDS)
            raise SchemaError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
        op = parse_op(obj.get("op", Op.ADD.value))
        if "user_id" not in obj:
            raise SchemaError("'user_id' is required", field="user_id")
        if op is not Op.DELETE and "text" not in obj:
            raise SchemaError(f"'text' is required for op '{op.value}'", field="text")
        if op is not Op.ADD and "memory_id" not in obj:
            raise SchemaError(f"'memory_id' is required for op '{op.value}'", field="memory_id")
        version = obj.get("version")
        if version is None:
            version = self._clock.next()
        now_ms = time.time_ns() // 1_000_000
        full = {
            "schema_version": SCHEMA_VERSION,
            "event_id": obj["event_id"] if "event_id" in obj else random_uuid_hex(),  # made only when none given
            "op": op.value,
            "memory_id": obj.get("memory_id") or _content_memory_id(obj),
            "version": version,
            "ts": now_ms if obj.get("ts") is None else obj["ts"],
            "tenant_id": obj.get("tenant_id") or DEFAULT_TENANT,
            "user_id": obj["user_id"],
            "agent_id": obj.get("agent_id"),
            "run_id": obj.get("run_id"),
            "text": obj.get("text"),
            "metadata": obj.get("metadata", {}),
        }
        if obj.get("expires_at") is not None:  # ms since the epoch; left out when none (see MemoryEvent.to_dict)
            full["expires_at"] = obj["expires_at"]
        return event_from_dict(full)


def _content_memory_id(obj: dict[str, Any]) -> str:
    """The id of an added memory that names none: derived from its scope and text, so re-adding is a no-op."""
    parts = [obj.get("tenant_id") or DEFAULT_TENANT, obj.get("user_id"), obj.get("agent_id"), obj.get("run_id")]
    name = "\x1f".join("" if p is None else str(p) for p in parts) + "\x1e" + str(obj.get("text"))
    return name_uuid_hex(name)


# The two uuids of an event without ids, as ``uuid.uuid4().hex`` and ``uuid.uuid5(_MEMORY_NAMESPACE, name).hex``
# compute them, without building ``UUID`` objects: those two calls were ~25% of `memstream publish` for events
# that name no id (py-spy). The version and variant bits are set exactly as RFC 4122 (and the uuid module) do.


def random_uuid_hex() -> str:
    """``uuid.uuid4().hex``: 122 random bits from ``os.urandom``, version 4, RFC 4122 variant."""
    return _with_version(bytearray(os.urandom(16)), 4)


def name_uuid_hex(name: str) -> str:
    """``uuid.uuid5(_MEMORY_NAMESPACE, name).hex``: SHA-1 of the namespace and the name, version 5."""
    return _with_version(bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16]), 5)


_NAMESPACE_BYTES = _MEMORY_NAMESPACE.bytes


def _with_version(raw: bytearray, version: int) -> str:
    raw[6] = (raw[6] & 0x0F) | (version << 4)
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


__all__ = ["MAX_VERSION", "EventFactory", "HybridClock", "Rejected"]
