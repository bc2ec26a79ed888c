"""The one consume loop every long-running consumer group member runs: the ingest engine, the compensation
consumer and the index sink.

Per batch: take records by size and linger (:func:`take_batch`), ``prepare`` them (decode, embed: no store
touched), ``write`` them, and commit their offsets only after the write returned; a write that raises is never
committed (its records come again after a restart or a rebalance, and the version-guarded writes make that
harmless). Between batches, never beside a write, the handler's ``between_batches`` hook runs (the index sink's
LanceDB maintenance and sweeps).

Partitions are given up only between batches: :meth:`ConsumeLoop.fence` is the consumer's rebalance listener,
and its revocation callback waits for the lock that a write, its commit and the hook hold. A batch taken while
its partitions were revoked is dropped before its write (the new owner starts from the committed offsets).

Modelled on quix-streams' sinks (``add`` then ``flush``; a checkpoint flushes, then commits) and faststream's one
consume loop per subscriber. The one-shot readers do not use it: :class:`infra.log_reader.LogReader` reads
assigned partitions to their end offsets and never commits, and :class:`streams.runtime.changes.ChangeFeed` is a
pull iterator whose caller decides when to commit (both say so in their docstrings).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from infra.kafka import getmany
from infra.kafka import to_in_record as to_record
from processors.clock import now_ms
from processors.model import InRecord
from processors.pipeline import describe_window
from processors.timings import StageTimings

log = logging.getLogger("memstream.loop")


def next_offsets(records: Sequence[InRecord]) -> dict[TopicPartition, int]:
    """The offsets to commit after a batch: one past the last record of each partition."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last = r.offset if r.last_offset is None else r.last_offset  # a poison batch stands for a range
        out[tp] = max(out.get(tp, 0), last + 1)
    return out


@dataclass(frozen=True, slots=True)
class Batching:
    """How a batch is taken: up to ``max_records``; ``wait_ms`` for the first records, then more for up to
    ``linger_ms`` after them (0: what one fetch brought)."""

    max_records: int
    wait_ms: int
    linger_ms: int


@dataclass(frozen=True, slots=True)
class Committed:
    """A batch written and committed (``commit_ok``: False when the commit failed after the write)."""

    records: Sequence[InRecord]
    result: Any  # what ``write`` returned
    positions: dict[TopicPartition, int]
    seconds: float  # from the start of its prepare to its commit's end
    commit_s: float
    commit_ok: bool


class BatchHandler(Protocol):
    """What the loop drives. ``prepare`` may run while the previous batch is written (``overlap``); ``write`` and
    ``committed`` run one batch at a time, in order, under the loop's lock, as ``between_batches`` does."""

    async def prepare(self, records: Sequence[InRecord]) -> Any: ...

    async def write(self, prepared: Any) -> Any: ...

    async def committed(self, batch: Committed) -> None: ...

    async def between_batches(self, consumer: AIOKafkaConsumer, *, idle: bool) -> None: ...


class NoHooks:
    """``committed`` and ``between_batches`` doing nothing, for handlers that need neither."""

    async def committed(self, batch: Committed) -> None:
        return None

    async def between_batches(self, consumer: AIOKafkaConsumer, *, idle: bool) -> None:
        return None


def _names(partitions: Any) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))


