"""Event types of every memstream topic and the one orjson codec for them.

The wire format is JSON (orjson), one object per Kafka record. The JSON Schema files in ``schemas/json/``
describe the same payloads for producers in other languages; ``tests/unit/schemas`` keeps the two in step.

Ordering: every event carries ``version``, an integer that only grows for a memory (the publisher stamps a
hybrid logical clock in microseconds unless the producer supplies its own). Stores keep, per memory, the
event with the greatest ``(version, event_id)``: last-writer-wins, so applying any set of events in any
order, any number of times, converges to the same state.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Protocol

import orjson

from schemas.errors import SchemaError

SCHEMA_VERSION: Final = 1
SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({1})

MAX_TEXT_CHARS: Final = 16_384
MAX_METADATA_BYTES: Final = 16_384
MAX_ID_CHARS: Final = 128
MAX_VERSION: Final = 2**53 - 1  # exact in every JSON implementation (IEEE doubles), Lua included
MAX_EXPIRES_AT: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last time ISO 8601 (and Python) can show
# Identifiers end up in Redis keys and in LanceDB filter expressions: a closed alphabet keeps both safe.
ID_PATTERN: Final = r"^[A-Za-z0-9_.:@-]{1,128}$"
_ID_RE: Final = re.compile(ID_PATTERN)

DEFAULT_TENANT: Final = "default"

# The actor the system's own events name: the expiry sweep's tombstones (processors/expiry.py) carry it, so the
# change feed and a memory's history tell "expired" from a delete someone asked for.
EXPIRY_ACTOR: Final = "memstream:expiry"

# The embedded topic's vectors travel as raw little-endian float32 bytes in this Kafka record header, named in the
# JSON body (``embedding.vector_header``) instead of base64 in it: decoding is then no base64 and no copy
# (base64 and its validation were ~13% of the index sink). Records written before carry ``vector_b64`` and no
# header; both are read. See schemas/json/README.md.
VECTOR_HEADER: Final = "memstream.vector.f32le"

Headers = tuple[tuple[str, bytes], ...]  # a Kafka record's headers, in order


class Op(StrEnum):
    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Scope:
    """Who a memory belongs to, as in Mem0: a tenant, a user, and optionally an agent and a run."""

    tenant_id: str
    user_id: str
    agent_id: str | None = None
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a record was read: ``topic[partition]@offset``."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True, slots=True)
class MemoryEvent:
    """One memory operation as agents publish it (topic ``<prefix>events``)."""

    event_id: str
    op: Op
    memory_id: str
    version: int
    ts: int  # event time, milliseconds since the epoch
    scope: Scope
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # When the memory expires, milliseconds since the epoch (as ``ts``); None: never. Reads hide it from then on
    # and the expiry sweep deletes it (a tombstone with ``actor`` EXPIRY_ACTOR). Only on add and update.
    expires_at: int | None = None
    actor: str | None = None  # who made the event when it was not an agent: EXPIRY_ACTOR for the expiry sweep

    @property
    def key(self) -> bytes:
        """Kafka key: every event of one memory lands in one partition, in order."""
        return self.memory_id.encode()

    def order(self) -> tuple[int, str]:
        """The total order that decides which event of a memory wins."""
        return (self.version, self.event_id)

    def to_dict(self) -> dict[str, Any]:
        body = {
            "schema_version": self.schema_version,
            "event_id": self.event_id,
            "op": self.op,  # a str subclass: orjson writes it as the plain string
            "memory_id": self.memory_id,
            "version": self.version,
            "ts": self.ts,
            "tenant_id": self.scope.tenant_id,
            "user_id": self.scope.user_id,
            "agent_id": self.scope.agent_id,
            "run_id": self.scope.run_id,
            "text": self.text,
            "metadata": self.metadata,
        }
        # written only when set: a record without them is byte for byte what readers before expiry accept
        if self.expires_at is not None:
            body["expires_at"] = self.expires_at
        if self.actor is not None:
            body["actor"] = self.actor
        return body


@dataclass(frozen=True, slots=True)
class EmbeddedEvent:
    """A memory event with its vector (topic ``<prefix>embedded``): replays re-materialize without re-embedding.

    ``vector`` holds little-endian float32 values; empty for deletes.
    """

    event: MemoryEvent
    model: str
    dim: int
    vector: bytes
    content_hash: str
    source: SourceRef | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.body({"model": self.model, "dim": self.dim, "vector_b64": base64.b64encode(self.vector).decode()})

    def body(self, embedding: dict[str, Any]) -> dict[str, Any]:
        """The record's JSON object with ``embedding`` as given (where the vector travels is the caller's choice)."""
        body = self.event.to_dict()
        body["embedding"] = embedding
        body["content_hash"] = self.content_hash
        body["source"] = self.source.to_dict() if self.source else None
        return body


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change applied to the stores (topic ``<prefix>changes``): the change feed."""

    op: Op
    memory_id: str
    scope: Scope
    version: int
    event_id: str
    content_hash: str
    stores: tuple[str, ...]
    event_ts: int
    applied_ts: int
    source: SourceRef | None = None
    schema_version: int = SCHEMA_VERSION
    # The change's record on the embedded topic: LanceDB holds the change once the index sink has committed past
    # this offset of that partition (``memstream stats`` indexed_to_p<N>, or group ``<group>.index``).
    indexed_after: SourceRef | None = None
    actor: str | None = None  # the event's actor: EXPIRY_ACTOR for a memory the expiry sweep removed

    @property
    def key(self) -> bytes:
        return self.memory_id.encode()

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "op": self.op,  # a str subclass: orjson writes it as the plain string
            "memory_id": self.memory_id,
            "tenant_id": self.scope.tenant_id,
            "user_id": self.scope.user_id,
            "agent_id": self.scope.agent_id,
            "run_id": self.scope.run_id,
            "version": self.version,
            "event_id": self.event_id,
            "content_hash": self.content_hash,
            "stores": list(self.stores),
            "event_ts": self.event_ts,
            "applied_ts": self.applied_ts,
            "source": self.source.to_dict() if self.source else None,
            "indexed_after": self.indexed_after.to_dict() if self.indexed_after else None,
            "actor": self.actor,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be processed (topic ``<prefix>dlq``), with why and its original bytes."""

    reason: str
    error_type: str
    stage: str
    ts: int
    value: bytes
    key: bytes | None = None
    source: SourceRef | None = None
    field: str | None = None
    schema_version: int = SCHEMA_VERSION
    last_offset: int | None = None  # a whole undecodable batch: its offsets are source.offset..last_offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "reason": self.reason,
            "error_type": self.error_type,
            "field": self.field,
            "stage": self.stage,
            "ts": self.ts,
            "source": self.source.to_dict() if self.source else None,
            "key_b64": base64.b64encode(self.key).decode() if self.key is not None else None,
            "value_b64": base64.b64encode(self.value).decode(),
            "last_offset": self.last_offset,
        }


# --------------------------------------------------------------------------------------------- encoding


class Encodable(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def encode(record: Encodable) -> bytes:
    """Every payload of every topic is its ``to_dict()`` as JSON: one codec."""
    return orjson.dumps(record.to_dict())


# --------------------------------------------------------------------------------------------- decoding

_OPS: Final = {op.value: op for op in Op}
_EVENT_FIELDS: Final = frozenset(
    {
        "schema_version",
        "event_id",
        "op",
        "memory_id",
        "version",
        "ts",
        "tenant_id",
        "user_id",
        "agent_id",
        "run_id",
        "text",
        "metadata",
        "expires_at",
        "actor",
    }
)
_EMBEDDED_FIELDS: Final = _EVENT_FIELDS | {"embedding", "content_hash", "source"}


def loads_object(raw: bytes | str) -> dict[str, Any]:
    """Parse one JSON object, or raise :class:`SchemaError` saying what is wrong."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"malformed JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SchemaError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def decode_event(raw: bytes | str) -> MemoryEvent:
    """Decode and validate one record of the events topic."""
    return event_from_dict(loads_object(raw), allowed=_EVENT_FIELDS)


