"""How the index sink gathers a batch: at once under a backlog, lingering under a trickle (no broker needed).

Time is a fake clock that only the fake consumer moves (by the time each fetch would have waited), so the
assertions are exact and no test sleeps: take_batch's deadlines are read from the same clock."""

import asyncio
import logging
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from infra.settings import Settings
from streams.runtime import loop
from streams.runtime.loop import take_batch
from streams.runtime.sink import IndexSink


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """take_batch reads this clock (only the loop module's ``time`` is replaced; asyncio keeps the real one)."""
    fake = FakeClock()
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=fake.monotonic, perf_counter=fake.monotonic))
    return fake


class TrickleConsumer:
    """``getmany`` hands out ``per_fetch`` records every ``every_s`` seconds (of the fake clock), up to ``total``;
    a fetch whose timeout ends before the next records are due moves the clock by the timeout and returns none."""

    def __init__(self, clock: FakeClock, total: int, per_fetch: int, every_s: float) -> None:
        self.clock = clock
        self.left = total
        self.per_fetch = per_fetch
        self.every_s = every_s
        self.offset = 0
        self.fetches = 0
        self.timeouts_ms: list[int] = []  # the timeout of every getmany call, in order

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[SimpleNamespace]]:
        self.timeouts_ms.append(timeout_ms)
        wait = self.every_s if self.fetches else 0.0
        if not self.left or wait > timeout_ms / 1000:
            self.clock.now += timeout_ms / 1000
            return {}
        self.clock.now += wait
        self.fetches += 1
        n = min(self.per_fetch, max_records, self.left)
        self.left -= n
        batch = [
            SimpleNamespace(topic="e", partition=0, offset=self.offset + i, key=None, value=b"x", timestamp=0)
            for i in range(n)
        ]
        self.offset += n
        return {TopicPartition("e", 0): batch}


async def test_a_backlog_fills_the_batch_without_lingering(clock: FakeClock) -> None:
    consumer = TrickleConsumer(clock, total=5_000, per_fetch=1_000, every_s=0.0)
    records = await take_batch(consumer, 3_000, wait_ms=100, linger_ms=10_000)  # type: ignore[arg-type]
    assert [r.offset for r in records] == list(range(3_000))
    # three fetches filled the limit and it returned at once: no fetch waited, the linger was never spent
    assert consumer.fetches == 3 and len(consumer.timeouts_ms) == 3 and clock.now == 0.0


async def test_a_trickle_is_gathered_for_the_linger_into_one_batch(clock: FakeClock) -> None:
    consumer = TrickleConsumer(clock, total=100, per_fetch=10, every_s=0.05)
    records = await take_batch(consumer, 10_000, wait_ms=100, linger_ms=320)  # type: ignore[arg-type]
    # the first fetch at 0 ms, then one every 50 ms up to 300 ms; the last wait (what is left of the 320 ms) ends
    # before the 350 ms fetch: 7 fetches in one batch, not one batch each
    assert consumer.fetches == 7 and len(records) == 70
    assert [r.offset for r in records] == list(range(70))
    assert consumer.timeouts_ms[0] == 100 and 0 < consumer.timeouts_ms[-1] <= 20
    assert clock.now == pytest.approx(0.32, abs=0.002)


async def test_without_linger_the_batch_is_what_one_fetch_brought(clock: FakeClock) -> None:
    consumer = TrickleConsumer(clock, total=100, per_fetch=10, every_s=0.05)
    records = await take_batch(consumer, 10_000, wait_ms=100, linger_ms=0)  # type: ignore[arg-type]
    assert len(records) == 10 and consumer.timeouts_ms == [100] and clock.now == 0.0


async def test_nothing_arriving_returns_nothing_after_the_wait(clock: FakeClock) -> None:
    consumer = TrickleConsumer(clock, total=0, per_fetch=10, every_s=0.05)
    assert await take_batch(consumer, 10_000, wait_ms=50, linger_ms=1_000) == []  # type: ignore[arg-type]
    # one fetch of the first-record wait, not the linger: an idle sink is not held for 1 s per empty poll
    assert consumer.timeouts_ms == [50] and clock.now == pytest.approx(0.05)


