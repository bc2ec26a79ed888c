"""Replay, rebuild and model migration: the log back into the stores, without the live worker's group.

- :func:`replay` applies a range of the embedded topic (no re-embedding) or of the raw events topic (re-embedded)
  to the serving generation, version-guarded: replaying over live data changes nothing newer. It announces on
  the change feed only what it actually changed.
- :func:`rebuild` fills a new generation (LanceDB table + Redis namespace, see :mod:`infra.generations`) from
  the whole log, verifies it, switches the active pointer, then catches up with what the worker wrote during
  the build. With another embedder it is a model migration: re-embedded from the events, while the old
  generation keeps serving until the switch.

Both read the log with :class:`infra.log_reader.LogReader` (assigned partitions, nothing committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.generations import ActivePointer, Generation, generation
from infra.kafka import KafkaPublisher, ensure_topics
from infra.log_reader import LogReader, StartAt
from infra.poison_guard import install_batch_guard
from infra.settings import Settings
from processors.model import MemoryRow, StoreState
from processors.pipeline import CHANGES_APPLIED, CHANGES_NONE, CompensationPolicy, RetryPolicy
from processors.replay import SOURCE_EMBEDDED, SOURCE_EVENTS, LogFold, LogReplayer, ReplayFilter, ReplayReport
from processors.verify import compare
from schemas.errors import MemStreamError
from streams.runtime.stores import Stores, connect_pointer

log = logging.getLogger("memstream.replay")

WINDOW_RECORDS = 5_000
FROM_BEGINNING = StartAt()
EVERYTHING = ReplayFilter()


class LogIncompleteError(MemStreamError):
    """The log no longer holds what a rebuild needs (retention removed its beginning): rebuilding would lose data."""


class WouldLoseMemoriesError(MemStreamError):
    """A new generation would hold less than the serving one: the switch is refused (``--allow-loss`` forces it)."""


SNAPSHOT_CHUNK = 1000


@dataclass
class Progress:
    """Hooks for a progress bar: the total once known, then records as they are applied."""

    total: Callable[[int], None] = lambda n: None
    advance: Callable[[int], None] = lambda n: None


def topic_of(settings: Settings, source: str) -> str:
    return settings.topics.embedded if source == SOURCE_EMBEDDED else settings.topics.events


async def replay(
    settings: Settings,
    *,
    source: str = SOURCE_EMBEDDED,
    start: StartAt = FROM_BEGINNING,
    only: ReplayFilter = EVERYTHING,
    changes: str = CHANGES_APPLIED,
    into: Generation | None = None,
    progress: Progress | None = None,
    require_complete_log: bool = False,
    window: int = WINDOW_RECORDS,
) -> ReplayReport:
    """Apply the records of ``source`` from ``start`` to the current end (filtered by ``only``) to ``into``.

    ``into`` defaults to the serving generation. Returns the figures; ``report.positions`` says where it
    stopped (the next offset per partition), so a later replay can go on from there.
    """
    progress = progress or Progress()
    await ensure_topics(settings)
    stores = await Stores.open(settings, into)
    publisher = await KafkaPublisher.start(settings)
    try:
        materializer = stores.materializer(
            publisher,
            changes=changes,
            # A replay retries a failing store until it succeeds (Ctrl-C stops it) instead of handing the write
            # to a compensating event: compensations name a store, not a generation, and the worker that
            # applies them writes to the serving generation, which a rebuild's target is not yet.
            compensation=CompensationPolicy(inline=RetryPolicy()),
        )
        replayer = LogReplayer(materializer, stores.embedder, source=source, only=only)
        topic = topic_of(settings, source)
        install_batch_guard()  # undecodable batches as stand-ins (called in-process too, not only by the command)
        async with await LogReader.open(settings, topic) as reader:
            if require_complete_log:
                await check_log_complete(reader, topic)
            await reader.seek(start)
            progress.total(await records_ahead(reader))
            started = time.perf_counter()
            # Measured: writing a window while decoding the next gave nothing over one after the other
            # (100k records, 7.4-8.1k/s either way on the shared 2 cores), so windows go in turn.
            async for records in reader.read_to_end(batch=window):
                await replayer.apply(records)
                progress.advance(len(records))
            replayer.report.seconds = time.perf_counter() - started
        await stores.vectors.close()  # let a compaction started by the replay finish
        return replayer.report
    finally:
        await publisher.stop()
        await stores.close()


# A build into an empty generation appends instead of merging: the fold holds the newest event per memory
# until this many are pending (about 2 KiB each with a 384-d vector), then appends them to LanceDB in one commit.
# Redis is not held back: every REDIS_ROWS winners that changed go there in one pipeline while the log is read.
FLUSH_ROWS = 250_000
REDIS_ROWS = 20_000


# Measured: a 200k build's decode and fold allocate a dozen objects per record, nearly all kept (the fold holds
# every winner), so the default collector (a young-generation pass every 700 allocations) spent ~30% of the
# decode-and-fold CPU finding nothing to free (47k records: 42-48 -> 33-37 us of CPU each with 50,000, on a
# loaded shared 2 cores).
GC_YOUNG_THRESHOLD = 50_000


@contextlib.contextmanager
def rare_collections(young: int = GC_YOUNG_THRESHOLD) -> Iterator[None]:
    """The cyclic collector's young-generation threshold raised to ``young`` inside, restored after (also on an
    error); collections still happen, only less often."""
    before = gc.get_threshold()
    gc.set_threshold(max(young, before[0]), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def build(
    settings: Settings,
    *,
    into: Generation,
    source: str = SOURCE_EMBEDDED,
    progress: Progress | None = None,
    require_complete_log: bool = False,
    window: int = WINDOW_RECORDS,
    flush_rows: int = FLUSH_ROWS,
) -> ReplayReport:
    """Fill the empty generation ``into`` from the whole of ``source``: the newest event per memory, appended.

    What :func:`replay` from the beginning would leave (same version guard, same owner rule, see
    :class:`processors.replay.LogFold`), written as large appends to LanceDB and large pipelines to Redis
    instead of a version-guarded merge per window. A target that already holds rows (a failed build's
    leftovers) is filled by :func:`replay` instead: appends would duplicate them.
    """
    progress = progress or Progress()
    await ensure_topics(settings)
    if not await is_empty(settings, into):
        log.warning("generation %d's table %s is not empty: replaying into it with merges", into.number, into.table)
        return await replay(
            settings,
            source=source,
            changes=CHANGES_NONE,
            into=into,
            progress=progress,
            require_complete_log=require_complete_log,
            window=window,
        )
    stores = await Stores.open(settings, into)
    try:
        publisher = await KafkaPublisher.start(settings)  # only for the materializer's shape: nothing is published
        try:
            materializer = stores.materializer(publisher, changes=CHANGES_NONE)
            replayer = LogReplayer(materializer, stores.embedder, source=source)
            fold = LogFold()
            topic = topic_of(settings, source)
            install_batch_guard()
            async with await LogReader.open(settings, topic) as reader:
                if require_complete_log:
                    await check_log_complete(reader, topic)
                await reader.seek(FROM_BEGINNING)
                progress.total(await records_ahead(reader))
                started = time.perf_counter()
                hot = HotCopyStream(stores)
                try:
                    with rare_collections():
                        async for records in reader.read_to_end(batch=window):
                            replayer.fold(await replayer.prepare(records), fold)
                            await hot.send_if_due(fold)
                            if len(fold.pending) >= flush_rows:
                                replayer.report.applied += await append_rows(stores, fold.take())
                            progress.advance(len(records))
                    read = time.perf_counter()
                    applied, _ = await asyncio.gather(append_rows(stores, fold.take()), hot.finish(fold))
                finally:
                    await hot.close()
                replayer.report.applied += applied
                replayer.report.stale += await remove_superseded(stores, fold)
                written = time.perf_counter()
                await index_new_table(stores)
                replayer.report.seconds = time.perf_counter() - started
            log.info(
                "built generation %d from %s up to %s: read and folded in %.2fs, written in %.2fs, indexed in %.2fs",
                into.number,
                topic,
                ", ".join(f"{topic}[{p}]@{o}" for p, o in sorted(replayer.report.positions.items())),
                read - started,
                written - read,
                started + replayer.report.seconds - written,
            )
            return replayer.report
        finally:
            await publisher.stop()
    finally:
        await stores.close()


async def is_empty(settings: Settings, gen: Generation) -> bool:
    stores = await Stores.open(settings, gen)
    try:
        return await stores.vectors.count(live_only=False) == 0
    finally:
        await stores.close()


async def append_rows(stores: Stores, rows: list[MemoryRow]) -> int:
    """Append ``rows`` to LanceDB in one commit (converted to Arrow in chunks as LanceDB reads them)."""
    if rows:
        await stores.vectors.add_rows(rows)
    return len(rows)


class HotCopyStream:
    """A build's writes to Redis while it reads on: every ``REDIS_ROWS`` winners that changed, one pipelined
    compare-and-set in the background, one at a time (the next waits for the last), so that Redis works on the
    other core while this process decodes. Redis keeps the newest of each memory, so a winner written early and
    beaten later in the log is written again and the end state is the fold's."""

    def __init__(self, stores: Stores, every: int = REDIS_ROWS) -> None:
        self.stores = stores
        self.every = every
        self.task: asyncio.Task[None] | None = None

    async def send_if_due(self, fold: LogFold) -> None:
        if len(fold.unsent) >= self.every and (self.task is None or self.task.done()):
            await self._wait()
            self.task = asyncio.create_task(self._write(fold.take_unsent()))

    async def finish(self, fold: LogFold) -> None:
        await self._wait()
        await self._write(fold.take_unsent())

    async def _write(self, rows: list[MemoryRow]) -> None:
        for start in range(0, len(rows), REDIS_ROWS):
            # bump=False: no reader has used this namespace yet, so there is no cached read to invalidate (the
            # catch-up pass after the switch bumps as the worker does); measured, the bump was half of Redis' time
            # here (42,481 rows: 6.6 s with it, 3.6 s without, shared 2 cores). Vectors stay out (not pending).
            await self.stores.cache.apply(rows[start : start + REDIS_ROWS], bump=False)

    async def _wait(self) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            await task  # its error (Redis down) ends the build, as a write in line would

    async def close(self) -> None:
        """On the way out after an error: no write left running beside the caller's clean-up."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MemStreamError):
                await self.task
        self.task = None


async def remove_superseded(stores: Stores, fold: LogFold) -> int:
    """Delete the rows appended in an earlier flush and beaten by a later one (none when nothing was flushed)."""
    removed = 0
    for batch in fold.take_superseded():
        removed += await stores.vectors.delete_exact(batch)
    return removed


async def index_new_table(stores: Stores) -> None:
    """What the version-guarded writes' maintenance would have built: the scalar indexes every read and merge
    filters by (once the table is big enough to need them) and the full-text index, compacted."""
    from infra.lance_store import INDEX_MIN_ROWS

    await stores.vectors.ensure_text_index()
    if await stores.vectors.count(live_only=False) >= INDEX_MIN_ROWS:
        await stores.vectors.build_indexes()
    else:
        await stores.vectors.optimize()


async def check_log_complete(reader: LogReader, topic: str) -> None:
    """Refuse to rebuild from a log whose beginning retention has deleted: the result would silently lack data."""
    firsts = await reader.beginnings()
    trimmed = {p: first for p, first in firsts.items() if first > 0}
    if trimmed:
        where = ", ".join(f"{topic}[{p}] starts at {first}" for p, first in sorted(trimmed.items()))
        raise LogIncompleteError(
            f"the log no longer holds the whole history ({where}): a rebuild from it would lose every memory "
            "whose events were deleted. Keep the embedded and events topics forever (retention.ms=-1) or "
            "compacted (see README, Retention); pass --allow-incomplete-log to build from what is left"
        )


async def records_ahead(reader: LogReader) -> int:
    """Records between the reader's positions and the end (a lower bound on Tansu): the progress bar's total."""
    ends = await reader.watermarks()
    total = 0
    for tp in reader.partitions:
        total += max(0, ends.get(tp.partition, 0) - await reader.consumer.position(tp))
    return total


# --------------------------------------------------------------------------------------------- rebuild


@dataclass
class RebuildResult:
    previous: Generation
    built: Generation
    source: str
    first_pass: ReplayReport
    catch_up: ReplayReport | None = None
    verify: dict[str, Any] = field(default_factory=dict)
    from_snapshot: int = 0  # memories the log did not (fully) hold, copied from the serving generation
    switched: bool = False
    dropped_previous: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "switched": self.switched,
            "previous": self.previous.to_dict(),
            "active": self.built.to_dict() if self.switched else self.previous.to_dict(),
            "built": self.built.to_dict(),
            "source": self.source,
            "first_pass": self.first_pass.to_dict(),
            "catch_up": self.catch_up.to_dict() if self.catch_up else None,
            "from_snapshot": self.from_snapshot,
            "verify": self.verify,
            "dropped_previous": self.dropped_previous,
            "seconds": round(self.seconds, 3),
        }


async def rebuild(
    settings: Settings,
    *,
    target: Settings | None = None,
    source: str | None = None,
    progress: Progress | None = None,
    allow_incomplete_log: bool = False,
    allow_loss: bool = False,
    drop_previous: bool = False,
    catch_up_grace_s: float | None = None,
    window: int = WINDOW_RECORDS,
    flush_rows: int = FLUSH_ROWS,
) -> RebuildResult:
    """Build a new generation beside the serving one, verify it, switch to it, catch up.

    ``target`` holds the settings of the new generation (its embedder: a migration when its model differs);
    ``source`` defaults to the embedded topic for the same model and to the events topic for another one.
    Readers and the worker keep using the previous generation until the switch and follow it within
    ``MEMSTREAM_POINTER_CHECK_MS``; the catch-up pass, after that grace, replays what the worker wrote
    in between (version-guarded, so anything applied twice changes nothing).

    The log may be shorter than the serving generation (a memory-only broker restarted, retention, a new
    cluster), so the log is applied on top of the serving generation as a snapshot: every memory the serving
    generation holds newer than the log left it is copied over (re-embedded from its text for another model).
    A new generation still holding less than the serving one is never switched to
    (:class:`WouldLoseMemoriesError`). ``allow_loss`` builds from the log alone and switches anyway.
    """
    began = time.perf_counter()
    target = target or settings
    pointer = await connect_pointer(settings)
    previous = await pointer.active()
    new = generation(settings.lancedb_table, settings.redis_prefix, await pointer.next_number())
    model, dim = await target_model(target)
    new = Generation(new.number, new.table, new.redis_prefix, model, dim)
    if source is None:
        same_model = previous.model in ("", model) and (previous.dim in (0, dim))
        source = SOURCE_EMBEDDED if same_model else SOURCE_EVENTS
    log.info(
        "building generation %d (%s, redis %s*) with %s from %s",
        new.number,
        new.table,
        new.redis_prefix,
        model,
        topic_of(settings, source),
    )
    await clear_redis_namespace(settings, new.redis_prefix)
    first = await build(
        target,
        source=source,
        into=new,
        progress=progress,
        # with the snapshot, a log whose beginning retention removed loses nothing: only a log-only build refuses
        require_complete_log=allow_loss and not allow_incomplete_log,
        window=window,
        flush_rows=flush_rows,
    )
    result = RebuildResult(previous=previous, built=new, source=source, first_pass=first)
    # the snapshot check's and the verify's reads at once (see read_states)
    states = await read_states(settings, target, None if allow_loss else previous, new)
    if not allow_loss:
        behind = memories_behind(states.serving, states.durable)
        result.from_snapshot, missing = await fill_from_snapshot(settings, target, previous, new, behind)
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise WouldLoseMemoriesError(
                f"generation {new.number} would hold {len(missing)} memories older than, or missing from, the "
                f"serving generation {previous.number} ({shown}); not switching. Pass --allow-loss to switch anyway"
            )
    checked = time.perf_counter()
    # nothing writes the new generation before the switch but this build: unless the snapshot copied rows into
    # it, both its stores still hold what read_states read, so the verify compares those; else it reads again
    result.verify = await verify_generation(
        target, new, read=None if result.from_snapshot else (states.durable, states.cached)
    )
    log.info(
        "generation %d: snapshot check %.2fs, verify %.2fs",
        new.number,
        checked - began - first.seconds,
        time.perf_counter() - checked,
    )
    if not result.verify["consistent"]:
        log.error(
            "generation %d is not consistent after the build; the pointer stays on %d", new.number, previous.number
        )
        result.seconds = time.perf_counter() - began
        return result
    await pointer.switch(new)
    result.switched = True
    grace = catch_up_grace_s if catch_up_grace_s is not None else 2 * settings.pointer_check_ms / 1000 + 1.0
    await asyncio.sleep(grace)  # the worker re-reads the pointer before its next window
    result.catch_up = await replay(
        target,
        source=source,
        start=StartAt(offsets=dict(first.positions)),
        changes=CHANGES_NONE,
        into=new,
        window=window,
    )
    if drop_previous and previous.table != new.table:
        result.dropped_previous = await drop_generation(settings, pointer, previous)
    result.seconds = time.perf_counter() - began
    return result


@dataclass(frozen=True)
class GenerationStates:
    """What the snapshot check and the verify read, once: the serving generation's LanceDB states (None when not
    compared: the same table, or a build allowed to lose), and the new generation's in LanceDB and in Redis."""

    serving: Mapping[str, StoreState] | None
    durable: Mapping[str, StoreState]
    cached: Mapping[str, StoreState]


