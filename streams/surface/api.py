"""The Python API for agent fleets: an async publisher and a reader.

async with MemoryPublisher(settings) as pub:
    event = await pub.add(user_id="alice", text="Alice is vegetarian", agent_id="chef")
    await pub.flush()
    missing = await pub.wait_materialized([event], timeout=30)

async with MemoryReader(settings) as reader:
    hits = await reader.search("what does alice eat?", user_id="alice", k=5)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from infra.kafka import ensure_topics, producer_config, queue_batches, wait_for_commits
from infra.settings import Settings
from processors.model import Hit, MemoryRow
from processors.pipeline import event_key, newest_per_memory
from processors.publishing import EventFactory, Rejected
from processors.reading import ContextBlock
from schemas.errors import BrokerError, SchemaError
from schemas.events import DEFAULT_TENANT, MemoryEvent, Op, encode
from streams.runtime.reading import ReadService, SearchRequest
from streams.runtime.stores import CacheOnly, Stores

log = logging.getLogger("memstream.publisher")

LOOKUP_CHUNK = 1_000
# Lines validated before they go out together as record batches: ~1 MB of typical events, about one produce
# request's worth over 4 partitions (256 KiB batches), so validating the next chunk overlaps the broker's ack.
LINES_PER_CHUNK = 2_000


@dataclass
class PublishResult:
    """What :meth:`MemoryPublisher.publish_lines` sent: a count, not the events, so memory stays bounded.

    ``newest`` is filled only when asked (``remember_newest``, what ``publish --wait`` waits for): per memory,
    the newest accepted event without its text and metadata, which waiting does not need. ``ends``: per partition
    of the events topic, one past the highest offset the broker acknowledged to this publisher (the ingest group
    has processed the events once its committed offsets reach these).
    """

    accepted: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    newest: dict[str, MemoryEvent] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)

    def remember(self, event: MemoryEvent) -> None:
        key = event_key(event)
        known = self.newest.get(key)
        if known is None or event.order() > known.order():
            # built directly: dataclasses.replace() took 2.0 of remember()'s 2.9 s for 50k events (cProfile)
            e = event
            self.newest[key] = MemoryEvent(e.event_id, e.op, e.memory_id, e.version, e.ts, e.scope, None, {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": len(self.rejected),
            "rejections": [r.to_dict() for r in self.rejected],
        }


class MemoryPublisher:
    """Validates, stamps and sends memory events, keyed by memory id; the producer batches them (linger)."""

    def __init__(self, settings: Settings, factory: EventFactory | None = None) -> None:
        self.settings = settings
        self.factory = factory or EventFactory()
        self._producer: AIOKafkaProducer | None = None
        self._pending: list[asyncio.Future[Any]] = []
        # per partition of the events topic: one past the highest offset acknowledged so far (PublishResult.ends)
        self.acked_ends: dict[int, int] = {}

    async def __aenter__(self) -> MemoryPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        await ensure_topics(self.settings)
        self._producer = AIOKafkaProducer(**producer_config(self.settings))
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise BrokerError(f"cannot connect to Kafka at {self.settings.kafka_bootstrap}: {exc}") from exc

    async def stop(self) -> None:
        if self._producer is not None:
            await self.flush()
            await self._producer.stop()
            self._producer = None

    def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise BrokerError("the publisher is not started (use `async with MemoryPublisher(...)`)")
        return self._producer

    async def send(self, event: MemoryEvent) -> None:
        """Queue one complete event (the producer sends it in a batch); :meth:`flush` waits for the acks."""
        producer = self._started()
        try:
            future = await producer.send(self.settings.topics.events, encode(event), key=event.key)
        except KafkaError as exc:
            raise BrokerError(f"cannot send {event.memory_id}: {exc}") from exc
        future.add_done_callback(self._single_acked)
        self._pending.append(future)

    def _single_acked(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            meta = future.result()
            self._acked(meta.partition, meta.offset + 1)

    def _acked(self, partition: int, end: int) -> None:
        if end > self.acked_ends.get(partition, 0):
            self.acked_ends[partition] = end

    async def send_many(self, events: Sequence[MemoryEvent]) -> None:
        """Queue complete events as whole record batches per partition (the partitions :meth:`send` would pick,
        in the order given); :meth:`flush` waits for the acks. Far cheaper per event than :meth:`send`."""
        producer = self._started()
        records = [(event.key, encode(event)) for event in events]
        try:
            self._pending.extend(await queue_batches(producer, self.settings.topics.events, records, self._acked))
        except KafkaError as exc:
            raise BrokerError(f"cannot send {len(records)} events: {exc}") from exc
        self._forget_acknowledged()

    def _forget_acknowledged(self) -> None:
        """Drop the futures the broker already answered (memory stays bounded); raise if one of them failed."""
        still: list[asyncio.Future[Any]] = []
        failed: BaseException | None = None
        for future in self._pending:
            if not future.done():
                still.append(future)
            elif failed is None and not future.cancelled():
                failed = future.exception()
        self._pending = still
        if failed is not None:
            raise BrokerError(f"the broker did not acknowledge a batch of events: {failed}") from failed

    async def add(self, *, user_id: str, text: str, **scope_and_more: Any) -> MemoryEvent:
        return await self.publish_one({"op": Op.ADD.value, "user_id": user_id, "text": text, **scope_and_more})

    async def update(self, *, memory_id: str, user_id: str, text: str, **more: Any) -> MemoryEvent:
        body = {"op": Op.UPDATE.value, "memory_id": memory_id, "user_id": user_id, "text": text, **more}
        return await self.publish_one(body)

    async def delete(self, *, memory_id: str, user_id: str, **more: Any) -> MemoryEvent:
        return await self.publish_one({"op": Op.DELETE.value, "memory_id": memory_id, "user_id": user_id, **more})

    async def publish_one(self, body: dict[str, Any]) -> MemoryEvent:
        """Validate and send; raises :class:`SchemaError` with the reason when the input is not valid."""
        event = self.factory.from_input(body)
        await self.send(event)
        return event

    async def publish_lines(
        self,
        lines: Iterable[bytes | str],
        *,
        first_line: int = 1,
        on_progress: Callable[[int], None] | None = None,
        remember_newest: bool = False,
    ) -> PublishResult:
        """Publish JSON lines; invalid lines are refused (and reported) while the valid ones go out.

        Lines are validated a chunk at a time and each chunk goes out as record batches while the next one is
        validated; at most a chunk and two batches per partition are held (bounded memory for files of any
        size). ``on_progress`` gets the number of lines read since its last call. With ``remember_newest`` the
        result keeps the newest event of each memory (see :class:`PublishResult`)."""
        result = PublishResult()
        chunk: list[MemoryEvent] = []
        read = 0
        for number, line in enumerate(lines, start=first_line):
            read += 1
            if line.strip():
                try:
                    chunk.append(self.factory.from_json(line))
                except SchemaError as exc:
                    result.rejected.append(Rejected(number, exc.reason, exc.field))
            if read >= LINES_PER_CHUNK:
                await self._publish_chunk(chunk, result, remember_newest)
                chunk, read = [], self._report(on_progress, read)
        await self._publish_chunk(chunk, result, remember_newest)
        self._report(on_progress, read)
        await self.flush()
        result.ends = dict(self.acked_ends)
        return result

    async def _publish_chunk(self, events: list[MemoryEvent], result: PublishResult, remember_newest: bool) -> None:
        await self.send_many(events)
        result.accepted += len(events)
        if remember_newest:
            for event in events:
                result.remember(event)

    @staticmethod
    def _report(on_progress: Callable[[int], None] | None, lines: int) -> int:
        if on_progress is not None and lines:
            on_progress(lines)
        return 0

    async def flush(self) -> None:
        """Wait until the broker acknowledged everything sent so far."""
        pending, self._pending = self._pending, []
        if pending:
            try:
                await asyncio.gather(*pending)
            except KafkaError as exc:
                raise BrokerError(f"the broker did not acknowledge {len(pending)} events: {exc}") from exc

    async def wait_materialized(
        self, events: Sequence[MemoryEvent], *, timeout: float, stores: Stores | None = None, indexed: bool = False
    ) -> list[MemoryEvent]:
        """Wait until every event is searchable (``indexed``: and in LanceDB); return those that are not."""
        own = stores is None
        stores = stores or await Stores.open(self.settings)
        try:
            return await wait_until_materialized(stores, events, timeout=timeout, indexed=indexed)
        finally:
            if own:
                await stores.close()


async def wait_published(
    settings: Settings, stores: Stores | CacheOnly, result: PublishResult, *, timeout: float, indexed: bool = False
) -> list[MemoryEvent]:
    """What ``publish --wait`` waits for: :func:`wait_until_materialized` of the newest event of each memory
    published, once the ingest group has committed past every record of ``result`` (``ends``).

    The ingest engine commits a window only after it was written (Redis holds its events, or they were
    dead-lettered or handed to compensation: streams/runtime/engines.py), so until then asking Redis for the
    memories only costs CPU; one small offset request every 75 ms does instead. The check that follows is the one
    that decides, as before: it names the refused memories and keeps waiting for those not there (a window handed
    to compensation). A broker that cannot say what the group committed: the check polls from the start."""
    deadline = time.monotonic() + timeout
    if result.ends:
        topic = settings.topics.events
        try:
            await wait_for_commits(settings, settings.group_id, topic, result.ends, timeout=timeout)
        except BrokerError as exc:
            log.warning("waiting by polling Redis: %s's commits on %s unknown (%s)", settings.group_id, topic, exc)
    left = max(0.0, deadline - time.monotonic())
    return await wait_until_materialized(stores, list(result.newest.values()), timeout=left, indexed=indexed)


async def wait_until_materialized(
    stores: Stores | CacheOnly, events: Sequence[MemoryEvent], *, timeout: float, indexed: bool = False
) -> list[MemoryEvent]:
    """Poll until each event's ``(version, event_id)`` is reached or passed, or time runs out: in Redis (the event
    is then searchable: reads merge the fresh tail), and with ``indexed`` in LanceDB too (the index sink wrote it).

    Returns the events not materialized: late ones, and at once those refused because their memory belongs to
    another user of the tenant (the worker dead-lettered them; waiting longer would not change that)."""
    pending = newest_per_memory(events, event_key, MemoryEvent.order)
    refused: list[MemoryEvent] = []
    deadline = time.monotonic() + timeout
    delay = 0.05
    while pending:
        # A cheap probe first: the memories published last. The worker takes each partition in order, so while
        # those are not there, most earlier ones are not either, and reading every pending key on each round (170k
        # keys for a 200k-event file) only loads Redis and the CPU the worker needs. Then one pass over all.
        probe = list(pending)[-LOOKUP_CHUNK:]
        await _check(stores, pending, probe, refused, indexed=indexed)
        if not any(key in pending for key in probe):
            keys = list(pending)
            for start in range(0, len(keys), LOOKUP_CHUNK):
                await _check(stores, pending, keys[start : start + LOOKUP_CHUNK], refused, indexed=indexed)
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    return [*refused, *pending.values()]


async def _check(
    stores: Stores | CacheOnly,
    pending: dict[str, MemoryEvent],
    keys: Sequence[str],
    refused: list[MemoryEvent],
    *,
    indexed: bool,
) -> None:
    """Take out of ``pending`` the memories (by key) that hold their event's version or a newer one, and move those
    that belong to another user to ``refused``."""
    keys = [k for k in keys if k in pending]
    if not keys:
        return
    if not indexed:
        _check_redis(pending, keys, await stores.cache.orders(keys), refused)
        return
    if stores.vectors is None:
        raise ValueError("waiting for LanceDB (indexed) needs its stores, not Redis alone")
    cached = await stores.cache.get(keys)
    durable_by_key = {r.key: r for r in await stores.vectors.get(keys)}
    for key, in_redis in zip(keys, cached, strict=True):
        event = pending[key]
        want = event.order()
        in_lance = durable_by_key.get(key)
        owner = in_redis or in_lance
        if owner is not None and owner.scope.user_id != event.scope.user_id:
            refused.append(pending.pop(key))
        elif in_redis and in_redis.order() >= want and (in_lance is not None and in_lance.order() >= want):
            del pending[key]


def _check_redis(
    pending: dict[str, MemoryEvent],
    keys: Sequence[str],
    found: Sequence[tuple[int, str, str] | None],
    refused: list[MemoryEvent],
) -> None:
    """:func:`_check` without LanceDB, from what :meth:`RedisCacheStore.orders` read: version, event id, user."""
    for key, held in zip(keys, found, strict=True):
        if held is None:
            continue
        version, event_id, user_id = held
        event = pending[key]
        if user_id != event.scope.user_id:
            refused.append(pending.pop(key))
        elif (version, event_id) >= event.order():
            del pending[key]


class MemoryReader:
    """Search, get and prompt-ready context through the read caches (streams/runtime/reading.py), LanceDB behind
    them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stores: Stores | None = None
        self._reads: ReadService | None = None

    async def __aenter__(self) -> MemoryReader:
        self._stores = await Stores.open(self.settings)
        self._reads = ReadService(self._stores)
        self._reads.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reads is not None:
            await self._reads.close()
        if self._stores is not None:
            await self._stores.close()

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            raise RuntimeError("use `async with MemoryReader(settings) as reader`")
        return self._stores

    @property
    def reads(self) -> ReadService:
        if self._reads is None:
            raise RuntimeError("use `async with MemoryReader(settings) as reader`")
        return self._reads

    async def search(
        self,
        query: str,
        *,
        user_id: str | None = None,
        tenant_id: str = DEFAULT_TENANT,
        agent_id: str | None = None,
        run_id: str | None = None,
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        min_score: float | None = None,
        mode: str = "vector",
        whole_tenant: bool = False,
    ) -> list[Hit]:
        """Search within one tenant and user; ``filters`` on metadata (see processors.reading.parse_filters),
        ``mode`` vector|hybrid. Results are cached (and validated by scope generation).

        ``user_id`` is required unless ``whole_tenant=True`` (every user of the tenant, uncached); no search
        crosses tenants. A null, empty or malformed scope value raises SchemaError naming the field.
        """
        request = SearchRequest(query, tenant_id, user_id, agent_id, run_id, k, filters, min_score, mode, whole_tenant)
        return await self.reads.search(request)

    async def get(self, memory_id: str, *, tenant_id: str = DEFAULT_TENANT) -> MemoryRow | None:
        """The tenant's memory, or ``None`` if the tenant has no such memory or it was deleted (L1, Redis, then
        LanceDB). Memory ids are per tenant: another tenant's memory with the same id is never returned."""
        return await self.reads.get(tenant_id, memory_id)

    async def context(
        self, *, user_id: str, tenant_id: str = DEFAULT_TENANT, agent_id: str | None = None, budget: int | None = None
    ) -> ContextBlock:
        """The scope's prompt-ready memory block within ``budget`` tokens (default MEMSTREAM_CONTEXT_BUDGET)."""
        return await self.reads.context(tenant_id=tenant_id, user_id=user_id, agent_id=agent_id, budget=budget)


def hit_to_dict(hit: Hit) -> dict[str, Any]:
    return {**row_to_dict(hit.row), "score": round(hit.score, 6)}


def row_to_dict(row: MemoryRow) -> dict[str, Any]:
    return {
        "memory_id": row.memory_id,
        "text": row.text,
        "tenant_id": row.scope.tenant_id,
        "user_id": row.scope.user_id,
        "agent_id": row.scope.agent_id,
        "run_id": row.scope.run_id,
        "metadata": row.metadata,
        "version": row.version,
        "updated_at": row.updated_at,
        "created_at": row.updated_at if row.created_at is None else row.created_at,
        "expires_at": row.expires_at,
    }


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
