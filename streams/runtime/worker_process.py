"""The real ``memstream worker`` as a child process (the demo, the benchmarks), and the supervisor that
``memstream worker`` is when it runs several: by default the ingest path and the index sink, each a process of its
own, so that the sink's decode, merges and compactions never delay an ingest window on a shared event loop."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from infra.settings import Settings

log = logging.getLogger("memstream.workers")

WORKER_COMMAND = (sys.executable, "-m", "streams", "worker")
STOP_TIMEOUT_S = 30.0  # a child still running this long after its SIGINT is killed (its window is redone)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerProcess:
    """The real ``memstream worker`` in a child process, so that its memory and CPU are its own."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path | None,
        *,
        die_with_parent: bool = False,
        command: Sequence[str] = WORKER_COMMAND,
        cwd: Path | None = None,
    ) -> None:
        """``log_path`` None: the child writes to this process' output, in a session of its own, so that a
        Ctrl-C at the terminal reaches only the parent, which passes one SIGINT on (a second one would cut
        faust's clean stop short). ``die_with_parent``: the kernel SIGKILLs the child when this process dies, even
        by SIGKILL (Linux; only from the main thread, whose exit is what the kernel watches). ``cwd``: where the
        child starts; ``python -m streams`` imports the code there before any PYTHONPATH (how a benchmark runs
        another checkout's code: tools/perf/serve_ab.py)."""
        # the parent's MEMSTREAM_* variables are replaced whole: the child runs exactly these settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
        env.update(settings.to_env())
        self.log_path = log_path
        self.interrupted = False
        preexec = _die_with(os.getpid()) if die_with_parent else None
        if log_path is None:
            self.proc = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True, preexec_fn=preexec)
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=out, preexec_fn=preexec)

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash in the middle of whatever it was doing (the fault scenarios)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def interrupt(self) -> None:
        """One SIGINT, never a second: faust would cut its clean stop (the window in hand) short."""
        if not self.interrupted and self.proc.poll() is None:
            self.interrupted = True
            self.proc.send_signal(signal.SIGINT)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT_S) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("worker %d still running %.0fs after SIGINT: killing it", self.proc.pid, timeout)
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def stop(self) -> int:
        self.interrupt()
        return self.wait_stopped()


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` (it runs in the child between fork and exec) asking the kernel for SIGKILL when the parent
    dies: the chaos scenarios SIGKILL `memstream worker`, and the processes doing its work must crash with it,
    not live on as orphans still consuming the partitions."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded before the fork

    def preexec() -> None:
        if libc is None:
            return
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: the kernel will not tell this child
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def start_workers(settings: Settings, log_dir: Path) -> list[WorkerProcess]:
    """``settings.workers`` worker processes (``worker.log``, ``worker-1.log``, ... under ``log_dir``)."""
    return [
        WorkerProcess(each, log_dir / ("worker.log" if i == 0 else f"worker-{i}.log"))
        for i, each in enumerate(settings.worker_processes())
    ]


# --------------------------------------------------------------------------------------------- the supervisor


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts a child that died: after a backoff that doubles while the child keeps dying
    soon after its start, and not at all once it died ``give_up_after`` times in a row that soon (a crash loop,
    such as a broken setting or an unreachable broker, is a clear error, not a spinning CPU)."""

    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    quick_exit_s: float = 60.0  # a child that ran less than this before it died counts towards giving up
    give_up_after: int = 5

    def backoff_s(self, quick_exits: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2.0 ** max(0, quick_exits - 1))


Spawn = Callable[[Settings], WorkerProcess]


def _spawn_worker(settings: Settings) -> WorkerProcess:
    return WorkerProcess(settings, None, die_with_parent=True)


def describe_exit(code: int) -> str:
    if code < 0:
        with_name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"killed by {with_name}"
    return f"exit code {code}"


class Child:
    """One supervised child: a name (``ingest-0``, ``sink``), its settings and its current process."""

    def __init__(self, name: str, settings: Settings, spawn: Spawn) -> None:
        self.name = name
        self.settings = settings
        self.spawn = spawn
        self.quick_exits = 0  # deaths in a row, each sooner than the policy's quick_exit_s after its start
        self.restart_at: float | None = None  # monotonic time of a restart waiting out its backoff
        self.started = 0.0
        self.process = self.start()

    def start(self) -> WorkerProcess:
        self.process = self.spawn(self.settings)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("child %s started: pid %d (role %s)", self.name, self.process.proc.pid, self.settings.worker_role)
        return self.process

    def tend(self, now: float, policy: RestartPolicy) -> bool:
        """Restart a child that died once its backoff is over; False where it keeps dying: give up."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return True
        code = self.process.proc.poll()
        if code is None:
            return True
        ran_s = now - self.started
        self.quick_exits = self.quick_exits + 1 if ran_s < policy.quick_exit_s else 1
        how = f"child {self.name} (pid {self.process.proc.pid}) died: {describe_exit(code)} after {ran_s:.1f}s"
        if self.quick_exits >= policy.give_up_after:
            log.error(
                "%s, %d times in a row within %.0fs of its start: giving up, stopping the others",
                how,
                self.quick_exits,
                policy.quick_exit_s,
            )
            return False
        wait_s = policy.backoff_s(self.quick_exits)
        log.error("%s; restarting it in %.1fs", how, wait_s)
        self.restart_at = now + wait_s
        return True

    @property
    def alive(self) -> bool:
        return self.restart_at is None and self.process.alive


def child_names(children: Sequence[Settings]) -> list[str]:
    """``ingest-0``, ``ingest-1``, ..., ``sink`` (``sink-0``, ``sink-1``... sharded): the names the supervisor's
    log lines give its children."""
    return [
        sink_name(each) if each.worker_role == "sink" else f"{each.worker_role}-{i}" for i, each in enumerate(children)
    ]


def sink_name(settings: Settings) -> str:
    """``sink``, or ``sink-<shard>`` for each shard's sink of a sharded index."""
    return "sink" if settings.index_shards == 1 else f"sink-{settings.sink_shard}"


def supervise(
    settings: Settings,
    poll_s: float = 0.5,
    *,
    policy: RestartPolicy | None = None,
    spawn: Spawn = _spawn_worker,
) -> int:
    """``memstream worker`` as a supervisor of :meth:`Settings.worker_processes` (by default one ingest process
    and one index sink). SIGINT/SIGTERM is passed on as one SIGINT each (each finishes and commits its window or
    batch); a child that dies on its own is restarted (:class:`RestartPolicy`), the others keep running. Returns
    the worst exit code of the last processes, or 1 at least where a crash loop made it give up."""
    policy = policy or RestartPolicy()
    each = settings.worker_processes()
    children = [Child(name, s, spawn) for name, s in zip(child_names(each), each, strict=True)]
    stop_signal: list[int] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # only noted here: the loop below sends the SIGINTs, never in the middle of a restart
        stop_signal.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    gave_up = False
    try:
        while not stop_signal and not gave_up:
            now = time.monotonic()
            gave_up = not all([child.tend(now, policy) for child in children])
            time.sleep(poll_s)
        if stop_signal:
            log.info("%s: stopping %d children", signal.Signals(stop_signal[0]).name, len(children))
        live = [child.process for child in children if child.alive]
        for proc in live:
            proc.interrupt()
        codes = [proc.wait_stopped() for proc in live]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:  # an exception above must not leave children behind
            if child.process.alive:
                child.process.kill()
    worst = max((abs(code) for code in codes), default=0)
    return max(worst, 1) if gave_up else worst
