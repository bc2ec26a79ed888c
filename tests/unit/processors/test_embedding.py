"""CachedEmbedder: one model call per window, no text embedded twice (local LRU, then the shared cache)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from processors.embedding import LRU, CachedEmbedder
from processors.hashing import text_hash
from tests.unit.processors.fakes import DIM, FakeEmbedder, fake_vector


class FakeSharedCache:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.gets: list[list[str]] = []

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.gets.append(list(keys))
        return [self.data.get(k) for k in keys]

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        self.data.update(items)


def expected(text: str) -> bytes:
    return fake_vector(text, DIM).astype("<f4").tobytes()


async def test_second_embed_of_the_same_texts_hits_the_cache() -> None:
    model = FakeEmbedder()
    embedder = CachedEmbedder(model, None)
    first, counts = await embedder.embed(["a", "b"])
    assert first == [expected("a"), expected("b")]
    assert (counts.hits_local, counts.hits_shared, counts.misses) == (0, 0, 2)

    again, counts = await embedder.embed(["b", "a"])
    assert again == [expected("b"), expected("a")]
    assert (counts.hits_local, counts.hits_shared, counts.misses) == (2, 0, 0)
    assert model.calls == [["a", "b"]]


async def test_one_model_call_per_window_for_the_missing_texts_only() -> None:
    model = FakeEmbedder()
    embedder = CachedEmbedder(model, None)
    await embedder.embed(["a"])
    vectors, counts = await embedder.embed(["a", "b", "c", "b"])
    assert model.calls == [["a"], ["b", "c"]]  # duplicates inside a window are embedded once
    assert vectors == [expected(t) for t in ["a", "b", "c", "b"]]
    assert (counts.hits_local, counts.misses) == (1, 3)


async def test_vectors_are_little_endian_float32_of_the_model_dimension() -> None:
    embedder = CachedEmbedder(FakeEmbedder(dim=3), None)
    (vector,), _ = await embedder.embed(["x"])
    assert len(vector) == 3 * 4
    assert embedder.model == "fake" and embedder.dim == 3


async def test_empty_window_calls_nothing() -> None:
    model = FakeEmbedder()
    shared = FakeSharedCache()
    vectors, counts = await CachedEmbedder(model, shared).embed([])
    assert vectors == [] and model.calls == [] and shared.gets == []
    assert (counts.hits_local, counts.hits_shared, counts.misses) == (0, 0, 0)


async def test_least_recently_used_text_is_evicted() -> None:
    model = FakeEmbedder()
    embedder = CachedEmbedder(model, None, local_capacity=2)
    await embedder.embed(["a"])
    await embedder.embed(["b"])
    await embedder.embed(["a"])  # hit: "a" becomes the most recently used
    await embedder.embed(["c"])  # evicts "b"
    model.calls.clear()
    _, counts = await embedder.embed(["a", "c"])
    assert counts.hits_local == 2 and model.calls == []
    _, counts = await embedder.embed(["b"])
    assert counts.misses == 1 and model.calls == [["b"]]


async def test_shared_cache_is_used_across_embedders() -> None:
    shared = FakeSharedCache()
    first_model, second_model = FakeEmbedder(), FakeEmbedder()
    await CachedEmbedder(first_model, shared).embed(["a", "b"])
    assert set(shared.data) == {f"fake:{text_hash('a')}", f"fake:{text_hash('b')}"}

    second = CachedEmbedder(second_model, shared)  # another worker: empty local cache
    vectors, counts = await second.embed(["a", "b", "c"])
    assert vectors == [expected("a"), expected("b"), expected("c")]
    assert (counts.hits_local, counts.hits_shared, counts.misses) == (0, 2, 1)
    assert second_model.calls == [["c"]]
    assert shared.gets == [["fake:" + text_hash("a"), "fake:" + text_hash("b")], [second.cache_key(t) for t in "abc"]]

    _, counts = await second.embed(["a", "c"])  # now local
    assert (counts.hits_local, counts.hits_shared, counts.misses) == (2, 0, 0)
    assert len(shared.gets) == 2


async def test_shared_vector_of_the_wrong_size_is_ignored() -> None:
    shared = FakeSharedCache()
    model = FakeEmbedder()
    embedder = CachedEmbedder(model, shared)
    shared.data[embedder.cache_key("a")] = b"\x00" * 5
    vectors, counts = await embedder.embed(["a"])
    assert vectors == [expected("a")] and counts.misses == 1 and model.calls == [["a"]]
    assert shared.data[embedder.cache_key("a")] == expected("a")  # repaired


async def test_cache_keys_depend_on_the_model() -> None:
    shared = FakeSharedCache()
    await CachedEmbedder(FakeEmbedder("model-a"), shared).embed(["a"])
    other = FakeEmbedder("model-b")
    _, counts = await CachedEmbedder(other, shared).embed(["a"])
    assert counts.misses == 1 and other.calls == [["a"]]
    assert CachedEmbedder(other, None).cache_key("a") == f"model-b:{text_hash('a')}"


def test_lru() -> None:
    lru = LRU(2)
    lru.put("a", b"1")
    lru.put("b", b"2")
    assert lru.get("a") == b"1"
    lru.put("c", b"3")
    assert lru.get("b") is None and lru.get("a") == b"1" and lru.get("c") == b"3"
    lru.put("a", b"9")
    assert lru.get("a") == b"9" and len(lru) == 2
    assert lru.get("missing") is None


def test_lru_of_capacity_zero_keeps_nothing() -> None:
    lru = LRU(0)
    lru.put("a", b"1")
    assert len(lru) == 0 and lru.get("a") is None


async def test_without_any_cache_the_vectors_counts_and_calls_are_those_of_the_cached_path() -> None:
    """No cache at all (the hash embedder's default) skips the keys and the LRU; nothing else may change."""
    texts = ["a", "b", "a", "c", "b"]
    cached_model, bare_model = FakeEmbedder(), FakeEmbedder()
    cached = await CachedEmbedder(cached_model, None, local_capacity=100).embed(texts)
    bare_embedder = CachedEmbedder(bare_model, None, local_capacity=0)
    bare = await bare_embedder.embed(texts)
    assert bare[0] == cached[0] == [expected(t) for t in texts]
    assert (bare[1].hits_local, bare[1].hits_shared, bare[1].misses) == (0, 0, 5)
    assert (cached[1].hits_local, cached[1].hits_shared, cached[1].misses) == (0, 0, 5)
    assert bare_model.calls == cached_model.calls == [["a", "b", "c"]]  # a repeat inside a window: embedded once
    assert await bare_embedder.embed([]) == ([], bare[1].__class__())
    assert bare_model.calls == [["a", "b", "c"]]  # an empty window calls nothing
