"""Version-guarded merges of 2,000 rows (10% updates) into a growing table, with maintenance beside them.

Usage: lance_maintenance.py none|optimize|reindex|locked-optimize|reindex+locked-compact BASE WINDOWS EVERY
"""

import asyncio
import statistics
import sys
import tempfile
import time

import numpy as np
from lancedb.index import BTree

from infra.lance_store import LanceVectorStore
from processors.model import MemoryRow
from schemas.events import Scope

rng = np.random.default_rng(1)


def rows(start, n, upd_from=0):
    vec = rng.random((n, 384), dtype=np.float32)
    out = []
    for i in range(n):
        k = start + i
        mid = f"m{rng.integers(0, upd_from):08d}" if (upd_from and rng.random() < 0.1) else f"m{k:08d}"
        out.append(
            MemoryRow(
                mid, Scope("t", f"u{k % 1000}"), f"text {k}", {}, k + 10, f"e{k}", "h", False, k, vec[i].tobytes()
            )
        )
    return list({r.memory_id: r for r in out}.values())


MODE = sys.argv[1]
BASE = int(sys.argv[2])
WINDOWS = int(sys.argv[3])
EVERY = int(sys.argv[4])


async def main():
    d = tempfile.mkdtemp()
    st = await LanceVectorStore.open(d, "m", model="x", dim=384, optimize_every=0)
    for s0 in range(0, BASE, 50000):
        await st.add_rows(rows(s0, min(50000, BASE - s0)))
    if BASE:
        await st.build_indexes()
        st._indexed = True
    ts = []
    maint = []
    tasks = []

    async def do_maint():
        t = time.perf_counter()
        try:
            if MODE == "optimize":
                await st._table.optimize()
            elif MODE == "reindex":
                await st._table.create_index("memory_id", config=BTree(), replace=True)
            elif MODE == "locked-optimize":
                async with st._write_lock:
                    await st._table.optimize()
            elif MODE == "reindex+locked-compact":
                if len(maint) % 5 == 4:
                    async with st._write_lock:
                        await st._table.optimize()
                else:
                    await st._table.create_index("memory_id", config=BTree(), replace=True)
            ok = "ok"
        except Exception as e:
            ok = f"ERR {str(e)[:80]}"
        maint.append((round(time.perf_counter() - t, 2), ok))

    t0 = time.perf_counter()
    for w in range(WINDOWS):
        if MODE != "none" and w and w % EVERY == 0 and (not tasks or tasks[-1].done()):
            tasks.append(asyncio.create_task(do_maint()))
        r = rows(BASE + 10000 + w * 2000, 2000, upd_from=BASE)
        t = time.perf_counter()
        await st.upsert(r)
        ts.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    n = max(1, len(ts) // 5)
    k = len(ts) // 10
    print("merge ms by tenth:", [round(statistics.mean(ts[i * k : (i + 1) * k])) for i in range(10)])
    print(
        f"{MODE} every {EVERY}: {WINDOWS * 2000 / total:.0f} rows/s; merge ms first {statistics.mean(ts[:n]):.0f} last {statistics.mean(ts[-n:]):.0f} max {max(ts):.0f}; maint {maint[:6]}...{len(maint)}; {await st.shape()}"
    )


asyncio.run(main())
