"""The change feed for consumers: a Python async iterator with at-least-once delivery and commit control.

async with ChangeFeed(settings, group_id="my-indexer") as feed:
    async for item in feed:
        await handle(item.change)          # e.g. update a search index, notify an agent
        if feed.uncommitted >= 500:
            await feed.commit()            # offsets of everything yielded so far; crash before it: seen again

With a ``group_id`` the feed is an ordinary Kafka consumer group: partitions are shared among the members,
and a consumer that stops without committing gets the uncommitted changes again (at-least-once; dedupe on
``(memory_id, version, event_id)``). ``start`` applies only where the group has no committed offset yet.
Without a group the feed reads every partition from ``start`` and remembers nothing (what ``memstream tail``
does). Records are keyed by ``memory_id``, so all changes of one memory are in one partition, in order.

Not on the one consume loop (streams/runtime/loop.py): the loop drives a handler and commits after each write,
while this is a pull iterator whose caller decides what is done and when to commit (``commit`` covers what was
yielded so far, possibly part of a fetch). Without a group it reads through :class:`infra.log_reader.LogReader`,
which never commits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from infra.kafka import consumer_config, ensure_topics, getmany, to_in_record
from infra.log_reader import LogReader, StartAt
from infra.poison_guard import install_batch_guard
from infra.settings import Settings
from processors.model import InRecord, ScopeQuery
from schemas.errors import BrokerError, ConfigError, SchemaError
from schemas.events import ChangeEvent, SourceRef, decode_change

log = logging.getLogger("memstream.changes")

START_BEGINNING = "beginning"
START_NOW = "now"


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One change, where it was read (``changes[p]@offset``) and the record's timestamp."""

    change: ChangeEvent
    source: SourceRef
    timestamp: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.change.to_dict(), "feed": {**self.source.to_dict(), "timestamp": self.timestamp}}


def parse_start(text: str) -> str | int:
    """``beginning``, ``now``, or a timestamp: milliseconds since the epoch or an ISO-8601 date and time."""
    if text in (START_BEGINNING, START_NOW):
        return text
    if text.isdigit():
        return int(text)
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--from must be beginning, now, milliseconds since the epoch or an ISO-8601 time, not {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class ChangeFeed:
    """An async iterator over ``<prefix>changes``; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str | None = None,
        start: str | int = START_BEGINNING,
        scope: ScopeQuery | None = None,
        follow: bool = True,
        idle_timeout_s: float = 1.0,
        **consumer_options: Any,
    ) -> None:
        """``consumer_options`` go to the aiokafka consumer of a group (e.g. ``session_timeout_ms``: a member
        that left without saying so holds its partitions that long before the group rebalances)."""
        if group_id is not None and not isinstance(start, str):
            raise ConfigError("a timestamp start needs a feed without a group (a group resumes where it committed)")
        self.settings = settings
        self.group_id = group_id
        self.start = start
        self.scope = scope
        self.follow = follow
        self.idle_timeout_s = idle_timeout_s
        self.consumer_options = consumer_options
        self.topic = settings.topics.changes
        self._consumer: AIOKafkaConsumer | None = None  # with a group
        self._reader: LogReader | None = None  # without one
        self._yielded: dict[TopicPartition, int] = {}
        self.uncommitted = 0
        self.skipped_invalid = 0

    async def __aenter__(self) -> ChangeFeed:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        install_batch_guard()  # a library user's process: no command installed it
        await ensure_topics(self.settings, [self.topic])
        if self.group_id is None:
            self._reader = await LogReader.open(self.settings, self.topic)
            if self.start == START_NOW:
                await self._reader.seek(StartAt(at_end=True))
            elif isinstance(self.start, int):
                await self._reader.seek(StartAt(timestamp_ms=self.start))
            else:
                await self._reader.seek(StartAt.beginning())
            return
        config = consumer_config(self.settings, group_id=self.group_id)
        config["auto_offset_reset"] = "latest" if self.start == START_NOW else "earliest"
        config.update(self.consumer_options)
        consumer = AIOKafkaConsumer(self.topic, **config)
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerError(f"cannot read the change feed {self.topic} as group {self.group_id}: {exc}") from exc
        self._consumer = consumer

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None

    def __aiter__(self) -> AsyncIterator[FeedItem]:
        return self._items()

    async def _items(self) -> AsyncIterator[FeedItem]:
        async for batch in self._decoded(1_000):
            for item in batch:
                self._hand_out(item)
                yield item

    def _hand_out(self, item: FeedItem) -> None:
        """What :meth:`commit` covers: only what the consumer was given (and records skipped before it)."""
        self._yielded[TopicPartition(item.source.topic, item.source.partition)] = item.source.offset + 1
        self.uncommitted += 1

    async def batches(self, max_records: int = 1_000) -> AsyncIterator[list[FeedItem]]:
        """Changes in batches (cheaper than one by one), in order within each partition.

        Without ``follow`` it ends at the end of the feed: without a group, the end it had when the read
        began (:meth:`LogReader.read_to_end`); with a group, after ``idle_timeout_s`` with nothing new.
        """
        async for batch in self._decoded(max_records):
            for item in batch:
                self._hand_out(item)
            yield batch

    async def _decoded(self, max_records: int) -> AsyncIterator[list[FeedItem]]:
        async for records in self._records(max_records):
            batch = self._decode(records)
            if batch:
                yield batch

    async def _records(self, max_records: int) -> AsyncIterator[list[InRecord]]:
        if self._reader is not None:
            reader = self._reader
            source = reader.follow(batch=max_records) if self.follow else reader.read_to_end(batch=max_records)
            async for records in source:
                yield records
            return
        if self._consumer is None:
            raise RuntimeError("use `async with ChangeFeed(settings) as feed`")
        consumer = self._consumer
        loop = asyncio.get_running_loop()
        await self._wait_for_assignment(consumer)
        quiet_since = loop.time()
        while True:
            try:
                fetched = await getmany(consumer, timeout_ms=200, max_records=max_records)
            except KafkaError as exc:
                raise BrokerError(f"reading the change feed {self.topic} failed: {exc}") from exc
            if fetched:
                quiet_since = loop.time()
                yield [to_in_record(m) for messages in fetched.values() for m in messages]
            elif not self.follow and loop.time() - quiet_since >= self.idle_timeout_s:
                return

    async def _wait_for_assignment(self, consumer: AIOKafkaConsumer, timeout_s: float = 60.0) -> None:
        """A group member owns no partition until the join completes (~5 s): "idle" only counts after it."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not consumer.assignment():
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerError(f"group {self.group_id} got no partition of {self.topic} within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)

    def _decode(self, records: Sequence[InRecord]) -> list[FeedItem]:
        out = []
        for record in records:
            try:
                if record.poison is not None:
                    raise SchemaError(f"undecodable record batch up to offset {record.last_offset}: {record.poison}")
                change = decode_change(record.value)
            except SchemaError as exc:
                log.warning("change feed record %s is not a change event: %s", record.source, exc)
                self.skipped_invalid += 1
                continue
            if self.scope is not None and not self.scope.matches(change.scope):
                continue
            out.append(FeedItem(change, record.source, record.timestamp))
        return out

    async def commit(self) -> None:
        """Commit everything yielded so far: after a restart the group resumes after it (no-op without a group)."""
        if self._consumer is None or not self._yielded:
            return
        offsets, self._yielded = dict(self._yielded), {}
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            self._yielded = {**offsets, **self._yielded}
            raise BrokerError(f"committing the change feed offsets of group {self.group_id} failed: {exc}") from exc
        self.uncommitted = 0
