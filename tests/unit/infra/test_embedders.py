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
