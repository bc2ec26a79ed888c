"""LanceDB: the durable vector store. One row per memory (tombstones kept), version-guarded upserts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from infra.faults import FaultSwitch
from processors.hot_vectors import NEVER, ScopeColumns
from processors.model import Hit, MemoryRow, ScopeQuery, StoreState, split_key
from processors.ports import Vectors
from schemas.errors import ConfigError, StoreError
from schemas.events import Scope, validate_id

log = logging.getLogger("memstream.lancedb")

# Scalar indexes are built as soon as the table has rows. Measured (LanceDB 0.40, 384-d, search k=10 filtered by
# tenant and user, 10 fragments): 1k rows 5.6 -> 4.8 ms with the bitmaps, 10k 8.9 -> 6.5 ms, 30k 17.3 -> 6.1 ms;
# building all four costs 18-45 ms at those sizes. The old floor of 10,000 rows left a bulk-loaded table of a few
# thousand rows, and the merges into it, without any index.
INDEX_MIN_ROWS = 1
MAINTENANCE_S = 60.0  # the longest the sink lets rows wait for maintenance while it is never idle (a trickle)
# Compaction needs two small fragments to merge, and LanceDB keeps fragments covered by different index versions
# apart (a compaction after a scalar-index rebuild left 2 of 600 rows): an otherwise indexed table with fewer
# small fragments than this is left alone by idle maintenance (10 fragments cost a 30k-row search ~2 ms).
COMPACT_SMALL_FRAGMENTS = 4
RETRY_S = 10.0  # an idle maintenance that failed is tried again after this (the sink logs each failure)
DELETE_CHUNK = 200  # rows per conditional delete expression
APPEND_CHUNK = 50_000  # rows converted to Arrow at a time by add_rows (one commit whatever the total)

CACHE_MB = 256  # LanceDB's index and metadata caches, each, per process (see lancedb_session)

# The vector (ANN) index: LanceDB names it ``vector_idx``. See AnnPolicy for when it is built and used.
VECTOR_COLUMN = "vector"
ANN_INDEX = f"{VECTOR_COLUMN}_idx"
SCOPE_SIZE_TTL_S = 30.0  # how long a reader trusts a scope's row count (ANN or exact) before counting again
SCOPE_SIZE_CACHE = 4_096  # scopes whose counts a reader remembers (then it forgets them all and counts again)

MODEL_KEY = b"memstream.model"
DIM_KEY = b"memstream.dim"

# A memory's identity is (tenant, memory id), kept as one column ``memory_key`` = ``<tenant>/<memory id>``
# (processors.model.memory_key): the merge key, B-tree indexed. Tables made before it (keyed by ``memory_id``
# alone) get the column at open, computed from their own columns (see _migrate_key).
KEY_COLUMN = "memory_key"
# An index search of a large scope asks for this many times k candidates pre-filtered by the scope alone and drops
# the dead ones itself (LanceVectorStore._search_ann_scope_only).
ANN_LIVE_OVERFETCH = 2

# The indexes reads and merges use (LanceDB names each ``<column>_idx``): the bitmaps every search pre-filters by,
# the merge key's B-tree, and the full-text index of text and hybrid search.
SCALAR_INDEXES = ("user_id", KEY_COLUMN, "tenant_id", "agent_id")
INDEXED_COLUMNS = (*SCALAR_INDEXES, "text")

# A row replaces the stored one only when it wins by (version, event_id): replays and reorders are harmless;
# and only within the memory's user: an event naming another user never moves a memory (the pipeline refuses
# it first with a dead letter; this keeps LanceDB safe even from a write that skipped that check).
NEWER = (
    "(target.version < source.version OR (target.version = source.version AND target.event_id < source.event_id))"
    " AND target.user_id = source.user_id"
)

STATE_COLUMNS = [KEY_COLUMN, "version", "event_id", "content_hash", "deleted", "tenant_id", "user_id"]
# what a warm reads of each row beside its vector (users_columns): no text or metadata
# "text": a hybrid search's keyword ranking from the copy (processors/keyword.py)
WARM_COLUMNS = [KEY_COLUMN, "user_id", "agent_id", "run_id", "version", "event_id", "expires_at", "text"]
ROW_COLUMNS = [
    "memory_id",
    "tenant_id",
    "user_id",
    "agent_id",
    "run_id",
    "text",
    "metadata",
    "version",
    "event_id",
    "content_hash",
    "deleted",
    "updated_at",
    "created_at",
    "expires_at",
]
# Columns added after tables were first made, with how a table without them fills them in at open (_migrate_columns):
# created_at from the only time such a table kept, expires_at null (never).
ADDED_COLUMNS = {"created_at": "updated_at", "expires_at": "CAST(NULL AS BIGINT)"}


def table_schema(model: str, dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(KEY_COLUMN, pa.string(), nullable=False),
            pa.field("memory_id", pa.string(), nullable=False),
            pa.field("tenant_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("agent_id", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("text", pa.string()),
            pa.field("metadata", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("version", pa.int64(), nullable=False),
            pa.field("event_id", pa.string(), nullable=False),
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("deleted", pa.bool_(), nullable=False),
            pa.field("updated_at", pa.int64(), nullable=False),
            pa.field("created_at", pa.int64()),
            pa.field("expires_at", pa.int64()),
        ],
        metadata={MODEL_KEY: model.encode(), DIM_KEY: str(dim).encode()},
    )


@dataclass(frozen=True, slots=True)
class MaintenancePolicy:
    """When the index sink brings the table up to date between its batches (MEMSTREAM_SINK_* settings).

    Under load: the scalar indexes are rebuilt once ``index_rows`` rows are unindexed (cheap: ~0.2 s at 200k
    rows), the table compacted (``optimize()``: compaction, every index refreshed, old versions removed; seconds
    on a big table) once ``compact_rows`` rows or ``compact_commits`` commits (each leaves a small fragment) were
    written since the last compaction, or once rows have waited ``MAINTENANCE_S``. Idle for ``idle_s`` (nothing to
    write): everything, whatever the counts, so that the table a bulk load leaves is searched at full speed
    within seconds of the sink catching up."""

    index_rows: int = 50_000
    compact_rows: int = 200_000
    compact_commits: int = 200
    idle_s: float = 1.0
    keep_versions_s: float = 120.0
    # under load, a compaction the counts above call for runs only once the table holds this many small fragments
    # (or an index is missing: the first full-text index, the vector index once due); until then the scalar
    # indexes are rebuilt instead, which is what merges need. 0: compact whenever the counts call for it.
    # Why: optimize() rewrites every fragment under LanceDB's 1M-row target (all of them, on a table below 1M
    # rows) and re-merges every index, so its cost grows with the table: 20-33 s each past 500k rows, appends
    # stopped meanwhile, and the sink still 55 s behind after the last of 1M events (run c911a1c3). Idle
    # maintenance brings everything up to date once the load stops, whatever this says.
    load_compact_fragments: int = 0
    # after a full maintenance that took t seconds, idle maintenance waits at least idle_duty * t: a trickle of an
    # event every few seconds into a big table (compaction takes seconds there) keeps the sink busy with
    # maintenance at most a third of the time instead of all of it
    idle_duty: float = 2.0


@dataclass(frozen=True, slots=True)
class AnnPolicy:
    """The vector index (MEMSTREAM_ANN_* settings): built by the index sink's compaction once the table holds
    ``min_rows`` rows (0: never), refreshed by every later compaction (``optimize()`` adds the new rows to its
    partitions), and retrained with sqrt(rows) partitions by the first compaction after the table has grown
    ANN_REGROW**2-fold past the rows it was trained on (ann_stale); rows it does not cover yet are still searched,
    by LanceDB's flat scan of the unindexed part.

    A search uses it only where the scope is too large to scan: ``min_rows`` live-or-tombstoned rows or more
    (a whole tenant, or a very big user); a smaller scope (one user, usually) is scanned exactly
    (``bypass_vector_index``), pre-filtered by the scalar indexes. ``nprobes`` partitions of the IVF are
    searched and ``refine_factor`` * k candidates re-ranked by their exact distance: with these defaults the
    recall@10 of whole-tenant searches against exact search was >= 0.95 (tools/perf/lance_ann.py, the tests).

    IVF_SQ, not IVF_PQ: it needs no product-quantizer training, and ``refine_factor`` makes up for its coarser
    distances. Measured on 2 shared cores, 20k hash-384 rows, 141 partitions: IVF_PQ (48 sub-vectors, LanceDB's
    default 50 k-means iterations) built in 60 s, IVF_SQ (10 iterations) in 7 s, and IVF_SQ's recall@10 was
    0.99 at nprobes 20 and refine_factor 10 for queries like the memories; for short queries of a few words
    (what `bench --scenario serve` asks) at 100k rows, 316 partitions, recall@10 was 0.83 at nprobes 20, 0.96 at
    40 and 0.99 at 80 (p50 9.3 -> 11.8 ms, p99 16 -> 21 ms): hence 80. Partitions: sqrt(rows), so each holds
    about sqrt(rows) rows; k-means iterations are capped (``ANN_ITERATIONS``) to keep the sink's pause short on
    small machines. At 100k rows the
    build took 60 s there (the sink writes nothing meanwhile: one writer per table); tenant-wide p50 675 ->
    24.5 ms, recall@10 1.00 (README, reads)."""

    min_rows: int = 100_000
    nprobes: int = 80
    refine_factor: int = 10


ANN_ITERATIONS = 10
# How many IVF partitions the vector index was trained with: field metadata of the vector column, written by each
# build (absent on indexes built before it was kept: taken as ann_partitions(min_rows), the fewest one can have).
ANN_PARTITIONS_KEY = "memstream.ann_partitions"
# optimize() folds new rows into the partitions the index was trained with, so a table that grew after its index was
# built has fewer, bigger partitions than sqrt(rows), and a search probing ``nprobes`` of them reads that much more:
# an index trained at 100k-200k rows (the first compaction past min_rows) probes a fifth to a quarter of a 1M table.
# Retrained once sqrt(rows) reaches ANN_REGROW times its partitions (the table grew ANN_REGROW**2-fold): each build
# reads the whole table, so a growing table pays for log4 of its growth of them, not one per compaction.
ANN_REGROW = 2
# k-means trains on ANN_SAMPLE_RATE * partitions vectors (LanceDB's default 256: at 170k rows and 412 partitions,
# 105k vectors, most of the table, copied for training). The build stops the sink's appends (one writer) and was
# its peak memory: 32-36 s and 760-820 MB at 170-185k rows on the shared 2 cores (bench runs 565d471d, 15919fbc).
# 64 a partition stays above the ~40 k-means needs per centroid; recall is then up to nprobes and refine_factor.
ANN_SAMPLE_RATE = 64


def ann_partitions(rows: int) -> int:
    """The vector index's IVF partitions for a table of ``rows`` rows: sqrt(rows), each about as big as their count."""
    return max(1, math.isqrt(rows))


