"""The index sink at run time: the embedded topic into LanceDB, on a consumer group of its own.

``memstream worker`` runs it beside the ingest path (``MEMSTREAM_WORKER_ROLE=all``, the default), or alone
(``--role sink``), so that the two can be placed and scaled apart. One sink writes a table at a time: the group's
assignor gives every partition to one member (infra.kafka.OneOwnerAssignor) and the others stand by; a batch in
hand is finished and committed before the partitions are given up (the revocation callback waits for it).

The loop, per batch:
1. take what the backlog holds, up to ``sink_batch`` records (a few when idle, tens of thousands under load);
2. write LanceDB (processors/indexing.py: version-guarded, retried until it passes), clear the fresh tail;
3. commit the offsets (only after the LanceDB commit), and record the progress per partition in Redis;
4. between batches, never beside them: LanceDB maintenance by need (infra.lance_store.MaintenancePolicy): the
   scalar indexes rebuilt once enough rows are unindexed, compaction (every index refreshed, old versions removed)
   once enough rows or commits piled up, and everything once the sink has been idle a moment (a bulk load is
   searched at full speed within seconds of the sink catching up); once caught up, a sweep of fresh-tail entries
   the log did not bring (a broker that restarted empty);
5. every ``EXPIRY_EVERY_S``, the owner's expiry sweep (processors/expiry.py): a tombstone on the events topic for
   each memory whose ``expires_at`` passed (only the owner: one sweep at a time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from infra.kafka import BACKGROUND_FETCH_WAIT_MS, consumer_config, shard_assignor
from infra.lance_store import MaintenancePolicy, lancedb_cache_mb
from infra.memory import release_free_memory
from infra.redis_store import IndexProgress
from infra.settings import Settings
from infra.sharded_store import shards_of_keys
from processors.expiry import ExpirySweeper
from processors.indexing import IndexBatch, IndexProcessor, IndexReport
from processors.model import InRecord, MemoryRow
from processors.pipeline import describe_window
from processors.timings import describe
from schemas.errors import BrokerError, ConfigError, MemStreamError
from schemas.events import Scope
from streams.runtime.engines import TIMINGS_EVERY_S
from streams.runtime.loop import Batching, Committed, ConsumeLoop, Fence, take_batch
from streams.runtime.stores import Stores

log = logging.getLogger("memstream.sink")

SWEEP_EVERY_S = 5.0
EXPIRY_EVERY_S = 1.0  # how often the owner looks for expired memories (one keyed scan of live rows with an expiry)
MEMORY_REPORT_S = 15.0
# Free memory goes back to the system after this many records (or a compaction): a trim costs 30-45 ms, so not
# after every small batch of a quiet stream (infra/memory.py has the figures)
RELEASE_EVERY_RECORDS = 10_000


def rss_mb() -> float:
    """This process' resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


SWEEP_LIMIT = 5_000


