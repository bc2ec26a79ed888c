"""The faust application: worker lifecycle, the ingest processor as a thin agent or a batch engine.

``memstream worker`` runs this app under faust's Worker, which owns the event loop, signals (SIGINT and
SIGTERM stop it cleanly: the window in hand is finished and committed first) and logging.

The long-running consumers of memstream's own (the batch engine's ingest and compensation consumers, the index
sink) run on the one consume loop (streams/runtime/loop.py). The faust agents (``MEMSTREAM_ENGINE=faust``'s
ingest, the dead-letter monitor, reconcile requests) are consumed and committed by faust, on the app's group:
moving them would move their committed offsets to another group.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import faust
from mode import Service

from infra.kafka import BACKGROUND_FETCH_WAIT_MS, ssl_context
from infra.kafka import to_in_record as to_record
from infra.settings import Settings
from processors.compensation import CompensationProcessor, PreparedCompensations
from processors.model import InRecord
from processors.pipeline import (
    DeadLetterMonitor,
    PreparedWindow,
    WindowReport,
    add_counts,
    dead_letter,
    now_ms,
    with_retries,
)
from schemas.consistency import ReconcileReport, ReconcileRequest, decode_reconcile
from schemas.errors import MemStreamError, SchemaError
from schemas.events import encode
from streams.runtime.context_stream import ContextMaintainer
from streams.runtime.engines import BatchEngine
from streams.runtime.reading import ReadService
from streams.runtime.sink import IndexSink, make_index_processor, wait_for_index
from streams.runtime.stores import Runtime, make_reconciler

log = logging.getLogger("memstream.worker")

STOP_GRACE_S = 15.0
WATCH_EVERY_S = 2.0  # how soon a Redis that lost its data is noticed
# The timer's reconciliations take at most this share of the process running them: each folds the whole log and
# scans both stores, ~4 minutes at 1M memories on 2 cores, in the index sink's process (it fell behind and its RSS
# grew by a gigabyte while a 5-minute timer ran them back to back). Requests for a reason (Redis lost its data,
# an operator's `memstream reconcile`) always run.
TIMER_RECONCILE_SHARE = 0.1


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
        **faust_credentials(settings),
    }


def faust_credentials(settings: Settings) -> dict[str, Any]:
    """The broker's SASL/TLS credentials in faust's terms (the same settings every aiokafka client gets)."""
    context = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL_"):
        credentials: Any = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
        return {"broker_credentials": credentials}
    if context is not None:
        return {"broker_credentials": faust.SSLCredentials(context)}
    return {}


class WorkerService(Service):
    """Opens the runtime, runs the hot window, and on stop lets the window in hand finish."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.runtime: Runtime | None = None
        # keeps read context blocks current (streams/runtime/context_stream.py)
        self.context: ContextMaintainer | None = None
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.engine_done = asyncio.Event()
        self.compensation_done = asyncio.Event()
        self.sink_done = asyncio.Event()
        self.sink: IndexSink | None = None
        self.windows = 0
        self.events = 0
        self.gc_pauses = GcPauses()
        self.last_reconcile: tuple[float, float] | None = None  # (when it finished, its seconds), time.monotonic

    async def on_start(self) -> None:
        settings = self.settings
        # The ingest path never writes LanceDB: the index sink does (here, or in a process of its own).
        self.runtime = await Runtime.open(settings, index=False)
        self.gc_pauses = tune_gc()
        if settings.runs_ingest and settings.embedder == "minilm":
            await asyncio.to_thread(self.runtime.stores.embedder.embedder.embed_sync, ["warm up"])  # type: ignore[attr-defined]
        # Both roles move generations: ingest when a window writes Redis, the sink when LanceDB takes rows out of the
        # fresh tail. Each process keeps current the blocks of the scopes it moved (read blocks only, debounced);
        # with the roles in two processes, the sink's scopes would otherwise wait for the next read to rebuild them.
        self.context = ContextMaintainer(ReadService(self.runtime.stores))
        self.add_future(self.context.run(self.stopping))
        self.ready.set()
        log.info(
            "worker ready: role=%s engine=%s window=%d/%dms embedder=%s topics=%s*",
            settings.worker_role,
            settings.engine,
            settings.window_records,
            settings.window_ms,
            self.runtime.stores.embedder.model,
            settings.topic_prefix,
        )
        if settings.runs_ingest and settings.engine == "batch":
            self.add_future(self._run_batch_engine())
        else:
            self.engine_done.set()
        if settings.runs_ingest:
            self.add_future(self._run_compensations())
            self.add_future(self._watch())
        else:
            self.compensation_done.set()
        if settings.runs_sink:
            self.add_future(self._run_sink())
        else:
            self.sink_done.set()

    async def _run_sink(self) -> None:
        """The index sink: the embedded topic into LanceDB on its own consumer group (streams/runtime/sink.py)."""
        assert self.runtime is not None
        try:
            processor = make_index_processor(self.settings, self.runtime.stores, self.runtime.publisher)
            self.sink = IndexSink(self.settings, self.runtime.stores, processor)
            if self.context is not None:
                self.sink.on_indexed = self.context.note_scopes
            await self.sink.run(self.stopping)
        finally:
            self.sink_done.set()

    async def _run_batch_engine(self) -> None:
        try:
            engine = BatchEngine(
                self.settings,
                self,
                [self.settings.topics.events],
                group_id=self.settings.group_id,
                on_window=self.note_window,
                timings=self.runtime.ingest.timings if self.runtime is not None else None,
            )
            await engine.run(self.stopping)
        finally:
            self.engine_done.set()

    async def _run_compensations(self) -> None:
        """Failed store writes, retried on their own consumer group so they never wait behind ingestion."""
        assert self.runtime is not None
        try:
            engine = BatchEngine(
                self.settings,
                CompensationEngineAdapter(self.runtime.compensation, self.stopping),
                [self.settings.topics.compensations],
                group_id=f"{self.settings.group_id}.compensations",
                fetch_wait_ms=BACKGROUND_FETCH_WAIT_MS,
            )
            await engine.run(self.stopping)
        finally:
            self.compensation_done.set()

    async def _watch(self) -> None:
        """Asks for a reconciliation on the timer, and at once when Redis comes back without our data."""
        assert self.runtime is not None
        interval = self.settings.reconcile_interval_s
        last = time.monotonic()
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), WATCH_EVERY_S)
            if self.stopping.is_set():
                return
            try:
                lost = await self.runtime.stores.cache.claim_sentinel(str(time.time()))
            except MemStreamError:
                continue  # Redis is down: compensations hold its writes; check again when it is back
            reason = "redis-lost-data" if lost else "timer"
            if lost or (interval and time.monotonic() - last >= interval):
                if lost:
                    log.warning("Redis holds none of our data (restarted empty?): requesting a reconciliation")
                await request_reconcile(self.runtime, ReconcileRequest(uuid.uuid4().hex, now_ms(), reason=reason))
                last = time.monotonic()

    async def handle_reconcile(self, record: InRecord) -> None:
        """One record of the reconcile topic: run a request, publish its report; reports are ignored."""
        assert self.runtime is not None
        try:
            message = decode_reconcile(record.value)
        except SchemaError as exc:
            log.warning("dead-lettering %s: %s", record.source, exc)
            letter = dead_letter(record, exc, stage="reconcile")
            await self.runtime.publisher.publish(self.settings.topics.dlq, [(letter.key, encode(letter))])
            return
        if isinstance(message, ReconcileReport):
            return
        if message.reason == "timer" and self.timer_reconcile_too_soon(message.request_id):
            await add_counts(self.runtime.stores.counters, {"reconciles_skipped": 1})
            return
        log.info(
            "reconcile request %s from %s: %s (%s)",
            message.request_id,
            record.source,
            message.describe(),
            message.reason,
        )
        # The sink's lag is not a difference: let it catch up first (what is still in the fresh tail after the
        # grace period is compared like anything else). A stopping worker does not wait: its sink may have stopped
        # already, and Ctrl-C waited out the whole grace (60 s) for a tail that could not drain
        left = await wait_for_index(
            self.runtime.stores, timeout=float(self.settings.reconcile_grace_s), stopping=lambda: self.should_stop
        )
        if left and message.reason == "timer":
            # a bulk load: the sink's lag would be taken for differences, and the fold of a log growing by
            # thousands of events a second took minutes and a gigabyte of the sink's process at 1M (issue 23)
            log.warning(
                "timer reconciliation %s skipped: %d memories not yet in LanceDB after %ds (the index sink is "
                "behind); the next timer asks again",
                message.request_id,
                left,
                self.settings.reconcile_grace_s,
            )
            await add_counts(self.runtime.stores.counters, {"reconciles_skipped": 1})
            return
        if left:
            log.warning("reconciling with %d memories not yet in LanceDB (the index sink is behind)", left)
        started = time.monotonic()
        try:
            report = await make_reconciler(self.settings, self.runtime.stores).run(message)
        except MemStreamError as exc:
            log.error("reconciliation %s failed: %s", message.request_id, exc)
            now = now_ms()
            report = ReconcileReport(message.request_id, now, now, message.describe(), False, {}, (f"failed: {exc}",))
        finished = time.monotonic()
        self.last_reconcile = (finished, finished - started)
        try:
            await self.runtime.publisher.publish(self.settings.topics.reconcile, [(report.key, encode(report))])
        except MemStreamError as exc:
            if not self.should_stop:
                raise
            log.warning("reconciliation %s: report not published, the worker is stopping (%s)", report.request_id, exc)
            return
        await add_counts(
            self.runtime.stores.counters, {"reconciles": 1, "reconcile_repaired": report.counts.get("repaired", 0)}
        )

    def timer_reconcile_too_soon(self, request_id: str) -> bool:
        """Whether a timer's request comes before the last reconciliation's cost allows (TIMER_RECONCILE_SHARE):
        then it is skipped (said so in the log, counted as ``reconciles_skipped``); the next timer asks again."""
        if self.last_reconcile is None:
            return False
        finished, seconds = self.last_reconcile
        wait_s = seconds / TIMER_RECONCILE_SHARE - seconds
        since = time.monotonic() - finished
        if since >= wait_s:
            return False
        log.info(
            "timer reconciliation %s skipped: the last one took %.0fs and finished %.0fs ago (the timer's share of "
            "this process is at most %.0f%%: the next runs from %.0fs after it)",
            request_id,
            seconds,
            since,
            TIMER_RECONCILE_SHARE * 100,
            wait_s,
        )
        return True

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
        if self.context is not None:
            self.context.note(report.changes)
        log.debug("window of %d records in %.1f ms", report.records, seconds * 1000)

    async def on_stop(self) -> None:
        self.stopping.set()
        if self.context is not None:
            self.context.wake()
        try:
            done = (self.engine_done.wait(), self.compensation_done.wait(), self.sink_done.wait())
            await asyncio.wait_for(asyncio.gather(*done), STOP_GRACE_S)
        except TimeoutError:
            log.warning("the window in hand did not finish within %.0fs; it will be processed again", STOP_GRACE_S)
        if self.runtime is not None:
            await self.runtime.close()
        log.info("worker stopped after %d windows, %d records; %s", self.windows, self.events, self.gc_pauses)