def encode_embedded(item: EmbeddedEvent) -> tuple[bytes, Headers]:
    """One record of the embedded topic: the JSON body without the vector, and the vector in the
    :data:`VECTOR_HEADER` header (a delete, which has no vector, keeps an empty ``vector_b64`` and no header)."""
    if not item.vector:
        return encode(item), ()
    # the body built once, without the base64 of a vector that travels in the header (~4% of an ingest window)
    body = item.body({"model": item.model, "dim": item.dim, "vector_header": VECTOR_HEADER})
    return orjson.dumps(body), ((VECTOR_HEADER, item.vector),)


def decode_embedded(raw: bytes | str, headers: Headers = ()) -> EmbeddedEvent:
    """Decode and validate one record of the embedded-events topic, its vector in a header or (older records)
    base64 in the body."""
    return embedded_from_dict(loads_object(raw), headers)


def embedded_from_dict(obj: dict[str, Any], headers: Headers = ()) -> EmbeddedEvent:
    """Validate one embedded event as a parsed object (also how compensations carry theirs); a vector the body
    names by ``embedding.vector_header`` is taken from ``headers``."""
    event = event_from_dict(obj, allowed=_EMBEDDED_FIELDS)
    emb = obj.get("embedding")
    if not isinstance(emb, dict):
        raise SchemaError("'embedding' must be an object", field="embedding")
    model = _require_str(emb, "model", max_len=256)
    dim = _require_int(emb, "dim", low=0, high=65_536)
    vector, where = _vector_of(emb, headers)
    expected = 0 if event.op is Op.DELETE else dim * 4
    if len(vector) != expected:
        raise SchemaError(
            f"'embedding.{where}' holds {len(vector)} bytes, expected {expected} for dim {dim}", field="embedding"
        )
    content_hash = _require_str(obj, "content_hash", max_len=128)
    return EmbeddedEvent(
        event=event,
        model=model,
        dim=dim,
        vector=vector,
        content_hash=content_hash,
        source=_source_from(obj.get("source")),
    )


