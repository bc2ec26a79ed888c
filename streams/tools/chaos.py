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
reconciler), ``lancedb-faults`` (every LanceDB write fails for a while: only the index sink waits, while reads
find fresh memories in the fresh tail), ``poison`` (duplicated, reordered and replayed events mixed with a burst
of malformed ones), ``restart`` (the whole stack stopped and started between two publishes, as `memstream
down`/`up` or a reboot: the broker comes back with an empty log), ``sink-kill`` (ingest and index sink in two
processes, the sink SIGKILLed mid-batch several times, restarted each time: no duplicate LanceDB row),
``sink-behind`` (the ingest role alone, reads measured over a large fresh tail, then the sink started and timed
until it has caught up).

The network scenarios ``netem``, ``partition`` and ``host-loss`` (root only, run when named) put each part on a
host of its own, a Linux network namespace: :mod:`streams.tools.chaos_netns`, on :mod:`streams.tools.netns`.

Scenarios that read report ``reads_asked``/``reads_found`` (a scenario passes only if every read found its
memory) and their own figures under ``figures`` (kills, restarts, latencies, catch-up time).
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
from infra.redis_store import IndexProgress
from infra.services import ManagedProcess
from infra.settings import Settings
from processors.model import StoreState
from processors.pipeline import COUNTER_NAMES, event_key, newest_per_memory
from processors.publishing import EventFactory, HybridClock
from processors.verify import compare
from schemas.errors import MemStreamError
from schemas.events import MemoryEvent, Op, encode
from streams.runtime.sink import wait_for_index
from streams.runtime.stores import Stores
from streams.runtime.worker_process import WorkerProcess
from streams.surface.api import MemoryReader, wait_until_materialized
from streams.tools.bench_data import synthetic_events

log = logging.getLogger("memstream.chaos")

SCENARIOS = (
    "worker-kill",
    "redis-outage",
    "redis-wipe",
    "lancedb-faults",
    "poison",
    "restart",
    "sink-kill",
    "sink-behind",
)
NETWORK_SCENARIOS = ("netem", "partition", "host-loss")  # not in the default set: they need root (chaos_netns)
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
    probes: int = 50  # memories read (search, get, context) while LanceDB lacks them
    sink_batch: int = 250  # sink-kill: the sink's batch, small so that a backlog keeps it writing batch after batch
    # the network scenarios (streams.tools.chaos_netns): every link's delay, the ingest host's partition, Redis' cut
    link_delay_ms: float = 20.0
    partition_s: float = 30.0
    redis_unreachable_s: float = 10.0


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
    reads_asked: int = 0  # reads of memories LanceDB did not hold yet (searches, gets, context blocks)
    reads_found: int = 0  # ... that returned the memory (from the fresh tail)
    counters: dict[str, int] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # the scenario's own: kills, latencies, catch-up

    @property
    def passed(self) -> bool:
        return (
            self.consistent
            and not (self.lost or self.duplicated or self.stale or self.unexpected)
            and self.dead_lettered == self.poison_published
            and self.reads_found == self.reads_asked
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
        self.sink: WorkerProcess | None = None  # the index sink in a process of its own (role=sink), if started
        self.sink_starts = 0
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
            lancedb_storage_options="",  # its own stack on local disk, whatever the configured store
            fault_file=str(self.home / "faults.json"),
        )
        await ensure_topics(self.settings)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in (self.sink, self.worker):
            if worker is not None:
                await asyncio.to_thread(worker.stop)
        for proc in (self.redis, self.broker):
            if proc is not None:
                await asyncio.to_thread(proc.stop)

    def start_worker(self, role: str = "all") -> None:
        """The worker: ``all`` as users run it (a supervisor of an ingest process and an index-sink process, which
        die with it: a SIGKILL of the worker crashes both mid-window), or the ingest path alone (``ingest``)."""
        self.worker_starts += 1
        self.worker = WorkerProcess(self.settings.with_(worker_role=role), self.home / "worker.log")

    def kill_worker(self) -> None:
        assert self.worker is not None
        self.worker.kill()

    def start_sink(self, **changes: Any) -> None:
        """``memstream worker --role sink``: the index sink alone (``changes``: settings of this process only)."""
        self.sink_starts += 1
        self.sink = WorkerProcess(self.settings.with_(worker_role="sink", **changes), self.home / "sink.log")

    def kill_sink(self) -> None:
        assert self.sink is not None
        self.sink.kill()

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


