"""A restart of the whole embedded stack loses nothing (issue 15).

`memstream down` then `memstream up` (a laptop reboot) empties the memory-only broker's log. LanceDB keeps its
data on disk; here Redis' append-only file is removed as well, the worst case (a cache that forgot). The worker
must refill Redis from LanceDB within seconds of its start, and `rebuild` must keep every memory although the
log it reads is empty.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from infra.services import LocalStack
from infra.settings import Settings
from processors.model import MemoryRow
from schemas.events import Scope
from streams.runtime.stores import Stores, resolve_services
from streams.surface.operations import verify
from tests.integration.helpers import WorkerProcess, run_cli, unique_tag, wait_for, write_jsonl

pytestmark = pytest.mark.slow

MEMORIES = 40


def stack_settings(home: Path) -> Settings:
    """No broker or Redis address: every command and the worker use the embedded stack under ``home``."""
    tag = unique_tag()
    return Settings(
        home=home,
        topic_prefix=f"r{tag}.",
        redis_prefix=f"r{tag}:",
        group_id=f"g{tag}",
        embedder="hash",
        window_ms=20,
        partitions=2,
    )


async def lance_states(settings: Settings) -> dict[str, tuple[int, str, bool]]:
    stores = await Stores.open(resolve_services(settings, start=False))
    try:
        return {m: (s.version, s.event_id, s.deleted) for m, s in (await stores.vectors.states()).items()}
    finally:
        await stores.close()


async def test_down_up_then_verify_is_consistent_and_rebuild_keeps_every_memory(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path / "home")
    stack = LocalStack(settings.home)
    stack.up(kafka_port=None, redis_port=None)
    workers: list[WorkerProcess] = []
    try:
        workers.append(WorkerProcess(settings, tmp_path / "worker-1.log").start())
        lines: list[dict[str, object]] = [
            {"user_id": f"u{i % 4}", "memory_id": f"m{i}", "text": f"memory number {i}"} for i in range(MEMORIES)
        ]
        lines += [{"user_id": "u1", "memory_id": "m1", "op": "update", "text": "memory one, changed"}]
        lines += [{"user_id": "u2", "memory_id": "m2", "op": "delete"}]
        # --indexed: LanceDB is read (and must hold all 40) right after the worker stops
        path = str(write_jsonl(tmp_path / "in.jsonl", lines))
        published = await run_cli(settings, "publish", path, "--wait", "--indexed")
        assert published.rc == 0, published
        workers[0].interrupt()
        assert workers[0].wait_stopped()[0] == 0
        before = await lance_states(settings)
        assert len(before) == MEMORIES and before["default/m2"][2], before

        stack.down()
        shutil.rmtree(settings.home / "redis")  # the cache forgot too: the worst case
        stack.up(kafka_port=None, redis_port=None)
        started = time.monotonic()
        workers.append(WorkerProcess(settings, tmp_path / "worker-2.log").start())
        resolved = resolve_services(settings, start=False)

        async def consistent() -> bool:
            report = await verify(resolved)
            return bool(report["consistent"]) and report["redis_memories"] == report["lancedb_memories"] == MEMORIES

        await wait_for(consistent, timeout=90, what="verify consistent after the restart")
        converged_s = time.monotonic() - started
        assert "reconcil" in workers[1].log(), workers[1].log_tail()
        print(f"verify consistent {converged_s:.1f}s after the restarted worker was started")

        rebuilt = await run_cli(settings, "rebuild", "--json", timeout=180)
        assert rebuilt.rc == 0, rebuilt
        out = rebuilt.json()
        assert out["switched"] and out["first_pass"]["replayed"] == 0, out  # the log held nothing
        assert out["from_snapshot"] == MEMORIES, out
        assert await lance_states(settings) == before  # the new generation, every memory kept
        got = await run_cli(settings, "get", "m1", "--json")
        assert got.rc == 0 and "changed" in got.stdout, got

        # a model migration from the same empty log re-embeds what it copies from the serving generation
        migrated = await run_cli(settings, "migrate", "--to", "hash", "--hash-dim", "64", "--json", timeout=180)
        assert migrated.rc == 0, migrated
        out = migrated.json()
        assert out["switched"] and out["from_snapshot"] == MEMORIES and out["built"]["dim"] == 64, out
        assert await lance_states(settings.with_(hash_dim=64)) == before
    finally:
        for worker in workers:
            worker.interrupt()
            worker.wait_stopped()
        stack.down()


async def test_rebuild_with_allow_loss_builds_from_the_log_alone(tmp_path: Path) -> None:
    """`--allow-loss` is the explicit way to a generation that holds only what the log holds."""
    settings = stack_settings(tmp_path / "home")
    stack = LocalStack(settings.home)
    stack.up(kafka_port=None, redis_port=None)
    try:
        resolved = resolve_services(settings, start=False)
        stores = await Stores.open(resolved)
        try:
            zeros = b"\0" * 4 * stores.embedder.dim
            rows = [
                MemoryRow(
                    f"x{i}",
                    Scope("default", "u"),
                    f"x {i}",
                    {},
                    1,
                    f"e{i}",
                    "h",
                    False,
                    1,
                    zeros,
                )
                for i in range(5)
            ]
            await stores.vectors.upsert(rows)
            await stores.cache.apply(rows)
        finally:
            await stores.close()
        rebuilt = await run_cli(settings, "rebuild", "--json", "--allow-loss", timeout=180)
        assert rebuilt.rc == 0, rebuilt
        out = rebuilt.json()
        assert out["switched"] and out["from_snapshot"] == 0 and out["verify"]["lancedb_memories"] == 0, out
        assert await lance_states(settings) == {}
    finally:
        stack.down()