def ann_stale(trained_partitions: int, rows: int) -> bool:
    """Whether an index trained with ``trained_partitions`` partitions is due for retraining at ``rows`` rows
    (ANN_REGROW): its partitions have grown to ANN_REGROW times the size a fresh index's would have."""
    return ann_partitions(rows) >= ANN_REGROW * trained_partitions


@dataclass(frozen=True, slots=True)
class Backlog:
    """What maintenance has left to do, from the table's own statistics (``memstream stats`` shows it)."""

    rows: int
    fragments: int
    small_fragments: int  # LanceDB's count of fragments compaction would merge
    # the most rows one of INDEXED_COLUMNS' indexes (and the vector index, once the table is big enough for it)
    # does not cover (all rows if one is missing)
    unindexed_rows: int
    missing: tuple[str, ...]  # columns of INDEXED_COLUMNS (and "vector", when due) without their index
    stale_vector_index: bool = False  # the vector index was trained on a much smaller table (ann_stale)

    @property
    def clean(self) -> bool:
        """Nothing to do: an empty table, or every index present and covering every row, and few small fragments
        (COMPACT_SMALL_FRAGMENTS)."""
        if not self.rows:
            return True
        return (
            not self.unindexed_rows
            and not self.missing
            and not self.stale_vector_index
            and self.small_fragments < COMPACT_SMALL_FRAGMENTS
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "lancedb_fragments": self.fragments,
            "lancedb_small_fragments": self.small_fragments,
            "lancedb_unindexed_rows": self.unindexed_rows,
            "lancedb_missing_indexes": len(self.missing),
            "lancedb_vector_index_stale": int(self.stale_vector_index),
        }


def live_where(now_ms: int | None = None) -> str:
    """What every read of live memories filters by: not a tombstone, and not expired at ``now_ms`` (default: now).
    An expired memory is hidden from this moment; the expiry sweep's tombstone removes it later."""
    now = time.time_ns() // 1_000_000 if now_ms is None else int(now_ms)
    return f"deleted = false AND (expires_at IS NULL OR expires_at > {now})"


def scope_where(scope: ScopeQuery | None, *, live_only: bool) -> str | None:
    """A filter expression. Ids are validated against the id alphabet, so quoting them is safe."""
    clauses = [live_where()] if live_only else []
    if scope is not None:
        for column in ("tenant_id", "user_id", "agent_id", "run_id"):
            value = getattr(scope, column)
            if value is not None:
                validate_id(value, column)
                clauses.append(f"{column} = '{value}'")
    return " AND ".join(clauses) or None


_SESSIONS: dict[int, Any] = {}


def lancedb_session(cache_mb: int = CACHE_MB) -> Any:
    """One LanceDB session per process and size: its index and metadata caches are bounded and shared by every
    connection of the process.

    LanceDB's default caches are sized for a database server (gigabytes), and each index rebuild caches the new
    index under a new id while the old one's pages stay until evicted; the live indexes of a 1M-row table are
    tens of MB. Measured in the index sink over 1M events: 16 MB after 125k rows, 212 MB after 1M (the full-text
    and key indexes, rebuilt by each compaction), so the sink opens its table with a small session
    (``MEMSTREAM_SINK_CACHE_MB``) and readers with a larger one (``MEMSTREAM_LANCEDB_CACHE_MB``).
    """
    session = _SESSIONS.get(cache_mb)
    if session is None:
        from lancedb import Session

        size = cache_mb << 20
        session = _SESSIONS[cache_mb] = Session(index_cache_size_bytes=size, metadata_cache_size_bytes=size)
    return session


CREATE_RACE_S = 10.0  # how long an open waits for a table another process is creating to be readable
CREATE_RACE_SIGNS = ("not found", "retryable commit conflict")  # what LanceDB 0.40 answers to the loser of the race


async def open_or_create_table(db: Any, name: str, schema: pa.Schema | None) -> tuple[Any, bool]:
    """Open table ``name`` of connection ``db``, or create it (``schema`` None: don't): (table or None, created).

    Several processes opening one fresh deployment at once (``serve --workers 2``, a worker beside it) race to
    create the table: LanceDB lists a table whose first commit is still being written, and opening it then answers
    "was not found"; a create that lost the race answers the same, or a retryable commit conflict (its overwrite
    preempted by the winner's). Those are retried until the table opens or CREATE_RACE_S pass; any other error is
    raised at once."""
    deadline = time.monotonic() + CREATE_RACE_S
    waited = False
    while True:
        try:
            if name in await db.table_names():
                return await db.open_table(name), False
            if schema is None:
                return None, False
            return await db.create_table(name, schema=schema, exist_ok=True), True
        except Exception as exc:  # lancedb raises plain ValueError/RuntimeError for a table mid-creation
            message = str(exc).lower()
            if not any(sign in message for sign in CREATE_RACE_SIGNS) or time.monotonic() >= deadline:
                raise
            if not waited:
                log.info("LanceDB table %r is being created by another process: waiting for it", name)
                waited = True
            await asyncio.sleep(0.05)


