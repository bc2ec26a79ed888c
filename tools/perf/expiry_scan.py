"""What expiry costs LanceDB (issue 25, item 3): the sweep's scan and the read filter.

A shortcut figure: ROWS hash-embedded synthetic memories (1,000 users, one tenant; every EVERY-th with an
``expires_at``, a tenth of those already past) are appended straight into a scratch table and brought up to date
by the sink's idle maintenance. Then, QUERIES times each: ``any_expiring()`` (the sweep's one question at start),
``expired(now, 1000)`` (the sweep's scan, each second where expiries exist), and a one-user k=10 vector search
with the live filter as reads run it (``deleted = false AND (expires_at IS NULL OR expires_at > now)``) against
the same search filtered by ``deleted = false`` alone (before expiry). p50 and p99 in ms.

Usage: PYTHONPATH=. tools/perf/expiry_scan.py [ROWS] [QUERIES] [EVERY]
"""

import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from infra.embedders import HashEmbedder
from infra.lance_store import ROW_COLUMNS, LanceVectorStore, MaintenancePolicy
from processors.model import MemoryRow
from schemas.events import Scope
from streams.tools.bench_data import _text

USERS = 1_000
CHUNK = 10_000
IDLE = MaintenancePolicy(index_rows=0, compact_rows=0, compact_commits=0, idle_s=1.0, idle_duty=0.0)
embedder = HashEmbedder(384)
NOW = time.time_ns() // 1_000_000


def rows(start: int, n: int, every: int) -> list[MemoryRow]:
    rng = random.Random(start)
    texts = [_text(rng, i) for i in range(start, start + n)]
    vectors = embedder.embed_sync(texts)
    out = []
    for i, text, v in zip(range(start, start + n), texts, vectors, strict=True):
        expires = None
        if every and i % every == 0:
            expires = NOW - 1 if (i // every) % 10 == 0 else NOW + 3_600_000
        out.append(
            MemoryRow(
                f"m{i:08d}",
                Scope("t", f"u{i % USERS}"),
                text,
                {},
                1,
                f"e{i}",
                "h",
                False,
                i,
                v.tobytes(),
                created_at=i,
                expires_at=expires,
            )
        )
    return out


async def timed(what: str, queries: int, action: Callable[[], Awaitable[Any]]) -> None:
    took = []
    for _ in range(queries):
        started = time.perf_counter()
        await action()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    print(f"{what:<44} p50 {statistics.median(took):7.2f} ms   p99 {p99:7.2f} ms")


async def main(total: int, queries: int, every: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await LanceVectorStore.open(tmp, "m", model=embedder.model, dim=embedder.dim)
        for start in range(0, total, CHUNK):
            await store.add_rows(rows(start, min(CHUNK, total - start), every))
        await store.maintain_if_due(IDLE, idle_for_s=10.0)
        expiring = sum(1 for i in range(total) if every and i % every == 0)
        print(f"{total} rows, {expiring} with an expiry ({len(await store.expired(NOW, total))} past)")
        query = np.asarray(embedder.embed_sync(["what does the user like to eat?"])[0], dtype=np.float32)
        table = store._table

        async def search(where: str) -> None:
            q = table.vector_search(query).distance_type("cosine").where(where).bypass_vector_index()
            await q.limit(10).select([*ROW_COLUMNS, "_distance"]).to_arrow()

        scope = "tenant_id = 't' AND user_id = 'u7'"
        await timed("any_expiring()", queries, store.any_expiring)
        await timed("expired(now, 1000)", queries, lambda: store.expired(NOW, 1000))
        await timed("search k=10, one user, deleted = false", queries, lambda: search(f"deleted = false AND {scope}"))
        live = f"deleted = false AND (expires_at IS NULL OR expires_at > {NOW}) AND {scope}"
        await timed("search k=10, one user, live filter", queries, lambda: search(live))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(*(args + [50_000, 100, 10][len(args) :])))
