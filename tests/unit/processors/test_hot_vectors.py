"""The hot copy of a user's vectors: its top-k equals an independent exact top-k over the user's newest live rows."""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.hot_vectors import (
    KEY_OVERHEAD_BYTES,
    NEVER,
    TEXT_OVERHEAD_BYTES,
    HotVectors,
    ScopeColumns,
    VectorMatrix,
    WarmTrigger,
)
from processors.model import MemoryRow
from schemas.events import Scope

RNG = np.random.default_rng(7)
POOL = RNG.normal(size=(6, 16)).astype(np.float32)  # row vectors: a shared pool, so identical vectors tie exactly
QUERIES = RNG.normal(size=(3, 16)).astype(np.float32)
AGENTS = (None, "a1", "a2")
RUNS = (None, "r1")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Plain float64 arithmetic: an oracle that shares no code with the module under test."""
    x, y = a.astype(np.float64).tolist(), b.astype(np.float64).tolist()
    dot = math.fsum(p * q for p, q in zip(x, y, strict=True))
    return dot / (math.sqrt(math.fsum(p * p for p in x)) * math.sqrt(math.fsum(q * q for q in y)))


# distinct pool vectors score far apart against every query, so float32 rounding cannot reorder them: the only
# ties are exact ones (the same vector), which must be broken by memory key
for _q in QUERIES:
    for _a, _b in combinations(POOL, 2):
        assert abs(cosine(_a, _q) - cosine(_b, _q)) > 1e-3


def memory(memory_id: str, version: int, agent: str | None, run: str | None, vec: int, deleted: bool) -> MemoryRow:
    vector = b"" if deleted else POOL[vec].tobytes()
    scope = Scope("t1", "u1", agent, run)
    return MemoryRow(
        memory_id,
        scope,
        f"{memory_id} v{version}",
        {"n": vec},
        version,
        f"e{version}",
        "h",
        deleted,
        1_000 + version,
        vector,
    )


versions = st.tuples(
    st.integers(1, 4), st.sampled_from(AGENTS), st.sampled_from(RUNS), st.integers(0, len(POOL) - 1), st.booleans()
)
users = st.dictionaries(
    st.sampled_from([f"m{i}" for i in range(10)]), st.tuples(st.none() | versions, st.none() | versions), max_size=10
)


def stores(user: dict[str, tuple[tuple | None, tuple | None]]) -> tuple[list[MemoryRow], dict[str, MemoryRow]]:
    """LanceDB's live rows (its scan skips tombstones) and the fresh tail; a tail entry is never older than a
    LanceDB tombstone (Redis takes every change before LanceDB does), and the same version is the same row."""
    indexed: list[MemoryRow] = []
    tail: dict[str, MemoryRow] = {}
    for memory_id, (lance, fresh) in user.items():
        if lance is not None:
            row = memory(memory_id, *lance)
            if fresh is not None and fresh[0] == lance[0]:
                fresh = lance
            if fresh is not None and row.deleted and fresh[0] < lance[0]:
                fresh = None
            if not row.deleted:
                indexed.append(row)
        if fresh is not None:
            row = memory(memory_id, *fresh)
            tail[row.key] = row
    return indexed, tail


def oracle(user: dict, agent: str | None, run: str | None, query: np.ndarray, k: int) -> list[tuple[str, float]]:
    indexed, tail = stores(user)
    newest: dict[str, MemoryRow] = {}
    for row in [*indexed, *tail.values()]:
        if row.key not in newest or (row.version, row.event_id) > (newest[row.key].version, newest[row.key].event_id):
            newest[row.key] = row
    live = [
        r
        for r in newest.values()
        if not r.deleted and (agent is None or r.scope.agent_id == agent) and (run is None or r.scope.run_id == run)
    ]
    scored = sorted((-cosine(np.frombuffer(r.vector, "<f4"), query), r.key) for r in live)
    return [(key, -score) for score, key in scored[:k]]


@settings(max_examples=300, deadline=None)
@given(
    users,
    st.sampled_from(AGENTS),
    st.sampled_from(RUNS),
    st.integers(0, len(QUERIES) - 1),
    st.integers(1, 12),
    st.booleans(),
)
def test_top_k_equals_the_exact_top_k_of_the_newest_live_rows(user, agent, run, q, k, scaled):
    query = QUERIES[q] * (3.5 if scaled else 1.0)  # cosine: the query's length changes nothing
    indexed, tail = stores(user)
    hits = VectorMatrix.build(indexed, tail).search(query, k, agent, run)
    want = oracle(user, agent, run, query, k)
    assert [h.row.key for h in hits] == [key for key, _ in want]
    for hit, (_, score) in zip(hits, want, strict=True):
        assert abs(hit.score - score) < 1e-5
        assert hit.row.vector == b""  # hits never carry vectors


@settings(max_examples=200, deadline=None)
@given(users, st.integers(0, len(QUERIES) - 1), st.integers(1, 12), st.integers(0, len(POOL) - 1))
def test_filters_keep_the_exact_top_k_of_the_rows_they_keep(user, q, k, vec):
    keep = lambda row: row.metadata["n"] != vec  # noqa: E731
    indexed, tail = stores(user)
    hits = VectorMatrix.build(indexed, tail).search(QUERIES[q], k, keep=keep)
    unfiltered = VectorMatrix.build(indexed, tail).search(QUERIES[q], 1_000)
    assert [h.row.key for h in hits] == [h.row.key for h in unfiltered if keep(h.row)][:k]
    assert all(keep(h.row) for h in hits)


def test_an_agent_the_user_has_no_memory_under_finds_nothing():
    matrix = VectorMatrix.build([memory("m1", 1, "a1", None, 0, False)], {})
    assert matrix.search(QUERIES[0], 5, agent_id="a9") == []
    assert [h.row.memory_id for h in matrix.search(QUERIES[0], 5, agent_id="a1")] == ["m1"]


def test_a_moved_memory_is_found_under_its_new_agent_only():
    old = memory("m1", 1, "a1", None, 0, False)
    moved = memory("m1", 2, "a2", None, 0, False)
    matrix = VectorMatrix.build([old], {moved.key: moved})
    assert matrix.search(QUERIES[0], 5, agent_id="a1") == []
    assert [h.row.version for h in matrix.search(QUERIES[0], 5, agent_id="a2")] == [2]


def test_a_copy_that_left_a_live_memory_out_for_want_of_a_vector_says_it_is_incomplete():
    """A context block lists every live memory: it is built from a copy only when the copy holds them all."""
    held = memory("m1", 1, "a1", None, 0, False)
    assert VectorMatrix.build([held], {}).complete
    without_vector = dataclasses.replace(memory("m2", 1, "a1", None, 1, False), vector=b"")
    incomplete = VectorMatrix.build([held, without_vector], {})
    assert not incomplete.complete and len(incomplete) == 1
    tombstone = memory("m3", 2, "a1", None, 0, True)  # a deleted memory is not live: nothing left out
    assert VectorMatrix.build([held], {tombstone.key: tombstone}).complete


def test_the_cache_misses_on_another_generation_and_stays_within_its_bytes():
    one = VectorMatrix.build([memory("m1", 1, None, None, 0, False)], {})
    cache = HotVectors(budget_bytes=one.nbytes * 2)
    cache.put("t1|u1", b"5", one)
    assert cache.get("t1|u1", b"5") is one
    assert cache.get("t1|u1", b"6") is None  # a write moved the generation: rebuilt, never served stale
    assert cache.get("t1|u1", b"5") is None  # and the stale copy is gone
    for user in ("u1", "u2", "u3"):
        cache.put(f"t1|{user}", b"1", one)
    assert len(cache) == 2 and cache.held_bytes <= cache.budget_bytes
    assert cache.get("t1|u1", b"1") is None  # the least recently used went first
    HotVectors(0).put("t1|u1", b"1", one)
    assert not HotVectors(0).enabled


def test_a_warm_is_due_after_many_builds_in_a_short_time_and_not_again_soon():
    now = [0.0]
    trigger = WarmTrigger(builds=3, window_s=2.0, every_s=30.0, clock=lambda: now[0])
    seen = []
    for t in (0.0, 1.0, 3.5, 4.0, 4.5):  # the first two fall out of the window before the third
        now[0] = t
        seen.append(trigger.note_build())
    assert seen == [False, False, False, False, True]
    now[0] = 10.0
    assert [trigger.note_build() for _ in range(5)] == [False] * 5  # within every_s of the last warm
    now[0] = 35.0
    assert [trigger.note_build() for _ in range(3)] == [False, False, True]


def test_a_warm_put_off_is_due_again_after_the_delay():
    now = [0.0]
    trigger = WarmTrigger(builds=2, window_s=5.0, every_s=30.0, clock=lambda: now[0])
    assert [trigger.note_build(), trigger.note_build()] == [False, True]
    trigger.put_off(2.0)  # the warm found the index sink far behind
    now[0] = 1.0
    assert [trigger.note_build(), trigger.note_build()] == [False, False]
    now[0] = 2.5
    assert trigger.note_build() is True  # the builds at 1.0 are still within the window


def columns_of(rows: list[MemoryRow], scan_order: list[int]) -> ScopeColumns:
    """What infra/lance_store.py users_columns makes of a scan that returned ``rows`` in ``scan_order``: an
    independent construction (plain Python sorting and coding), vectors left in the scan's order."""
    scanned = [rows[i] for i in scan_order]
    order = sorted(range(len(scanned)), key=lambda i: (scanned[i].scope.user_id, scanned[i].key))
    users = sorted({r.scope.user_id for r in rows})
    agents = {a: n for n, a in enumerate(dict.fromkeys(r.scope.agent_id for r in rows))}
    runs = {a: n for n, a in enumerate(dict.fromkeys(r.scope.run_id for r in rows))}
    ordered = [scanned[i] for i in order]
    return ScopeColumns(
        user_codes=np.array([users.index(r.scope.user_id) for r in ordered], dtype=np.int32),
        user_names=users,
        keys=np.array([r.key for r in ordered], dtype=object),
        versions=np.array([r.version for r in ordered], dtype=np.int64),
        event_ids=np.array([r.event_id for r in ordered], dtype=object),
        expires=np.array([NEVER if r.expires_at is None else r.expires_at for r in ordered], dtype=np.int64),
        agents=np.array([agents[r.scope.agent_id] for r in ordered], dtype=np.int32),
        runs=np.array([runs[r.scope.run_id] for r in ordered], dtype=np.int32),
        agent_codes=agents,
        run_codes=runs,
        vectors=np.array([np.frombuffer(r.vector, "<f4") for r in scanned], dtype=np.float32),
        positions=np.array(order, dtype=np.intp),
        texts=pa.array([r.text for r in ordered], pa.string()),  # as infra.lance_store's scan gives them
        text_bytes=np.cumsum([0, *(len(r.text.encode()) for r in ordered)], dtype=np.int64),
    )


