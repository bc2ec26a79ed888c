"""The processors' clock: wall time in milliseconds, as every event, change and dead letter records it."""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000
