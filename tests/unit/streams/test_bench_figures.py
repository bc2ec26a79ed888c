from streams.bench import _segment_rate, derive, percentiles


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
