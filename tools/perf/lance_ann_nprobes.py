"""The vector index's recall@10 and latency by nprobes and refine_factor, for two kinds of query (issue 24).

As lance_ann.py (ROWS hash-embedded synthetic memories appended straight into a scratch table, the index built by
the sink's idle maintenance), then tenant-wide k=10 searches with several (nprobes, refine_factor): QUERIES
queries of four words drawn from `bench --scenario serve`'s words (what its tenant_recall asks) and QUERIES
sentences like the memories (what lance_ann.py asks). recall@10 by distance (as near as the exact 10th) and by id.

Usage: PYTHONPATH=. lance_ann_nprobes.py [ROWS] [QUERIES]
"""

import asyncio
import dataclasses
import importlib
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

from infra.lance_store import AnnPolicy, LanceVectorStore
from processors.model import ScopeQuery
from streams.tools.bench_data import _text
from streams.tools.bench_user import WORDS

# the same table, maintenance and measures as lance_ann.py beside this file
sys.path.insert(0, str(Path(__file__).parent))
ann_bench = importlib.import_module("lance_ann")
CHUNK, IDLE, embedder = ann_bench.CHUNK, ann_bench.IDLE, ann_bench.embedder
pct, recall, rows, timed = ann_bench.pct, ann_bench.recall, ann_bench.rows, ann_bench.timed


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
