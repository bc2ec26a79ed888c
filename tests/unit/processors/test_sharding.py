"""processors/sharding.py: which shard holds a memory, and the merge of the shards' answers (top k, pages)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.model import Hit, MemoryRow
from processors.sharding import (
    check_shards,
    merge_pages,
    merge_top_k,
    newest_rows,
    partitions_of_shard,
    shard_of_partition,
)
from schemas.errors import ConfigError
from schemas.events import Scope


def row(memory_id: str, *, version: int = 1, tenant: str = "t") -> MemoryRow:
    return MemoryRow(memory_id, Scope(tenant, "u", None), "text", {}, version, f"e{version}", "h", False, 0)


def rank(hit: Hit) -> tuple[float, str]:
    return (-hit.score, hit.row.key)


# Scores from a small set, so that ties (equal scores in two shards) are common
scores = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, -0.3])


@given(
    st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), st.tuples(scores, st.integers(0, 3)), max_size=40),
    st.integers(1, 4),
    st.integers(0, 12),
)
def test_merged_top_k_is_the_top_k_of_the_union(memories: dict[str, tuple[float, int]], shards: int, k: int) -> None:
    # each memory lives in one shard; each shard answers its own top k (what LanceDB returns per table)
    hits = {memory_id: Hit(row(memory_id), score) for memory_id, (score, _) in memories.items()}
    per_shard = [
        sorted((hits[m] for m, (_, s) in memories.items() if s % shards == i), key=rank)[:k] for i in range(shards)
    ]
    merged = merge_top_k(per_shard, k)
    union = sorted(hits.values(), key=rank)[:k]
    assert merged == union
    assert len(merged) == min(k, len(memories))
    assert [h.score for h in merged] == sorted((h.score for h in merged), reverse=True)


def test_the_merge_breaks_ties_by_key_whatever_the_shard_order() -> None:
    a, b, c = Hit(row("a"), 0.5), Hit(row("b"), 0.5), Hit(row("c"), 0.9)
    assert merge_top_k([[b], [c, a]], 2) == [c, a]
    assert merge_top_k([[c, a], [b]], 2) == [c, a]
    assert merge_top_k([[a], [b]], 0) == []


@given(
    st.sets(st.text("abcdefghij", min_size=1, max_size=3), max_size=30),
    st.integers(1, 4),
    st.one_of(st.none(), st.integers(0, 10)),
)
def test_merged_pages_are_the_union_in_id_order(ids: set[str], shards: int, limit: int | None) -> None:
    rows = [row(m) for m in ids]
    per_shard = [
        sorted((r for r in rows if sum(map(ord, r.memory_id)) % shards == i), key=lambda r: r.memory_id)[:limit]
        for i in range(shards)
    ]
    expected = sorted(rows, key=lambda r: r.memory_id)
    assert merge_pages(per_shard, limit) == (expected if limit is None else expected[:limit])


@given(st.integers(1, 64), st.data())
def test_every_partition_feeds_exactly_one_shard(partitions: int, data: st.DataObject) -> None:
    shards = data.draw(st.integers(1, partitions))
    owned = [partitions_of_shard(i, shards, range(partitions)) for i in range(shards)]
    assert sorted(p for part in owned for p in part) == list(range(partitions))
    assert all(part for part in owned)  # no shard left without a partition
    assert all(shard_of_partition(p, shards) == i for i, part in enumerate(owned) for p in part)


def test_more_shards_than_partitions_is_refused() -> None:
    check_shards(4, 4)
    with pytest.raises(ConfigError, match="MEMSTREAM_PARTITIONS"):
        check_shards(5, 4)
    with pytest.raises(ConfigError, match="at least 1"):
        check_shards(0, 4)


def test_a_key_in_two_shards_keeps_its_newest_row() -> None:
    old, new, other = row("m", version=1), row("m", version=2), row("n")
    assert newest_rows([[new], [old, other]]) == {"t/m": new, "t/n": other}
    assert newest_rows([[old], [new]]) == {"t/m": new}
