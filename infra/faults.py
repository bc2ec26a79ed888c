"""Fault injection: make a store adapter fail on purpose, for the fault tests and ``memstream chaos``.

Off unless ``MEMSTREAM_FAULT_FILE`` names a file. The file is JSON, read again whenever it changes, so a
running worker can be told to fail from outside:

    {"lancedb_write": {"until_ms": 1790000000000, "error": "injected: disk unavailable"}}

While ``until_ms`` lies in the future, every call of that operation raises a retriable ``StoreError``; except
``sink_commit``, which holds the index sink between its LanceDB commit and its offset commit (the window in
which a crash makes the sink write a batch twice). A missing file, or one that cannot be read, means no faults.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from schemas.errors import StoreError

log = logging.getLogger("memstream.faults")

OPERATIONS = ("lancedb_write", "redis_write", "sink_commit")


class FaultSwitch:
    """Checked by an adapter before an operation; costs one ``stat`` per call."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[float, int] | None = None
        self._faults: dict[str, Any] = {}

    def check(self, operation: str) -> None:
        fault = self._current().get(operation)
        if not isinstance(fault, dict):
            return
        until = fault.get("until_ms", 0)
        if isinstance(until, int) and until > time.time() * 1000:
            raise StoreError(str(fault.get("error") or f"injected fault: {operation}"))

    def active(self, operation: str) -> bool:
        """Whether a fault on ``operation`` is on now (for faults that hold instead of raising)."""
        fault = self._current().get(operation)
        until = fault.get("until_ms", 0) if isinstance(fault, dict) else 0
        return isinstance(until, int) and until > time.time() * 1000

    def _current(self) -> dict[str, Any]:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._faults = None, {}
            return self._faults
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._seen:
            self._seen = stamp
            try:
                loaded = orjson.loads(self.path.read_bytes())
                self._faults = loaded if isinstance(loaded, dict) else {}
            except (OSError, orjson.JSONDecodeError) as exc:
                log.warning("fault file %s unreadable, no faults: %s", self.path, exc)
                self._faults = {}
        return self._faults


def inject(path: str | Path, operation: str, seconds: float, error: str | None = None) -> None:
    """Make ``operation`` fail for the next ``seconds`` (0 clears it), keeping other faults in the file."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r} (known: {', '.join(OPERATIONS)})")
    target = Path(path)
    try:
        current = orjson.loads(target.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        current = {}
    current[operation] = {"until_ms": int(time.time() * 1000 + seconds * 1000), "error": error}
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(current))
    tmp.replace(target)  # atomic: a reader never sees half a file


__all__ = ["OPERATIONS", "FaultSwitch", "inject"]
