"""Replay, rebuild, model migration and the change feed (issue #4), against the real broker, Redis and LanceDB.

Most tests fill the log and the stores by running the ingest processor in-process over the events topic (what
the worker's window loop does, without the ~15 s consumer-group join); the last test runs the real worker, reads
the change feed with `memstream tail`, and rebuilds under it to check that it follows the switch.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lancedb
import orjson
import pytest
import redis.asyncio as aioredis

from infra.generations import ActivePointer, Generation, generation
from infra.log_reader import LogReader, StartAt
from infra.settings import Settings
from processors.model import StoreState
from schemas.errors import StoreError
from schemas.events import MemoryEvent
from streams.runtime.changes import ChangeFeed
from streams.runtime.replay import FLUSH_ROWS, rebuild
from streams.runtime.stores import Runtime, Stores
from streams.surface.api import MemoryPublisher, MemoryReader, wait_until_materialized
from tests.integration.helpers import WorkerProcess, make_settings, run_cli, unique_tag

pytestmark = pytest.mark.slow

WAIT_S = 60


# ------------------------------------------------------------------------------------------------ helpers


async def publish(settings: Settings, bodies: list[dict[str, Any]]) -> list[MemoryEvent]:
    async with MemoryPublisher(settings) as pub:
        events = [await pub.publish_one(body) for body in bodies]
        await pub.flush()
    return events


async def ingest_everything(settings: Settings, done: dict[int, int] | None = None) -> int:
    """The worker's ingest processor over the events topic (embedded topic, stores, change feed).

    ``done`` (partition -> next offset) is where a previous call stopped, updated here: like a committed group.
    """
    done = {} if done is None else done
    runtime = await Runtime.open(settings)
    seen = 0
    try:
        async with await LogReader.open(settings, settings.topics.events) as reader:
            await reader.seek(StartAt(offsets=dict(done)))
            async for window in reader.read_to_end():
                await runtime.ingest.process(window)
                seen += len(window)
                for r in window:
                    done[r.partition] = max(done.get(r.partition, 0), r.offset + 1)
    finally:
        await runtime.close()
    return seen


def adds(tag: str, user: str, n: int, first: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "user_id": user,
            "memory_id": f"m{i}-{tag}",
            "text": f"{user} remembers fact {i} of {tag}",
            "metadata": {"i": i},
        }
        for i in range(first, first + n)
    ]


async def states(settings: Settings) -> tuple[dict[str, StoreState], dict[str, StoreState]]:
    stores = await Stores.open(settings)
    try:
        return await stores.vectors.states(), await stores.cache.states()
    finally:
        await stores.close()


async def drop_everything(settings: Settings) -> None:
    """Lose both stores: the LanceDB directory and every Redis key of this deployment's prefix."""
    shutil.rmtree(settings.lancedb_path, ignore_errors=True)
    client = aioredis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


def cli_json(result: Any, rc: int = 0) -> Any:
    assert result.rc == rc, str(result)
    return result.json()


# ------------------------------------------------------------------------------------------------ tests


async def test_rebuild_after_losing_both_stores_restores_every_memory_at_its_version(settings: Settings) -> None:
    tag = unique_tag()
    bodies = adds(tag, "ann", 60)
    bodies += [{**b, "op": "update", "text": b["text"] + " (revised)"} for b in bodies[:20]]
    bodies += [{"op": "delete", "memory_id": b["memory_id"], "user_id": "ann"} for b in bodies[20:30]]
    await publish(settings, bodies)
    assert await ingest_everything(settings) == len(bodies)
    durable_before, cached_before = await states(settings)
    assert len(durable_before) == 60 and durable_before == cached_before
    assert sum(s.deleted for s in durable_before.values()) == 10

    await drop_everything(settings)
    rebuilt = cli_json(await run_cli(settings, "rebuild", "--json"))
    assert rebuilt["switched"] is True and rebuilt["source"] == "embedded", rebuilt
    assert rebuilt["first_pass"]["reembedded"] == 0 and rebuilt["first_pass"]["changes_emitted"] == 0, rebuilt
    assert rebuilt["built"]["number"] == 1 and rebuilt["verify"]["consistent"] is True, rebuilt

    report = cli_json(await run_cli(settings, "verify", "--json"))
    assert report["consistent"] is True and report["live_memories"] == 50 and report["tombstones"] == 10, report
    durable_after, cached_after = await states(settings)
    assert durable_after == durable_before  # the same memories at the same versions, content hashes, tombstones
    assert cached_after == cached_before
    async with MemoryReader(settings) as reader:  # readers resolve the new generation through the pointer
        hits = await reader.search(bodies[0]["text"] + " (revised)", user_id="ann", k=1)
        assert hits[0].row.memory_id == bodies[0]["memory_id"]


