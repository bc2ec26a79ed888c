"""The index sink apart from the ingest path: searchable before LanceDB holds a memory, one writer, compaction
between batches, and what ``publish --wait`` waits for. Real broker, Redis and LanceDB; workers as processes
(``memstream worker --role ingest`` and ``--role sink``)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import pytest

from infra.faults import inject
from infra.settings import Settings
from streams.runtime.stores import Stores
from streams.surface.api import MemoryReader
from streams.surface.operations import stats
from tests.integration.helpers import WorkerProcess, lance_rows, make_settings, run_cli, wait_for, write_jsonl

pytestmark = pytest.mark.slow

WAIT_S = 90.0


class Roles:
    """An ingest-only worker and a sink-only worker on the same settings; the sink can be stopped and restarted."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.ingest = WorkerProcess(settings.with_(worker_role="ingest"), logs / "ingest.log")
        self.sink: WorkerProcess | None = None
        self.sinks_started = 0

    async def start_ingest(self) -> None:
        self.ingest.start()
        await self.ingest.wait_for_log("worker ready", timeout=WAIT_S)

    async def start_sink(self) -> WorkerProcess:
        self.sinks_started += 1
        self.sink = WorkerProcess(self.settings.with_(worker_role="sink"), self.logs / f"sink-{self.sinks_started}.log")
        self.sink.start()
        await self.sink.wait_for_log("index sink owns", timeout=WAIT_S)
        return self.sink

    def stop_sink(self) -> None:
        if self.sink is not None and self.sink.proc is not None and self.sink.proc.poll() is None:
            self.sink.interrupt()
            code, _ = self.sink.wait_stopped()
            assert code == 0, self.sink.log_tail()

    def kill_sink(self) -> None:
        assert self.sink is not None and self.sink.proc is not None
        self.sink.proc.kill()
        self.sink.proc.wait()

    def stop(self) -> None:
        self.stop_sink()
        self.ingest.interrupt()
        self.ingest.wait_stopped()


@pytest.fixture
def roles(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> Iterator[Roles]:
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url, partitions=2)
    running = Roles(settings, tmp_path / "logs")
    try:
        yield running
    finally:
        running.stop()


async def publish(settings: Settings, path: Path, lines: list[dict[str, Any]], *flags: str) -> dict[str, Any]:
    result = await run_cli(settings, "publish", str(write_jsonl(path, lines)), *flags, "--json")
    body: dict[str, Any] = result.json()
    body["rc"] = result.rc
    return body


async def fresh_tail(settings: Settings) -> int:
    stores = await Stores.open(settings)
    try:
        return await stores.cache.pending_count()
    finally:
        await stores.close()


async def top_hit(settings: Settings, text: str, user: str) -> list[str]:
    async with MemoryReader(settings) as reader:
        hits = await reader.search(text, user_id=user, k=3)
    return [h.row.memory_id for h in hits if h.score > 0.999]


async def test_found_while_the_sink_is_stopped_and_a_tail_tombstone_hides_the_indexed_row(
    roles: Roles, tmp_path: Path
) -> None:
    settings = roles.settings
    await roles.start_ingest()
    await roles.start_sink()
    old = [
        {"memory_id": "gone", "user_id": "ana", "text": "ana keeps bees on the roof"},
        {"memory_id": "kept", "user_id": "ana", "text": "ana plays the cello on sundays"},
    ]
    first = await publish(settings, tmp_path / "old.jsonl", old, "--wait", "--indexed", "--timeout", "60")
    assert first["rc"] == 0 and first["materialized"] == 2, first
    roles.stop_sink()

    later = [
        {"op": "delete", "memory_id": "gone", "user_id": "ana"},
        {"memory_id": "fresh", "user_id": "ana", "text": "ana moved to lisbon in may"},
    ]
    second = await publish(settings, tmp_path / "later.jsonl", later, "--wait", "--timeout", "60")
    assert second["rc"] == 0 and second["materialized"] == 2, second

    # LanceDB still holds the old live row and lacks the new memory: the sink is stopped
    assert [r["deleted"] for r in await lance_rows(settings, "memory_id = 'gone'")] == [False]
    assert await lance_rows(settings, "memory_id = 'fresh'") == []
    assert await fresh_tail(settings) == 2
    assert await top_hit(settings, "ana moved to lisbon in may", "ana") == ["fresh"]  # from the fresh tail
    assert await top_hit(settings, "ana keeps bees on the roof", "ana") == []  # the tail's tombstone hides it
    async with MemoryReader(settings) as reader:
        block = await reader.context(user_id="ana")
        assert sorted(block.memory_ids) == ["fresh", "kept"]
        hybrid = await reader.search("lisbon", user_id="ana", k=5, mode="hybrid")
        assert "fresh" in [h.row.memory_id for h in hybrid] and "gone" not in [h.row.memory_id for h in hybrid]

    await roles.start_sink()
    await wait_for(lambda: _empty(settings), timeout=WAIT_S, what="the sink to empty the fresh tail")
    assert [r["deleted"] for r in await lance_rows(settings, "memory_id = 'gone'")] == [True]
    assert [r["text"] for r in await lance_rows(settings, "memory_id = 'fresh'")] == ["ana moved to lisbon in may"]
    assert await top_hit(settings, "ana moved to lisbon in may", "ana") == ["fresh"]  # now from LanceDB, once
    assert await top_hit(settings, "ana keeps bees on the roof", "ana") == []