def lancedb_cache_mb() -> float:
    """What this process' LanceDB sessions hold in their index and metadata caches, in MB."""
    return sum(int(session.size_bytes) for session in _SESSIONS.values()) / 2**20


class LanceVectorStore:
    """The :class:`processors.ports.VectorStore` on LanceDB (a local directory or any object-store URI)."""

    def __init__(
        self,
        table: Any,
        model: str,
        dim: int,
        optimize_every: int = 200,
        index_every: int = 0,
        *,
        background_maintenance: bool = True,
        ann: AnnPolicy | None = None,
    ) -> None:
        self._table = table
        self.ann = ann or AnnPolicy()
        self._ann_present: tuple[float, bool] = (-SCOPE_SIZE_TTL_S, False)  # (when checked, whether it exists)
        self._scope_sizes: dict[str, tuple[float, int]] = {}  # filter -> (when counted, rows): see _use_ann
        # The index sink (the table's one writer) runs maintenance between its own batches (maintain_if_due);
        # other writers (rebuilds, repairs) keep the background schedule.
        self.background_maintenance = background_maintenance
        self.rows_since_optimize = 0
        self.rows_since_index = 0  # rows written since the scalar indexes last covered every row (the sink's count)
        # whether the table may need maintenance the counts above do not see: set at open (another process, or an
        # older memstream, may have left it unindexed) and by every write; cleared when the table says it is clean
        self.behind = True
        self._idle_not_before = 0.0  # monotonic time before which idle maintenance waits (idle_duty, RETRY_S)
        self.maintenance_runs: list[dict[str, Any]] = []  # the last few inline runs, for status and benchmarks
        self.model = model
        self.dim = dim
        self._optimize_every = optimize_every
        self._index_every = index_every
        self._commits = 0
        self._since_index = 0
        self._last_maintenance = time.monotonic()
        self._indexed = False
        self._text_indexed = False
        self._maintenance: asyncio.Task[None] | None = None
        self._zeros = np.zeros(dim, dtype="<f4").tobytes()
        self.faults: FaultSwitch | None = None  # fault injection (tests, `memstream chaos`); None: off
        # One writer at a time: concurrent merge_insert of the same new key from two writers can leave
        # duplicate rows (lancedb issue #3377), and ingestion and compensation share this store.
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        uri: str,
        table: str,
        *,
        model: str,
        dim: int,
        optimize_every: int = 200,
        index_every: int = 0,
        background_maintenance: bool = True,
        cache_mb: int = CACHE_MB,
        ann: AnnPolicy | None = None,
        storage_options: Mapping[str, str] | None = None,
    ) -> LanceVectorStore:
        """Open (or create) the table; refuse a table built with another model or dimension. ``storage_options``:
        an object store's (``s3://``: endpoint, credentials, region; see Settings.lancedb_storage)."""
        import lancedb  # ~3 s to import: only commands that touch the store pay for it

        from infra import lance_nan_check

        lance_nan_check.install()  # LanceDB's check of every batch's vectors for NaN, in one numpy pass

        try:
            # Check for other processes' commits on every read: a read after `publish --wait` must see them.
            session = lancedb_session(cache_mb)
            db = await lancedb.connect_async(
                uri,
                read_consistency_interval=timedelta(0),
                session=session,
                storage_options=dict(storage_options) if storage_options else None,
            )
            handle, created = await open_or_create_table(db, table, table_schema(model, dim))
            if not created:
                schema = await handle.schema()
                _check_model(table, schema, model, dim)
                if KEY_COLUMN not in schema.names:
                    await _migrate_key(handle, table)
                await _migrate_columns(handle, table, schema.names)
        except ConfigError:
            raise
        except Exception as exc:  # lancedb raises plain OSError/RuntimeError/ValueError
            raise StoreError(f"cannot open LanceDB table {table!r} at {uri}: {exc}") from exc
        store = cls(
            handle, model, dim, optimize_every, index_every, background_maintenance=background_maintenance, ann=ann
        )
        store._indexed = await _has_index(handle, KEY_COLUMN)
        return store

    async def upsert(self, rows: Sequence[MemoryRow]) -> None:
        if not rows:
            return
        if self.faults is not None:
            self.faults.check("lancedb_write")
        try:
            async with self._write_lock:
                data = self._to_arrow(await self._with_created_at(rows))
                await (
                    self._table.merge_insert(KEY_COLUMN)
                    .when_matched_update_all(where=NEWER)
                    .when_not_matched_insert_all()
                    .execute(data)
                )
        except Exception as exc:
            raise StoreError(f"LanceDB upsert of {len(rows)} rows failed: {exc}") from exc
        self._commits += 1
        self._since_index += 1
        self.rows_since_optimize += len(rows)
        self.rows_since_index += len(rows)
        self.behind = True
        if self.background_maintenance:
            self._schedule_maintenance()

    async def _with_created_at(self, rows: Sequence[MemoryRow]) -> Sequence[MemoryRow]:
        """Rows of updates (created_at None) with the creation time the table holds for their memory (a live row),
        else their own updated_at: merge_insert replaces whole rows, so the time is read first (under the write
        lock: nothing changes it between). One keyed lookup, only for batches that hold updates."""
        keys = [r.key for r in rows if r.created_at is None and not r.deleted]
        held: dict[str, int] = {}
        if keys:
            query = self._table.query().where(f"({_key_in(keys)}) AND deleted = false")
            table = await query.select([KEY_COLUMN, "created_at"]).to_arrow()
            for key, created in zip(
                table.column(KEY_COLUMN).to_pylist(), table.column("created_at").to_pylist(), strict=True
            ):
                if created is not None:
                    held[key] = created
        if all(r.created_at is not None for r in rows):
            return rows
        return [
            r if r.created_at is not None else dataclasses.replace(r, created_at=held.get(r.key, r.updated_at))
            for r in rows
        ]

    async def expired(self, now_ms: int, limit: int) -> list[MemoryRow]:
        """Live memories whose expiry is at or before ``now_ms``, at most ``limit`` (what the expiry sweep
        deletes); without vectors."""
        where = f"deleted = false AND expires_at IS NOT NULL AND expires_at <= {int(now_ms)}"
        query = self._table.query().where(where).select(ROW_COLUMNS).limit(limit)
        return [_row(d) for d in (await _fetch(query, "expiry scan")).to_pylist()]

    async def any_expiring(self) -> bool:
        """Whether any live row has an expiry (the expiry sweep asks once, then scans only if so)."""
        query = self._table.query().where("deleted = false AND expires_at IS NOT NULL").select([KEY_COLUMN])
        return bool((await _fetch(query.limit(1), "expiry check")).num_rows > 0)

    def due_under_load(self, policy: MaintenancePolicy) -> str | None:
        """What the counts of this process' writes call for between two batches: "compaction" (everything),
        "indexes" (the scalar indexes rebuilt), or None."""
        if not self._commits:
            return None
        if (
            (policy.compact_commits and self._commits >= policy.compact_commits)
            or (policy.compact_rows and self.rows_since_optimize >= policy.compact_rows)
            or time.monotonic() - self._last_maintenance > MAINTENANCE_S
        ):
            return "compaction"
        if policy.index_rows and self.rows_since_index >= policy.index_rows:
            return "indexes"
        return None

    def idle_enough(self, policy: MaintenancePolicy, idle_for_s: float) -> bool:
        """Whether the sink has been idle long enough to bring the table up to date (paced by ``idle_duty``)."""
        return self.behind and idle_for_s >= policy.idle_s and time.monotonic() >= self._idle_not_before

    async def maintain_if_due(self, policy: MaintenancePolicy, idle_for_s: float = 0.0) -> dict[str, Any] | None:
        """Between the sink's batches, under the write lock (nothing else writes meanwhile, so compaction cannot
        be preempted): by need, not by commit count (see :class:`MaintenancePolicy`). ``idle_for_s``: how long
        the sink has had nothing to write (0 under load).

        Returns what it did (``kind`` "compaction" or "indexes", fragments before and after, rows that were
        unindexed, seconds), or None when nothing was due. Raises StoreError when it fails (the sink logs it;
        nothing is lost, the next batch goes on)."""
        kind, unindexed = self.due_under_load(policy), self.rows_since_index
        if kind != "compaction" and self.idle_enough(policy, idle_for_s):  # idle: all of it, not the indexes only
            try:
                backlog = await self.backlog()  # a few ms of metadata: once per idle spell after writes
            except StoreError:
                self._idle_not_before = time.monotonic() + RETRY_S  # not retried (and logged) every 100 ms
                raise
            if backlog.clean:
                self.behind, self.rows_since_index = False, 0
                return None
            kind, unindexed = "compaction", backlog.unindexed_rows
        if kind == "compaction" and policy.load_compact_fragments and not idle_for_s:
            kind = await self._compaction_or_indexes(policy.load_compact_fragments)
        if kind is None:
            return None
        started = time.perf_counter()
        ann_seconds: float | None = None
        async with self._write_lock:
            try:
                before = await self.fragments()
                if kind == "indexes":
                    await self._build_scalar_indexes()
                    self._indexed = True
                else:
                    ann_seconds = await self._bring_up_to_date(policy.keep_versions_s)
                after = await self.fragments() if kind == "compaction" else before
            except Exception as exc:
                self._idle_not_before = time.monotonic() + RETRY_S  # not retried (and logged) every 100 ms
                if isinstance(exc, StoreError):
                    raise
                raise StoreError(f"LanceDB maintenance failed: {exc}") from exc
            finally:
                self.rows_since_index = 0
                if kind == "compaction":  # a failed one is tried again at the next idle spell or threshold
                    self._commits = self._since_index = self.rows_since_optimize = 0
                    self._last_maintenance = time.monotonic()
        seconds = round(time.perf_counter() - started, 3)
        if kind == "compaction":
            # Lance does not merge fragments an index covers with fragments it does not: a load slow enough for the
            # sink to go idle in the middle of it leaves a fragment per such round. Still as many fragments as a
            # compaction is due for: the next idle spell looks again (the backlog check decides), paced as now.
            self.behind = after >= COMPACT_SMALL_FRAGMENTS
            self._idle_not_before = time.monotonic() + policy.idle_duty * seconds
        run = {
            "kind": kind,
            "fragments_before": before,
            "fragments_after": after,
            "unindexed_rows": unindexed,
            "seconds": seconds,
            "ann_built_s": ann_seconds,  # seconds the vector index took to build, None when it was not built
        }
        self.maintenance_runs = [*self.maintenance_runs[-9:], run]
        return run

    async def _compaction_or_indexes(self, small_fragments: int) -> str:
        """Under load: "compaction" only where an index is missing or ``small_fragments`` small fragments piled up;
        else "indexes" (the scalar indexes rebuilt: merges stay fast), and the counts start again so that the next
        look comes after as many rows or commits. The table stays ``behind``: the next idle spell compacts it."""
        backlog = await self.backlog()  # metadata: a few ms, once per threshold crossed
        if backlog.missing or backlog.small_fragments >= small_fragments:
            return "compaction"
        self._commits = self.rows_since_optimize = 0
        self._last_maintenance = time.monotonic()
        return "indexes"

    async def _bring_up_to_date(self, keep_versions_s: float) -> float | None:
        """The full-text index and the scalar indexes where missing, then ``optimize()``: compaction, every index
        refreshed to cover every row (the vector index too), versions older than ``keep_versions_s`` removed;
        then the vector index, if the table has grown big enough for one and has none. Returns the seconds the
        vector index took when it was built here, else None."""
        await self.ensure_text_index()
        rows = await self._table.count_rows()
        present = {index.name for index in await self._table.list_indices()}
        if rows >= INDEX_MIN_ROWS:
            if any(f"{column}_idx" not in present for column in SCALAR_INDEXES):
                await self._build_scalar_indexes()
            self._indexed = True
        await self._table.optimize(cleanup_older_than=timedelta(seconds=keep_versions_s))
        if not self._ann_due(rows) or (ANN_INDEX in present and not await self._ann_stale(rows)):
            return None
        # after the compaction: the index is trained on, and covers, the compacted fragments
        started = time.perf_counter()
        await self._build_ann_index(rows)
        return round(time.perf_counter() - started, 3)

    def _ann_due(self, rows: int) -> bool:
        """Whether a table of ``rows`` rows should have the vector index (AnnPolicy.min_rows)."""
        return bool(self.ann.min_rows) and rows >= self.ann.min_rows

    async def _ann_stale(self, rows: int) -> bool:
        """Whether the table's vector index is due for retraining at ``rows`` rows (ann_stale)."""
        return ann_stale(await self.ann_trained_partitions(), rows)

    async def ann_trained_partitions(self) -> int:
        """The IVF partitions the vector index was last trained with (ANN_PARTITIONS_KEY; a schema read)."""
        metadata = (await self._table.schema()).field(VECTOR_COLUMN).metadata or {}
        kept = metadata.get(ANN_PARTITIONS_KEY.encode())
        return int(kept) if kept else ann_partitions(self.ann.min_rows)

    async def _build_ann_index(self, rows: int) -> None:
        """Train and write the vector index (IVF_SQ, sqrt(rows) partitions, cosine: what searches measure), and
        keep its partition count beside it (ANN_PARTITIONS_KEY: when to retrain)."""
        from lancedb.index import IvfSq

        partitions = ann_partitions(rows)
        config = IvfSq(
            distance_type="cosine",
            num_partitions=partitions,
            max_iterations=ANN_ITERATIONS,
            sample_rate=ANN_SAMPLE_RATE,
        )
        try:
            await self._table.create_index(VECTOR_COLUMN, config=config, replace=True)
            metadata = {ANN_PARTITIONS_KEY: str(partitions)}
            await self._table.update_field_metadata({"path": VECTOR_COLUMN, "metadata": metadata})
        except Exception as exc:
            raise StoreError(
                f"LanceDB vector index build ({rows} rows, {partitions} partitions) failed: {exc}"
            ) from exc
        self._ann_present = (time.monotonic(), True)
        log.info("LanceDB vector index built over %d rows (%d partitions)", rows, partitions)

    async def backlog(self) -> Backlog:
        """Fragments, and rows the indexes do not cover, from the table's statistics (metadata: milliseconds)."""
        try:
            stats = await self._table.stats()
            present = {index.name for index in await self._table.list_indices()}
            rows = int(stats["num_rows"])
            # the vector index counts once the table is big enough for it, or once it exists
            columns = (
                [*INDEXED_COLUMNS, VECTOR_COLUMN] if self._ann_due(rows) or ANN_INDEX in present else INDEXED_COLUMNS
            )
            unindexed = 0
            for column in columns:
                name = f"{column}_idx"
                index = await self._table.index_stats(name) if name in present else None
                unindexed = max(unindexed, rows if index is None else int(index.num_unindexed_rows))
            stale = ANN_INDEX in present and self._ann_due(rows) and await self._ann_stale(rows)
        except Exception as exc:
            raise StoreError(f"LanceDB statistics unavailable: {exc}") from exc
        fragments = stats["fragment_stats"]
        missing = tuple(column for column in columns if f"{column}_idx" not in present)
        return Backlog(
            rows, int(fragments["num_fragments"]), int(fragments["num_small_fragments"]), unindexed, missing, stale
        )

    async def fragments(self) -> int:
        """How many fragments the table has (what compaction brings down)."""
        stats = await self._table.stats()
        return int(stats["fragment_stats"]["num_fragments"])

    def _schedule_maintenance(self) -> None:
        """In the background, beside the merges: scalar-index rebuilds every ``index_every`` commits, and
        ``optimize()`` (compaction, index refresh, the full-text index) every ``optimize_every`` commits or
        every minute.

        Why two. Every version-guarded merge joins the window against the table's ``memory_key`` column: through
        the BTREE index for the rows it covers, by a scan of every row it does not. So the merge's cost grows
        with the rows written since the index was last refreshed. ``optimize()`` refreshes it, but beside
        merges that update rows its compaction is preempted ("Retryable commit conflict ... Rewrite preempted by
        Update") and then the whole call fails, index refresh included, so the unindexed rows only grew.
        Rebuilding the scalar indexes
        (``create_index(replace=True)``) does not conflict with merges and is cheap. Measured
        (``tools/perf/lance_maintenance.py``, 100 merges of 2,000 rows, 10% updates, into a 300k-row table):
        no maintenance 12.1k rows/s (merges 80 -> 230 ms); ``optimize()`` every 10 merges 9.2k rows/s (5 of 6
        failed; 177k rows left unindexed); index rebuilds every 10 merges 31.2k rows/s (merges 49 -> 60 ms,
        each rebuild 0.06-0.09 s). Over 1M events the last 10% ran at 0.33-0.34 of the first 10% with the
        rebuilds, 0.24 without. Compaction itself still only succeeds when no merge touches the fragments it
        rewrites; under steady updates the fragments pile up (~500 by 1M events) and merges and searches both
        pay for that: the rest of that slowdown. Taking the write lock for it was measured to stop ingestion
        for seconds, so it stays beside them.
        """
        if self._maintenance is not None and not self._maintenance.done():
            return
        if self._optimize_every:
            due = self._commits >= self._optimize_every or time.monotonic() - self._last_maintenance > MAINTENANCE_S
            if due and self._commits:
                self._commits = self._since_index = 0
                self._last_maintenance = time.monotonic()
                self._maintenance = asyncio.create_task(self._maintain())
                return
        if self._index_every and self._since_index >= self._index_every:
            self._since_index = 0
            self._maintenance = asyncio.create_task(self._refresh_indexes())

    async def _refresh_indexes(self) -> None:
        started = time.perf_counter()
        try:
            if not self._indexed and await self._table.count_rows() < INDEX_MIN_ROWS:
                return
            await self._build_scalar_indexes()
            self._indexed = True
        except Exception as exc:  # the next refresh tries again; merges only get slower meanwhile
            log.warning("LanceDB index refresh failed: %s", exc)
            return
        log.debug("LanceDB scalar indexes rebuilt in %.2fs", time.perf_counter() - started)

    async def _maintain(self) -> None:
        started = time.perf_counter()
        what = "optimize"
        try:
            await self.ensure_text_index()  # full-text search needs one at any size: build it early, while cheap
            if not self._indexed and await self._table.count_rows() >= INDEX_MIN_ROWS:
                what = "index build"
                await self.build_indexes()
                self._indexed = True
            else:
                await self.optimize()
        except Exception as exc:  # maintenance loses nothing when it fails: say so and go on
            log.warning("LanceDB maintenance failed: %s", exc)
        log.info("LanceDB maintenance (%s) took %.1fs; %s", what, time.perf_counter() - started, await self.shape())

    async def shape(self) -> str:
        """Fragments and rows the ``memory_key`` index does not cover yet: what every merge's cost grows with."""
        try:
            stats = await self._table.stats()
            index = await self._table.index_stats(f"{KEY_COLUMN}_idx") if self._indexed else None
        except Exception as exc:
            return f"shape unknown ({exc})"
        unindexed = index.num_unindexed_rows if index is not None else stats["num_rows"]
        return f"{stats['fragment_stats']['num_fragments']} fragments, {stats['num_rows']} rows, {unindexed} unindexed"

    async def vector_index(self) -> dict[str, Any]:
        """What a whole-tenant search goes through (``memstream bench`` reports it beside the figures): the table's
        rows, and its vector index's type, partitions, rows covered and not, and the searches' nprobes and
        refine_factor; ``index`` None where there is none (an exact scan)."""
        try:
            rows = await self._table.count_rows()
            stats = await self._table.index_stats(ANN_INDEX) if await _has_index(self._table, VECTOR_COLUMN) else None
            partitions = await self.ann_trained_partitions() if stats is not None else None
        except Exception as exc:
            raise StoreError(f"LanceDB statistics unavailable: {exc}") from exc
        if stats is None:
            return {"rows": rows, "index": None}
        return {
            "rows": rows,
            "index": stats.index_type,
            "partitions": partitions,
            "indexed_rows": stats.num_indexed_rows,
            "unindexed_rows": stats.num_unindexed_rows,
            "nprobes": self.ann.nprobes,
            "refine_factor": self.ann.refine_factor,
        }

    async def close(self) -> None:
        """Let a running compaction finish (it is safe to interrupt, but finishing keeps the table tidy)."""
        if self._maintenance is not None:
            await asyncio.gather(self._maintenance, return_exceptions=True)

    async def add_rows(self, rows: Sequence[MemoryRow], chunk: int = APPEND_CHUNK) -> None:
        """Append rows without the version guard: for building tables from data known to be new (a rebuild into an
        empty generation, benchmarks). One commit, so one fragment however many rows (a rebuild's compaction then
        has nothing to rewrite); converted to Arrow ``chunk`` rows at a time as LanceDB reads them."""
        if not rows:
            return
        schema = table_schema(self.model, self.dim)

        def batches() -> Iterator[pa.RecordBatch]:
            for start in range(0, len(rows), chunk):
                yield from self._to_arrow(rows[start : start + chunk]).to_batches()

        try:
            await self._table.add(pa.RecordBatchReader.from_batches(schema, batches()))
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"LanceDB append of {len(rows)} rows failed: {exc}") from exc

    async def build_indexes(self) -> None:
        """Scalar indexes on the columns every read filters by, then compaction (so new rows are covered)."""
        await self._build_scalar_indexes()
        await self.optimize()

    async def _build_scalar_indexes(self) -> None:
        from lancedb.index import Bitmap, BTree

        try:
            for column in SCALAR_INDEXES:  # the merge key is unique: a B-tree; the scope columns repeat: bitmaps
                config = BTree() if column == KEY_COLUMN else Bitmap()
                await self._table.create_index(column, config=config, replace=True)
        except Exception as exc:
            raise StoreError(f"LanceDB index build failed: {exc}") from exc

    async def optimize(self) -> None:
        """Compact the small fragments many commits leave behind (they make searches many times slower)."""
        try:
            await self._table.optimize()
        except Exception as exc:  # a failed compaction loses nothing: log and go on
            log.warning("LanceDB optimize failed: %s", exc)

    async def get(self, keys: Sequence[str]) -> list[MemoryRow]:
        """The rows of these memories (keys ``<tenant>/<memory id>``), in the order asked; absent ones left out."""
        if not keys:
            return []
        where = _key_in(keys)  # a malformed key is a SchemaError, not a store failure
        try:
            table = await self._table.query().where(where).select(ROW_COLUMNS).to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB get failed: {exc}") from exc
        by_key = {r.key: r for r in (_row(d) for d in table.to_pylist())}
        return [by_key[k] for k in keys if k in by_key]

    async def owners(self, keys: Sequence[str]) -> dict[str, str]:
        """The user each of these memories belongs to (those LanceDB holds, tombstones included)."""
        if not keys:
            return {}
        where = _key_in(keys)
        try:
            table = await self._table.query().where(where).select([KEY_COLUMN, "user_id"]).to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB owner lookup failed: {exc}") from exc
        return dict(zip(table.column(KEY_COLUMN).to_pylist(), table.column("user_id").to_pylist(), strict=True))

    async def get_with_vectors(self, keys: Sequence[str]) -> list[MemoryRow]:
        """Whole rows, vectors included, by key ``<tenant>/<memory id>`` (a rebuild copying the serving
        generation's rows it cannot rebuild)."""
        if not keys:
            return []
        where = _key_in(keys)
        try:
            table = await self._table.query().where(where).select([*ROW_COLUMNS, "vector"]).to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB get failed: {exc}") from exc
        out = []
        for d in table.to_pylist():
            row = _row(d)
            vector = d.get("vector")
            raw = b"" if row.deleted or vector is None else np.asarray(vector, dtype="<f4").tobytes()
            out.append(dataclasses.replace(row, vector=raw))
        return out

    async def search(self, vector: Vectors, scope: ScopeQuery, k: int) -> list[Hit]:
        """The k nearest live memories of the scope: through the vector index where the scope is too large to
        scan (AnnPolicy), else exactly."""
        try:
            ann = await self.use_ann(scope)
            if ann:
                hits = await self._search_ann_scope_only(vector, scope, k)
                if hits is not None:
                    return hits
            return await self._search(vector, scope_where(scope, live_only=True), k, ann=ann)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"LanceDB search failed: {exc}") from exc

    async def _search_ann_scope_only(self, vector: Vectors, scope: ScopeQuery, k: int) -> list[Hit] | None:
        """An index search pre-filtered by the scope alone, its dead rows (tombstones, expired) dropped here.
        The scope's columns have bitmap indexes; ``deleted`` and ``expires_at`` have none, and pre-filtering by
        them reads both columns of every row in the scope on each search (at 1M rows, 60 of a search's 75 ms of
        CPU: PERFORMANCE.md, seventh session). None when fewer than k of the ANN_LIVE_OVERFETCH * k candidates
        are live and there may be more: the caller searches with the whole filter, so a scope full of
        tombstones still gets its k live memories."""
        limit = k * ANN_LIVE_OVERFETCH
        hits = await self._search(vector, scope_where(scope, live_only=False), limit, ann=True)
        now = time.time_ns() // 1_000_000
        live = [h for h in hits if not h.row.deleted and not h.row.expired(now)]
        if len(live) < k and len(hits) == limit:
            return None
        return live[:k]

    async def _search(self, vector: Vectors, where: str | None, k: int, *, ann: bool) -> list[Hit]:
        query = self._table.vector_search(np.asarray(vector, dtype=np.float32)).distance_type("cosine")
        if where:
            query = query.where(where)  # the async API pre-filters by default: k results within the scope
        if ann:
            query = query.nprobes(self.ann.nprobes).refine_factor(self.ann.refine_factor)
        else:
            query = query.bypass_vector_index()
        table = await query.limit(k).select([*ROW_COLUMNS, "_distance"]).to_arrow()
        return [Hit(_row(d), 1.0 - float(d["_distance"])) for d in table.to_pylist()]

    async def use_ann(self, scope: ScopeQuery) -> bool:
        """Whether a search of this scope goes through the vector index: the table has one and the scope holds
        ``ann.min_rows`` rows or more. An IVF search pre-filtered to a small scope finds few of its rows in the
        partitions it probes (fewer than k, or not the nearest), and scanning a small scope is cheap anyway.

        Both are remembered for SCOPE_SIZE_TTL_S (the sink, another process, builds the index; scopes grow
        slowly): a count of the scope's rows by its bitmap indexes costs about a millisecond, a search tens."""
        if not self.ann.min_rows:
            return False
        now = time.monotonic()
        checked, present = self._ann_present
        if now - checked >= SCOPE_SIZE_TTL_S:
            present = await _has_index(self._table, VECTOR_COLUMN)
            self._ann_present = (now, present)
        if not present:
            return False
        where = scope_where(scope, live_only=False)  # tombstones included: the bitmaps alone count it
        counted, rows = self._scope_sizes.get(where or "", (-SCOPE_SIZE_TTL_S, 0))
        if now - counted >= SCOPE_SIZE_TTL_S:
            rows = int(await self._table.count_rows(where))
            if len(self._scope_sizes) >= SCOPE_SIZE_CACHE:
                self._scope_sizes.clear()
            self._scope_sizes[where or ""] = (now, rows)
        return rows >= self.ann.min_rows

    async def ensure_text_index(self) -> bool:
        """The BM25 (inverted) index on ``text`` that full-text search needs; rows added after it are searched
        by a scan until ``optimize`` folds them in. Returns whether it had to be built."""
        if self._text_indexed or await _has_index(self._table, "text"):
            self._text_indexed = True  # an index, once built, stays (only new rows wait for optimize)
            return False
        from lancedb.index import FTS

        try:
            await self._table.create_index("text", config=FTS(), replace=True)
        except Exception as exc:
            raise StoreError(f"LanceDB full-text index build failed: {exc}") from exc
        self._text_indexed = True
        return True

    async def text_search(self, text: str, scope: ScopeQuery, k: int) -> list[Hit]:
        """BM25 full-text search within the scope (live memories); the score is BM25's, higher is better."""
        await self.ensure_text_index()
        query = self._table.query().nearest_to_text(text)
        where = scope_where(scope, live_only=True)
        if where:
            query = query.where(where)
        try:
            table = await query.limit(k).select([*ROW_COLUMNS, "_score"]).to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB full-text search failed: {exc}") from exc
        return [Hit(_row(d), float(d["_score"])) for d in table.to_pylist()]

    async def text_search_orders(self, text: str, scope: ScopeQuery, k: int) -> list[tuple[str, int, str, float]]:
        """:meth:`text_search`'s ranking without its rows: (key, version, event id, BM25 score), best first. The
        rows' text and metadata were half of a full-text search's CPU (3 of 6 ms at 100k rows): a reader takes
        them from Redis, for the versions named here."""
        await self.ensure_text_index()
        query = self._table.query().nearest_to_text(text)
        where = scope_where(scope, live_only=True)
        if where:
            query = query.where(where)
        try:
            table = await query.limit(k).select([KEY_COLUMN, "version", "event_id", "_score"]).to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB full-text search failed: {exc}") from exc
        columns = [table.column(name).to_pylist() for name in (KEY_COLUMN, "version", "event_id", "_score")]
        return [(key, int(v), e, float(score)) for key, v, e, score in zip(*columns, strict=True)]

    async def scope_rows(self, scope: ScopeQuery, limit: int | None = None) -> list[MemoryRow]:
        """Live memories of a scope, without vectors (what a context block is built from)."""
        query = self._table.query().where(scope_where(scope, live_only=True)).select(ROW_COLUMNS)
        if limit is not None:
            query = query.limit(limit)
        return [_row(d) for d in (await _fetch(query, "scope read")).to_pylist()]

    async def scope_vectors(self, scope: ScopeQuery, limit: int) -> list[MemoryRow]:
        """Live memories of a scope with their vectors, at most ``limit``: one filtered scan, no vector search
        (what a reader's hot copy of a user is built from)."""
        query = self._table.query().where(scope_where(scope, live_only=True)).select([*ROW_COLUMNS, "vector"])
        return self._rows_with_vectors(await _fetch(query.limit(limit), "scope scan"))

    async def scope_users(self, scope: ScopeQuery) -> list[str]:
        """The users with live memories in a scope (one scan of the user column)."""
        query = self._table.query().where(scope_where(scope, live_only=True)).select(["user_id"])
        users = (await _fetch(query, "user scan")).column("user_id").unique()
        return sorted(str(u) for u in users.to_pylist())

    async def users_columns(self, scope: ScopeQuery, limit: int) -> ScopeColumns | None:
        """Live memories of a scope as columns in (user, key) order with their vectors (processors/hot_vectors.py
        ScopeColumns): no text or metadata and no Python object per row, which is what a warm's 100k rows cost
        most (issue 24). None when the scope holds more than ``limit`` (a reader builds each user's copy from all
        of the user's rows: a cut scan would leave some users' copies short) or a row has no vector. The columns
        are made in a thread: the event loop keeps serving meanwhile."""
        table = await self.users_scan(scope, limit)
        return None if table is None else await asyncio.to_thread(scope_columns, [table], self.dim)

    async def users_scan(self, scope: ScopeQuery, limit: int) -> pa.Table | None:
        """:meth:`users_columns`' scan as LanceDB answers it (WARM_COLUMNS and the vector), for a caller that joins
        several tables' scans first (infra/sharded_store.py); None as there."""
        where = scope_where(scope, live_only=True)
        try:
            count = await self._table.count_rows(where)
        except Exception as exc:
            raise StoreError(f"LanceDB count of {scope} failed: {exc}") from exc
        if count > limit:
            return None
        query = self._table.query().where(where).select([*WARM_COLUMNS, "vector"])
        table = await _fetch(query, "users scan")
        return None if table.column("vector").null_count else table

    def _rows_with_vectors(self, table: pa.Table) -> list[MemoryRow]:
        """Rows of a scan that selected ROW_COLUMNS and the vector. Vectors are taken from the Arrow column in one
        piece: a Python list of floats per row would cost more than the scan."""
        column = table.column("vector").combine_chunks()
        rows = table.select(ROW_COLUMNS).to_pylist()
        if column.null_count:  # a row without a vector (never written so): row by row, it gets none
            raws = [b"" if v is None else np.asarray(v, dtype="<f4").tobytes() for v in column.to_pylist()]
        else:
            raws = [v.tobytes() for v in _vector_array(column).reshape(len(rows), -1)] if rows else []
        return [dataclasses.replace(_row(d), vector=raw) for d, raw in zip(rows, raws, strict=True)]

    async def page_rows(self, scope: ScopeQuery, after: str | None, limit: int | None) -> list[MemoryRow]:
        """Live memories of a scope in memory-id order, those after ``after`` only, at most ``limit`` (None: all).

        The id order is what makes a listing's cursor stable: a memory added or changed between two pages is on
        the later page or an earlier one, never on both."""
        from lancedb.query import ColumnOrdering

        where = scope_where(scope, live_only=True)
        if after is not None:
            validate_id(after, "cursor")  # quoted below: only the id alphabet may reach the expression
            where = f"{where} AND memory_id > '{after}'"
        ordering = [ColumnOrdering(column_name="memory_id", ascending=True)]
        query = self._table.query().where(where).select(ROW_COLUMNS).order_by(ordering)
        if limit is not None:
            query = query.limit(limit)
        return [_row(d) for d in (await _fetch(query, "page read")).to_pylist()]

    async def recent_scopes(self, limit: int) -> list[Scope]:
        """The (tenant, user, agent) scopes with the most recently changed memories, newest first (warmup)."""
        try:
            table = await self._table.query().select(["tenant_id", "user_id", "agent_id", "updated_at"]).to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB scan failed: {exc}") from exc
        newest: dict[tuple[str, str, str | None], int] = {}
        cols = [table.column(c).to_pylist() for c in ("tenant_id", "user_id", "agent_id", "updated_at")]
        for tenant, user, agent, ts in zip(*cols, strict=True):
            key = (tenant, user, agent)
            if ts > newest.get(key, -1):
                newest[key] = ts
        ranked = sorted(newest.items(), key=lambda item: (-item[1], item[0][0], item[0][1], item[0][2] or ""))
        return [Scope(t, u, a, None) for (t, u, a), _ in ranked[:limit]]

    async def states(self, scope: ScopeQuery | None = None) -> dict[str, StoreState]:
        query = self._table.query().select(STATE_COLUMNS)
        where = scope_where(scope, live_only=False)
        if where:
            query = query.where(where)
        try:
            table = await query.to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB scan failed: {exc}") from exc
        cols = {name: table.column(name).to_pylist() for name in STATE_COLUMNS[:5]}
        return {
            key: StoreState(v, e, h, d)
            for key, v, e, h, d in zip(
                cols[KEY_COLUMN], cols["version"], cols["event_id"], cols["content_hash"], cols["deleted"], strict=True
            )
        }

    async def delete_exact(self, states: Mapping[str, StoreState]) -> int:
        """Remove each row only if it still holds exactly that state (the reconciler's conditional delete)."""
        if not states:
            return 0
        removed = 0
        items = list(states.items())
        for start in range(0, len(items), DELETE_CHUNK):
            clauses = [_exact(m, st) for m, st in items[start : start + DELETE_CHUNK]]
            try:
                async with self._write_lock:
                    before = await self._table.count_rows()
                    await self._table.delete(" OR ".join(clauses))
                    removed += before - await self._table.count_rows()
            except Exception as exc:
                raise StoreError(f"LanceDB delete of {len(clauses)} rows failed: {exc}") from exc
        return removed

    async def duplicates(self, scope: ScopeQuery | None = None) -> set[str]:
        """Memory keys held by more than one row (the reconciler removes the extras)."""
        query = self._table.query().select([KEY_COLUMN])
        where = scope_where(scope, live_only=False)
        if where:
            query = query.where(where)
        try:
            ids = (await query.to_arrow()).column(KEY_COLUMN).to_pylist()
        except Exception as exc:
            raise StoreError(f"LanceDB scan failed: {exc}") from exc
        counts = Counter(ids)
        return {m for m, n in counts.items() if n > 1}

    async def delete_ids(self, keys: Sequence[str]) -> None:
        """Remove every row of these memories (keys; before they are rewritten from the log)."""
        for start in range(0, len(keys), DELETE_CHUNK):
            chunk = keys[start : start + DELETE_CHUNK]
            where = _key_in(chunk)
            try:
                async with self._write_lock:
                    await self._table.delete(where)
            except Exception as exc:
                raise StoreError(f"LanceDB delete of {len(chunk)} memories failed: {exc}") from exc

    async def count(self, live_only: bool = True) -> int:
        return int(await self._table.count_rows("deleted = false" if live_only else None))

    def _to_arrow(self, rows: Sequence[MemoryRow]) -> pa.Table:
        vectors = b"".join(r.vector or self._zeros for r in rows)
        if len(vectors) != len(rows) * self.dim * 4:
            raise StoreError(f"vectors do not match the table's dimension {self.dim}", retriable=False)
        flat = pa.array(np.frombuffer(vectors, dtype="<f4"), type=pa.float32())
        columns: dict[str, Any] = {
            KEY_COLUMN: [r.key for r in rows],
            "memory_id": [r.memory_id for r in rows],
            "tenant_id": [r.scope.tenant_id for r in rows],
            "user_id": [r.scope.user_id for r in rows],
            "agent_id": [r.scope.agent_id for r in rows],
            "run_id": [r.scope.run_id for r in rows],
            "text": [r.text for r in rows],
            "metadata": [orjson.dumps(r.metadata).decode() for r in rows],
            "vector": pa.FixedSizeListArray.from_arrays(flat, self.dim),
            "version": [r.version for r in rows],
            "event_id": [r.event_id for r in rows],
            "content_hash": [r.content_hash for r in rows],
            "deleted": [r.deleted for r in rows],
            "updated_at": [r.updated_at for r in rows],
            "created_at": [r.updated_at if r.created_at is None else r.created_at for r in rows],
            "expires_at": [r.expires_at for r in rows],
        }
        return pa.table(columns, schema=table_schema(self.model, self.dim))


