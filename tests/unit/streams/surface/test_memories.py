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


# --------------------------------------------------------------------------------------------- expiry, times


def test_expires_at_is_taken_as_milliseconds_an_iso_time_or_an_aware_datetime() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from streams.surface.memories import expiry_ms

    ms = 1_893_456_000_000  # 2030-01-01T00:00:00Z
    assert expiry_ms(None) is None
    assert expiry_ms(ms) == expiry_ms(float(ms)) == ms
    assert expiry_ms("2030-01-01T00:00:00Z") == expiry_ms("2030-01-01T01:00:00+01:00") == ms
    assert expiry_ms(datetime(2030, 1, 1, tzinfo=UTC)) == ms
    assert expiry_ms(datetime(2030, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))) == ms
    [op] = add_operations("x", user_id="u", expires_at="2030-01-01T00:00:00Z")
    assert op.expires_at == ms
    assert operation_from_dict({"op": "update", "memory_id": "m", "expires_at": "2030-01-01T00:00:00Z"}) == UpdateOp(
        "m", expires_at=ms
    )


@pytest.mark.parametrize("bad", ["tomorrow", "2030-01-01T00:00:00", -1, 1.5, True, 2**53, [1], {"ms": 1}])
def test_a_bad_expires_at_is_refused_naming_the_field(bad: Any) -> None:
    from datetime import datetime

    from streams.surface.memories import expiry_ms

    with pytest.raises(SchemaError) as err:
        expiry_ms(bad)
    assert err.value.field == "expires_at"
    with pytest.raises(SchemaError) as err:
        add_operations("x", user_id="u", expires_at=bad)
    assert err.value.field == "expires_at"
    with pytest.raises(SchemaError) as err:
        expiry_ms(datetime(2030, 1, 1))  # naive: which zone is meant is unknown
    assert err.value.field == "expires_at"


def test_a_memory_shows_when_it_was_created_changed_and_expires() -> None:
    from processors.model import MemoryRow
    from schemas.events import Scope
    from streams.surface.memories import memory_item

    base = MemoryRow("m", Scope("t", "u"), "x", {}, 2, "e", "h", False, updated_at=2_000, created_at=1_000)
    item = memory_item(base)
    assert (item["created_at"], item["updated_at"], item["expires_at"]) == (iso_time(1_000), iso_time(2_000), None)
    expiring = memory_item(MemoryRow("m", Scope("t", "u"), "x", {}, 2, "e", "h", False, 2_000, expires_at=3_000))
    # a row written before created_at was kept shows its only time for both
    assert (expiring["created_at"], expiring["expires_at"]) == (iso_time(2_000), iso_time(3_000))


def test_an_iso_expiry_reads_back_as_the_milliseconds_it_shows() -> None:
    from datetime import UTC, datetime

    from streams.surface.memories import expiry_ms

    whole = int(datetime(2026, 12, 6, 13, 50, tzinfo=UTC).timestamp()) * 1000  # whole seconds: exact
    assert expiry_ms("2026-12-06T13:50:00.123000+00:00") == whole + 123
    assert expiry_ms("2026-12-06T14:50:00.123+01:00") == whole + 123
    for ms in range(whole, whole + 1000):
        assert expiry_ms(iso_time(ms)) == ms  # what a memory shows reads back as it was given


def test_both_modes_show_a_memory_alike() -> None:
    """In process a memory is memory_item(row); over HTTP the client rebuilds it from the row shape the server
    sends (row_to_dict): the two must agree, times included."""
    from memstream.client import _item_from_http
    from processors.model import MemoryRow
    from schemas.events import Scope
    from streams.surface.api import row_to_dict
    from streams.surface.memories import memory_item

    for row in (
        MemoryRow(
            "m", Scope("t", "u", "a"), "x", {"k": 1}, 2, "e", "h", False, 2_000, created_at=1_000, expires_at=9_000
        ),
        MemoryRow("m", Scope("t", "u"), "x", {}, 2, "e", "h", False, 2_000),
    ):
        assert _item_from_http(row_to_dict(row)) == memory_item(row)