def _vector_of(emb: dict[str, Any], headers: Headers) -> tuple[bytes, str]:
    """The vector's bytes and which field said where they are (for errors): the header named by
    ``vector_header``, else the base64 of ``vector_b64``; exactly one of the two."""
    name = emb.get("vector_header")
    if name is None:
        if "vector_b64" not in emb:
            raise SchemaError("'embedding' needs 'vector_header' or 'vector_b64'", field="embedding")
        b64 = _require_str(emb, "vector_b64", allow_empty=True, max_len=1 << 20)
        try:
            return base64.b64decode(b64, validate=True), "vector_b64"
        except ValueError as exc:
            raise SchemaError("'embedding.vector_b64' is not valid base64", field="embedding") from exc
    if "vector_b64" in emb:
        raise SchemaError("'embedding' has both 'vector_header' and 'vector_b64'", field="embedding")
    if name != VECTOR_HEADER:
        raise SchemaError(f"'embedding.vector_header' must be {VECTOR_HEADER!r}, got {name!r}", field="embedding")
    for key, value in headers:
        if key == name:
            return value, "vector_header"
    raise SchemaError(f"the record has no {name!r} header its 'embedding.vector_header' names", field="embedding")


def decode_change(raw: bytes | str) -> ChangeEvent:
    """Decode one record of the change feed."""
    obj = loads_object(raw)
    _check_schema_version(obj)
    stores = obj.get("stores")
    if not isinstance(stores, list) or not all(isinstance(s, str) for s in stores):
        raise SchemaError("'stores' must be a list of strings", field="stores")
    return ChangeEvent(
        op=_require_op(obj),
        memory_id=_require_id(obj, "memory_id"),
        scope=_scope_from(obj),
        version=_require_int(obj, "version", low=0, high=MAX_VERSION),
        event_id=_require_id(obj, "event_id"),
        content_hash=_require_str(obj, "content_hash", max_len=128),
        stores=tuple(stores),
        event_ts=_require_int(obj, "event_ts", low=0, high=MAX_VERSION),
        applied_ts=_require_int(obj, "applied_ts", low=0, high=MAX_VERSION),
        source=_source_from(obj.get("source")),
        schema_version=obj["schema_version"],
        indexed_after=_source_from(obj.get("indexed_after"), field="indexed_after"),
        actor=obj.get("actor") if isinstance(obj.get("actor"), str) else None,
    )


def decode_dead_letter(raw: bytes | str) -> DeadLetter:
    """Decode one record of the dead-letter topic."""
    obj = loads_object(raw)
    _check_schema_version(obj)
    key_b64 = obj.get("key_b64")
    value = _b64(_require_str(obj, "value_b64", allow_empty=True, max_len=1 << 24), "value_b64")
    key = _b64(key_b64, "key_b64") if isinstance(key_b64, str) else None
    return DeadLetter(
        reason=_require_str(obj, "reason", max_len=1 << 16),
        error_type=_require_str(obj, "error_type", max_len=256),
        stage=_require_str(obj, "stage", max_len=64),
        ts=_require_int(obj, "ts", low=0, high=MAX_VERSION),
        value=value,
        key=key,
        source=_source_from(obj.get("source")),
        field=obj.get("field") if isinstance(obj.get("field"), str) else None,
        schema_version=obj["schema_version"],
        last_offset=optional_integer(obj.get("last_offset")),
    )


