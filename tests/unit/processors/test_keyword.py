"""BM25 over one user's memories (processors/keyword.py): LanceDB's default FTS tokenizer, and scores equal to an
independent BM25 written from its textbook formula with lance's parameters."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.hot_vectors import HotVectors, VectorMatrix
from processors.keyword import KeywordIndex, fold_ascii, terms
from processors.model import MemoryRow
from schemas.events import Scope


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The runners were Running quickly!", ["runner", "run", "quick"]),  # stop word, stem, lowercase
        ("snake_case and kebab-case, 2024", ["snake", "case", "kebab", "case", "2024"]),  # _ and - split words
        ("Café in Zürich, Straße", ["cafe", "zurich", "strasse"]),  # stemmed, then folded (lance's order)
        ("this is it", []),  # every word a stop word
        ("doing very well", ["veri", "well"]),  # stop words match the stem: "doing" is "do", "very" is "veri"
        ("x" * 39 + " " + "y" * 40, ["x" * 39]),  # 40 bytes and longer are dropped, as max_token_length=40
        ("é" * 20, []),  # 40 bytes in UTF-8: the limit counts bytes, not characters
        ("", []),
    ],
)
def test_terms_are_lancedbs_default_fts_tokens(text: str, want: list[str]) -> None:
    assert terms(text) == want


def test_folding_spells_undecomposable_letters_in_ascii() -> None:
    assert [fold_ascii(w) for w in ("ßø", "æon", "łódź", "plain")] == ["sso", "aeon", "lodz", "plain"]


VOCAB = ["apple", "banana", "cherry", "date", "elder", "fig", "grape", "the", "Running", "runs"]
docs = st.lists(st.lists(st.sampled_from(VOCAB), max_size=12).map(" ".join), min_size=1, max_size=15)
queries = st.lists(st.sampled_from(VOCAB), min_size=1, max_size=4).map(" ".join)


def reference_scores(texts: list[str], query: str) -> list[float]:
    """BM25 from its formula (k1 1.2, b 0.75, lance's idf ln(1 + (N - n + 0.5) / (n + 0.5))), each distinct query
    term once, in plain Python over the same terms: shares no scoring code with the module under test."""
    tokenized = [terms(t) for t in texts]
    n_docs = sum(1 for d in tokenized if d)  # lance counts only texts with a term
    mean = sum(len(d) for d in tokenized) / (n_docs or 1) or 1.0
    out = []
    for doc in tokenized:
        tf = Counter(doc)
        score = 0.0
        for term in set(terms(query)):
            if not tf[term]:
                continue
            n = sum(1 for d in tokenized if term in d)
            weight = math.log(1 + (n_docs - n + 0.5) / (n + 0.5))
            score += weight * tf[term] * 2.2 / (tf[term] + 1.2 * (0.25 + 0.75 * len(doc) / mean))
        out.append(score)
    return out


@given(docs, queries, st.integers(1, 20))
@settings(max_examples=150, deadline=None)
def test_scores_and_ranking_equal_an_independent_bm25(texts: list[str], query: str, k: int) -> None:
    index = KeywordIndex.build(texts)
    want = reference_scores(texts, query)
    assert index.scores(query).tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    ranked = index.top(query, k, range(len(texts)))
    assert all(want[row] > 0 for row, _ in ranked)  # a memory without a query term is never a keyword hit
    order = sorted((row for row, s in enumerate(want) if s > 0), key=lambda r: (-want[r], r))
    assert [row for row, _ in ranked] == order[:k]  # best first, ties by row (the copy's key order)


@given(docs, queries, st.data())
@settings(max_examples=60, deadline=None)
def test_top_ranks_only_the_candidates_and_deeper_extends_shallower(texts: list[str], query: str, data) -> None:
    index = KeywordIndex.build(texts)
    candidates = sorted(data.draw(st.sets(st.integers(0, len(texts) - 1))))
    deep = index.top(query, len(texts), candidates)
    assert {row for row, _ in deep} <= set(candidates)
    for k in range(1, len(deep) + 1):
        assert index.top(query, k, candidates) == deep[:k]


def test_a_term_in_every_memory_still_scores_and_a_rarer_term_outranks_it() -> None:
    index = KeywordIndex.build(["apple pie", "apple tart", "apple cherry"])
    assert index.top("apple", 3, range(3))[0][1] > 0  # lance's idf is never negative
    assert index.top("apple cherry", 1, range(3))[0][0] == 2


def row(memory_id: str, text: str) -> MemoryRow:
    scope = Scope("t1", "u1", None, None)
    vector = b"\x00\x00\x80\x3f" * 4
    return MemoryRow(memory_id, scope, text, {}, 1, "e1", "h", False, 1_000, vector)


def test_the_keyword_index_is_kept_beside_its_matrix_and_dropped_with_it() -> None:
    one = VectorMatrix.build([row("m1", "apple pie"), row("m2", "cherry tart")], {})
    cache = HotVectors(budget_bytes=10 * one.nbytes)
    cache.put("t1|u1", b"1", one)
    index = cache.keywords("t1|u1", one)
    assert index is not None and cache.keywords("t1|u1", one) is index  # built once, on the first hybrid search
    assert cache.held_bytes == one.nbytes + index.nbytes
    assert index.top("cherries", 5, range(2)) == [(1, pytest.approx(index.scores("cherry")[1]))]
    cache.put("t1|u1", b"2", one)  # a write moved the generation: the index goes with the old copy
    assert cache.held_bytes == one.nbytes
    other = VectorMatrix.build([row("m1", "banana")], {})
    assert cache.keywords("t1|u1", other) is not cache.keywords("t1|u1", other)  # not held: not kept
