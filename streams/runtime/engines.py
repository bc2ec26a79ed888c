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
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer

from infra.kafka import start_consumer
from infra.kafka import to_in_record as to_record
from infra.settings import Settings
from processors.counters import WindowReport
from processors.model import InRecord
from processors.timings import StageTimings, describe
from streams.runtime.loop import Batching, Committed, ConsumeLoop, NoHooks, next_offsets

log = logging.getLogger("memstream.engine")

TIMINGS_EVERY_S = 5.0  # how often an engine given timings logs where its windows' time went


class WindowProcessor(Protocol):
    """What an engine drives: ``prepare`` (decode, embed: no store touched), then ``write``."""

    async def prepare(self, records: Sequence[InRecord]) -> Any: ...

    async def write(self, prepared: Any) -> WindowReport: ...


class BatchEngine(NoHooks):
    """Consumes into windows of up to ``window_records`` records or ``window_ms`` of waiting, on the one consume
    loop (streams/runtime/loop.py): each window committed only after its write returned, a revocation held until
    the window in hand is committed.

    Under a backlog (the window came back full) the next window is fetched and prepared (decoded, embedded) while
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
        window = Batching(settings.window_records, wait_ms=settings.window_ms, linger_ms=settings.window_ms)
        self.loop = ConsumeLoop(
            self,
            window,
            member="worker",
            overlap=overlap,
            timings=timings,
            redo="the window will be processed again",
            logger=log,
        )

    async def run(self, stopping: asyncio.Event, consumer: AIOKafkaConsumer | None = None) -> None:
        consumer = consumer or await start_consumer(
            self.settings,
            self.topics,
            group_id=self.group_id,
            fetch_wait_ms=self.fetch_wait_ms,
            listener=self.loop.fence("batch engine"),
        )
        log.info("batch engine consuming %s as group %s", ", ".join(self.topics), self.group_id)
        await self.loop.run(consumer, stopping)

    async def prepare(self, records: Sequence[InRecord]) -> Any:
        return await self.processor.prepare(records)

    async def write(self, prepared: Any) -> WindowReport:
        return await self.processor.write(prepared)

    async def committed(self, batch: Committed) -> None:
        self.windows += 1
        self._log_timings()
        if self.on_window is not None:
            self.on_window(batch.result, batch.seconds)

    def _log_timings(self) -> None:
        if self.timings is None:
            return
        windows = self.timings.count("window")
        summary = self.timings.take_every(TIMINGS_EVERY_S)
        if summary is not None:
            log.info("%d windows of %s, p50/p99/max ms: %s", windows, ", ".join(self.topics), describe(summary))


__all__ = ["BatchEngine", "WindowProcessor", "next_offsets", "to_record"]
