"""The fresh-tail merge: LanceDB's hits and the not-yet-indexed memories, newest version per memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from processors.fresh_tail import (
    merge_hits,
    merge_rows,
    newest_tail,
    page_of,
    text_hits,
    vector_hits,
    without_superseded,
)
from processors.model import Hit, MemoryRow, ScopeQuery
from schemas.events import Scope
from tests.unit.processors.fakes import fake_vector

SCOPE = Scope("t1", "u1")


def row(memory_id: str, version: int, text: str | None = None, *, deleted: bool = False) -> MemoryRow:
    body = text or f"{memory_id} v{version}"
    vector = b"" if deleted else fake_vector(body).tobytes()
    return MemoryRow(memory_id, SCOPE, body, {}, version, f"e{version}", "h", deleted, 1_000 + version, vector)


def cosine(row: MemoryRow, query: np.ndarray) -> float:
    """Cosine similarity in plain float64 arithmetic: an oracle that shares no code with the module under test."""
    a = np.frombuffer(row.vector, dtype="<f4").tolist()
    b = np.asarray(query, dtype=np.float32).tolist()
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b)))


def exact_top_k(rows: list[MemoryRow], query: np.ndarray, k: int) -> list[Hit]:
    """The best ``k`` live rows by exact cosine, ties by key: what LanceDB's flat search returns, and the oracle."""
    scored = [Hit(r, cosine(r, query)) for r in rows if not r.deleted]
    return sorted(scored, key=lambda h: (-h.score, h.row.key))[:k]


def lance_search(rows: list[MemoryRow], query: np.ndarray, k: int) -> list[Hit]:
    return exact_top_k(rows, query, k)


def test_a_fresh_memory_is_found_and_outranks_by_score_only() -> None:
    query = fake_vector("needle")
    indexed = [row("a", 1), row("b", 1)]
    tail = newest_tail([row("c", 1, "needle")])
    hits = merge_hits(lance_search(indexed, query, 3 + len(tail)), tail, vector_hits(tail.values(), query, 3), 3)
    assert hits[0].row.memory_id == "c" and abs(hits[0].score - 1.0) < 1e-5
    assert {h.row.memory_id for h in hits} == {"a", "b", "c"}


def test_a_tombstone_in_the_tail_hides_the_older_indexed_row() -> None:
    query = fake_vector("a v1")
    indexed = [row("a", 1), row("b", 1)]
    tail = newest_tail([row("a", 2, deleted=True)])
    hits = merge_hits(lance_search(indexed, query, 2 + len(tail)), tail, vector_hits(tail.values(), query, 2), 2)
    assert [h.row.memory_id for h in hits] == ["b"]
    assert [r.memory_id for r in merge_rows(indexed, tail)] == ["b"]


def test_a_newer_tail_version_replaces_the_indexed_one() -> None:
    query = fake_vector("a v2")
    indexed = [row("a", 1)]
    tail = newest_tail([row("a", 2)])
    hits = merge_hits(lance_search(indexed, query, 3), tail, vector_hits(tail.values(), query, 2), 2)
    assert [(h.row.memory_id, h.row.version) for h in hits] == [("a", 2)]
    assert [(r.memory_id, r.version) for r in merge_rows(indexed, tail)] == [("a", 2)]


def test_an_older_tail_entry_not_yet_cleared_loses_to_the_indexed_row() -> None:
    indexed_hits = [Hit(row("a", 3), 0.5)]
    tail = newest_tail([row("a", 2)])
    assert without_superseded(indexed_hits, tail) == indexed_hits
    merged = merge_hits(indexed_hits, tail, vector_hits(tail.values(), fake_vector("x"), 5), 5)
    assert [(h.row.memory_id, h.row.version) for h in merged] == [("a", 3)]


