"""The supervisor `memstream worker` is by default: restarts a child that dies, stops every child once on
SIGTERM, gives up on a crash loop, and takes its children with it when it is SIGKILLed.

The supervisor runs for real in a process of its own (signals need a main thread of their own); its children are
small stand-ins that behave like a worker on SIGINT, so that no broker is needed (tests/integration/test_workers.py
runs the real ones)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings
from streams.runtime.worker_process import RestartPolicy, WorkerProcess, child_names, describe_exit

REPO = Path(__file__).resolve().parents[4]
WAIT_S = 30.0

# a worker stand-in: says it is ready; on SIGINT it says so, finishes "its window" (half a second, in which a
# second SIGINT would be seen and said too), and exits 0
CHILD = """
import os, signal, sys, time
role = os.environ["MEMSTREAM_WORKER_ROLE"]
if os.environ.get("CRASH_ROLE") == role:
    sys.exit(3)
stop_at = []
def stop(signum, frame):
    print(f"{role} {os.getpid()} stopped cleanly", flush=True)
    stop_at.append(time.monotonic() + 0.5)
signal.signal(signal.SIGINT, stop)
print(f"{role} {os.getpid()} ready", flush=True)
while not stop_at or time.monotonic() < stop_at[0]:
    time.sleep(0.05)
"""

SUPERVISOR = """
import logging, sys
from infra.settings import Settings
from streams.runtime.worker_process import RestartPolicy, WorkerProcess, supervise
logging.basicConfig(level="INFO", format="%(name)s: %(message)s", stream=sys.stdout)
child = sys.argv[1]
def spawn(settings):
    return WorkerProcess(settings, None, die_with_parent=True, command=[sys.executable, "-c", child])
policy = RestartPolicy(first_backoff_s=0.05, max_backoff_s=0.2, quick_exit_s=60, give_up_after=3)
sys.exit(supervise(Settings(), poll_s=0.05, policy=policy, spawn=spawn))
"""


class Supervisor:
    """The supervisor process, its output in a file the test reads."""

    def __init__(self, log_path: Path, crash_role: str = "") -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
        env.update({"PYTHONPATH": str(REPO), "CRASH_ROLE": crash_role})
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR, CHILD], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def started(self, name: str) -> list[int]:
        """The pids child ``name`` was started with, in order."""
        return [int(pid) for pid in re.findall(rf"child {name} started: pid (\d+)", self.log())]

    def wait_for(self, what: str, done: object, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not (done() if callable(done) else done):
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s:\n{self.log()}"
            time.sleep(0.05)

    def wait_ready(self, name: str, role: str, count: int = 1) -> int:
        """The pid of the ``count``-th start of ``name``, once that process said it is ready."""
        self.wait_for(f"start {count} of {name}", lambda: len(self.started(name)) >= count)
        pid = self.started(name)[count - 1]
        self.wait_for(f"{name} ready", lambda: f"{role} {pid} ready" in self.log())
        return pid

    def exit_code(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the supervisor did not exit within {timeout:.0f}s:\n{self.log()}") from None


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (a container's init may not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sup = Supervisor(tmp_path / "supervisor.log")
    yield sup
    if sup.proc.poll() is None:
        sup.proc.kill()  # its children die with it
        sup.proc.wait()


def test_a_killed_child_is_restarted_and_the_other_keeps_running(supervisor: Supervisor) -> None:
    ingest = supervisor.wait_ready("ingest-0", "ingest")
    sink = supervisor.wait_ready("sink", "sink")
    os.kill(ingest, signal.SIGKILL)
    again = supervisor.wait_ready("ingest-0", "ingest", count=2)
    assert again != ingest
    log = supervisor.log()
    assert f"child ingest-0 (pid {ingest}) died: killed by SIGKILL" in log and "restarting it in" in log, log
    assert supervisor.started("sink") == [sink] and not gone(sink)  # the sink was left alone
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.exit_code() == 0, supervisor.log()
    assert all(gone(pid) for pid in (again, sink))


def test_sigterm_stops_each_child_with_one_sigint(supervisor: Supervisor) -> None:
    pids = {"ingest": supervisor.wait_ready("ingest-0", "ingest"), "sink": supervisor.wait_ready("sink", "sink")}
    supervisor.proc.send_signal(signal.SIGTERM)
    supervisor.proc.send_signal(signal.SIGTERM)  # a second one must not reach the children
    assert supervisor.exit_code() == 0, supervisor.log()
    log = supervisor.log()
    assert "SIGTERM: stopping 2 children" in log
    for role, pid in pids.items():
        assert log.count(f"{role} {pid} stopped cleanly") == 1, log  # a second SIGINT would print it again
        assert gone(pid)
    assert "died" not in log  # a child stopped on request is not restarted


def test_a_crash_loop_makes_it_give_up_and_stop_the_others(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path / "supervisor.log", crash_role="sink")
    ingest = supervisor.wait_ready("ingest-0", "ingest")
    code = supervisor.exit_code()
    log = supervisor.log()
    assert code != 0, log
    assert len(supervisor.started("sink")) == 3, log  # give_up_after=3: started, restarted twice, then no more
    assert "child sink" in log and "exit code 3" in log and "3 times in a row" in log and "giving up" in log, log
    assert f"ingest {ingest} stopped cleanly" in log and gone(ingest)


def test_the_children_die_with_a_killed_supervisor(supervisor: Supervisor) -> None:
    pids = [supervisor.wait_ready("ingest-0", "ingest"), supervisor.wait_ready("sink", "sink")]
    supervisor.proc.kill()
    supervisor.proc.wait()
    supervisor.wait_for("the children's death", lambda: all(gone(pid) for pid in pids))
    assert "stopped cleanly" not in supervisor.log()  # SIGKILLed, as the chaos scenarios mean them to be


def test_backoff_doubles_while_a_child_keeps_dying_up_to_its_cap() -> None:
    policy = RestartPolicy(first_backoff_s=1.0, max_backoff_s=5.0)
    assert [policy.backoff_s(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


def test_children_are_named_by_role() -> None:
    assert child_names(Settings(workers=2).worker_processes()) == ["ingest-0", "ingest-1", "sink"]
    assert child_names(Settings(worker_role="inline", workers=2).worker_processes()) == ["inline-0", "ingest-1"]


def test_a_child_starts_where_it_is_told_so_that_python_m_imports_that_checkout(tmp_path: Path) -> None:
    """``python -m streams`` puts its working directory before PYTHONPATH: a benchmark that runs another
    checkout's serve (tools/perf/serve_ab.py) starts it there."""
    (tmp_path / "probe.py").write_text("import os\nprint('cwd', os.getcwd())\n")
    child = WorkerProcess(Settings(), tmp_path / "child.log", command=[sys.executable, "-m", "probe"], cwd=tmp_path)
    assert child.proc.wait(timeout=30) == 0
    assert (tmp_path / "child.log").read_text().strip() == f"cwd {tmp_path}"