async def _empty(settings: Settings) -> bool:
    return await fresh_tail(settings) == 0


async def test_publish_wait_means_searchable_and_indexed_waits_for_lancedb(roles: Roles, tmp_path: Path) -> None:
    settings = roles.settings
    await roles.start_ingest()
    lines = [{"user_id": f"u{i % 5}", "text": f"memory number {i} about kites"} for i in range(50)]
    searchable = await publish(settings, tmp_path / "a.jsonl", lines, "--wait", "--timeout", "60")
    assert searchable["rc"] == 0 and searchable["materialized"] == 50, searchable
    assert await top_hit(settings, "memory number 7 about kites", "u2") != []
    assert await lance_rows(settings, "true") == []  # no sink running: LanceDB holds nothing

    more = [{"user_id": "u1", "text": f"second batch {i}"} for i in range(10)]
    late = await publish(settings, tmp_path / "b.jsonl", more, "--wait", "--indexed", "--timeout", "3")
    assert late["rc"] != 0 and len(late["not_materialized"]) == 10, late  # searchable, but not in LanceDB

    await roles.start_sink()
    indexed = await publish(settings, tmp_path / "c.jsonl", more, "--wait", "--indexed", "--timeout", "60")
    assert indexed["rc"] == 0 and indexed["materialized"] == 10, indexed
    assert len(await lance_rows(settings, "user_id = 'u1'")) >= 10 + 10
    verified = await run_cli(settings, "verify", "--json")
    report = verified.json()
    assert report["consistent"] is True and report["fresh_tail"] == 0, report
    assert report["lancedb_memories"] == report["redis_memories"] == 60


async def test_no_duplicate_row_after_the_sink_is_killed_mid_batch(roles: Roles, tmp_path: Path) -> None:
    """Killed between its LanceDB commit and its offset commit (held there by an injected fault): the one moment at
    which the restarted sink writes a batch LanceDB already holds."""
    settings = roles.settings.with_(sink_batch=1_000, fault_file=str(tmp_path / "faults.json"))
    roles.settings = settings
    roles.ingest = WorkerProcess(settings.with_(worker_role="ingest"), roles.logs / "ingest.log")
    await roles.start_ingest()
    total = 6_000
    lines = [{"memory_id": f"m{i}", "user_id": f"u{i % 40}", "text": f"fact {i} about rivers"} for i in range(total)]
    done = await publish(settings, tmp_path / "bulk.jsonl", lines, "--wait", "--timeout", "120")
    assert done["rc"] == 0 and done["materialized"] == total, done

    inject(settings.fault_file, "sink_commit", 120)  # the first batch is written, then held before its commit
    sink = await roles.start_sink()
    await sink.wait_for_log("between the LanceDB commit and the offset commit", timeout=WAIT_S)
    written = len(await lance_rows(settings, "true"))
    assert 0 < written < total, written
    roles.kill_sink()
    inject(settings.fault_file, "sink_commit", 0)

    # starts again from the last commit: that batch is written a second time (a kill mid-merge, with work in hand,
    # is `memstream chaos --scenario sink-kill`, tests/integration/test_consistency.py)
    await roles.start_sink()
    await wait_for(lambda: _empty(settings), timeout=WAIT_S, what="the sink to catch up after the kill")
    rows = await lance_rows(settings, "true")
    counts = Counter(r["memory_id"] for r in rows)
    assert len(rows) == total and max(counts.values()) == 1, counts.most_common(3)
    verified = (await run_cli(settings, "verify", "--json")).json()
    assert verified["consistent"] is True and verified["lancedb_memories"] == total, verified


