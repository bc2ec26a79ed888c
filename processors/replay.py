"""Replaying the log into the stores: the embedded topic (vectors included) or the raw events topic (re-embedded).

A replay applies records through the same version-guarded :class:`Materializer` as the live path, so replaying
over live data changes nothing that is newer: a record older than what a store holds comes back ``STALE``.
Unlike the live path it never publishes to the embedded topic (the log already holds those events; a second
copy would only double what the next replay reads) nor to the dead-letter topic (the live worker dead-lettered
every bad record when it first saw it); records it cannot use are logged with ``topic[partition]@offset`` and
counted in the report, never silently dropped.

From the embedded topic, events embedded with another model than the target store's (the log of a deployment
that migrated) are re-embedded from their text, which the embedded event carries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from processors.embedding import CachedEmbedder
from processors.model import InRecord, MemoryRow, ScopeQuery, StoreState
from processors.pipeline import (
    Materializer,
    WindowReport,
    attach_vectors,
    describe_window,
    event_key,
    row_from,
    scope_mismatch,
    with_retries,
)
from schemas.errors import SchemaError
from schemas.events import EmbeddedEvent, MemoryEvent, Op, SourceRef, decode_embedded, decode_event

log = logging.getLogger("memstream.replay")

SOURCE_EMBEDDED = "embedded"
SOURCE_EVENTS = "events"
SOURCES = (SOURCE_EMBEDDED, SOURCE_EVENTS)


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which records a replay applies: a record-timestamp window ``[from_ts, until_ts)``, an end offset per
    partition (exclusive), and a scope."""

    scope: ScopeQuery | None = None
    from_ts: int | None = None  # milliseconds since the epoch, inclusive
    until_ts: int | None = None  # exclusive
    until_offsets: Mapping[int, int] | None = None  # partition -> first offset not replayed

    def admits_position(self, record: InRecord) -> bool:
        if self.from_ts is not None and record.timestamp < self.from_ts:
            return False
        if self.until_ts is not None and record.timestamp >= self.until_ts:
            return False
        end = self.until_offsets.get(record.partition) if self.until_offsets else None
        return end is None or record.offset < end

    def admits_event(self, event: MemoryEvent) -> bool:
        return self.scope is None or self.scope.matches(event.scope)


@dataclass(slots=True)
class ReplayReport:
    """What a replay did, summed over its windows."""

    source: str
    records: int = 0  # read from the topic
    replayed: int = 0  # decoded, inside the time window and the scope, handed to the stores
    applied: int = 0  # changed a store
    current: int = 0  # the store already held exactly this event
    stale: int = 0  # the store held something newer (or the window itself did)
    outside_range: int = 0  # before the start time, at or after the end time or end offset
    outside_scope: int = 0
    invalid: int = 0
    scope_mismatch: int = 0  # refused: the memory belongs to another user (the worker dead-lettered them)
    reembedded: int = 0
    changes_emitted: int = 0
    seconds: float = 0.0
    positions: dict[int, int] = field(default_factory=dict)  # partition -> next offset: where it stopped

    def add(self, window: WindowReport) -> None:
        self.applied += window.applied
        self.current += window.current
        self.stale += window.stale
        self.scope_mismatch += len(window.refused)
        self.changes_emitted += len(window.changes)

    def note_positions(self, records: Sequence[InRecord]) -> None:
        for r in records:
            last = r.offset if r.last_offset is None else r.last_offset  # an undecodable batch covers a range
            self.positions[r.partition] = max(self.positions.get(r.partition, 0), last + 1)

    @property
    def events_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "records": self.records,
            "replayed": self.replayed,
            "applied": self.applied,
            "current": self.current,
            "stale": self.stale,
            "outside_range": self.outside_range,
            "outside_scope": self.outside_scope,
            "invalid": self.invalid,
            "scope_mismatch": self.scope_mismatch,
            "reembedded": self.reembedded,
            "changes_emitted": self.changes_emitted,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s, 1),
            "positions": {str(p): offset for p, offset in sorted(self.positions.items())},
        }