async def read_states(
    settings: Settings, target: Settings, previous: Generation | None, new: Generation
) -> GenerationStates:
    """The three scans at once: the LanceDB ones run in LanceDB's threads and Redis answers from its own
    process, so each overlaps the others' waits. One after the other they took 2.3 s (the snapshot check's two
    LanceDB scans) then 2.3 s (the verify's Redis scan) at 200k memories."""

    async def scan(which: Settings, gen: Generation, *, redis: bool = False) -> dict[str, StoreState]:
        stores = await Stores.open(which, gen)
        try:
            return await (stores.cache.states() if redis else stores.vectors.states())
        finally:
            await stores.close()

    async def nothing() -> None:
        return None

    serving, durable, cached = await asyncio.gather(
        scan(settings, previous) if previous is not None and previous.table != new.table else nothing(),
        scan(target, new),
        scan(target, new, redis=True),
    )
    return GenerationStates(serving, durable, cached)


def memories_behind(serving: Mapping[str, StoreState] | None, built: Mapping[str, StoreState]) -> list[str]:
    """Memories (keys) the serving generation holds that the new one lacks or holds at an older
    ``(version, event_id)``; none when the serving generation was not read."""
    if serving is None:
        return []
    return sorted(
        m
        for m, state in serving.items()
        if (held := built.get(m)) is None or (held.version, held.event_id) < (state.version, state.event_id)
    )