def _checked_key(key: str) -> str:
    """A memory key whose two parts are ids: the closed id alphabet (and ``/``) keeps filter expressions safe."""
    tenant_id, memory_id = split_key(key)
    validate_id(tenant_id, "tenant_id")
    validate_id(memory_id, "memory_id")
    return key


def _key_in(keys: Sequence[str]) -> str:
    quoted = ", ".join(f"'{_checked_key(k)}'" for k in keys)
    return f"{KEY_COLUMN} IN ({quoted})"


def _exact(key: str, state: StoreState) -> str:
    _checked_key(key)
    validate_id(state.event_id, "event_id")  # the closed id alphabet keeps the expression safe
    content_hash = state.content_hash.replace("'", "''")  # SQL quoting: hashes come from the log
    return (
        f"({KEY_COLUMN} = '{key}' AND version = {int(state.version)} AND event_id = '{state.event_id}'"
        f" AND content_hash = '{content_hash}' AND deleted = {str(state.deleted).lower()})"
    )


async def _migrate_key(handle: Any, table: str) -> None:
    """Give a table made before memories were keyed by (tenant, memory id) its ``memory_key`` column.

    In place and computed from the row's own columns (one Lance commit that adds a column: no vectors rewritten,
    no log needed; the embedded-stack log lives in memory and may not hold the history a rebuild would need).
    Such a table keyed memories by ``memory_id`` alone, so its keys stay unique. The B-tree on the new key is
    built by the next maintenance, as for any table. Redis of that deployment is refilled by the reconciler
    (its memory keys moved too, see infra/redis_store.py)."""
    log.warning("LanceDB table %r has no %s column (made by an older memstream): adding it", table, KEY_COLUMN)
    try:
        await handle.add_columns({KEY_COLUMN: "concat(tenant_id, '/', memory_id)"})
    except Exception as exc:
        raise StoreError(
            f"LanceDB table {table!r} predates tenant-scoped memory keys and could not be migrated in place ({exc}): "
            f"run `memstream rebuild` to build a new generation from the log",
            retriable=False,
        ) from exc