@given(
    st.dictionaries(
        st.tuples(st.sampled_from(["u1", "u2", "u3"]), st.sampled_from([f"m{i}" for i in range(8)])),
        st.tuples(st.sampled_from(AGENTS), st.sampled_from(RUNS), st.integers(0, len(POOL) - 1)),
        min_size=1,  # a warm builds a copy only for a user it scanned rows of
        max_size=20,
    ),
    st.randoms(use_true_random=False),
    st.integers(0, len(QUERIES) - 1),
    st.integers(1, 12),
    st.booleans(),
)
@settings(max_examples=80, deadline=None)
def test_the_warms_column_path_ranks_what_the_row_path_ranks(live, rnd, q, k, unit):
    """A warm builds every user's copy from one scan's columns (VectorMatrix.from_columns), holding no rows; each
    copy must rank every sub-scope as the copy built row by row from the same user's rows does, whatever order
    the scan returned the rows in, and whether the scan's vectors were normalized whole beforehand (in the
    background thread, ``unit``) or are normalized user by user."""
    rows = [
        dataclasses.replace(memory(m, 1, agent, run, vec, False), scope=Scope("t1", user, agent, run))
        for (user, m), (agent, run, vec) in live.items()
    ]
    scan_order = list(range(len(rows)))
    rnd.shuffle(scan_order)
    columns = columns_of(rows, scan_order)
    if unit:
        columns = columns.normalized()
        assert columns.unit and np.allclose(np.linalg.norm(columns.vectors, axis=1)[np.any(columns.vectors, 1)], 1)
    spans = columns.user_spans()
    assert sorted(user for user, *_ in spans) == sorted({r.scope.user_id for r in rows})
    for user, start, end, repeated in spans:
        assert not repeated
        fast = VectorMatrix.from_columns(columns, start, end)
        slow = VectorMatrix.build([r for r in rows if r.scope.user_id == user], {})
        assert fast.rows is None and list(fast.keys) == list(slow.keys)
        assert np.array_equal(fast.matrix, slow.matrix)
        assert isinstance(fast.texts, pa.Array) and fast.texts.to_pylist() == list(slow.texts or [])  # not copied
        held = sum(TEXT_OVERHEAD_BYTES + len(str(t).encode()) for t in slow.texts or [])
        assert fast.nbytes == fast.matrix.nbytes + len(fast) * KEY_OVERHEAD_BYTES + held  # the strings to come
        cache = HotVectors(1 << 30)
        cache.put(user, b"g", fast)
        from_arrow, from_rows = cache.keywords(user, fast), HotVectors(1 << 30).keywords(user, slow)
        assert from_arrow is not None and from_rows is not None
        words = f"{slow.texts[0] if slow.texts else ''} m1 m3"
        assert np.array_equal(from_arrow.scores(words), from_rows.scores(words)) and from_rows.scores(words).any()
        for agent in AGENTS:
            for run in RUNS:
                got = [(fast.keys[i], fast.order(i), score) for i, score in fast.top(QUERIES[q], k, agent, run)]
                want = [(h.row.key, h.row.order(), h.score) for h in slow.search(QUERIES[q], k, agent, run)]
                assert got == want


