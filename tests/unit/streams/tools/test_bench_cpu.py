"""CPU per process for `memstream bench`: read from /proc for live processes, from wait4 for a finished one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.tools.bench_procs import CpuSampler, child_pids, proc_cpu_s, wait_quiet, wait_with_cpu, worker_children
from streams.tools.bench_user import cpu_row, split_file

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


def _burn_here() -> None:
    exec(BURN, {})


def test_a_process_cpu_grows_with_the_work_it_does() -> None:
    before = proc_cpu_s(os.getpid())
    assert before is not None
    _burn_here()
    after = proc_cpu_s(os.getpid())
    assert after is not None and after - before >= 0.2  # 0.3 s of CPU burnt, read in clock ticks


def test_a_gone_process_has_no_cpu_reading() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert proc_cpu_s(proc.pid) is None


async def test_a_phase_waits_until_the_server_has_worked_off_the_last_phases_requests() -> None:
    """wait_quiet returns once the processes are idle, not before: a busy process holds it until it stops."""
    busy = await asyncio.create_subprocess_exec(sys.executable, "-c", BURN.replace("0.3", "1.5"))
    waited = await wait_quiet({"serve": busy.pid}, window_s=0.1, timeout_s=10.0)
    assert waited >= 1.0, waited  # it burnt 1.5 s of CPU, then exited
    assert await busy.wait() == 0
    idle = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(5)")
    try:
        await asyncio.sleep(0.5)  # past the interpreter's start
        assert await wait_quiet({"serve": idle.pid}, window_s=0.1, timeout_s=10.0) < 0.5
    finally:
        idle.kill()
        await idle.wait()


def test_the_sampler_counts_each_process_and_their_sum_per_event() -> None:
    sampler = CpuSampler({"bench": os.getpid()})
    sampler.start()
    _burn_here()
    sampler.record("publisher", 0.5)  # a finished subprocess, as wait4 measured it
    figures = sampler.figures(1_000)
    assert figures["bench"]["pid"] == os.getpid() and figures["bench"]["cpu_s"] >= 0.2
    assert figures["bench"]["cpu_us_per_event"] == pytest.approx(figures["bench"]["cpu_s"] * 1e6 / 1_000, rel=0.01)
    assert figures["publisher"]["cpu_s"] == 0.5 and figures["publisher"]["cpu_us_per_event"] == 500.0
    assert figures["total"]["cpu_s"] == pytest.approx(figures["bench"]["cpu_s"] + 0.5, abs=0.002)


def test_a_process_that_exits_keeps_its_last_reading() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BURN + "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    sampler = CpuSampler({})
    sampler.start()
    sampler.add("child", proc.pid)  # started after start(): all of its CPU counts
    assert proc.stdin is not None
    while (proc_cpu_s(proc.pid) or 0) < 0.2:  # the burn is done once it waits on stdin
        sampler.sample()
    sampler.sample()
    proc.stdin.close()
    proc.wait()
    assert sampler.seconds()["child"] >= 0.2


def test_what_redis_forks_spend_is_counted_beside_it() -> None:
    """Redis rewrites its append-only file in a child it forks and reaps: that CPU is the stack's too. A stand-in
    "redis" forks a child that burns 0.3 s and waits for it; the sampler reports it as ``redis forks``, and does
    not for a process of another label."""
    forker = (
        "import os, sys, time\n"
        "sys.stdin.readline()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    end = time.process_time() + 0.3\n"
        "    while time.process_time() < end: pass\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('reaped', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", forker], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        sampler = CpuSampler({"redis": proc.pid, "other": proc.pid})
        sampler.start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"fork\n")  # only now: all of the child's CPU lands between start and the reading
        proc.stdin.flush()
        assert proc.stdout.readline() == b"reaped\n"
        spent = sampler.seconds()
        assert spent["redis forks"] >= 0.2 and "other forks" not in spent, spent
        assert spent["redis"] < 0.2, spent  # the parent itself only waited
    finally:
        proc.kill()
        proc.wait()


def test_wait4_gives_a_finished_subprocess_cpu() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BURN])
    code, seconds = wait_with_cpu(proc)
    assert code == 0 and proc.returncode == 0 and seconds >= 0.2


@pytest.mark.parametrize(
    ("sinks", "names"),
    [
        ("[{}]", {"ingest-0", "sink"}),
        (
            "[{'MEMSTREAM_INDEX_SHARDS': '2', 'MEMSTREAM_INDEX_SHARD': str(i)} for i in (0, 1)]",
            {"ingest-0", "sink-0", "sink-1"},
        ),
    ],
)
def test_the_supervisor_children_are_named_by_their_role(sinks: str, names: set[str]) -> None:
    script = (
        "import os, subprocess, sys\n"
        "roles = [{'MEMSTREAM_WORKER_ROLE': 'ingest'}] + [{'MEMSTREAM_WORKER_ROLE': 'sink', **s} for s in "
        + sinks
        + "]\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE,"
        " env={**os.environ, **role}) for role in roles]\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
        "for k in kids: k.stdin.close(); k.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"ready\n"
        children = worker_children(parent.pid)
        assert set(children) == names
        assert sorted(children.values()) == sorted(child_pids(parent.pid))
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait()


def test_split_file_keeps_every_line_in_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(b"%d\n" % i for i in range(25)))
    parts = split_file(path, 10)
    assert [len(p.read_bytes().splitlines()) for p in parts] == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert b"".join(p.read_bytes() for p in parts) == path.read_bytes()
    assert split_file(path, 1) == [path]


def test_the_cpu_row_names_every_process_and_the_sum() -> None:
    cpu = {
        "broker": {"cpu_us_per_event": 12.4},
        "sink": {"cpu_us_per_event": 30.0},
        "total": {"cpu_us_per_event": 42.4},
    }
    label, value = cpu_row("CPU", cpu)
    assert label == "CPU" and value == "42 µs/event in all (broker 12; sink 30)"