class GcPauses:
    """Time the cyclic garbage collector stops the worker, per generation (reported when it stops)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self.count[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._started

    def __str__(self) -> str:
        return (
            f"gc pauses {sum(self.count)} ({sum(self.seconds):.2f}s in all, {self.seconds[2]:.2f}s in full collections)"
        )


def tune_gc() -> GcPauses:
    """Freeze what start-up loaded and collect far less often.

    Measured on 200,000 events with the hash embedder: with the default thresholds the collector ran 3,416
    times and stopped the worker for 5.1 s (26 full collections, 4.0 s, ~150 ms each: latency spikes); after
    ``gc.freeze()`` and a first threshold of 50,000 it ran 5 times for 0.1 s. Almost everything a window
    allocates is freed by reference counting, so collecting less costs little memory.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    return pauses


def make_app(settings: Settings) -> tuple[faust.App, WorkerService]:
    """The worker of ``settings.worker_role``: ingest agents (events, dead letters) where it ingests, the reconcile
    agent where the index sink runs (repairs write LanceDB, which only the sink's process may). A sink alone is an
    app of its own (its own faust group), so that its agents are never shared out to ingest-only workers."""
    (settings.home / "faust").mkdir(parents=True, exist_ok=True)
    app_id = f"{settings.group_id}-sink-app" if settings.worker_role == "sink" else f"{settings.group_id}-app"
    app = faust.App(app_id, **faust_settings(settings))
    service = WorkerService(settings, loop=None)
    app.service(service)  # type: ignore[arg-type]  # faust accepts instances too
    if settings.runs_ingest:
        if settings.engine == "faust":
            add_ingest_agent(app, service, settings)
        add_dead_letter_agent(app, service, settings)
    if settings.runs_sink:
        add_reconcile_agent(app, service, settings)
    return app, service


def add_reconcile_agent(app: faust.App, service: WorkerService, settings: Settings) -> None:
    """A thin agent on the reconcile topic: each request is run and answered with a report."""
    topic = app.topic(settings.topics.reconcile, value_serializer="raw", key_serializer="raw")

    async def reconcile(stream: Any) -> None:
        await service.ready.wait()
        async for event in stream.events():
            await service.handle_reconcile(to_record(event.message))

    app.agent(topic, name="reconcile")(reconcile)


class CompensationEngineAdapter:
    """The compensation processor under the batch engine, with backoff waits cut short by shutdown."""

    def __init__(self, processor: CompensationProcessor, stopping: asyncio.Event) -> None:
        self.processor = processor
        self.stopping = stopping
        processor.sleep = self.sleep

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def prepare(self, records: Sequence[InRecord]) -> PreparedCompensations:
        return await self.processor.prepare(records)

    async def write(self, prepared: PreparedCompensations) -> WindowReport:
        return await self.processor.write(prepared)


async def request_reconcile(runtime: Runtime, request: ReconcileRequest) -> None:
    await runtime.publisher.publish(runtime.settings.topics.reconcile, [(request.key, encode(request))])


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
