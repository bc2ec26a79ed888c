"""A hot copy of one user's vectors for scoped searches: exact top-k by one matmul instead of a LanceDB search.

Why: LanceDB answers a search filtered on one user in ~5 ms of CPU (~190/s from one thread on 2 cores), while
numpy's exact top-10 over the same user's few dozen vectors takes microseconds. A reader keeps, per
(tenant, user), the user's live memories (LanceDB's rows merged with the fresh tail: newest version per memory,
tombstones hide) and one float32 matrix of their normalized vectors; any vector query of that user, for any agent
or run within it, is then a matrix-vector product over the rows of the sub-scope. A copy built for one user holds
its rows; the copies a warm builds for every user from one scan hold columns only (keys, orders, expiries,
sub-scope codes) and a search reads the rows of its k hits by key (issue 24: a Python object per row was most of
a warm's CPU).

Scores are cosine similarity, as LanceDB's flat search (``1 - cosine distance``) and the fresh tail's
(processors/fresh_tail.py) give them, up to float32 rounding; ties are broken by memory key, as the merge does.

Pure: streams/runtime/reading.py feeds it from LanceDB and Redis and files it under the user's generation.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from processors.fresh_tail import merge_rows
from processors.keyword import KeywordIndex
from processors.model import Hit, MemoryRow

# float32 rounding of a dot product of unit vectors (384-d: ~1e-5 at worst): candidates this close to the k-th
# score are rescored exactly before the cut
ROUNDING_BAND = 1e-4
ROW_OVERHEAD_BYTES = 400  # rough cost of one held MemoryRow beside its text (objects, strings, the metadata dict)
KEY_OVERHEAD_BYTES = 160  # rough cost of one row of a columnar copy beside its vector (key, event id, order, codes)
TEXT_OVERHEAD_BYTES = 50  # rough cost of one held text beside its characters (the str object)
NEVER = np.iinfo(np.int64).max  # the expiry of a memory that never expires


class TextColumn(Protocol):
    """The texts of a warm's scan as the store returned them (an Arrow string array): sliced per user without a
    copy and turned into Python strings only for a user's first hybrid search (most users are never searched by
    keyword; a string per row was ~15% of a warm's CPU and its largest Python allocation)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice, /) -> TextColumn: ...

    def to_pylist(self) -> list[str | None]: ...


@dataclass(frozen=True, slots=True)
class ScopeColumns:
    """LanceDB's live memories of a scope as columns, in (user, key) order: what a warm builds every user's copy
    from without a Python object per row (issue 24: building a MemoryRow for each of 100k rows was most of a
    warm's 6-7 s of CPU; a search needs the rows of its k hits only, read by key then).

    ``vectors`` is the scan's vector array in the scan's order (sorting it would copy it whole once more):
    ``positions[i]`` is the vector of the i-th row in (user, key) order."""

    user_codes: npt.NDArray[np.int32]  # per row, its user's index in user_names (non-decreasing)
    user_names: Sequence[str]
    keys: npt.NDArray[np.object_]  # ``<tenant>/<memory id>``
    versions: npt.NDArray[np.int64]
    event_ids: npt.NDArray[np.object_]
    expires: npt.NDArray[np.int64]  # NEVER where the memory never expires
    agents: npt.NDArray[np.int32]  # code of each row's agent_id in agent_codes
    runs: npt.NDArray[np.int32]
    agent_codes: Mapping[str | None, int]
    run_codes: Mapping[str | None, int]
    vectors: npt.NDArray[np.float32]  # (rows, dim) in the scan's order: as stored, or of unit norm where ``unit``
    positions: npt.NDArray[np.intp]
    texts: TextColumn | None = None  # the rows' texts, in (user, key) order (a hybrid search's keyword ranking)
    text_bytes: npt.NDArray[np.int64] | None = None  # cumulative UTF-8 bytes of ``texts``: len(texts) + 1 entries
    unit: bool = False

    def normalized(self) -> ScopeColumns:
        """These columns with every vector of unit norm, normalized in place in one pass: done where the scan is
        converted (a thread), so that each user's copy is only a slice of them, not a norm computed
        on the event loop per user (issue 24: 15% of a serve process' samples right after a load, in the loop)."""
        if self.unit:
            return self
        return dataclasses.replace(self, vectors=_normalized(self.vectors, in_place=True), unit=True)

    def __len__(self) -> int:
        return len(self.keys)

    def user_spans(self) -> list[tuple[str, int, int, bool]]:
        """Per user: its name, its rows ``[start, end)`` and whether two of them share a key (LanceDB may hold a
        duplicate, lancedb#3377: such a user's copy needs the general merge, ``VectorMatrix.build``)."""
        n = len(self.keys)
        if not n:
            return []
        starts = np.concatenate(([0], np.flatnonzero(np.diff(self.user_codes)) + 1))
        ends = np.append(starts[1:], n)
        # keys are sorted within a user: rows r and r + 1 of one user sharing a key are a repeat of its span
        repeated = np.flatnonzero((self.keys[1:] == self.keys[:-1]) & (np.diff(self.user_codes) == 0))
        with_repeat = set((np.searchsorted(starts, repeated, side="right") - 1).tolist())
        return [
            (self.user_names[int(self.user_codes[s])], s, e, i in with_repeat)
            for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True))
        ]


