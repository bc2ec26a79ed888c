"""The vector index's recall@10 and latency by nprobes and refine_factor, for two kinds of query (issue 24).

As lance_ann.py (ROWS hash-embedded synthetic memories appended straight into a scratch table, the index built by
the sink's idle maintenance), then tenant-wide k=10 searches with several (nprobes, refine_factor): QUERIES
queries of four words drawn from `bench --scenario serve`'s words (what its tenant_recall asks) and QUERIES
sentences like the memories (what lance_ann.py asks). recall@10 by distance (as near as the exact 10th) and by id.

Usage: PYTHONPATH=. lance_ann_nprobes.py [ROWS] [QUERIES]
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
from streams.tools.bench_user import WORDS

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


async def main(total: int, queries: int) -> None:
    words, sentences = random.Random(97), random.Random(99)
    texts = [" ".join(words.choice(WORDS) for _ in range(4)) for _ in range(queries)]
    texts += [_text(sentences, 10**9 + i) for i in range(queries)]
    vectors = [np.asarray(v, dtype="<f4") for v in embedder.embed_sync(texts)]
    tenant = ScopeQuery("t")
    with tempfile.TemporaryDirectory(prefix="memstream-ann-") as d:
        ann = AnnPolicy(min_rows=total + 1)
        store = await LanceVectorStore.open(
            d, "m", model=embedder.model, dim=384, background_maintenance=False, ann=ann
        )
        for start in range(0, total, CHUNK):
            await store.add_rows(rows(start, min(CHUNK, total - start)))
        store.behind = True
        await store.maintain_if_due(IDLE, idle_for_s=1.0)
        _, exact_hits = await timed(store, vectors, tenant)
        store.ann = dataclasses.replace(ann, min_rows=total)  # the threshold passed: the next maintenance builds it
        store.behind = True
        built = await store.maintain_if_due(IDLE, idle_for_s=1.0)
        assert built is not None and built["ann_built_s"] is not None, built
        print(f"{total} rows, vector index ({int(total**0.5)} partitions) built in {built['ann_built_s']}s")
        for nprobes, refine in ((20, 10), (40, 10), (80, 10), (40, 30), (120, 30)):
            store.ann = dataclasses.replace(store.ann, nprobes=nprobes, refine_factor=refine)
            ann_t, ann_hits = await timed(store, vectors, tenant)
            w = recall(ann_hits[:queries], exact_hits[:queries])
            s = recall(ann_hits[queries:], exact_hits[queries:])
            print(
                f"nprobes {nprobes} refine {refine}: p50 {pct(ann_t, 0.5):.1f} p99 {pct(ann_t, 0.99):.1f} ms;"
                f" word queries recall@10 {w[0]:.3f} (by id {w[1]:.3f}); sentence queries {s[0]:.3f} (by id"
                f" {s[1]:.3f})",
                flush=True,
            )


args = [int(a) for a in sys.argv[1:]]
asyncio.run(main(*(args + [100_000, 50][len(args) :])))
