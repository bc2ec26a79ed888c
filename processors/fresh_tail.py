"""Searching what LanceDB does not hold yet: the fresh tail merged into LanceDB's results.

The ingest path writes each memory to Redis with its vector (the fresh tail) and leaves LanceDB to the index sink,
so a memory is searchable as soon as its window commits, as in Elasticsearch's real-time get before a refresh or
Milvus' growing segments searched by brute force until sealed. A read takes the scope's fresh tail first, then
LanceDB (the sink writes LanceDB before it clears the tail, so a memory is always in one or the other), and merges:

- per memory the newest version wins, whichever store holds it;
- a newer tombstone in the tail hides an older row LanceDB still returns;
- tail rows are scored exactly (cosine, as LanceDB's flat search scores its rows), so the merged top-k is the
  top-k of the union.

Pure functions: streams/runtime/reading.py feeds them from Redis and LanceDB.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from processors.model import Hit, MemoryRow, ScopeQuery

_WORDS = re.compile(r"\w+", re.UNICODE)


def newest_tail(tail: Iterable[MemoryRow], now_ms: int | None = None) -> dict[str, MemoryRow]:
    """The fresh tail by memory key (a key appears once; should it not, the newest wins). With ``now_ms``, a row
    expired by then reads as a tombstone: it hides, as a delete would, an older version LanceDB still returns."""
    out: dict[str, MemoryRow] = {}
    for row in tail:
        held = out.get(row.key)
        if held is None or row.order() > held.order():
            out[row.key] = row
    if now_ms is not None:
        for key, row in out.items():
            if not row.deleted and row.expired(now_ms):
                out[key] = dataclasses.replace(row, deleted=True, vector=b"")
    return out


def vector_hits(tail: Iterable[MemoryRow], query: npt.NDArray[np.float32], k: int) -> list[Hit]:
    """Exact cosine scores of the tail's live rows against ``query``: the best ``k``."""
    live = [r for r in tail if not r.deleted and r.vector]
    if not live:
        return []
    matrix = np.frombuffer(b"".join(r.vector for r in live), dtype="<f4").reshape(len(live), -1)
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(q) or 1.0)
    scores = matrix @ q / np.where(norms == 0, 1.0, norms)
    hits = [Hit(row, float(score)) for row, score in zip(live, scores.tolist(), strict=True)]
    return sorted(hits, key=_rank)[:k]


def text_hits(tail: Iterable[MemoryRow], query: str, k: int) -> list[Hit]:
    """The tail's live rows that share words with ``query``, ranked by the share of the query's words they hold
    (LanceDB's BM25 ranks them once indexed; until then this ranking joins the fusion as a list of its own)."""
    words = set(_WORDS.findall(query.lower()))
    if not words:
        return []
    hits = []
    for row in tail:
        if row.deleted:
            continue
        shared = len(words & set(_WORDS.findall(row.text.lower())))
        if shared:
            hits.append(Hit(row, shared / len(words)))
    return sorted(hits, key=_rank)[:k]


def without_superseded(indexed: Iterable[Hit], tail: dict[str, MemoryRow]) -> list[Hit]:
    """LanceDB's hits that the fresh tail does not hold a newer (or the same) version of."""
    out = []
    for hit in indexed:
        fresh = tail.get(hit.row.key)
        if fresh is None or hit.row.order() > fresh.order():
            out.append(hit)
    return out


def tail_over(indexed_orders: dict[str, tuple[int, str]], tail: Iterable[MemoryRow]) -> list[MemoryRow]:
    """Tail rows that are newer than what LanceDB returned for them (an older tail entry not yet cleared loses)."""
    return [r for r in tail if r.key not in indexed_orders or r.order() >= indexed_orders[r.key]]


def merge_hits(indexed: Sequence[Hit], tail: dict[str, MemoryRow], tail_hits: Sequence[Hit], k: int) -> list[Hit]:
    """LanceDB's hits and the tail's (scored alike), newest version per memory, best ``k``.

    ``indexed`` must come from a search at least ``k + len(tail)`` deep: the tail may hide that many of them."""
    kept = without_superseded(indexed, tail)
    indexed_orders = {h.row.key: h.row.order() for h in indexed}
    fresh_keys = {r.key for r in tail_over(indexed_orders, (h.row for h in tail_hits))}
    merged = kept + [h for h in tail_hits if h.row.key in fresh_keys]
    return sorted(merged, key=_rank)[:k]


def merge_rows(indexed: Iterable[MemoryRow], tail: dict[str, MemoryRow]) -> list[MemoryRow]:
    """A scope's live memories from LanceDB and the fresh tail: newest version per memory, tombstones hide."""
    newest: dict[str, MemoryRow] = {}
    for row in indexed:
        newest[row.key] = row
    for key, row in tail.items():
        held = newest.get(key)
        if held is None or row.order() >= held.order():
            newest[key] = row
    return [r for r in newest.values() if not r.deleted]


def page_of(
    indexed: Sequence[MemoryRow],
    tail: dict[str, MemoryRow],
    scope: ScopeQuery,
    after: str | None,
    limit: int,
    *,
    complete: bool,
    keep: Callable[[MemoryRow], bool] = lambda _: True,
) -> tuple[list[MemoryRow], str | None] | None:
    """One page of a scope's live memories in memory-id order after ``after``: LanceDB's and the fresh tail's,
    newest version per memory, tombstones hiding, and a memory whose newest version left the scope (another agent
    or run) left out. Returns the page and the cursor of the next one (None: the last page).

    ``indexed``: LanceDB's live rows of the scope after ``after`` in id order; ``complete`` says they are all of
    them, else they are the first ones only and nothing past the last can be placed. ``tail``: the fresh tail of
    the scope's whole user (a newer version may sit under another agent), by key. ``keep``: metadata filters.
    Returns None when the rows in hand cannot fill the page: the caller reads LanceDB deeper and asks again.
    """
    newest = {r.key: r for r in indexed}
    for key, row in tail.items():
        if after is not None and row.memory_id <= after:
            continue
        held = newest.get(key)
        if held is None or row.order() >= held.order():
            newest[key] = row
    horizon = None if complete or not indexed else indexed[-1].memory_id
    rows = sorted(
        (
            r
            for r in newest.values()
            if not r.deleted and scope.matches(r.scope) and (horizon is None or r.memory_id <= horizon) and keep(r)
        ),
        key=lambda r: r.memory_id,
    )
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].memory_id
    if horizon is not None:
        return None
    return rows, None


def _rank(hit: Hit) -> tuple[float, str]:
    return (-hit.score, hit.row.key)


__all__ = ["merge_hits", "merge_rows", "newest_tail", "page_of", "text_hits", "vector_hits", "without_superseded"]
