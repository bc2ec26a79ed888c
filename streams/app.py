"""The faust application: worker lifecycle, the ingest processor as a thin agent or a batch engine.

``memstream worker`` runs this app under faust's Worker, which owns the event loop, signals (SIGINT and
SIGTERM stop it cleanly: the window in hand is finished and committed first) and logging.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
from mode import Service

from infra.kafka import to_in_record as to_record
from infra.settings import Settings
from processors.model import InRecord
from processors.pipeline import DeadLetterMonitor, PreparedWindow, WindowReport, with_retries
from schemas.errors import MemStreamError
from streams.engines import BatchEngine
from streams.runtime import Runtime

log = logging.getLogger("memstream.worker")

STOP_GRACE_S = 15.0


def faust_settings(settings: Settings) -> dict[str, Any]:
    """faust tuned for a fast start (measured: 31 s by default, ~7 s like this, most of it the group join)."""
    return {
        "broker": f"kafka://{settings.kafka_bootstrap}",
        "store": "memory://",
        "web_enabled": False,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "topic_disable_leader": True,
        "consumer_auto_offset_reset": "earliest",
        "stream_wait_empty": False,
        "stream_recovery_delay": 0.0,
        "broker_session_timeout": 10.0,
        "broker_heartbeat_interval": 1.0,
        "broker_rebalance_timeout": 10.0,
        "broker_commit_every": 10_000,
        "broker_max_poll_records": settings.window_records,
        "producer_acks": -1 if settings.acks == "all" else int(settings.acks),
        "datadir": str(settings.home / "faust"),
    }


class WorkerService(Service):
    """Opens the runtime, runs the hot window, and on stop lets the window in hand finish."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.runtime: Runtime | None = None
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.engine_done = asyncio.Event()
        self.windows = 0
        self.events = 0

    async def on_start(self) -> None:
        self.runtime = await Runtime.open(self.settings)
        if self.settings.embedder == "minilm":
            await asyncio.to_thread(self.runtime.stores.embedder.embedder.embed_sync, ["warm up"])  # type: ignore[attr-defined]
        self.ready.set()
        log.info(
            "worker ready: engine=%s window=%d/%dms embedder=%s topics=%s*",
            self.settings.engine,
            self.settings.window_records,
            self.settings.window_ms,
            self.runtime.stores.embedder.model,
            self.settings.topic_prefix,
        )
        if self.settings.engine == "batch":
            self.add_future(self._run_batch_engine())
        else:
            self.engine_done.set()

    async def _run_batch_engine(self) -> None:
        try:
            engine = BatchEngine(
                self.settings,
                self,
                [self.settings.topics.events],
                group_id=self.settings.group_id,
                on_window=self.note_window,
            )
            await engine.run(self.stopping)
        finally:
            self.engine_done.set()

    async def prepare(self, window: Sequence[InRecord]) -> PreparedWindow:
        assert self.runtime is not None
        return await self.runtime.ingest.prepare(window)

    async def write(self, prepared: PreparedWindow) -> WindowReport:
        assert self.runtime is not None
        # A rebuild or migration may have switched the serving generation: write where readers now read.
        # A generation of another model cannot be followed; the window waits (retried) until a restart.
        runtime = self.runtime
        await with_retries(
            f"following the active generation for {prepared.where}",
            runtime.follow_active,
            runtime.materializer.retry,
            runtime.materializer.sleep,
        )
        try:
            return await self.runtime.ingest.write(prepared)
        except MemStreamError as exc:
            if exc.retriable:
                raise
            return await self.runtime.ingest.quarantine(prepared.records, exc)

    async def handle(self, window: Sequence[InRecord]) -> WindowReport:
        return await self.write(await self.prepare(window))

    def note_window(self, report: WindowReport, seconds: float) -> None:
        self.windows += 1
        self.events += report.records
        log.debug("window of %d records in %.1f ms", report.records, seconds * 1000)

    async def on_stop(self) -> None:
        self.stopping.set()
        try:
            await asyncio.wait_for(self.engine_done.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("the window in hand did not finish within %.0fs; it will be processed again", STOP_GRACE_S)
        if self.runtime is not None:
            await self.runtime.close()
        log.info("worker stopped after %d windows, %d records", self.windows, self.events)


def make_app(settings: Settings) -> tuple[faust.App, WorkerService]:
    (settings.home / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(f"{settings.group_id}-app", **faust_settings(settings))
    service = WorkerService(settings, loop=None)
    app.service(service)  # type: ignore[arg-type]  # faust accepts instances too
    if settings.engine == "faust":
        add_ingest_agent(app, service, settings)
    add_dead_letter_agent(app, service, settings)
    return app, service


def add_dead_letter_agent(app: faust.App, service: WorkerService, settings: Settings) -> None:
    """A thin agent on the dead-letter topic: every dead letter is logged with its origin and counted."""
    topic = app.topic(settings.topics.dlq, value_serializer="raw", key_serializer="raw")

    async def dead_letters(stream: Any) -> None:
        await service.ready.wait()
        assert service.runtime is not None
        monitor = DeadLetterMonitor(service.runtime.stores.counters)
        async for events in stream.take_events(500, within=1.0):
            await monitor.process([to_record(e.message) for e in events])

    app.agent(topic, name="dead_letters")(dead_letters)


def add_ingest_agent(app: faust.App, service: WorkerService, settings: Settings) -> None:
    """The thin agent: take a window, hand it to the processor. faust acks it after the body returns."""
    topic = app.topic(settings.topics.events, value_serializer="raw", key_serializer="raw")

    async def ingest(stream: Any) -> None:
        await service.ready.wait()
        async for events in stream.take_events(settings.window_records, within=settings.window_ms / 1000):
            started = time.perf_counter()
            report = await service.handle([to_record(e.message) for e in events])
            service.note_window(report, time.perf_counter() - started)

    app.agent(topic, name="ingest")(ingest)
