"""The dead-letter monitor: every dead letter logged with where it came from, and counted by error type."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from processors.counters import add_counts
from processors.model import InRecord
from processors.ports import Counters
from schemas.errors import SchemaError
from schemas.events import decode_dead_letter

log = logging.getLogger("memstream.processors")


class DeadLetterMonitor:
    """Watches the dead-letter topic: logs each record with where it came from and counts them by error type."""

    def __init__(self, counters: Counters | None = None) -> None:
        self.counters = counters

    async def process(self, records: Sequence[InRecord]) -> dict[str, int]:
        by_type: dict[str, int] = {}
        for record in records:
            try:
                letter = decode_dead_letter(record.value)
            except SchemaError as exc:
                log.error("unreadable dead letter at %s: %s", record.source, exc)
                by_type["dlq_unreadable"] = by_type.get("dlq_unreadable", 0) + 1
                continue
            origin = letter.source or record.source
            log.warning("dead letter %s from %s (%s): %s", record.source, origin, letter.stage, letter.reason)
            name = f"dlq_{letter.error_type}"
            by_type[name] = by_type.get(name, 0) + 1
        if by_type:
            await add_counts(self.counters, by_type)
        return by_type
