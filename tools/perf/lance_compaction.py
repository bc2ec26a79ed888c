import asyncio
import statistics
import sys
import tempfile
import time

import numpy as np

from infra.lance_store import LanceVectorStore
from processors.model import MemoryRow
from schemas.events import Scope

EVERY = int(sys.argv[1])
WINDOWS = int(sys.argv[2])
LOCKED = sys.argv[3] == "locked"
rng = np.random.default_rng(1)


def rows(start, n):
    vec = rng.random((n, 384), dtype=np.float32)
    out = []
    for i in range(n):
        k = start + i
        mid = f"m{rng.integers(0, max(1, start)):08d}" if (start and rng.random() < 0.1) else f"m{k:08d}"
        out.append(
            MemoryRow(
                mid, Scope("t", f"u{k % 1000}"), f"text {k}", {}, k + 10, f"e{k}", "h", False, k, vec[i].tobytes()
            )
        )
    return list({r.memory_id: r for r in out}.values())


async def main():
    d = tempfile.mkdtemp()
    st = await LanceVectorStore.open(d, "m", model="x", dim=384, optimize_every=EVERY)
    if LOCKED:
        orig = st._maintain

        async def locked():
            async with st._write_lock:
                await orig()

        st._maintain = locked
    times = []
    t0 = time.perf_counter()
    for w in range(WINDOWS):
        r = rows(w * 2000, 2000)
        t = time.perf_counter()
        await st.upsert(r)
        times.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    await st.close()
    stats = await st._table.stats()
    n = len(times) // 10
    print(
        f"every={EVERY} locked={LOCKED}: {WINDOWS * 2000 / total:.0f} rows/s; merge ms first10% {statistics.mean(times[:n]):.0f} last10% {statistics.mean(times[-n:]):.0f} p99 {sorted(times)[int(len(times) * 0.99)]:.0f} max {max(times):.0f}; fragments {stats['fragment_stats']['num_fragments']}"
    )


asyncio.run(main())
