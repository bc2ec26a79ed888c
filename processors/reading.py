"""Pure logic of the read path: metadata filters, rank fusion, the in-process LRU, prompt-ready context blocks.

Nothing here touches a store; ``streams/runtime/reading.py`` composes it with LanceDB and Redis.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from processors.model import Hit, MemoryRow
from processors.times import utc_day
from schemas.errors import SchemaError

K = TypeVar("K")
V = TypeVar("V")

OPERATORS = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "contains")
# Columns every row has; any other filter name is a key of the memory's metadata ("metadata.x" also works).
ROW_FIELDS = ("created_at", "updated_at", "version", "memory_id", "run_id", "agent_id")
# The bounds of a read's integers, stated once for the readers and the HTTP contract (streams/surface/contract.py)
MAX_K = 1_000
MIN_BUDGET, MAX_BUDGET = 16, 100_000


# --------------------------------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class Condition:
    """One filter condition: ``field <op> value`` (a missing metadata key matches only ``ne`` and ``nin``)."""

    field: str
    op: str
    value: Any

    def holds(self, row: MemoryRow) -> bool:
        present, have = _field_value(row, self.field)
        if self.op in ("ne", "nin"):
            return not present or (have != self.value if self.op == "ne" else have not in self.value)
        if not present:
            return False
        if self.op == "eq":
            return bool(have == self.value)
        if self.op == "in":
            return have in self.value
        if self.op == "contains":  # Mem0's: a substring of a string, or an element of a list
            if isinstance(have, str):
                return isinstance(self.value, str) and self.value in have
            return isinstance(have, list) and self.value in have
        try:
            if self.op == "gt":
                return bool(have > self.value)
            if self.op == "gte":
                return bool(have >= self.value)
            if self.op == "lt":
                return bool(have < self.value)
            return bool(have <= self.value)
        except TypeError:  # "3" > 2: a value of another type does not match a range
            return False


def parse_filters(raw: Mapping[str, Any] | None) -> tuple[Condition, ...]:
    """``{"topic": "food", "year": {"gte": 2020, "lt": 2025}, "tag": {"in": ["a", "b"]}}`` into conditions.

    A plain value means equality; a dict maps operators (eq, ne, in, nin, gt, gte, lt, lte, contains) to values.
    Names are metadata keys (``metadata.`` prefix optional) except the row columns ``created_at``, ``updated_at``
    (ms since the epoch), ``version``, ``memory_id``, ``run_id``, ``agent_id``. Raises :class:`SchemaError` naming
    the bad part.
    """
    out: list[Condition] = []
    for name, spec in sorted((raw or {}).items()):
        if not isinstance(name, str) or not name:
            raise SchemaError("filter names must be non-empty strings", field="filters")
        if isinstance(spec, dict):
            if not spec:
                raise SchemaError(f"filter {name!r} has no operator", field="filters")
            for op, value in sorted(spec.items()):
                if op not in OPERATORS:
                    raise SchemaError(
                        f"filter {name!r}: unknown operator {op!r} (use {', '.join(OPERATORS)})", field="filters"
                    )
                if op in ("in", "nin") and not isinstance(value, list):
                    raise SchemaError(f"filter {name!r}: {op!r} takes a list", field="filters")
                out.append(Condition(name, op, value))
        else:
            out.append(Condition(name, "eq", spec))
    return tuple(out)


def matches_all(row: MemoryRow, conditions: Sequence[Condition]) -> bool:
    return all(c.holds(row) for c in conditions)


def _field_value(row: MemoryRow, name: str) -> tuple[bool, Any]:
    if name in ROW_FIELDS:
        if name in ("run_id", "agent_id"):
            value = getattr(row.scope, name)
            return value is not None, value
        if name == "created_at" and row.created_at is None:  # kept since expiry; before, as memory_item shows it
            return True, row.updated_at
        return True, getattr(row, name)
    key = name.removeprefix("metadata.")
    if key in row.metadata:
        return True, row.metadata[key]
    return False, None


# --------------------------------------------------------------------------------------------- fusion

RRF_K = 60  # the constant of Cormack et al.: damps the weight of the very first ranks


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], k: int, rrf_k: int = RRF_K) -> list[Hit]:
    """Fuse ranked lists by ``sum(1 / (rrf_k + rank))``; the fused score replaces the per-list scores.

    Ties are broken by memory id so that the same inputs always give the same order (cache keys rely on it).
    """
    rows: dict[str, MemoryRow] = {}
    for ranking in rankings:
        for hit in ranking:
            rows.setdefault(hit.row.memory_id, hit.row)
    ordered = fuse_ranks([[hit.row.memory_id for hit in ranking] for ranking in rankings], k, rrf_k)
    return [Hit(rows[memory_id], score) for memory_id, score in ordered]


def fuse_ranks(rankings: Sequence[Sequence[str]], k: int, rrf_k: int = RRF_K) -> list[tuple[str, float]]:
    """:func:`reciprocal_rank_fusion` of rankings of memory ids alone: the best ``k`` ids with their fused scores
    (a caller reads rows only for the ids it returns)."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, memory_id in enumerate(ranking, start=1):
            scores[memory_id] = scores.get(memory_id, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]