@pytest.mark.parametrize("flush_rows", [FLUSH_ROWS, 3], ids=["one-append", "flushed-every-3-memories"])
async def test_rebuild_keeps_only_the_newest_state_of_memories_spread_over_many_batches(
    settings: Settings, flush_rows: int
) -> None:
    """A memory's events far apart in the log (windows of 4 records): updated, deleted, re-added; another deleted
    for good; a third whose highest version comes first in the log. The build appends without merging, so
    only its fold decides: one row per memory, the newest state, no tombstone resurrected, in both stores.
    ``flush_rows=3`` makes it append part-way and delete the rows a later window beat."""
    tag = unique_tag()
    filler = iter(adds(tag, "bob", 80))
    spread = f"spread-{tag}"
    gone = f"gone-{tag}"
    late = f"late-{tag}"
    bodies: list[dict[str, Any]] = []

    def body(**fields: Any) -> None:
        bodies.append({"user_id": "ann", **fields})
        bodies.extend(next(filler) for _ in range(10))  # pushes the memory's next event into later windows

    body(memory_id=spread, text="spread v1")
    body(memory_id=gone, text="gone v1")
    body(memory_id=late, op="update", text="late, the newest", version=9_000_000_000_000_000)
    body(memory_id=spread, op="update", text="spread v2")
    body(memory_id=gone, op="delete")
    body(memory_id=spread, op="delete")
    body(memory_id=late, op="update", text="late, an older version read later", version=1)
    body(memory_id=spread, text="spread re-added")
    await publish(settings, bodies)
    assert await ingest_everything(settings) == len(bodies)
    durable_before, cached_before = await states(settings)
    assert durable_before == cached_before

    await drop_everything(settings)
    result = await rebuild(settings, window=4, flush_rows=flush_rows, catch_up_grace_s=0)
    assert result.switched and result.verify["consistent"], result.to_dict()
    assert result.first_pass.records == len(bodies) and result.first_pass.reembedded == 0, result.to_dict()

    stores = await Stores.open(settings)
    try:
        assert stores.generation is not None and stores.generation.number == 1
        durable, cached = await stores.vectors.states(), await stores.cache.states()
        assert await stores.vectors.count(live_only=False) == len(durable) == 83  # one row per memory
        assert await stores.vectors.duplicates() == set()
        rows = {r.memory_id: r for r in await stores.vectors.get([f"default/{m}" for m in (spread, gone, late)])}
        cached_rows = await stores.cache.get([f"default/{m}" for m in (spread, gone, late)])
    finally:
        await stores.close()
    assert durable == durable_before and cached == cached_before  # what the version-guarded worker left
    assert not rows[spread].deleted and rows[spread].text == "spread re-added"
    assert rows[gone].deleted  # the delete is not undone by the add that came before it
    assert rows[late].text == "late, the newest" and rows[late].version == 9_000_000_000_000_000
    assert [(r.text, r.deleted) for r in cached_rows if r is not None] == [
        ("spread re-added", False),
        ("", True),
        ("late, the newest", False),
    ]


async def test_replay_from_a_timestamp_restores_only_what_came_after_it(settings: Settings) -> None:
    tag = unique_tag()
    early = adds(tag, "bo", 30)
    await publish(settings, early)
    done: dict[int, int] = {}
    await ingest_everything(settings, done)
    await asyncio.sleep(0.1)
    cut_ms = int(time.time() * 1000)
    await asyncio.sleep(0.1)
    late = adds(tag, "bo", 10, first=30) + [
        {**b, "op": "update", "text": "now changed " + b["text"]} for b in early[:5]
    ]
    late_events = await publish(settings, late)
    assert await ingest_everything(settings, done) == len(late)
    durable_full, _ = await states(settings)

    await drop_everything(settings)
    figures = cli_json(await run_cli(settings, "replay", "--from", str(cut_ms), "--json"))
    assert figures["replayed"] == len(late), figures
    assert figures["applied"] == len(late) and figures["changes_emitted"] == len(late), figures
    durable, cached = await states(settings)
    assert set(durable) == {f"default/{e.memory_id}" for e in late_events}  # nothing from before the cut
    assert durable == cached
    assert all(durable[m] == durable_full[m] for m in durable)  # and what came after, at its latest version

    # the same range again changes nothing: replaying over live data is harmless
    again = cli_json(await run_cli(settings, "replay", "--from", str(cut_ms), "--json"))
    assert (again["applied"], again["current"], again["changes_emitted"]) == (0, len(late), 0), again
    # a scoped replay from the beginning only touches that user's memories
    scoped = cli_json(await run_cli(settings, "replay", "--user", "nobody", "--json"))
    assert scoped["replayed"] == 0 and scoped["outside_scope"] == scoped["records"] > 0, scoped


