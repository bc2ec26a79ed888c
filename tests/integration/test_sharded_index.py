"""The sharded index (MEMSTREAM_INDEX_SHARDS, issue 26 item 3) on real LanceDB, Redis and broker: each memory in
exactly the shard its partition feeds, reads across the shards equal to one table's, a mismatched count refused,
`memstream worker` with one sink per shard, and a shard's owning sink SIGKILLed mid-stream while its standby takes
over (0 lost, 0 duplicated, 0 stale)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import lancedb
import numpy as np
import pytest

from infra.lance_store import LanceVectorStore
from infra.redis_store import IndexProgress, connect
from infra.settings import Settings
from infra.sharded_store import ShardedVectorStore, shard_table, shards_of_keys
from processors.model import MemoryRow, ScopeQuery
from schemas.errors import ConfigError
from schemas.events import Scope
from streams.runtime.stores import Stores, open_index
from streams.surface.api import MemoryReader
from streams.tools.chaos import ChaosConfig, as_records, converge, publish_paced, workload
from tests.integration.helpers import WorkerProcess, make_settings, run_cli, wait_for, write_jsonl

DIM = 8
WAIT_S = 120.0


def row(memory_id: str, user: str, seed: int, *, version: int = 1) -> MemoryRow:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype("<f4")
    vector /= np.linalg.norm(vector)
    return MemoryRow(
        memory_id,
        Scope("acme", user, "agent", None),
        f"text {memory_id}",
        {},
        version,
        f"e{version}",
        "h",
        False,
        seed,
        vector=vector.tobytes(),
    )


async def table_keys(uri: Path, table: str) -> set[str]:
    db = await lancedb.connect_async(str(uri))
    found = await (await db.open_table(table)).query().select(["memory_key"]).to_arrow()
    return set(found.column("memory_key").to_pylist())


async def test_reads_across_shards_equal_one_tables(tmp_path: Path, settings: Settings) -> None:
    settings = settings.with_(lancedb_uri=str(tmp_path / "lance"), index_shards=2, partitions=4)
    rows = [row(f"m{i}", f"u{i % 3}", seed=i) for i in range(120)]
    sharded = await open_index(settings, "mem", "test", DIM, sink=False, shards=2)
    single = await LanceVectorStore.open(str(tmp_path / "one"), "mem", model="test", dim=DIM)
    assert isinstance(sharded, ShardedVectorStore)
    await sharded.upsert(rows)
    await single.upsert(rows)
    try:
        # each memory in exactly the shard its partition (murmur2 of the memory id, 4 partitions) feeds
        held = [await table_keys(tmp_path / "lance", shard_table("mem", i, 2)) for i in range(2)]
        assert held[0] and held[1] and not held[0] & held[1]
        want = shards_of_keys([r.memory_id for r in rows], 2, 4)
        assert all(r.key in held[s] for r, s in zip(rows, want, strict=True))

        scope = ScopeQuery("acme", "u1")
        query = np.frombuffer(rows[4].vector, dtype="<f4")
        for k in (1, 5, 50):
            got = [(h.row.key, round(h.score, 5)) for h in await sharded.search(query, scope, k)]
            one = [(h.row.key, round(h.score, 5)) for h in await single.search(query, scope, k)]
            assert got == one
        keys = ["acme/m3", "acme/m77", "acme/nope", "acme/m10"]
        assert [r.key for r in await sharded.get(keys)] == [r.key for r in await single.get(keys)]
        assert await sharded.owners(keys) == await single.owners(keys)
        page, after = [], None
        while True:  # a listing walked page by page: every memory once, in id order
            got_page = await sharded.page_rows(scope, after, 7)
            assert got_page == await single.page_rows(scope, after, 7)
            if not got_page:
                break
            page += got_page
            after = got_page[-1].memory_id
        assert [r.memory_id for r in page] == sorted(r.memory_id for r in rows if r.scope.user_id == "u1")
        assert await sharded.states() == await single.states()
        assert await sharded.count() == await single.count() == 120
        assert await sharded.scope_users(ScopeQuery("acme")) == ["u0", "u1", "u2"]
        # a warm's columns: the same users, keys, versions and vectors as one table's, in (user, key) order
        tenant = ScopeQuery("acme")
        ours, theirs = await sharded.users_columns(tenant, 1000), await single.users_columns(tenant, 1000)
        assert ours is not None and theirs is not None and len(ours) == len(theirs) == 120
        assert ours.user_spans() == theirs.user_spans()
        assert list(ours.keys) == list(theirs.keys) and list(ours.versions) == list(theirs.versions)
        assert np.array_equal(ours.vectors[ours.positions], theirs.vectors[theirs.positions])
        assert await sharded.users_columns(tenant, 119) is None  # more rows than asked for, over the shards
        # BM25 scores per shard (its own term statistics): the orders are the sharded full-text search's, rowless
        orders = await sharded.text_search_orders("text", scope, 5)
        hits = await sharded.text_search("text", scope, 5)
        assert len(orders) == 5 and [(o[0], o[1], round(o[3], 5)) for o in orders] == [
            (h.row.key, h.row.version, round(h.score, 5)) for h in hits
        ]
        assert await sharded.misplaced() == {}
    finally:
        await sharded.close()
        await single.close()


async def test_a_process_with_another_shard_count_is_refused(tmp_path: Path, settings: Settings) -> None:
    sharded = settings.with_(lancedb_uri=str(tmp_path / "lance"), index_shards=2)
    stores = await Stores.open(sharded)
    await stores.close()
    with pytest.raises(ConfigError, match=r"MEMSTREAM_INDEX_SHARDS=1 memstream rebuild"):
        await Stores.open(sharded.with_(index_shards=1))
    result = await run_cli(sharded.with_(index_shards=1), "verify", "--json")
    assert result.rc != 0 and "memstream rebuild" in result.stderr + result.stdout, result


def sharded(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> Settings:
    return make_settings(tmp_path / "home", kafka_bootstrap, redis_url, partitions=4, index_shards=2)


async def rows_per_shard(settings: Settings) -> list[int]:
    db = await lancedb.connect_async(settings.lancedb_path)
    return [await (await db.open_table(shard_table(settings.lancedb_table, i, 2))).count_rows() for i in range(2)]


async def test_the_worker_runs_a_sink_per_shard_and_reads_span_both(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    settings = sharded(tmp_path, kafka_bootstrap, redis_url)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()  # role all: ingest, sink-0, sink-1
    try:
        await worker.wait_for_log("child sink-1 started", timeout=WAIT_S)
        lines = [{"memory_id": f"m{i}", "user_id": f"u{i % 4}", "text": f"fact {i} about owls"} for i in range(200)]
        published = await run_cli(
            settings, "publish", str(write_jsonl(tmp_path / "a.jsonl", lines)), "--wait", "--indexed", "--json"
        )
        assert published.rc == 0 and published.json()["materialized"] == 200, published
        counts = await rows_per_shard(settings)
        assert sum(counts) == 200 and min(counts) > 0, counts
        figures = (await run_cli(settings, "stats", "--json")).json()
        assert figures["index_shards"] == 2 and [figures["lancedb_rows_s0"], figures["lancedb_rows_s1"]] == counts
        assert figures["lancedb_rows"] == 200, figures
        assert "owns" in worker.log() and ".index.s0of2" in worker.log() and ".index.s1of2" in worker.log()

        async with MemoryReader(settings) as reader:
            assert isinstance(reader.stores.vectors, ShardedVectorStore)
            for i in (3, 4):  # one memory of each shard, at least
                hits = await reader.search(f"fact {i} about owls", user_id=f"u{i % 4}", k=3)
                assert hits[0].row.memory_id == f"m{i}" and hits[0].score > 0.999
            got = await reader.get("m7")
            assert got is not None and got.text == "fact 7 about owls"
            block = await reader.context(user_id="u1", budget=100_000)
            assert sorted(block.memory_ids) == sorted(f"m{i}" for i in range(200) if i % 4 == 1)
            listing = await reader.stores.vectors.page_rows(ScopeQuery("default", "u2"), None, None)
            assert [r.memory_id for r in listing] == sorted(f"m{i}" for i in range(200) if i % 4 == 2)
        verified = (await run_cli(settings, "verify", "--json")).json()
        assert verified["consistent"] is True and verified["lancedb_memories"] == 200, verified

        # a row lost from each shard's table (deleted behind memstream's back): reconcile writes each back into
        # its own shard, read from the log
        db = await lancedb.connect_async(settings.lancedb_path)
        lost = {}
        for i in range(2):
            table = await db.open_table(shard_table(settings.lancedb_table, i, 2))
            [key] = (await table.query().select(["memory_key"]).limit(1).to_arrow()).column("memory_key").to_pylist()
            await table.delete(f"memory_key = '{key}'")
            lost[key] = i
        assert (await run_cli(settings, "verify", "--json")).json()["consistent"] is False
        repaired = await run_cli(settings, "reconcile", "--wait", "--timeout", str(WAIT_S), "--json")
        assert repaired.rc == 0 and repaired.json()["counts"]["lancedb_missing"] == 2, repaired
        for key, i in lost.items():
            assert key in await table_keys(Path(settings.lancedb_path), shard_table(settings.lancedb_table, i, 2))
        verified = (await run_cli(settings, "verify", "--json")).json()
        assert verified["consistent"] is True and verified["lancedb_memories"] == 200, verified
    finally:
        worker.interrupt()
        code, _ = worker.wait_stopped()
    assert code == 0, worker.log_tail()


async def publish_lines(settings: Settings, path: Path, lines: list[dict[str, str]]) -> None:
    result = await run_cli(settings, "publish", str(write_jsonl(path, lines)), "--wait", "--indexed", "--json")
    assert result.rc == 0 and result.json()["materialized"] == len(lines), result


async def test_changing_the_shard_count_is_a_rebuild_into_a_new_generation(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    one = sharded(tmp_path, kafka_bootstrap, redis_url).with_(index_shards=1)
    two = one.with_(index_shards=2)
    lines = [{"memory_id": f"m{i}", "user_id": f"u{i % 3}", "text": f"note {i} on tides"} for i in range(60)]
    worker = WorkerProcess(one, tmp_path / "worker-1.log").start()
    try:
        await worker.wait_for_log("worker ready", timeout=WAIT_S)
        await publish_lines(one, tmp_path / "a.jsonl", lines)
    finally:
        worker.interrupt()
        worker.wait_stopped()
    refused = await run_cli(two, "verify", "--json")
    assert refused.rc != 0 and "MEMSTREAM_INDEX_SHARDS=2 memstream rebuild" in refused.stderr, refused

    rebuilt = await run_cli(two, "rebuild", "--drop-previous", "--json")
    assert rebuilt.rc == 0, rebuilt
    report = rebuilt.json()
    assert report["switched"] is True and report["active"]["table"] == "memories__g1", report
    assert report["dropped_previous"] is True
    db = await lancedb.connect_async(two.lancedb_path)
    assert "memories" not in await db.table_names()  # the one-table generation 0, dropped after the switch
    counts = [await (await db.open_table(f"memories__g1__s{i}of2")).count_rows() for i in range(2)]
    assert sum(counts) == 60 and min(counts) > 0, counts
    verified = (await run_cli(two, "verify", "--json")).json()
    assert verified["consistent"] is True and verified["lancedb_memories"] == 60, verified
    assert "memstream rebuild" in (await run_cli(one, "verify", "--json")).stderr  # the old count, refused now

    worker = WorkerProcess(two, tmp_path / "worker-2.log").start()  # the new count: a sink per shard
    try:
        await worker.wait_for_log("child sink-1 started", timeout=WAIT_S)
        more = [{"memory_id": f"n{i}", "user_id": "u0", "text": f"later note {i}"} for i in range(20)]
        await publish_lines(two, tmp_path / "b.jsonl", more)
    finally:
        worker.interrupt()
        worker.wait_stopped()
    verified = (await run_cli(two, "verify", "--json")).json()
    assert verified["consistent"] is True and verified["lancedb_memories"] == 80, verified


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A condition on the processes' logs as the async probe ``wait_for`` polls."""

    async def probe() -> bool:
        return check()

    return probe


