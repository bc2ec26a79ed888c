"""infra.redis_store.RedisCounters: counts kept through an outage, each sent once, also when adds overlap."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from infra.redis_store import RedisCounters
from schemas.errors import StoreError


class _Pipeline:
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.ops: list[tuple[str, int]] = []

    def hincrby(self, _key: str, name: str, value: int) -> None:
        self.ops.append((name, value))

    async def execute(self) -> None:
        await asyncio.sleep(0.01)  # the round trip: other adds run meanwhile
        if self.server.down:
            raise RedisConnectionError("connection refused")
        for name, value in self.ops:
            self.server.counts[name] += value


class _Server:
    """Just enough of a Redis client for the counters: a transaction of HINCRBYs that may fail."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.down = False

    def pipeline(self, transaction: bool) -> Any:
        assert transaction
        return _Pipeline(self)


async def test_overlapping_adds_count_each_value_once() -> None:
    server = _Server()
    counters = RedisCounters(server, "p:")  # type: ignore[arg-type]
    await asyncio.gather(*(counters.add({"events_in": 1, "materialized": 2}) for _ in range(20)))
    await counters.add({})
    assert server.counts == {"events_in": 20, "materialized": 40}


async def test_counts_wait_through_an_outage_and_are_sent_once_after() -> None:
    server = _Server()
    counters = RedisCounters(server, "p:")  # type: ignore[arg-type]
    server.down = True
    for _ in range(3):
        with pytest.raises(StoreError):
            await counters.add({"events_in": 5})
    server.down = False
    await asyncio.gather(counters.add({"events_in": 1}), counters.add({"stale_ignored": 1}))
    await counters.add({})
    assert server.counts == {"events_in": 16, "stale_ignored": 1}
