"""The sharded index (``MEMSTREAM_INDEX_SHARDS=N``): N LanceDB tables per generation, one per index sink.

Shard ``i`` of a generation whose table is ``T`` is the table ``T__s<i>of<N>`` (N = 1: ``T`` itself, today's
layout, unchanged). The count is in every name, so the tables say which layout a generation was built with: a
process started with another ``MEMSTREAM_INDEX_SHARDS`` than the serving generation's is refused with the fix
(rebuild into a new generation with the new count), instead of opening, or creating, tables nobody writes.

A memory's shard is its embedded-topic partition modulo N (processors/sharding.py); the partition is what the
producers' default partitioner picks for the memory id (murmur2, infra.kafka.partitions_for_keys), so a reader
and a repair find a key's shard from the key alone. :class:`ShardedVectorStore` offers what
:class:`infra.lance_store.LanceVectorStore` offers (the :class:`processors.ports.VectorStore` port and the rest
its readers use): writes and key lookups go to the key's shard, scope reads to every shard, merged.
"""

from __future__ import annotations

import asyncio
import heapq
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from infra.faults import FaultSwitch
from infra.lance_store import Backlog, LanceVectorStore, scope_columns
from processors.hot_vectors import ScopeColumns
from processors.model import Hit, MemoryRow, ScopeQuery, StoreState, split_key
from processors.ports import Vectors
from processors.sharding import merge_pages, merge_top_k, newest_rows, shard_of_partition
from schemas.errors import ConfigError
from schemas.events import Scope

T = TypeVar("T")

_SHARD_RE = re.compile(r"^(?P<table>.+)__s(?P<shard>[0-9]+)of(?P<shards>[0-9]+)$")


def shard_table(table: str, shard: int, shards: int) -> str:
    """The LanceDB table of shard ``shard`` of ``shards`` of the generation whose table is ``table``."""
    return table if shards == 1 else f"{table}__s{shard}of{shards}"


def shard_tables(table: str, shards: int) -> list[str]:
    return [shard_table(table, i, shards) for i in range(shards)]


def unsharded_name(name: str) -> str:
    """The generation table a shard's table belongs to (a name without a shard suffix: itself)."""
    match = _SHARD_RE.fullmatch(name)
    return match["table"] if match else name


def layouts_present(table: str, names: Sequence[str]) -> set[int]:
    """The shard counts of the tables of generation ``table`` among ``names`` (1: the table itself exists)."""
    found = {1} if table in names else set()
    for name in names:
        match = _SHARD_RE.fullmatch(name)
        if match and match["table"] == table:
            found.add(int(match["shards"]))
    return found


def tables_of(table: str, names: Sequence[str]) -> list[str]:
    """Every table of generation ``table`` among ``names``, whatever its layout (what dropping it drops)."""
    return sorted(n for n in names if n == table or unsharded_name(n) == table)


def check_layout(table: str, names: Sequence[str], shards: int) -> None:
    """Refuse a shard count the generation's existing tables were not built with (ConfigError naming the fix)."""
    present = layouts_present(table, names)
    if present and shards not in present:
        have = ", ".join(str(n) for n in sorted(present))
        raise ConfigError(
            f"LanceDB generation {table!r} was built with {have} index shard(s), and this process runs with "
            f"MEMSTREAM_INDEX_SHARDS={shards}: changing the count is a rebuild into a new generation. Run "
            f"`MEMSTREAM_INDEX_SHARDS={shards} memstream rebuild` (then restart the workers and readers with that "
            f"count), or set MEMSTREAM_INDEX_SHARDS={have} to run with the tables as they are"
        )


def shards_of_keys(memory_ids: Sequence[str], shards: int, partitions: int) -> list[int]:
    """Each memory's shard: its partition (the default partitioner's pick for the memory id) modulo ``shards``."""
    from infra.kafka import murmur2_many

    hashes = murmur2_many([m.encode() for m in memory_ids])
    return [shard_of_partition((h & 0x7FFFFFFF) % partitions, shards) for h in hashes]


