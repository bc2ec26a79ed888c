"""A fake model for the pure-logic tests of processors (the real embedders are tested in tests/unit/infra)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from processors.embedding import CachedEmbedder
from processors.model import Hit, InRecord, MemoryRow, ScopeQuery, StoreState, TailCleared, Topics, WriteOutcome
from processors.pipeline import (
    CHANGES_ALL,
    CompensationPolicy,
    IngestProcessor,
    Materializer,
    ReplayProcessor,
    RetryPolicy,
)
from processors.ports import OutRecord, Vectors
from schemas.errors import StoreError
from schemas.events import Headers, SourceRef

DIM = 8
TOPICS = Topics("t.")


def fake_vector(text: str, dim: int = DIM) -> npt.NDArray[np.float32]:
    """A unit vector derived from a hash of the text: deterministic, different for different texts."""
    digest = hashlib.blake2b(text.encode(), digest_size=dim).digest()
    row = np.frombuffer(digest, dtype=np.uint8).astype(np.float32) + 1.0
    return (row / np.linalg.norm(row)).astype(np.float32)


class FakeEmbedder:
    """Deterministic vectors from a hash of the text; records every model call."""

    def __init__(self, model: str = "fake", dim: int = DIM) -> None:
        self._model = model
        self._dim = dim
        self.calls: list[list[str]] = []

    @property
    def model(self) -> str:
        return self._model

    @property
    def dim(self) -> int:
        return self._dim

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = fake_vector(text, self._dim)
        return out


class FailingStore:
    """Raises the queued errors first, one per call."""

    def __init__(self) -> None:
        self.failures: list[Exception] = []
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)

    async def delete_exact(self, states: Mapping[str, StoreState]) -> int:
        """A stand-in for the reconciler's tests; the real stores' delete_exact is tested in
        tests/integration/test_stores.py."""
        rows: dict[str, MemoryRow] = self.rows  # type: ignore[attr-defined]
        doomed = [m for m, state in states.items() if m in rows and rows[m].state() == state]
        for memory_id in doomed:
            del rows[memory_id]
        return len(doomed)


def with_created_at(row: MemoryRow, held: MemoryRow | None) -> MemoryRow:
    """What both stores do with an update's row (created_at None): keep the live held row's time, else its own."""
    if row.created_at is not None:
        return row
    created = held.created_at if held is not None and not held.deleted else None
    return dataclasses.replace(row, created_at=row.updated_at if created is None else created)


class FakeVectorStore(FailingStore):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, MemoryRow] = {}
        self.extra_rows: dict[str, MemoryRow] = {}  # a second row for a memory, as lancedb #3377 can leave
        self.owners_down = False  # the owner lookup fails (LanceDB unreadable)

    async def duplicates(self, scope: ScopeQuery | None = None) -> set[str]:
        return {m for m, r in self.extra_rows.items() if m in self.rows and (scope is None or scope.matches(r.scope))}

    async def delete_ids(self, memory_ids: Sequence[str]) -> None:
        for memory_id in memory_ids:
            self.rows.pop(memory_id, None)
            self.extra_rows.pop(memory_id, None)

    async def upsert(self, rows: Sequence[MemoryRow]) -> None:
        """Like LanceDB's merge: newer by (version, event_id), and only within the held row's user; an update's row
        keeps the held memory's created_at."""
        self._maybe_fail()
        for row in rows:
            held = self.rows.get(row.key)
            if held is None or (row.order() > held.order() and held.scope.user_id == row.scope.user_id):
                self.rows[row.key] = with_created_at(row, held)

    async def get(self, keys: Sequence[str]) -> list[MemoryRow]:
        return [self.rows[k] for k in keys if k in self.rows]

    async def owners(self, keys: Sequence[str]) -> dict[str, str]:
        if self.owners_down:
            raise StoreError("lancedb read failed")
        return {k: self.rows[k].scope.user_id for k in keys if k in self.rows}

    async def search(self, vector: Vectors, scope: ScopeQuery, k: int) -> list[Hit]:
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        hits = [
            Hit(row, float(np.dot(np.frombuffer(row.vector, dtype="<f4"), query)))
            for row in self.rows.values()
            if not row.deleted and scope.matches(row.scope)
        ]
        return sorted(hits, key=lambda h: -h.score)[:k]

    async def states(self, scope: ScopeQuery | None = None) -> dict[str, StoreState]:
        return {m: r.state() for m, r in self.rows.items() if scope is None or scope.matches(r.scope)}


