"""A memory belongs to its scope: (tenant, memory id) is its identity, and an event naming another user of the
tenant never changes it (refused, dead-lettered with its reason, counted). Pure logic against the fakes."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.model import memory_key
from processors.pipeline import split_by_owner
from schemas.events import EmbeddedEvent, MemoryEvent, Op, decode_dead_letter, decode_event
from tests.unit.processors.fakes import TOPICS, Rig
from tests.unit.processors.test_pipeline import event, expected_state, record
from tests.unit.processors.test_reconcile import reconciler, request


def letters(rig: Rig) -> list[Any]:
    return [decode_dead_letter(v) for v in rig.publisher.values(TOPICS.dlq)]


async def test_two_tenants_with_the_same_memory_and_user_ids_are_two_memories() -> None:
    rig = Rig()
    t1 = event("m1", 1, text="t1 likes tea", tenant_id="t1")
    t2 = event("m1", 1, text="t2 likes coffee", tenant_id="t2")
    await rig.ingest.process([record(t1), record(t2)])
    assert set(rig.vectors.rows) == set(rig.cache.rows) == {"t1/m1", "t2/m1"}

    # t2 updates and deletes "its" m1: t1's m1 is another memory and stays as it was
    await rig.ingest.process([record(event("m1", 2, text="t2 now likes water", op=Op.UPDATE, tenant_id="t2"))])
    await rig.ingest.process([record(event("m1", 3, op=Op.DELETE, tenant_id="t2"))])
    for store in (rig.vectors, rig.cache):
        assert store.rows["t1/m1"].text == "t1 likes tea" and not store.rows["t1/m1"].deleted
        assert store.rows["t1/m1"].version == 1 and store.rows["t2/m1"].deleted
    assert letters(rig) == []


async def test_an_update_or_delete_naming_another_user_is_dead_lettered_and_counted() -> None:
    rig = Rig()
    add = event("m1", 1, text="alice is vegetarian", user_id="alice")
    await rig.ingest.process([record(add)])
    before = dict(rig.vectors.rows), dict(rig.cache.rows)

    update = event("m1", 5, text="mallory was here", op=Op.UPDATE, user_id="mallory")
    delete = event("m1", 6, op=Op.DELETE, user_id="mallory")
    records = [record(update), record(delete)]
    report = await rig.ingest.process(records)

    assert (dict(rig.vectors.rows), dict(rig.cache.rows)) == before  # untouched, in both stores
    assert report.applied == 0 and len(report.refused) == 2
    dead = letters(rig)
    assert [d.source for d in dead] == [r.source for r in records]
    assert [decode_event(d.value) for d in dead] == [update, delete]  # the original event, to re-publish
    assert all(d.error_type == "ScopeMismatchError" and d.field == "user_id" for d in dead)
    assert "belongs to user 'alice', the event names user 'mallory'" in dead[0].reason
    assert "update of memory 'm1'" in dead[0].reason and "delete of memory 'm1'" in dead[1].reason
    assert rig.counters.totals["scope_mismatch"] == 2 and rig.counters.totals["dead_lettered"] == 2
    assert rig.publisher.values(TOPICS.changes)[1:] == []  # the add's change only


async def test_a_foreign_event_in_the_same_window_as_the_add_is_refused_too() -> None:
    rig = Rig()
    add = event("m1", 1, text="alice is vegetarian", user_id="alice")
    takeover = event("m1", 9, text="mallory's now", op=Op.UPDATE, user_id="mallory")
    report = await rig.ingest.process([record(add), record(takeover)])
    assert rig.vectors.rows["default/m1"].scope.user_id == "alice" == rig.cache.rows["default/m1"].scope.user_id
    assert rig.vectors.rows["default/m1"].version == 1 and len(report.refused) == 1


async def test_an_owner_redis_forgot_is_read_from_lancedb() -> None:
    rig = Rig()
    await rig.ingest.process([record(event("m1", 1, user_id="alice"))])
    del rig.cache.rows["default/m1"]  # evicted, or Redis restarted empty
    report = await rig.ingest.process([record(event("m1", 2, op=Op.DELETE, user_id="mallory"))])
    assert len(report.refused) == 1 and "belongs to user 'alice'" in report.refused[0].reason
    assert not rig.vectors.rows["default/m1"].deleted and "default/m1" not in rig.cache.rows


async def test_an_add_reusing_another_users_id_is_refused_by_the_stores() -> None:
    """Adds are not looked up (mostly new memories): the stores' own checks refuse them, Redis says so."""
    rig = Rig()
    await rig.ingest.process([record(event("m1", 1, text="alice's", user_id="alice"))])
    report = await rig.ingest.process([record(event("m1", 2, text="mallory's", user_id="mallory"))])
    assert len(report.refused) == 1 and "belongs to another user" in report.refused[0].reason
    assert rig.vectors.rows["default/m1"].text == "alice's" == rig.cache.rows["default/m1"].text


