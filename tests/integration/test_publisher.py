"""publish_lines on the real broker: every event where a plain send() puts it, in order, acknowledged."""

from __future__ import annotations

import orjson
from aiokafka.partitioner import DefaultPartitioner

from infra.log_reader import LogReader, StartAt
from infra.settings import Settings
from schemas.events import decode_event
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
