from pathlib import Path

from infra.settings import Settings
from streams.tools.bench import _segment_rate, derive, percentiles, run_lancedb_uri


def test_percentiles_of_known_samples() -> None:
    figures = percentiles([float(i) for i in range(1, 101)])
    assert figures["count"] == 100
    assert figures["p50_ms"] == 50.5
    assert 99 <= figures["p99_ms"] <= 100
    assert figures["max_ms"] == 100


def test_segment_rate_reads_the_progress_curve() -> None:
    progress = [(0.0, 0), (1.0, 100), (2.0, 200), (9.0, 900), (10.0, 1000)]
    assert _segment_rate(progress, 1000, 0.0, 0.1) == 100.0
    assert _segment_rate(progress, 1000, 0.9, 1.0) == 100.0
    assert _segment_rate([(0.0, 0)], 1000, 0.9, 1.0) is None


def test_derived_ratios() -> None:
    results = {
        "scenarios": {
            "ingest": {"events_per_s": 1000.0, "first_10pct_events_per_s": 800.0, "last_10pct_events_per_s": 900.0},
            "stages": {"slowest_stage_per_s": 2000.0, "embed_texts_per_s": 4000.0},
            "baseline": {"events_per_s": 10.0},
        }
    }
    derive(results)
    assert results["derived"] == {
        "efficiency_vs_slowest_stage": 0.5,
        "share_of_embedder_rate": 0.25,
        "speedup_vs_baseline": 100.0,
        "last_vs_first_10pct": 1.125,
    }


def test_rss_halves_show_growth_and_flatness() -> None:
    from streams.tools.bench_procs import RssSampler

    sampler = RssSampler({"flat": 1, "growing": 2}, own=frozenset({"growing"}))
    for t in range(10):  # kB: flat stays at 100 MB, growing climbs from 100 to 190 MB
        sampler.samples.append((float(t), {"flat": 102_400, "growing": 102_400 + t * 10_240}))
    sampler.peaks_kb = {"flat": 512_000, "growing": 194_560}  # "flat" is a server that peaked before the run
    figures = sampler.figures(split_at_s=5.0)
    assert figures["flat"]["second_vs_first_half"] == 1.0
    assert figures["growing"]["first_half_peak_mb"] == 140.0 and figures["growing"]["second_half_peak_mb"] == 190.0
    assert figures["growing"]["second_vs_first_half"] == round(190 / 140, 3)
    assert figures["growing"]["peak_rss_mb"] == 190.0 and figures["flat"]["samples"] == 10
    assert figures["flat"]["peak_rss_mb"] == 100.0  # not its lifetime VmHWM of 500 MB


def test_sink_compactions_are_counted_from_the_worker_logs(tmp_path: Path) -> None:
    from streams.tools.bench_procs import maintenance_from_logs

    ok = tmp_path / "worker.log"
    ok.write_text(
        "INFO memstream.sink: LanceDB compacted between batches in 1.2s: 40 -> 2 fragments\n"
        "INFO memstream.sink: index sink owns bench.embedded[0]\n"
        "INFO memstream.sink: LanceDB compacted between batches in 2.0s: 35 -> 1 fragments\n"
    )
    assert maintenance_from_logs([ok]) == {
        "compactions": 2,
        "compactions_failed": 0,
        "every_compaction_succeeded": True,
    }
    failed = tmp_path / "sink.log"
    failed.write_text("WARNING memstream.sink: LanceDB maintenance failed between batches (nothing lost): conflict\n")
    figures = maintenance_from_logs([ok, failed, tmp_path / "missing.log"])
    assert figures == {"compactions": 2, "compactions_failed": 1, "every_compaction_succeeded": False}


def test_the_servers_ports_come_from_local_urls_only() -> None:
    from streams.tools.bench_procs import port_of

    assert port_of("127.0.0.1:9092") == 9092
    assert port_of("localhost:9092,localhost:9093") == 9092
    assert port_of("redis://:secret@127.0.0.1:6390/0") == 6390
    assert port_of("kafka.example.com:9092") is None
    assert port_of("rediss://cache.example.com:6380/0") is None


def test_events_file_is_what_memstream_publish_reads(tmp_path: Path) -> None:
    from processors.publishing import EventFactory
    from streams.tools.bench import events_file
    from streams.tools.bench_data import synthetic_events

    events = list(synthetic_events(200, users=5))
    path = events_file(events, tmp_path / "events.jsonl")
    factory = EventFactory()
    parsed = [factory.from_json(line) for line in path.read_bytes().splitlines()]
    assert [(e.op, e.memory_id, e.scope.user_id, e.text) for e in parsed] == [
        (e.op, e.memory_id, e.scope.user_id, e.text) for e in events
    ]


def test_a_run_puts_its_tables_under_an_object_store_uri_else_in_its_folder() -> None:
    work = Path("/tmp/memstream-bench-x")
    assert run_lancedb_uri(Settings(), work, "r1") == "/tmp/memstream-bench-x/lancedb"
    assert run_lancedb_uri(Settings(lancedb_uri="/data/lancedb"), work, "r1") == "/tmp/memstream-bench-x/lancedb"
    on_s3 = Settings(lancedb_uri="s3://bucket/path/", lancedb_storage_options='{"aws_region": "eu-west-1"}')
    assert run_lancedb_uri(on_s3, work, "r1") == "s3://bucket/path/bench-r1"
    assert on_s3.with_(lancedb_uri=run_lancedb_uri(on_s3, work, "r1")).lancedb_storage == {"aws_region": "eu-west-1"}