async def warm_up(
    stack: ChaosStack, events: Sequence[MemoryEvent], timeout: float = 90.0, role: str = "all"
) -> list[MemoryEvent]:
    """Start the worker, publish the first 5% of the events and wait until it has ingested them, so that the
    fault lands on a worker in full flight rather than one still joining its group. Returns the rest."""
    stack.start_worker(role)
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


# --------------------------------------------------------------------------------------------- reads

CONTEXT_BUDGET = 20_000  # tokens: enough for every memory of a chaos user, so a context read must include the probe


def fresh_probes(config: ChaosConfig) -> list[MemoryEvent]:
    """``config.probes`` new memories of the workload's users, each with a text of its own (its search query)."""
    rng = random.Random(config.seed + 1)
    factory = EventFactory(HybridClock())
    return [
        factory.from_input(
            {
                "memory_id": f"probe-{config.seed}-{i:04d}",
                "user_id": f"user-{rng.randrange(config.users):05d}",
                "text": f"probe {i}: the lighthouse keeper number {rng.randrange(10**6)} paints boat {i * 7 + 3}",
            }
        )
        for i in range(config.probes)
    ]


def live_sample(events: Sequence[MemoryEvent], config: ChaosConfig) -> list[MemoryEvent]:
    """``config.probes`` memories of the workload that end live, as their newest event (what reads must return)."""
    live = [e for e in newest_per_memory(events, event_key, MemoryEvent.order).values() if e.op is not Op.DELETE]
    return random.Random(config.seed + 2).sample(live, k=min(config.probes, len(live)))


@dataclass
class ReadCheck:
    """Reads of memories expected at their newest version; ``from_tail``: found while LanceDB lacked that version."""

    asked: int = 0
    found: int = 0
    from_tail: int = 0
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)

    async def timed(self, op: str, read: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        value = await read
        self.latencies_ms.setdefault(op, []).append((time.perf_counter() - started) * 1e3)
        return value

    def figures(self) -> dict[str, Any]:
        return {
            "reads_asked": self.asked,
            "reads_found": self.found,
            "reads_found_from_fresh_tail": self.from_tail,
            "read_latency_ms": {op: percentiles(values) for op, values in sorted(self.latencies_ms.items())},
        }


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"n": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1], 2)}


async def read_back(reader: MemoryReader, wanted: Sequence[MemoryEvent], *, context: bool) -> ReadCheck:
    """Search (the memory's own text as the query, in its user), get, and optionally the user's context block,
    for each memory in ``wanted``: found means that read returned it at the wanted version. Whether LanceDB held
    that version is looked up first: a memory found without it came from the fresh tail."""
    check = ReadCheck()
    for event in wanted:
        tenant, user = event.scope.tenant_id, event.scope.user_id
        held = await reader.stores.vectors.get([event_key(event)])
        in_lance = any(row.order() >= event.order() for row in held)
        hits = await check.timed("search", reader.search(event.text or "", user_id=user, tenant_id=tenant, k=10))
        row = await check.timed("get", reader.get(event.memory_id, tenant_id=tenant))
        found = [
            any(h.row.memory_id == event.memory_id and h.row.order() == event.order() for h in hits),
            row is not None and row.order() == event.order(),
        ]
        if context:
            block = await check.timed("context", reader.context(user_id=user, tenant_id=tenant, budget=CONTEXT_BUDGET))
            found.append(event.memory_id in block.memory_ids)
        check.asked += len(found)
        check.found += sum(found)
        check.from_tail += 0 if in_lance else sum(found)
        for kind, ok in zip(("search", "get", "context"), found, strict=False):
            if not ok:
                log.warning("%s did not return %s at version %d", kind, event_key(event), event.version)
    return check