def event_from_dict(obj: dict[str, Any], *, allowed: frozenset[str] = _EVENT_FIELDS) -> MemoryEvent:
    """Validate a complete event object (every field present) and build the event."""
    _check_schema_version(obj)
    if not allowed.issuperset(obj):  # the common case without building a set per event
        unknown = sorted(set(obj) - allowed)
        raise SchemaError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    op = _require_op(obj)
    text = obj.get("text")
    if op is Op.DELETE:
        if text is not None:
            raise SchemaError("'text' must be null for op 'delete'", field="text")
    else:
        text = validate_text(text)
    expires_at = validate_expires_at(obj.get("expires_at"))
    if op is Op.DELETE and expires_at is not None:
        raise SchemaError("'expires_at' must be null for op 'delete'", field="expires_at")
    fast = _valid_event_fields(obj, op, text, expires_at)
    if fast is not None:
        return fast
    return MemoryEvent(  # something is wrong (or unusual, as 440.0 for an integer): checked field by field
        event_id=_require_id(obj, "event_id"),
        op=op,
        memory_id=_require_id(obj, "memory_id"),
        version=_require_int(obj, "version", low=0, high=MAX_VERSION),
        ts=_require_int(obj, "ts", low=0, high=MAX_VERSION),
        scope=_scope_from(obj),
        text=text,
        metadata=validate_metadata(obj.get("metadata", {})),
        schema_version=obj["schema_version"],
        expires_at=expires_at,
        actor=validate_id(obj.get("actor"), "actor", optional=True),
    )


def _valid_event_fields(obj: dict[str, Any], op: Op, text: str | None, expires_at: int | None) -> MemoryEvent | None:
    """The event when its ids, integers and metadata are all plainly valid, else None (the caller then checks
    field by field, in order, for the first error to report). One pass, no call per field: decoding was ~40% of
    the ingest window's own Python (cProfile), most of it calls of the validators below, each for one field."""
    get: Callable[..., Any] = obj.get  # each value checked below (mypy cannot follow the checks in the loops)
    event_id, memory_id, tenant_id, user_id = get("event_id"), get("memory_id"), get("tenant_id"), get("user_id")
    agent_id, run_id, actor = get("agent_id"), get("run_id"), get("actor")
    version, ts, metadata = get("version"), get("ts"), get("metadata", {})
    match = _ID_RE.fullmatch
    for value in (event_id, memory_id, tenant_id, user_id):
        if type(value) is not str or match(value) is None:
            return None
    for value in (agent_id, run_id, actor):
        if value is not None and (type(value) is not str or match(value) is None):
            return None
    if type(version) is not int or not 0 <= version <= MAX_VERSION or type(ts) is not int or not 0 <= ts <= MAX_VERSION:
        return None
    if metadata is not None and type(metadata) is not dict:
        return None
    return MemoryEvent(
        event_id=event_id,
        op=op,
        memory_id=memory_id,
        version=version,
        ts=ts,
        scope=Scope(tenant_id, user_id, agent_id, run_id),
        text=text,
        metadata=validate_metadata(metadata),
        schema_version=obj["schema_version"],
        expires_at=expires_at,
        actor=actor,
    )


def validate_expires_at(value: object) -> int | None:
    """``expires_at``: null, or milliseconds since the epoch (an integer as JSON Schema defines one, 0 to
    MAX_EXPIRES_AT). A time already past is allowed: the memory is hidden at once and removed by the next sweep."""
    if value is None:
        return None
    return as_integer(value, "expires_at", low=0, high=MAX_EXPIRES_AT)


def validate_text(text: object) -> str:
    if not isinstance(text, str):
        raise SchemaError(f"'text' must be a string, got {_type_name(text)}", field="text")
    if not text.strip():
        raise SchemaError("'text' is empty", field="text")
    if len(text) > MAX_TEXT_CHARS:
        raise SchemaError(f"'text' has {len(text)} characters, more than {MAX_TEXT_CHARS}", field="text")
    return text


def validate_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise SchemaError(f"'metadata' must be an object, got {_type_name(metadata)}", field="metadata")
    try:
        # wrapped once: every payload nests metadata inside its own object, and orjson stops at 255 levels
        size = len(orjson.dumps([metadata])) - 2
    except orjson.JSONEncodeError as exc:
        raise SchemaError(f"'metadata' cannot be encoded ({exc}): is it nested too deeply?", field="metadata") from exc
    if size > MAX_METADATA_BYTES:
        raise SchemaError(f"'metadata' is {size} bytes as JSON, more than {MAX_METADATA_BYTES}", field="metadata")
    return metadata


