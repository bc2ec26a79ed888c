"""Reading a topic as a log: assigned partitions, no consumer group, nothing committed.

Reconciliation, replay and tail read ranges of a topic without disturbing the live worker's group. "Up to
the current end" needs care on Tansu: its high watermark (``end_offsets``) under-reports (98,763 for 100,000
stored records, every one consumable; ``../shared/notes/component-limits.md``). So a partition counts as read
to its end only once its position has reached the watermark snapshot taken at the start *and* a fetch
returned nothing more for it (or returned a record written after the read began).

Not on the one consume loop (streams/runtime/loop.py): a reader has no group, so nothing to commit and no
rebalance to hold, and its reads are one-shot (to the end offsets, a range, one record) or a caller's iterator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from infra.kafka import consumer_config, getmany, to_in_record
from infra.settings import Settings
from processors.model import InRecord
from schemas.errors import BrokerError
from schemas.events import SourceRef

log = logging.getLogger("memstream.log_reader")


@dataclass(frozen=True, slots=True)
class StartAt:
    """Where a read starts: the beginning, explicit offsets per partition, a timestamp, or the end."""

    offsets: Mapping[int, int] | None = None  # partition -> first offset to read; others from the beginning
    timestamp_ms: int | None = None  # the first record at or after this time (record timestamps)
    at_end: bool = False  # only what is written from now on (``tail --from now``)

    @classmethod
    def beginning(cls) -> StartAt:
        return cls()


class LogReader:
    """A group-less consumer over every partition of one topic."""

    def __init__(self, consumer: AIOKafkaConsumer, topic: str, partitions: list[TopicPartition]) -> None:
        self.consumer = consumer
        self.topic = topic
        self.partitions = partitions
        self.not_before_ms: int | None = None  # records older than this are skipped (starts by time)

    @classmethod
    async def open(cls, settings: Settings, topic: str) -> LogReader:
        consumer = AIOKafkaConsumer(**consumer_config(settings, group_id=None))
        try:
            await consumer.start()
            numbers = await _partitions_of(consumer, topic)
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerError(f"cannot read {topic} from {settings.kafka_bootstrap}: {exc}") from exc
        except BaseException:
            await consumer.stop()
            raise
        partitions = [TopicPartition(topic, p) for p in numbers]
        consumer.assign(partitions)
        return cls(consumer, topic, partitions)

    async def close(self) -> None:
        await self.consumer.stop()

    async def __aenter__(self) -> LogReader:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def seek(self, start: StartAt) -> None:
        """Position every partition where ``start`` says."""
        self.not_before_ms = None
        try:
            if start.at_end:
                # not seek_to_end(): Tansu's end offset lags the real end, which would replay a few records
                await self._seek_to_time(int(time.time() * 1000))
                return
            await self.consumer.seek_to_beginning(*self.partitions)
            if start.offsets:
                for tp in self.partitions:
                    if tp.partition in start.offsets:
                        self.consumer.seek(tp, start.offsets[tp.partition])
            if start.timestamp_ms is not None:
                await self._seek_to_time(start.timestamp_ms)
        except KafkaError as exc:
            raise BrokerError(f"cannot position the reader on {self.topic}: {exc}") from exc

    async def _seek_to_time(self, timestamp_ms: int) -> None:
        self.not_before_ms = timestamp_ms
        found = await self.consumer.offsets_for_times({tp: timestamp_ms for tp in self.partitions})
        for tp in self.partitions:
            hit = found.get(tp)
            if hit is None:  # nothing at or after that time: from the (lagging) end, skipping older records
                await self.consumer.seek_to_end(tp)
            else:
                self.consumer.seek(tp, hit.offset)

    async def watermarks(self) -> dict[int, int]:
        """The broker's end offsets (a lower bound on Tansu, see the module docstring)."""
        try:
            ends = await self.consumer.end_offsets(self.partitions)
        except KafkaError as exc:
            raise BrokerError(f"cannot read the end offsets of {self.topic}: {exc}") from exc
        return {tp.partition: off for tp, off in ends.items()}

    async def beginnings(self) -> dict[int, int]:
        """The first offset still held per partition: above 0 once retention has removed records."""
        try:
            starts = await self.consumer.beginning_offsets(self.partitions)
        except KafkaError as exc:
            raise BrokerError(f"cannot read the start offsets of {self.topic}: {exc}") from exc
        return {tp.partition: off for tp, off in starts.items()}

    async def read_to_end(self, *, batch: int = 5000, idle_ms: int = 0) -> AsyncIterator[list[InRecord]]:
        """Yield windows of records until every partition has reached the end it had when this was called.

        Records written after the call may be included (at most up to the first one written after it began).
        """
        began_ms = int(time.time() * 1000)
        ends = await self.watermarks()
        done: set[int] = set()
        idle_s = max(idle_ms, 2 * self.consumer._fetcher._fetch_max_wait_ms) / 1000
        while len(done) < len(self.partitions):
            try:
                fetched = await getmany(self.consumer, timeout_ms=int(idle_s * 1000), max_records=batch)
            except KafkaError as exc:
                raise BrokerError(f"reading {self.topic} failed: {exc}") from exc
            out: list[InRecord] = []
            for tp, messages in fetched.items():
                if tp.partition in done:
                    continue
                for m in messages:
                    if m.timestamp > began_ms and m.offset >= ends.get(tp.partition, 0):
                        done.add(tp.partition)  # written after we began: the old end has been passed
                        self.consumer.pause(tp)
                        break
                    if self._wanted(m.timestamp):
                        out.append(to_in_record(m))
            for tp in self.partitions:
                if tp.partition not in done and tp not in fetched:
                    position = await self.consumer.position(tp)
                    if position >= ends.get(tp.partition, 0):
                        done.add(tp.partition)
                        self.consumer.pause(tp)
            if out:
                yield out
        self.consumer.resume(*self.partitions)

    async def follow(self, *, batch: int = 5000, poll_ms: int = 500) -> AsyncIterator[list[InRecord]]:
        """Yield windows of records as they arrive, until the caller stops iterating."""
        while True:
            try:
                fetched = await getmany(self.consumer, timeout_ms=poll_ms, max_records=batch)
            except KafkaError as exc:
                raise BrokerError(f"reading {self.topic} failed: {exc}") from exc
            out = [to_in_record(m) for messages in fetched.values() for m in messages if self._wanted(m.timestamp)]
            if out:
                yield out
            else:
                await asyncio.sleep(0)

    async def scan(self, partition: int, first: int, last: int) -> AsyncIterator[list[InRecord]]:
        """The records of one partition from ``first`` to ``last`` (those the log holds)."""
        tp = TopicPartition(self.topic, partition)
        self.consumer.seek(tp, first)
        empty_fetches = 0
        while empty_fetches < 3:
            try:
                fetched = await getmany(self.consumer, tp, timeout_ms=500, max_records=5000)
            except KafkaError as exc:
                raise BrokerError(f"reading {self.topic}[{partition}] failed: {exc}") from exc
            messages = fetched.get(tp, [])
            if not messages:
                empty_fetches += 1
                continue
            yield [to_in_record(m) for m in messages if m.offset <= last]
            if messages[-1].offset >= last:
                return

    def _wanted(self, timestamp_ms: int) -> bool:
        return self.not_before_ms is None or timestamp_ms >= self.not_before_ms

    async def read_one(self, partition: int, offset: int) -> InRecord | None:
        """The record at ``partition``/``offset``, or ``None`` if the log no longer (or not yet) holds it."""
        tp = TopicPartition(self.topic, partition)
        self.consumer.seek(tp, offset)
        try:
            fetched = await getmany(self.consumer, tp, timeout_ms=2_000, max_records=1)
        except KafkaError as exc:
            raise BrokerError(f"reading {self.topic}[{partition}]@{offset} failed: {exc}") from exc
        for m in fetched.get(tp, []):
            if m.offset == offset:
                return to_in_record(m)
        return None


