import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.embedders import HashEmbedder, make_embedder
from schemas.errors import ConfigError


def test_hash_vectors_are_unit_length_and_deterministic() -> None:
    a, b = HashEmbedder(64), HashEmbedder(64)
    texts = ["Alice is vegetarian", "Bob swims on Saturdays", "!!!"]
    va, vb = a.embed_sync(texts), b.embed_sync(texts)
    assert va.shape == (3, 64) and va.dtype == np.float32
    np.testing.assert_array_equal(va, vb)  # crc32, not Python's salted hash: the same in every process
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, rtol=1e-5)


def test_shared_words_bring_texts_closer() -> None:
    e = HashEmbedder(384)
    [q, near, far] = e.embed_sync(["alice is vegetarian", "alice is a vegetarian cook", "bob swims in the lake"])
    assert float(q @ near) > float(q @ far)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=5))
def test_memoised_codes_give_the_same_vectors(texts: list[str]) -> None:
    memo, fresh = HashEmbedder(32, memo_size=3), HashEmbedder(32)
    first = memo.embed_sync(texts)
    np.testing.assert_array_equal(first, memo.embed_sync(texts))
    np.testing.assert_array_equal(first, fresh.embed_sync(texts))


def test_unknown_embedder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown embedder"):
        make_embedder("word2vec")


def reference_hash_vectors(texts: list[str], dim: int) -> np.ndarray:
    """The hash embedder as it was first written, one text and one feature at a time (crc32 of each word and each
    word bigram, no memo): stored vectors and tests depend on these exact bits, so every faster version must
    give the same ones."""
    import itertools
    import re
    import zlib

    out = np.zeros((len(texts), dim), dtype=np.float64)
    for i, text in enumerate(texts):
        words = re.findall(r"[a-z0-9']+", text.lower())
        features = words + [" ".join(pair) for pair in itertools.pairwise(words)] if words else [text]
        for code in (zlib.crc32(f.encode()) for f in features):
            out[i, code % dim] += -1.0 if code & 0x80000000 else 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norms == 0, 1.0, norms)).astype(np.float32)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=300) | st.sampled_from(["", " ", "İstanbul KELVIN \u212a", "a a a", "x"]), max_size=8))
def test_hash_vectors_are_bit_identical_to_the_reference(texts: list[str]) -> None:
    for dim in (16, 384):
        expected = reference_hash_vectors(texts, dim)
        got = HashEmbedder(dim, memo_size=7).embed_sync(texts)
        assert got.dtype == np.float32 and got.shape == (len(texts), dim)
        assert got.tobytes() == expected.tobytes()


def test_hash_vectors_of_the_bench_texts_are_bit_identical_to_the_reference() -> None:
    from streams.tools.bench_data import synthetic_events

    texts = [e.text for e in synthetic_events(2_000) if e.text is not None]
    embedder = HashEmbedder(384)
    for _ in range(2):  # the second pass reads every feature from the memo
        assert embedder.embed_sync(texts).tobytes() == reference_hash_vectors(texts, 384).tobytes()
