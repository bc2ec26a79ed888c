"""publish_lines on the real broker: every event where a plain send() puts it, in order, acknowledged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from infra.generations import Generation, generation
from infra.kafka import KafkaPublisher, consumer_config, ensure_topics, wait_for_commits
from infra.log_reader import LogReader, StartAt
from infra.settings import Settings
from processors.ports import OutRecord
from schemas.events import decode_event
from streams.runtime.stores import connect_pointer
from streams.surface.api import LINES_PER_CHUNK, MemoryPublisher


async def test_publish_lines_puts_each_memory_in_the_default_partition_in_order(settings: Settings) -> None:
    count = 2 * LINES_PER_CHUNK + 123  # several chunks and a partial one
    lines = [
        orjson.dumps({"user_id": "u", "memory_id": f"m{i % 97}", "text": f"text {i}", "version": i + 1})
        for i in range(count)
    ]
    lines.insert(50, b'{"user_id": "u"}')  # refused (no text), the lines around it still go out
    async with MemoryPublisher(settings) as publisher:
        single = await publisher.add(user_id="u", text="sent on its own first", memory_id="m0")
        result = await publisher.publish_lines(lines)
    assert result.accepted == count
    assert [(r.line, r.field) for r in result.rejected] == [(51, "text")]

    async with await LogReader.open(settings, settings.topics.events) as reader:
        await reader.seek(StartAt.beginning())
        records = [r async for window in reader.read_to_end() for r in window]
    assert len(records) == count + 1
    partitions = list(range(settings.partitions))
    choose = DefaultPartitioner()
    versions: dict[str, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = decode_event(record.value)
        assert record.key == event.key
        assert record.partition == choose(record.key, partitions, partitions), event.memory_id
        versions.setdefault(event.memory_id, []).append(event.version)
    assert versions["m0"][0] == single.version  # the single send() stays ahead of the batches after it
    for memory_id, seen in versions.items():
        published = sorted(i + 1 for i in range(count) if f"m{i % 97}" == memory_id)
        assert [v for v in seen if v != single.version] == published, memory_id


async def test_publish_lines_reports_one_past_its_last_offset_on_each_partition(settings: Settings) -> None:
    lines = [orjson.dumps({"user_id": "u", "memory_id": f"m{i}", "text": f"text {i}"}) for i in range(500)]
    async with MemoryPublisher(settings) as publisher:
        await publisher.add(user_id="u", text="sent on its own", memory_id="single")
        first = await publisher.publish_lines(lines[:200])
        second = await publisher.publish_lines(lines[200:])

    async with await LogReader.open(settings, settings.topics.events) as reader:
        await reader.seek(StartAt.beginning())
        records = [r async for window in reader.read_to_end() for r in window]
    ends: dict[int, int] = {}
    for record in records:
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    assert second.ends == ends  # every record, the single send() and both calls' batches, is below its end
    assert all(first.ends[p] <= second.ends[p] for p in first.ends)
    assert sum(first.ends.values()) == 201  # what was acknowledged when the first call returned, nothing more


async def test_wait_for_commits_returns_once_the_group_committed_each_end(settings: Settings) -> None:
    topic = settings.topics.events
    ends = {0: 5, 1: 3}
    group = f"{settings.group_id}.commits"
    await ensure_topics(settings, [topic])
    assert not await wait_for_commits(settings, group, topic, ends, timeout=0.5)  # never committed
    consumer = AIOKafkaConsumer(**consumer_config(settings, group_id=group))
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])  # commits as the engine's do, by hand
    try:
        await consumer.commit({TopicPartition(topic, 0): 5, TopicPartition(topic, 1): 2})
        assert not await wait_for_commits(settings, group, topic, ends, timeout=0.5)  # partition 1 is one short
        await consumer.commit({TopicPartition(topic, 1): 3})
        assert await wait_for_commits(settings, group, topic, ends, timeout=30)
    finally:
        await consumer.stop()
    assert await wait_for_commits(settings, group, topic, {}, timeout=0)  # nothing published: nothing to wait for


async def test_record_headers_reach_readers_as_sent(settings: Settings) -> None:
    """The embedded topic's vectors travel in headers: mixed records, with and without, keep theirs in order."""
    topic = settings.topics.embedded
    await ensure_topics(settings, [topic])
    records: list[OutRecord] = [
        (b"a", b"1", (("memstream.vector.f32le", b"\x00\x00\x80\x3f"),)),
        (b"a", b"2", ()),  # a delete's record: no header
        (b"a", b"3"),
        (b"a", b"4", (("x", b""), ("memstream.vector.f32le", bytes(range(256))))),
    ]
    publisher = await KafkaPublisher.start(settings)
    try:
        landed = await publisher.publish_positioned(topic, records)
    finally:
        await publisher.stop()
    async with await LogReader.open(settings, topic) as reader:
        await reader.seek(StartAt.beginning())
        read = [r async for window in reader.read_to_end() for r in window]
    assert [r.source for r in read] == landed
    assert [(r.value, r.headers) for r in read] == [(r[1], r[2] if len(r) > 2 else ()) for r in records]


PREFIX_OF_SERVING = """
import asyncio, sys
from infra.settings import Settings
from streams.runtime.stores import serving_redis_prefix
settings = Settings.from_env({"MEMSTREAM_HOME": sys.argv[1], "MEMSTREAM_REDIS_PREFIX": "wait:"})
print(asyncio.run(serving_redis_prefix(settings)), "lancedb" in sys.modules)
"""


async def test_publish_wait_finds_the_serving_redis_namespace_without_lancedb_until_a_switch(tmp_path: Path) -> None:
    """`publish --wait` (searchable) reads Redis alone: generation 0's namespace while the local LanceDB holds no
    pointer table, told without importing lancedb (1.1 s of CPU); once a rebuild switched, the pointer's."""
    home = tmp_path / "home"

    def serving() -> tuple[str, str]:
        done = subprocess.run([sys.executable, "-c", PREFIX_OF_SERVING, str(home)], capture_output=True, check=True)
        prefix, imported = done.stdout.decode().split()
        return prefix, imported

    assert serving() == ("wait:", "False")
    settings = Settings.from_env({"MEMSTREAM_HOME": str(home), "MEMSTREAM_REDIS_PREFIX": "wait:"})
    pointer = await connect_pointer(settings)
    assert (await pointer.active()).redis_prefix == "wait:"  # what LanceDB says agrees
    new = generation(settings.lancedb_table, settings.redis_prefix, 1)
    await pointer.switch(Generation(new.number, new.table, new.redis_prefix, "hash-384", 384))
    assert serving() == ("wait:g1:", "True")
