"""The small interfaces processors need from the outside world. ``infra/`` implements them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from processors.model import Hit, MemoryRow, ScopeQuery, StoreState, TailCleared, Topics, WriteOutcome
from schemas.events import Headers, SourceRef

# A record to send: key, value, and optionally its headers.
OutRecord = tuple[bytes | None, bytes] | tuple[bytes | None, bytes, Headers]

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension."""

    @property
    def model(self) -> str: ...

    @property
    def dim(self) -> int: ...

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Return an array of shape ``(len(texts), dim)``."""
        ...


class EmbeddingCache(Protocol):
    """Vectors by ``(model, text hash)``, shared between workers and restarts."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put_many(self, items: Mapping[str, bytes]) -> None: ...


class VectorStore(Protocol):
    """The durable store (LanceDB): one row per memory, tombstones kept for ordering."""

    async def upsert(self, rows: Sequence[MemoryRow]) -> None:
        """Write rows whose ``(version, event_id)`` is newer than the stored row's; ignore the rest."""
        ...

    async def get(self, keys: Sequence[str]) -> list[MemoryRow]:
        """The rows of these memories, by key ``<tenant>/<memory id>`` (processors.model.memory_key)."""
        ...

    async def owners(self, keys: Sequence[str]) -> dict[str, str]:
        """The user each memory (by key) belongs to, for those the store holds (tombstones included)."""
        ...

    async def search(self, vector: Vectors, scope: ScopeQuery, k: int) -> list[Hit]: ...

    async def states(self, scope: ScopeQuery | None = None) -> dict[str, StoreState]:
        """Every memory's state in scope, by key."""
        ...


class HistoryStore(Protocol):
    """Every applied version of every memory, kept beyond the log (the index sink writes it, ``history`` reads)."""

    async def record(self, rows: Sequence[MemoryRow]) -> int:
        """Keep these versions, each once per (memory, event id): a version kept already is left alone.
        Returns how many were new."""
        ...


class CacheStore(Protocol):
    """The hot cache (Redis): each memory, a recency index per user."""

    async def apply(self, rows: Sequence[MemoryRow], *, pending: bool = False) -> list[WriteOutcome]:
        """Compare-and-set each row by ``(version, event_id)``, refusing a row of another user than the held one
        (SCOPE_MISMATCH); say per row what happened. ``pending``: LanceDB does not hold these rows yet (the ingest
        path): each applied row joins the fresh tail, with its vector, until the index sink clears it."""
        ...

    async def clear_pending(self, rows: Sequence[MemoryRow]) -> TailCleared:
        """LanceDB now holds these rows: take them out of the fresh tail (where no newer version is pending); say
        which rows Redis holds no copy of, or an older one (the ingest path's write may still be on its way)."""
        ...

    async def stale_pending(self, older_than_ms: int, limit: int) -> list[MemoryRow]:
        """Fresh-tail rows (with vectors) waiting longer than ``older_than_ms``: the log did not bring them."""
        ...

    async def get(self, keys: Sequence[str]) -> list[MemoryRow | None]:
        """The memories by key ``<tenant>/<memory id>``, ``None`` where the cache has none."""
        ...

    async def owners(self, keys: Sequence[str]) -> dict[str, str]:
        """The user each memory (by key) belongs to, for those the cache holds (tombstones included)."""
        ...

    async def states(self, scope: ScopeQuery | None = None) -> dict[str, StoreState]: ...

    async def touch(self, rows: Sequence[MemoryRow]) -> None:
        """Invalidate cached reads of these rows' scopes: LanceDB now holds rows the cache took earlier."""
        ...


class Publisher(Protocol):
    """Sends records and returns once the broker has acknowledged every one of them."""

    async def publish(self, topic: str, records: Sequence[OutRecord]) -> None: ...

    async def publish_positioned(self, topic: str, records: Sequence[OutRecord]) -> list[SourceRef]:
        """:meth:`publish`, returning where each record landed, in the order given."""
        ...


class Counters(Protocol):
    """Shared counters (events in, materialized, dead-lettered, cache hits...)."""

    async def add(self, counts: Mapping[str, int]) -> None: ...


__all__ = [
    "CacheStore",
    "Counters",
    "Embedder",
    "EmbeddingCache",
    "HistoryStore",
    "OutRecord",
    "Publisher",
    "Topics",
    "VectorStore",
    "Vectors",
]
