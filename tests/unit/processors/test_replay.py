"""The log replayer against in-memory fakes: what it applies, what it skips, what it never republishes."""

from __future__ import annotations

import numpy as np
import pytest

from processors.embedding import CachedEmbedder
from processors.hashing import event_content_hash
from processors.model import InRecord, ScopeQuery
from processors.pipeline import CHANGES_ALL, CHANGES_APPLIED, CHANGES_NONE, Materializer, RetryPolicy
from processors.replay import SOURCE_EMBEDDED, SOURCE_EVENTS, LogReplayer, ReplayFilter
from schemas.events import EmbeddedEvent, MemoryEvent, Op, Scope, SourceRef, decode_change, encode
from tests.unit.processors.fakes import (
    DIM,
    TOPICS,
    Rig,
    fake_vector,
)
from tests.unit.processors.test_pipeline import event


class ReplayRig(Rig):
    """The shared processor rig, with a log replayer over its stores."""

    def __init__(self, changes: str = CHANGES_APPLIED, source: str = SOURCE_EMBEDDED, only: ReplayFilter | None = None):
        super().__init__(RetryPolicy(first_delay_s=0.001, max_delay_s=0.001), changes=changes)
        self.replayer = LogReplayer(
            self.materializer, CachedEmbedder(self.embedder, None), source=source, only=only or ReplayFilter()
        )


def embedded(e: MemoryEvent, *, model: str = "fake", dim: int = DIM) -> EmbeddedEvent:
    vector = b"" if e.op is Op.DELETE else fake_vector(e.text or "", dim).tobytes()
    origin = SourceRef(TOPICS.events, 0, e.version)
    return EmbeddedEvent(e, model, dim, vector, event_content_hash(e), origin)


def rec(value: bytes, offset: int, *, partition: int = 0, ts: int = 0, topic: str = TOPICS.embedded) -> InRecord:
    return InRecord(topic, partition, offset, b"k", value, ts)


async def test_embedded_records_are_applied_without_embedding_and_announced_once() -> None:
    rig = ReplayRig()
    window = [rec(encode(embedded(event(f"m{i}", 1))), i) for i in range(3)]
    first = await rig.replayer.apply(window)
    assert (first.applied, first.current) == (3, 0)
    assert rig.embedder.calls == []  # the vectors came from the log
    assert np.array_equal(
        np.frombuffer(rig.vectors.rows["default/m1"].vector, dtype="<f4"), fake_vector("m1 at 1")
    )  # stored as logged
    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert [c.memory_id for c in changes] == ["m0", "m1", "m2"]
    assert changes[0].source == SourceRef(TOPICS.events, 0, 1)  # the original events record, not the replay's

    again = await rig.replayer.apply(window)  # replaying over the same data: nothing changes, nothing announced
    assert (again.applied, again.current) == (0, 3)
    assert len(rig.publisher.values(TOPICS.changes)) == 3
    assert rig.publisher.values(TOPICS.embedded) == [] and rig.publisher.values(TOPICS.dlq) == []
    report = rig.replayer.report.to_dict()
    assert (report["records"], report["replayed"], report["applied"], report["current"]) == (6, 6, 3, 3)
    assert report["positions"] == {"0": 3}


async def test_an_older_replayed_event_leaves_the_newer_memory_alone() -> None:
    rig = ReplayRig()
    await rig.replayer.apply([rec(encode(embedded(event("m1", 9))), 0)])
    older = await rig.replayer.apply([rec(encode(embedded(event("m1", 3))), 1)])
    assert (older.applied, older.stale) == (0, 1)
    assert rig.vectors.rows["default/m1"].version == rig.cache.rows["default/m1"].version == 9


async def test_events_of_another_model_are_re_embedded_from_their_text() -> None:
    rig = ReplayRig()
    old = embedded(event("m1", 1, text="alice likes tea"), model="old-model", dim=4)
    gone = embedded(event("m2", 2, op=Op.DELETE), model="old-model", dim=4)
    await rig.replayer.apply([rec(encode(old), 0), rec(encode(gone), 1)])
    assert rig.embedder.calls == [["alice likes tea"]]  # the delete needs no vector
    assert rig.vectors.rows["default/m1"].vector == fake_vector("alice likes tea").tobytes()
    assert rig.vectors.rows["default/m2"].deleted
    assert rig.replayer.report.reembedded == 1


async def test_raw_events_are_embedded_and_nothing_is_republished() -> None:
    rig = ReplayRig(source=SOURCE_EVENTS, changes=CHANGES_NONE)
    window = [rec(encode(event("m1", 1)), 5, topic=TOPICS.events), rec(b"{broken", 6, topic=TOPICS.events)]
    report = await rig.replayer.apply(window)
    assert report.applied == 1 and rig.embedder.calls == [["m1 at 1"]]
    assert rig.replayer.report.invalid == 1  # counted and logged; the live worker dead-lettered it already
    assert rig.publisher.sent == {}  # no embedded copy, no change event, no second dead letter


