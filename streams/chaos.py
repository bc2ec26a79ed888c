"""``memstream chaos``: break things on purpose, with real processes, and measure what survives.

Each scenario gets a stack of its own (a Tansu broker, a Redis with an append-only file so it can come back
with or without its data, a LanceDB directory and a ``memstream worker`` child process), publishes a
synthetic workload of adds, updates and deletes, injects its fault while the worker ingests, and then waits
until both stores hold exactly the newest published event of every memory. It reports:

- ``lost``: memories published but absent from a store, or a deleted one still live;
- ``stale``: memories a store holds at an older version than the newest published;
- ``duplicated``: extra LanceDB rows for one memory (Redis holds one hash per memory by construction);
- ``unexpected``: memories no one published, or held at a version no one published;
- ``seconds_to_converge``: from the end of the fault (and of publishing) to the first clean audit.

Scenarios: ``worker-kill`` (SIGKILL mid-window, several times, restarted each time), ``redis-outage``
(Redis stopped, restarted with its data), ``redis-wipe`` (Redis killed, restarted empty: refilled by the
reconciler), ``lancedb-faults`` (every LanceDB write fails for a while), ``poison`` (duplicated, reordered
and replayed events mixed with a burst of malformed ones), ``restart`` (the whole stack stopped and started
between two publishes, as `memstream down`/`up` or a reboot: the broker comes back with an empty log).
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from infra import services
from infra.faults import inject
from infra.kafka import KafkaPublisher, ensure_topics
from infra.log_reader import LogReader, StartAt
from infra.services import ManagedProcess
from infra.settings import Settings
from processors.model import StoreState
from processors.pipeline import COUNTER_NAMES, event_key, newest_per_memory
from processors.verify import compare
from schemas.events import MemoryEvent, Op, encode
from streams.bench_data import synthetic_events
from streams.runtime import Stores
from streams.worker_process import WorkerProcess

log = logging.getLogger("memstream.chaos")

SCENARIOS = ("worker-kill", "redis-outage", "redis-wipe", "lancedb-faults", "poison", "restart")
_VALID = {
    "schema_version": 1,
    "event_id": "e",
    "op": "add",
    "memory_id": "m",
    "version": 1,
    "ts": 1,
    "tenant_id": "t",
    "user_id": "u",
    "text": "x",
    "metadata": {},
}
POISON = (
    b"{not json",
    b"[1, 2, 3]",
    b'{"schema_version": 1, "op": "add"}',
    orjson.dumps({**_VALID, "schema_version": 99}),
    orjson.dumps({**_VALID, "op": "explode"}),
    orjson.dumps({**_VALID, "event_id": "bad id!"}),
    orjson.dumps({**_VALID, "text": "   "}),
    b"\xff\xfe\x00 binary garbage",
)


@dataclass
class ChaosConfig:
    events: int = 20_000
    rate: int = 2_000  # events/s offered while the fault happens
    kills: int = 3
    outage_s: float = 6.0
    poison: int = 200
    converge_timeout_s: float = 180.0
    seed: int = 7
    users: int = 200


@dataclass
class Audit:
    """The stores against what was published (see the module docstring for each figure)."""

    memories: int = 0
    lost: int = 0
    stale: int = 0
    duplicated: int = 0
    unexpected: int = 0
    lancedb_vs_redis_consistent: bool = False

    @property
    def clean(self) -> bool:
        return not (self.lost or self.stale or self.duplicated or self.unexpected) and self.lancedb_vs_redis_consistent


@dataclass
class ChaosResult:
    scenario: str
    events_published: int = 0
    memories: int = 0
    faults_injected: int = 0
    fault: str = ""
    poison_published: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicated: int = 0
    stale: int = 0
    unexpected: int = 0
    consistent: bool = False
    seconds_to_converge: float | None = None
    wall_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (
            self.consistent
            and not (self.lost or self.duplicated or self.stale or self.unexpected)
            and self.dead_lettered == self.poison_published
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class ChaosStack:
    """A broker, a Redis that can restart with or without its data, and a worker: all of this scenario's own."""

    def __init__(self, home: Path, base: Settings) -> None:
        self.home = home
        self.base = base
        self.broker: ManagedProcess | None = None
        self.redis: ManagedProcess | None = None
        self.worker: WorkerProcess | None = None
        self.worker_starts = 0
        self.fault_ended: float | None = None  # monotonic time the fault (and the publishing) ended
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        assert self._settings is not None, "the stack is not up"
        return self._settings

    async def __aenter__(self) -> ChaosStack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.broker = await asyncio.to_thread(services.start_broker, self.home / "broker")
        self.redis = services.redis_process(self.home / "redis", services.free_port(), persist=True)
        await asyncio.to_thread(self.redis.start)
        self._settings = self.base.with_(
            home=self.home,
            kafka_bootstrap=services.kafka_url(self.broker.host, self.broker.port),
            redis_url=services.redis_url(self.redis.host, self.redis.port),
            lancedb_uri=str(self.home / "lancedb"),
            fault_file=str(self.home / "faults.json"),
        )
        await ensure_topics(self.settings)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        for proc in (self.redis, self.broker):
            if proc is not None:
                await asyncio.to_thread(proc.stop)

    def start_worker(self) -> None:
        self.worker_starts += 1
        self.worker = WorkerProcess(self.settings, self.home / "worker.log")

    def kill_worker(self) -> None:
        assert self.worker is not None
        self.worker.kill()

    async def stop_redis(self, *, keep_data: bool) -> None:
        assert self.redis is not None
        if keep_data:
            await asyncio.to_thread(self.redis.stop)  # SIGTERM: the append-only file is flushed
        else:
            await asyncio.to_thread(self.redis.kill)
            shutil.rmtree(self.home / "redis" / "redis", ignore_errors=True)
            (self.home / "redis" / "redis").mkdir(parents=True)

    async def start_redis(self) -> None:
        assert self.redis is not None
        await asyncio.to_thread(self.redis.start)

    async def restart_all(self) -> None:
        """Stop the worker, Redis and the broker cleanly, then start them again: the memory-only broker comes
        back empty (on a new port, as `memstream up` may give), Redis with its append-only file."""
        assert self.worker is not None and self.broker is not None and self.redis is not None
        await asyncio.to_thread(self.worker.stop)
        await asyncio.to_thread(self.redis.stop)
        await asyncio.to_thread(self.broker.stop)
        self.broker = await asyncio.to_thread(services.start_broker, self.home / "broker")
        await asyncio.to_thread(self.redis.start)
        self._settings = self.settings.with_(kafka_bootstrap=services.kafka_url(self.broker.host, self.broker.port))
        await ensure_topics(self.settings)
        self.start_worker()


