"""Store generations and the one pointer that says which generation serves.

A *generation* is one LanceDB table plus one Redis key namespace for memory and recency keys. Generation 0
is the table ``MEMSTREAM_LANCEDB_TABLE`` with memory keys under ``MEMSTREAM_REDIS_PREFIX`` (what every
deployment had before rebuilds existed); generation N > 0 is ``<table>__g<N>`` with keys under
``<prefix>g<N>:``. A rebuild or a model migration fills a new generation beside the serving one and then
switches the pointer; readers and the worker re-resolve it, so nobody ever reads a half-built store.

The pointer is a one-row LanceDB table ``<table>__active``: it lives with the durable data it points to
(a pointer in Redis would be lost with the cache, and readers would silently fall back to generation 0),
and a switch is one ``add(mode="overwrite")``, i.e. one Lance commit: atomic, readers see the old row or
the new one. No pointer table means generation 0. The embedding counters and the embedding cache are not
per generation (the cache is keyed by model already).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from infra.lance_store import lancedb_session, open_or_create_table
from infra.settings import is_object_store_uri
from infra.sharded_store import tables_of, unsharded_name
from schemas.errors import ConfigError, StoreError

log = logging.getLogger("memstream.generations")

POINTER_SUFFIX = "__active"
_GENERATION_RE = re.compile(r"^(?P<base>.+)__g(?P<number>[0-9]+)$")

POINTER_SCHEMA = pa.schema(
    [
        pa.field("number", pa.int64(), nullable=False),
        pa.field("table", pa.string(), nullable=False),
        pa.field("redis_prefix", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("dim", pa.int64(), nullable=False),
        pa.field("switched_at", pa.int64(), nullable=False),
        pa.field("previous", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True, slots=True)
class Generation:
    """Where one generation of the stores lives. ``model``/``dim`` are empty/0 for an implicit generation 0."""

    number: int
    table: str
    redis_prefix: str
    model: str = ""
    dim: int = 0
    switched_at: int = 0
    previous: int = -1

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "table": self.table,
            "redis_prefix": self.redis_prefix,
            "model": self.model,
            "dim": self.dim,
            "switched_at": self.switched_at,
            "previous": self.previous,
        }


def generation_names(base_table: str, base_prefix: str, number: int) -> tuple[str, str]:
    """(LanceDB table, Redis memory-key prefix) of generation ``number``."""
    if number < 0:
        raise ConfigError(f"a generation number is 0 or more, not {number}")
    if number == 0:
        return base_table, base_prefix
    return f"{base_table}__g{number}", f"{base_prefix}g{number}:"


def generation(base_table: str, base_prefix: str, number: int) -> Generation:
    table, prefix = generation_names(base_table, base_prefix, number)
    return Generation(number, table, prefix)


def pointer_table(base_table: str) -> str:
    return f"{base_table}{POINTER_SUFFIX}"


def pointer_absent_on_disk(uri: str, base_table: str) -> bool:
    """True when ``uri`` is a local directory that holds no pointer table: generation 0 serves, as
    :meth:`ActivePointer.active` would say, told without importing lancedb (1.1 s of CPU, most of what a small
    ``publish --wait`` costs). LanceDB keeps a local table in the directory ``<name>.lance``. False when the table
    is there, and for an object store (only LanceDB can tell)."""
    if is_object_store_uri(uri):
        return False
    local = Path(uri.removeprefix("file://"))
    return not (local / f"{pointer_table(base_table)}.lance").exists()


def generation_numbers(base_table: str, table_names: list[str]) -> list[int]:
    """Numbers of the generations whose tables exist (0 when the base table exists), sorted."""
    numbers = set()
    for name in (unsharded_name(n) for n in table_names):  # a sharded generation's tables count as its own
        if name == base_table:
            numbers.add(0)
            continue
        match = _GENERATION_RE.fullmatch(name)
        if match and match["base"] == base_table:
            numbers.add(int(match["number"]))
    return sorted(numbers)


class ActivePointer:
    """Reads and switches the pointer of one deployment (one LanceDB URI and base table name)."""

    def __init__(self, db: Any, uri: str, base_table: str, base_prefix: str) -> None:
        self._db = db
        self.uri = uri
        self.base_table = base_table
        self.base_prefix = base_prefix
        self._table: Any = None

    @classmethod
    async def connect(
        cls, uri: str, base_table: str, base_prefix: str, storage_options: Mapping[str, str] | None = None
    ) -> ActivePointer:
        import lancedb

        try:
            db = await lancedb.connect_async(
                uri,
                read_consistency_interval=timedelta(0),
                session=lancedb_session(),
                storage_options=dict(storage_options) if storage_options else None,
            )
        except Exception as exc:  # lancedb raises plain OSError/RuntimeError/ValueError
            raise StoreError(f"cannot open LanceDB at {uri}: {exc}") from exc
        return cls(db, uri, base_table, base_prefix)

    @property
    def name(self) -> str:
        return pointer_table(self.base_table)

    async def table_names(self) -> list[str]:
        try:
            names: list[str] = list(await self._db.table_names())
        except Exception as exc:
            raise StoreError(f"cannot list LanceDB tables at {self.uri}: {exc}") from exc
        return names

    async def active(self) -> Generation:
        """The serving generation: the pointer's row, or generation 0 when there is no pointer yet."""
        row = await self._read()
        if row is None:
            return generation(self.base_table, self.base_prefix, 0)
        return Generation(
            number=row["number"],
            table=row["table"],
            redis_prefix=row["redis_prefix"],
            model=row["model"],
            dim=row["dim"],
            switched_at=row["switched_at"],
            previous=row["previous"],
        )

    async def next_number(self) -> int:
        """One past every generation that exists or is named by the pointer (a failed build is never reused)."""
        existing = generation_numbers(self.base_table, await self.table_names())
        active = await self.active()
        return max([active.number, *existing]) + 1

    async def switch(self, to: Generation) -> Generation:
        """Point readers and the worker at ``to``: one Lance commit, so they see the old pointer or the new one."""
        if not to.model or to.dim <= 0:
            raise ConfigError(f"generation {to.number} must name its model and dimension before it serves")
        previous = await self.active()
        record = Generation(
            to.number, to.table, to.redis_prefix, to.model, to.dim, time.time_ns() // 1_000_000, previous.number
        )
        data = pa.Table.from_pylist([record.to_dict()], schema=POINTER_SCHEMA)
        try:
            table = await self._open(create=True)
            await table.add(data, mode="overwrite")
        except Exception as exc:
            raise StoreError(f"switching {self.name} to generation {to.number} failed: {exc}") from exc
        log.info(
            "active generation is now %d (%s, redis %s*), was %d", to.number, to.table, to.redis_prefix, previous.number
        )
        return record

    async def drop_generation_tables(self, table: str) -> bool:
        """Drop every table of the generation whose table is ``table`` (its shards too); refuses the serving one.
        True when any existed."""
        dropped = [await self.drop_table(name) for name in tables_of(table, await self.table_names())]
        return any(dropped)

    async def drop_table(self, name: str) -> bool:
        """Drop one table; refuses the serving one. True when it existed."""
        if unsharded_name(name) == (await self.active()).table:
            raise ConfigError(f"{name} is the serving table: switch to another generation before dropping it")
        if name not in await self.table_names():
            return False
        try:
            await self._db.drop_table(name)
        except Exception as exc:
            raise StoreError(f"dropping LanceDB table {name} failed: {exc}") from exc
        return True

    async def _open(self, *, create: bool) -> Any:
        if self._table is not None:
            return self._table
        self._table, _ = await open_or_create_table(self._db, self.name, POINTER_SCHEMA if create else None)
        return self._table

    async def _read(self) -> dict[str, Any] | None:
        try:
            table = await self._open(create=False)
            if table is None:
                return None
            rows: list[dict[str, Any]] = (await table.query().to_arrow()).to_pylist()
        except Exception as exc:
            raise StoreError(f"reading the active-generation pointer {self.name} failed: {exc}") from exc
        return rows[0] if rows else None