async def test_the_filter_keeps_the_time_window_the_end_offsets_and_the_scope() -> None:
    only = ReplayFilter(
        scope=ScopeQuery(user_id="u1"), from_ts=100, until_ts=200, until_offsets={0: 4}
    )  # partition 1 has no end offset
    rig = ReplayRig(only=only)
    mine, theirs = event("m1", 1), event("m2", 1, user_id="u2")
    window = [
        rec(encode(embedded(mine)), 0, ts=99),  # before the start
        rec(encode(embedded(mine)), 1, ts=100),  # in
        rec(encode(embedded(theirs)), 2, ts=150),  # another user
        rec(encode(embedded(mine)), 4, ts=150),  # at the end offset of partition 0
        rec(encode(embedded(mine)), 9, ts=150, partition=1),  # in
        rec(encode(embedded(mine)), 10, ts=200, partition=1),  # at the end time
    ]
    await rig.replayer.apply(window)
    report = rig.replayer.report
    assert (report.replayed, report.outside_range, report.outside_scope) == (2, 3, 1)
    assert set(rig.vectors.rows) == {"default/m1"}


@pytest.mark.parametrize(("mode", "announced"), [(CHANGES_ALL, 2), (CHANGES_APPLIED, 1), (CHANGES_NONE, 0)])
async def test_materializer_change_modes(mode: str, announced: int) -> None:
    rig = ReplayRig(changes=mode)
    await rig.replayer.apply([rec(encode(embedded(event("m1", 1))), 0)])
    await rig.replayer.apply([rec(encode(embedded(event("m1", 1))), 1)])  # the same event: current
    assert len(rig.publisher.values(TOPICS.changes)) == announced


def test_unknown_modes_and_sources_are_refused() -> None:
    rig = ReplayRig()
    with pytest.raises(ValueError, match="changes must be"):
        Materializer(rig.vectors, rig.cache, rig.publisher, TOPICS, model="fake", dim=DIM, changes="some")
    with pytest.raises(ValueError, match="source must be"):
        LogReplayer(rig.materializer, CachedEmbedder(rig.embedder, None), source="dlq")


def test_scope_in_the_filter_matches_the_event_scope() -> None:
    only = ReplayFilter(scope=ScopeQuery(tenant_id="t1"))
    assert only.admits_event(event("m1", 1)) is False
    assert only.admits_event(MemoryEvent("e", Op.ADD, "m1", 1, 1, Scope("t1", "u1"), text="x")) is True


def test_a_rebuild_gives_an_updated_memory_the_time_of_its_first_add() -> None:
    from processors.replay import LogFold

    def embedded(e: MemoryEvent) -> EmbeddedEvent:
        return EmbeddedEvent(e, "fake", 4, b"" if e.op is Op.DELETE else b"\0" * 16, "h")

    fold = LogFold()
    fold.add([embedded(event("m1", 1)), embedded(event("m2", 1))])
    fold.add([embedded(event("m1", 2, op=Op.UPDATE)), embedded(event("m3", 5, op=Op.UPDATE))])
    rows = {r.memory_id: r for r in fold.take()}
    assert rows["m1"].version == 2 and rows["m1"].created_at == event("m1", 1).ts  # the add's, not the update's
    assert rows["m2"].created_at == event("m2", 1).ts
    assert rows["m3"].created_at is None  # its add is not in the log: the store takes its updated_at


def test_a_builds_hot_copy_stream_sends_each_winner_that_changed_and_ends_on_the_folds_rows() -> None:
    """What a build streams to Redis while it reads (take_unsent) is every winner that changed since the last
    send, so that the last row sent for each memory is the one LanceDB is given (take)."""
    from processors.replay import LogFold

    def embedded(e: MemoryEvent) -> EmbeddedEvent:
        return EmbeddedEvent(e, "fake", 4, b"" if e.op is Op.DELETE else b"\0" * 16, "h")

    fold = LogFold()
    fold.add([embedded(event("m1", 1)), embedded(event("m2", 1))])
    first = {r.memory_id: r.version for r in fold.take_unsent()}
    assert first == {"m1": 1, "m2": 1}
    assert fold.take_unsent() == []  # nothing changed since
    fold.add([embedded(event("m1", 3, op=Op.UPDATE)), embedded(event("m1", 2, op=Op.UPDATE))])  # 2 is stale
    again = fold.take_unsent()
    assert [(r.memory_id, r.version) for r in again] == [("m1", 3)]
    assert again[0].created_at == event("m1", 1).ts  # an update carries its add's time, as take gives it
    final = {r.memory_id: r for r in fold.take()}
    assert {m: r.version for m, r in final.items()} == {"m1": 3, "m2": 1}
    assert final["m1"] is again[0]  # one row per winner, made once for both stores


def test_a_row_sent_before_its_memorys_add_was_read_is_made_again_with_the_adds_time() -> None:
    from processors.replay import LogFold

    def embedded(e: MemoryEvent) -> EmbeddedEvent:
        return EmbeddedEvent(e, "fake", 4, b"\0" * 16, "h")

    fold = LogFold()
    fold.add([embedded(event("m1", 5, op=Op.UPDATE))])
    assert fold.take_unsent()[0].created_at is None
    fold.add([embedded(event("m1", 1))])  # the add, out of order: stale, but its time is the memory's
    assert [r.created_at for r in fold.take()] == [event("m1", 1).ts]
