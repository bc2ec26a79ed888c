"""The window processors against in-memory fakes of the ports: pure logic, no services."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.hashing import TOMBSTONE_HASH, event_content_hash
from processors.model import InRecord, StoreState, memory_key
from processors.pipeline import (
    CompensationPolicy,
    RetryPolicy,
    describe_window,
    latest_per_memory,
    with_retries,
)
from schemas.consistency import decode_compensation
from schemas.errors import BrokerError, MemStreamError, SchemaError, StoreError
from schemas.events import (
    DeadLetter,
    EmbeddedEvent,
    MemoryEvent,
    Op,
    Scope,
    SourceRef,
    decode_change,
    decode_dead_letter,
    decode_embedded,
    encode,
)
from tests.unit.processors.fakes import DIM, TOPICS, Rig

# --------------------------------------------------------------------------------------------- helpers


def event(
    memory_id: str = "m1",
    version: int = 1,
    event_id: str | None = None,
    op: Op = Op.ADD,
    text: str | None = None,
    user_id: str = "u1",
    tenant_id: str = "default",
) -> MemoryEvent:
    return MemoryEvent(
        event_id=event_id or f"e-{memory_id}-{version}",
        op=op,
        memory_id=memory_id,
        version=version,
        ts=1_000 + version,
        scope=Scope(tenant_id, user_id),
        text=None if op is Op.DELETE else (text or f"{memory_id} at {version}"),
    )


_offsets = iter(range(1_000_000))


def record(value: MemoryEvent | bytes, partition: int = 0, topic: str = TOPICS.events) -> InRecord:
    if isinstance(value, MemoryEvent):
        return InRecord(topic, partition, next(_offsets), value.key, encode(value))
    return InRecord(topic, partition, next(_offsets), b"bad-key", value)


def expected_state(events: Sequence[MemoryEvent]) -> dict[str, StoreState]:
    """Per memory key (``<tenant>/<memory id>``), the state of the winning event."""
    winners: dict[str, MemoryEvent] = {}
    for e in events:
        key = memory_key(e.scope.tenant_id, e.memory_id)
        if key not in winners or e.order() > winners[key].order():
            winners[key] = e
    return {m: StoreState(e.version, e.event_id, event_content_hash(e), e.op is Op.DELETE) for m, e in winners.items()}


# --------------------------------------------------------------------------------------------- ingest


async def test_good_records_materialize_and_bad_ones_are_dead_lettered() -> None:
    rig = Rig()
    good = [event("m1", 1), event("m2", 1, text="likes tea")]
    bad_values = [
        b"{not json",
        orjson.dumps({**good[0].to_dict(), "op": "delete"}),  # a delete with text
        orjson.dumps({**good[0].to_dict(), "op": "merge"}),
    ]
    records = [record(good[0]), record(bad_values[0]), record(good[1]), record(bad_values[1]), record(bad_values[2])]

    report = await rig.ingest.process(records)

    assert (report.records, report.events, report.dead_lettered, report.applied) == (5, 2, 3, 2)
    letters = [decode_dead_letter(v) for v in rig.publisher.values(TOPICS.dlq)]
    assert [d.value for d in letters] == bad_values
    assert [d.source for d in letters] == [records[1].source, records[3].source, records[4].source]
    assert all(d.stage == "decode" and d.error_type == "SchemaError" and d.key == b"bad-key" for d in letters)
    assert "malformed JSON" in letters[0].reason
    assert "'text' must be null for op 'delete'" in letters[1].reason and letters[1].field == "text"
    assert "unknown op 'merge'" in letters[2].reason and letters[2].field == "op"
    assert [k for k, _ in rig.publisher.sent[TOPICS.dlq]] == [b"bad-key"] * 3

    assert await rig.vectors.states() == await rig.cache.states() == expected_state(good)
    row = rig.vectors.rows["default/m2"]
    assert row.text == "likes tea" and row.deleted is False and len(row.vector) == DIM * 4
    assert row.source == records[2].source

    embedded = [decode_embedded(r.value, r.headers) for r in rig.publisher.records(TOPICS.embedded)]
    assert [e.event for e in embedded] == good
    assert all(e.model == "fake" and e.dim == DIM for e in embedded)
    assert [k for k, _ in rig.publisher.sent[TOPICS.embedded]] == [b"m1", b"m2"]

    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert [(c.memory_id, c.version, c.op, c.stores) for c in changes] == [
        ("m1", 1, Op.ADD, ("lancedb", "redis")),
        ("m2", 1, Op.ADD, ("lancedb", "redis")),
    ]
    assert changes == report.changes
    assert changes[1].content_hash == event_content_hash(good[1]) and changes[1].source == records[2].source
    assert rig.counters.totals["events_in"] == 5
    assert rig.counters.totals["dead_lettered"] == 3
    assert rig.counters.totals["materialized"] == 2
    assert rig.counters.totals["embed_cache_misses"] == 2


async def test_window_of_only_bad_records_touches_no_store() -> None:
    rig = Rig()
    report = await rig.ingest.process([record(b"[]"), record(b'{"schema_version": 2}')])
    assert report.dead_lettered == 2 and report.events == 0
    assert rig.vectors.calls == rig.cache.calls == 0
    assert TOPICS.changes not in rig.publisher.sent and TOPICS.embedded not in rig.publisher.sent
    assert [decode_dead_letter(v).reason for v in rig.publisher.values(TOPICS.dlq)] == [
        "expected a JSON object, got list",
        "unknown schema_version 2 (this build reads 1)",
    ]


@pytest.mark.parametrize("index", [False, True], ids=["live-ingest-path", "with-lancedb"])
async def test_one_malformed_record_among_valid_ones_is_dead_lettered_and_the_rest_materialize(index: bool) -> None:
    """One bad record in the middle of a window, on a partition it shares with valid ones: exactly it is
    dead-lettered (its bytes and position), every valid event around it, before and after, is materialized."""
    rig = Rig()
    rig.materializer.index = index
    good = [event(f"m{i}", 1, text=f"memory {i}") for i in range(4)] + [event("m0", 2, op=Op.UPDATE, text="m0 v2")]
    malformed = b'{"schema_version": 1, "op": "add", "memory_id"'
    records = [record(good[0], 0), record(good[1], 1), record(malformed, 1), record(good[2], 1), record(good[3], 0)]
    records.append(record(good[4], 0))

    report = await rig.ingest.process(records)

    assert (report.records, report.events, report.dead_lettered) == (6, 5, 1)
    [letter] = [decode_dead_letter(v) for v in rig.publisher.values(TOPICS.dlq)]
    assert (letter.source, letter.value, letter.stage) == (records[2].source, malformed, "decode")
    assert "malformed JSON" in letter.reason
    want = expected_state(good)
    assert await rig.cache.states() == want and len(want) == 4
    assert await rig.vectors.states() == (want if index else {})
    assert [decode_embedded(r.value, r.headers).event for r in rig.publisher.records(TOPICS.embedded)] == good
    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert sorted((c.memory_id, c.version) for c in changes) == [("m0", 2), ("m1", 1), ("m2", 1), ("m3", 1)]
    assert rig.counters.totals["dead_lettered"] == 1 and rig.counters.totals["materialized"] == 4


async def test_empty_window_does_nothing() -> None:
    rig = Rig()
    report = await rig.ingest.process([])
    assert report.records == 0 and rig.publisher.sent == {} and rig.embedder.calls == []


async def test_replayed_window_is_current_and_stale_events_are_ignored() -> None:
    rig = Rig()
    window = [record(event("m1", 5)), record(event("m2", 1))]
    await rig.ingest.process(window)

    again = await rig.ingest.process(window)  # at-least-once delivery: the same records twice
    assert (again.applied, again.current, again.stale) == (0, 2, 0)
    assert len(rig.publisher.values(TOPICS.changes)) == 4  # the change feed is at-least-once too

    older = await rig.ingest.process([record(event("m1", 3))])
    assert (older.applied, older.current, older.stale) == (0, 0, 1)
    assert older.changes == []
    assert rig.vectors.rows["default/m1"].version == rig.cache.rows["default/m1"].version == 5
    assert rig.embedder.calls == [["m1 at 5", "m2 at 1"], ["m1 at 3"]]  # the replay hit the embedding cache
    assert again.cache.hits_local == 2


async def test_only_the_winner_of_a_window_is_written() -> None:
    rig = Rig()
    events = [event("m1", 2), event("m1", 9), event("m1", 4), event("m1", 9, event_id="a-lower")]
    report = await rig.ingest.process([record(e) for e in events])
    assert (report.applied, report.stale) == (1, 3)
    assert rig.vectors.rows["default/m1"].event_id == "e-m1-9"
    assert [decode_change(v).version for v in rig.publisher.values(TOPICS.changes)] == [9]


async def test_delete_leaves_a_tombstone() -> None:
    rig = Rig()
    await rig.ingest.process([record(event("m1", 1))])
    report = await rig.ingest.process([record(event("m1", 2, op=Op.DELETE))])
    assert report.applied == 1
    for row in (rig.vectors.rows["default/m1"], rig.cache.rows["default/m1"]):
        assert row.deleted and row.text == "" and row.vector == b"" and row.content_hash == TOMBSTONE_HASH
    assert decode_change(rig.publisher.values(TOPICS.changes)[-1]).op is Op.DELETE
    late_add = await rig.ingest.process([record(event("m1", 1, event_id="z-late"))])
    assert late_add.stale == 1 and rig.vectors.rows["default/m1"].deleted


async def test_deletes_are_not_embedded() -> None:
    rig = Rig()
    await rig.ingest.process([record(event("m1", 1, op=Op.DELETE)), record(event("m2", 1, text="hello"))])
    assert rig.embedder.calls == [["hello"]]
    embedded = [decode_embedded(r.value, r.headers) for r in rig.publisher.records(TOPICS.embedded)]
    assert [len(e.vector) for e in embedded] == [0, DIM * 4]


def test_latest_per_memory_keeps_the_greatest_version_then_event_id() -> None:
    def wrap(e: MemoryEvent) -> EmbeddedEvent:
        return EmbeddedEvent(e, "fake", DIM, b"", event_content_hash(e))

    items = [
        wrap(event("m1", 3, "b")),
        wrap(event("m2", 1, "x")),
        wrap(event("m1", 3, "c")),
        wrap(event("m1", 2, "z")),
        wrap(event("m2", 1, "w")),
    ]
    winners = {w.event.memory_id: w.event.order() for w in latest_per_memory(items)}
    assert winners == {"m1": (3, "c"), "m2": (1, "x")}
    assert latest_per_memory([]) == []


def test_describe_window_names_each_partition_span() -> None:
    records = [
        InRecord("t.events", 1, 7, None, b""),
        InRecord("t.events", 0, 3, None, b""),
        InRecord("t.events", 1, 5, None, b""),
    ]
    assert describe_window(records) == "t.events[0]@3..3, t.events[1]@5..7"


# --------------------------------------------------------------------------------------------- convergence

memory_ids = st.sampled_from(["m1", "m2", "m3"])
tenants = st.sampled_from(["default", "t2"])


def owner_of(tenant_id: str, memory_id: str) -> str:
    """The user a memory of the generated histories belongs to: the same ids, other users in the two tenants."""
    first = memory_id in ("m1", "m3")
    return "u1" if first == (tenant_id == "default") else "u2"


@st.composite
def histories(draw: st.DrawFn) -> list[MemoryEvent]:
    """Events over a few memories with unique event ids; versions collide often (event_id breaks ties).

    Two tenants share the memory ids (each (tenant, id) is its own memory) and every memory keeps to its user:
    events naming another user are refused (see the scope tests below)."""
    count = draw(st.integers(1, 12))
    out = []
    for i in range(count):
        op = draw(st.sampled_from([Op.ADD, Op.ADD, Op.UPDATE, Op.DELETE]))
        memory_id = draw(memory_ids)
        tenant_id = draw(tenants)
        out.append(
            event(
                memory_id=memory_id,
                version=draw(st.integers(0, 4)),
                event_id=f"e{draw(st.integers(0, 99)):02d}-{i}",
                op=op,
                text=draw(st.sampled_from(["tea", "coffee", "water"])) + f" {i}",
                user_id=owner_of(tenant_id, memory_id),
                tenant_id=tenant_id,
            )
        )
    return out


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[MemoryEvent], list[list[MemoryEvent]]]:
    """A history, then its events delivered in any order, some more than once, cut into windows."""
    history = draw(histories())
    duplicates = draw(st.lists(st.sampled_from(history), max_size=6))
    order = draw(st.permutations(history + duplicates))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=4)))
    bounds = [0, *cuts, len(order)]
    windows = [order[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    return history, windows


async def _deliver(rig: Rig, windows: list[list[MemoryEvent]]) -> None:
    for window in windows:
        await rig.ingest.process([record(e, partition=int(e.memory_id[1:]) % 2) for e in window])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
def test_any_order_any_windows_any_duplicates_converge(delivery: tuple[list[MemoryEvent], Any]) -> None:
    history, windows = delivery
    rig = Rig()
    asyncio.run(_deliver(rig, windows))
    expected = expected_state(history)
    assert asyncio.run(rig.vectors.states()) == expected
    assert asyncio.run(rig.cache.states()) == expected
    for memory_id, state in expected.items():
        row = rig.vectors.rows[memory_id]
        winner = next(e for e in history if e.event_id == state.event_id)
        assert row.text == (winner.text or "") and row.scope == winner.scope
        assert rig.cache.rows[memory_id] == row


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
def test_replaying_the_embedded_topic_rebuilds_the_same_state(delivery: tuple[list[MemoryEvent], Any]) -> None:
    """Rebuild: fresh stores fed the embedded topic (no re-embedding) end where the first ones did."""
    history, windows = delivery
    first = Rig()
    asyncio.run(_deliver(first, windows))
    rebuilt = Rig()
    embedded = first.publisher.records(TOPICS.embedded)
    report = asyncio.run(rebuilt.replay.process(embedded))
    assert report.dead_lettered == 0
    assert rebuilt.embedder.calls == []
    assert asyncio.run(rebuilt.vectors.states()) == asyncio.run(first.vectors.states()) == expected_state(history)
    assert rebuilt.vectors.rows == first.vectors.rows


# --------------------------------------------------------------------------------------------- replay


async def test_replay_dead_letters_other_models_and_bad_records() -> None:
    rig = Rig()
    ok = EmbeddedEvent(event("m1", 1), "fake", DIM, b"\x00" * DIM * 4, "h1")
    wrong_model = EmbeddedEvent(event("m2", 1), "other", DIM, b"\x00" * DIM * 4, "h2")
    wrong_dim = EmbeddedEvent(event("m3", 1), "fake", 2, b"\x00" * 8, "h3")
    delete_any_model = EmbeddedEvent(event("m4", 1, op=Op.DELETE), "other", 0, b"", TOMBSTONE_HASH)
    records = [record(encode(x), topic=TOPICS.embedded) for x in (ok, wrong_model, wrong_dim, delete_any_model)] + [
        record(b"nope", topic=TOPICS.embedded)
    ]

    report = await rig.replay.process(records)

    assert (report.events, report.dead_lettered, report.applied) == (2, 3, 2)
    assert set(rig.vectors.rows) == {"default/m1", "default/m4"}
    letters = [decode_dead_letter(v) for v in rig.publisher.values(TOPICS.dlq)]
    assert all(d.stage == "replay" for d in letters)
    assert "embedded with other (8-d) but the store holds fake (8-d)" in letters[0].reason
    assert letters[0].field == "embedding"
    assert "fake (2-d)" in letters[1].reason
    assert "malformed JSON" in letters[2].reason
    assert rig.counters.totals["dead_lettered"] == 3


# --------------------------------------------------------------------------------------------- retries


async def test_retriable_store_errors_are_retried_with_backoff_within_the_window() -> None:
    inline = RetryPolicy(first_delay_s=0.01, max_delay_s=0.025, max_attempts=5)
    rig = Rig(compensation=CompensationPolicy(inline=inline))
    rig.vectors.failures = [StoreError("lancedb busy"), StoreError("lancedb busy"), StoreError("lancedb busy")]
    rig.cache.failures = [StoreError("redis timeout")]
    report = await rig.ingest.process([record(event("m1", 1))])
    # each store retries on its own schedule; both got there within the window: no compensation
    assert (report.applied, report.compensations) == (1, 0)
    assert len(rig.publisher.values(TOPICS.changes)) == 1
    assert sorted(rig.sleeps) == [0.01, 0.01, 0.02, 0.025]
    assert rig.vectors.calls == 4 and rig.cache.calls == 2
    assert rig.publisher.values(TOPICS.compensations) == []
    assert await rig.vectors.states() == await rig.cache.states() == expected_state([event("m1", 1)])


async def test_retriable_broker_errors_are_retried() -> None:
    rig = Rig()
    rig.publisher.failures = [BrokerError("not enough replicas")]
    report = await rig.ingest.process([record(event("m1", 1))])
    assert report.applied == 1 and len(rig.sleeps) == 1
    assert len(rig.publisher.values(TOPICS.embedded)) == 1


async def test_non_retriable_store_error_propagates_before_any_change_is_published() -> None:
    rig = Rig()
    rig.cache.failures = [StoreError("WRONGTYPE key holds the wrong kind of value", retriable=False)]
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await rig.ingest.process([record(event("m1", 1))])
    assert rig.sleeps == []
    assert TOPICS.changes not in rig.publisher.sent
    assert rig.counters.totals == Counter()


async def test_with_retries_stops_after_max_attempts() -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def down() -> None:
        raise StoreError("down")

    with pytest.raises(StoreError, match="down"):
        await with_retries("down", down, RetryPolicy(first_delay_s=0.001, max_attempts=3), sleep)
    assert sleeps == [0.001, 0.002]


async def test_a_store_down_past_the_inline_retries_becomes_a_compensation_and_the_window_completes() -> None:
    rig = Rig()
    rig.cache.failures = [StoreError("redis down")] * 3  # every inline attempt
    events = [event("m1", 1), event("m2", 1), event("m1", 2)]
    report = await rig.ingest.process([record(e) for e in events])

    # LanceDB took the write; Redis' write is handed over, not lost, and the partition is not held
    assert await rig.vectors.states() == expected_state(events)
    assert rig.cache.rows == {}
    [raw] = rig.publisher.values(TOPICS.compensations)
    comp = decode_compensation(raw)
    assert comp.store == "redis" and comp.retriable and comp.acked_by == ("lancedb",)
    assert sorted((i.event.memory_id, i.event.version) for i in comp.items) == [("m1", 2), ("m2", 1)]
    assert comp.attempt_count == 1 and comp.last_error.error == "redis down"
    assert comp.next_attempt_ts > comp.first_failed_ts
    assert report.compensations == 1 and rig.counters.totals["compensations_emitted"] == 1
    # without Redis' outcomes nothing is announced yet: the compensation will announce the changes
    assert rig.publisher.values(TOPICS.changes) == []


async def test_lancedb_down_is_compensated_and_redis_changes_are_announced_with_the_store_that_has_them() -> None:
    rig = Rig(compensation=CompensationPolicy(chunk=2))
    rig.vectors.failures = [StoreError("lancedb down")] * 3
    events = [event(f"m{i}", 1) for i in range(5)]
    await rig.ingest.process([record(e) for e in events])

    comps = [decode_compensation(v) for v in rig.publisher.values(TOPICS.compensations)]
    assert [len(c.items) for c in comps] == [2, 2, 1]  # chunked: records stay small
    assert {c.store for c in comps} == {"lancedb"} and all(c.acked_by == ("redis",) for c in comps)
    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert sorted(c.memory_id for c in changes) == [f"m{i}" for i in range(5)]
    assert all(c.stores == ("redis",) for c in changes)


async def test_both_stores_down_give_one_compensation_each() -> None:
    rig = Rig()
    rig.vectors.failures = [StoreError("lancedb down")] * 3
    rig.cache.failures = [StoreError("redis down")] * 3
    await rig.ingest.process([record(event("m1", 1))])
    comps = [decode_compensation(v) for v in rig.publisher.values(TOPICS.compensations)]
    assert sorted(c.store for c in comps) == ["lancedb", "redis"]
    assert all(c.acked_by == () for c in comps)
    assert len(rig.publisher.values(TOPICS.embedded)) == 1  # the log copy is written regardless


def test_backoff_grows_to_its_ceiling_with_jitter() -> None:
    policy = CompensationPolicy(first_delay_s=1.0, max_delay_s=8.0)
    assert [policy.delay_s(n, 1.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert policy.delay_s(3, 0.0) == 2.0  # jitter takes up to half off


async def test_with_retries_does_not_catch_foreign_errors() -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def boom() -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await with_retries("boom", boom, RetryPolicy(), sleep)
    assert sleeps == []

    async def schema() -> None:
        raise SchemaError("bad")

    with pytest.raises(SchemaError):
        await with_retries("schema", schema, RetryPolicy(), sleep)
    assert sleeps == [] and not MemStreamError.retriable


# --------------------------------------------------------------------------------------------- regressions


async def test_deeply_nested_metadata_is_dead_lettered_not_fatal() -> None:
    rig = Rig()
    nested = b'{"a":' * 253 + b"{}" + b"}" * 253  # validate_metadata encodes it, the event around it cannot be
    raw = encode(event("m1", 1)).replace(b'"metadata":{}', b'"metadata":' + nested)
    report = await rig.ingest.process([record(raw), record(event("m2", 1))])
    assert report.dead_lettered == 1 and report.applied == 1
    assert [decode_dead_letter(v).field for v in rig.publisher.values(TOPICS.dlq)] == ["metadata"]


def test_dead_letter_keeps_original_bytes_exactly() -> None:
    raw = b"\xff\x00 not utf-8"
    letter = DeadLetter(reason="r", error_type="SchemaError", stage="decode", ts=1, value=raw, key=None)
    assert decode_dead_letter(encode(letter)).value == raw


# --------------------------------------------------------------------------------------------- ingest without LanceDB


def ingest_only(rig: Rig) -> Rig:
    """The live worker's ingest path: LanceDB is left to the index sink (processors/indexing.py)."""
    rig.materializer.index = False
    return rig