class FakeCacheStore(FailingStore):
    """Compare-and-set by ``(version, event_id)``, like the Redis Lua script."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, MemoryRow] = {}
        self.touched: list[str] = []
        self.pending: dict[str, MemoryRow] = {}  # the fresh tail: written by the ingest path, not indexed yet
        self.owners_down = False  # the owner lookup fails (Redis unreadable)

    async def apply(self, rows: Sequence[MemoryRow], *, pending: bool = False) -> list[WriteOutcome]:
        self._maybe_fail()
        outcomes = []
        for row in rows:
            held = self.rows.get(row.key)
            if held is not None and held.scope.user_id != row.scope.user_id:
                outcomes.append(WriteOutcome.SCOPE_MISMATCH)
            elif held is not None and held.order() > row.order():
                outcomes.append(WriteOutcome.STALE)
            elif held is not None and held.order() == row.order():
                outcomes.append(WriteOutcome.CURRENT)
            else:
                row = with_created_at(row, held)
                self.rows[row.key] = row
                if pending:
                    self.pending[row.key] = row
                else:
                    self.pending.pop(row.key, None)
                outcomes.append(WriteOutcome.APPLIED)
        return outcomes

    async def clear_pending(self, rows: Sequence[MemoryRow]) -> TailCleared:
        self._maybe_fail()
        cleared, ahead = 0, []
        for row in rows:
            held = self.pending.get(row.key)
            if held is not None and held.scope.user_id == row.scope.user_id and held.order() <= row.order():
                del self.pending[row.key]
                cleared += 1
            stored = self.rows.get(row.key)
            if stored is None or (stored.scope.user_id == row.scope.user_id and stored.order() < row.order()):
                ahead.append(row)
        return TailCleared(cleared, tuple(ahead))

    async def stale_pending(self, older_than_ms: int, limit: int) -> list[MemoryRow]:
        return list(self.pending.values())[:limit]

    async def get(self, keys: Sequence[str]) -> list[MemoryRow | None]:
        return [self.rows.get(k) for k in keys]

    async def owners(self, keys: Sequence[str]) -> dict[str, str]:
        if self.owners_down:
            raise StoreError("redis read failed")
        return {k: self.rows[k].scope.user_id for k in keys if k in self.rows}

    async def states(self, scope: ScopeQuery | None = None) -> dict[str, StoreState]:
        return {m: r.state() for m, r in self.rows.items() if scope is None or scope.matches(r.scope)}

    async def touch(self, rows: Sequence[MemoryRow]) -> None:
        self.touched.extend(r.key for r in rows)


class Sent(tuple[bytes | None, bytes]):
    """A sent record as the tests unpack it, ``(key, value)``, with its headers beside."""

    headers: Headers = ()

    @classmethod
    def of(cls, record: OutRecord) -> Sent:
        sent = cls((record[0], record[1]))
        sent.headers = record[2] if len(record) > 2 else ()  # type: ignore[misc]
        return sent


class FakePublisher:
    def __init__(self) -> None:
        self.sent: dict[str, list[Sent]] = {}
        self.failures: list[Exception] = []

    async def publish(self, topic: str, records: Sequence[OutRecord]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.setdefault(topic, []).extend(Sent.of(r) for r in records)

    async def publish_positioned(self, topic: str, records: Sequence[OutRecord]) -> list[SourceRef]:
        first = len(self.sent.get(topic, []))
        await self.publish(topic, records)
        return [SourceRef(topic, 0, first + i) for i in range(len(records))]

    def values(self, topic: str) -> list[bytes]:
        return [v for _, v in self.sent.get(topic, [])]

    def records(self, topic: str) -> list[InRecord]:
        """What was sent to ``topic`` as a consumer reads it back, headers included (offsets from 0)."""
        return [InRecord(topic, 0, i, s[0], s[1], headers=s.headers) for i, s in enumerate(self.sent.get(topic, []))]


class FakeCounters:
    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()

    async def add(self, counts: Mapping[str, int]) -> None:
        self.totals.update(counts)


class Rig:
    """One processor wired to fakes; ``sleeps`` records every retry delay."""

    def __init__(
        self,
        retry: RetryPolicy | None = None,
        compensation: CompensationPolicy | None = None,
        changes: str | None = None,
    ) -> None:
        self.embedder = FakeEmbedder()
        self.vectors = FakeVectorStore()
        self.cache = FakeCacheStore()
        self.publisher = FakePublisher()
        self.counters = FakeCounters()
        self.sleeps: list[float] = []
        self.materializer = Materializer(
            self.vectors,
            self.cache,
            self.publisher,
            TOPICS,
            model="fake",
            dim=DIM,
            retry=retry or RetryPolicy(first_delay_s=0.001, max_delay_s=0.004),
            compensation=compensation or CompensationPolicy(),
            sleep=self._sleep,
            rand=lambda: 0.5,
            changes=changes or CHANGES_ALL,
        )
        self.ingest = IngestProcessor(CachedEmbedder(self.embedder, None), self.materializer, self.counters)
        self.replay = ReplayProcessor(self.materializer, self.counters)
        self.log = FakeLog(self.publisher, TOPICS.embedded)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


class FakeLog:
    """The embedded topic as the reconciler reads it: whatever the publisher sent there, one partition."""

    def __init__(self, publisher: FakePublisher, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic
        self.truncated = False

    def records(self) -> list[InRecord]:
        return self.publisher.records(self.topic)

    async def read(self, start: Mapping[int, int] | None) -> AsyncIterator[list[InRecord]]:
        first = (start or {}).get(0, 0)
        records = self.records()[first:]
        for i in range(0, len(records), 7):  # small windows: the fold must not depend on window size
            yield records[i : i + 7]

    async def fetch(self, refs: Sequence[SourceRef]) -> list[InRecord]:
        records = self.records()
        return [records[r.offset] for r in refs if r.offset < len(records)]

    async def complete(self) -> bool:
        return not self.truncated
