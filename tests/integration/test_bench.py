"""`memstream bench --quick`: every scenario runs end to end on the real services and reports real figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from infra.settings import Settings


def test_bench_quick_runs_every_scenario_and_writes_results(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ)
    env.update(
        {
            "MEMSTREAM_HOME": str(settings.home),
            "MEMSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "MEMSTREAM_REDIS_URL": settings.redis_url,
            "MEMSTREAM_EMBEDDER": "hash",
            "MEMSTREAM_PARTITIONS": "2",
            "HF_HUB_OFFLINE": "1",
        }
    )
    proc = subprocess.run(
        # two worker processes: the multi-process path (one consumer group, maintenance in the first) end to end
        # every scenario but the two on stacks of their own (publish-wait, serve: the next test)
        [sys.executable, "-m", "streams", "bench", "--quick", "--workers", "2", "--json", "--out", str(out)]
        + [
            arg
            for name in ("ingest", "publish", "stages", "baseline", "latency", "search", "read")
            for arg in ("--scenario", name)
        ],
        env=env,
        capture_output=True,
        timeout=420,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = json.loads(proc.stdout)
    s = results["scenarios"]

    ingest = s["ingest"]
    assert ingest["events"] == 5_000
    assert ingest["events_per_s"] > 0 and ingest["seconds"] > 0
    assert ingest["consistency"]["consistent"] is True
    assert ingest["consistency"]["lancedb_memories"] == ingest["consistency"]["redis_memories"] > 0
    assert ingest["worker_peak_rss_mb"] and ingest["worker_peak_rss_mb"] > 10
    assert ingest["workers"] == results["workers"] == 2
    assert results["worker_exit_code"] == 0  # SIGINT: a clean shutdown
    # searchable first, LanceDB after: the sink's catch-up is timed from the last searchable event
    assert 0 < ingest["seconds"] <= ingest["indexed_seconds"]
    assert ingest["index_caught_up_after_s"] == pytest.approx(ingest["indexed_seconds"] - ingest["seconds"], abs=0.01)
    assert ingest["consistency"]["fresh_tail"] == ingest["fresh_tail_left"] == 0
    assert ingest["sink_records"] >= ingest["consistency"]["lancedb_memories"]  # every memory came through the sink
    assert ingest["sink_records_per_s"] > 0 and ingest["publisher_events_per_s"] > 0
    progress = ingest["progress"]
    assert progress[-1][1] >= 5_000 and progress[-1][3] == 0  # all searchable, fresh tail empty at the end
    assert ingest["fresh_tail_peak"] > 0  # LanceDB lagged Redis at some point: the tail was read
    # memory per process, sampled over the run: both workers (the first runs the sink too: inline), broker, Redis
    processes = ingest["processes"]
    assert set(processes) == {"worker-0 (inline)", "worker-1 (ingest)", "broker", "redis"}
    for label, figures in processes.items():
        assert figures["peak_rss_mb"] > 1, label
        assert figures["samples"] >= 2, label
        assert figures["first_half_peak_mb"] <= figures["peak_rss_mb"] + 0.1, label
    assert results["derived"]["worker_peak_rss_mb_max"] == max(
        processes[w]["peak_rss_mb"] for w in ("worker-0 (inline)", "worker-1 (ingest)")
    )
    assert ingest["lancedb_fragments"] >= 1
    assert ingest["maintenance"]["compactions_failed"] == 0 and ingest["maintenance"]["every_compaction_succeeded"]
    infra = ingest["infra"]
    assert infra["memories"] == ingest["consistency"]["redis_memories"]
    for server in ("broker", "redis"):
        assert infra[server]["rss_mb"] > 1
        assert infra[server]["bytes_per_memory"] == pytest.approx(
            infra[server]["rss_mb"] * 2**20 / infra["memories"], rel=0.01
        )

    # the same through `memstream publish FILE --wait`, as a user bulk-loads
    publish = s["publish"]
    assert publish["events"] == publish["accepted"] == publish["publisher_alone_accepted"] == 5_000
    assert publish["materialized"] > 0 and publish["not_materialized"] == 0
    assert publish["wait_events_per_s"] == pytest.approx(5_000 / publish["wait_seconds"], rel=1e-3)
    assert publish["publisher_alone_events_per_s"] > 0 and publish["fresh_tail_left"] == 0

    stages = s["stages"]
    for stage in ("decode_events_per_s", "embed_texts_per_s", "lancedb_rows_per_s", "redis_rows_per_s"):
        assert stages[stage] > 0
    assert stages["publish_lines_per_s"] > 0
    assert stages["slowest_stage_per_s"] == min(
        stages[k] for k in ("decode_events_per_s", "embed_texts_per_s", "lancedb_rows_per_s", "redis_rows_per_s")
    )
    assert s["baseline"]["events"] == 200 and s["baseline"]["events_per_s"] > 0
    for rate, probes in (("500", 50), ("2000", 200)):
        latency = s["latency"][rate]
        assert latency["table_memories_before"] == 20_000  # the pre-filled table
        assert latency["count"] > 0.9 * latency["published"] * 0.9
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
        for which in ("searchable", "indexed"):  # every probe found by get: in Redis, then in LanceDB
            assert latency[which]["probes"] == latency[which]["count"] == probes, which
            assert latency[which]["not_reached"] == 0 and 0 < latency[which]["p50_ms"] <= latency[which]["p99_ms"]
    assert results["latency_prefill_s"] > 0
    assert s["search"]["10000"]["rows"] == 10_000
    tail = s["search"]["10000"]["uncached_fresh_tail"]
    assert tail["count"] == 100 and tail["fresh_tail"] == 500 and 0 < tail["p50_ms"] <= tail["p99_ms"]
    assert tail["tail_exact_first"] == tail["tail_exact_queries"] == 10  # the merge ranks an exact tail match first
    assert tail["searches_with_tail_hits"] >= 10
    assert s["search"]["10000"]["uncached"]["count"] == 100
    cached = s["search"]["10000"]["cached"]
    assert cached["all"]["count"] == 100 and cached["hit_rate"] == 1.0  # every request was asked twice before
    assert 0 < cached["distinct_requests"] <= 100
    read = s["read"]
    assert read["memories"] == 4_000 and read["context_cold"]["reads"] == read["context"]["reads"] == 2_000
    assert 0 < read["context_cold"]["hit_rate"] <= read["context"]["hit_rate"] <= 1
    assert read["context_cold"]["misses"]["count"] > 0 and read["search"]["uncached"]["count"] == 500
    # CPU per event of every process beside the rates: the workers, the broker and Redis did work
    for label in ("worker-0 (inline)", "worker-1 (ingest)", "broker", "redis", "bench (publisher, polling)"):
        assert ingest["cpu"][label]["cpu_s"] > 0 and ingest["cpu"][label]["cpu_us_per_event"] > 0, label
    assert ingest["cpu"]["total"]["cpu_s"] == pytest.approx(
        sum(v["cpu_s"] for k, v in ingest["cpu"].items() if k != "total"), abs=0.01
    )
    assert publish["cpu"]["publisher"]["cpu_s"] > 0  # the `memstream publish` subprocess, measured by wait4
    assert publish["cpu"]["total"]["cpu_us_per_event"] > 0
    assert results["derived"]["speedup_vs_baseline"] == round(ingest["events_per_s"] / s["baseline"]["events_per_s"], 1)

    folder = Path(results["output"])
    assert json.loads((folder / "results.json").read_text())["run_id"] == results["run_id"]
    summary = (folder / "summary.md").read_text()
    assert "| ingest events/s (publish to searchable) |" in summary
    assert "| latency @2000/s on 20,000 to searchable p50/p99 ms |" in summary
    assert (folder / "ingest.png").stat().st_size > 1_000
    assert (folder / "latency.png").stat().st_size > 1_000

    # the benchmark cleans up after itself: none of its Redis keys are left on a server it did not start
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not list(client.scan_iter(match=f"bench-{results['run_id']}:*", count=1000))
    finally:
        client.close()


def test_bench_user_scenarios_measure_the_public_path_with_cpu_per_event(settings: Settings, tmp_path: Path) -> None:
    """publish-wait and serve, quick: a fresh stack each, the default `memstream worker` (a supervisor of an ingest
    and a sink process), `memstream publish --wait` and `memstream serve` as subprocesses, reads over HTTP."""
    env = dict(os.environ)
    env.update(
        {
            "MEMSTREAM_HOME": str(settings.home),
            "MEMSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "MEMSTREAM_REDIS_URL": settings.redis_url,
            "MEMSTREAM_EMBEDDER": "hash",
            "MEMSTREAM_PARTITIONS": "2",
        }
    )
    command = ["bench", "--quick", "--scenario", "publish-wait", "--scenario", "serve", "--chunks", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "streams", *command, "--json", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        timeout=420,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = json.loads(proc.stdout)
    wait = results["scenarios"]["publish-wait"]
    assert wait["events"] == wait["accepted"] == 300 and wait["not_materialized"] == 0
    assert wait["events_per_s"] == pytest.approx(300 / wait["seconds"], abs=0.1)  # both rounded
    assert wait["fresh_tail_left"] == 0 and wait["index_caught_up_after_s"] >= 0
    # every process that did work spent CPU on it: the supervisor's two children by role, the servers, the publisher
    labels = {"broker", "redis", "redis forks", "worker (supervisor)", "ingest-0", "sink", "publisher", "total"}
    assert labels == set(wait["cpu"])  # "redis forks": its append-only file's rewrites (none in so short a run)
    for label in ("broker", "redis", "ingest-0", "sink", "publisher", "total"):
        assert wait["cpu"][label]["cpu_s"] > 0 and wait["cpu"][label]["cpu_us_per_event"] > 0, label
    assert wait["cpu"]["ingest-0"]["pid"] != wait["cpu"]["sink"]["pid"]
    assert len(wait["per_chunk"]) == 2 and sum(c["events"] for c in wait["per_chunk"]) == 300
    assert all(c["events_per_s"] > 0 for c in wait["per_chunk"]) and wait["last_vs_first_chunk"] > 0
    for label in ("ingest-0", "sink"):
        assert wait["processes"][label]["peak_rss_mb"] > 10, label

    serve = results["scenarios"]["serve"]
    assert serve["accepted"] == serve["memories"] == 300 and serve["ingest_memories_per_s"] > 0
    for when in ("after_ingest", "steady"):
        for phase in ("search_single", "search_uncached", "search_cached", "search_hybrid", "context", "search_tenant"):
            figures = serve[when][phase]
            assert figures["connections"] == (1 if phase in ("search_single", "search_tenant") else 4), phase
            assert figures["requests"] > 0 and figures["requests_per_s"] > 0, (when, phase)
            assert 0 < figures["p50_ms"] <= figures["p99_ms"], (when, phase)
            assert figures["errors"] < figures["requests"], (when, phase, figures["error_kinds"])
            # `serve` is the parent of the `serve-<i>` processes (one per core by default): they answer
            serving = sum(v["cpu_s"] for k, v in figures["cpu"].items() if k == "serve" or k.startswith("serve-"))
            assert serving > 0 and figures["serve_cpu_us_per_request"] > 0, (when, phase)
        for phase in ("search_single", "search_uncached", "search_cached", "context", "search_tenant"):
            assert serve[when][phase]["errors"] == 0, (when, phase, serve[when][phase]["error_kinds"])
        # 300 memories: LanceDB searches the whole tenant exactly (no vector index below its threshold), so the
        # bench's own exact search must agree with it
        recall = serve[when]["tenant_recall"]
        assert recall["queries"] == 50 and recall["recall_at_10"] >= 0.99, recall
        # what the tenant-wide searches went through: the table (its rows, tombstones included) before and after
        for at in ("before", "after"):
            (table,) = serve[when]["search_tenant"]["index"][at]
            assert table["rows"] >= 300 and table["index"] is None, table
    summary = (Path(results["output"]) / "summary.md").read_text()
    rows = serve["steady"]["search_tenant"]["index"]["before"][0]["rows"]
    assert f"serve search_tenant (steady, 1 conn.; over {rows:,} rows, no vector index (exact scan)" in summary
    assert "| publish-wait: memstream publish FILE --wait, fresh stack, 300 events, 2 file(s) |" in summary
    assert "CPU per event, until LanceDB caught up |" in summary


def test_bench_split_roles_measures_the_sink_as_a_process_of_its_own(settings: Settings, tmp_path: Path) -> None:
    """``--split-roles``: one ``--role ingest`` process and one ``--role sink`` process, each measured."""
    env = dict(os.environ)
    env.update(
        {
            "MEMSTREAM_HOME": str(settings.home),
            "MEMSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "MEMSTREAM_REDIS_URL": settings.redis_url,
            "MEMSTREAM_EMBEDDER": "hash",
            "MEMSTREAM_PARTITIONS": "2",
        }
    )
    command = ["bench", "--split-roles", "--scenario", "ingest", "--events", "3000", "--json", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "streams", *command], env=env, capture_output=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    results = json.loads(proc.stdout)
    ingest = results["scenarios"]["ingest"]
    assert results["split_roles"] is ingest["split_roles"] is True and results["worker_exit_code"] == 0
    assert {"ingest-0", "sink"} <= set(ingest["processes"])
    assert not any(label.startswith("worker-") for label in ingest["processes"])
    for label in ("ingest-0", "sink"):
        assert ingest["processes"][label]["peak_rss_mb"] > 10, label
    assert ingest["consistency"]["consistent"] is True and ingest["fresh_tail_left"] == 0
    assert ingest["sink_records"] >= ingest["consistency"]["lancedb_memories"] > 0  # the sink process wrote them
    assert ingest["maintenance"]["compactions_failed"] == 0  # counted in the sink process' own log


async def test_recall_scores_vector_and_hybrid_on_a_locomo_format_conversation(tmp_path: Path) -> None:
    """A LoCoMo-shaped file (sessions of turns, questions with evidence ids), hash embedder, real LanceDB."""
    from streams.tools.bench import scenario_recall

    turns = [
        ("Ana", "I adopted a greyhound named Biscuit last spring"),
        ("Ben", "My sister moved to Lisbon for a pottery apprenticeship"),
        ("Ana", "We are repainting the kitchen a pale saffron colour"),
        ("Ben", "The marathon in Porto was brutal but I finished it"),
    ]
    conversation = {
        "speaker_a": "Ana",
        "speaker_b": "Ben",
        "session_1": [{"speaker": who, "dia_id": f"D1:{i}", "text": text} for i, (who, text) in enumerate(turns, 1)],
        "qa": [
            {"question": "What is the name of the greyhound Ana adopted?", "answer": "Biscuit", "evidence": ["D1:1"]},
            {"question": "Why did Ben's sister move to Lisbon?", "answer": "pottery", "evidence": ["D1:2"]},
            {"question": "Which city's marathon did Ben finish?", "answer": "Porto", "evidence": ["D1:4"]},
            {"question": "An adversarial one", "answer": None, "evidence": []},  # no evidence: not scored
        ],
    }
    dataset = tmp_path / "locomo"
    dataset.mkdir()
    (dataset / "7.json").write_text(json.dumps(conversation))
    results = await scenario_recall(Settings(embedder="hash"), dataset, [1, 4])
    assert results["questions"] == 3
    assert results["recall@4"] == results["hybrid"]["recall@4"] == 1.0  # 4 turns: every ranking holds them all
    assert results["hybrid"]["recall@1"] == 1.0  # each question shares its rare words with its evidence turn
    assert 0 < results["recall@1"] <= 1.0
    assert results["by_category"]["None"]["questions"] == 3
