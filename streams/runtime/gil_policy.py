"""How often CPython hands the GIL from a busy thread to another, in a reading process (``memstream serve``).

Why: a serve process does CPU work in threads beside its event loop (the warm's columnar build of every user's copy
in ``asyncio.to_thread``, LanceDB's Python-side conversions), and a thread that wants the GIL back waits for the
holder to reach a switch point, by default every 5 ms (``sys.getswitchinterval``). Right after a load, py-spy of
one connection's searches showed the warm's ``scope_columns`` in 16% of a serve process's samples for ~1.3 s, and
that second was the connection's p99 (17-25 ms against a p50 under 1 ms). A shorter interval lets the loop answer
between the thread's slices; it costs the thread a few more switches, and threads that block on I/O or native code
release the GIL anyway.
"""

from __future__ import annotations

import sys

SERVE_SWITCH_INTERVAL_S = 0.0005


def favour_the_event_loop(interval_s: float = SERVE_SWITCH_INTERVAL_S) -> float:
    """Shorten the GIL switch interval for this process; returns the previous one."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    return previous
