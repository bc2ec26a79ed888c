import asyncio

from processors.timings import StageTimings, describe, percentile


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(i) for i in range(1, 101)]
    assert percentile(ordered, 0.5) == 51.0
    assert percentile(ordered, 0.99) == 99.0
    assert percentile(ordered, 1.0) == 100.0
    assert percentile([], 0.5) == 0.0


def test_take_summarises_each_stage_and_starts_over() -> None:
    timings = StageTimings()
    for ms in (1.0, 2.0, 3.0, 40.0):
        timings.add("write", ms)
    timings.add("commit", 5.0)
    summary = timings.take()
    assert list(summary) == ["write", "commit"]
    assert summary["write"] == {"count": 4, "p50_ms": 3.0, "p99_ms": 40.0, "max_ms": 40.0}
    assert "write 3.0/40.0/40.0" in describe(summary)
    assert timings.take() == {}


def test_samples_are_bounded_to_the_latest() -> None:
    timings = StageTimings(keep=3)
    for ms in range(10):
        timings.add("queued", float(ms))
    assert timings.take()["queued"] == {"count": 3, "p50_ms": 8.0, "p99_ms": 9.0, "max_ms": 9.0}


def test_timed_measures_awaited_work_and_returns_its_result() -> None:
    timings = StageTimings()

    async def slow() -> str:
        await asyncio.sleep(0.02)
        return "done"

    assert asyncio.run(timings.timed("redis", slow())) == "done"
    summary = timings.take()["redis"]
    assert summary["count"] == 1 and summary["p50_ms"] >= 15.0


def test_take_every_waits_out_the_interval_since_the_last_take() -> None:
    timings = StageTimings()
    timings.add("write", 1.0)
    assert timings.take_every(60.0) is None  # just created: not due
    assert timings.take_every(0.0) == {"write": {"count": 1, "p50_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0}}
    timings.add("write", 2.0)
    assert timings.take_every(60.0) is None and timings.count("write") == 1  # kept for the next take
