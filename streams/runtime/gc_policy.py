"""The cyclic garbage collector's policy for a long-running reading process (``memstream serve``).

Why: a reading process holds hundreds of thousands to millions of long-lived objects (L1 caches of hits and rows,
users' hot copies, keyword indexes), and each of CPython's full (generation 2) collections walks all of them with
the event loop stopped. Measured under 32 connections of uncached searches over 100k memories (tools/perf/
serve_ab.py with a gc.callbacks probe): 230-700 ms per full collection, several a minute, which was the searches'
p99 (300-700 ms against a p50 of 50).

What: every ``FREEZE_EVERY_S`` the young generations are collected and everything that survived is moved to the
permanent generation (``gc.freeze``), which collections never walk. Objects there are still freed by reference
counting when a cache drops them (the cached values hold no cycles), so memory does not grow; only cyclic garbage
that had already reached generation 2 at a freeze would stay (the full collections measured found 0-300 such
objects each). Full collections then walk what was created since the last freeze only.
"""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger("memstream.gc")

FREEZE_EVERY_S = 30.0


def freeze_survivors() -> int:
    """Collect the young generations, then freeze what is left; returns the objects frozen in all."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()


async def freeze_periodically(every_s: float = FREEZE_EVERY_S) -> None:
    """:func:`freeze_survivors` now and every ``every_s`` until cancelled."""
    while True:
        frozen = freeze_survivors()
        log.debug("gc: %d objects frozen", frozen)
        await asyncio.sleep(every_s)
