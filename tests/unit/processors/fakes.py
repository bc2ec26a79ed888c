"""A fake model for the pure-logic tests of processors (the real embedders are tested in tests/unit/infra)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from processors.ports import Vectors

DIM = 8


def fake_vector(text: str, dim: int = DIM) -> npt.NDArray[np.float32]:
    """A unit vector derived from a hash of the text: deterministic, different for different texts."""
    digest = hashlib.blake2b(text.encode(), digest_size=dim).digest()
    row = np.frombuffer(digest, dtype=np.uint8).astype(np.float32) + 1.0
    return (row / np.linalg.norm(row)).astype(np.float32)


class FakeEmbedder:
    """Deterministic vectors from a hash of the text; records every model call."""

    def __init__(self, model: str = "fake", dim: int = DIM) -> None:
        self._model = model
        self._dim = dim
        self.calls: list[list[str]] = []

    @property
    def model(self) -> str:
        return self._model

    @property
    def dim(self) -> int:
        return self._dim

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = fake_vector(text, self._dim)
        return out
