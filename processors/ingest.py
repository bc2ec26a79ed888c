"""The ingest processor: raw memory events in; embedded events, the stores and the change feed out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from processors.counters import WindowReport, add_counts
from processors.embedding import CachedEmbedder
from processors.materializer import Materializer, quarantine
from processors.model import InRecord, Topics
from processors.pipeline import attach_vectors, decode_all, describe_window, with_positions
from processors.ports import Counters, OutRecord
from processors.retry import with_retries
from processors.timings import StageTimings
from schemas.errors import MemStreamError
from schemas.events import DeadLetter, EmbeddedEvent, MemoryEvent, Op, SourceRef, decode_event, encode, encode_embedded


@dataclass(slots=True)
class PreparedWindow:
    """A window decoded and embedded, ready to be written."""

    records: Sequence[InRecord]
    where: str
    embedded: list[EmbeddedEvent]
    dead: list[DeadLetter]
    report: WindowReport


class IngestProcessor:
    """The hot path: raw memory events in, embedded events, both stores and the change feed out."""

    def __init__(
        self,
        embedder: CachedEmbedder,
        materializer: Materializer,
        counters: Counters | None = None,
        timings: StageTimings | None = None,
    ) -> None:
        self.embedder = embedder
        self.materializer = materializer
        self.counters = counters
        self.timings = timings or StageTimings()  # the parts of a window's write (logged by its engine)

    @property
    def topics(self) -> Topics:
        return self.materializer.topics

    async def process(self, records: Sequence[InRecord]) -> WindowReport:
        return await self.write(await self.prepare(records))

    async def prepare(self, records: Sequence[InRecord]) -> PreparedWindow:
        """Decode and embed: CPU work that touches no store, so it may run while the previous window writes."""
        report = WindowReport(records=len(records))
        where = describe_window(records)
        events, dead = decode_all(records, decode_event, stage="decode")
        embedded = await self._embed(events, report, where)
        report.events = len(events)
        report.dead_lettered = len(dead)
        return PreparedWindow(records, where, embedded, dead, report)

    async def write(self, window: PreparedWindow) -> WindowReport:
        """Both stores, the log copy and the change feed. Windows are written one at a time, in order."""
        report = window.report
        # The log copy (embedded topic) and the stores are written at once: the offsets are committed only
        # after both, so a failure of either means the window is processed again, never half-forgotten.
        timed = self.timings.timed
        positions, _ = await asyncio.gather(
            timed("embedded", self._publish_derived(window.embedded, window.dead, window.where)),
            timed("redis", self.materializer.materialize(window.embedded, report, window.where, announce=False)),
        )
        if report.changes:  # each change says where its embedded record is: indexed once the sink passed it
            report.changes = with_positions(report.changes, window.embedded, positions)
            await timed("changes", self.materializer.announce(report.changes, window.where))
        if report.refused:  # known only once the stores' owners were read: after the derived records
            await self._publish_derived([], report.refused, window.where)
        await add_counts(self.counters, report.counters())
        return report

    async def quarantine(self, records: Sequence[InRecord], error: MemStreamError) -> WindowReport:
        return await quarantine(self.materializer.publisher, self.topics, records, error, self.counters)

    async def _embed(
        self, events: list[tuple[InRecord, MemoryEvent]], report: WindowReport, where: str
    ) -> list[EmbeddedEvent]:
        texts = [e.text for _, e in events if e.op is not Op.DELETE and e.text is not None]
        vectors: list[bytes] = []
        if texts:
            vectors, report.cache = await with_retries(
                f"embedding {len(texts)} texts from {where}",
                lambda: self.embedder.embed(texts),
                self.materializer.retry,
                self.materializer.sleep,
            )
        return attach_vectors(((e, r.source) for r, e in events), vectors, self.embedder.model, self.embedder.dim)

    async def _publish_derived(
        self, embedded: list[EmbeddedEvent], dead: list[DeadLetter], where: str
    ) -> list[SourceRef]:
        """The embedded events (what the index sink writes to LanceDB, and replays read without re-embedding) and
        the dead letters; returns where each embedded event landed."""
        topics = self.topics
        publisher = self.materializer.publisher
        if not embedded and not dead:
            return []
        letters = [(d.key, encode(d)) for d in dead]
        records: list[OutRecord] = [(e.event.key, *encode_embedded(e)) for e in embedded]

        async def send_all() -> list[SourceRef]:
            landed, _ = await asyncio.gather(
                publisher.publish_positioned(topics.embedded, records) if records else _nothing(),
                publisher.publish(topics.dlq, letters) if letters else _nothing(),
            )
            return list(landed or [])

        return await with_retries(
            f"publishing derived records of {where}", send_all, self.materializer.retry, self.materializer.sleep
        )


async def _nothing() -> None:
    return None