async def table_indexes(settings: Settings) -> dict[str, int]:
    """The LanceDB table's indexes, read directly (no memstream code): name -> rows it does not cover."""
    db = await lancedb.connect_async(settings.lancedb_path, read_consistency_interval=timedelta(0))
    table = await db.open_table(settings.lancedb_table)
    unindexed = {}
    for index in await table.list_indices():
        stats = await table.index_stats(index.name)
        unindexed[index.name] = -1 if stats is None else stats.num_unindexed_rows
    return unindexed


async def test_a_bulk_load_is_indexed_once_the_sink_is_idle(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    """Issue 24: a bulk load left the table with no index at all until a commit count came round (and never below
    10,000 rows). 3,000 events in sink batches of at most 500: a few commits, far below every count (optimize_every
    200, sink_optimize_rows 200,000, sink_index_rows 50,000); with no further writes the idle sink builds every
    index, covers every row and compacts."""
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url, sink_batch=500)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    wanted = {f"{column}_idx" for column in ("user_id", "tenant_id", "agent_id", "memory_key", "text")}

    async def up_to_date() -> dict[str, int] | None:
        indexes = await table_indexes(settings)
        if not set(indexes) >= wanted or any(indexes.values()):
            return None
        # and the fresh tail empty: a row the sink indexed before the ingest path's Redis write landed leaves the
        # tail at the sink's next try (processors/indexing.py, clear_ahead), up to half a second after the index;
        # and compacted: a load slow enough for the sink to go idle in the middle of it is compacted at the first
        # idle spell, and what came after at the next one (paced by what the last one cost)
        figures = await stats(settings)
        return indexes if figures["fresh_tail"] == 0 and figures["lancedb_small_fragments"] < 4 else None

    try:
        await worker.wait_for_log("index sink owns", timeout=WAIT_S)
        lines = [{"memory_id": f"m{i}", "user_id": f"u{i % 25}", "text": f"bulk memory {i}"} for i in range(3_000)]
        done = await publish(settings, tmp_path / "bulk.jsonl", lines, "--wait", "--indexed")
        assert done["rc"] == 0 and done["materialized"] == 3_000, done
        indexes = await wait_for(up_to_date, timeout=90, what="every index to cover every row", interval=0.5)
        figures = await stats(settings)  # what `memstream stats` prints
    finally:
        worker.interrupt()
        code, _ = worker.wait_stopped()
    log = worker.log()
    assert code == 0 and "Traceback" not in log and "maintenance failed" not in log, log[-3000:]
    assert set(indexes) >= wanted and all(unindexed == 0 for unindexed in indexes.values()), indexes
    assert figures["lancedb_rows"] == 3_000 and figures["fresh_tail"] == 0, figures
    assert (figures["lancedb_unindexed_rows"], figures["lancedb_missing_indexes"]) == (0, 0), figures
    assert figures["lancedb_small_fragments"] < 4, figures
    assert re.search(r"LanceDB compacted between batches .* \(idle \d+\.\d+s\), indexed to ", log), log[-3000:]


async def test_compaction_runs_between_sink_batches_without_a_conflict(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    settings = make_settings(
        tmp_path / "home",
        kafka_bootstrap,
        redis_url,
        partitions=2,
        sink_batch=250,
        sink_optimize_rows=700,
        optimize_every=4,
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await worker.wait_for_log("index sink owns", timeout=WAIT_S)
        for round_ in range(3):  # updates of the same memories: merges that rewrite rows, deletion files
            lines = [
                {"memory_id": f"m{i}", "user_id": f"u{i % 10}", "text": f"round {round_} of memory {i}"}
                for i in range(1_000)
            ]
            done = await publish(settings, tmp_path / f"r{round_}.jsonl", lines, "--wait", "--indexed")
            assert done["rc"] == 0, done
        await worker.wait_for_log("LanceDB compacted between batches", timeout=WAIT_S)
        stats = (await run_cli(settings, "stats", "--json")).json()
    finally:
        worker.interrupt()
        code, _ = worker.wait_stopped()
    log = worker.log()
    runs = log.count("LanceDB compacted between batches")
    assert runs >= 2, log[-3000:]
    assert "maintenance failed" not in log and "conflict" not in log.lower(), log[-3000:]
    assert code == 0 and "Traceback" not in log
    assert stats["lancedb_live_memories"] == 1_000 and stats["fresh_tail"] == 0, stats
    assert stats["lancedb_fragments"] <= 10, stats  # compaction kept up with the small commits