class IndexSink:
    """Consumes the embedded topic on the one consume loop and hands each batch to the :class:`IndexProcessor`
    (the loop's :class:`streams.runtime.loop.BatchHandler`)."""

    def __init__(self, settings: Settings, stores: Stores, processor: IndexProcessor) -> None:
        self.settings = settings
        self.stores = stores
        self.processor = processor
        self.topic = settings.topics.embedded
        self.progress = IndexProgress(stores.redis, settings.redis_prefix)
        self.batches = 0
        self.rows = 0
        self.records = 0
        self._last_sweep = 0.0
        self._last_expiry = 0.0
        self.expiry = ExpirySweeper(processor.publisher, settings.topics, stores.counters)
        self._last_memory_report = 0.0
        self._records_since_release = 0
        self._last_write = time.monotonic()  # when a batch last reached LanceDB: how long the sink has been idle
        self.indexed_to: dict[int, int] = {}  # partition -> next offset, as committed (for the maintenance log)
        self.maintenance = MaintenancePolicy(
            index_rows=settings.sink_index_rows,
            compact_rows=settings.sink_optimize_rows,
            compact_commits=settings.optimize_every,
            idle_s=settings.sink_idle_ms / 1000,
            keep_versions_s=settings.sink_keep_versions_s,
            load_compact_fragments=settings.sink_load_compact_fragments,
        )
        # told the scopes of each batch once LanceDB holds it (the worker's context maintainer, in one process)
        self.on_indexed: Callable[[Sequence[Scope]], None] | None = None
        batching = Batching(settings.sink_batch, wait_ms=settings.sink_wait_ms, linger_ms=settings.sink_linger_ms)
        self.loop = ConsumeLoop(self, batching, member="sink", redo="it will be indexed again", logger=log)

    async def start_consumer(self) -> AIOKafkaConsumer:
        config = consumer_config(
            self.settings, group_id=self.settings.sink_group_id, fetch_wait_ms=BACKGROUND_FETCH_WAIT_MS
        )
        # batches of ten thousand embedded records (~1.7 kB each with a 384-d vector: 17 MB) in a few fetches;
        # what the consumer prefetches while a batch is written stays in the process, so no more than that
        config.update(max_partition_fetch_bytes=8 << 20, fetch_max_bytes=24 << 20)
        s = self.settings
        assignor = shard_assignor(s.sink_shard, s.index_shards)
        consumer = AIOKafkaConsumer(**config, partition_assignment_strategy=(assignor,))
        consumer.subscribe([self.topic], listener=self.fence())
        try:
            await consumer.start()
            if s.index_shards > 1:
                self.check_partitions(consumer)
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerError(f"the index sink cannot consume {self.topic}: {exc}") from exc
        except ConfigError:
            await consumer.stop()
            raise
        return consumer

    def check_partitions(self, consumer: AIOKafkaConsumer) -> None:
        """Sharded: readers find a key's shard from MEMSTREAM_PARTITIONS (the partition its memory id hashes to),
        so the embedded topic must have exactly that many partitions, or keys would be looked for in the wrong
        shard."""
        have = len(consumer.partitions_for_topic(self.topic) or ())  # the metadata the subscription fetched
        if have and have != self.settings.partitions:
            raise ConfigError(
                f"{self.topic} has {have} partitions but MEMSTREAM_PARTITIONS={self.settings.partitions}: with "
                f"MEMSTREAM_INDEX_SHARDS={self.settings.index_shards} readers route a memory to its shard by the "
                "partition count, so set MEMSTREAM_PARTITIONS to the topic's"
            )

    def owns(self, row: MemoryRow) -> bool:
        """Whether this sink's shard holds the memory (always, unsharded): the fresh-tail sweep writes only those."""
        s = self.settings
        if s.index_shards == 1:
            return True
        return shards_of_keys([row.memory_id], s.index_shards, s.partitions)[0] == s.sink_shard

    def fence(self) -> Fence:
        """The consumer's rebalance listener: partitions are given up only once the batch in hand is committed."""
        return self.loop.fence("index sink", standby="stands by (another member owns the table)")

    async def run(self, stopping: asyncio.Event) -> None:
        """Until ``stopping``: batches on the one consume loop, and between them maintenance and sweeps."""
        consumer = await self.start_consumer()
        log.info("index sink consuming %s as group %s (%s)", self.topic, self.settings.sink_group_id, self.shard_name())
        try:
            await self.loop.run(consumer, stopping)
        finally:
            log.info("index sink stopped after %d batches, %d records, %d rows", self.batches, self.records, self.rows)

    async def prepare(self, records: Sequence[InRecord]) -> tuple[Sequence[InRecord], IndexBatch]:
        # A rebuild or migration may have switched the serving generation: write where readers now read (the
        # ingest path sharing these stores may have followed the switch already, so always take the handles)
        await self.stores.follow_active()
        self.processor.vectors, self.processor.cache = self.stores.own_vectors, self.stores.cache
        with self.processor.timings.time("prepare"):
            return records, self.processor.prepare(records)

    async def write(self, prepared: tuple[Sequence[InRecord], IndexBatch]) -> tuple[IndexReport, IndexBatch]:
        """LanceDB (version-guarded, retried until it passes) and the fresh tail; the loop commits after it."""
        records, batch = prepared
        report = await self.processor.write(batch)
        await self.hold_if_told(records)
        return report, batch

    async def committed(self, done: Committed) -> None:
        """After the offset commit (still before any revocation): progress, counts, timings."""
        report, batch = done.result
        records = done.records
        self.processor.timings.add("commit", done.commit_s * 1000)
        report.positions = {tp.partition: offset for tp, offset in done.positions.items()}
        self.indexed_to.update(report.positions)
        self._last_write = time.monotonic()
        await self.record_progress(report.positions)
        if self.on_indexed is not None:
            self.on_indexed(list({item.event.scope for item in batch.embedded}))  # each scope once per batch
        self.expiry.note(any(item.event.expires_at is not None for item in batch.embedded))
        self.batches += 1
        self.records += len(records)
        self._records_since_release += len(records)
        self.rows += report.rows
        elapsed_ms = done.seconds * 1e3
        log.debug("indexed %s: %d rows in %.0f ms", describe_window(records), report.rows, elapsed_ms)
        self.processor.timings.add("batch", elapsed_ms)
        self.processor.timings.add("rows", report.rows)
        self.log_timings()
        self.report_memory()

    def report_memory(self) -> None:
        """Every ``MEMORY_REPORT_S`` under load: where the process' memory is (RSS, Arrow's pool, Python objects),
        so that growth over a long run can be told apart from LanceDB's and Arrow's native allocations."""
        now = time.monotonic()
        if now - self._last_memory_report < MEMORY_REPORT_S:
            return
        self._last_memory_report = now
        import gc

        import pyarrow as pa

        log.info(
            "index sink memory: rss %.0f MB, LanceDB caches %.0f MB, arrow pool %.0f MB, %d python objects, "
            "%d batches, %d rows",
            rss_mb(),
            lancedb_cache_mb(),
            pa.total_allocated_bytes() / 2**20,
            len(gc.get_objects()),
            self.batches,
            self.rows,
        )

    def log_timings(self) -> None:
        """Every ``TIMINGS_EVERY_S`` under load: where the sink's batches went (``rows`` is a count, not ms)."""
        batches = self.processor.timings.count("batch")
        summary = self.processor.timings.take_every(TIMINGS_EVERY_S)
        if summary is not None:
            log.info("index sink: %d batches, p50/p99/max ms: %s", batches, describe(summary))

    async def hold_if_told(self, records: Sequence[InRecord]) -> None:
        """Fault injection (tests, chaos): wait here, LanceDB written and the offsets not committed yet."""
        faults = self.stores.own_vectors.faults
        if faults is None or not faults.active("sink_commit"):
            return
        log.warning("holding %s between the LanceDB commit and the offset commit (injected)", describe_window(records))
        while faults.active("sink_commit"):
            await asyncio.sleep(0.05)

    async def record_progress(self, positions: dict[int, int]) -> None:
        try:
            await self.progress.record(self.topic, positions)
        except MemStreamError as exc:  # advisory: the group's committed offsets are the authority
            log.warning("index progress not recorded: %s", exc)

    async def between_batches(self, consumer: AIOKafkaConsumer, *, idle: bool) -> None:
        """Maintenance when due; when idle and caught up, the sweep of what the log did not bring."""
        s = self.settings
        # Only the owner maintains the table when idle: a sink standing by must not compact beside the owner's
        # merges (the counts under load are of this sink's own writes, so a standby never reaches them). The loop
        # calls this under its lock: a revocation waits for it, so the partitions cannot move on meanwhile.
        owner = bool(consumer.assignment())
        idle_for = time.monotonic() - self._last_write if idle and owner else 0.0
        try:
            run = await self.stores.own_vectors.maintain_if_due(self.maintenance, idle_for)
        except MemStreamError as exc:
            log.warning("LanceDB maintenance failed between batches (nothing lost), %s: %s", self.where(), exc)
            run = None
        if run is not None:
            self.log_maintenance(run, idle_for)
        # as for the table: a sink standing by must not compact beside the owner's merges; the history table is
        # shared by the shards' sinks (each appends its own memories' versions), and shard 0's owner maintains it
        if owner and self.settings.sink_shard == 0:
            await self.maintain_history()
        if run is not None or self._records_since_release >= RELEASE_EVERY_RECORDS:
            await self.release_memory()
        await self.processor.clear_ahead()
        if owner and time.monotonic() - self._last_expiry >= EXPIRY_EVERY_S:
            self._last_expiry = time.monotonic()
            try:
                await self.expiry.sweep(self.stores.own_vectors)
            except MemStreamError as exc:
                log.warning("expiry sweep failed (tried again in %.0fs), %s: %s", EXPIRY_EVERY_S, self.where(), exc)
        if idle and time.monotonic() - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = time.monotonic()
            try:
                await self.processor.sweep(s.sink_sweep_after_s * 1000, SWEEP_LIMIT, owns=self.owns)
            except MemStreamError as exc:
                log.warning("fresh-tail sweep failed (tried again in %.0fs): %s", SWEEP_EVERY_S, exc)

    async def maintain_history(self) -> None:
        """The history table's index and compaction, between batches as LanceDB's own (one writer)."""
        if self.stores.history is None:
            return
        try:
            if await self.stores.history.maintain():
                log.info("history table maintained between batches, %s", self.where())
        except MemStreamError as exc:
            log.warning("history maintenance failed between batches (nothing lost), %s: %s", self.where(), exc)

    def log_maintenance(self, run: dict[str, Any], idle_for: float) -> None:
        why = f"idle {idle_for:.1f}s" if idle_for else "under load"
        if run["kind"] == "compaction":
            log.info(
                "LanceDB compacted between batches in %.1fs: %d -> %d fragments, %d unindexed rows indexed (%s), %s",
                run["seconds"],
                run["fragments_before"],
                run["fragments_after"],
                run["unindexed_rows"],
                why,
                self.where(),
            )
            if run.get("ann_built_s") is not None:  # the compaction's seconds include it: training is the long part
                log.info("LanceDB vector index built in %.1fs of that compaction, %s", run["ann_built_s"], self.where())
        else:
            log.info(
                "LanceDB scalar indexes rebuilt between batches in %.2fs: %d unindexed rows indexed, %s",
                run["seconds"],
                run["unindexed_rows"],
                self.where(),
            )

    def shard_name(self) -> str:
        s = self.settings
        return "one table" if s.index_shards == 1 else f"shard {s.sink_shard} of {s.index_shards}"

    def where(self) -> str:
        """The sink's position: what LanceDB holds, as ``topic[partition]@next offset``."""
        if not self.indexed_to:
            return f"nothing of {self.topic} indexed by this sink yet"
        return "indexed to " + ", ".join(f"{self.topic}[{p}]@{o}" for p, o in sorted(self.indexed_to.items()))

    async def release_memory(self) -> None:
        """Give back what the last batches freed (in a thread: the ingest path may share this event loop)."""
        self._records_since_release = 0
        await asyncio.to_thread(release_free_memory)


def make_index_processor(settings: Settings, stores: Stores, publisher: Any) -> IndexProcessor:
    return IndexProcessor(
        stores.own_vectors,
        stores.cache,
        publisher,
        settings.topics,
        model=stores.embedder.model,
        dim=stores.embedder.dim,
        counters=stores.counters,
        history=stores.history,
    )


async def wait_for_index(
    stores: Stores, *, timeout: float, poll_s: float = 0.2, stopping: Callable[[], bool] = lambda: False
) -> int:
    """Wait until the fresh tail is empty (LanceDB holds everything the ingest path wrote), ``timeout`` passes or
    ``stopping()`` says the caller is shutting down (its sink may be stopped already: the tail would not drain);
    returns how many memories it still holds (0: caught up)."""
    deadline = time.monotonic() + timeout
    while True:
        left = await stores.cache.pending_count()
        if not left or time.monotonic() >= deadline or stopping():
            return left
        await asyncio.sleep(poll_s)


__all__ = ["IndexSink", "make_index_processor", "take_batch", "wait_for_index"]