def record_reads(result: ChaosResult, check: ReadCheck) -> None:
    result.reads_asked += check.asked
    result.reads_found += check.found
    result.figures.update(check.figures())


async def index_position(stores: Stores) -> int:
    """Embedded records the index sink has written and committed, over all partitions (its recorded progress)."""
    s = stores.settings
    return sum((await IndexProgress(stores.redis, s.redis_prefix).read(s.topics.embedded)).values())


async def wait_index_moved(stores: Stores, beyond: int, timeout: float) -> int:
    """Until the sink has committed a batch past ``beyond``: it has joined its group and is writing."""
    deadline = time.monotonic() + timeout
    while (now := await index_position(stores)) <= beyond:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the index sink wrote nothing past {beyond} within {timeout:g}s")
        await asyncio.sleep(0.02)
    return now


async def wait_caught_up(stores: Stores, timeout: float) -> tuple[int, float]:
    """Until the fresh tail is empty (LanceDB holds everything Redis does): what is left and the seconds taken."""
    started = time.monotonic()
    left = await wait_for_index(stores, timeout=timeout, poll_s=0.05)
    return left, round(time.monotonic() - started, 2)


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
        keys_twice = await stores.vectors.duplicates()
    finally:
        await stores.close()
    # rows beyond one per memory; and memory keys held by more than one row (a direct scan of the key column)
    result = Audit(memories=len(expected), duplicated=max(lance_rows - len(lance), len(keys_twice)))
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
    """Audit until clean or ``timeout``; the seconds it took, or None if it never got there.

    A store that cannot answer for now (a Redis Cluster whose killed master other nodes still list until they hear
    of its successor) is not yet converged: the audit is asked again, and the error raised only at ``timeout``.
    """
    started = time.monotonic()
    while True:
        try:
            found = await audit(settings, published)
        except MemStreamError as exc:
            if not exc.retriable or time.monotonic() - started >= timeout:
                raise
            log.info("audit: a store could not answer yet (%s); asking again", exc)
            await asyncio.sleep(0.5)
            continue
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


async def count_records(settings: Settings, topic: str) -> int:
    """Records in ``topic``, read to its end (Tansu's high watermark under-reports: infra/log_reader.py)."""
    count = 0
    async with await LogReader.open(settings, topic) as reader:
        await reader.seek(StartAt.beginning())
        async for window in reader.read_to_end():
            count += len(window)
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
    kept = ("events", "materialized", "dead", "compensations", "reconcil", "index")
    keep = [n for n in COUNTER_NAMES if n.startswith(kept)]
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
    """Every LanceDB write fails for a while: only the index sink waits (retrying); the ingest path goes on and
    reads find the memories published meanwhile in the fresh tail. Once the fault clears the sink catches up."""
    events = workload(config)
    rest = await warm_up(stack, events)
    publishing = start_publishing(stack, rest, config.rate)
    await asyncio.sleep(min(1.0, len(rest) / config.rate / 4))
    # the fault lasts ``outage_s`` or until the probes are read back, whichever is later (on busy cores reading
    # them can take longer than the outage); the horizon only bounds it should this task die before clearing it
    started = time.monotonic()
    error = "injected: LanceDB storage unavailable"
    inject(stack.settings.fault_file, "lancedb_write", config.outage_s + config.converge_timeout_s, error)
    result.faults_injected += 1
    probes = fresh_probes(config)  # published during the fault: only Redis (the fresh tail) can have them
    await publish_paced(stack.settings, as_records(probes), 100_000)
    async with MemoryReader(stack.settings) as reader:
        late = await wait_until_materialized(reader.stores, probes, timeout=config.outage_s)
        check = await read_back(reader, probes, context=False)
        record_reads(result, check)
        result.figures.update(
            probes_published=len(probes),
            probes_late=len(late),
            probes_read_s=round(time.monotonic() - started, 2),
        )
        await asyncio.sleep(max(0.0, started + config.outage_s - time.monotonic()))
        result.figures["fresh_tail_at_fault_end"] = await reader.stores.cache.pending_count()
        inject(stack.settings.fault_file, "lancedb_write", 0)
        result.figures["fault_s"] = round(time.monotonic() - started, 2)
        await publishing
        stack.fault_ended = time.monotonic()
        left, seconds = await wait_caught_up(reader.stores, config.converge_timeout_s)
    result.figures.update(sink_caught_up_s=seconds if not left else None, fresh_tail_left=left)
    result.fault = (
        f"every LanceDB write failing for {result.figures['fault_s']:g}s during ingestion (the index sink retried), "
        f"{len(probes)} memories published and read back meanwhile"
    )
    return [*events, *probes]


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


