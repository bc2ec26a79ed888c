"""CPU priority (Linux nice) for background work, so that reads and the ingest path win the cores from it.

On Linux, nice is a property of each thread: ``setpriority(PRIO_PROCESS, tid, n)`` changes one thread, and a new
thread starts at its creator's value. A process already running threads (LanceDB's Rust pools, asyncio's
executor) is therefore lowered thread by thread (``/proc/self/task``); threads it starts later inherit.

Measured (issue 24, PERFORMANCE.md): right after a bulk load, the index sink's first idle maintenance (compaction,
scalar and full-text indexes, the vector index's training) ran on the same two cores as 32 connections' reads,
and set their p99 (search 276 ms, context 349 ms; 44 and 38 ms at steady state). A niced sink still gets every
cycle the reads leave idle, so it still catches up; nice only decides who waits when both want the CPU.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("memstream.priority")

MAX_NICE = 19  # the kernel's lowest priority


def thread_ids() -> list[int]:
    """The ids of this process' threads (Linux); just this thread's elsewhere."""
    try:
        return sorted(int(entry.name) for entry in Path("/proc/self/task").iterdir())
    except OSError:
        return [threading.get_native_id()]


def lower_thread(nice: int, tid: int | None = None) -> bool:
    """Run one thread (default: the calling one) at ``nice`` or lower; never raises a thread's priority (that
    needs privileges, and whoever niced the process chose it). Returns whether the thread now runs at ``nice`` or
    lower; False where it has gone or the platform has no per-thread priority."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return False
    target = threading.get_native_id() if tid is None else tid
    try:
        current = os.getpriority(os.PRIO_PROCESS, target)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, target, min(nice, MAX_NICE))
    except OSError:  # the thread exited meanwhile
        return False
    return True


def lower_process(nice: int) -> int:
    """Run every thread of this process at ``nice`` or lower (0: leave the process alone). Returns how many
    threads were lowered or already as low."""
    if nice <= 0:
        return 0
    lowered = sum(lower_thread(nice, tid) for tid in thread_ids())
    log.info("this process runs at nice %d (%d threads): background work, reads and ingest come first", nice, lowered)
    return lowered
