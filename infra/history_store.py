"""LanceDB: the durable history of every memory, one row per applied version (``history(id)`` reads it).

The log may be short (the embedded stack's broker keeps it in memory, a real one has retention), so the history
of a memory cannot be read back from it: the index sink, which sees every embedded event once per log position,
writes each version of its batch here as well (processors/indexing.py). The table is ``<table>__history`` beside
the generations, not inside one: a rebuild into a new generation replays what the log still holds, while this
table keeps what it no longer does.

Idempotent by construction: each version keeps where its event was read (``src_topic``/``src_partition``/
``src_offset``, the events topic's position, which a window processed again after an ingest crash keeps), and a
version read past the highest position the table holds for its partition is new: it is appended. Every other
version (a batch written twice after a crash before the offset commit, a replay of the embedded topic, a log that
restarted its offsets, a row without a position) goes through a merge on (memory_key, event_id) that leaves a
matched row alone. The merge joins by scanning the table (LanceDB probes a scalar index only for a one-column key),
so it grew with it: 240-400 ms of each 10k-row sink batch at 1M events through `publish --wait`, against ~20 ms for
an append. The highest positions are read from the table at the first write (a scan of three columns) and again
whenever the table holds a commit the store did not make (another shard's sink, a compaction); a table made before
positions were kept merges every write of the process that added those columns.
No vectors: history answers "what did this memory say, and when", not searches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from infra.lance_store import KEY_COLUMN, _checked_key, lancedb_session, open_or_create_table
from processors.model import HistoryRow, MemoryRow
from schemas.errors import StoreError

log = logging.getLogger("memstream.history")

HISTORY_SUFFIX = "__history"
MERGE_ON = [KEY_COLUMN, "event_id"]
COMPACT_EVERY = 200  # commits (one per sink batch) before the small fragments are compacted

HISTORY_SCHEMA = pa.schema(
    [
        pa.field(KEY_COLUMN, pa.string(), nullable=False),
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("memory_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("deleted", pa.bool_(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("actor", pa.string()),  # the event's actor (EXPIRY_ACTOR: the expiry sweep), null for agents
        pa.field("src_topic", pa.string()),  # where the event was read (null: unknown, as rows of older tables)
        pa.field("src_partition", pa.int64()),
        pa.field("src_offset", pa.int64()),
    ]
)
POSITION_COLUMNS = ["src_topic", "src_partition", "src_offset"]
# columns tables made by an older memstream lack, and what they hold for the rows already there
ADDED_COLUMNS = {
    "actor": "CAST(NULL AS STRING)",  # no actors were kept
    "src_topic": "CAST(NULL AS STRING)",
    "src_partition": "CAST(NULL AS BIGINT)",
    "src_offset": "CAST(NULL AS BIGINT)",
}
Position = tuple[str, int]
READ_COLUMNS = ["version", "event_id", "text", "deleted", "ts", "actor"]


def history_table_name(base_table: str) -> str:
    """The history table of a deployment: one for all generations (``MEMSTREAM_LANCEDB_TABLE`` + suffix)."""
    return base_table + HISTORY_SUFFIX


class LanceHistoryStore:
    """The :class:`processors.ports.HistoryStore` on LanceDB. Opened lazily: a reader before the sink's first
    write finds no table and answers with no history (rather than racing the sink to create it)."""

    def __init__(
        self, uri: str, table: str, *, cache_mb: int, storage_options: Mapping[str, str] | None = None
    ) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options) if storage_options else None
        self.name = table
        self.cache_mb = cache_mb
        self._table: Any = None
        self._commits = 0
        self._indexed = False
        # the highest src_offset the table holds per (src_topic, src_partition), as of table version ``_seen``;
        # read again when the table moved past it by a commit not this store's (another sink, a maintenance)
        self._high: dict[Position, int] | None = None
        self._seen = -1
        self._appends = True  # False for a process that had to add the position columns: it merges every write

    async def _open(self, *, create: bool) -> Any:
        if self._table is not None:
            return self._table
        import lancedb  # ~3 s to import: only commands that touch the store pay for it

        try:
            db = await lancedb.connect_async(
                self.uri,
                read_consistency_interval=timedelta(0),
                session=lancedb_session(self.cache_mb),
                storage_options=self.storage_options,
            )
            table, created = await open_or_create_table(db, self.name, HISTORY_SCHEMA if create else None)
            if table is not None and not created:
                for name, expression in ADDED_COLUMNS.items():
                    if await self._add_column(table, name, expression) and name in POSITION_COLUMNS:
                        self._appends = False  # its rows' positions are unknown: one of them may come again
            self._table = table
        except Exception as exc:  # lancedb raises plain OSError/RuntimeError/ValueError
            raise StoreError(f"cannot open LanceDB table {self.name!r} at {self.uri}: {exc}") from exc
        return self._table

    async def _add_column(self, table: Any, name: str, expression: str) -> bool:
        """Add ``name`` to a table made without it; True when this call added it."""
        if name in (await table.schema()).names:
            return False
        log.warning("history table %r has no %s column (older memstream): adding it", self.name, name)
        try:
            await table.add_columns({name: expression})
        except Exception:
            if name not in (await table.schema()).names:  # not another process' doing: a failure
                raise
            return False
        return True

    async def record(self, rows: Sequence[MemoryRow]) -> int:
        """Keep each version (a row per (memory, event)); versions already kept are left as they are. Returns how
        many versions were new."""
        unique = {(r.key, r.event_id): r for r in rows}  # one source row per merge key, or the merge refuses
        if not unique:
            return 0
        table = await self._open(create=True)
        high = await self._high_positions(table)
        fresh, seen = split_fresh(list(unique.values()), high if self._appends else None)
        kept, commits = 0, []
        try:
            if fresh:
                commits.append(getattr(await table.add(_to_arrow(fresh)), "version", None))
                kept += len(fresh)
            if seen:
                result = await table.merge_insert(MERGE_ON).when_not_matched_insert_all().execute(_to_arrow(seen))
                commits.append(getattr(result, "version", None))
                kept += int(getattr(result, "num_inserted_rows", len(seen)))
        except Exception as exc:
            self._high = None  # read again at the next write: part of the batch may be in the table
            raise StoreError(f"LanceDB history write of {len(unique)} versions failed: {exc}") from exc
        if commits and commits[-1] == self._seen + len(commits):  # nobody else committed in between
            self._high, self._seen = raise_positions(high, unique.values()), commits[-1]
        else:
            self._high = None
        self._commits += 1
        return kept

    async def _high_positions(self, table: Any) -> dict[Position, int]:
        """The highest positions the table holds, read again whenever it holds commits this store did not make."""
        try:
            version = int(await table.version())
            if self._high is not None and version == self._seen:
                return self._high
            held = await table.query().select(POSITION_COLUMNS).to_arrow()  # at ``version`` or later: higher
        except Exception as exc:
            raise StoreError(f"LanceDB history positions could not be read: {exc}") from exc
        self._high, self._seen = highest_positions(held), version
        return self._high

    async def read(self, key: str) -> list[HistoryRow]:
        """Every kept version of the memory ``<tenant>/<memory id>``, oldest first (by version, then event id)."""
        table = await self._open(create=False)
        if table is None:
            return []
        where = f"{KEY_COLUMN} = '{_checked_key(key)}'"  # ids only: the alphabet keeps the expression safe
        try:
            found = await table.query().where(where).select(READ_COLUMNS).to_arrow()
        except Exception as exc:
            raise StoreError(f"LanceDB history read failed: {exc}") from exc
        rows = [
            HistoryRow(d["version"], d["event_id"], d["text"], d["deleted"], d["ts"], d.get("actor"))
            for d in found.to_pylist()
        ]
        return sorted(rows, key=lambda r: (r.version, r.event_id))

    async def maintain(self) -> bool:
        """Between the sink's batches: the key's B-tree once, compaction every ``COMPACT_EVERY`` commits (each
        batch leaves a small fragment). True when it did something."""
        if self._table is None or (self._indexed and self._commits < COMPACT_EVERY):
            return False
        from lancedb.index import BTree

        try:
            if not self._indexed:
                await self._table.create_index(KEY_COLUMN, config=BTree(), replace=True)
                self._indexed = True
            else:
                await self._table.optimize(cleanup_older_than=timedelta(minutes=2))
                self._commits = 0
        except Exception as exc:
            raise StoreError(f"LanceDB history maintenance failed: {exc}") from exc
        return True


def highest_positions(held: pa.Table) -> dict[Position, int]:
    """The highest ``src_offset`` per (``src_topic``, ``src_partition``) of the rows that have one."""
    known = held.filter(pc.is_valid(held.column("src_offset")))
    if known.num_rows == 0:
        return {}
    top = known.group_by(["src_topic", "src_partition"]).aggregate([("src_offset", "max")])
    return {
        (t, p): o
        for t, p, o in zip(
            top.column("src_topic").to_pylist(),
            top.column("src_partition").to_pylist(),
            top.column("src_offset_max").to_pylist(),
            strict=True,
        )
    }


def split_fresh(
    rows: Sequence[MemoryRow], high: Mapping[Position, int] | None
) -> tuple[list[MemoryRow], list[MemoryRow]]:
    """(appended, merged): a version read past its partition's highest held position cannot be in the table; the
    others may be. ``high`` None: every version is merged."""
    if high is None:
        return [], list(rows)
    fresh: list[MemoryRow] = []
    seen: list[MemoryRow] = []
    for row in rows:
        (seen if _read_past(row, high) is None else fresh).append(row)
    return fresh, seen


def raise_positions(high: Mapping[Position, int], rows: Iterable[MemoryRow]) -> dict[Position, int]:
    """``high`` with the positions of ``rows`` (now in the table) taken in."""
    raised = dict(high)
    for row in rows:
        past = _read_past(row, raised)
        if past is not None:
            raised[past[0]] = past[1]
    return raised


def _read_past(row: MemoryRow, high: Mapping[Position, int]) -> tuple[Position, int] | None:
    """Where ``row`` was read ((topic, partition), offset) when that is past the highest position ``high`` holds for
    its partition; else None (a row without a position included)."""
    source = row.source
    if source is None or source.offset <= high.get((source.topic, source.partition), -1):
        return None
    return (source.topic, source.partition), source.offset


def _to_arrow(rows: Sequence[MemoryRow]) -> pa.Table:
    columns: dict[str, Any] = {
        KEY_COLUMN: [r.key for r in rows],
        "tenant_id": [r.scope.tenant_id for r in rows],
        "memory_id": [r.memory_id for r in rows],
        "user_id": [r.scope.user_id for r in rows],
        "version": [r.version for r in rows],
        "event_id": [r.event_id for r in rows],
        "text": [None if r.deleted else r.text for r in rows],
        "deleted": [r.deleted for r in rows],
        "ts": [r.updated_at for r in rows],
        "actor": [r.actor for r in rows],
        "src_topic": [r.source.topic if r.source else None for r in rows],
        "src_partition": [r.source.partition if r.source else None for r in rows],
        "src_offset": [r.source.offset if r.source else None for r in rows],
    }
    return pa.table(columns, schema=HISTORY_SCHEMA)


__all__ = ["HISTORY_SUFFIX", "LanceHistoryStore", "history_table_name"]