async def sink_kill(stack: ChaosStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    """Ingest and index sink in two processes; the sink SIGKILLed while it writes, restarted each time.

    The sink starts as the bulk of the workload is published, so that it finds a backlog when it has joined its
    group, and its batches are small (``config.sink_batch``): it writes batch after batch until the backlog is
    gone. Each kill comes a moment after the (re)started sink committed a batch, with more in hand (the fresh tail
    at the kill says how much). A batch written to LanceDB but not committed is written again after the restart:
    the version guard must make that a no-op (no duplicate row: the audit scans LanceDB's key column)."""
    events = workload(config)
    rng = random.Random(config.seed)
    rest = await warm_up(stack, events, role="ingest")
    stack.start_sink(sink_batch=config.sink_batch)
    publishing = start_publishing(stack, rest, config.rate)
    kills: list[dict[str, Any]] = []
    stores = await Stores.open(stack.settings)
    try:
        position = 0
        for _ in range(config.kills):
            position = await wait_index_moved(stores, position, config.converge_timeout_s)
            await asyncio.sleep(rng.uniform(0.02, 0.25))
            tail = await stores.cache.pending_count()
            ingested = (await stores.counters.read()).get("events_in", 0)
            stack.kill_sink()
            result.faults_injected += 1
            position = await index_position(stores)
            # work in hand: memories LanceDB lacked, or records ingested but not committed by the sink
            uncommitted = max(0, ingested - position)
            kills.append(
                {"fresh_tail_at_kill": tail, "committed_at_kill": position, "uncommitted_at_kill": uncommitted}
            )
            await asyncio.sleep(0.3)
            stack.start_sink(sink_batch=config.sink_batch)
        await publishing
        stack.fault_ended = time.monotonic()
        left, seconds = await wait_caught_up(stores, config.converge_timeout_s)
        embedded = await count_records(stack.settings, stack.settings.topics.embedded)
        # an empty fresh tail is not the log read to its end: the sink's sweep may have written a memory from Redis
        # before its record came, and a batch's counts land after its clear. Its committed progress is.
        await wait_index_moved(stores, embedded - 1, config.converge_timeout_s)
    finally:
        await stores.close()
    indexed = (await read_counters(stack.settings)).get("index_records", 0)
    result.figures.update(
        sink_kills=len(kills),
        sink_restarts=stack.sink_starts - 1,
        kills=kills,
        kills_with_work_in_hand=sum(1 for k in kills if k["fresh_tail_at_kill"] or k["uncommitted_at_kill"]),
        sink_batch=config.sink_batch,
        embedded_records=embedded,
        records_indexed=indexed,
        records_indexed_again=max(0, indexed - embedded),  # batches written, then re-delivered after a kill
        sink_caught_up_s=seconds if not left else None,
        fresh_tail_left=left,
    )
    result.fault = (
        f"SIGKILL of the index sink process {len(kills)} times while it wrote its backlog "
        f"(batches of {config.sink_batch}), restarted each time; ingest in a process of its own"
    )
    return events


async def sink_behind(stack: ChaosStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    """The ingest role alone: every event published lands only in Redis (the fresh tail). Reads (search, get,
    context) of a sample must find each memory at its newest version while the tail is that large, and their
    latency is measured; then the sink starts and is timed until the tail is empty."""
    events = workload(config)
    rest = await warm_up(stack, events, role="ingest")
    started = time.monotonic()
    await publish_paced(stack.settings, as_records(rest), 100_000)
    wanted = live_sample(events, config)
    async with MemoryReader(stack.settings) as reader:
        late = await wait_until_materialized(reader.stores, events, timeout=config.converge_timeout_s)
        ingested_s = round(time.monotonic() - started, 2)
        tail = await reader.stores.cache.pending_count()
        lance_rows = await reader.stores.vectors.count(live_only=False)
        check = await read_back(reader, wanted, context=True)
        record_reads(result, check)
        result.faults_injected += 1
        sink_started = time.monotonic()
        stack.start_sink()
        await wait_index_moved(reader.stores, 0, config.converge_timeout_s)
        first_batch_s = round(time.monotonic() - sink_started, 2)
        left, seconds = await wait_caught_up(reader.stores, config.converge_timeout_s)
    stack.fault_ended = time.monotonic()
    result.figures.update(
        ingested_without_sink_s=ingested_s,
        events_late=len(late),
        fresh_tail_while_sink_absent=tail,
        lancedb_rows_while_sink_absent=lance_rows,
        sink_first_batch_s=first_batch_s,  # the sink process' start and group join, to its first committed batch
        sink_caught_up_s=round(first_batch_s + seconds, 2) if not left else None,  # from its start, tail empty
        fresh_tail_left=left,
    )
    result.fault = (
        f"no index sink while {len(events)} events were ingested ({tail} memories in the fresh tail), "
        f"{len(wanted)} memories read back (search, get, context); then the sink started"
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
    if name == "sink-kill":
        return sink_kill
    if name == "sink-behind":
        return sink_behind
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


async def record_outcome(
    settings: Settings, events: list[MemoryEvent], fault_ended: float | None, config: ChaosConfig, result: ChaosResult
) -> None:
    """Waits until the stores converge on ``events`` (or the timeout) and writes into ``result`` what they hold
    and how long it took, from the end of the fault (``fault_ended``, else now), including any wait inside
    the scenario; then the settled counters. Shared by the local and the network scenarios."""
    result.events_published = len(events)
    ended = fault_ended or time.monotonic()
    found, seconds = await converge(settings, events, config.converge_timeout_s)
    if seconds is not None:
        seconds = round(time.monotonic() - ended, 2)
    result.memories = found.memories
    result.lost, result.stale = found.lost, found.stale
    result.duplicated, result.unexpected = found.duplicated, found.unexpected
    result.consistent = found.lancedb_vs_redis_consistent
    result.seconds_to_converge = seconds
    result.counters = await settled_counters(settings)


async def run_scenario(name: str, home: Path, config: ChaosConfig, base: Settings) -> ChaosResult:
    if name in NETWORK_SCENARIOS:  # hosts in network namespaces: streams.tools.chaos_netns (root only)
        from streams.tools.chaos_netns import run_network_scenario

        return await run_network_scenario(name, home, config, base)
    run = scenario(name)
    result = ChaosResult(scenario=name)
    started = time.monotonic()
    async with ChaosStack(home / name, chaos_settings(base)) as stack:
        events = await run(stack, config, result)
        await record_outcome(stack.settings, events, stack.fault_ended, config, result)
        result.dead_lettered = await count_dead_letters(stack.settings)
        for worker in (stack.worker, stack.sink):
            if worker is not None and not worker.alive:
                log.error("a worker process died during %s: see %s", name, worker.log_path)
    result.wall_s = round(time.monotonic() - started, 1)
    log.info("chaos %s: %s", name, result.to_dict())
    return result


__all__ = ["NETWORK_SCENARIOS", "SCENARIOS", "ChaosConfig", "ChaosResult", "audit", "run_scenario"]