# --------------------------------------------------------------------------------------------- L1


class TtlLru(Generic[K, V]):
    """A bounded LRU whose entries also expire after ``ttl_s`` (entries are validated by generation anyway)."""

    def __init__(self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if self.clock() >= expires:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = (self.clock() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------------------------- context

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English with BPE tokenizers; no tokenizer dependency
CONTEXT_HEADER = "## Memories"


def estimate_tokens(text: str) -> int:
    """ceil(characters / 4): a cheap, deterministic, tokenizer-free estimate (slightly high for English)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def importance(row: MemoryRow) -> float:
    """``metadata.importance`` (a number; ``pinned: true`` counts as 1.0); 0 when absent."""
    if row.metadata.get("pinned") is True:
        return 1.0
    value = row.metadata.get("importance")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def render_line(row: MemoryRow) -> str:
    day = utc_day(row.updated_at)
    text = " ".join(row.text.split())  # one line per memory, whatever the text holds
    return f"- [{day}] {text}"


@dataclass(frozen=True, slots=True)
class ContextBlock:
    """The rendered block and what went into it."""

    text: str
    memory_ids: tuple[str, ...]
    tokens: int
    total: int  # live memories in the scope
    expires_at: int | None = None  # the earliest expiry of the scope's live memories: the block is stale from then

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "memory_ids": list(self.memory_ids),
            "tokens": self.tokens,
            "total": self.total,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContextBlock:
        expires = d.get("expires_at")  # absent in blocks cached before expiry existed
        return cls(d["text"], tuple(d["memory_ids"]), int(d["tokens"]), int(d["total"]), expires)

    def stale(self, now_ms: int) -> bool:
        """Whether one of the memories it was built from has expired since (the block must be built again)."""
        return self.expires_at is not None and self.expires_at <= now_ms


def render_context(rows: Sequence[MemoryRow], budget_tokens: int) -> ContextBlock:
    """The most important, then most recent, live memories that fit ``budget_tokens``, in a stable format.

    Order of choice: importance (desc), ``updated_at`` (desc), memory id; memories are taken in that order while
    they fit (a long one that does not fit is skipped, shorter ones after it may still fit). The block lists the
    chosen memories newest first, one line each, under a header; the same rows always give the same bytes.
    """
    live = [r for r in rows if not r.deleted]
    ranked = sorted(live, key=lambda r: (-importance(r), -r.updated_at, r.memory_id))
    header = CONTEXT_HEADER
    used = estimate_tokens(header) + 1
    chosen: list[tuple[MemoryRow, str]] = []
    for row in ranked:
        line = render_line(row)
        cost = estimate_tokens(line) + 1  # the newline
        if used + cost > budget_tokens:
            continue
        chosen.append((row, line))
        used += cost
    chosen.sort(key=lambda item: (-item[0].updated_at, item[0].memory_id))
    lines = [header, *(line for _, line in chosen)] if chosen else []
    text = "\n".join(lines)
    expires = min((r.expires_at for r in live if r.expires_at is not None), default=None)
    return ContextBlock(text, tuple(r.memory_id for r, _ in chosen), estimate_tokens(text), len(live), expires)
