"""processors/reading.py: filters, rank fusion, the TTL LRU, context blocks (budget, order, determinism)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.model import Hit, MemoryRow
from processors.reading import (
    CONTEXT_HEADER,
    TtlLru,
    estimate_tokens,
    fuse_ranks,
    matches_all,
    parse_filters,
    reciprocal_rank_fusion,
    render_context,
)
from schemas.errors import SchemaError
from schemas.events import Scope

DAY_MS = 86_400_000


def row(memory_id: str, text: str = "t", *, ts: int = 0, deleted: bool = False, **metadata: Any) -> MemoryRow:
    return MemoryRow(memory_id, Scope("t", "u", "a"), text, metadata, 1, "e", "h", deleted, ts)


# --------------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"topic": "food"}, {"a", "b"}),
        ({"metadata.topic": "food"}, {"a", "b"}),
        ({"topic": {"ne": "food"}}, {"c", "d"}),  # a missing key is "not equal"
        ({"year": {"gte": 2020}}, {"b", "c"}),
        ({"year": {"gt": 2019, "lt": 2024}}, {"b"}),
        ({"year": {"lte": 2019}}, {"a"}),
        ({"tag": {"in": ["x", "z"]}}, {"a", "c"}),
        ({"tag": {"nin": ["x"]}}, {"b", "c", "d"}),
        ({"topic": "food", "year": {"gte": 2020}}, {"b"}),
        ({"updated_at": {"gte": 2}}, {"b", "c", "d"}),
        ({"agent_id": "a"}, {"a", "b", "c", "d"}),
        ({"year": {"gt": "2000"}}, set()),  # another type never matches a range
        ({"topic": {"contains": "oo"}}, {"a", "b"}),  # a substring of a string
        ({"tags": {"contains": "red"}}, {"a", "c"}),  # an element of a list
        ({"year": {"contains": 20}}, set()),  # neither a string nor a list: no match
        ({"topic": {"contains": 1}}, set()),  # a string never contains a non-string
        ({"created_at": {"lte": 1}}, {"a"}),
        ({"created_at": {"gte": 2}}, {"b", "c", "d"}),  # d was written before created_at was kept: its updated_at
    ],
)
def test_filters(filters: dict[str, Any], expected: set[str]) -> None:
    rows = [
        dataclasses.replace(row("a", ts=1, topic="food", year=2019, tag="x", tags=["red", "blue"]), created_at=1),
        dataclasses.replace(row("b", ts=2, topic="food", year=2023, tag="y", tags=["blue"]), created_at=2),
        dataclasses.replace(row("c", ts=3, topic="work", year=2024, tag="z", tags=["red"]), created_at=2),
        row("d", ts=4),
    ]
    conditions = parse_filters(filters)
    assert {r.memory_id for r in rows if matches_all(r, conditions)} == expected


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"x": {"like": 1}}, "unknown operator"),
        ({"x": {"in": 3}}, "takes a list"),
        ({"x": {}}, "no operator"),
        ({"": 1}, "non-empty"),
    ],
)
def test_bad_filters_say_why(filters: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        parse_filters(filters)


# --------------------------------------------------------------------------------------------- fusion


def test_rrf_rewards_agreement_and_breaks_ties_by_id() -> None:
    by_vector = [Hit(row("a"), 0.9), Hit(row("b"), 0.8), Hit(row("c"), 0.7)]
    by_text = [Hit(row("b"), 9.0), Hit(row("c"), 3.0)]
    fused = reciprocal_rank_fusion([by_vector, by_text], k=3)
    assert [h.row.memory_id for h in fused] == ["b", "c", "a"]  # found by both beats first in one
    assert [h.score for h in fused] == pytest.approx([1 / 62 + 1 / 61, 1 / 63 + 1 / 62, 1 / 61])
    tie = reciprocal_rank_fusion([[Hit(row("z"), 1)], [Hit(row("y"), 1)]], k=2)
    assert [h.row.memory_id for h in tie] == ["y", "z"]


@settings(max_examples=200)
@given(
    rankings=st.lists(st.lists(st.sampled_from("abcdefghijklmnop"), unique=True, max_size=12), min_size=1, max_size=3),
    k=st.integers(1, 20),
)
def test_fusing_ids_alone_gives_the_fusion_of_hits(rankings: list[list[str]], k: int) -> None:
    """The hybrid search from the copy fuses ids first and reads rows for the winners only: the same ids, order
    and scores as fusing hits with their rows."""
    with_rows = reciprocal_rank_fusion([[Hit(row(m), 0.0) for m in ranking] for ranking in rankings], k=k)
    assert fuse_ranks(rankings, k) == [(h.row.memory_id, h.score) for h in with_rows]
    # and both are RRF as defined: 1 / (60 + rank) summed over the rankings, best first, ties by id
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, memory_id in enumerate(ranking):
            scores[memory_id] = scores.get(memory_id, 0.0) + 1 / (61 + rank)
    expected = sorted(scores, key=lambda m: (-scores[m], m))[:k]
    assert [m for m, _ in fuse_ranks(rankings, k)] == expected


# --------------------------------------------------------------------------------------------- L1


def test_ttl_lru_evicts_least_recent_and_expires() -> None:
    now = [0.0]
    cache: TtlLru[str, int] = TtlLru(2, ttl_s=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    now[0] = 10.0
    assert cache.get("a") is None and len(cache) == 1


# --------------------------------------------------------------------------------------------- context


def test_context_block_format_order_and_budget() -> None:
    rows = [
        row("old", "an old memory", ts=1 * DAY_MS),
        row("new", "a new memory", ts=3 * DAY_MS),
        row("vip", "an important one", ts=0, importance=0.9),
        row("gone", "a deleted memory", ts=4 * DAY_MS, deleted=True),
    ]
    block = render_context(rows, budget_tokens=1_000)
    assert block.text == (
        "## Memories\n- [1970-01-04] a new memory\n- [1970-01-02] an old memory\n- [1970-01-01] an important one"
    )
    assert block.memory_ids == ("new", "old", "vip") and block.total == 3
    assert block.tokens == estimate_tokens(block.text)
    # a budget for the header and one line: importance wins over recency
    tight = render_context(rows, budget_tokens=estimate_tokens(CONTEXT_HEADER) + 1 + 10)
    assert tight.memory_ids == ("vip",)
    assert render_context([], 1_000).text == ""


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=200), st.integers(0, 10**13), st.booleans(), st.floats(0, 1)),
        max_size=30,
    ),
    st.integers(16, 2_000),
)
def test_context_fits_its_budget_and_ignores_input_order(
    items: list[tuple[str, int, bool, float]], budget: int
) -> None:
    rows = [row(f"m{i}", text, ts=ts, deleted=dead, importance=imp) for i, (text, ts, dead, imp) in enumerate(items)]
    block = render_context(rows, budget)
    assert block.tokens <= budget
    assert render_context(list(reversed(rows)), budget) == block
    assert not set(block.memory_ids) & {r.memory_id for r in rows if r.deleted}


def test_a_memory_from_past_the_year_9999_renders_its_day() -> None:
    """ts is any integer up to 2^53-1: fromtimestamp raised for it, so the block could not be built."""
    block = render_context([row("a", "far future", ts=2**53 - 1)], 100)
    assert "- [+287396-10-12] far future" in block.text.splitlines()


def test_a_context_block_is_stale_once_its_first_memory_expires() -> None:
    from processors.model import MemoryRow
    from processors.reading import ContextBlock, render_context
    from schemas.events import Scope

    rows = [
        MemoryRow("a", Scope("t", "u"), "lives", {}, 1, "e", "h", False, 1_000),
        MemoryRow("b", Scope("t", "u"), "goes", {}, 1, "e", "h", False, 1_000, expires_at=9_000),
        MemoryRow("c", Scope("t", "u"), "goes later", {}, 1, "e", "h", False, 1_000, expires_at=12_000),
    ]
    block = render_context(rows, 1_000)
    assert block.expires_at == 9_000 and not block.stale(8_999) and block.stale(9_000)
    assert ContextBlock.from_dict(block.to_dict()) == block
    old = block.to_dict()
    del old["expires_at"]  # cached before expiry existed
    assert ContextBlock.from_dict(old).expires_at is None
    assert render_context(rows[:1], 1_000).expires_at is None