async def fill_from_snapshot(
    settings: Settings, target: Settings, previous: Generation, new: Generation, behind: list[str]
) -> tuple[int, list[str]]:
    """Copy into ``new`` what the serving generation holds beyond the log (``behind``, version-guarded).

    Same model: the rows with their vectors. Another model (a migration): live rows re-embedded from their
    text with the new model; tombstones as they are. Returns how many were copied and the memories that
    ``new`` still holds older than the row copied (the copy did not take). What a live worker writes to the
    serving generation after the states were read is in the log after the first pass, and the catch-up pass
    applies it.
    """
    if not behind:
        return 0, []
    log.warning(
        "the log lacks %d memories the serving generation %d holds (a shorter log: restart, retention): "
        "copying them from it",
        len(behind),
        previous.number,
    )
    failed: list[str] = []
    old_stores = await Stores.open(settings, previous)
    new_stores = await Stores.open(target, new)
    try:
        same_model = old_stores.embedder.model == new_stores.embedder.model
        for start in range(0, len(behind), SNAPSHOT_CHUNK):
            rows = await old_stores.vectors.get_with_vectors(behind[start : start + SNAPSHOT_CHUNK])
            if not same_model:
                live = [r for r in rows if not r.deleted]
                vectors, _ = await new_stores.embedder.embed([r.text for r in live])
                fresh = dict(zip((r.key for r in live), vectors, strict=True))
                rows = [dataclasses.replace(r, vector=fresh.get(r.key, b"")) for r in rows]
            await new_stores.vectors.upsert(rows)
            await new_stores.cache.apply([dataclasses.replace(r, vector=b"") for r in rows])
            held = {r.key: r.order() for r in await new_stores.vectors.get([r.key for r in rows])}
            failed += [r.key for r in rows if held.get(r.key, (-1, "")) < r.order()]
    finally:
        await old_stores.close()
        await new_stores.close()
    return len(behind), failed


