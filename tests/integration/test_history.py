"""``history(id)`` that lasts (issue 25, item 2): every applied version kept in LanceDB by the index sink.

The history table on disk (idempotent, tenant-keyed, oldest first), then the live embedded stack: add, update,
update, delete published with ``--wait --indexed``; the history answers with four entries, and still answers
the same after the embedded topic is written through the sink again, after `memstream replay`, after `memstream
down`/`up` (the memory-only broker's log is empty then) and after a rebuild into a new generation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infra.history_store import LanceHistoryStore, history_table_name
from infra.kafka import to_in_record
from infra.services import LocalStack
from infra.settings import Settings
from memstream import AsyncMemory
from processors.model import MemoryRow
from schemas.events import Scope, SourceRef
from streams.runtime.sink import make_index_processor
from streams.runtime.stores import Stores, resolve_services
from tests.integration.helpers import WorkerProcess, read_topic, run_cli, write_jsonl
from tests.integration.test_restart import stack_settings

pytestmark = pytest.mark.slow


def version(memory_id: str, v: int, text: str, *, tenant: str = "acme", deleted: bool = False) -> MemoryRow:
    return MemoryRow(memory_id, Scope(tenant, "u1"), "" if deleted else text, {}, v, f"e{v}", "h", deleted, 1_000 + v)


async def test_the_history_table_keeps_each_version_once_per_tenant_oldest_first(tmp_path: Path) -> None:
    reader = LanceHistoryStore(str(tmp_path), history_table_name("memories"), cache_mb=16)
    assert await reader.read("acme/m1") == []  # before the sink's first write: no table, no history
    writer = LanceHistoryStore(str(tmp_path), history_table_name("memories"), cache_mb=16)
    batch = [version("m1", 3, "three"), version("m1", 1, "one"), version("m1", 1, "one")]  # a duplicate in a batch
    assert await writer.record(batch) == 2
    assert await writer.record([version("m1", 1, "one"), version("m1", 2, "two")]) == 1  # a batch written again
    assert await writer.record([version("m1", 4, "", deleted=True), version("m1", 9, "theirs", tenant="other")]) == 2
    got = await reader.read("acme/m1")
    assert [(r.version, r.text, r.deleted) for r in got] == [
        (1, "one", False),
        (2, "two", False),
        (3, "three", False),
        (4, None, True),
    ]
    assert [r.version for r in await reader.read("other/m1")] == [9]  # the same id in another tenant: its own
    assert await writer.maintain()  # the key's B-tree; reads answer the same with it
    assert await reader.read("acme/m1") == got


def read_at(memory_id: str, v: int, offset: int, *, partition: int = 0) -> MemoryRow:
    """A version whose event was read at ``events[partition]@offset``."""
    return dataclasses.replace(version(memory_id, v, f"v{v}"), source=SourceRef("events", partition, offset))


async def rows_held(path: Path) -> list[tuple[str, str]]:
    import lancedb

    table = await (await lancedb.connect_async(str(path))).open_table(history_table_name("memories"))
    held = await table.query().select(["memory_key", "event_id"]).to_arrow()
    return sorted(zip(held.column("memory_key").to_pylist(), held.column("event_id").to_pylist(), strict=True))


async def test_versions_read_past_the_held_positions_are_appended_and_the_others_never_twice(tmp_path: Path) -> None:
    store = LanceHistoryStore(str(tmp_path), history_table_name("memories"), cache_mb=16)
    assert await store.record([read_at("m1", 1, 0), read_at("m2", 1, 1), read_at("m3", 1, 0, partition=1)]) == 3
    # the same batch again (a crash before the offset commit), and a window an ingest crash produced again
    assert await store.record([read_at("m1", 1, 0), read_at("m2", 1, 1), read_at("m3", 1, 0, partition=1)]) == 0
    assert await store.record([read_at("m2", 1, 1), read_at("m2", 2, 2)]) == 1
    # a new process (the sink restarted) reads the positions from the table: the redelivered batch adds nothing
    again = LanceHistoryStore(str(tmp_path), history_table_name("memories"), cache_mb=16)
    assert await again.record([read_at("m2", 2, 2), read_at("m1", 2, 3), version("m4", 1, "no position")]) == 2
    # a log that restarted its offsets: behind the held positions, so merged, and kept once
    assert await again.record([read_at("m1", 1, 0), read_at("m5", 1, 1)]) == 1
    # another writer (a sink that took the partitions over) kept versions past what the first store last saw:
    # the first one reads the positions again and merges that batch when it comes to it too
    assert await store.record([read_at("m6", 1, 9), read_at("m1", 3, 10)]) == 2
    assert await again.record([read_at("m6", 1, 9), read_at("m1", 3, 10)]) == 0
    held = await rows_held(tmp_path)
    assert len(held) == len(set(held)) == 9
    assert [(r.version, r.text) for r in await again.read("acme/m2")] == [(1, "v1"), (2, "v2")]


async def test_a_table_made_before_positions_were_kept_is_merged_into_until_the_next_process(tmp_path: Path) -> None:
    import lancedb
    import pyarrow as pa

    from infra.history_store import ADDED_COLUMNS, HISTORY_SCHEMA, _to_arrow

    old_schema = pa.schema([f for f in HISTORY_SCHEMA if f.name not in ADDED_COLUMNS])
    db = await lancedb.connect_async(str(tmp_path))
    written = _to_arrow([version("m1", 1, "one"), version("m1", 2, "two")]).select(old_schema.names)
    await db.create_table(history_table_name("memories"), data=written.cast(old_schema))
    store = LanceHistoryStore(str(tmp_path), history_table_name("memories"), cache_mb=16)
    # version 2 comes again with a position past any the table holds (it holds none): merged, not appended twice
    assert await store.record([read_at("m1", 2, 40), read_at("m1", 3, 41)]) == 1
    assert await rows_held(tmp_path) == [("acme/m1", "e1"), ("acme/m1", "e2"), ("acme/m1", "e3")]
    later = LanceHistoryStore(str(tmp_path), history_table_name("memories"), cache_mb=16)
    assert await later.record([read_at("m1", 3, 41), read_at("m1", 4, 42)]) == 1  # positions now held: appends
    assert [r.version for r in await later.read("acme/m1")] == [1, 2, 3, 4]


EXPECTED = [
    ("ADD", "Alice likes tea", None),
    ("UPDATE", "Alice likes green tea", "Alice likes tea"),
    ("UPDATE", "Alice likes matcha", "Alice likes green tea"),
    ("DELETE", None, "Alice likes matcha"),
]


async def history_of(settings: Settings, memory_id: str, tenant: str = "default") -> list[dict[str, object]]:
    async with AsyncMemory(settings, tenant_id=tenant) as memory:
        return await memory.history(memory_id)


async def test_history_lasts_through_a_sink_rewrite_a_replay_a_restart_and_a_rebuild(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path / "home")
    stack = LocalStack(settings.home)
    stack.up(kafka_port=None, redis_port=None)
    workers = [WorkerProcess(settings, tmp_path / "worker-1.log").start()]
    try:
        lines: list[dict[str, object]] = [
            {"user_id": "u1", "memory_id": "h1", "text": "Alice likes tea"},
            {"user_id": "u1", "memory_id": "h1", "op": "update", "text": "Alice likes green tea"},
            {"user_id": "u1", "memory_id": "h1", "op": "update", "text": "Alice likes matcha"},
            {"user_id": "u1", "memory_id": "h1", "op": "delete"},
            {"tenant_id": "other", "user_id": "u9", "memory_id": "h1", "text": "another tenant's h1"},
        ]
        published = await run_cli(
            settings, "publish", str(write_jsonl(tmp_path / "in.jsonl", lines)), "--wait", "--indexed"
        )
        assert published.rc == 0, published
        resolved = resolve_services(settings, start=False)
        history = await history_of(resolved, "h1")  # --indexed: LanceDB holds it, so the history does
        assert [(h["event"], h["memory"], h["previous_memory"]) for h in history] == EXPECTED, history
        assert [h["version"] for h in history] == sorted({h["version"] for h in history})  # distinct, ascending
        assert [(h["event"], h["memory"]) for h in await history_of(resolved, "h1", "other")] == [
            ("ADD", "another tenant's h1")
        ]

        # The embedded topic written through the sink's own write path once more (a crash before the offset
        # commit, a second sink group): every version is kept already
        records = await read_topic(resolved, resolved.topics.embedded, lambda got: len(got) >= len(lines))
        assert len(records) == len(lines)
        stores = await Stores.open(resolved, sink=True)
        try:
            processor = make_index_processor(resolved, stores, publisher=None)
            report = await processor.write(processor.prepare([to_in_record(r) for r in records]))
        finally:
            await stores.close()
        assert (report.records, report.versions) == (len(lines), 0), report
        replayed = await run_cli(settings, "replay", "--json")
        assert replayed.rc == 0, replayed
        assert await history_of(resolved, "h1") == history

        workers[0].interrupt()
        assert workers[0].wait_stopped()[0] == 0
        stack.down()
        stack.up(kafka_port=None, redis_port=None)
        resolved = resolve_services(settings, start=False)
        workers.append(WorkerProcess(settings, tmp_path / "worker-2.log").start())
        assert await read_topic(resolved, resolved.topics.embedded, lambda got: False, timeout=3) == []  # log gone
        assert await history_of(resolved, "h1") == history

        rebuilt = await run_cli(settings, "rebuild", "--json", timeout=180)
        assert rebuilt.rc == 0 and rebuilt.json()["switched"], rebuilt
        assert await history_of(resolved, "h1") == history  # outside the generations: the new one did not lose it
    finally:
        for worker in workers:
            worker.interrupt()
            worker.wait_stopped()
        stack.down()
