"""Index shards (``MEMSTREAM_INDEX_SHARDS``): which shard holds a memory, and how the shards' answers merge.

A memory's shard follows from the partition of the embedded topic its events land in (``partition % shards``):
every event of one memory lands in one partition (the Kafka key is the memory id), so a memory lives in exactly
one shard, and the sink that owns a shard owns exactly the partitions that feed it. Readers route a key to its
shard and fan a scope out over every shard (a scope's memories are spread by memory id), then merge here.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from itertools import islice

from processors.model import Hit, MemoryRow
from schemas.errors import ConfigError


def shard_of_partition(partition: int, shards: int) -> int:
    """The shard a partition of the embedded topic feeds."""
    return partition % shards


def partitions_of_shard(shard: int, shards: int, partitions: Iterable[int]) -> list[int]:
    """The partitions (of those given) whose memories shard ``shard`` of ``shards`` holds, sorted."""
    return sorted(p for p in partitions if shard_of_partition(p, shards) == shard)


def check_shards(shards: int, partitions: int) -> None:
    """Every shard must be fed by at least one partition, or it would stay empty forever."""
    if shards < 1:
        raise ConfigError(f"MEMSTREAM_INDEX_SHARDS must be at least 1, not {shards}")
    if shards > partitions:
        raise ConfigError(
            f"MEMSTREAM_INDEX_SHARDS={shards} is more than the {partitions} partitions of the embedded topic "
            "(MEMSTREAM_PARTITIONS): a shard is fed by whole partitions, so some would stay empty"
        )


def _hit_rank(hit: Hit) -> tuple[float, str]:
    # best score first; among equal scores the key decides, so the merge is deterministic whatever the shard order
    return (-hit.score, hit.row.key)


def merge_top_k(per_shard: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The ``k`` best hits of the shards' answers, best first: each shard answered its own top k, and a memory
    lives in one shard only, so the global top k is among them."""
    if k <= 0:
        return []
    return heapq.nsmallest(k, (hit for hits in per_shard for hit in hits), key=_hit_rank)


def merge_pages(per_shard: Sequence[Sequence[MemoryRow]], limit: int | None) -> list[MemoryRow]:
    """A listing page across shards: each shard's rows in memory-id order, merged in that order, cut at ``limit``
    (each shard answered at most ``limit`` rows after the cursor, so the first ``limit`` of the merge are exact)."""
    merged = heapq.merge(*per_shard, key=lambda row: (row.memory_id, row.key))
    return list(merged if limit is None else islice(merged, limit))


def newest_rows(per_shard: Iterable[Iterable[MemoryRow]]) -> dict[str, MemoryRow]:
    """Rows by key across shards; a key held by two shards (misplaced: a repair's doing) keeps its newest row."""
    out: dict[str, MemoryRow] = {}
    for rows in per_shard:
        for row in rows:
            held = out.get(row.key)
            if held is None or row.order() > held.order():
                out[row.key] = row
    return out


__all__ = [
    "check_shards",
    "merge_pages",
    "merge_top_k",
    "newest_rows",
    "partitions_of_shard",
    "shard_of_partition",
]