def test_a_user_whose_scan_repeats_a_key_is_left_to_the_general_merge() -> None:
    """LanceDB may hold a key twice (lancedb#3377): the columnar copy cannot pick the newest, the merge can."""
    rows = [
        memory("m1", 1, None, None, 0, False),
        memory("m1", 2, None, None, 1, False),
        dataclasses.replace(memory("m1", 1, None, None, 2, False), scope=Scope("t1", "u2")),
        dataclasses.replace(memory("m2", 1, None, None, 2, False), scope=Scope("t1", "u3")),
    ]
    spans = {user: repeated for user, _, _, repeated in columns_of(rows, [3, 1, 2, 0]).user_spans()}
    assert spans == {"u1": True, "u2": False, "u3": False}


def test_a_columnar_copy_leaves_out_what_expired_since_it_was_built() -> None:
    rows = [
        dataclasses.replace(memory(m, 1, None, None, 0, False), expires_at=e) for m, e in (("a", 9_000), ("b", None))
    ]
    matrix = VectorMatrix.from_columns(columns_of(rows, [0, 1]), 0, 2)
    assert [matrix.keys[i] for i, _ in matrix.top(QUERIES[0], 10, now_ms=8_999)] == ["t1/a", "t1/b"]
    assert [matrix.keys[i] for i, _ in matrix.top(QUERIES[0], 10, now_ms=9_000)] == ["t1/b"]


def test_hits_keep_their_times_so_a_search_can_leave_out_what_expired_since_the_build() -> None:
    vector = np.ones(4, dtype="<f4").tobytes()
    rows = [
        MemoryRow("a", Scope("t", "u"), "a", {}, 1, "e", "h", False, 1_000, vector, created_at=500, expires_at=9_000),
        MemoryRow("b", Scope("t", "u"), "b", {}, 1, "e", "h", False, 1_000, vector),
    ]
    matrix = VectorMatrix.build(rows, {})
    hits = matrix.search(np.ones(4, dtype=np.float32), 10)
    assert {(h.row.memory_id, h.row.created_at, h.row.expires_at) for h in hits} == {
        ("a", 500, 9_000),
        ("b", None, None),
    }
    later = matrix.search(np.ones(4, dtype=np.float32), 10, keep=lambda r: not r.expired(9_000))
    assert [h.row.memory_id for h in later] == ["b"]