class KafkaLogSource:
    """The reconciler's :class:`processors.reconcile.LogSource` on one topic (the embedded-events log)."""

    SCAN_ABOVE = 32  # more wanted records than this in a partition: one forward scan beats seeks

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic

    async def read(self, start: Mapping[int, int] | None) -> AsyncIterator[list[InRecord]]:
        async with await LogReader.open(self.settings, self.topic) as reader:
            await reader.seek(StartAt(offsets=start) if start else StartAt.beginning())
            async for window in reader.read_to_end():
                yield window

    async def fetch(self, refs: Sequence[SourceRef]) -> list[InRecord]:
        by_partition: dict[int, set[int]] = {}
        for ref in refs:
            by_partition.setdefault(ref.partition, set()).add(ref.offset)
        out: list[InRecord] = []
        async with await LogReader.open(self.settings, self.topic) as reader:
            for partition, offsets in sorted(by_partition.items()):
                if len(offsets) <= self.SCAN_ABOVE:
                    for offset in sorted(offsets):
                        record = await reader.read_one(partition, offset)
                        if record is not None:
                            out.append(record)
                    continue
                await reader.seek(
                    StartAt(
                        offsets={
                            p: (min(offsets) if p == partition else 1 << 62)
                            for p in (tp.partition for tp in reader.partitions)
                        }
                    )
                )
                async for window in reader.read_to_end():
                    out += [r for r in window if r.partition == partition and r.offset in offsets]
        return out

    async def complete(self) -> bool:
        async with await LogReader.open(self.settings, self.topic) as reader:
            return all(start == 0 for start in (await reader.beginnings()).values())


async def _partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """Partition numbers of ``topic``; metadata can lag a topic's creation by a moment, so ask a few times."""
    for _ in range(20):
        found = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise BrokerError(f"topic {topic} has no partitions (does it exist?)")


__all__ = ["KafkaLogSource", "LogReader", "StartAt"]