@dataclass(frozen=True, slots=True)
class VectorMatrix:
    """One user's live memories in key order: their normalized vectors and, row for row, what a search needs to
    rank and scope them (key, order, expiry, sub-scope codes). The rows themselves (text, metadata) are ``rows``
    when the copy was built from them; a copy a warm built from columns holds none, and a search reads the rows
    of its hits by key (streams/runtime/reading.py), checking each is the version the copy ranked."""

    keys: npt.NDArray[np.object_]
    versions: npt.NDArray[np.int64]
    event_ids: npt.NDArray[np.object_]
    expires: npt.NDArray[np.int64]  # NEVER where none: a search leaves out what expired since the build
    matrix: npt.NDArray[np.float32]  # (len, dim), each row of unit norm (a zero vector stays zero)
    agents: npt.NDArray[np.int32]  # code of each row's agent_id in agent_codes
    runs: npt.NDArray[np.int32]
    agent_codes: Mapping[str | None, int]
    run_codes: Mapping[str | None, int]
    nbytes: int  # what holding it costs, roughly: the cache is bounded by this
    rows: tuple[MemoryRow, ...] | None = None  # vectors dropped; None: read by key for the hits
    texts: Sequence[str | None] | TextColumn | None = (
        None  # row for row (keyword ranking, processors/keyword.py); None: not held
    )
    # every live memory of the user is a row (none left out for want of a vector): what a context block, which
    # lists memories rather than ranking vectors, may be built from
    complete: bool = True

    @classmethod
    def build(cls, indexed: Iterable[MemoryRow], tail: Mapping[str, MemoryRow]) -> VectorMatrix:
        """From LanceDB's live rows of the user (with vectors) and the user's fresh tail by key (newest wins,
        tombstones hide), holding the rows. A live row without a vector cannot be scored and is left out, as the
        tail's search leaves it out."""
        merged = merge_rows(indexed, dict(tail))
        live = sorted((r for r in merged if r.vector), key=lambda r: r.key)
        dim = len(live[0].vector) // 4 if live else 0
        vectors = np.frombuffer(b"".join(r.vector for r in live), dtype="<f4").reshape(len(live), dim)
        agent_codes: dict[str | None, int] = {}
        run_codes: dict[str | None, int] = {}
        rows = tuple(_without_vector(r) for r in live)
        return cls(
            keys=np.array([r.key for r in rows], dtype=object),
            versions=np.fromiter((r.version for r in rows), np.int64, len(rows)),
            event_ids=np.array([r.event_id for r in rows], dtype=object),
            expires=np.fromiter((NEVER if r.expires_at is None else r.expires_at for r in rows), np.int64, len(rows)),
            matrix=_normalized(vectors),
            agents=np.fromiter((agent_codes.setdefault(r.scope.agent_id, len(agent_codes)) for r in rows), np.int32),
            runs=np.fromiter((run_codes.setdefault(r.scope.run_id, len(run_codes)) for r in rows), np.int32),
            agent_codes=agent_codes,
            run_codes=run_codes,
            nbytes=vectors.nbytes + sum(ROW_OVERHEAD_BYTES + len(r.text) for r in rows),
            rows=rows,
            texts=[r.text for r in rows],
            complete=len(live) == len(merged),
        )

    @classmethod
    def from_columns(cls, columns: ScopeColumns, start: int, end: int) -> VectorMatrix:
        """One user's copy from a warm's scan (rows ``[start, end)``, one user's, keys distinct), holding no rows:
        slices of the scan's columns and the user's normalized vectors, no Python object per row."""
        raw = columns.vectors[columns.positions[start:end]]  # a copy: normalized in place below
        texts = None if columns.texts is None else columns.texts[start:end]
        held = 0
        if texts is not None and columns.text_bytes is not None:  # what the strings will cost once built
            held = int(columns.text_bytes[end] - columns.text_bytes[start]) + (end - start) * TEXT_OVERHEAD_BYTES
        return cls(
            keys=columns.keys[start:end],
            versions=columns.versions[start:end],
            event_ids=columns.event_ids[start:end],
            expires=columns.expires[start:end],
            matrix=raw if columns.unit else _normalized(raw, in_place=True),
            agents=columns.agents[start:end],
            runs=columns.runs[start:end],
            agent_codes=columns.agent_codes,
            run_codes=columns.run_codes,
            nbytes=raw.nbytes + (end - start) * KEY_OVERHEAD_BYTES + held,
            texts=texts,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def order(self, i: int) -> tuple[int, str]:
        """The (version, event id) of row ``i``: a row read by key for a hit must be this one."""
        return int(self.versions[i]), str(self.event_ids[i])

    def top(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        agent_id: str | None = None,
        run_id: str | None = None,
        now_ms: int | None = None,
    ) -> list[tuple[int, float]]:
        """The best ``k`` rows of the sub-scope (agent and run; None: any) not expired at ``now_ms``, by cosine,
        ties by key: ``(row, score)``, best first. The top ``k`` is a prefix of the top ``k + n``, so a search that
        filters the rows (metadata) asks deeper until enough are kept.

        A float32 matrix-vector product picks the candidates; they are then scored again in float64, each row by
        the same elementwise product and sum: BLAS rounds a row's dot product differently by its position in the
        matrix, so two memories with the same vector could otherwise score apart and break the tie order."""
        candidates = self.live(agent_id, run_id, now_ms)
        if not len(candidates):
            return []
        q = np.asarray(query, dtype=np.float64).reshape(-1)
        q = q / (np.linalg.norm(q) or 1.0)
        if len(candidates) > k:
            rough = self.matrix[candidates] @ q.astype(np.float32)
            kth = np.partition(rough, len(rough) - k)[len(rough) - k]
            candidates = candidates[rough >= kth - ROUNDING_BAND]  # the k best and all within rounding of them
        scores = (self.matrix[candidates].astype(np.float64) * q).sum(axis=1)
        order = np.lexsort((candidates, -scores))[:k]  # rows are in key order: the index breaks ties by key
        return [(int(candidates[i]), float(scores[i])) for i in order.tolist()]

    def search(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        agent_id: str | None = None,
        run_id: str | None = None,
        keep: Callable[[MemoryRow], bool] | None = None,
    ) -> list[Hit]:
        """The best ``k`` held rows of the sub-scope that ``keep`` keeps (metadata filters, expiry): the exact
        top-k of the rows it keeps. Only for a copy that holds its rows (``build``)."""
        assert self.rows is not None, "a columnar copy's rows are read by key (streams/runtime/reading.py)"
        depth = k
        while True:
            ranked = self.top(query, depth, agent_id, run_id)
            hits = [Hit(self.rows[i], score) for i, score in ranked if keep is None or keep(self.rows[i])]
            if len(hits) >= k or len(ranked) < depth:
                return hits[:k]
            depth *= 4

    def live(self, agent_id: str | None, run_id: str | None, now_ms: int | None) -> npt.NDArray[np.intp]:
        """The rows of the sub-scope (agent and run; None: any) not expired at ``now_ms`` (None: any)."""
        candidates = self._in_scope(agent_id, run_id)
        if now_ms is not None and len(candidates):
            candidates = candidates[self.expires[candidates] > now_ms]
        return candidates

    def _in_scope(self, agent_id: str | None, run_id: str | None) -> npt.NDArray[np.intp]:
        mask = np.ones(len(self.keys), dtype=bool)
        for wanted, codes, column in ((agent_id, self.agent_codes, self.agents), (run_id, self.run_codes, self.runs)):
            if wanted is not None:
                code = codes.get(wanted)
                if code is None:
                    return np.empty(0, dtype=np.intp)
                mask &= column == code
        return np.flatnonzero(mask)


def _normalized(vectors: npt.NDArray[np.float32], *, in_place: bool = False) -> npt.NDArray[np.float32]:
    """Each row of unit norm (a zero row stays zero), float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    if in_place and vectors.dtype == np.float32 and vectors.flags.writeable:
        vectors /= norms
        return vectors
    normalized: npt.NDArray[np.float32] = (vectors / norms).astype(np.float32)
    return normalized


def _without_vector(row: MemoryRow) -> MemoryRow:
    """The row as a hit carries it (search results never carry vectors; the matrix holds them once)."""
    return MemoryRow(
        row.memory_id,
        row.scope,
        row.text,
        row.metadata,
        row.version,
        row.event_id,
        row.content_hash,
        row.deleted,
        row.updated_at,
        created_at=row.created_at,
        expires_at=row.expires_at,  # the search filters by it: the matrix outlives the moment it was built
    )


class HotVectors:
    """Per-user matrices of one reader process, least recently used first out, bounded by bytes (0: off).

    Each matrix is filed under the generation read before its data; ``get`` with another generation is a miss
    (and drops the stale matrix), so a matrix is never older than what a read after a write must see."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = 0
        self._items: OrderedDict[str, tuple[bytes, VectorMatrix]] = OrderedDict()
        self._keywords: dict[str, KeywordIndex] = {}  # beside the held matrix of the same scope, dropped with it

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def get(self, scope: str, generation: bytes) -> VectorMatrix | None:
        item = self._items.get(scope)
        if item is None:
            return None
        if item[0] != generation:
            self._drop(scope)
            return None
        self._items.move_to_end(scope)
        return item[1]

    def put(self, scope: str, generation: bytes, matrix: VectorMatrix) -> None:
        if matrix.nbytes > self.budget_bytes:
            return  # it would push out everything else: its user is searched in LanceDB
        self._drop(scope)
        self._items[scope] = (generation, matrix)
        self.held_bytes += matrix.nbytes
        self._evict()

    def keywords(self, scope: str, matrix: VectorMatrix) -> KeywordIndex | None:
        """The keyword index of ``matrix`` (the scope's matrix from ``get``), built on the scope's first hybrid
        search from the texts the matrix holds and kept beside it while it is held (most users are never searched
        by keyword: a warm does not pay for their tokens). None where the matrix holds no texts."""
        held = self._items.get(scope)
        index = self._keywords.get(scope)
        if index is not None and held is not None and held[1] is matrix:
            return index
        if matrix.texts is None:
            return None
        texts = matrix.texts
        index = KeywordIndex.build(texts if isinstance(texts, Sequence) else texts.to_pylist())
        if held is not None and held[1] is matrix:
            self._keywords[scope] = index
            self.held_bytes += index.nbytes
            self._evict()
        return index

    def clear(self) -> None:
        self._items.clear()
        self._keywords.clear()
        self.held_bytes = 0

    def _evict(self) -> None:
        while self.held_bytes > self.budget_bytes and self._items:
            self._drop(next(iter(self._items)))

    def _drop(self, scope: str) -> None:
        item = self._items.pop(scope, None)
        if item is not None:
            self.held_bytes -= item[1].nbytes
        index = self._keywords.pop(scope, None)
        if index is not None:
            self.held_bytes -= index.nbytes

    def __len__(self) -> int:
        return len(self._items)


class WarmTrigger:
    """When a reader builds users' copies one by one at a high rate (a cold start, a bulk load that moved every
    user's generation), one scan of the table builds them all: LanceDB answers one user's scan in ~4-5 ms of CPU,
    and a columnar scan of 100k rows in 0.3-0.8 s. Due when ``builds`` copies were built within ``window_s``, at
    most once per ``every_s``. Five, not more: each build before the warm is a search that waits on a LanceDB scan
    (~5 ms of CPU and more on a loaded box), and one connection right after a load asks ~200 searches/s, so twenty
    such searches in the first seconds were ~1-2% of them and set the p99 (issue 24: one connection's p99 right
    after the load was 17-18 ms at 10k memories, target 15); the warm they start costs one scan, whose columns now
    cost about what a hundred one-by-one builds do."""

    def __init__(
        self,
        builds: int = 5,
        window_s: float = 2.0,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.builds = builds
        self.window_s = window_s
        self.every_s = every_s
        self.clock = clock
        self._recent: deque[float] = deque()
        self._last_warm = -float("inf")

    def note_build(self) -> bool:
        """A copy was built from LanceDB; True when that calls for a warm (then counted as started)."""
        now = self.clock()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        if len(self._recent) < self.builds or now - self._last_warm < self.every_s:
            return False
        self._last_warm = now
        self._recent.clear()
        return True

    def put_off(self, seconds: float) -> None:
        """The warm that was due could not run (the index sink far behind): due again ``seconds`` from now."""
        self._last_warm = self.clock() - self.every_s + seconds
