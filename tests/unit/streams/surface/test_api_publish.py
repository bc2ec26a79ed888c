"""MemoryPublisher.publish_lines: chunked sending, the same rejections per line, bounded results."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest

from infra.settings import Settings
from schemas.events import MemoryEvent
from streams.surface import api as api
from streams.surface.api import MemoryPublisher, PublishResult


class RecordingPublisher(MemoryPublisher):
    """The publisher with its broker side replaced: remembers what each ``send_many`` got."""

    def __init__(self) -> None:
        super().__init__(Settings())
        self.sent: list[list[MemoryEvent]] = []

    async def send_many(self, events: Sequence[MemoryEvent]) -> None:
        self.sent.append(list(events))

    async def flush(self) -> None:
        return None


def line(**body: object) -> bytes:
    return orjson.dumps(body) + b"\n"


async def test_valid_lines_go_out_in_chunks_in_order_and_bad_lines_are_reported_by_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api, "LINES_PER_CHUNK", 3)
    lines = [
        line(user_id="u", text="one", memory_id="m1"),
        b"not json\n",
        b"   \n",  # blank: neither accepted nor rejected
        line(user_id="u", text="two", memory_id="m2"),
        line(user_id="u", memory_id="m3"),  # no text for an add
        line(user_id="u", op="delete", memory_id="m1"),
        line(user_id="u", text="three", memory_id="m3", colour="red"),
    ]
    publisher = RecordingPublisher()
    progress: list[int] = []
    result = await publisher.publish_lines(lines, first_line=10, on_progress=progress.append)
    assert [[e.memory_id for e in chunk] for chunk in publisher.sent] == [["m1"], ["m2", "m1"], []]
    assert result.accepted == 3
    assert [(r.line, r.field) for r in result.rejected] == [(11, None), (14, "text"), (16, "colour")]
    assert result.rejected[0].reason.startswith("malformed JSON")
    assert progress == [3, 3, 1]  # every line read is counted once, blank and rejected ones too
    assert result.newest == {}  # kept only when asked
    assert result.to_dict()["accepted"] == 3


async def test_remember_newest_keeps_one_slim_event_per_memory() -> None:
    publisher = RecordingPublisher()
    lines = [
        line(user_id="u", text="first", memory_id="m1", version=5),
        line(user_id="u", op="update", text="older", memory_id="m1", version=3),
        line(user_id="u", text="other", memory_id="m2", version=1),
        line(user_id="u", text="other tenant", memory_id="m1", version=1, tenant_id="t2"),
    ]
    result = await publisher.publish_lines(lines, remember_newest=True)
    assert result.accepted == 4
    newest = {key: (e.scope.tenant_id, e.memory_id, e.version) for key, e in result.newest.items()}
    assert sorted(newest.values()) == [("default", "m1", 5), ("default", "m2", 1), ("t2", "m1", 1)]
    assert all(e.text is None and e.metadata == {} for e in result.newest.values())  # waiting needs no text


def test_a_newer_event_replaces_the_remembered_one_and_an_older_does_not() -> None:
    result = PublishResult()
    events = RecordingPublisher().factory
    old = events.from_input({"user_id": "u", "text": "a", "memory_id": "m", "version": 1, "event_id": "e1"})
    new = events.from_input({"user_id": "u", "text": "b", "memory_id": "m", "version": 2, "event_id": "e0"})
    result.remember(new)
    result.remember(old)
    [kept] = result.newest.values()
    assert kept.order() == (2, "e0")
