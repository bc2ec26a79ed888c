"""How the index sink gathers a batch: at once under a backlog, lingering under a trickle (no broker needed)."""

import asyncio
import time
from types import SimpleNamespace

from aiokafka import TopicPartition

from infra.settings import Settings
from streams.runtime.sink import IndexSink, take_batch


class TrickleConsumer:
    """``getmany`` hands out ``per_fetch`` records every ``every_s`` seconds, up to ``total``."""

    def __init__(self, total: int, per_fetch: int, every_s: float) -> None:
        self.left = total
        self.per_fetch = per_fetch
        self.every_s = every_s
        self.offset = 0
        self.fetches = 0

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[SimpleNamespace]]:
        if not self.left:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        wait = self.every_s if self.fetches else 0.0
        if wait > timeout_ms / 1000:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        await asyncio.sleep(wait)
        self.fetches += 1
        n = min(self.per_fetch, max_records, self.left)
        self.left -= n
        batch = [
            SimpleNamespace(topic="e", partition=0, offset=self.offset + i, key=None, value=b"x", timestamp=0)
            for i in range(n)
        ]
        self.offset += n
        return {TopicPartition("e", 0): batch}


async def test_a_backlog_fills_the_batch_without_lingering() -> None:
    consumer = TrickleConsumer(total=5_000, per_fetch=1_000, every_s=0.0)
    started = time.monotonic()
    records = await take_batch(consumer, 3_000, wait_ms=100, linger_ms=10_000)  # type: ignore[arg-type]
    assert [r.offset for r in records] == list(range(3_000))
    assert time.monotonic() - started < 1.0


async def test_a_trickle_is_gathered_for_the_linger_into_one_batch() -> None:
    consumer = TrickleConsumer(total=100, per_fetch=10, every_s=0.05)
    records = await take_batch(consumer, 10_000, wait_ms=100, linger_ms=320)  # type: ignore[arg-type]
    # the first fetch, then one every 50 ms for 320 ms: several fetches in one batch, not one batch each
    assert 40 <= len(records) <= 80
    assert [r.offset for r in records] == list(range(len(records)))


async def test_without_linger_the_batch_is_what_one_fetch_brought() -> None:
    consumer = TrickleConsumer(total=100, per_fetch=10, every_s=0.05)
    records = await take_batch(consumer, 10_000, wait_ms=100, linger_ms=0)  # type: ignore[arg-type]
    assert len(records) == 10


async def test_nothing_arriving_returns_nothing_after_the_wait() -> None:
    consumer = TrickleConsumer(total=0, per_fetch=10, every_s=0.05)
    started = time.monotonic()
    assert await take_batch(consumer, 10_000, wait_ms=50, linger_ms=1_000) == []  # type: ignore[arg-type]
    assert time.monotonic() - started < 0.5


class RecordingVectors:
    """What the sink asks of LanceDB between batches: how long it says it has been idle."""

    def __init__(self) -> None:
        self.idle_for: list[float] = []

    async def maintain_if_due(self, policy: object, idle_for_s: float = 0.0) -> None:
        self.idle_for.append(idle_for_s)


class NoSweep:
    async def sweep(self, older_than_ms: int, limit: int) -> None:
        return None


async def test_only_the_owning_sink_maintains_the_table_when_idle() -> None:
    """A sink standing by (no partitions) must not compact a table the owner is merging into: it is never idle
    to LanceDB, however long it has not written; the owner is."""
    vectors = RecordingVectors()
    sink = IndexSink(Settings(), SimpleNamespace(redis=None, vectors=vectors), NoSweep())  # type: ignore[arg-type]
    sink._last_write -= 5.0  # nothing written for five seconds
    standby = SimpleNamespace(assignment=lambda: set())
    owner = SimpleNamespace(assignment=lambda: {TopicPartition("e", 0)})

    await sink.between_batches(standby, idle=True)  # type: ignore[arg-type]
    await sink.between_batches(owner, idle=False)  # type: ignore[arg-type]
    await sink.between_batches(owner, idle=True)  # type: ignore[arg-type]

    assert vectors.idle_for[:2] == [0.0, 0.0] and vectors.idle_for[2] >= 5.0, vectors.idle_for