async def test_the_ingest_path_writes_redis_and_the_fresh_tail_never_lancedb() -> None:
    rig = ingest_only(Rig())
    good = [event("m1", 1), event("m2", 1), event("m1", 2, op=Op.UPDATE, text="now coffee")]
    report = await rig.ingest.process([record(e) for e in good])
    assert rig.vectors.rows == {} and rig.vectors.calls == 0
    assert await rig.cache.states() == expected_state(good)
    assert {k: r.version for k, r in rig.cache.pending.items()} == {"default/m1": 2, "default/m2": 1}
    assert rig.cache.pending["default/m1"].vector  # searched by exact score until the sink indexes it
    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert [(c.memory_id, c.version, c.stores) for c in changes] == [("m1", 2, ("redis",)), ("m2", 1, ("redis",))]
    assert changes == report.changes
    # where each change's embedded record landed: LanceDB holds the change once the sink has passed it
    assert [c.indexed_after for c in changes] == [SourceRef(TOPICS.embedded, 0, 2), SourceRef(TOPICS.embedded, 0, 1)]
    sink_input = [decode_embedded(r.value, r.headers).event for r in rig.publisher.records(TOPICS.embedded)]
    assert sink_input == good


async def test_the_ingest_path_hands_a_failing_redis_write_to_compensation_only_for_redis() -> None:
    rig = ingest_only(Rig(compensation=CompensationPolicy(inline=RetryPolicy(0.001, 0.001, max_attempts=2))))
    rig.cache.failures = [StoreError("redis down"), StoreError("redis down")]
    await rig.ingest.process([record(event("m1", 1))])
    comps = [decode_compensation(v) for v in rig.publisher.values(TOPICS.compensations)]
    assert [(c.store, c.acked_by) for c in comps] == [("redis", ())]
    assert rig.vectors.calls == 0


def test_with_positions_changes_only_indexed_after() -> None:
    """with_positions builds each change anew (not by dataclasses.replace): every other field must come through."""
    import dataclasses

    from processors.pipeline import with_positions
    from schemas.events import ChangeEvent

    event = MemoryEvent("e1", Op.UPDATE, "m1", 7, 11, Scope("t", "u", "a", "r"), "text", {"k": 1}, actor="x:y")
    item = EmbeddedEvent(event, "fake", DIM, b"\0" * 4 * DIM, "h", SourceRef("t.events", 2, 9))
    change = ChangeEvent(
        Op.UPDATE, "m1", event.scope, 7, "e1", "h", ("redis",), 11, 12, SourceRef("t.events", 2, 9), actor="x:y"
    )
    landed = SourceRef("t.embedded", 1, 40)
    [moved] = with_positions([change], [item], [landed])
    assert moved == dataclasses.replace(change, indexed_after=landed)
    assert [f.name for f in dataclasses.fields(ChangeEvent) if getattr(moved, f.name) is None] == []