async def test_migration_to_another_embedder_builds_a_table_of_the_new_dimension(settings: Settings) -> None:
    tag = unique_tag()
    bodies = [*adds(tag, "cy", 40), {"op": "delete", "memory_id": f"m0-{tag}", "user_id": "cy"}]
    await publish(settings, bodies)
    await ingest_everything(settings)
    old_ids = set((await states(settings))[0])

    moved = cli_json(await run_cli(settings, "migrate", "--to", "hash", "--hash-dim", "64", "--json"))
    assert moved["switched"] is True and moved["source"] == "events", moved
    assert (moved["built"]["model"], moved["built"]["dim"]) == ("hash-64", 64), moved
    assert moved["first_pass"]["reembedded"] == 40, moved  # every add, not the delete

    db = await lancedb.connect_async(settings.lancedb_path)
    table = await db.open_table(moved["built"]["table"])
    schema = await table.schema()
    assert schema.field("vector").type.list_size == 64
    assert (schema.metadata or {})[b"memstream.model"] == b"hash-64"
    rows = (await table.query().select(["memory_key"]).to_arrow()).column("memory_key").to_pylist()
    assert set(rows) == old_ids and len(rows) == len(old_ids)  # memory keys: <tenant>/<memory id>
    old = await db.open_table(settings.lancedb_table)  # the previous generation is kept, untouched
    assert (await old.schema()).field("vector").type.list_size == 384

    # a reader still configured with the old model fails clearly; one with the new model works
    stale = await run_cli(settings, "search", "fact 3", "--user", "cy", "--json")
    assert stale.rc == 1 and "hash-64" in stale.stderr and "hash-384" in stale.stderr, str(stale)
    fresh = cli_json(await run_cli(settings.with_(hash_dim=64), "search", bodies[3]["text"], "--user", "cy", "--json"))
    assert fresh[0]["memory_id"] == f"m3-{tag}"
    pointer = await ActivePointer.connect(settings.lancedb_path, settings.lancedb_table, settings.redis_prefix)
    assert (await pointer.active()).dim == 64


async def test_change_feed_iterator_commits_and_redelivers_what_was_not_committed(settings: Settings) -> None:
    tag = unique_tag()
    await publish(settings, adds(tag, "di", 30))
    await ingest_everything(settings)
    group = f"feed-{tag}"
    # short session and rebalance timeouts: Tansu makes the second member wait for them (25 s -> 11 s measured)
    quick = {"session_timeout_ms": 3_000, "rebalance_timeout_ms": 3_000, "heartbeat_interval_ms": 500}
    async with ChangeFeed(settings, group_id=group, follow=False, **quick) as feed:
        first: list[str] = []
        async for item in feed:
            first.append(item.change.memory_id)
            if len(first) == 10:
                await feed.commit()
                break
    assert len(first) == 10
    async with ChangeFeed(settings, group_id=group, follow=False, idle_timeout_s=2.0, **quick) as feed:
        rest = [item.change.memory_id async for item in feed]
    assert set(first).isdisjoint(rest) and set(first) | set(rest) == {f"m{i}-{tag}" for i in range(30)}


# ------------------------------------------------------------------------------------------------ with the worker


@pytest.fixture
def worker(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> Iterator[WorkerProcess]:
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url, pointer_check_ms=200)
    proc = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        yield proc
    finally:
        proc.interrupt()
        code, _ = proc.wait_stopped()
        assert code == 0, proc.log_tail()
        assert "Traceback" not in proc.log(), proc.log_tail()


