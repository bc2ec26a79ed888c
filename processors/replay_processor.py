"""The replay processor: embedded events re-materialized (no re-embedding), to replay and rebuild from the log."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from processors.counters import WindowReport, add_counts
from processors.materializer import Materializer, quarantine
from processors.model import InRecord
from processors.pipeline import dead_letter, describe_window
from processors.ports import Counters
from schemas.errors import MemStreamError, SchemaError
from schemas.events import DeadLetter, EmbeddedEvent, decode_embedded, encode

log = logging.getLogger("memstream.processors")


class ReplayProcessor:
    """Re-materializes embedded events (no re-embedding): used to replay and rebuild from the log."""

    def __init__(self, materializer: Materializer, counters: Counters | None = None) -> None:
        self.materializer = materializer
        self.counters = counters

    async def quarantine(self, records: Sequence[InRecord], error: MemStreamError) -> WindowReport:
        m = self.materializer
        return await quarantine(m.publisher, m.topics, records, error, self.counters)

    async def process(self, records: Sequence[InRecord]) -> WindowReport:
        report = WindowReport(records=len(records))
        where = describe_window(records)
        good: list[EmbeddedEvent] = []
        dead: list[DeadLetter] = []
        for record in records:
            try:
                item = decode_embedded(record.value, record.headers)
                self.materializer.check_model(item)
                good.append(item)
            except SchemaError as exc:
                log.warning("dead-lettering %s: %s", record.source, exc)
                dead.append(dead_letter(record, exc, stage="replay"))
        if dead:
            batch = [(d.key, encode(d)) for d in dead]
            await self.materializer.publisher.publish(self.materializer.topics.dlq, batch)
        report.events = len(good)
        report.dead_lettered = len(dead)
        await self.materializer.materialize(good, report, where)
        if report.refused:
            batch = [(d.key, encode(d)) for d in report.refused]
            await self.materializer.publisher.publish(self.materializer.topics.dlq, batch)
        await add_counts(self.counters, report.counters())
        return report
