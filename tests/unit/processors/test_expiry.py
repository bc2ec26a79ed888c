"""Expiry: which memories the sweep removes, the tombstones it writes, and how they go through the pipeline."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from processors.expiry import (
    REPUBLISH_AFTER_S,
    ExpirySweeper,
    expiry_event_id,
    expiry_tombstones,
    tombstone_for,
)
from processors.model import InRecord, MemoryRow
from schemas.events import EXPIRY_ACTOR, MemoryEvent, Op, Scope, decode_change, decode_event, encode
from tests.unit.processors.fakes import TOPICS, FakeCounters, FakePublisher, Rig

NOW = 1_700_000_000_000


def row(memory_id: str = "m1", *, version: int = 10, expires_at: int | None = None, deleted: bool = False) -> MemoryRow:
    return MemoryRow(
        memory_id=memory_id,
        scope=Scope("t1", "u1", "a1", None),
        text="" if deleted else f"{memory_id} text",
        metadata={},
        version=version,
        event_id=f"e-{memory_id}-{version}",
        content_hash="h",
        deleted=deleted,
        updated_at=NOW - 5_000,
        created_at=NOW - 9_000,
        expires_at=expires_at,
    )


# --------------------------------------------------------------------------------------------- the read filter


def test_a_row_is_hidden_from_its_expiry_on() -> None:
    r = row(expires_at=NOW)
    assert not r.expired(NOW - 1) and not r.hidden(NOW - 1)
    assert r.expired(NOW) and r.hidden(NOW)  # at the very millisecond: expires_at > now is what stays readable
    assert not row().expired(NOW * 2)  # no expiry: never
    assert row(deleted=True).hidden(0)  # a tombstone is hidden whatever its expiry


# --------------------------------------------------------------------------------------------- sweep selection


def test_only_live_expired_rows_get_tombstones() -> None:
    rows = [
        row("gone", expires_at=NOW - 1),
        row("now", expires_at=NOW),
        row("later", expires_at=NOW + 1),
        row("never"),
        row("tomb", expires_at=NOW - 1, deleted=True),
    ]
    assert [e.memory_id for e in expiry_tombstones(rows, NOW)] == ["gone", "now"]


def test_a_tombstone_beats_exactly_the_version_it_saw() -> None:
    seen = row(version=41, expires_at=NOW - 1)
    event = tombstone_for(seen, NOW)
    assert (event.op, event.version, event.ts, event.scope) == (Op.DELETE, 42, NOW, seen.scope)
    assert event.actor == EXPIRY_ACTOR and event.text is None and event.expires_at is None
    assert event.order() > seen.order()
    later_update = dataclasses.replace(seen, version=43, event_id="e-later")
    assert later_update.order() > event.order()  # any later event of the memory wins over it
    # valid on the wire, actor included
    assert decode_event(encode(event)) == event


def test_a_tombstone_id_depends_on_the_row_seen_only() -> None:
    seen = row(expires_at=NOW - 1)
    assert tombstone_for(seen, NOW).event_id == tombstone_for(seen, NOW + 60_000).event_id == expiry_event_id(seen)
    assert expiry_event_id(dataclasses.replace(seen, version=11)) != expiry_event_id(seen)
    other_tenant = dataclasses.replace(seen, scope=Scope("t2", "u1"))
    assert expiry_event_id(other_tenant) != expiry_event_id(seen)


class ListedRows:
    def __init__(self, rows: Sequence[MemoryRow]) -> None:
        self.rows = list(rows)
        self.asked: list[tuple[int, int]] = []

    async def expired(self, now_ms: int, limit: int) -> list[MemoryRow]:
        self.asked.append((now_ms, limit))
        return [r for r in self.rows if r.hidden(now_ms) and not r.deleted][:limit]

    async def any_expiring(self) -> bool:
        return any(r.expires_at is not None and not r.deleted for r in self.rows)


async def test_the_sweeper_publishes_each_tombstone_once_until_it_is_due_again() -> None:
    publisher, counters = FakePublisher(), FakeCounters()
    clock = [100.0]
    sweeper = ExpirySweeper(publisher, TOPICS, counters, limit=7, wall_ms=lambda: NOW, clock=lambda: clock[0])
    store = ListedRows([row("a", expires_at=NOW - 1), row("b", expires_at=NOW + 1), row("c", expires_at=NOW)])

    first = await sweeper.sweep(store)
    assert [e.memory_id for e in first] == ["a", "c"] and store.asked == [(NOW, 7)]
    sent = [(key, decode_event(value)) for key, value in publisher.sent[TOPICS.events]]
    assert [(key, e.memory_id, e.op, e.actor) for key, e in sent] == [
        (b"a", "a", Op.DELETE, EXPIRY_ACTOR),
        (b"c", "c", Op.DELETE, EXPIRY_ACTOR),
    ]
    assert counters.totals["expired"] == 2

    # the tombstones are not indexed yet, so the rows are found again: not published twice meanwhile
    assert await sweeper.sweep(store) == []
    assert len(publisher.sent[TOPICS.events]) == 2
    clock[0] += REPUBLISH_AFTER_S  # still not indexed a minute later (the sink was behind): published again
    again = await sweeper.sweep(store)
    assert [e.event_id for e in again] == [e.event_id for e in first]


async def test_a_table_without_expiries_is_not_scanned_until_the_sink_indexes_one() -> None:
    sweeper = ExpirySweeper(FakePublisher(), TOPICS, wall_ms=lambda: NOW)
    store = ListedRows([row("n")])
    assert await sweeper.sweep(store) == [] and await sweeper.sweep(store) == []
    assert store.asked == [] and sweeper.active is False  # asked once whether any exists; never scanned
    sweeper.note(False)
    assert sweeper.active is False
    store.rows.append(row("x", expires_at=NOW - 1))
    sweeper.note(True)  # the sink indexed a memory with an expiry
    assert [e.memory_id for e in await sweeper.sweep(store)] == ["x"] and store.asked == [(NOW, 1_000)]


async def test_nothing_expired_publishes_nothing() -> None:
    publisher = FakePublisher()
    sweeper = ExpirySweeper(publisher, TOPICS, wall_ms=lambda: NOW)
    assert await sweeper.sweep(ListedRows([row(expires_at=NOW + 1), row("n")])) == []
    assert TOPICS.events not in publisher.sent


# --------------------------------------------------------------------------------------------- through the pipeline


_offsets = iter(range(1_000_000))


def record(event: MemoryEvent) -> InRecord:
    return InRecord(TOPICS.events, 0, next(_offsets), event.key, encode(event))


def add_event(version: int, expires_at: int | None, op: Op = Op.ADD) -> MemoryEvent:
    return MemoryEvent(
        event_id=f"e{version}",
        op=op,
        memory_id="m1",
        version=version,
        ts=NOW - 1_000 + version,
        scope=Scope("t1", "u1"),
        text=f"text {version}",
        expires_at=expires_at,
    )


async def test_the_tombstone_removes_the_memory_and_the_change_feed_says_expired() -> None:
    rig = Rig()
    await rig.ingest.process([record(add_event(5, NOW - 1))])
    held = rig.cache.rows["t1/m1"]
    assert held.expires_at == NOW - 1 and held.created_at == NOW - 1_000 + 5

    [tombstone] = expiry_tombstones([held], NOW)
    report = await rig.ingest.process([record(tombstone)])

    assert rig.cache.rows["t1/m1"].deleted and rig.vectors.rows["t1/m1"].deleted
    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert [(c.op, c.actor) for c in changes] == [(Op.ADD, None), (Op.DELETE, EXPIRY_ACTOR)]
    assert report.applied == 1


async def test_an_update_that_extends_the_expiry_after_the_sweep_read_wins() -> None:
    """The sweep saw version 5 expired and wrote a tombstone of version 6; an update extending the expiry, stamped
    later (version 7), lands first: the tombstone is stale in both stores and announces nothing."""
    rig = Rig()
    await rig.ingest.process([record(add_event(5, NOW - 1))])
    [tombstone] = expiry_tombstones([rig.cache.rows["t1/m1"]], NOW)
    extended = add_event(7, NOW + 3_600_000, op=Op.UPDATE)  # the hybrid clock stamps it later than 5 + 1
    await rig.ingest.process([record(extended)])

    report = await rig.ingest.process([record(tombstone)])

    assert report.applied == 0 and report.stale == 1
    held = rig.cache.rows["t1/m1"]
    assert not held.deleted and held.expires_at == NOW + 3_600_000 and held.version == 7
    assert not rig.vectors.rows["t1/m1"].deleted
    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert [c.op for c in changes] == [Op.ADD, Op.UPDATE]  # no delete announced


async def test_an_update_in_the_window_of_its_add_keeps_the_adds_time_in_both_stores() -> None:
    rig = Rig()
    add, update = add_event(1, None), add_event(2, None, op=Op.UPDATE)
    await rig.ingest.process([record(add), record(update)])
    for store in (rig.cache.rows, rig.vectors.rows):
        held = store["t1/m1"]
        assert (held.version, held.created_at, held.updated_at) == (2, add.ts, update.ts)