async def test_tail_shows_every_change_in_per_memory_order_and_the_worker_follows_a_rebuild(
    worker: WorkerProcess,
) -> None:
    settings, tag = worker.settings, unique_tag()
    ids = [f"m{i}-{tag}" for i in range(24)]
    rounds = [
        adds(tag, "ed", 24),
        [{"op": "update", "memory_id": m, "user_id": "ed", "text": f"second text of {m}"} for m in ids],
        [{"op": "delete", "memory_id": m, "user_id": "ed"} for m in ids[::2]],
    ]
    published: dict[str, list[int]] = {m: [] for m in ids}
    stores = await Stores.open(settings)
    try:
        for bodies in rounds:  # one round at a time: each change is applied (not superseded in its window)
            events = await publish(settings, bodies)
            assert await wait_until_materialized(stores, events, timeout=WAIT_S) == [], worker.log_tail()
            for e in events:
                published[e.memory_id].append(e.version)
    finally:
        await stores.close()

    tail = await run_cli(settings, "tail", "--user", "ed")
    assert tail.rc == 0, str(tail)
    seen: dict[str, list[int]] = {m: [] for m in ids}
    ops: dict[str, list[str]] = {m: [] for m in ids}
    for line in tail.stdout.splitlines():
        change = orjson.loads(line)
        seen[change["memory_id"]].append(change["version"])
        ops[change["memory_id"]].append(change["op"])
        assert change["feed"]["topic"] == settings.topics.changes and change["stores"] == ["redis"]  # the live path
        assert change["indexed_after"]["topic"] == settings.topics.embedded  # in LanceDB once the sink passed it
    assert seen == published  # every change, exactly once, in the order it was published, per memory
    assert ops[ids[0]] == ["add", "update", "delete"] and ops[ids[1]] == ["add", "update"]
    assert (await run_cli(settings, "tail", "--user", "nobody")).stdout == ""

    # rebuild under the running worker: it follows the switch, so new events land in the new generation; a
    # reader opened before the switch follows it too, and its cached results (L1 and Redis) do not outlive it
    query = f"ed remembers fact 100 of {tag}"
    async with MemoryReader(settings) as reader:
        before = await reader.search(query, user_id="ed", tenant_id="default", k=20)
        assert f"m100-{tag}" not in {h.row.memory_id for h in before}
        assert await reader.search(query, user_id="ed", tenant_id="default", k=20) == before  # now cached
        rebuilt = cli_json(await run_cli(settings, "rebuild", "--json"))
        assert rebuilt["switched"] is True and rebuilt["verify"]["live_memories"] == 12, rebuilt
        more = await publish(settings, adds(tag, "ed", 5, first=100))
        stores = await Stores.open(settings)
        try:
            assert stores.generation is not None and stores.generation.number == 1
            assert await wait_until_materialized(stores, more, timeout=WAIT_S) == [], worker.log_tail()
        finally:
            await stores.close()
        await asyncio.sleep(settings.pointer_check_ms / 1000)
        after = await reader.search(query, user_id="ed", tenant_id="default", k=20)
        assert after[0].row.memory_id == f"m100-{tag}", [h.row.memory_id for h in after]
        assert reader.stores.generation is not None and reader.stores.generation.number == 1
    assert "following the switch to generation 1" in worker.log()
    report = cli_json(await run_cli(settings, "verify", "--json"))
    assert report["consistent"] is True and report["live_memories"] == 17, report


async def test_stores_of_the_old_model_refuse_to_follow_a_switch_until_restarted(settings: Settings) -> None:
    """What a worker of the old model meets after a migration: a retriable error, on every window, naming the model."""
    old = await Stores.open(settings)  # generation 0, hash-384
    pointer = await ActivePointer.connect(settings.lancedb_path, settings.lancedb_table, settings.redis_prefix)
    target = settings.with_(hash_dim=64)
    new = generation(settings.lancedb_table, settings.redis_prefix, await pointer.next_number())
    built = await Stores.open(target, new)  # creates the hash-64 table of generation 1
    await built.close()
    await pointer.switch(Generation(new.number, new.table, new.redis_prefix, "hash-64", 64))
    try:
        with pytest.raises(StoreError, match="hash-64") as caught:
            await old.follow_active(max_age_s=0.0)
        assert caught.value.retriable
        with pytest.raises(StoreError, match="hash-64"):  # well within MEMSTREAM_POINTER_CHECK_MS: checked again
            await old.follow_active()
        assert old.generation is not None and old.generation.number == 0  # still writing nowhere new
    finally:
        await old.close()
    fresh = await Stores.open(target)  # a process started with the new model follows the pointer
    try:
        assert fresh.generation is not None and (fresh.generation.number, fresh.vectors.dim) == (1, 64)
    finally:
        await fresh.close()