def validate_id(value: object, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise SchemaError(f"'{name}' must be a string, got {_type_name(value)}", field=name)
    if not _ID_RE.fullmatch(value):
        raise SchemaError(
            f"'{name}' must be 1-{MAX_ID_CHARS} characters of letters, digits and _.:@- (got {value[:40]!r})",
            field=name,
        )
    return value


# --------------------------------------------------------------------------------------------- helpers


def _check_schema_version(obj: dict[str, Any]) -> None:
    version = integral(obj.get("schema_version"))
    if type(version) is not int:
        raise SchemaError(f"'schema_version' must be an integer, got {_type_name(version)}", field="schema_version")
    obj["schema_version"] = version  # 1.0 is read as 1: what the event is built from is the integer
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_SCHEMA_VERSIONS))
        raise SchemaError(f"unknown schema_version {version} (this build reads {supported})", field="schema_version")


def parse_op(op: object) -> Op:
    """The :class:`Op` named by ``op``, or a :class:`SchemaError` listing the known ones."""
    found = _OPS.get(op) if isinstance(op, str) else None
    if found is not None:
        return found
    raise SchemaError(f"unknown op {op!r} (expected add, update or delete)", field="op")


def _require_op(obj: dict[str, Any]) -> Op:
    return parse_op(obj.get("op"))


def _require_id(obj: dict[str, Any], name: str) -> str:
    value = validate_id(obj.get(name), name)
    assert value is not None  # not optional
    return value


def _scope_from(obj: dict[str, Any]) -> Scope:
    return Scope(
        tenant_id=_require_id(obj, "tenant_id"),
        user_id=_require_id(obj, "user_id"),
        agent_id=validate_id(obj.get("agent_id"), "agent_id", optional=True),
        run_id=validate_id(obj.get("run_id"), "run_id", optional=True),
    )


def _require_int(obj: dict[str, Any], name: str, *, low: int, high: int) -> int:
    return as_integer(obj.get(name), name, low=low, high=high)


def integral(value: object) -> object:
    """``value`` as an ``int`` when JSON Schema calls it an integer, else unchanged.

    JSON does not tell 440.0 from 440, and JSON Schema (draft 4 on) calls any number with a zero fractional part
    an integer, so every validator of a payload (the topic schemas, the HTTP contract) accepts 440.0 where an
    integer is asked; this makes the codec and the readers agree with them. A boolean stays a boolean (Python's
    bool is an int, JSON's is not), as do 440.5, NaN and the infinities."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def as_integer(value: object, name: str, *, low: int, high: int) -> int:
    """An integer member of a payload or request, as JSON Schema defines one (see :func:`integral`), between
    ``low`` and ``high``; else a :class:`SchemaError` naming it (a 400 over HTTP)."""
    if type(value) is int and low <= value <= high:
        # the common case first, without integral()'s call: a replay validates five integers per record
        return value
    value = integral(value)
    if type(value) is not int:  # bool is an int subclass: reject it too
        got = f"number {value!r}" if type(value) is float else _type_name(value)
        raise SchemaError(f"'{name}' must be an integer, got {got}", field=name)
    if not low <= value <= high:
        raise SchemaError(f"'{name}' must be between {low} and {high}, got {value}", field=name)
    return value


def optional_integer(value: object) -> int | None:
    """An integer if ``value`` is one (see :func:`integral`), else None: for members that are only hints."""
    value = integral(value)
    return value if type(value) is int else None


def _require_str(obj: dict[str, Any], name: str, *, max_len: int, allow_empty: bool = False) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise SchemaError(f"'{name}' must be a string, got {_type_name(value)}", field=name)
    if not value and not allow_empty:
        raise SchemaError(f"'{name}' is empty", field=name)
    if len(value) > max_len:
        raise SchemaError(f"'{name}' is longer than {max_len} characters", field=name)
    return value


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise SchemaError(f"'{name}' is not valid base64", field=name) from exc


def _source_from(value: object, field: str = "source") -> SourceRef | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SchemaError(f"'{field}' must be an object or null", field=field)
    return SourceRef(
        topic=_require_str(value, "topic", max_len=249),
        partition=_require_int(value, "partition", low=0, high=2**31 - 1),
        offset=_require_int(value, "offset", low=0, high=2**63 - 1),
    )


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