async def target_model(settings: Settings) -> tuple[str, int]:
    from infra.embedders import make_embedder

    embedder = make_embedder(settings.embedder, hash_dim=settings.hash_dim)
    return embedder.model, embedder.dim


async def verify_generation(
    settings: Settings,
    gen: Generation,
    *,
    read: tuple[Mapping[str, StoreState], Mapping[str, StoreState]] | None = None,
) -> dict[str, Any]:
    """LanceDB against Redis within one generation (``memstream verify`` for the serving one); ``read``: both
    stores' states (LanceDB, Redis) when the caller read them already and nothing wrote either since."""
    if read is not None:
        return compare(*read).to_dict()
    stores = await Stores.open(settings, gen)
    try:
        held, cached = await asyncio.gather(stores.vectors.states(), stores.cache.states())
    finally:
        await stores.close()
    return compare(held, cached).to_dict()


async def clear_redis_namespace(settings: Settings, prefix: str) -> int:
    """Delete the memory and recency keys under ``prefix`` (leftovers of a failed build of that generation)."""
    from infra.redis_store import open_redis

    client = await open_redis(settings.redis_url)
    deleted = 0
    try:
        for pattern in (f"{prefix}m:*", f"{prefix}r:*"):
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += await client.unlink(*batch)
                    batch = []
            if batch:
                deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted


async def drop_generation(settings: Settings, pointer: ActivePointer, gen: Generation) -> bool:
    """Drop a generation that no longer serves: its LanceDB table and its Redis keys."""
    dropped = await pointer.drop_generation_tables(gen.table)
    await clear_redis_namespace(settings, gen.redis_prefix)
    return dropped
