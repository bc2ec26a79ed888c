"""Where a window's time goes, stage by stage: the worker logs a summary of each stage's percentiles.

Latency from publish to searchable is the sum of a few stages (waiting in the log and in the window, decode
and embed, the store and broker writes, the offset commit). An end-to-end figure alone cannot say which one
to work on; these can. Pure bookkeeping: the engine and the ingest processor time themselves into it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending list (``fraction`` in 0..1)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[rank]


class StageTimings:
    """Milliseconds per stage since the last :meth:`take` (the latest ``keep`` of each), in the order stages
    were first seen. Bounded: a process nobody takes the timings of holds ``keep`` samples per stage at most."""

    def __init__(self, keep: int = 50_000) -> None:
        self.keep = keep
        self._samples: dict[str, deque[float]] = {}
        self._taken_at = time.monotonic()

    def add(self, stage: str, ms: float) -> None:
        samples = self._samples.get(stage)
        if samples is None:
            samples = self._samples[stage] = deque(maxlen=self.keep)
        samples.append(ms)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000)

    async def timed(self, stage: str, work: Awaitable[T]) -> T:
        """Await ``work`` and time it (for coroutines run side by side under ``asyncio.gather``)."""
        with self.time(stage):
            return await work

    def count(self, stage: str) -> int:
        return len(self._samples.get(stage, ()))

    def take_every(self, seconds: float) -> dict[str, dict[str, float]] | None:
        """:meth:`take`, once ``seconds`` have passed since the last take; else ``None`` (for periodic logs)."""
        if time.monotonic() - self._taken_at < seconds:
            return None
        return self.take()

    def take(self) -> dict[str, dict[str, float]]:
        """Per stage: count, p50, p99 and max in ms; and start over."""
        self._taken_at = time.monotonic()
        taken, self._samples = self._samples, {}
        summary = {}
        for stage, samples in taken.items():
            ordered = sorted(samples)
            summary[stage] = {
                "count": len(ordered),
                "p50_ms": round(percentile(ordered, 0.5), 1),
                "p99_ms": round(percentile(ordered, 0.99), 1),
                "max_ms": round(ordered[-1], 1),
            }
        return summary


def describe(summary: dict[str, dict[str, float]]) -> str:
    """``stage p50/p99/max ms`` for each stage, for a log line."""
    return ", ".join(f"{stage} {s['p50_ms']:.1f}/{s['p99_ms']:.1f}/{s['max_ms']:.1f}" for stage, s in summary.items())
