"""Consistency under faults (issue #3), for real: broker, Redis and worker processes broken on purpose.

Each chaos scenario runs on a stack of its own (it kills and wipes its Redis, so it cannot share the session
one), publishes a synthetic workload of adds, updates and deletes while the fault happens, and must end with
both stores holding exactly the newest published event of every memory: nothing lost, duplicated or stale.
Each test also checks that its fault really bit (compensations applied, reconciliation repairs, kills), so a
scenario whose fault missed the ingestion cannot pass by luck.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings
from processors.model import ScopeQuery
from streams.runtime.stores import Stores
from streams.tools.chaos import ChaosConfig, ChaosResult, run_scenario
from tests.integration.helpers import WorkerProcess, make_settings, run_cli, unique_tag, write_jsonl

pytestmark = pytest.mark.slow

SMALL = ChaosConfig(events=3_000, rate=600, kills=2, outage_s=3.0, poison=100, converge_timeout_s=120.0)


# a killed sink is back at work ~25 s later (its groups wait out the dead member's session), so one kill here;
# `memstream chaos --scenario sink-kill` kills it three times
ONE_SINK_KILL = dataclasses.replace(SMALL, kills=1)


async def chaos(name: str, tmp_path: Path, settings: Settings, config: ChaosConfig = SMALL) -> ChaosResult:
    result = await run_scenario(name, tmp_path, config, settings)
    summary = result.to_dict()
    # the workload, and the memories lancedb-faults publishes during its fault to read them back
    assert result.events_published == config.events + result.figures.get("probes_published", 0), summary
    assert (result.lost, result.duplicated, result.stale, result.unexpected) == (0, 0, 0, 0), summary
    assert result.consistent and result.seconds_to_converge is not None, summary
    assert result.passed, summary
    return result


async def test_worker_killed_mid_window_several_times(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("worker-kill", tmp_path, settings)
    assert result.faults_injected == SMALL.kills


async def test_redis_stopped_during_ingestion_then_back_with_its_data(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("redis-outage", tmp_path, settings)
    # the writes Redis missed came back through compensations, and none was given up
    assert result.counters["compensations_applied"] > 0, result.counters
    assert result.counters["compensations_exhausted"] == 0


async def test_redis_wiped_during_ingestion_is_refilled(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("redis-wipe", tmp_path, settings)
    # what Redis held before the wipe came back through the reconciler (noticed by the sentinel key)
    assert result.counters["reconcile_repaired"] > 0, result.counters


async def test_lancedb_writes_failing_for_a_while(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("lancedb-faults", tmp_path, settings)
    figures = result.figures
    # LanceDB is off the ingest path: its faults hold only the index sink, which retries until they pass; the
    # ingest path compensates nothing, and the sink then writes every memory (the audit found 0 lost)
    assert result.faults_injected > 0
    assert result.counters["compensations_emitted"] == 0, result.counters
    assert result.counters["indexed"] > 0, result.counters
    # the fault bit: the sink fell behind while it lasted, and caught up after
    assert figures["fresh_tail_at_fault_end"] > 0, figures
    assert figures["sink_caught_up_s"] is not None and figures["fresh_tail_left"] == 0, figures
    # reads went on meanwhile: every memory published during the fault was found (search and get), from the tail
    # (read_back looks each one up in LanceDB first: none was there)
    assert figures["probes_published"] == SMALL.probes and figures["probes_late"] == 0, figures
    assert result.reads_asked == 2 * SMALL.probes, figures
    assert result.reads_found == result.reads_asked == figures["reads_found_from_fresh_tail"], figures


async def test_duplicates_reorders_replays_and_poison(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("poison", tmp_path, settings)
    assert result.poison_published > 0 and result.dead_lettered == result.poison_published


async def test_whole_stack_restarted_between_two_publishes(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("restart", tmp_path, settings)
    assert result.faults_injected == 1 and "log came back empty" in result.fault


async def test_index_sink_killed_mid_batch(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("sink-kill", tmp_path, settings, ONE_SINK_KILL)
    figures = result.figures
    # the sink (a process of its own) was killed with work in hand each time and restarted; the audit's scan of
    # LanceDB's key column found no memory twice (result.duplicated == 0 in chaos())
    assert result.faults_injected == figures["sink_kills"] == ONE_SINK_KILL.kills, figures
    assert figures["sink_restarts"] == ONE_SINK_KILL.kills, figures
    assert figures["kills_with_work_in_hand"] == ONE_SINK_KILL.kills, figures
    assert figures["sink_caught_up_s"] is not None and figures["fresh_tail_left"] == 0, figures
    assert figures["records_indexed"] >= figures["embedded_records"] > 0, figures
    # the ingest process compensated nothing: it never waited for LanceDB
    assert result.counters["compensations_emitted"] == 0, result.counters


async def test_reads_while_the_index_sink_is_far_behind(tmp_path: Path, settings: Settings) -> None:
    result = await chaos("sink-behind", tmp_path, settings)
    figures = result.figures
    # without a sink LanceDB held nothing, yet every search, get and context read found its memory (the fresh tail)
    assert figures["lancedb_rows_while_sink_absent"] == 0, figures
    assert figures["fresh_tail_while_sink_absent"] >= result.memories > 0, figures
    assert result.reads_asked == 3 * SMALL.probes, figures
    assert result.reads_found == result.reads_asked == figures["reads_found_from_fresh_tail"], figures
    assert set(figures["read_latency_ms"]) == {"search", "get", "context"}, figures
    # then the sink started and emptied the tail
    assert figures["sink_caught_up_s"] is not None and figures["fresh_tail_left"] == 0, figures
    assert result.counters["indexed"] >= result.memories, result.counters


# --------------------------------------------------------------------------------------------- reconcile CLI


@pytest.fixture(scope="module")
def reconcile_worker(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str
) -> Iterator[WorkerProcess]:
    base = tmp_path_factory.mktemp("reconcile")
    proc = WorkerProcess(make_settings(base / "home", kafka_bootstrap, redis_url), base / "worker.log").start()
    try:
        yield proc
    finally:
        proc.interrupt()
        code, _ = proc.wait_stopped()
        assert code == 0, proc.log_tail()


async def test_reconcile_and_verify_repair_find_and_fix_tampered_stores(
    reconcile_worker: WorkerProcess, tmp_path: Path
) -> None:
    settings, tag = reconcile_worker.settings, unique_tag()
    user = f"u{tag}"
    lines = [{"user_id": user, "memory_id": f"{tag}-{i}", "text": f"memory {i} of {tag}"} for i in range(40)]
    lines.append({"op": "update", "user_id": user, "memory_id": f"{tag}-0", "text": "updated"})
    # --indexed: the tampering below reads and deletes LanceDB rows, which `--wait` alone does not wait for
    path = str(write_jsonl(tmp_path / "m.jsonl", lines))
    published = await run_cli(settings, "publish", path, "--wait", "--indexed", "--json")
    assert published.rc == 0, f"{published}\n{reconcile_worker.log_tail()}"

    # tamper: Redis forgets five memories, LanceDB loses one, Redis gets a memory no one published
    stores = await Stores.open(settings)
    try:
        await stores.redis.delete(*[stores.cache.memory_key(f"default/{tag}-{i}") for i in range(5)])
        await stores.vectors.delete_ids([f"default/{tag}-10"])
        [row] = await stores.vectors.get([f"default/{tag}-11"])
        await stores.cache.apply([dataclasses.replace(row, memory_id=f"{tag}-ghost", updated_at=1)])
    finally:
        await stores.close()
    broken = await run_cli(settings, "verify", "--user", user, "--json")
    assert broken.rc == 1 and not broken.json()["consistent"]

    done = await run_cli(settings, "reconcile", "--user", user, "--wait", "--timeout", "90", "--json")
    assert done.rc == 0, f"{done}\n{reconcile_worker.log_tail()}"
    report = done.json()
    counts = report["counts"]
    assert report["consistent"] and report["scope"] == f"user {user}"
    assert (counts["redis_missing"], counts["lancedb_missing"], counts["redis_orphaned"]) == (5, 1, 1), counts
    assert counts["repaired"] == 7 and counts["unrepaired"] == 0 and counts["log_memories"] == 40
    fixed = await run_cli(settings, "verify", "--user", user, "--json")
    assert fixed.rc == 0 and fixed.json()["live_memories"] == 40

    # verify --repair does the same synchronously, without the worker
    stores = await Stores.open(settings)
    try:
        await stores.redis.delete(stores.cache.memory_key(f"default/{tag}-0"))
    finally:
        await stores.close()
    repaired = await run_cli(settings, "verify", "--repair", "--user", user, "--json")
    assert repaired.rc == 0, str(repaired)
    body = repaired.json()
    assert body["consistent"] and body["reconcile"]["counts"]["redis_missing"] == 1
    stores = await Stores.open(settings)
    try:
        [back] = await stores.cache.get([f"default/{tag}-0"])
        assert back is not None and back.text == "updated"
        assert await stores.vectors.states(ScopeQuery(user_id=user)) == await stores.cache.states(
            ScopeQuery(user_id=user)
        )
    finally:
        await stores.close()
