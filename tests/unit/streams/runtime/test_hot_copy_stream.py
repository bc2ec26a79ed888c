"""A rebuild's writes to Redis while it reads on (streams.runtime.replay.HotCopyStream): one write at a time, and
the last row written for each memory is the fold's winner, however the log's versions of it were spread."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

from processors.model import MemoryRow
from processors.replay import LogFold
from schemas.events import EmbeddedEvent, MemoryEvent, Op
from streams.runtime.replay import HotCopyStream
from streams.runtime.stores import Stores
from tests.unit.processors.test_pipeline import event


class SlowCache:
    """Redis as the stream sees it: ``apply`` takes a while; records what each memory was last given."""

    def __init__(self) -> None:
        self.last: dict[str, MemoryRow] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.calls = 0

    async def apply(self, rows: Sequence[MemoryRow], *, bump: bool = True) -> list[Any]:
        assert not bump  # a new generation: no cached read to invalidate
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.calls += 1
        await asyncio.sleep(0.01)
        for row in rows:
            self.last[row.key] = row
        self.in_flight -= 1
        return []


def embedded(e: MemoryEvent) -> EmbeddedEvent:
    return EmbeddedEvent(e, "fake", 4, b"" if e.op is Op.DELETE else b"\0" * 16, "h")


async def test_the_hot_copy_ends_on_each_memorys_winner_written_one_batch_at_a_time() -> None:
    cache = SlowCache()
    stores = cast(Stores, SimpleNamespace(cache=cache))
    hot = HotCopyStream(stores, every=3)
    fold = LogFold()
    windows = [
        [event("m1", 1), event("m2", 1), event("m3", 1)],
        [event("m1", 2, op=Op.UPDATE), event("m4", 1), event("m2", 3, op=Op.UPDATE)],
        [event("m2", 2, op=Op.UPDATE), event("m5", 1), event("m3", 4, op=Op.DELETE)],  # m2's 2 is stale
        [event("m1", 5, op=Op.UPDATE), event("m6", 1)],
    ]
    for window in windows:
        fold.add([embedded(e) for e in window])
        await hot.send_if_due(fold)
    await hot.finish(fold)
    await hot.close()
    winners = {row.key: row for row in fold.take()}
    assert {k: (r.version, r.deleted) for k, r in cache.last.items()} == {
        k: (r.version, r.deleted) for k, r in winners.items()
    }
    assert {r.memory_id: r.version for r in winners.values()} == {"m1": 5, "m2": 3, "m3": 4, "m4": 1, "m5": 1, "m6": 1}
    assert cache.most_in_flight == 1 and cache.calls >= 2  # streamed while reading, never two writes at once
