"""Event types, the orjson codec and the JSON Schema files of every memstream topic."""

from schemas.errors import (
    BrokerError,
    ConfigError,
    EmbedderError,
    MemStreamError,
    SchemaError,
    ServiceError,
    StoreError,
)
from schemas.events import (
    SCHEMA_VERSION,
    ChangeEvent,
    DeadLetter,
    EmbeddedEvent,
    MemoryEvent,
    Op,
    Scope,
    SourceRef,
    decode_change,
    decode_dead_letter,
    decode_embedded,
    decode_event,
    encode,
)

__all__ = [
    "SCHEMA_VERSION",
    "BrokerError",
    "ChangeEvent",
    "ConfigError",
    "DeadLetter",
    "EmbeddedEvent",
    "EmbedderError",
    "MemStreamError",
    "MemoryEvent",
    "Op",
    "SchemaError",
    "Scope",
    "ServiceError",
    "SourceRef",
    "StoreError",
    "decode_change",
    "decode_dead_letter",
    "decode_embedded",
    "decode_event",
    "encode",
]
