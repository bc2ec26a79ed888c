"""The index sink's LanceDB memory and pauses as the table grows, and its idle maintenance after the load (issue 23).

A shortcut figure: ROWS hash-embedded synthetic memories upserted (version-guarded merges, as the sink writes)
in CHUNK-row batches into a scratch table opened as the sink opens it (MEMSTREAM_SINK_CACHE_MB session, glibc
tuned, free memory given back after each batch and each maintenance), with the sink's maintenance policy from
the settings (MEMSTREAM_SINK_* of the environment) between batches; then, as the sink does once the load stops,
one idle maintenance. Prints, per tenth of the load, the RSS, the peak so far (VmHWM) and what maintenance ran
and how long it took; then the idle maintenance's seconds and the peak after it. What ``memstream bench
--scenario publish-wait`` does not see: the bench stops the worker right after the sink caught up, before
the idle maintenance.

Usage: PYTHONPATH=. sink_memory.py [ROWS] [CHUNK]
"""

import asyncio
import os
import random
import sys
import tempfile
import time

import numpy as np

from infra.embedders import HashEmbedder
from infra.lance_store import AnnPolicy, LanceVectorStore, MaintenancePolicy
from infra.memory import release_free_memory, tune_malloc
from infra.settings import Settings
from processors.model import MemoryRow
from schemas.events import Scope
from streams.tools.bench_data import _text

USERS = 1_000
embedder = HashEmbedder(384)


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rows(start: int, n: int) -> list[MemoryRow]:
    rng = random.Random(start)
    texts = [_text(rng, i) for i in range(start, start + n)]
    vectors = np.asarray(embedder.embed_sync(texts), dtype="<f4")
    return [
        MemoryRow(f"m{i:08d}", Scope("t", f"u{i % USERS}"), text, {}, 1, f"e{i}", "h", False, i, v.tobytes())
        for i, text, v in zip(range(start, start + n), texts, vectors, strict=True)
    ]


async def main(total: int, chunk: int) -> None:
    s = Settings.from_env(os.environ)
    tune_malloc(s.malloc_mmap_threshold)
    policy = MaintenancePolicy(
        index_rows=s.sink_index_rows,
        compact_rows=s.sink_optimize_rows,
        compact_commits=s.optimize_every,
        idle_s=s.sink_idle_ms / 1000,
        keep_versions_s=s.sink_keep_versions_s,
        load_compact_fragments=s.sink_load_compact_fragments,
    )
    ann = AnnPolicy(min_rows=s.ann_min_rows, nprobes=s.ann_nprobes, refine_factor=s.ann_refine_factor)
    print(f"policy {policy}, cache {s.sink_cache_mb} MB", flush=True)
    with tempfile.TemporaryDirectory(prefix="memstream-sinkmem-") as d:
        store = await LanceVectorStore.open(
            d, "m", model=embedder.model, dim=384, background_maintenance=False, cache_mb=s.sink_cache_mb, ann=ann
        )
        started, paused, report_every = time.perf_counter(), 0.0, max(chunk, total // 10)
        for start in range(0, total, chunk):
            batch = rows(start, min(chunk, total - start))
            await store.upsert(batch)
            del batch
            run = await store.maintain_if_due(policy)
            release_free_memory()
            if run is not None:
                paused += run["seconds"]
                print(
                    f"  {start + chunk:>9,} rows: {run['kind']} {run['seconds']:.1f}s "
                    f"({run['fragments_before']} -> {run['fragments_after']} fragments), "
                    f"rss {status_mb('VmRSS'):.0f} MB, peak {status_mb('VmHWM'):.0f} MB",
                    flush=True,
                )
            if (start + chunk) % report_every == 0:
                print(
                    f"{start + chunk:>9,} rows in {time.perf_counter() - started:.0f}s: rss {status_mb('VmRSS'):.0f} "
                    f"MB, peak {status_mb('VmHWM'):.0f} MB, paused {paused:.1f}s",
                    flush=True,
                )
        load_peak = status_mb("VmHWM")
        # as the sink: idle maintenance waits out its pacing after the last compaction (idle_duty), then runs
        await asyncio.sleep(max(0.0, store._idle_not_before - time.monotonic()))
        idle_started = time.perf_counter()
        idle = await store.maintain_if_due(policy, idle_for_s=policy.idle_s)
        release_free_memory()
        print(
            f"load: {total:,} rows in {time.perf_counter() - started:.0f}s, maintenance paused {paused:.1f}s, "
            f"peak {load_peak:.0f} MB",
            flush=True,
        )
        print(
            f"idle maintenance ({time.perf_counter() - idle_started:.1f}s): {idle}, rss {status_mb('VmRSS'):.0f} MB, peak {status_mb('VmHWM'):.0f} MB"
        )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(args[0] if args else 300_000, args[1] if len(args) > 1 else 10_000))
