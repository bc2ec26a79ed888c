"""Retry policies: backoff for retriable errors inside a window, and how a failing store write is handed over to
the compensation consumer instead of holding the partition."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from schemas.errors import MemStreamError

log = logging.getLogger("memstream.processors")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff for retriable store and broker errors while a window is being written."""

    first_delay_s: float = 0.1
    max_delay_s: float = 5.0
    max_attempts: int = 0  # 0: until it succeeds or the worker stops (the partition waits, nothing is lost)


async def with_retries(
    what: str, action: Callable[[], Awaitable[T]], policy: RetryPolicy, sleep: Callable[[float], Awaitable[None]]
) -> T:
    attempt = 0
    delay = policy.first_delay_s
    while True:
        attempt += 1
        try:
            return await action()
        except MemStreamError as exc:
            if not exc.retriable or (policy.max_attempts and attempt >= policy.max_attempts):
                raise
            log.warning("%s failed (attempt %d, retrying in %.1fs): %s", what, attempt, delay, exc)
        await sleep(delay)
        delay = min(delay * 2, policy.max_delay_s)


@dataclass(frozen=True, slots=True)
class CompensationPolicy:
    """How a store write that keeps failing is handed over instead of holding the partition.

    ``inline``: retries inside the window (rides out a blip without a compensation). After those, the write
    becomes a compensating event; the compensation processor retries it ``max_attempts`` times in all, with
    exponential backoff from ``first_delay_s`` up to ``max_delay_s`` and full jitter, then dead-letters it.
    """

    inline: RetryPolicy = RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, max_attempts=3)
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    max_attempts: int = 30
    chunk: int = 100  # memories per compensation record (each carries its vectors: keep records well under 1 MB)

    def delay_s(self, attempts: int, rand: float) -> float:
        """Backoff before the next try after ``attempts`` failures: half fixed, half random (jitter)."""
        ceiling = min(self.max_delay_s, self.first_delay_s * 2.0 ** max(0, attempts - 1))
        return ceiling * (0.5 + rand / 2)