@dataclass(slots=True)
class PreparedReplay:
    """A window decoded, filtered and embedded, ready to be written."""

    records: Sequence[InRecord]
    where: str
    ready: list[EmbeddedEvent]


class LogReplayer:
    """Applies windows of log records to the stores behind ``materializer`` (no re-embedding when it can)."""

    def __init__(
        self,
        materializer: Materializer,
        embedder: CachedEmbedder,
        *,
        source: str = SOURCE_EMBEDDED,
        only: ReplayFilter = ReplayFilter(),
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        self.materializer = materializer
        self.embedder = embedder
        self.source = source
        self.only = only
        self.report = ReplayReport(source)

    async def apply(self, records: Sequence[InRecord]) -> WindowReport:
        return await self.write(await self.prepare(records))

    async def prepare(self, records: Sequence[InRecord]) -> PreparedReplay:
        """Decode, filter, re-embed where needed: touches no store, so it may overlap the previous write."""
        where = describe_window(records)
        ready: list[EmbeddedEvent] = []
        to_embed: list[tuple[MemoryEvent, SourceRef | None]] = []
        for record in records:
            if not self.only.admits_position(record):
                self.report.outside_range += 1
                continue
            item = self._decode(record)
            if item is None:
                continue
            event = item.event if isinstance(item, EmbeddedEvent) else item
            if not self.only.admits_event(event):
                self.report.outside_scope += 1
                continue
            if isinstance(item, EmbeddedEvent) and self._usable(item):
                ready.append(item)
            else:
                # where the event came from: the events-topic record (an embedded event names it itself)
                to_embed.append((event, item.source if isinstance(item, EmbeddedEvent) else record.source))
        ready += await self._embed(to_embed, where)
        return PreparedReplay(records, where, ready)

    async def write(self, prepared: PreparedReplay) -> WindowReport:
        """Both stores (version-guarded) and, as the materializer's mode says, the change feed."""
        window = WindowReport(records=len(prepared.records), events=len(prepared.ready))
        await self.materializer.materialize(prepared.ready, window, prepared.where)
        self.report.records += len(prepared.records)
        self.report.replayed += len(prepared.ready)
        self.report.add(window)
        self.report.note_positions(prepared.records)
        return window

    def fold(self, prepared: PreparedReplay, into: LogFold) -> None:
        """Fold a prepared window into ``into`` instead of writing it (a build into an empty generation)."""
        refused, stale = into.refused, into.stale
        into.add(prepared.ready)
        self.report.records += len(prepared.records)
        self.report.replayed += len(prepared.ready)
        self.report.scope_mismatch += into.refused - refused
        self.report.stale += into.stale - stale
        self.report.note_positions(prepared.records)

    def _decode(self, record: InRecord) -> EmbeddedEvent | MemoryEvent | None:
        try:
            if self.source == SOURCE_EMBEDDED:
                return decode_embedded(record.value, record.headers)
            return decode_event(record.value)
        except SchemaError as exc:
            # The live worker dead-lettered this record when it first read it: say so, count it, go on.
            log.warning("replay skips the invalid record %s: %s", record.source, exc)
            self.report.invalid += 1
            return None

    def _usable(self, item: EmbeddedEvent) -> bool:
        """The vector can go into the target store as it is (deletes carry none, so they always can)."""
        m = self.materializer
        return item.event.op is Op.DELETE or (item.model == m.model and item.dim == m.dim)

    async def _embed(self, events: list[tuple[MemoryEvent, SourceRef | None]], where: str) -> list[EmbeddedEvent]:
        texts = [e.text for e, _ in events if e.op is not Op.DELETE and e.text is not None]
        vectors: list[bytes] = []
        if texts:
            m = self.materializer
            vectors, _ = await with_retries(
                f"re-embedding {len(texts)} texts from {where}", lambda: self.embedder.embed(texts), m.retry, m.sleep
            )
            self.report.reembedded += len(texts)
        return attach_vectors(events, vectors, self.embedder.model, self.embedder.dim)


@dataclass(slots=True)
class LogFold:
    """The newest event per memory over a log read window by window: what a build into an empty generation writes.

    The version guard without the stores: per memory the greatest ``(version, event_id)`` wins (a delete is a
    tombstone row that wins like any other), wherever in the log its events lie, and a memory belongs to the user
    of its first event in log order (every event of a memory is in one partition), as :func:`split_by_owner` rules
    for a memory the stores do not hold yet. Winners wait in ``pending`` until :meth:`take`; a memory taken
    (written) and beaten later in the log is written again, and the row it replaces is queued in ``superseded``
    for an exact delete, so a fold whose pending rows were flushed part-way still ends with one row per memory.
    """

    owners: dict[str, str] = field(default_factory=dict)  # key -> user the memory belongs to
    pending: dict[str, EmbeddedEvent] = field(default_factory=dict)  # winners not written yet
    written: dict[str, StoreState] = field(default_factory=dict)  # key -> the row written for it
    superseded: list[tuple[str, StoreState]] = field(default_factory=list)  # written rows beaten later
    refused: int = 0  # events naming another user than the memory's
    stale: int = 0  # events beaten by a newer one of their memory
    created: dict[str, int] = field(default_factory=dict)  # key -> its first add's time: an update's created_at
    # winners the hot copy (Redis) has not been sent yet: a build streams them there while it reads on (Redis'
    # compare-and-set keeps the newest, so a winner sent early and beaten later is simply sent again)
    unsent: dict[str, EmbeddedEvent] = field(default_factory=dict)
    _rows: dict[str, MemoryRow] = field(default_factory=dict)  # key -> the row made for its pending winner

    def add(self, events: Sequence[EmbeddedEvent]) -> None:
        for item in events:
            event = item.event
            key = event_key(event)
            if event.op is Op.ADD:
                self.created.setdefault(key, event.ts)
            owner = self.owners.setdefault(key, event.scope.user_id)
            if owner != event.scope.user_id:
                # the live worker dead-lettered it when it first saw it; a rebuild only says so
                log.warning("rebuild skips %s: %s", item.source, scope_mismatch(item, owner))
                self.refused += 1
                continue
            held = self.pending.get(key)
            if held is not None:
                if event.order() > held.event.order():
                    self.pending[key] = self.unsent[key] = item
                self.stale += 1  # one of the two is beaten either way
                continue
            done = self.written.get(key)
            if done is not None and event.order() <= (done.version, done.event_id):
                self.stale += 1
                continue
            self.pending[key] = self.unsent[key] = item

    def row(self, key: str, item: EmbeddedEvent) -> MemoryRow:
        """The row of a pending winner (made once: the hot copy and LanceDB take the same object), an update's
        created_at from the first add the log held before it was made."""
        made = self._rows.get(key)
        fresh = made is not None and made.event_id == item.event.event_id
        if made is not None and fresh and (made.created_at is not None or key not in self.created):
            return made
        made = row_from(item)
        if made.created_at is None and key in self.created:
            made = dataclasses.replace(made, created_at=self.created[key])
        self._rows[key] = made
        return made

    def take_unsent(self) -> list[MemoryRow]:
        """The winners that changed since the last call, as rows for the hot copy (version-guarded there)."""
        rows = [self.row(key, item) for key, item in self.unsent.items()]
        self.unsent.clear()
        return rows

    def take(self) -> list[MemoryRow]:
        """The pending winners as rows to append; from now on they count as written (to LanceDB: the hot copy
        takes its rows from :meth:`take_unsent`)."""
        rows = [self.row(key, item) for key, item in self.pending.items()]
        self._rows.clear()
        for row in rows:
            old = self.written.get(row.key)
            if old is not None:
                self.superseded.append((row.key, old))
            self.written[row.key] = row.state()
        self.pending.clear()
        return rows

    def take_superseded(self) -> list[dict[str, StoreState]]:
        """The written rows beaten later, in rounds of distinct memories (an exact delete takes one state each)."""
        rounds: list[dict[str, StoreState]] = []
        for key, state in self.superseded:
            for batch in rounds:
                if key not in batch:
                    batch[key] = state
                    break
            else:
                rounds.append({key: state})
        self.superseded.clear()
        return rounds