class ShardedVectorStore:
    """Several LanceDB tables read and written as one store: by key to the key's shard, by scope to all."""

    def __init__(self, shards: Sequence[LanceVectorStore], partitions: int) -> None:
        if len(shards) < 2:
            raise ConfigError("a sharded store has two shards or more (one shard is the plain LanceVectorStore)")
        self.shards = list(shards)
        self.partitions = partitions
        self.model = shards[0].model
        self.dim = shards[0].dim
        self._faults: FaultSwitch | None = None

    @property
    def count_shards(self) -> int:
        return len(self.shards)

    @property
    def faults(self) -> FaultSwitch | None:
        return self._faults

    @faults.setter
    def faults(self, switch: FaultSwitch | None) -> None:
        self._faults = switch
        for shard in self.shards:
            shard.faults = switch

    # ----------------------------------------------------------------------------------------- routing

    def shard_of(self, key: str) -> int:
        """The shard of the memory ``<tenant>/<memory id>``."""
        return self.shards_of([key])[0]

    def shards_of(self, keys: Sequence[str]) -> list[int]:
        return shards_of_keys([split_key(k)[1] for k in keys], len(self.shards), self.partitions)

    def _by_shard(self, items: Sequence[T], key: Callable[[T], str]) -> dict[int, list[T]]:
        out: dict[int, list[T]] = {}
        for item, shard in zip(items, self.shards_of([key(i) for i in items]), strict=True):
            out.setdefault(shard, []).append(item)
        return out

    async def _all(self, call: Callable[[LanceVectorStore], Awaitable[T]]) -> list[T]:
        """``call`` on every shard at once, answers in shard order."""
        return list(await asyncio.gather(*(call(shard) for shard in self.shards)))

    async def _routed(
        self, items: Sequence[T], key: Callable[[T], str], call: Callable[[LanceVectorStore, list[T]], Awaitable[Any]]
    ) -> list[Any]:
        groups = self._by_shard(items, key)
        return list(await asyncio.gather(*(call(self.shards[i], part) for i, part in groups.items())))

    # ----------------------------------------------------------------------------------------- writes (by key)

    async def upsert(self, rows: Sequence[MemoryRow]) -> None:
        await self._routed(rows, lambda r: r.key, lambda shard, part: shard.upsert(part))

    async def add_rows(self, rows: Sequence[MemoryRow]) -> None:
        await self._routed(rows, lambda r: r.key, lambda shard, part: shard.add_rows(part))

    async def delete_exact(self, states: Mapping[str, StoreState]) -> int:
        keys = list(states)
        counts = await self._routed(
            keys, lambda k: k, lambda shard, part: shard.delete_exact({k: states[k] for k in part})
        )
        return sum(counts)

    async def delete_ids(self, keys: Sequence[str]) -> None:
        await self._routed(keys, lambda k: k, lambda shard, part: shard.delete_ids(part))

    # ----------------------------------------------------------------------------------------- reads by key

    async def get(self, keys: Sequence[str]) -> list[MemoryRow]:
        found = newest_rows(await self._routed(keys, lambda k: k, lambda shard, part: shard.get(part)))
        return [found[k] for k in keys if k in found]

    async def get_with_vectors(self, keys: Sequence[str]) -> list[MemoryRow]:
        found = newest_rows(await self._routed(keys, lambda k: k, lambda shard, part: shard.get_with_vectors(part)))
        return [found[k] for k in keys if k in found]

    async def owners(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in await self._routed(keys, lambda k: k, lambda shard, part: shard.owners(part)):
            out.update(part)
        return out

    # ----------------------------------------------------------------------------------------- reads by scope

    async def search(self, vector: Vectors, scope: ScopeQuery, k: int) -> list[Hit]:
        return merge_top_k(await self._all(lambda shard: shard.search(vector, scope, k)), k)

    async def text_search(self, text: str, scope: ScopeQuery, k: int) -> list[Hit]:
        """BM25 per shard, merged by score: each shard scores with its own term statistics (an approximation of
        one table's ranking that improves as the shards grow alike)."""
        return merge_top_k(await self._all(lambda shard: shard.text_search(text, scope, k)), k)

    async def text_search_orders(self, text: str, scope: ScopeQuery, k: int) -> list[tuple[str, int, str, float]]:
        """:meth:`text_search`'s ranking without rows, merged as it merges (best score first, then the key)."""
        orders = [o for part in await self._all(lambda shard: shard.text_search_orders(text, scope, k)) for o in part]
        return heapq.nsmallest(k, orders, key=lambda order: (-order[3], order[0])) if k > 0 else []

    async def ensure_text_index(self) -> bool:
        return any(await self._all(lambda shard: shard.ensure_text_index()))

    async def use_ann(self, scope: ScopeQuery) -> bool:
        return any(await self._all(lambda shard: shard.use_ann(scope)))

    async def scope_rows(self, scope: ScopeQuery, limit: int | None = None) -> list[MemoryRow]:
        rows = [r for part in await self._all(lambda shard: shard.scope_rows(scope, limit)) for r in part]
        return rows if limit is None else rows[:limit]

    async def scope_vectors(self, scope: ScopeQuery, limit: int) -> list[MemoryRow]:
        rows = [r for part in await self._all(lambda shard: shard.scope_vectors(scope, limit)) for r in part]
        return rows[:limit]

    async def scope_users(self, scope: ScopeQuery) -> list[str]:
        return sorted({u for part in await self._all(lambda shard: shard.scope_users(scope)) for u in part})

    async def users_columns(self, scope: ScopeQuery, limit: int) -> ScopeColumns | None:
        """As one table's, over every shard's scan joined: None when the scope holds more than ``limit`` rows in all
        or a shard says None (a user's memories lie in every shard, so no user's copy may come from a part)."""
        scans = await self._all(lambda shard: shard.users_scan(scope, limit))
        held = [scan for scan in scans if scan is not None]
        if len(held) < len(scans) or sum(scan.num_rows for scan in held) > limit:
            return None
        return await asyncio.to_thread(scope_columns, held, self.dim)

    async def page_rows(self, scope: ScopeQuery, after: str | None, limit: int | None) -> list[MemoryRow]:
        return merge_pages(await self._all(lambda shard: shard.page_rows(scope, after, limit)), limit)

    async def recent_scopes(self, limit: int) -> list[Scope]:
        """Each shard's most recent scopes, taken in turn (a warm-up hint, not an exact ranking)."""
        parts = await self._all(lambda shard: shard.recent_scopes(limit))
        out: list[Scope] = []
        for rank in range(max((len(p) for p in parts), default=0)):
            for part in parts:
                if rank < len(part) and part[rank] not in out:
                    out.append(part[rank])
        return out[:limit]

    async def states(self, scope: ScopeQuery | None = None) -> dict[str, StoreState]:
        out: dict[str, StoreState] = {}
        for part in await self._all(lambda shard: shard.states(scope)):
            for key, state in part.items():
                held = out.get(key)
                if held is None or (state.version, state.event_id) > (held.version, held.event_id):
                    out[key] = state
        return out

    async def duplicates(self, scope: ScopeQuery | None = None) -> set[str]:
        """Keys held by more than one row within a shard (a row in the wrong shard is found by ``misplaced``)."""
        return {k for part in await self._all(lambda shard: shard.duplicates(scope)) for k in part}

    async def misplaced(self, scope: ScopeQuery | None = None) -> dict[int, list[str]]:
        """Per shard, the keys it holds that belong to another shard (none, unless the partition count changed
        under the tables: then rebuild)."""
        parts = await self._all(lambda shard: shard.states(scope))
        out: dict[int, list[str]] = {}
        for i, part in enumerate(parts):
            keys = list(part)
            wrong = [k for k, shard in zip(keys, self.shards_of(keys), strict=True) if shard != i]
            if wrong:
                out[i] = wrong
        return out

    async def expired(self, now_ms: int, limit: int) -> list[MemoryRow]:
        rows = [r for part in await self._all(lambda shard: shard.expired(now_ms, limit)) for r in part]
        return rows[:limit]

    async def any_expiring(self) -> bool:
        return any(await self._all(lambda shard: shard.any_expiring()))

    async def count(self, live_only: bool = True) -> int:
        return sum(await self._all(lambda shard: shard.count(live_only)))

    # ----------------------------------------------------------------------------------------- maintenance

    async def backlog(self) -> Backlog:
        parts = await self._all(lambda shard: shard.backlog())
        return Backlog(
            rows=sum(b.rows for b in parts),
            fragments=sum(b.fragments for b in parts),
            small_fragments=sum(b.small_fragments for b in parts),
            unindexed_rows=sum(b.unindexed_rows for b in parts),
            missing=tuple(sorted({m for b in parts for m in b.missing})),
            stale_vector_index=any(b.stale_vector_index for b in parts),
        )

    async def fragments(self) -> int:
        return sum(await self._all(lambda shard: shard.fragments()))

    async def shape(self) -> str:
        return "; ".join(f"shard {i}: {s}" for i, s in enumerate(await self._all(lambda shard: shard.shape())))

    async def build_indexes(self) -> None:
        await self._all(lambda shard: shard.build_indexes())

    async def optimize(self) -> None:
        await self._all(lambda shard: shard.optimize())

    async def close(self) -> None:
        await self._all(lambda shard: shard.close())


__all__ = [
    "ShardedVectorStore",
    "check_layout",
    "layouts_present",
    "shard_table",
    "shard_tables",
    "shards_of_keys",
    "tables_of",
    "unsharded_name",
]