class Fence(ConsumerRebalanceListener):  # type: ignore[misc]
    """Partitions are given up only between batches: the batch in hand is written and committed first."""

    def __init__(self, loop: ConsumeLoop, who: str, standby: str | None = None) -> None:
        self.loop = loop
        self.who = who
        self.standby = standby  # logged when a rebalance leaves this member nothing (None: not logged)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.loop.writing:
            if revoked:
                self.loop.log.info("%s gives up %s", self.who, _names(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self.loop.log.info("%s owns %s", self.who, _names(assigned))
        elif self.standby is not None:
            self.loop.log.info("%s %s", self.who, self.standby)


class ConsumeLoop:
    """Runs one consumer until ``stopping``: see the module docstring.

    ``overlap``: under a backlog (a batch came back full) the next batch is taken and prepared while this one is
    written (the ingest engine: the write mostly waits on Redis and the broker's acks); a batch that is not full
    means the consumer caught up, and it is written before the next is taken. The hook runs only once no write
    is in flight. ``redo``: what the commit-failure warning says happens to the batch.
    """

    def __init__(
        self,
        handler: BatchHandler,
        batching: Batching,
        *,
        member: str = "member",
        overlap: bool = False,
        timings: StageTimings | None = None,
        redo: str = "it will be processed again",
        logger: logging.Logger | None = None,
    ) -> None:
        self.handler = handler
        self.batching = batching
        self.member = member  # "dropping ...: its partitions moved to another <member>"
        self.overlap = overlap
        self.timings = timings  # queued, prepare, wait, write, commit, window
        self.redo = redo
        self.log = logger or log
        self.writing = asyncio.Lock()  # held by a write and its commit, and by the hook: revocations wait for it
        self.batches = 0

    def fence(self, who: str, standby: str | None = None) -> Fence:
        """The rebalance listener to subscribe the consumer with."""
        return Fence(self, who, standby)

    async def run(self, consumer: AIOKafkaConsumer, stopping: asyncio.Event) -> None:
        """Until ``stopping``; then the batch in hand is written and committed, and the consumer stopped. An error
        of a write is raised here, its batch uncommitted; the consumer is stopped in every case."""
        writing: asyncio.Task[None] | None = None
        try:
            while not stopping.is_set():
                records = await self.take(consumer)
                if not records:
                    await self._finish(writing)
                    writing = None
                    await self._between(consumer, idle=True)
                    continue
                started = time.perf_counter()
                self._time_queue(records)
                prepared = await self.handler.prepare(records)
                prepared_at = time.perf_counter()
                await self._finish(writing)  # in order: batch N is committed before N+1 is written
                self._time("prepare", prepared_at - started)
                self._time("wait", time.perf_counter() - prepared_at)
                writing = asyncio.create_task(self._write_and_commit(consumer, records, prepared, started))
                if not (self.overlap and len(records) >= self.batching.max_records):
                    await self._finish(writing)  # caught up: the next batch takes all that arrives meanwhile
                    writing = None
                    await self._between(consumer, idle=False)
            await self._finish(writing)  # stopping: the batch in hand is written and committed
            writing = None
        finally:
            if writing is not None and not writing.done():
                writing.cancel()  # only on an error or cancellation: the batch is not committed, so it comes again
                await asyncio.gather(writing, return_exceptions=True)
            await consumer.stop()

    async def take(self, consumer: AIOKafkaConsumer) -> list[InRecord]:
        b = self.batching
        return await take_batch(consumer, b.max_records, wait_ms=b.wait_ms, linger_ms=b.linger_ms)

    @staticmethod
    async def _finish(writing: asyncio.Task[None] | None) -> None:
        """Wait for the batch being written; its error, if any, is raised here."""
        if writing is not None:
            await writing

    async def _between(self, consumer: AIOKafkaConsumer, *, idle: bool) -> None:
        async with self.writing:
            await self.handler.between_batches(consumer, idle=idle)

    async def _write_and_commit(
        self, consumer: AIOKafkaConsumer, records: Sequence[InRecord], prepared: Any, started: float
    ) -> None:
        async with self.writing:
            positions = next_offsets(records)
            owned = consumer.assignment()
            if any(tp not in owned for tp in positions):
                # given up while it was taken: the new owner starts from the committed offsets and writes these
                self.log.info("dropping %s: its partitions moved to another %s", describe_window(records), self.member)
                return
            writing = time.perf_counter()
            result = await self.handler.write(prepared)
            committing = time.perf_counter()
            ok = await self.commit(consumer, positions, records)
            done = time.perf_counter()
            self.batches += 1
            self._time("write", committing - writing)
            self._time("commit", done - committing)
            self._time("window", done - started)
            await self.handler.committed(Committed(records, result, positions, done - started, done - committing, ok))

    async def commit(
        self, consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int], records: Sequence[InRecord]
    ) -> bool:
        try:
            await consumer.commit(positions)
        except (CommitFailedError, KafkaError) as exc:
            # The partitions moved to another member: it processes the batch again, and the version-guarded
            # writes make that harmless.
            self.log.warning("commit of %s failed (%s); %s", describe_window(records), exc, self.redo)
            return False
        return True

    def _time(self, stage: str, seconds: float) -> None:
        if self.timings is not None:
            self.timings.add(stage, seconds * 1000)

    def _time_queue(self, records: Sequence[InRecord]) -> None:
        """Each record's age when its batch was taken: per record, so that a batch gathered behind a stall weighs
        by the records that waited in it, as an end-to-end latency does."""
        if self.timings is not None:
            now = now_ms()
            for r in records:
                if r.timestamp > 0:
                    self.timings.add("queued", max(0, now - r.timestamp))


async def take_batch(consumer: AIOKafkaConsumer, limit: int, *, wait_ms: int, linger_ms: int) -> list[InRecord]:
    """Up to ``limit`` records: waits ``wait_ms`` for the first, then gathers more for up to ``linger_ms`` after
    them. Under a backlog the batch fills at once; under a trickle the linger turns many small writes into a few
    larger ones (for the index sink: a ``merge_insert`` into a big table costs a fixed amount of work however few
    its rows; at 2,000 events/s on a 1M-row table: ~7 merges a second, the worker at 93% of a core; with a 1 s
    linger, ~1 a second and 53%). A fetch that brings nothing ends the batch."""
    records: list[InRecord] = []
    deadline = 0.0
    while len(records) < limit:
        if records:
            wait = int((deadline - time.monotonic()) * 1000)
            if wait <= 0:
                break
        else:
            wait = wait_ms
        fetched = await getmany(consumer, timeout_ms=max(1, wait), max_records=limit - len(records))
        got = [to_record(m) for messages in fetched.values() for m in messages]
        if not got:
            break
        if not records:
            deadline = time.monotonic() + linger_ms / 1000
        records += got
    return records


__all__ = [
    "BatchHandler",
    "Batching",
    "Committed",
    "ConsumeLoop",
    "Fence",
    "NoHooks",
    "next_offsets",
    "take_batch",
]