async def _migrate_columns(handle: Any, table: str, names: Sequence[str]) -> None:
    """Give a table made before created_at and expires_at were kept those columns (one commit that adds columns,
    computed from the row's own: no vectors rewritten)."""
    missing = {name: sql for name, sql in ADDED_COLUMNS.items() if name not in names}
    if not missing:
        return
    log.warning("LanceDB table %r has no %s column(s) (older memstream): adding them", table, sorted(missing))
    try:
        await handle.add_columns(missing)
    except Exception as exc:
        try:  # another process (the worker and `memstream serve` open the table at once) may have added them
            if set(missing) <= set((await handle.schema()).names):
                return
        except Exception:  # the schema unreadable too: the original failure is what to report
            pass
        raise StoreError(
            f"LanceDB table {table!r} could not be given the columns {sorted(missing)} ({exc}): run `memstream "
            f"rebuild` to build a new generation from the log",
            retriable=False,
        ) from exc


async def _has_index(table: Any, column: str) -> bool:
    try:
        return any(column in index.columns for index in await table.list_indices())
    except Exception:  # an index listing is an optimisation hint, never a reason to fail
        return False


def _check_model(table: str, schema: pa.Schema, model: str, dim: int) -> None:
    meta = schema.metadata or {}
    have_model = meta.get(MODEL_KEY, b"?").decode()
    have_dim = int(meta.get(DIM_KEY, b"0").decode() or 0)
    if have_model != model or have_dim != dim:
        raise ConfigError(
            f"LanceDB table {table!r} holds {have_model} vectors ({have_dim}-d) but the embedder is {model} "
            f"({dim}-d): use the matching MEMSTREAM_EMBEDDER or another MEMSTREAM_LANCEDB_TABLE"
        )


