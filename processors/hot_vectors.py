"""A hot copy of one user's vectors for scoped searches: exact top-k by one matmul instead of a LanceDB search.

Why: LanceDB answers a search filtered on one user in ~5 ms of CPU (~190/s from one thread on 2 cores), while
numpy's exact top-10 over the same user's few dozen vectors takes microseconds. A reader keeps, per
(tenant, user), the user's live memories (LanceDB's rows merged with the fresh tail: newest version per memory,
tombstones hide) and one float32 matrix of their normalized vectors; any vector query of that user, for any agent
or run within it, is then a matrix-vector product over the rows of the sub-scope.

Scores are cosine similarity, as LanceDB's flat search (``1 - cosine distance``) and the fresh tail's
(processors/fresh_tail.py) give them, up to float32 rounding; ties are broken by memory key, as the merge does.

Pure: streams/runtime/reading.py feeds it from LanceDB and Redis and files it under the user's generation.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from processors.fresh_tail import merge_rows
from processors.model import Hit, MemoryRow

# float32 rounding of a dot product of unit vectors (384-d: ~1e-5 at worst): candidates this close to the k-th
# score are rescored exactly before the cut
ROUNDING_BAND = 1e-4
ROW_OVERHEAD_BYTES = 400  # rough cost of one MemoryRow beside its text (objects, strings, the metadata dict)


@dataclass(frozen=True, slots=True)
class VectorMatrix:
    """One user's live memories (by key order, vectors dropped) and their normalized vectors, row for row."""

    rows: tuple[MemoryRow, ...]
    matrix: npt.NDArray[np.float32]  # (len(rows), dim), each row of unit norm (a zero vector stays zero)
    agents: npt.NDArray[np.int32]  # code of each row's agent_id in agent_codes
    runs: npt.NDArray[np.int32]
    agent_codes: Mapping[str | None, int]
    run_codes: Mapping[str | None, int]
    nbytes: int  # what holding it costs, roughly: the cache is bounded by this

    @classmethod
    def build(cls, indexed: Iterable[MemoryRow], tail: Mapping[str, MemoryRow]) -> VectorMatrix:
        """From LanceDB's live rows of the user (with vectors) and the user's fresh tail by key (newest wins,
        tombstones hide). A live row without a vector cannot be scored and is left out, as the tail's search
        leaves it out."""
        live = sorted((r for r in merge_rows(indexed, dict(tail)) if r.vector), key=lambda r: r.key)
        dim = len(live[0].vector) // 4 if live else 0
        matrix = np.frombuffer(b"".join(r.vector for r in live), dtype="<f4").reshape(len(live), dim)
        return cls._of(tuple(_without_vector(r) for r in live), matrix)

    @classmethod
    def from_indexed(cls, rows: Sequence[MemoryRow], vectors: npt.NDArray[np.float32]) -> VectorMatrix:
        """From LanceDB's live rows of a user without vectors and their vectors as one array (row for row, every
        row with one), when the user has no fresh tail: what ``build(rows with vectors, {})`` gives, without a copy
        of any row (a warm builds thousands of users' copies at once). Keys must be distinct."""
        order = sorted(range(len(rows)), key=lambda i: rows[i].key)
        return cls._of(tuple(rows[i] for i in order), np.asarray(vectors, dtype="<f4")[order])

    @classmethod
    def _of(cls, rows: tuple[MemoryRow, ...], vectors: npt.NDArray[np.float32]) -> VectorMatrix:
        """Rows in key order, without vectors, and their vectors row for row: normalized, with the sub-scope
        codes."""
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        matrix = (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32)
        agent_codes: dict[str | None, int] = {}
        run_codes: dict[str | None, int] = {}
        agents = np.fromiter((agent_codes.setdefault(r.scope.agent_id, len(agent_codes)) for r in rows), np.int32)
        runs = np.fromiter((run_codes.setdefault(r.scope.run_id, len(run_codes)) for r in rows), np.int32)
        nbytes = matrix.nbytes + sum(ROW_OVERHEAD_BYTES + len(r.text) for r in rows)
        return cls(rows, matrix, agents, runs, agent_codes, run_codes, nbytes)

    def __len__(self) -> int:
        return len(self.rows)

    def search(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        agent_id: str | None = None,
        run_id: str | None = None,
        keep: Callable[[MemoryRow], bool] | None = None,
    ) -> list[Hit]:
        """The best ``k`` rows of the sub-scope (agent and run; None: any) by cosine, ties by key; ``keep``
        (metadata filters) chooses the rows first, so the result is the exact top-k of the rows it keeps.

        A float32 matrix-vector product picks the candidates; they are then scored again in float64, each row by
        the same elementwise product and sum: BLAS rounds a row's dot product differently by its position in the
        matrix, so two memories with the same vector could otherwise score apart and break the tie order."""
        candidates = self._in_scope(agent_id, run_id)
        if keep is not None and len(candidates):
            kept = np.fromiter((keep(self.rows[i]) for i in candidates.tolist()), dtype=bool, count=len(candidates))
            candidates = candidates[kept]
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
        return [Hit(self.rows[candidates[i]], float(scores[i])) for i in order.tolist()]

    def _in_scope(self, agent_id: str | None, run_id: str | None) -> npt.NDArray[np.intp]:
        mask = np.ones(len(self.rows), dtype=bool)
        for wanted, codes, column in ((agent_id, self.agent_codes, self.agents), (run_id, self.run_codes, self.runs)):
            if wanted is not None:
                code = codes.get(wanted)
                if code is None:
                    return np.empty(0, dtype=np.intp)
                mask &= column == code
        return np.flatnonzero(mask)


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
        while self.held_bytes > self.budget_bytes:
            self._drop(next(iter(self._items)))

    def clear(self) -> None:
        self._items.clear()
        self.held_bytes = 0

    def _drop(self, scope: str) -> None:
        item = self._items.pop(scope, None)
        if item is not None:
            self.held_bytes -= item[1].nbytes

    def __len__(self) -> int:
        return len(self._items)


class WarmTrigger:
    """When a reader builds users' copies one by one at a high rate (a cold start, a bulk load that moved every
    user's generation), one scan of the table builds them all: LanceDB answers one user's scan in ~4-5 ms of CPU,
    and a scan of 100k rows ordered by user in well under a second. Due when ``builds`` copies were built within
    ``window_s``, at most once per ``every_s``."""

    def __init__(
        self,
        builds: int = 20,
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
