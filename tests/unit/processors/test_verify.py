"""compare(): what ``memstream verify`` reports about LanceDB against Redis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.model import StoreState
from processors.verify import MAX_EXAMPLES, compare


def state(version: int = 1, event_id: str = "e", content_hash: str = "h", deleted: bool = False) -> StoreState:
    return StoreState(version, event_id, content_hash, deleted)


def test_identical_stores_are_consistent() -> None:
    stores = {"m1": state(), "m2": state(2, "x", "deleted", True)}
    report = compare(stores, dict(stores))
    assert report.ok
    assert (report.lancedb_memories, report.redis_memories, report.consistent) == (2, 2, 2)
    assert (report.live_memories, report.tombstones) == (1, 1)
    assert report.examples == {}
    assert report.to_dict() == {
        "consistent": True,
        "lancedb_memories": 2,
        "redis_memories": 2,
        "live_memories": 1,
        "tombstones": 1,
        "matching": 2,
        "missing_in_redis": 0,
        "missing_in_lancedb": 0,
        "version_mismatch": 0,
        "content_mismatch": 0,
        "examples": {},
    }


def test_empty_stores_are_consistent() -> None:
    assert compare({}, {}).ok


def test_each_kind_of_difference_is_counted_with_an_example() -> None:
    lancedb = {
        "same": state(),
        "only-lancedb": state(),
        "newer-in-lancedb": state(2),
        "tie-other-event": state(1, "b"),
        "other-content": state(1, "e", "h1"),
        "deleted-only-in-redis": state(),
    }
    redis = {
        "same": state(),
        "only-redis": state(),
        "newer-in-lancedb": state(1),
        "tie-other-event": state(1, "a"),
        "other-content": state(1, "e", "h2"),
        "deleted-only-in-redis": state(deleted=True),
    }
    report = compare(lancedb, redis)
    assert not report.ok
    assert report.consistent == 1
    assert (report.missing_in_redis, report.missing_in_lancedb) == (1, 1)
    assert (report.version_mismatch, report.content_mismatch) == (2, 2)
    assert report.examples == {
        "missing_in_redis": ["only-lancedb"],
        "missing_in_lancedb": ["only-redis"],
        "version_mismatch": ["newer-in-lancedb", "tie-other-event"],
        "content_mismatch": ["other-content", "deleted-only-in-redis"],
    }
    assert report.to_dict()["consistent"] is False


def test_examples_are_capped() -> None:
    lancedb = {f"m{i}": state() for i in range(20)}
    report = compare(lancedb, {})
    assert report.missing_in_redis == 20
    assert len(report.examples["missing_in_redis"]) == MAX_EXAMPLES


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([f"m{i}" for i in range(8)]),
        st.builds(state, st.integers(0, 2), st.sampled_from("ab"), st.sampled_from(["h", "k"]), st.booleans()),
    ),
    st.dictionaries(
        st.sampled_from([f"m{i}" for i in range(8)]),
        st.builds(state, st.integers(0, 2), st.sampled_from("ab"), st.sampled_from(["h", "k"]), st.booleans()),
    ),
)
def test_every_memory_is_counted_once(lancedb: dict[str, StoreState], redis: dict[str, StoreState]) -> None:
    report = compare(lancedb, redis)
    in_lancedb = report.consistent + report.missing_in_redis + report.version_mismatch + report.content_mismatch
    assert in_lancedb == len(lancedb) == report.live_memories + report.tombstones
    assert report.missing_in_lancedb == len(redis.keys() - lancedb.keys())
    assert report.ok == (lancedb == redis)
