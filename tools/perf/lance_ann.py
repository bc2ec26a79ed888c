"""Tenant-wide vector search with and without the vector (ANN) index (issue 24, item 2).

A shortcut figure: ROWS hash-embedded synthetic memories (1,000 users, one tenant) are appended straight into a
scratch LanceDB table (no broker, no sink process), brought up to date by the index sink's idle maintenance
(``maintain_if_due``) with the vector index's threshold above ROWS, then searched (k=10, QUERIES queries) over
the whole tenant and in one user's scope; then maintenance runs again with the threshold at ROWS, which builds
the index (its build time is printed), and the same queries run again. recall@10: hits as near as the exact
search's 10th (by distance: synthetic texts have many equidistant neighbours), and by id.

Usage: PYTHONPATH=. lance_ann.py [ROWS] [QUERIES] [NPROBES] [REFINE_FACTOR]
"""

import asyncio
import dataclasses
import random
import statistics
import sys
import tempfile
import time

import numpy as np

from infra.embedders import HashEmbedder
from infra.lance_store import AnnPolicy, LanceVectorStore, MaintenancePolicy
from processors.model import Hit, MemoryRow, ScopeQuery
from schemas.events import Scope
from streams.tools.bench_data import _text

USERS = 1_000
CHUNK = 10_000
IDLE = MaintenancePolicy(index_rows=0, compact_rows=0, compact_commits=0, idle_s=1.0, idle_duty=0.0)
embedder = HashEmbedder(384)


def rows(start: int, n: int) -> list[MemoryRow]:
    rng = random.Random(start)
    texts = [_text(rng, i) for i in range(start, start + n)]
    vectors = embedder.embed_sync(texts)
    return [
        MemoryRow(f"m{i:08d}", Scope("t", f"u{i % USERS}"), text, {}, 1, f"e{i}", "h", False, i, v.tobytes())
        for i, text, v in zip(range(start, start + n), texts, np.asarray(vectors, dtype="<f4"), strict=True)
    ]


async def timed(store: LanceVectorStore, vectors: list[np.ndarray], scope: ScopeQuery) -> tuple[list, list]:
    times, results = [], []
    for vector in vectors:
        started = time.perf_counter()
        results.append(await store.search(vector, scope, 10))
        times.append((time.perf_counter() - started) * 1e3)
    return times, results


def pct(times: list[float], q: float) -> float:
    return sorted(times)[min(len(times) - 1, int(q * len(times)))]


def recall(got: list[list[Hit]], truth: list[list[Hit]]) -> tuple[float, float]:
    by_distance, by_id = [], []
    for hits, want in zip(got, truth, strict=True):
        kth = 1.0 - want[-1].score
        by_distance.append(sum(1 for h in hits if 1.0 - h.score <= kth + 1e-5) / len(want))
        by_id.append(len({h.row.memory_id for h in hits} & {h.row.memory_id for h in want}) / len(want))
    return statistics.mean(by_distance), statistics.mean(by_id)


async def main(total: int, queries: int, nprobes: int, refine: int) -> None:
    rng = random.Random(99)
    vectors = [np.asarray(v, dtype="<f4") for v in embedder.embed_sync([_text(rng, 10**9 + i) for i in range(queries)])]
    tenant, user = ScopeQuery("t"), ScopeQuery("t", "u7")
    with tempfile.TemporaryDirectory(prefix="memstream-ann-") as d:
        ann = AnnPolicy(min_rows=total + 1, nprobes=nprobes, refine_factor=refine)
        store = await LanceVectorStore.open(
            d, "m", model=embedder.model, dim=384, background_maintenance=False, ann=ann
        )
        started = time.perf_counter()
        for start in range(0, total, CHUNK):
            await store.add_rows(rows(start, min(CHUNK, total - start)))
        store.behind = True
        loaded = time.perf_counter() - started
        run = await store.maintain_if_due(IDLE, idle_for_s=1.0)
        exact_t, exact_hits = await timed(store, vectors, tenant)
        user_exact_t, _ = await timed(store, vectors, user)

        store.ann = dataclasses.replace(ann, min_rows=total)  # the threshold passed: the next maintenance builds it
        store.behind = True
        built = await store.maintain_if_due(IDLE, idle_for_s=1.0)
        assert built is not None and built["ann_built_s"] is not None, built
        assert await store.use_ann(tenant) and not await store.use_ann(user)
        ann_t, ann_hits = await timed(store, vectors, tenant)
        user_t, _ = await timed(store, vectors, user)
        by_distance, by_id = recall(ann_hits, exact_hits)
        print(
            f"{total} rows (hash-384, {USERS} users; appended straight into LanceDB in {loaded:.1f}s: a shortcut),"
            f" first maintenance {run and run['seconds']}s\n"
            f"vector index (IVF_SQ, {int(total**0.5)} partitions) built in {built['ann_built_s']}s"
            f" (its compaction {built['seconds']}s)\n"
            f"tenant-wide k=10, {queries} queries: exact p50 {pct(exact_t, 0.5):.1f} ms p99 {pct(exact_t, 0.99):.1f} ms;"
            f" ANN (nprobes {nprobes}, refine_factor {refine}) p50 {pct(ann_t, 0.5):.1f} ms p99 {pct(ann_t, 0.99):.1f}"
            f" ms; recall@10 {by_distance:.3f} by distance, {by_id:.3f} by id\n"
            f"one user (exact both times): p50 {pct(user_exact_t, 0.5):.1f} -> {pct(user_t, 0.5):.1f} ms"
        )


args = [int(a) for a in sys.argv[1:]]
asyncio.run(main(*(args + [100_000, 100, 20, 10][len(args) :])))
