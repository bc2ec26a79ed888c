"""Search after a bulk load, before and after the index sink's idle maintenance (issue 24).

A bulk load of ROWS rows in COMMITS commits (as the sink writes a backlog: no maintenance between them), then
search p50 (k=10 in one user's scope, 1,000 users) before and after ``maintain_if_due`` as an idle sink calls it.

Usage: PYTHONPATH=. lance_bulk_idle.py ROWS COMMITS
"""

import asyncio
import statistics
import sys
import tempfile
import time

import numpy as np

from infra.lance_store import LanceVectorStore, MaintenancePolicy
from processors.model import MemoryRow, ScopeQuery
from schemas.events import Scope

USERS = 1_000
rng = np.random.default_rng(1)


def rows(start: int, n: int) -> list[MemoryRow]:
    vec = rng.random((n, 384), dtype=np.float32)
    return [
        MemoryRow(
            f"m{k:08d}", Scope("t", f"u{k % USERS}"), f"text {k}", {}, 1, f"e{k}", "h", False, k, vec[i].tobytes()
        )
        for i, k in enumerate(range(start, start + n))
    ]


async def search_p50(store: LanceVectorStore, n: int = 50) -> float:
    times = []
    for i in range(n):
        query = rng.random(384, dtype=np.float32)
        started = time.perf_counter()
        await store.search(query, ScopeQuery(tenant_id="t", user_id=f"u{i % USERS}"), 10)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


async def main(total: int, commits: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = await LanceVectorStore.open(d, "m", model="x", dim=384, background_maintenance=False)
        per = total // commits
        for c in range(commits):
            await store.upsert(rows(c * per, per))
        backlog = await store.backlog()
        before = await search_p50(store)
        run = await store.maintain_if_due(MaintenancePolicy(), idle_for_s=1.0)
        after = await search_p50(store)
        print(
            f"{total} rows in {commits} commits: {backlog}\n"
            f"search p50 {before:.1f} ms -> {after:.1f} ms after idle maintenance {run}\n"
            f"now: {await store.backlog()}"
        )


asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
