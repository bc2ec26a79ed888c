"""How windows of records reach a processor: the aiokafka batch engine (default) and the faust agent.

Both hand a window (a list of :class:`InRecord`) to the same processor and commit only after it returned,
i.e. after both stores and the broker acknowledged everything derived from the window.

Why two: faust-streaming costs ~58 µs of CPU per event before any work (17k events/s on one core, see
``shared/notes/component-limits.md``), while aiokafka's ``getmany`` costs ~1.5 µs. With the hash embedder the
whole pipeline's own work is ~20-40 µs per event, so faust alone would cap ingest near 10k events/s; the
batch engine runs the hot window with ``getmany`` inside the same faust worker. ``MEMSTREAM_ENGINE=faust``
runs the same processor as a plain faust agent with ``stream.take_events(n, within=t)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from infra.kafka import getmany, start_consumer
from infra.kafka import to_in_record as to_record
from infra.settings import Settings
from processors.model import InRecord
from processors.pipeline import WindowReport, describe_window, now_ms
from processors.timings import StageTimings, describe

log = logging.getLogger("memstream.engine")

TIMINGS_EVERY_S = 5.0  # how often an engine given timings logs where its windows' time went


def next_offsets(records: Sequence[InRecord]) -> dict[TopicPartition, int]:
    """The offsets to commit after a window: one past the last record of each partition."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last = r.offset if r.last_offset is None else r.last_offset  # a poison batch stands for a range
        out[tp] = max(out.get(tp, 0), last + 1)
    return out


class WindowProcessor(Protocol):
    """What an engine drives: ``prepare`` (decode, embed: no store touched), then ``write``."""

    async def prepare(self, records: Sequence[InRecord]) -> Any: ...

    async def write(self, prepared: Any) -> WindowReport: ...


class BatchEngine:
    """Consumes with ``getmany`` into windows of up to ``window_records`` records or ``window_ms`` of waiting.

    Windows are written one at a time and in order, each committed only after its write returned. Under a
    backlog (the window came back full) the next window is fetched and prepared (decoded, embedded) while
    this one is written: the write mostly waits on LanceDB's merge (Rust threads, off the GIL), Redis and the
    broker's acks (the main thread idled 20-28% of a 2,000-event window on them). A window that is not full
    means the worker has caught up: it is written before the next is taken, so that the next takes all that
    arrived meanwhile. Overlapping there too was measured to cost latency (p50 at 2,000 events/s 150-190 ms
    in turn, 220-260 ms overlapped): a window closed early leaves later records for the window after it.
    ``overlap=False`` always prepares and writes in turn.
    """

    def __init__(
        self,
        settings: Settings,
        processor: WindowProcessor,
        topics: Sequence[str],
        *,
        group_id: str | None,
        on_window: Callable[[WindowReport, float], None] | None = None,
        overlap: bool = True,
        timings: StageTimings | None = None,
        fetch_wait_ms: int | None = None,
    ) -> None:
        self.settings = settings
        # queued: each record's age when its window was taken (its producer's clock: skew shows here)
        self.timings = timings
        self.fetch_wait_ms = fetch_wait_ms  # None: the hot path's settings.fetch_max_wait_ms
        self.processor = processor
        self.topics = list(topics)
        self.group_id = group_id
        self.on_window = on_window
        self.overlap = overlap
        self.windows = 0

    async def run(self, stopping: asyncio.Event, consumer: AIOKafkaConsumer | None = None) -> None:
        consumer = consumer or await start_consumer(
            self.settings, self.topics, group_id=self.group_id, fetch_wait_ms=self.fetch_wait_ms
        )
        log.info("batch engine consuming %s as group %s", ", ".join(self.topics), self.group_id)
        writing: asyncio.Task[None] | None = None
        try:
            while not stopping.is_set():
                window = await self.take(consumer)
                if not window:
                    await self._finish(writing)
                    writing = None
                    continue
                started = time.perf_counter()
                self._time_queue(window)
                prepared = await self.processor.prepare(window)
                prepared_at = time.perf_counter()
                await self._finish(writing)  # in order: window N is committed before N+1 is written
                self._time("prepare", prepared_at - started)
                self._time("wait", time.perf_counter() - prepared_at)
                writing = asyncio.create_task(self._write_and_commit(consumer, window, prepared, started))
                if not (self.overlap and len(window) >= self.settings.window_records):
                    await self._finish(writing)  # caught up: the next window takes all that arrives meanwhile
                    writing = None
            await self._finish(writing)  # stopping: the window in hand is written and committed
            writing = None
        finally:
            if writing is not None and not writing.done():
                writing.cancel()  # only on an error or cancellation: the window is not committed, so it comes again
                await asyncio.gather(writing, return_exceptions=True)
            await consumer.stop()

    @staticmethod
    async def _finish(writing: asyncio.Task[None] | None) -> None:
        """Wait for the window being written; its error, if any, is raised here."""
        if writing is not None:
            await writing

    async def _write_and_commit(
        self, consumer: AIOKafkaConsumer, window: Sequence[InRecord], prepared: Any, started: float
    ) -> None:
        writing = time.perf_counter()
        report = await self.processor.write(prepared)
        committing = time.perf_counter()
        await self.commit(consumer, window)
        done = time.perf_counter()
        self.windows += 1
        self._time("write", committing - writing)
        self._time("commit", done - committing)
        self._time("window", done - started)
        self._log_timings()
        if self.on_window is not None:
            self.on_window(report, done - started)

    def _time(self, stage: str, seconds: float) -> None:
        if self.timings is not None:
            self.timings.add(stage, seconds * 1000)

    def _time_queue(self, window: Sequence[InRecord]) -> None:
        """Each record's age when its window was taken: per record, so that a window gathered behind a stall
        weighs by the records that waited in it, as an end-to-end latency does."""
        if self.timings is not None:
            now = now_ms()
            for r in window:
                if r.timestamp > 0:
                    self.timings.add("queued", max(0, now - r.timestamp))

    def _log_timings(self) -> None:
        if self.timings is None:
            return
        windows = self.timings.count("window")
        summary = self.timings.take_every(TIMINGS_EVERY_S)
        if summary is not None:
            log.info("%d windows of %s, p50/p99/max ms: %s", windows, ", ".join(self.topics), describe(summary))

    async def take(self, consumer: AIOKafkaConsumer) -> list[InRecord]:
        """One window: wait for the first records, then gather more until full or ``window_ms`` passed."""
        size = self.settings.window_records
        window_s = self.settings.window_ms / 1000
        records: list[InRecord] = []
        deadline: float | None = None
        while len(records) < size:
            remaining = window_s if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            batch = await getmany(consumer, timeout_ms=max(1, int(remaining * 1000)), max_records=size - len(records))
            got = [to_record(m) for messages in batch.values() for m in messages]
            if not got:
                break
            records += got
            if deadline is None:
                deadline = time.monotonic() + window_s
        return records

    async def commit(self, consumer: AIOKafkaConsumer, window: Sequence[InRecord]) -> None:
        try:
            await consumer.commit(next_offsets(window))
        except (CommitFailedError, KafkaError) as exc:
            # The partitions moved to another consumer: it will process the window again, and the
            # version-guarded writes make that harmless.
            log.warning("commit of %s failed (%s); the window will be processed again", describe_window(window), exc)