def test_text_hits_rank_by_the_share_of_query_words() -> None:
    tail = [row("a", 1, "the red fox"), row("b", 1, "red"), row("c", 1, "blue whale"), row("d", 1, deleted=True)]
    hits = text_hits(tail, "Red fox", 10)
    assert [(h.row.memory_id, h.score) for h in hits] == [("a", 1.0), ("b", 0.5)]
    assert text_hits(tail, "   ", 10) == []


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([f"m{i}" for i in range(12)]),
        st.tuples(
            st.integers(0, 3),  # version LanceDB holds (0: none, the memory is only in the fresh tail)
            st.integers(0, 2),  # versions newer in the tail (0: no tail entry)
            st.booleans(),  # the newest version is a tombstone
        ).filter(lambda t: t[0] + t[1] > 0),  # a memory is in one store at least
        min_size=1,
    ),
    st.integers(1, 8),
    st.integers(0, 11),
)
@example({"m3": (0, 2, False), "m1": (1, 0, False)}, 1, 3)  # only in the tail, and the best hit
@example({"m3": (0, 1, True), "m1": (2, 1, True), "m2": (1, 0, False)}, 3, 3)  # tail-only and newer tombstones
def test_the_merge_equals_a_search_over_the_newest_version_of_every_memory(
    memories: dict[str, tuple[int, int, bool]], k: int, probe: int
) -> None:
    """Whatever the split between LanceDB and the tail (either alone, or both with the tail ahead), the merged
    top-k is the top-k of the newest versions, scored by an oracle independent of processors.fresh_tail."""
    query = fake_vector(f"m{probe} v2")
    indexed: list[MemoryRow] = []
    tail_rows: list[MemoryRow] = []
    newest: list[MemoryRow] = []
    for memory_id, (held, ahead, deleted) in memories.items():
        last = row(memory_id, held + ahead, deleted=deleted)
        if held:
            indexed.append(row(memory_id, held) if ahead else last)
        if ahead:
            tail_rows.append(last)
        newest.append(last)
    tail = newest_tail(tail_rows)
    merged = merge_hits(lance_search(indexed, query, k + len(tail)), tail, vector_hits(tail.values(), query, k), k)
    expected = exact_top_k(newest, query, k)
    assert [(h.row.key, h.row.version) for h in merged] == [(h.row.key, h.row.version) for h in expected]
    assert [h.score for h in merged] == pytest.approx([h.score for h in expected], abs=1e-5)
    live = {(r.key, r.version) for r in newest if not r.deleted}
    assert {(r.key, r.version) for r in merge_rows([r for r in indexed if not r.deleted], tail)} == live


# ------------------------------------------------------------------------------------------------ listing


def scoped(memory_id: str, version: int, agent: str | None = None, *, deleted: bool = False) -> MemoryRow:
    base = row(memory_id, version, deleted=deleted)
    return MemoryRow(
        memory_id, Scope("t1", "u1", agent), base.text, {}, version, f"e{version}", "h", deleted, 1_000 + version
    )


USER = ScopeQuery("t1", "u1")


def test_a_page_merges_the_tail_newest_first_and_tombstones_hide() -> None:
    indexed = [scoped("a", 1), scoped("b", 1), scoped("c", 1)]
    tail = newest_tail([scoped("b", 2, deleted=True), scoped("c", 2), scoped("d", 1)])
    page = page_of(indexed, tail, USER, None, 10, complete=True)
    assert page is not None
    rows, cursor = page
    assert [(r.memory_id, r.version) for r in rows] == [("a", 1), ("c", 2), ("d", 1)]
    assert cursor is None


def test_a_memory_whose_newest_version_moved_to_another_agent_leaves_that_agents_page() -> None:
    indexed = [scoped("a", 1, "chef"), scoped("b", 1, "chef")]
    tail = newest_tail([scoped("a", 2, "coach")])
    page = page_of(indexed, tail, ScopeQuery("t1", "u1", "chef"), None, 10, complete=True)
    assert page is not None and [r.memory_id for r in page[0]] == ["b"]


def test_cursor_pages_cover_the_scope_once_in_id_order() -> None:
    indexed = [scoped(f"m{i:02d}", 1) for i in range(0, 20, 2)]
    tail = newest_tail([scoped(f"m{i:02d}", 1) for i in range(1, 20, 2)] + [scoped("m04", 2, deleted=True)])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        after = [r for r in indexed if cursor is None or r.memory_id > cursor]
        page = page_of(after, tail, USER, cursor, 3, complete=True)
        assert page is not None
        seen += [r.memory_id for r in page[0]]
        cursor = page[1]
        if cursor is None:
            break
    assert seen == sorted(f"m{i:02d}" for i in range(20) if i != 4)


def test_a_page_past_what_lancedb_returned_is_not_guessed() -> None:
    """LanceDB's first rows only (not complete): a tail that hides them all leaves nothing placeable."""
    indexed = [scoped("a", 1), scoped("b", 1)]
    tail = newest_tail([scoped("a", 2, deleted=True), scoped("b", 2, deleted=True), scoped("z", 1)])
    assert page_of(indexed, tail, USER, None, 2, complete=False) is None
    page = page_of([*indexed, scoped("c", 1), scoped("d", 1)], tail, USER, None, 1, complete=False)
    assert page is not None and ([r.memory_id for r in page[0]], page[1]) == (["c"], "c")


def test_an_expired_tail_row_reads_as_a_tombstone_and_hides_the_older_indexed_version() -> None:
    import dataclasses

    from processors.fresh_tail import merge_rows, newest_tail
    from processors.model import MemoryRow
    from schemas.events import Scope

    older = MemoryRow("m", Scope("t", "u"), "old", {}, 1, "e1", "h1", False, 1_000)
    fresh = dataclasses.replace(older, text="new", version=2, event_id="e2", expires_at=5_000, vector=b"\0" * 8)
    before = newest_tail([fresh], now_ms=4_999)
    assert not before["t/m"].deleted and [r.text for r in merge_rows([older], before)] == ["new"]
    after = newest_tail([fresh], now_ms=5_000)
    assert after["t/m"].deleted and after["t/m"].vector == b""
    assert merge_rows([older], after) == []  # not the older version LanceDB still holds either
    assert not newest_tail([fresh])["t/m"].deleted  # without a time: as stored