class RecordingVectors:
    """What the sink asks of LanceDB between batches: how long it says it has been idle."""

    def __init__(self) -> None:
        self.idle_for: list[float] = []
        self.expiry_scans: list[int] = []  # the time of each expiry sweep's scan

    async def maintain_if_due(self, policy: object, idle_for_s: float = 0.0) -> None:
        self.idle_for.append(idle_for_s)

    async def expired(self, now_ms: int, limit: int) -> list[object]:
        self.expiry_scans.append(now_ms)
        return []

    async def any_expiring(self) -> bool:
        return True  # as if memories with an expiry existed: the sweep scans


class RecordingHistory:
    """How often the sink asks the history table for its maintenance."""

    def __init__(self) -> None:
        self.maintained = 0

    async def maintain(self) -> bool:
        self.maintained += 1
        return False


class NoSweep:
    publisher = None  # the expiry sweep's: nothing expires here, so it never publishes

    async def sweep(self, older_than_ms: int, limit: int, *, owns: object = None) -> None:
        return None

    async def clear_ahead(self) -> int:
        return 0


async def test_only_the_owning_sink_maintains_the_table_when_idle() -> None:
    """A sink standing by (no partitions) must not compact a table the owner is merging into: it is never idle
    to LanceDB, however long it has not written; the owner is. Nor does it sweep for expired memories: one sweep
    runs, the owner's."""
    vectors, history = RecordingVectors(), RecordingHistory()
    stores = SimpleNamespace(redis=None, vectors=vectors, own_vectors=vectors, history=history, counters=None)
    index_sink = IndexSink(Settings(), stores, NoSweep())  # type: ignore[arg-type]
    index_sink._last_write -= 5.0  # nothing written for five seconds
    standby = SimpleNamespace(assignment=lambda: set())
    owner = SimpleNamespace(assignment=lambda: {TopicPartition("e", 0)})

    await index_sink.between_batches(standby, idle=True)  # type: ignore[arg-type]
    assert history.maintained == 0  # nor the history table
    assert vectors.expiry_scans == []  # nor looks for expired memories
    await index_sink.between_batches(owner, idle=False)  # type: ignore[arg-type]
    await index_sink.between_batches(owner, idle=True)  # type: ignore[arg-type]

    assert vectors.idle_for[:2] == [0.0, 0.0] and vectors.idle_for[2] >= 5.0, vectors.idle_for
    assert history.maintained == 2  # the owner's, under load and idle
    assert len(vectors.expiry_scans) == 1  # the owner's first call; the second came within EXPIRY_EVERY_S


async def test_the_sink_fence_logs_ownership_and_waits_for_the_batch_in_hand(caplog: pytest.LogCaptureFixture) -> None:
    """The lines operators and the bench read ("index sink owns ..."), and a revocation held by the loop's lock."""
    recording = RecordingVectors()
    stores = SimpleNamespace(redis=None, vectors=recording, own_vectors=recording, history=None, counters=None)
    index_sink = IndexSink(Settings(), stores, NoSweep())  # type: ignore[arg-type]
    fence = index_sink.fence()
    with caplog.at_level(logging.INFO, logger="memstream.sink"):
        await fence.on_partitions_assigned({TopicPartition("e", 1), TopicPartition("e", 0)})
        await fence.on_partitions_assigned(set())
        async with index_sink.loop.writing:  # a batch being written
            revoking = asyncio.create_task(fence.on_partitions_revoked({TopicPartition("e", 0)}))
            await asyncio.sleep(0.01)
            assert not revoking.done()
        await asyncio.wait_for(revoking, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "index sink owns e[0], e[1]",
        "index sink stands by (another member owns the table)",
        "index sink gives up e[0]",
    ]
