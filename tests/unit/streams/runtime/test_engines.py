import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from infra.settings import Settings
from processors.model import InRecord
from processors.pipeline import WindowReport
from streams.runtime.engines import BatchEngine, next_offsets, to_record


def test_commit_offsets_are_one_past_the_last_record_of_each_partition() -> None:
    window = [InRecord("t", 0, 5, None, b""), InRecord("t", 1, 9, None, b""), InRecord("t", 0, 7, None, b"")]
    assert next_offsets(window) == {TopicPartition("t", 0): 8, TopicPartition("t", 1): 10}


def test_a_record_without_value_becomes_empty_bytes() -> None:
    message = SimpleNamespace(topic="t", partition=2, offset=4, key=b"k", value=None, timestamp=None)
    record = to_record(message)
    assert record == InRecord("t", 2, 4, b"k", b"", 0)
    assert str(record.source) == "t[2]@4"


class FakeConsumer:
    """getmany hands out the given batches, then nothing; commits are recorded in order."""

    def __init__(self, batches: list[list[SimpleNamespace]]) -> None:
        self.batches = batches
        self.commits: list[dict[TopicPartition, int]] = []
        self.stopped = False

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[SimpleNamespace]]:
        await asyncio.sleep(0)
        batch = self.batches.pop(0) if self.batches else []
        if not batch:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        if len(batch) > max_records:
            self.batches.insert(0, batch[max_records:])
        return {TopicPartition("t", 0): batch[:max_records]}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", 0)}

    async def stop(self) -> None:
        self.stopped = True


class SlowWriter:
    """Records the order of prepare/write starts and ends; each write waits until released."""

    def __init__(self, stopping: asyncio.Event, windows: int) -> None:
        self.log: list[str] = []
        self.release = asyncio.Event()
        self.stopping = stopping
        self.windows = windows

    async def prepare(self, records: list[InRecord]) -> int:
        self.log.append(f"prepare {records[0].offset}")
        return records[0].offset

    async def write(self, first_offset: int) -> WindowReport:
        self.log.append(f"write {first_offset}")
        if first_offset == 0:
            await self.release.wait()
        self.log.append(f"written {first_offset}")
        if first_offset == (self.windows - 1) * 10:
            self.stopping.set()
        return WindowReport(records=10)


def messages(start: int) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(topic="t", partition=0, offset=o, key=None, value=b"x", timestamp=0)
        for o in range(start, start + 10)
    ]


async def test_the_next_window_is_prepared_while_one_is_written_and_commits_stay_in_order() -> None:
    stopping = asyncio.Event()
    writer = SlowWriter(stopping, windows=3)
    consumer = FakeConsumer([messages(0), messages(10), messages(20)])
    settings = Settings(window_size=10, window_ms=5)
    engine = BatchEngine(settings, writer, ["t"], group_id="g")
    run = asyncio.create_task(engine.run(stopping, consumer))  # type: ignore[arg-type]
    while "prepare 10" not in writer.log:
        await asyncio.sleep(0.001)
    assert "written 0" not in writer.log  # window 1 was prepared while window 0's write was still waiting
    assert "write 10" not in writer.log  # ... but is not written before window 0 is done
    assert consumer.commits == []
    writer.release.set()
    await asyncio.wait_for(run, 5)
    assert writer.log.index("written 0") < writer.log.index("write 10") < writer.log.index("write 20")
    assert consumer.commits == [
        {TopicPartition("t", 0): 10},
        {TopicPartition("t", 0): 20},
        {TopicPartition("t", 0): 30},
    ]
    assert consumer.stopped and engine.windows == 3


async def test_a_window_that_is_not_full_is_written_before_the_next_is_taken() -> None:
    stopping = asyncio.Event()
    writer = SlowWriter(stopping, windows=2)
    writer.release.set()
    consumer = FakeConsumer([messages(0)[:5], [], messages(10)])  # 5 of 10, then nothing: the worker caught up
    engine = BatchEngine(Settings(window_size=10, window_ms=5), writer, ["t"], group_id="g")
    await asyncio.wait_for(engine.run(stopping, consumer), 5)  # type: ignore[arg-type]
    assert writer.log[:4] == ["prepare 0", "write 0", "written 0", "prepare 10"]


async def test_without_overlap_windows_are_prepared_after_the_previous_write() -> None:
    stopping = asyncio.Event()
    writer = SlowWriter(stopping, windows=2)
    writer.release.set()
    consumer = FakeConsumer([messages(0), messages(10)])
    engine = BatchEngine(Settings(window_size=10, window_ms=5), writer, ["t"], group_id="g", overlap=False)
    await asyncio.wait_for(engine.run(stopping, consumer), 5)  # type: ignore[arg-type]
    assert writer.log == ["prepare 0", "write 0", "written 0", "prepare 10", "write 10", "written 10"]
    assert len(consumer.commits) == 2


async def test_a_failed_write_is_not_committed_and_stops_the_engine() -> None:
    class Failing(SlowWriter):
        async def write(self, first_offset: int) -> WindowReport:
            raise RuntimeError("store exploded")

    stopping = asyncio.Event()
    consumer = FakeConsumer([messages(0), messages(10)])
    engine = BatchEngine(Settings(window_size=10, window_ms=5), Failing(stopping, 2), ["t"], group_id="g")
    with pytest.raises(RuntimeError, match="store exploded"):
        await asyncio.wait_for(engine.run(stopping, consumer), 5)  # type: ignore[arg-type]
    assert consumer.commits == [] and consumer.stopped