async def _fetch(query: Any, what: str) -> pa.Table:
    """Run a LanceDB query to Arrow; a driver error becomes a :class:`StoreError` naming ``what`` was read."""
    try:
        return await query.to_arrow()
    except Exception as exc:  # lancedb raises plain OSError/RuntimeError/ValueError
        raise StoreError(f"LanceDB {what} failed: {exc}") from exc


def scope_columns(scans: Sequence[pa.Table], dim: int) -> ScopeColumns:
    """Users scans (WARM_COLUMNS and the vector; one per table) as ScopeColumns: the small columns sorted by (user,
    key) in Arrow, the vectors left in the scans' order (``positions`` maps one to the other) and normalized."""
    import pyarrow.compute as pc

    table = scans[0] if len(scans) == 1 else pa.concat_tables(scans)

    order = pc.sort_indices(
        table.select(["user_id", KEY_COLUMN]), sort_keys=[("user_id", "ascending"), (KEY_COLUMN, "ascending")]
    )
    small = table.select(WARM_COLUMNS).take(order)

    def encoded(name: str) -> tuple[npt.NDArray[np.int32], list[Any]]:
        column = small.column(name).combine_chunks().dictionary_encode(null_encoding="encode")
        return column.indices.to_numpy(zero_copy_only=False).astype(np.int32), column.dictionary.to_pylist()

    users, user_names = encoded("user_id")
    agents, agent_names = encoded("agent_id")
    runs, run_names = encoded("run_id")
    expires = small.column("expires_at").fill_null(NEVER)
    texts = small.column("text").combine_chunks()  # Arrow, sliced per user: strings built on a keyword search only
    return ScopeColumns(
        user_codes=users,
        user_names=[str(u) for u in user_names],
        keys=small.column(KEY_COLUMN).to_numpy(),
        versions=small.column("version").to_numpy().astype(np.int64),
        event_ids=small.column("event_id").to_numpy(),
        expires=expires.to_numpy().astype(np.int64),
        agents=agents,
        runs=runs,
        agent_codes={name: code for code, name in enumerate(agent_names)},
        run_codes={name: code for code, name in enumerate(run_names)},
        vectors=_vector_array(table.column("vector")).reshape(table.num_rows, dim),
        positions=order.to_numpy().astype(np.intp),
        texts=texts,
        text_bytes=np.concatenate(([0], np.cumsum(pc.binary_length(texts).fill_null(0).to_numpy()))).astype(np.int64),
    ).normalized()


def _vector_array(column: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.float32]:
    """A vector column without nulls as one flat float32 array, chunk by chunk: each chunk's values are a buffer
    numpy views without a copy (combining the chunks first copied 150 MB at 100k rows)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.asarray(c.flatten().to_numpy(zero_copy_only=False), dtype="<f4") for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, "<f4")


def _row(d: dict[str, Any]) -> MemoryRow:
    return MemoryRow(
        memory_id=d["memory_id"],
        scope=Scope(d["tenant_id"], d["user_id"], d["agent_id"], d["run_id"]),
        text=d["text"] or "",
        metadata=orjson.loads(d["metadata"]) if d["metadata"] else {},
        version=d["version"],
        event_id=d["event_id"],
        content_hash=d["content_hash"],
        deleted=d["deleted"],
        updated_at=d["updated_at"],
        created_at=d.get("created_at"),
        expires_at=d.get("expires_at"),
    )
