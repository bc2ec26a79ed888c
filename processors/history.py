"""A memory's history from its kept versions (infra/history_store.py): pure, so both modes answer alike.

Versions come oldest first by (version, event id): an event superseded out of order (a lower version that
arrived later) still belongs to the history, at its version's place. The event of each entry follows from the one
before it: ``ADD`` for the first live version and for a live version after a tombstone, ``UPDATE`` for later live
versions, ``DELETE`` for tombstones; ``previous_memory`` is the text of the entry before (None after a tombstone
or for the first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from processors.model import HistoryRow


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    event: str  # "ADD" | "UPDATE" | "DELETE"
    memory: str | None
    previous_memory: str | None
    version: int
    event_id: str
    ts: int
    actor: str | None = None  # EXPIRY_ACTOR: the expiry sweep removed the memory


def history_entries(rows: Sequence[HistoryRow]) -> list[HistoryEntry]:
    """The entries of a memory's kept versions, in (version, event id) order whatever order they came in."""
    entries: list[HistoryEntry] = []
    previous: HistoryRow | None = None
    for row in sorted(rows, key=lambda r: (r.version, r.event_id)):
        if row.deleted:
            event = "DELETE"
        elif previous is None or previous.deleted:
            event = "ADD"
        else:
            event = "UPDATE"
        before = None if previous is None or previous.deleted else previous.text
        memory = None if row.deleted else row.text
        entries.append(HistoryEntry(event, memory, before, row.version, row.event_id, row.ts, row.actor))
        previous = row
    return entries


__all__ = ["HistoryEntry", "history_entries"]
