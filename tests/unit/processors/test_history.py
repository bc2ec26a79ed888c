"""A memory's history: the fold of its kept versions into entries, and the index sink keeping every version."""

from __future__ import annotations

from collections.abc import Sequence

from processors.history import history_entries
from processors.indexing import IndexProcessor
from processors.model import HistoryRow, MemoryRow
from processors.pipeline import RetryPolicy
from schemas.errors import StoreError
from schemas.events import Op, encode
from tests.unit.processors.fakes import DIM, TOPICS, FakeCacheStore, FakePublisher, FakeVectorStore
from tests.unit.processors.test_indexing import rec
from tests.unit.processors.test_pipeline import event
from tests.unit.processors.test_replay import embedded


def version(v: int, text: str | None, *, event_id: str = "e") -> HistoryRow:
    return HistoryRow(v, f"{event_id}{v}", text, text is None, 1_000 + v)


def test_add_update_update_delete_read_as_their_events_with_the_text_before() -> None:
    entries = history_entries([version(1, "a"), version(2, "b"), version(3, "c"), version(4, None)])
    assert [(e.event, e.memory, e.previous_memory) for e in entries] == [
        ("ADD", "a", None),
        ("UPDATE", "b", "a"),
        ("UPDATE", "c", "b"),
        ("DELETE", None, "c"),
    ]
    assert [e.version for e in entries] == [1, 2, 3, 4]


def test_a_live_version_after_a_delete_is_an_add_without_previous_memory() -> None:
    entries = history_entries([version(1, "a"), version(2, None), version(3, "again")])
    assert [(e.event, e.previous_memory) for e in entries] == [("ADD", None), ("DELETE", "a"), ("ADD", None)]


def test_versions_that_arrived_out_of_order_take_their_place_by_version_then_event_id() -> None:
    rows = [version(3, "c"), version(1, "a"), HistoryRow(2, "z", "b-late", False, 5), HistoryRow(2, "y", "b", False, 4)]
    entries = history_entries(rows)
    assert [(e.version, e.event_id, e.memory) for e in entries] == [
        (1, "e1", "a"),
        (2, "y", "b"),
        (2, "z", "b-late"),
        (3, "e3", "c"),
    ]
    assert [e.previous_memory for e in entries] == [None, "a", "b", "b-late"]


class FakeHistory:
    """Keeps versions by (memory key, event id), as the LanceDB table does; can fail a number of times."""

    def __init__(self, failures: int = 0) -> None:
        self.kept: dict[tuple[str, str], MemoryRow] = {}
        self.failures = failures

    async def record(self, rows: Sequence[MemoryRow]) -> int:
        if self.failures:
            self.failures -= 1
            raise StoreError("history down")
        new = {(r.key, r.event_id): r for r in rows if (r.key, r.event_id) not in self.kept}
        self.kept.update(new)
        return len(new)


def sink(history: FakeHistory, vectors: FakeVectorStore | None = None) -> IndexProcessor:
    async def no_sleep(_: float) -> None:
        return None

    return IndexProcessor(
        vectors or FakeVectorStore(),
        FakeCacheStore(),
        FakePublisher(),
        TOPICS,
        model="fake",
        dim=DIM,
        retry=RetryPolicy(first_delay_s=0.001, max_delay_s=0.004, max_attempts=0),
        sleep=no_sleep,
        history=history,
    )


async def test_the_sink_keeps_every_version_of_a_batch_not_only_the_winner_and_a_second_write_adds_nothing() -> None:
    history = FakeHistory()
    processor = sink(history)
    events = [event("m1", 1), event("m1", 2, op=Op.UPDATE), event("m1", 3, op=Op.DELETE), event("m2", 1)]
    records = [rec(encode(embedded(e)), i) for i, e in enumerate(events)]
    first = await processor.write(processor.prepare(records))
    assert sorted(history.kept) == [
        ("default/m1", "e-m1-1"),
        ("default/m1", "e-m1-2"),
        ("default/m1", "e-m1-3"),
        ("default/m2", "e-m2-1"),
    ]
    assert first.versions == 4 and first.rows == 2  # four versions kept, two memories' winners in LanceDB
    again = await processor.write(processor.prepare(records))  # a crash before the offset commit: written twice
    assert again.versions == 0 and len(history.kept) == 4


async def test_a_failing_history_write_is_retried_until_it_passes_and_the_batch_still_reaches_lancedb() -> None:
    history = FakeHistory(failures=2)
    vectors = FakeVectorStore()
    processor = sink(history, vectors)
    report = await processor.write(processor.prepare([rec(encode(embedded(event("m1", 1))), 0)]))
    assert report.versions == 1 and list(history.kept) == [("default/m1", "e-m1-1")]
    assert "default/m1" in vectors.rows
