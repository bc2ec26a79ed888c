"""LanceDB on an S3 API (issue 26): the memory pipeline with its durable store in a bucket, not a directory.

The session broker and Redis, moto's standalone S3 server on a free port (conftest.s3_server, a bucket per
module) and `memstream worker` as a child process (the default shape: ingest and index sink as processes of their
own, each given the storage options through MEMSTREAM_LANCEDB_STORAGE_OPTIONS). The checks read the bucket through
the S3 API and the table through LanceDB on S3: nothing lands on local disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.history_store import history_table_name
from infra.lance_store import LanceVectorStore
from processors.model import ScopeQuery
from streams.runtime.stores import Stores
from streams.surface.api import MemoryReader
from tests.integration.helpers import (
    CliResult,
    S3Server,
    WorkerProcess,
    lance_rows,
    make_settings,
    run_cli,
    unique_tag,
    write_jsonl,
)
from tests.integration.test_stores import DIM, row

pytestmark = pytest.mark.slow

WAIT_S = 90  # `publish --wait`: the worker needs ~15 s to start, and every LanceDB commit is a few S3 requests
PREFIX = "memstream"  # the LanceDB location inside the module's bucket: s3://<bucket>/memstream


@dataclasses.dataclass
class S3Stack:
    worker: WorkerProcess
    s3: S3Server
    bucket: str


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str, s3_server: S3Server
) -> Iterator[S3Stack]:
    """`memstream worker` with LanceDB at s3://<a new bucket>/memstream; stopped with SIGINT (exit 0, no errors)."""
    base = tmp_path_factory.mktemp("s3-worker")
    bucket = s3_server.create_bucket()
    settings = make_settings(
        base / "home",
        kafka_bootstrap,
        redis_url,
        lancedb_uri=f"s3://{bucket}/{PREFIX}",
        lancedb_storage_options=json.dumps(s3_server.storage_options()),
        read_hot_vectors_mb=0,  # every search of the reader below goes to LanceDB, none to a copy in memory
    )
    proc = WorkerProcess(settings, base / "worker.log").start()
    try:
        yield S3Stack(proc, s3_server, bucket)
    finally:
        proc.interrupt()
        code, _ = proc.wait_stopped()
    assert code == 0, proc.log_tail()
    log = proc.log()
    assert "Traceback" not in log and "[ERROR]" not in log and "maintenance failed" not in log, proc.log_tail(80)


def ok(result: CliResult, worker: WorkerProcess, rc: int = 0) -> Any:
    assert result.rc == rc, f"`memstream {' '.join(result.args)}`: {result}\n--- worker log\n{worker.log_tail()}"
    return result.json()


async def test_the_pipeline_indexes_searches_and_verifies_on_s3(stack: S3Stack, tmp_path: Path) -> None:
    """`publish --wait --indexed` returns once the sink committed to the bucket; LanceDB read back from S3 holds
    one row per memory (final text, tombstones), `verify` finds both stores consistent, search over the reader
    finds each live memory first and no deleted one, and the sink's idle compaction runs on S3 too."""
    settings, tag = stack.worker.settings, unique_tag()
    tenant, users = f"s3-{tag}", [f"a{tag}", f"b{tag}"]
    owner = {f"m{i}-{tag}": users[i % 2] for i in range(40)}
    texts = {m: f"{owner[m]} keeps note {i} about the {tag} otter harbour k{i}z" for i, m in enumerate(owner)}
    updated = {
        m: f"{owner[m]} now writes note {i} on the {tag} heron quarry k{i}z" for i, m in enumerate(owner) if i < 5
    }
    deleted = [f"m{i}-{tag}" for i in range(35, 40)]
    lines: list[dict[str, Any]] = [
        *({"tenant_id": tenant, "user_id": owner[m], "memory_id": m, "text": t} for m, t in texts.items()),
        *(
            {"op": "update", "tenant_id": tenant, "user_id": owner[m], "memory_id": m, "text": t}
            for m, t in updated.items()
        ),
        *({"op": "delete", "tenant_id": tenant, "user_id": owner[m], "memory_id": m} for m in deleted),
    ]
    final = {**texts, **updated}
    live = {m: t for m, t in final.items() if m not in deleted}

    path = write_jsonl(tmp_path / "memories.jsonl", lines)
    args = ("publish", str(path), "--wait", "--indexed", "--timeout", str(WAIT_S), "--json")
    report = ok(await run_cli(settings, *args, timeout=WAIT_S + 30), stack.worker)
    assert report["accepted"] == len(lines) and report["materialized"] == len(final), report

    # the tables are objects in the bucket (manifests and data files), and there is no LanceDB folder on disk
    keys = stack.s3.keys(stack.bucket, f"{PREFIX}/")
    table, history = (
        f"{PREFIX}/{settings.lancedb_table}.lance/",
        f"{PREFIX}/{history_table_name(settings.lancedb_table)}.lance/",
    )
    assert any(k.startswith(f"{table}_versions/") for k in keys), keys[:20]
    assert any(k.startswith(f"{table}data/") for k in keys), keys[:20]
    assert any(k.startswith(history) for k in keys), keys[:20]
    assert not (settings.home / "lancedb").exists()

    rows = {r["memory_id"]: r for r in await lance_rows(settings, f"tenant_id = '{tenant}'")}
    assert len(rows) == len(final) and set(rows) == set(final), "one LanceDB row per memory"
    for memory_id, text in final.items():
        assert rows[memory_id]["deleted"] is (memory_id in deleted), memory_id
        assert rows[memory_id]["text"] == ("" if memory_id in deleted else text), memory_id

    verified = ok(await run_cli(settings, "verify", "--tenant", tenant, "--json"), stack.worker)
    assert verified["consistent"] is True, verified
    assert (verified["live_memories"], verified["tombstones"]) == (len(live), len(deleted)), verified
    assert verified["lancedb_memories"] == verified["redis_memories"] == len(final), verified

    async with MemoryReader(settings) as reader:
        for memory_id, text in live.items():
            hits = await reader.search(text, user_id=owner[memory_id], tenant_id=tenant, k=3)
            assert hits and hits[0].row.memory_id == memory_id, (text, [h.row.text for h in hits])
            assert hits[0].score > 0.999
        for memory_id in deleted:
            hits = await reader.search(texts[memory_id], user_id=owner[memory_id], tenant_id=tenant, k=10)
            assert memory_id not in {h.row.memory_id for h in hits}, memory_id
        for memory_id, text in updated.items():  # the old text is gone from the store
            hits = await reader.search(texts[memory_id], user_id=owner[memory_id], tenant_id=tenant, k=10)
            assert texts[memory_id] not in {h.row.text for h in hits}, memory_id
            got = await reader.get(memory_id, tenant_id=tenant)
            assert got is not None and got.text == text

    # idle, the sink brings the table up to date on S3: indexes, compaction, old versions removed
    await stack.worker.wait_for_log("LanceDB compacted between batches", timeout=60)
    assert "maintenance failed" not in stack.worker.log(), stack.worker.log_tail()


