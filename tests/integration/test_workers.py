"""`memstream worker`: a supervisor of the ingest and index-sink processes. With `--processes 2` two ingest
processes share the partitions as one group; a child that is killed is restarted; all stop cleanly."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from infra.kafka import group_state
from tests.integration.helpers import WorkerProcess, make_settings, run_cli, wait_for, write_jsonl

pytestmark = pytest.mark.slow


def child_pids(proc: WorkerProcess, name: str) -> list[int]:
    """The pids the supervisor started child ``name`` with, in order (its log line for each start)."""
    return [int(pid) for pid in re.findall(rf"child {name} started: pid (\d+)", proc.log())]


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (a container's init may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def publish_and_verify(proc: WorkerProcess, tmp_path: Path, name: str, count: int) -> dict[str, object]:
    """``count`` new memories through `publish --wait --indexed`: each in Redis and LanceDB; then `verify`."""
    settings = proc.settings
    lines = [{"user_id": f"user-{i % 20}", "text": f"{name} memory {i}: tea, jazz and running"} for i in range(count)]
    path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
    published = await run_cli(settings, "publish", str(path), "--wait", "--indexed", "--timeout", "90", "--json")
    assert published.rc == 0, f"{published}\n{proc.log_tail()}"
    assert published.json()["materialized"] == count
    report: dict[str, object] = (await run_cli(settings, "verify", "--json")).json()
    return report


async def test_two_worker_processes_share_the_partitions_and_stop_cleanly(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url, workers=2, partitions=4)
    proc = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:

        async def group_formed() -> bool:
            proc.assert_alive()
            if proc.log().count("worker ready") < 3:  # two ingest processes and the index sink
                return False
            state, members = await group_state(settings, settings.group_id)
            return state == "Stable" and members == 2

        await wait_for(group_formed, timeout=120, what="two workers in one stable group", interval=0.5)
        lines = [{"user_id": f"user-{i % 20}", "text": f"memory {i}: tea, jazz and running"} for i in range(400)]
        path = write_jsonl(tmp_path / "events.jsonl", lines)
        published = await run_cli(settings, "publish", str(path), "--wait", "--timeout", "90", "--json")
        assert published.rc == 0, f"{published}\n{proc.log_tail()}"
        assert published.json()["materialized"] == 400
        verified = await run_cli(settings, "verify", "--json")
        report = verified.json()
        assert report["consistent"] is True and report["lancedb_memories"] == report["redis_memories"] == 400
    finally:
        proc.interrupt()
        code, seconds = proc.wait_stopped(timeout=60)
    assert code == 0, f"the supervisor exited with {code} after SIGINT ({seconds:.1f}s):\n{proc.log_tail()}"
    stopped = sorted(int(n) for n in re.findall(r"worker stopped after \d+ windows, (\d+) records", proc.log()))
    assert len(stopped) == 3, proc.log_tail()  # each process stopped cleanly, finishing its window or batch
    assert stopped[0] == 0 and all(records > 0 for records in stopped[1:]), stopped  # the sink ingests nothing;
    assert sum(stopped) >= 400  # ... each ingest process held partitions and ingested some
    assert "Traceback" not in proc.log()


async def test_the_supervisor_restarts_a_killed_child_and_stops_both_on_sigterm(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url)
    proc = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await proc.wait_for_log("index sink owns", timeout=120)
        await proc.wait_for_log("worker ready: role=ingest", timeout=120)
        (ingest,), (sink,) = child_pids(proc, "ingest-0"), child_pids(proc, "sink")
        assert ingest != sink and proc.proc is not None and proc.proc.pid not in (ingest, sink)
        first = await publish_and_verify(proc, tmp_path, "before", 200)
        assert first["consistent"] is True and first["lancedb_memories"] == 200, first

        os.kill(ingest, signal.SIGKILL)  # a crash of the ingest process alone: the supervisor must notice

        async def restarted() -> bool:
            proc.assert_alive()
            return len(child_pids(proc, "ingest-0")) == 2 and proc.log().count("worker ready: role=ingest") == 2

        await wait_for(restarted, timeout=120, what="a new ingest process, ready")
        again = child_pids(proc, "ingest-0")[1]
        assert again != ingest and gone(ingest)
        assert f"child ingest-0 (pid {ingest}) died: killed by SIGKILL" in proc.log(), proc.log_tail()
        assert child_pids(proc, "sink") == [sink] and not gone(sink)  # the sink was left running
        after = await publish_and_verify(proc, tmp_path, "after", 200)  # the stack keeps materializing
        assert after["consistent"] is True and after["lancedb_memories"] == after["redis_memories"] == 400, after
    finally:
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        code, seconds = proc.wait_stopped(timeout=60)
    log = proc.log()
    assert code == 0, f"the supervisor exited with {code} after SIGTERM ({seconds:.1f}s):\n{proc.log_tail()}"
    assert "SIGTERM: stopping 2 children" in log, proc.log_tail()
    assert all(gone(pid) for pid in (again, sink))
    # the restarted ingest process and the sink each stopped cleanly (the killed one never could)
    assert log.count("worker stopped after") == 2, proc.log_tail()
    assert "Traceback" not in log


def thread_nices(pid: int) -> dict[int, int]:
    """Each thread's nice value, from field 19 of /proc/<pid>/task/<tid>/stat (nice is per thread on Linux: a
    thread LanceDB started before the process was lowered would keep its own)."""
    nices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        nices[int(task.name)] = int(fields[16])  # fields after the name start at field 3 (the state)
    return nices


@pytest.mark.parametrize("sink_nice", [7, 0])
async def test_the_sink_child_runs_at_the_configured_nice_and_0_leaves_it_alone(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str, sink_nice: int
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the children start at this test's own nice
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url, sink_nice=sink_nice)
    proc = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await proc.wait_for_log("index sink owns", timeout=120)  # LanceDB open: its threads are running
        await proc.wait_for_log("worker ready: role=ingest", timeout=120)
        (ingest,), (sink,) = child_pids(proc, "ingest-0"), child_pids(proc, "sink")
        sink_threads, ingest_threads = thread_nices(sink), thread_nices(ingest)
        # a thread the sink starts later inherits its creator's nice: the batches and maintenance stay niced
        published = await publish_and_verify(proc, tmp_path, "niced", 200)
        assert published["consistent"] is True and published["lancedb_memories"] == 200, published
        sink_after = thread_nices(sink)
    finally:
        proc.interrupt()
        proc.wait_stopped(timeout=60)
    expected = max(base, sink_nice)
    assert len(sink_threads) > 1  # LanceDB's and asyncio's threads too, not only the main one
    assert set(sink_threads.values()) == {expected}, sink_threads
    assert set(sink_after.values()) == {expected}, sink_after
    assert set(ingest_threads.values()) == {base}, ingest_threads  # the ingest path keeps its priority
    assert (f"runs at nice {sink_nice}" in proc.log()) == (sink_nice > 0)
