"""Tenant-wide (``all_users``) k=10 search over a large table at the store level, as the read path calls it.

A shortcut beside `memstream bench --scenario serve` (which reaches 1M only after ~20 minutes of ingest and the
sink's maintenance): ROWS hash-embedded memories (the bench's texts, 2,000 users, one tenant) written straight into
LanceDB, the bitmap on tenant_id and the IVF_SQ index the index sink trains at that size (sqrt(rows) partitions,
LanceVectorStore._build_ann_index), then the bench's 50 four-word queries through LanceVectorStore.search with the
default AnnPolicy. Reports wall p50/p99, CPU per query (all threads) and recall@10 against numpy's exact top 10
(by distance, as the bench's tenant_recall), for the search as shipped and for the whole live filter pre-applied
(the path before this change, for comparison).

    PYTHONPATH=. .venv/bin/python tools/perf/lance_tenant_1m.py /tmp/t1m 1000000
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import numpy as np

from infra.embedders import HashEmbedder
from infra.lance_store import AnnPolicy, LanceVectorStore, scope_where
from processors.model import MemoryRow, ScopeQuery
from schemas.events import Scope
from streams.tools.bench_data import _text
from streams.tools.bench_user import WORDS

CHUNK, USERS, DIM = 20_000, 2_000, 384
EMBEDDER = HashEmbedder(DIM)
T0 = time.perf_counter()


def log(*parts: object) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s]", *parts, flush=True)


async def load(store: LanceVectorStore, total: int, matrix: np.ndarray) -> None:
    for start in range(0, total, CHUNK):
        n = min(CHUNK, total - start)
        rng = random.Random(start)
        texts = [_text(rng, i) for i in range(start, start + n)]
        vectors = np.asarray(EMBEDDER.embed_sync(texts), dtype="<f4")
        matrix[start : start + n] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = [
            MemoryRow(f"m{i:08d}", Scope("default", f"user-{i % USERS:05d}"), t, {}, 1, f"e{i}", "h", False, i, v.tobytes())
            for i, t, v in zip(range(start, start + n), texts, vectors, strict=True)
        ]
        await store.add_rows(rows)


async def measure(label: str, search, vectors: list[np.ndarray], truth: list[float]) -> None:  # type: ignore[no-untyped-def]
    await search(vectors[0])  # the index's first load
    times, recall = [], []
    cpu = time.process_time()
    for vector, tenth in zip(vectors, truth, strict=True):
        started = time.perf_counter()
        scores = await search(vector)
        times.append((time.perf_counter() - started) * 1e3)
        recall.append(sum(1 for s in scores if s >= tenth - 1e-5) / 10)
    cpu_ms = (time.process_time() - cpu) * 1e3 / len(vectors)
    log(
        f"{label}: p50 {np.percentile(times, 50):.1f} ms, p99 {np.percentile(times, 99):.1f} ms, "
        f"CPU {cpu_ms:.1f} ms/query, recall@10 {np.mean(recall):.3f}"
    )


async def main(uri: str, total: int) -> None:
    matrix = np.zeros((total, DIM), dtype="<f4")
    store = await LanceVectorStore.open(uri, "memories", model=EMBEDDER.model, dim=DIM, background_maintenance=False)
    await load(store, total, matrix)
    log(f"{total:,} rows written")
    from lancedb.index import Bitmap

    await store._table.create_index("tenant_id", config=Bitmap(), replace=True)
    started = time.perf_counter()
    await store._build_ann_index(total)
    log(f"vector index built in {time.perf_counter() - started:.1f}s: {await store.vector_index()}")
    rng = random.Random(97)
    texts = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(50)]
    queries = [np.asarray(v, dtype="<f4") for v in EMBEDDER.embed_sync(texts)]
    truth = [float(np.sort(matrix @ (q / np.linalg.norm(q)))[-10]) for q in queries]
    del matrix
    tenant = ScopeQuery("default")
    policy = store.ann
    log(f"policy {policy}; use_ann: {await store.use_ann(tenant)}")

    async def shipped(vector: np.ndarray) -> list[float]:
        return [h.score for h in await store.search(vector, tenant, 10)]

    async def live_prefilter(vector: np.ndarray) -> list[float]:
        return [h.score for h in await store._search(vector, scope_where(tenant, live_only=True), 10, ann=True)]

    await measure("search as shipped (scope pre-filter, dead rows dropped after)", shipped, queries, truth)
    await measure("whole live filter pre-applied (before)", live_prefilter, queries, truth)
    await measure("search as shipped, again", shipped, queries, truth)
    assert isinstance(policy, AnnPolicy)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