async def test_reconcile_repairs_a_tampered_store_on_s3(stack: S3Stack, tmp_path: Path) -> None:
    """Redis forgets memories, LanceDB on S3 loses one, Redis gains a ghost: `verify` sees it, `reconcile --wait`
    repairs both stores from the log (the LanceDB row written back to the bucket), and `verify` agrees after."""
    settings, tag = stack.worker.settings, unique_tag()
    user = f"u{tag}"
    lines = [{"user_id": user, "memory_id": f"{tag}-{i}", "text": f"memory {i} of {tag}"} for i in range(30)]
    lines.append({"op": "update", "user_id": user, "memory_id": f"{tag}-0", "text": "updated"})
    path = str(write_jsonl(tmp_path / "m.jsonl", lines))
    ok(
        await run_cli(settings, "publish", path, "--wait", "--indexed", "--timeout", str(WAIT_S), "--json"),
        stack.worker,
    )

    stores = await Stores.open(settings)
    try:
        await stores.redis.delete(*[stores.cache.memory_key(f"default/{tag}-{i}") for i in range(3)])
        await stores.vectors.delete_ids([f"default/{tag}-10"])
        [row] = await stores.vectors.get([f"default/{tag}-11"])
        await stores.cache.apply([dataclasses.replace(row, memory_id=f"{tag}-ghost", updated_at=1)])
    finally:
        await stores.close()
    broken = await run_cli(settings, "verify", "--user", user, "--json")
    assert broken.rc == 1 and not broken.json()["consistent"], str(broken)

    args = ("reconcile", "--user", user, "--wait", "--timeout", str(WAIT_S), "--json")
    report = ok(await run_cli(settings, *args, timeout=WAIT_S + 30), stack.worker)
    counts = report["counts"]
    assert report["consistent"], report
    assert (counts["redis_missing"], counts["lancedb_missing"], counts["redis_orphaned"]) == (3, 1, 1), counts
    assert counts["repaired"] == 5 and counts["unrepaired"] == 0, counts

    fixed = ok(await run_cli(settings, "verify", "--user", user, "--json"), stack.worker)
    assert fixed["consistent"] and fixed["live_memories"] == 30, fixed
    [back] = await lance_rows(settings, f"memory_id = '{tag}-10'")  # read from the bucket, not through memstream
    assert (back["text"], back["deleted"]) == ("memory 10 of " + tag, False)
    stores = await Stores.open(settings)
    try:
        scope = ScopeQuery(user_id=user)
        assert await stores.vectors.states(scope) == await stores.cache.states(scope)
    finally:
        await stores.close()


async def test_writers_racing_on_s3_lose_no_commit(s3_server: S3Server) -> None:
    """memstream keeps one writer per table; should a second one write by mistake (two sinks, a repair beside the
    sink), Lance's commit is a conditional PUT of the next manifest (If-None-Match: *): S3 refuses the loser's
    (412 in the server's log), which commits again on top, so every writer's rows are kept."""
    bucket = s3_server.create_bucket()
    uri, options = f"s3://{bucket}/{PREFIX}", s3_server.storage_options()

    async def open_store() -> LanceVectorStore:
        return await LanceVectorStore.open(
            uri, "m", model="test", dim=DIM, background_maintenance=False, storage_options=options
        )

    first = await open_store()
    await first.upsert([row("seed", 1)])
    expected, refused = 1, 0
    for attempt in range(3):  # until two commits met (they nearly always do in the first round)
        writers = [await open_store() for _ in range(6)]
        batches = [[row(f"w{attempt}-{i}-{j}", 1) for j in range(50)] for i in range(len(writers))]
        await asyncio.gather(*(w.upsert(b) for w, b in zip(writers, batches, strict=True)))
        expected += sum(len(b) for b in batches)
        log = s3_server.log_path.read_text(errors="replace").splitlines()
        refused = sum(1 for line in log if f"PUT /{bucket}/" in line and "_versions/" in line and '" 412' in line)
        if refused:
            break
    assert refused > 0, "no two commits met: the race was not run"
    assert await first.count(live_only=False) == expected