async def test_without_the_owner_lookup_redis_still_refuses_and_says_so() -> None:
    """Both owner lookups failing: the window goes on, and the Redis script's SCOPE_MISMATCH dead-letters it."""
    rig = Rig()
    await rig.ingest.process([record(event("m1", 1, user_id="alice"))])
    rig.vectors.owners_down = rig.cache.owners_down = True
    report = await rig.ingest.process([record(event("m1", 2, op=Op.DELETE, user_id="mallory"))])
    assert len(report.refused) == 1 and "belongs to another user" in report.refused[0].reason
    assert not rig.cache.rows["default/m1"].deleted and not rig.vectors.rows["default/m1"].deleted


async def test_the_reconciler_does_not_repair_a_refused_event_back_in() -> None:
    rig = Rig()
    await rig.ingest.process([record(event("m1", 1, user_id="alice"))])
    await rig.ingest.process([record(event("m1", 7, op=Op.DELETE, user_id="mallory"))])
    for req in (request(), request(user_id="mallory"), request(tenant_id="default", memory_ids=("m1",))):
        report = await reconciler(rig).run(req)
        assert report.consistent and report.counts["repaired"] == 0, report.counts
    assert report.counts["log_scope_mismatch"] == 1
    assert not rig.vectors.rows["default/m1"].deleted and not rig.cache.rows["default/m1"].deleted


def test_split_by_owner_keeps_the_stores_owner_else_the_first_event_of_the_log() -> None:
    def wrap(e: MemoryEvent) -> EmbeddedEvent:
        return EmbeddedEvent(e, "fake", 8, b"", "h")

    items = [wrap(event("m1", 3, user_id="b")), wrap(event("m1", 1, user_id="a")), wrap(event("m2", 1, user_id="b"))]
    kept, refused = split_by_owner(items, {"default/m1": "a"})
    assert [i.event.scope.user_id for i in kept] == ["a", "b"] and [o for _, o in refused] == ["a"]
    kept, refused = split_by_owner(items, {})
    assert [i.event.version for i in kept] == [3, 1] and [(i.event.version, o) for i, o in refused] == [(1, "b")]


# --------------------------------------------------------------------------------------------- convergence


@st.composite
def logs_with_intruders(draw: st.DrawFn) -> tuple[list[MemoryEvent], list[MemoryEvent]]:
    """A log (order of arrival) per memory: the owner's events in any version order, with events of other users
    anywhere after the memory's first event; two tenants share ids and users. Returns (owners' events, log)."""
    per_memory: list[list[MemoryEvent]] = []
    owned: list[MemoryEvent] = []
    for tenant, memory_id in itertools.product(["t1", "t2"], ["m1", "m2"]):
        owner = draw(st.sampled_from(["u1", "u2"]))
        events = []
        for i in range(draw(st.integers(1, 5))):
            user = owner if i == 0 else draw(st.sampled_from([owner, owner, "u1", "u2", "x"]))
            op = Op.ADD if i == 0 else draw(st.sampled_from([Op.UPDATE, Op.DELETE, Op.ADD]))
            e = event(memory_id, draw(st.integers(0, 5)), f"{tenant}{memory_id}e{i}", op, f"t {i}", user, tenant)
            events.append(e)
            if user == owner:
                owned.append(e)
        per_memory.append(events)
    # interleave the memories' logs, keeping each memory's own order (one partition per memory)
    merged: list[MemoryEvent] = []
    queues = [list(q) for q in per_memory]
    while any(queues):
        q = draw(st.sampled_from([q for q in queues if q]))
        merged.append(q.pop(0))
    return owned, merged


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs_with_intruders(), st.data())
def test_intruders_never_change_a_memory_however_the_log_is_windowed(
    case: tuple[list[MemoryEvent], list[MemoryEvent]], data: Any
) -> None:
    owned, log = case
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(log) - 1)), max_size=5)))
    bounds = [0, *cuts, len(log)]
    rig = Rig()

    async def run() -> None:
        for a, b in itertools.pairwise(bounds):
            if a < b:
                await rig.ingest.process([record(e) for e in log[a:b]])
        # and a rebuild from the embedded log, in one go, ends in the same state
        rebuilt = Rig()
        await rebuilt.replay.process(rig.log.records())
        assert await rebuilt.vectors.states() == expected_state(owned)
        report = await reconciler(rig).run(request())
        assert report.consistent and report.counts["repaired"] == 0

    asyncio.run(run())
    want = expected_state(owned)
    assert asyncio.run(rig.vectors.states()) == want == asyncio.run(rig.cache.states())
    intruders = len(log) - len(owned)
    assert rig.counters.totals["scope_mismatch"] == intruders
    assert all(k in want for k in (memory_key("t1", "m1"), memory_key("t2", "m1")))
