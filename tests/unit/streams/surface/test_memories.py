"""streams.surface.memories: Mem0 messages into memories, checked before anything is published."""

from __future__ import annotations

from typing import Any

import pytest

from processors.history import HistoryEntry
from processors.model import MemoryRow
from schemas.errors import NotFoundError, SchemaError
from schemas.events import Scope
from streams.surface.memories import (
    AddOp,
    DeleteOp,
    UpdateOp,
    add_operations,
    history_item,
    iso_time,
    memory_item,
    operation_from_dict,
    operation_to_dict,
    raise_for,
    wait_seconds,
)


def test_a_text_is_one_memory_and_messages_one_each_with_their_role() -> None:
    assert add_operations("Alice is vegetarian", user_id="alice") == [AddOp("Alice is vegetarian", "alice")]
    ops = add_operations(
        [{"role": "user", "content": "I moved"}, {"content": "no role"}],
        user_id="alice",
        agent_id="chef",
        metadata={"topic": "home"},
    )
    assert [(o.text, o.agent_id, o.metadata) for o in ops] == [
        ("I moved", "chef", {"topic": "home", "role": "user"}),
        ("no role", "chef", {"topic": "home"}),
    ]


@pytest.mark.parametrize(
    ("value", "kwargs", "field"),
    [
        ("t", {"user_id": ""}, "user_id"),
        ("t", {"user_id": "u", "run_id": "a b"}, "run_id"),
        ("   ", {"user_id": "u"}, "text"),
        ("t", {"user_id": "u", "metadata": ["x"]}, "metadata"),
        ([], {"user_id": "u"}, "messages"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": " "}], {"user_id": "u"}, "messages"),
        ([{"role": 1, "content": "ok"}], {"user_id": "u"}, "messages"),
        ([{"content": "a"}, {"content": "b"}], {"user_id": "u", "memory_id": "m"}, "memory_id"),
        (42, {"user_id": "u"}, "messages"),
    ],
)
def test_bad_adds_are_refused_whole_naming_the_field(value: Any, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(SchemaError) as refused:
        add_operations(value, **kwargs)
    assert refused.value.field == field and isinstance(refused.value, ValueError)


def test_operations_survive_the_batch_routes_json() -> None:
    for op in (AddOp("t", "u", None, "r", {"a": 1}, "m"), UpdateOp("m", None, {"b": 2}), DeleteOp("m")):
        assert operation_from_dict(operation_to_dict(op)) == op


def test_a_failed_outcome_raises_what_it_stands_for() -> None:
    with pytest.raises(NotFoundError):
        raise_for({"index": 0, "id": "m", "status": "not_found", "error": "no such memory", "field": "memory_id"})
    with pytest.raises(SchemaError) as refused:
        raise_for({"index": 0, "id": None, "status": "invalid", "error": "bad", "field": "text"})
    assert refused.value.field == "text"
    assert raise_for({"id": "m", "status": "queued"}) == {"id": "m", "status": "queued"}


def test_wait_and_times() -> None:
    assert (wait_seconds(False), wait_seconds(True), wait_seconds(2.5)) == (0.0, 60.0, 2.5)
    for bad in (-1, 601, "5"):
        with pytest.raises(SchemaError):
            wait_seconds(bad)
    assert iso_time(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"


def test_a_memory_and_its_history_from_past_the_year_9999_are_shown() -> None:
    """A fuzzed event with ts = 2^53-1 (the codec's bound) made GET /v1/memories/{id}/history answer 500."""
    far = 2**53 - 1
    row = MemoryRow("m", Scope("t", "u", None), "text", {}, 1, "e", "h", False, far)
    assert memory_item(row)["updated_at"] == "+287396-10-12T08:59:00.991Z"
    entry = HistoryEntry("ADD", "text", None, 1, "e", far)
    assert history_item(entry)["created_at"] == "+287396-10-12T08:59:00.991Z"