# --------------------------------------------------------------------------------------------- workload


def workload(config: ChaosConfig) -> list[MemoryEvent]:
    return list(synthetic_events(config.events, users=config.users, seed=config.seed))


async def publish_paced(settings: Settings, records: Sequence[tuple[bytes | None, bytes]], rate: int) -> None:
    """Publish at about ``rate`` records per second, in 50 ms slices, so faults land mid-ingestion."""
    publisher = await KafkaPublisher.start(settings)
    try:
        step = max(1, rate // 20)
        started = time.monotonic()
        for i in range(0, len(records), step):
            await publisher.publish(settings.topics.events, records[i : i + step])
            ahead = (i + step) / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    finally:
        await publisher.stop()


def as_records(events: Sequence[MemoryEvent]) -> list[tuple[bytes | None, bytes]]:
    return [(e.key, encode(e)) for e in events]


async def warm_up(stack: ChaosStack, events: Sequence[MemoryEvent], timeout: float = 90.0) -> list[MemoryEvent]:
    """Start the worker, publish the first 5% of the events and wait until it has ingested them, so that the
    fault lands on a worker in full flight rather than one still joining its group. Returns the rest."""
    stack.start_worker()
    head = max(1, len(events) // 20)
    await publish_paced(stack.settings, as_records(events[:head]), 100_000)
    deadline = time.monotonic() + timeout
    while (await read_counters(stack.settings)).get("events_in", 0) < head:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not ingest {head} events within {timeout:g}s")
        await asyncio.sleep(0.2)
    return list(events[head:])


def start_publishing(stack: ChaosStack, events: Sequence[MemoryEvent], rate: int) -> asyncio.Task[None]:
    return asyncio.create_task(publish_paced(stack.settings, as_records(events), rate))


# --------------------------------------------------------------------------------------------- audit


async def audit(settings: Settings, published: Sequence[MemoryEvent]) -> Audit:
    expected = {
        m: StoreState(e.version, e.event_id, "", e.op is Op.DELETE)
        for m, e in newest_per_memory(published, event_key, MemoryEvent.order).items()
    }
    stores = await Stores.open(settings)
    try:
        lance, redis = await asyncio.gather(stores.vectors.states(), stores.cache.states())
        lance_rows = await stores.vectors.count(live_only=False)
    finally:
        await stores.close()
    result = Audit(memories=len(expected), duplicated=lance_rows - len(lance))
    result.lancedb_vs_redis_consistent = compare(lance, redis).ok
    for memory_id, want in expected.items():
        held = [lance.get(memory_id), redis.get(memory_id)]
        if any(h is None for h in held):
            result.lost += 1
        elif any((h.version, h.event_id) < (want.version, want.event_id) for h in held if h is not None):
            result.stale += 1
        elif any(
            (h.version, h.event_id, h.deleted) != (want.version, want.event_id, want.deleted)
            for h in held
            if h is not None
        ):
            result.unexpected += 1
    result.unexpected += len((lance.keys() | redis.keys()) - expected.keys())
    return result


async def converge(settings: Settings, published: Sequence[MemoryEvent], timeout: float) -> tuple[Audit, float | None]:
    """Audit until clean or ``timeout``; the seconds it took, or None if it never got there."""
    started = time.monotonic()
    while True:
        found = await audit(settings, published)
        elapsed = time.monotonic() - started
        if found.clean:
            return found, round(elapsed, 2)
        if elapsed >= timeout:
            return found, None
        await asyncio.sleep(0.5)


async def count_dead_letters(settings: Settings) -> int:
    """Dead letters of records from the events topic (what the poison scenario published)."""
    count = 0
    async with await LogReader.open(settings, settings.topics.dlq) as reader:
        await reader.seek(StartAt.beginning())
        async for window in reader.read_to_end():
            for record in window:
                source = orjson.loads(record.value).get("source") or {}
                count += source.get("topic") == settings.topics.events
    return count


async def wait_counter(settings: Settings, name: str, at_least: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await read_counters(settings)).get(name, 0) < at_least and time.monotonic() < deadline:
        await asyncio.sleep(0.25)


async def settled_counters(settings: Settings, timeout: float = 10.0) -> dict[str, int]:
    """The counters once they stop moving: the worker adds to them just after the work they count (a
    reconciliation's repairs land in the stores before its report and its counts), so an audit that
    passes can be a moment ahead of them."""
    deadline = time.monotonic() + timeout
    last = await read_counters(settings)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await read_counters(settings)
        if now == last:
            return now
        last = now
    return last


async def read_counters(settings: Settings) -> dict[str, int]:
    stores = await Stores.open(settings)
    try:
        counts = await stores.counters.read()
    finally:
        await stores.close()
    keep = [n for n in COUNTER_NAMES if n.startswith(("events", "materialized", "dead", "compensations", "reconcil"))]
    return {k: counts.get(k, 0) for k in keep}


# --------------------------------------------------------------------------------------------- scenarios

Scenario = Callable[[ChaosStack, ChaosConfig, ChaosResult], Awaitable[list[MemoryEvent]]]


async def worker_kill(stack: ChaosStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    events = workload(config)
    rng = random.Random(config.seed)
    rest = await warm_up(stack, events)
    publishing = start_publishing(stack, rest, config.rate)
    span = len(rest) / config.rate
    for _ in range(config.kills):
        await asyncio.sleep(rng.uniform(0.3, max(0.4, span / max(1, config.kills))))
        stack.kill_worker()
        result.faults_injected += 1
        await asyncio.sleep(0.3)
        stack.start_worker()
    await publishing
    result.fault = f"SIGKILL of the worker {config.kills} times during ingestion, restarted each time"
    return events


async def redis_outage(stack: ChaosStack, config: ChaosConfig, result: ChaosResult, *, keep: bool) -> list[MemoryEvent]:
    events = workload(config)
    rest = await warm_up(stack, events)
    publishing = start_publishing(stack, rest, config.rate)
    await asyncio.sleep(min(1.0, len(rest) / config.rate / 4))
    await stack.stop_redis(keep_data=keep)
    result.faults_injected += 1
    await asyncio.sleep(config.outage_s)
    await stack.start_redis()
    await publishing
    stack.fault_ended = time.monotonic()
    if not keep:
        # the counters went with the wipe: the worker's reconciliation of the empty Redis counts 1 when done
        await wait_counter(stack.settings, "reconciles", 1, timeout=config.converge_timeout_s)
    how = "with its data" if keep else "empty"
    result.fault = f"Redis down {config.outage_s:g}s during ingestion, restarted {how}"
    return events


async def lancedb_faults(stack: ChaosStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    events = workload(config)
    rest = await warm_up(stack, events)
    publishing = start_publishing(stack, rest, config.rate)
    await asyncio.sleep(min(1.0, len(rest) / config.rate / 4))
    inject(stack.settings.fault_file, "lancedb_write", config.outage_s, "injected: LanceDB storage unavailable")
    result.faults_injected += 1
    await asyncio.sleep(config.outage_s)
    await publishing
    result.fault = f"every LanceDB write failing for {config.outage_s:g}s during ingestion"
    return events


async def poison(stack: ChaosStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    """Duplicates, reordering and a replay of the first fifth, with malformed records mixed in."""
    events = workload(config)
    rng = random.Random(config.seed)
    stream: list[tuple[bytes | None, bytes]] = []
    chunk = 50
    chunks = [events[i : i + chunk] for i in range(0, len(events), chunk)]
    for i, part in enumerate(chunks):
        shuffled = list(part)
        rng.shuffle(shuffled)  # reordered within each memory's partition too: versions decide, not order
        stream += as_records(shuffled)
        stream += as_records(rng.sample(part, k=max(1, len(part) // 10)))  # duplicates
        if i % max(1, len(chunks) // 10) == 0:
            stream += [(None, POISON[rng.randrange(len(POISON))]) for _ in range(config.poison // 10)]
    stream += as_records(events[: len(events) // 5])  # a replay of the oldest fifth
    result.poison_published = sum(1 for key, _ in stream if key is None)
    result.faults_injected = len(stream) - len(events)
    stack.start_worker()
    await publish_paced(stack.settings, stream, config.rate)
    result.fault = (
        f"{result.poison_published} malformed records, {len(stream) - len(events) - result.poison_published} "
        "duplicated or replayed events, every chunk reordered"
    )
    return events


async def restart(stack: ChaosStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    """Half the workload, ingested; the whole stack stopped and started; the other half (its updates and
    deletes reach memories of the first half, which only LanceDB and Redis still know)."""
    events = workload(config)
    half = len(events) // 2
    rest = await warm_up(stack, events[:half])
    await publish_paced(stack.settings, as_records(rest), config.rate)
    await wait_counter(stack.settings, "events_in", half, timeout=config.converge_timeout_s)
    await stack.restart_all()
    result.faults_injected += 1
    await publish_paced(stack.settings, as_records(events[half:]), config.rate)
    stack.fault_ended = time.monotonic()
    result.fault = (
        f"the whole stack (worker, Redis, broker) stopped and started after {half} of {len(events)} events: "
        "the broker's log came back empty"
    )
    return events


def scenario(name: str) -> Scenario:
    if name == "worker-kill":
        return worker_kill
    if name == "redis-outage":
        return lambda s, c, r: redis_outage(s, c, r, keep=True)
    if name == "redis-wipe":
        return lambda s, c, r: redis_outage(s, c, r, keep=False)
    if name == "lancedb-faults":
        return lancedb_faults
    if name == "poison":
        return poison
    if name == "restart":
        return restart
    raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")


def chaos_settings(base: Settings) -> Settings:
    """Short backoffs, so that a scenario converges in seconds once its fault is over."""
    return base.with_(
        embedder="hash",
        partitions=2,
        window_ms=20,
        compensation_first_delay_ms=200,
        compensation_max_delay_ms=2_000,
        compensation_attempts=120,
        reconcile_interval_s=0,
    )


async def run_scenario(name: str, home: Path, config: ChaosConfig, base: Settings) -> ChaosResult:
    run = scenario(name)
    result = ChaosResult(scenario=name)
    started = time.monotonic()
    async with ChaosStack(home / name, chaos_settings(base)) as stack:
        events = await run(stack, config, result)
        result.events_published = len(events)
        ended = stack.fault_ended or time.monotonic()
        found, seconds = await converge(stack.settings, events, config.converge_timeout_s)
        if seconds is not None:  # from the end of the fault, including any wait inside the scenario
            seconds = round(time.monotonic() - ended, 2)
        result.memories = found.memories
        result.lost, result.stale = found.lost, found.stale
        result.duplicated, result.unexpected = found.duplicated, found.unexpected
        result.consistent = found.lancedb_vs_redis_consistent
        result.seconds_to_converge = seconds
        result.dead_lettered = await count_dead_letters(stack.settings)
        result.counters = await settled_counters(stack.settings)
        if stack.worker is not None and not stack.worker.alive:
            log.error("the worker died during %s: see %s", name, stack.worker.log_path)
    result.wall_s = round(time.monotonic() - started, 1)
    log.info("chaos %s: %s", name, result.to_dict())
    return result


__all__ = ["SCENARIOS", "ChaosConfig", "ChaosResult", "audit", "run_scenario"]
