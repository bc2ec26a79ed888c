"""The stream keeps context blocks current: after each window, the blocks of the scopes it changed are rebuilt.

Only blocks someone has read (registered when a read stored them, and still in Redis) are rebuilt, so the worker
spends nothing on scopes no agent asks for. Rebuilds are debounced: scopes changed by many windows within
``debounce_s`` are rebuilt once. A read that comes before the rebuild sees the generation moved and rebuilds the
block itself, so nothing waits on this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from schemas.errors import MemStreamError
from schemas.events import ChangeEvent, Scope
from streams.runtime.reading import ReadService

log = logging.getLogger("memstream.context")

DEBOUNCE_S = 0.05


class ContextMaintainer:
    def __init__(self, reads: ReadService, debounce_s: float = DEBOUNCE_S) -> None:
        self.reads = reads
        self.debounce_s = debounce_s
        self.dirty: set[Scope] = set()
        self.rebuilt = 0
        self._wake = asyncio.Event()

    def note(self, changes: Sequence[ChangeEvent]) -> None:
        """Called with each window's applied changes (cheap: it only records the scopes)."""
        self.note_scopes([change.scope for change in changes])

    def note_scopes(self, scopes: Sequence[Scope]) -> None:
        """Also called by the index sink in this process once LanceDB holds a batch: taking rows out of the fresh
        tail moves their scopes' generations, so their blocks are rebuilt here rather than by the next read."""
        for s in scopes:
            self.dirty.add(Scope(s.tenant_id, s.user_id, s.agent_id, None))
        if scopes:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            if stopping.is_set():
                return
            await asyncio.sleep(self.debounce_s)
            scopes, self.dirty = self.dirty, set()
            try:
                self.rebuilt += await self.reads.refresh_contexts(scopes)
            except MemStreamError as exc:  # the next read rebuilds them: log and go on
                log.warning("context blocks of %d changed scopes not rebuilt: %s", len(scopes), exc)
            self.reads.counters.take()  # the stream's rebuilds are not agents' reads: keep them out of hit rates
