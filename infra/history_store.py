"""LanceDB: the durable history of every memory, one row per applied version (``history(id)`` reads it).

The log may be short (the embedded stack's broker keeps it in memory, a real one has retention), so the history
of a memory cannot be read back from it: the index sink, which sees every embedded event once per log position,
writes each version of its batch here as well (processors/indexing.py). The table is ``<table>__history`` beside
the generations, not inside one: a rebuild into a new generation replays what the log still holds, while this
table keeps what it no longer does.

Idempotent by construction: the merge key is (memory_key, event_id) and a matched row is left alone, so a batch
written twice (a crash before the offset commit), a replay of the embedded topic or a second sink adds nothing.
No vectors: history answers "what did this memory say, and when", not searches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa

from infra.lance_store import KEY_COLUMN, _checked_key, lancedb_session
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
    ]
)
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
            if self.name in await db.table_names():
                table = await db.open_table(self.name)
                if "actor" not in (await table.schema()).names:  # made before actors were kept: none were
                    log.warning("history table %r has no actor column (older memstream): adding it", self.name)
                    try:
                        await table.add_columns({"actor": "CAST(NULL AS STRING)"})
                    except Exception:
                        if "actor" not in (await table.schema()).names:  # not another process' doing: a failure
                            raise
                self._table = table
            elif create:
                self._table = await db.create_table(self.name, schema=HISTORY_SCHEMA, exist_ok=True)
        except Exception as exc:  # lancedb raises plain OSError/RuntimeError/ValueError
            raise StoreError(f"cannot open LanceDB table {self.name!r} at {self.uri}: {exc}") from exc
        return self._table

    async def record(self, rows: Sequence[MemoryRow]) -> int:
        """Keep each version (a row per (memory, event)); versions already kept are left as they are."""
        unique = {(r.key, r.event_id): r for r in rows}  # one source row per merge key, or the merge refuses
        if not unique:
            return 0
        table = await self._open(create=True)
        data = _to_arrow(list(unique.values()))
        try:
            result = await table.merge_insert(MERGE_ON).when_not_matched_insert_all().execute(data)
        except Exception as exc:
            raise StoreError(f"LanceDB history write of {len(unique)} versions failed: {exc}") from exc
        self._commits += 1
        return int(getattr(result, "num_inserted_rows", len(unique)))

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
    }
    return pa.table(columns, schema=HISTORY_SCHEMA)


__all__ = ["HISTORY_SUFFIX", "LanceHistoryStore", "history_table_name"]
