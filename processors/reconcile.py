"""Reconciliation: make LanceDB and Redis hold exactly what the log says, and say what was wrong.

The log is the embedded-events topic: every event that was processed, with its vector. The newest event of
each memory there (by ``(version, event_id)``) is what both stores must hold. A memory is its tenant and its id
(keys ``<tenant>/<memory id>``), and it belongs to the user of its first event in the log: later events naming
another user were refused by the worker (dead-lettered, processors.pipeline.split_by_owner), so the fold
leaves them out too and never "repairs" one back in. A reconciliation:

1. folds the log into one :class:`LogEntry` per memory in scope (no vectors kept: bounded memory);
2. reads both stores' states for the same scope and classifies every difference per store: ``missing``,
   ``stale`` (older), ``ahead`` (newer than the log), ``hash_mismatch`` (same event, other content),
   ``orphaned`` (a memory the log does not have);
3. reads the log once more from where step 1 stopped, so that writes which landed meanwhile are not
   mistaken for differences, and leaves alone "ahead" or orphaned rows younger than a grace period;
4. repairs: Redis from LanceDB where LanceDB already agrees with the log (the cache refilled from the
   durable store), otherwise both from the winning log records, fetched by offset; rows that must go back
   or away are removed only if they still hold what was seen (conditional deletes), then rewritten;
5. reads the repaired memories back and reports what it found, fixed and could not fix.

The log may be shorter than the stores: a memory-only broker restarted empty, retention, a new cluster.
LanceDB is the durable copy, so a memory LanceDB holds and the log does not know is not an orphan: LanceDB's
row is what both stores must hold (the serving store as a snapshot, the log after it), and Redis is refilled
from it (counted as ``lancedb_beyond_log``). Only Redis keys that neither the log nor LanceDB know are
orphans, and they are removed only when the log is complete (every partition still starts at offset 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from processors.model import InRecord, MemoryRow, ScopeQuery, StoreState, memory_key, split_key
from processors.pipeline import LANCEDB, REDIS, row_from
from processors.ports import CacheStore, VectorStore
from schemas.consistency import ReconcileReport, ReconcileRequest
from schemas.errors import SchemaError
from schemas.events import EmbeddedEvent, Op, Scope, SourceRef, decode_embedded

log = logging.getLogger("memstream.reconcile")

KINDS = ("missing", "stale", "ahead", "hash_mismatch", "orphaned")
READ_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class LogEntry:
    """The newest event of one memory in the log, without its vector."""

    version: int
    event_id: str
    content_hash: str
    deleted: bool
    scope: Scope
    ts: int
    partition: int
    offset: int

    def state(self) -> StoreState:
        return StoreState(self.version, self.event_id, self.content_hash, self.deleted)

    def order(self) -> tuple[int, str]:
        return (self.version, self.event_id)


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """What LanceDB holds for a memory the log does not know (the log is shorter than the durable store)."""

    held: StoreState

    def state(self) -> StoreState:
        return self.held

    def order(self) -> tuple[int, str]:
        return (self.held.version, self.held.event_id)


class LogSource(Protocol):
    """The log as the reconciler reads it (``infra.reconcile_log`` implements it on Kafka)."""

    def read(self, start: Mapping[int, int] | None) -> AsyncIterator[list[InRecord]]:
        """Records from ``start`` (partition -> offset; ``None``: the beginning) to the current end."""
        ...

    async def fetch(self, refs: Sequence[SourceRef]) -> list[InRecord]:
        """The records at these positions (those the log still holds)."""
        ...

    async def complete(self) -> bool:
        """Whether every partition still starts at offset 0 (nothing removed by retention)."""
        ...


class DuplicateRows(Protocol):
    """LanceDB can hold two rows for one memory after concurrent inserts of a new key (lancedb #3377)."""

    async def duplicates(self, scope: ScopeQuery | None = None) -> set[str]: ...

    async def delete_ids(self, memory_ids: Sequence[str]) -> None: ...


class ExactDeletes(Protocol):
    async def delete_exact(self, states: Mapping[str, StoreState]) -> int:
        """Remove each memory only if it still holds exactly that state; return how many went."""
        ...


@dataclass(slots=True)
class LogFold:
    """Folding the log: the newest entry per memory in scope, and how far each partition was read."""

    scope: ReconcileRequest
    entries: dict[str, LogEntry] = field(default_factory=dict)  # by memory key
    owners: dict[str, str] = field(default_factory=dict)  # memory key -> the user of its first event in the log
    # (kept here for memories not in ``entries`` only: those of other users than a request's)
    positions: dict[int, int] = field(default_factory=dict)
    records: int = 0
    unreadable: int = 0
    scope_mismatch: int = 0  # events naming another user than their memory's (refused by the worker too)
    snapshot: dict[str, SnapshotEntry] = field(default_factory=dict)  # LanceDB's rows the log does not know
    # one Scope (and one set of its id strings) per distinct scope, shared by its entries: a fold holds an entry per
    # memory of the log, ~640 bytes each with a Scope and four strings of its own per entry (a 1M-memory log: the
    # index sink's process grew by over a gigabyte while the reconciler's timer folded it)
    scopes: dict[tuple[str, str, str | None, str | None], Scope] = field(default_factory=dict, repr=False)

    def add(self, records: Iterable[InRecord]) -> None:
        for record in records:
            self.records += 1
            last = record.offset if record.last_offset is None else record.last_offset
            self.positions[record.partition] = max(self.positions.get(record.partition, 0), last + 1)
            entry = self._entry(record)
            if entry is None:
                continue
            memory_id, item = entry
            held = self.entries.get(memory_id)
            if held is None or item.order() > held.order():
                self.entries[memory_id] = item

    def _entry(self, record: InRecord) -> tuple[str, LogEntry] | None:
        # A light parse: the fold needs ids, order and hash, not the vector (decoding it is most of the cost).
        try:
            obj = orjson.loads(record.value)
            memory_id = obj["memory_id"]
            ids = (obj["tenant_id"], obj["user_id"], obj.get("agent_id"), obj.get("run_id"))
            scope = self.scopes.get(ids)
            if scope is None:
                scope = self.scopes[ids] = Scope(*ids)
            item = LogEntry(
                version=int(obj["version"]),
                event_id=str(obj["event_id"]),
                content_hash=str(obj["content_hash"]),
                deleted=obj["op"] == Op.DELETE.value,
                scope=scope,
                ts=int(obj["ts"]),
                partition=record.partition,
                offset=record.offset,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.unreadable += 1
            log.warning("unreadable log record %s skipped by the reconciler", record.source)
            return None
        if not in_tenant(self.scope, memory_id, scope):
            return None
        key = memory_key(scope.tenant_id, memory_id)
        # the owner is decided before the user filter: a reconcile of one user must not take another user's
        # memory for its own
        held = self.entries.get(key)  # a memory in the fold: its entry's user is its owner (no second dict entry)
        owner = held.scope.user_id if held is not None else self.owners.get(key, scope.user_id)
        if owner != scope.user_id:
            self.scope_mismatch += 1
            return None
        if self.scope.user_id is not None and scope.user_id != self.scope.user_id:
            self.owners.setdefault(key, scope.user_id)  # not kept in entries: its owner is remembered here
            return None
        return key, item


def in_tenant(request: ReconcileRequest, memory_id: str, scope: Scope) -> bool:
    """The request's tenant and ids, without its user (see LogFold._entry)."""
    if request.memory_ids is not None and memory_id not in request.memory_ids:
        return False
    return request.tenant_id is None or request.tenant_id == scope.tenant_id


def in_scope(request: ReconcileRequest, memory_id: str, scope: Scope) -> bool:
    return in_tenant(request, memory_id, scope) and (request.user_id is None or request.user_id == scope.user_id)


@dataclass(slots=True)
class StoreDiff:
    """The differences of one store against the log, by kind: memory id -> what the store holds (or None)."""

    store: str
    found: dict[str, dict[str, StoreState | None]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def total(self) -> int:
        return sum(len(v) for v in self.found.values())

    def ids(self, *kinds: str) -> set[str]:
        return {m for k in kinds for m in self.found[k]}


def diff_store(
    store: str, log_entries: Mapping[str, LogEntry | SnapshotEntry], held: Mapping[str, StoreState]
) -> StoreDiff:
    """Classify every difference between the log and one store's states (both for the same scope)."""
    diff = StoreDiff(store)
    for memory_id, entry in log_entries.items():
        state = held.get(memory_id)
        if state is None:
            diff.found["missing"][memory_id] = None
        elif (state.version, state.event_id) < entry.order():
            diff.found["stale"][memory_id] = state
        elif (state.version, state.event_id) > entry.order():
            diff.found["ahead"][memory_id] = state
        elif state != entry.state():
            diff.found["hash_mismatch"][memory_id] = state
    for memory_id in held.keys() - log_entries.keys():
        diff.found["orphaned"][memory_id] = held[memory_id]
    return diff


class Reconciler:
    """Compares the log with both stores and repairs every difference (see the module docstring)."""

    def __init__(
        self,
        source: LogSource,
        vectors: VectorStore,
        cache: CacheStore,
        lance_deletes: ExactDeletes,
        redis_deletes: ExactDeletes,
        *,
        grace_ms: int = 60_000,
        clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        duplicates: DuplicateRows | None = None,
    ) -> None:
        self.duplicates = duplicates
        self.source = source
        self.vectors = vectors
        self.cache = cache
        self.deletes = {LANCEDB: lance_deletes, REDIS: redis_deletes}
        self.grace_ms = grace_ms
        self.clock = clock

    async def run(self, request: ReconcileRequest) -> ReconcileReport:
        started = self.clock()
        fold = LogFold(request)
        async for records in self.source.read(None):
            fold.add(records)
        diffs = await self._diff(fold, request)
        if any(d.ids("ahead", "orphaned") for d in diffs.values()):
            # Events written while we compared look like rows ahead of the log: read what came since.
            async for records in self.source.read(dict(fold.positions)):
                fold.add(records)
            diffs = await self._diff(fold, request)
        counts = {
            "log_records": fold.records,
            "log_memories": len(fold.entries),
            "log_unreadable": fold.unreadable,
            "log_scope_mismatch": fold.scope_mismatch,
            "lancedb_beyond_log": len(fold.snapshot),
        }
        for store, diff in diffs.items():
            for kind, found in diff.found.items():
                counts[f"{store}_{kind}"] = len(found)
        duplicated = await self._duplicated(request, fold)
        counts["lancedb_duplicated"] = len(duplicated)
        notes: list[str] = []
        complete = await self.source.complete()
        held_back = await self._young(diffs)
        if not complete:
            orphans = {m for d in diffs.values() for m in d.found["orphaned"]}
            if orphans:
                notes.append("the log no longer starts at offset 0 (retention): orphans reported, not removed")
            held_back |= orphans
        wanted = ({m for d in diffs.values() for m in d.ids(*KINDS)} | duplicated) - held_back
        if request.repair and wanted:
            if duplicated and self.duplicates is not None:
                # every row of those memories goes; the log's winner is then written as for a missing row
                await self.duplicates.delete_ids(sorted(duplicated))
                for memory_id in duplicated:
                    diffs[LANCEDB].found["missing"][memory_id] = None
                    for kind in ("stale", "ahead", "hash_mismatch", "orphaned"):
                        diffs[LANCEDB].found[kind].pop(memory_id, None)
            await self._repair(fold, diffs, held_back)
        unrepaired = await self._still_wrong(fold, wanted) if request.repair else wanted
        counts["held_back"] = len(held_back)
        counts["repaired"] = len(wanted - unrepaired) if request.repair else 0
        counts["unrepaired"] = len(unrepaired)
        report = ReconcileReport(
            request_id=request.request_id,
            started_ts=started,
            finished_ts=self.clock(),
            scope=request.describe(),
            consistent=not unrepaired and not held_back,
            counts=counts,
            notes=tuple(notes),
        )
        log.info("reconciled %s: %s", report.scope, {k: v for k, v in counts.items() if v})
        return report

    async def _duplicated(self, request: ReconcileRequest, fold: LogFold) -> set[str]:
        if self.duplicates is None:
            return set()
        found = await self.duplicates.duplicates(ScopeQuery(tenant_id=request.tenant_id, user_id=request.user_id))
        if request.memory_ids is not None:
            found = {k for k in found if split_key(k)[1] in request.memory_ids}
        return found & fold.entries.keys()  # duplicates of memories the log lacks go as orphans

    async def _diff(self, fold: LogFold, request: ReconcileRequest) -> dict[str, StoreDiff]:
        lance, redis = await self._states(request)
        # LanceDB is durable and the log may be short: what LanceDB holds beyond the log is expected as it is
        fold.snapshot = {m: SnapshotEntry(state) for m, state in lance.items() if m not in fold.entries}
        expected: dict[str, LogEntry | SnapshotEntry] = {**fold.snapshot, **fold.entries}
        return {LANCEDB: diff_store(LANCEDB, expected, lance), REDIS: diff_store(REDIS, expected, redis)}

    async def _states(self, request: ReconcileRequest) -> tuple[dict[str, StoreState], dict[str, StoreState]]:
        scope = ScopeQuery(tenant_id=request.tenant_id, user_id=request.user_id)
        if request.memory_ids is not None and request.tenant_id is not None:
            keys = [memory_key(request.tenant_id, m) for m in request.memory_ids]
            lance = {r.key: r.state() for r in await _get_all(self.vectors, keys) if scope.matches(r.scope)}
            cached = await _cache_get_all(self.cache, keys)
            redis = {r.key: r.state() for r in cached if r is not None and scope.matches(r.scope)}
            return lance, redis
        lance, redis = await self.vectors.states(scope), await self.cache.states(scope)
        if request.memory_ids is not None:  # ids in every tenant: filter the scan
            ids = set(request.memory_ids)
            lance = {k: st for k, st in lance.items() if split_key(k)[1] in ids}
            redis = {k: st for k, st in redis.items() if split_key(k)[1] in ids}
        return lance, redis

    async def _young(self, diffs: Mapping[str, StoreDiff]) -> set[str]:
        """Rows ahead of the log, or unknown to it, written within the grace period: their event may still
        be on its way into the log (the worker writes the log copy and the stores at once)."""
        suspects = sorted({m for d in diffs.values() for m in d.ids("ahead", "orphaned")})
        if not suspects:
            return set()
        rows = [*await _get_all(self.vectors, suspects), *(r for r in await _cache_get_all(self.cache, suspects) if r)]
        cutoff = self.clock() - self.grace_ms
        return {r.key for r in rows if r.updated_at > cutoff}

    async def _repair(self, fold: LogFold, diffs: Mapping[str, StoreDiff], held_back: set[str]) -> None:
        lance, redis = diffs[LANCEDB], diffs[REDIS]
        # 1. rows that must go back or away: removed only if they still hold what was seen
        for store, diff in ((LANCEDB, lance), (REDIS, redis)):
            doomed = {
                m: s
                for kind in ("ahead", "hash_mismatch", "orphaned")
                for m, s in diff.found[kind].items()
                if s is not None and m not in held_back
            }
            if doomed:
                removed = await self.deletes[store].delete_exact(doomed)
                log.info("removed %d of %d %s rows that disagreed with the log", removed, len(doomed), store)
        # 2. LanceDB (and Redis for the same memories) rewritten from the winning log records
        lance_fix = lance.ids("missing", "stale", "ahead", "hash_mismatch") - held_back
        redis_fix = redis.ids("missing", "stale", "ahead", "hash_mismatch") - held_back
        from_log = lance_fix | (redis_fix & lance.ids(*KINDS))
        rows = await self._rows_from_log(fold, from_log)
        await self.vectors.upsert([r for r in rows if r.key in lance_fix])
        await self.cache.apply([r for r in rows if r.key in redis_fix])
        await self.cache.touch([r for r in rows if r.key in lance_fix])  # cached reads built on the old rows
        # 3. Redis refilled from LanceDB where LanceDB already agrees with the log: no log read needed
        from_lance = sorted(redis_fix - from_log)
        if from_lance:
            await self.cache.apply(await _get_all(self.vectors, from_lance))

    async def _rows_from_log(self, fold: LogFold, ids: set[str]) -> list[MemoryRow]:
        if not ids:
            return []
        refs = [SourceRef("", fold.entries[m].partition, fold.entries[m].offset) for m in sorted(ids)]
        rows: list[MemoryRow] = []
        for record in await self.source.fetch(refs):
            try:
                item: EmbeddedEvent = decode_embedded(record.value, record.headers)
            except SchemaError as exc:
                log.error("log record %s cannot be re-materialized: %s", record.source, exc)
                continue
            rows.append(row_from(item))
        return rows

    async def _still_wrong(self, fold: LogFold, wanted: set[str]) -> set[str]:
        """Read the memories back: any that still differ from the log (in either store) were not repaired."""
        if not wanted:
            return set()
        ids = sorted(wanted)
        if self.duplicates is not None:
            still = await self.duplicates.duplicates(None) & wanted
            if still:
                return still
        lance = {r.key: r.state() for r in await _get_all(self.vectors, ids)}
        redis = {r.key: r.state() for r in await _cache_get_all(self.cache, ids) if r is not None}
        wrong = set()
        for memory_id in ids:
            entry = fold.entries.get(memory_id) or fold.snapshot.get(memory_id)
            want = entry.state() if entry is not None else None
            if lance.get(memory_id) != want or redis.get(memory_id) != want:
                wrong.add(memory_id)
        return wrong


async def _get_all(vectors: VectorStore, ids: Sequence[str]) -> list[MemoryRow]:
    out: list[MemoryRow] = []
    for start in range(0, len(ids), READ_CHUNK):
        out += await vectors.get(ids[start : start + READ_CHUNK])
    return out


async def _cache_get_all(cache: CacheStore, ids: Sequence[str]) -> list[MemoryRow | None]:
    out: list[MemoryRow | None] = []
    for start in range(0, len(ids), READ_CHUNK):
        out += await cache.get(ids[start : start + READ_CHUNK])
    return out


__all__ = [
    "KINDS",
    "LogEntry",
    "LogFold",
    "LogSource",
    "Reconciler",
    "SnapshotEntry",
    "StoreDiff",
    "diff_store",
    "in_scope",
]
