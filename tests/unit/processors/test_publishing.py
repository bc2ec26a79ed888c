"""EventFactory turns what an agent says into complete, valid events; HybridClock orders them."""

from __future__ import annotations

import itertools
import re
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.publishing import (
    _MEMORY_NAMESPACE,
    EventFactory,
    HybridClock,
    Rejected,
    name_uuid_hex,
    random_uuid_hex,
)
from schemas.errors import SchemaError
from schemas.events import SCHEMA_VERSION, Op, decode_event, encode


def fixed_clock(*values: int) -> HybridClock:
    ticks = iter(values)
    return HybridClock(wall_us=lambda: next(ticks))


# --------------------------------------------------------------------------------------------- clock


def test_clock_follows_the_wall_clock_when_it_moves_forward() -> None:
    clock = fixed_clock(100, 250, 1_000)
    assert [clock.next() for _ in range(3)] == [100, 250, 1_000]


def test_clock_never_goes_backwards_nor_repeats() -> None:
    clock = fixed_clock(100, 50, 50, 101, 200, 10, 200)
    assert [clock.next() for _ in range(7)] == [100, 101, 102, 103, 200, 201, 202]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**52), min_size=1, max_size=50))
def test_clock_is_strictly_increasing_and_never_behind_the_wall(walls: list[int]) -> None:
    clock = fixed_clock(*walls)
    stamps = [clock.next() for _ in walls]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert all(stamp >= w for stamp, w in zip(stamps, walls, strict=True))


def test_default_clock_is_microseconds_since_the_epoch() -> None:
    before = time.time_ns() // 1_000
    stamp = HybridClock().next()
    assert before <= stamp <= time.time_ns() // 1_000 + 1


# --------------------------------------------------------------------------------------------- factory


def factory(*walls: int) -> EventFactory:
    return EventFactory(fixed_clock(*walls) if walls else None)


def test_defaults_are_filled_in() -> None:
    before_ms = time.time_ns() // 1_000_000
    event = factory(1_234_567).from_input({"user_id": "alice", "text": "likes green tea"})
    assert event.op is Op.ADD
    assert event.scope.tenant_id == "default"
    assert event.scope.user_id == "alice"
    assert event.scope.agent_id is None and event.scope.run_id is None
    assert re.fullmatch(r"[0-9a-f]{32}", event.event_id)
    assert re.fullmatch(r"[0-9a-f]{32}", event.memory_id)
    assert event.version == 1_234_567
    assert before_ms <= event.ts <= time.time_ns() // 1_000_000
    assert event.metadata == {}
    assert event.schema_version == SCHEMA_VERSION
    assert decode_event(encode(event)) == event  # what the factory makes, the codec reads back


def test_versions_come_from_the_clock_in_order() -> None:
    make = factory(500, 400, 400)
    versions = [make.from_input({"user_id": "u", "text": f"t{i}"}).version for i in range(3)]
    assert versions == [500, 501, 502]


def test_event_ids_are_unique() -> None:
    make = factory()
    assert len({make.from_input({"user_id": "u", "text": "same"}).event_id for _ in range(50)}) == 50


def test_same_scope_and_text_give_the_same_memory_id() -> None:
    body = {"user_id": "alice", "agent_id": "planner", "text": "likes green tea"}
    first = factory().from_input(dict(body))
    second = EventFactory().from_input(dict(body))
    assert first.memory_id == second.memory_id
    assert first.event_id != second.event_id
    assert factory().from_input({**body, "tenant_id": "default"}).memory_id == first.memory_id


@pytest.mark.parametrize(
    "change",
    [
        {"text": "likes black tea"},
        {"user_id": "bob"},
        {"agent_id": "critic"},
        {"agent_id": None},
        {"run_id": "r1"},
        {"tenant_id": "acme"},
    ],
)
def test_different_scope_or_text_give_different_memory_ids(change: dict[str, Any]) -> None:
    body = {"user_id": "alice", "agent_id": "planner", "text": "likes green tea"}
    assert factory().from_input(body).memory_id != factory().from_input({**body, **change}).memory_id


