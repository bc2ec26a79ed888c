"""Embedding with a two-level cache (in-process LRU, then a shared store) so no text is embedded twice."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from processors.hashing import text_hash
from processors.ports import Embedder, EmbeddingCache, Vectors
from schemas.errors import MemStreamError

log = logging.getLogger("memstream.embedding")


@dataclass(slots=True)
class CacheCounts:
    hits_local: int = 0
    hits_shared: int = 0
    misses: int = 0


class LRU:
    """A bounded mapping that forgets the least recently used entry first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if self._capacity <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def capacity(self) -> int:
        return max(self._capacity, 0)


class CachedEmbedder:
    """Embeds a window of texts in one model call, skipping every text whose vector is cached."""

    def __init__(self, embedder: Embedder, shared: EmbeddingCache | None, local_capacity: int = 50_000) -> None:
        self.embedder = embedder
        self._shared = shared
        self._local = LRU(local_capacity)

    @property
    def model(self) -> str:
        return self.embedder.model

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def cache_key(self, text: str) -> str:
        return f"{self.embedder.model}:{text_hash(text)}"

    async def embed(self, texts: Sequence[str]) -> tuple[list[bytes], CacheCounts]:
        """Return one float32 vector (as bytes) per text, in order, and how the caches did."""
        counts = CacheCounts()
        if self._shared is None and not self._local.capacity:
            return await self._embed_uncached(texts), CacheCounts(misses=len(texts))
        keys = [self.cache_key(t) for t in texts]
        found: dict[str, bytes] = {}
        for key in dict.fromkeys(keys):
            hit = self._local.get(key)
            if hit is not None:
                found[key] = hit
        counts.hits_local = sum(1 for k in keys if k in found)
        unresolved = [k for k in dict.fromkeys(keys) if k not in found]
        if unresolved and self._shared is not None:
            for key, value in zip(unresolved, await self._shared_get(unresolved), strict=True):
                if value is not None and len(value) == self.dim * 4:
                    found[key] = value
                    self._local.put(key, value)
            counts.hits_shared = sum(1 for k in keys if k in found) - counts.hits_local
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
        counts.misses = sum(1 for k in keys if k in missing)
        if missing:
            vectors = await self.embedder.embed(list(missing.values()))
            fresh = _rows_as_bytes(vectors)
            new = dict(zip(missing.keys(), fresh, strict=True))
            for key, value in new.items():
                self._local.put(key, value)
            found.update(new)
            await self._shared_put(new)
        return [found[k] for k in keys], counts

    async def _embed_uncached(self, texts: Sequence[str]) -> list[bytes]:
        """No cache at all (the hash embedder's default): no key is hashed and no LRU touched, ~1 µs per text.
        A text repeated within the window is still embedded once, as with the caches."""
        unique = list(dict.fromkeys(texts))
        if not unique:
            return []
        fresh = _rows_as_bytes(await self.embedder.embed(unique))
        if len(unique) == len(texts):
            return fresh
        by_text = dict(zip(unique, fresh, strict=True))
        return [by_text[t] for t in texts]

    # The shared cache only saves work: when Redis is down, embed anyway instead of holding the window.

    async def _shared_get(self, keys: list[str]) -> list[bytes | None]:
        assert self._shared is not None
        try:
            return await self._shared.get_many(keys)
        except MemStreamError as exc:
            log.warning("shared embedding cache unavailable, embedding without it: %s", exc)
            return [None] * len(keys)

    async def _shared_put(self, items: dict[str, bytes]) -> None:
        if self._shared is None:
            return
        try:
            await self._shared.put_many(items)
        except MemStreamError as exc:
            log.warning("shared embedding cache unavailable, %d vectors not shared: %s", len(items), exc)


def _rows_as_bytes(vectors: Vectors) -> list[bytes]:
    array = np.ascontiguousarray(vectors, dtype="<f4")
    return [row.tobytes() for row in array]
