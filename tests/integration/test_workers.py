"""`memstream worker --processes 2`: two worker processes share the partitions as one group, and stop cleanly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infra.kafka import group_state
from tests.integration.helpers import WorkerProcess, make_settings, run_cli, wait_for, write_jsonl

pytestmark = pytest.mark.slow


async def test_two_worker_processes_share_the_partitions_and_stop_cleanly(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url, workers=2, partitions=4)
    proc = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:

        async def group_formed() -> bool:
            proc.assert_alive()
            if proc.log().count("worker ready") < 2:
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
    stopped = [int(n) for n in re.findall(r"worker stopped after \d+ windows, (\d+) records", proc.log())]
    assert len(stopped) == 2, proc.log_tail()  # each process stopped cleanly, finishing its window
    assert all(records > 0 for records in stopped), stopped  # ... and each held partitions and ingested some
    assert sum(stopped) >= 400
    assert "Traceback" not in proc.log()