async def shard_indexed(settings: Settings, partitions: list[int]) -> bool:
    """Whether the index sink recorded progress on any of these partitions (a batch of the shard committed)."""
    client = connect(settings.redis_url)
    try:
        done = await IndexProgress(client, settings.redis_prefix).read(settings.topics.embedded)
    finally:
        await client.aclose()
    return any(done.get(p, 0) > 0 for p in partitions)


def ownership(worker: WorkerProcess) -> str | None:
    """``owns`` or ``stands by``: what the sink's last rebalance left it (None: not joined yet)."""
    lines = [line for line in worker.log().splitlines() if "index sink owns" in line or "index sink stands by" in line]
    if not lines:
        return None
    return "owns" if "index sink owns" in lines[-1] else "stands by"


async def test_a_shards_standby_takes_over_from_its_killed_owner_losing_nothing(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    settings = sharded(tmp_path, kafka_bootstrap, redis_url).with_(sink_batch=200, sink_linger_ms=100)
    logs = tmp_path / "logs"
    ingest = WorkerProcess(settings.with_(worker_role="ingest"), logs / "ingest.log")
    sink = {
        name: WorkerProcess(settings.with_(worker_role="sink", index_shard=shard), logs / f"sink-{name}.log")
        for name, shard in (("1", 1), ("0a", 0), ("0b", 0))
    }
    everyone = [ingest, *sink.values()]
    try:
        for proc in everyone:
            proc.start()
        await ingest.wait_for_log("worker ready", timeout=WAIT_S)
        joined = holds(lambda: all(ownership(p) is not None for p in sink.values()))
        await wait_for(joined, timeout=WAIT_S, what="the sinks to join their groups")
        # shard 0: one of its two sinks owns partitions 0 and 2, the other stands by; shard 1's sink owns 1 and 3
        await wait_for(
            holds(lambda: sorted([str(ownership(sink["0a"])), str(ownership(sink["0b"]))]) == ["owns", "stands by"]),
            timeout=WAIT_S,
            what="shard 0's group to settle on one owner",
        )
        assert ownership(sink["1"]) == "owns"
        owner, standby = (sink["0a"], sink["0b"]) if ownership(sink["0a"]) == "owns" else (sink["0b"], sink["0a"])
        embedded = f"{settings.topics.embedded}"
        assert f"{embedded}[0], {embedded}[2]" in owner.log(), owner.log_tail()

        events = workload(ChaosConfig(events=6_000, users=40, seed=11))
        publishing = asyncio.create_task(publish_paced(settings, as_records(events), 800))  # 7.5 s of events
        # mid-stream: once the owner has written some of shard 0 (its log says a batch was indexed)
        await wait_for(lambda: shard_indexed(settings, [0, 2]), timeout=WAIT_S, what="the owner to index a batch")
        taken_before = standby.log().count("index sink owns")
        assert owner.proc is not None and not publishing.done()  # mid-stream: events still arriving
        owner.proc.send_signal(signal.SIGKILL)
        owner.proc.wait()
        await wait_for(
            holds(lambda: standby.log().count("index sink owns") > taken_before),
            timeout=WAIT_S,
            what="the standby to take shard 0 over",
        )
        assert f"{embedded}[0], {embedded}[2]" in standby.log().split("index sink owns")[-1].splitlines()[0]
        await publishing
        found, seconds = await converge(settings, events, timeout=WAIT_S)
        assert found.clean and seconds is not None, found
        assert (found.lost, found.duplicated, found.stale, found.unexpected) == (0, 0, 0, 0)
        counts = await rows_per_shard(settings)
        assert min(counts) > 0 and sum(counts) == found.memories, counts
    finally:
        for proc in everyone:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.interrupt()
                proc.wait_stopped()


pytestmark = pytest.mark.slow