def test_supplied_values_are_kept() -> None:
    body = {
        "op": "update",
        "memory_id": "m-1",
        "event_id": "e-1",
        "version": 42,
        "ts": 7,
        "tenant_id": "acme",
        "user_id": "alice",
        "agent_id": "a",
        "run_id": "r",
        "text": "new text",
        "metadata": {"k": [1, 2]},
    }
    event = factory().from_input(body)
    assert event.to_dict() == {"schema_version": SCHEMA_VERSION, **body}


def test_version_zero_is_kept_not_replaced_by_the_clock() -> None:
    assert factory(999).from_input({"user_id": "u", "text": "t", "version": 0}).version == 0


def test_delete_needs_no_text() -> None:
    event = factory().from_input({"op": "delete", "memory_id": "m-1", "user_id": "alice"})
    assert event.op is Op.DELETE and event.text is None


def test_from_json() -> None:
    event = factory().from_json(b'{"user_id": "u", "text": "hello"}')
    assert event.text == "hello"
    with pytest.raises(SchemaError, match="malformed JSON"):
        factory().from_json(b"{")
    with pytest.raises(SchemaError, match="expected a JSON object"):
        factory().from_json(b'"hello"')


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"text": "hi"}, "user_id", "'user_id' is required"),
        ({"user_id": "u"}, "text", "'text' is required for op 'add'"),
        ({"op": "update", "memory_id": "m", "user_id": "u"}, "text", "'text' is required for op 'update'"),
        ({"op": "update", "user_id": "u", "text": "t"}, "memory_id", "'memory_id' is required for op 'update'"),
        ({"op": "delete", "user_id": "u"}, "memory_id", "'memory_id' is required for op 'delete'"),
        ({"user_id": "u", "text": "t", "colour": "red"}, "colour", "unknown field(s): colour"),
        ({"user_id": "u", "text": "t", "schema_version": 1}, "schema_version", "unknown field(s): schema_version"),
        ({"op": "merge", "user_id": "u", "text": "t"}, "op", "unknown op 'merge'"),
        ({"user_id": "a b", "text": "t"}, "user_id", "'user_id' must be 1-128"),
        ({"user_id": "u", "text": "   "}, "text", "'text' is empty"),
        ({"user_id": "u", "text": 5}, "text", "'text' must be a string"),
        ({"op": "delete", "memory_id": "m", "user_id": "u", "text": "x"}, "text", "must be null for op 'delete'"),
        ({"user_id": "u", "text": "t", "version": -1}, "version", "'version' must be between"),
        ({"user_id": "u", "text": "t", "version": True}, "version", "got boolean"),
        ({"user_id": "u", "text": "t", "metadata": {"k": "x" * 20_000}}, "metadata", "more than 16384"),
    ],
)
def test_invalid_input_is_rejected(body: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SchemaError) as caught:
        factory().from_input(body)
    assert words in str(caught.value)
    assert caught.value.field == field


def test_rejected_to_dict() -> None:
    assert Rejected(line=3, reason="bad", field="text").to_dict() == {"line": 3, "reason": "bad", "field": "text"}
    assert Rejected(line=1, reason="x").to_dict()["field"] is None


# --------------------------------------------------------------------------------------------- uuids


@given(st.text(max_size=300))
def test_name_uuid_is_exactly_uuid5_of_the_memory_namespace(name: str) -> None:
    assert name_uuid_hex(name) == uuid.uuid5(_MEMORY_NAMESPACE, name).hex


def test_random_uuid_is_a_version_4_uuid_and_unique() -> None:
    made = [random_uuid_hex() for _ in range(2_000)]
    assert len(set(made)) == len(made)
    for value in made:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_an_event_id_is_made_only_when_the_input_has_none() -> None:
    factory = EventFactory()
    assert factory.from_input({"user_id": "u", "text": "t", "event_id": "given-1"}).event_id == "given-1"
    made = factory.from_input({"user_id": "u", "text": "t"}).event_id
    assert uuid.UUID(hex=made).version == 4
    with pytest.raises(SchemaError) as info:  # an explicit null is refused, as before, not replaced
        factory.from_input({"user_id": "u", "text": "t", "event_id": None})
    assert info.value.field == "event_id"
