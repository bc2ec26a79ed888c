"""The real ``memstream worker`` as a child process: used by the demo and the benchmarks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from infra.settings import Settings

log = logging.getLogger("memstream.workers")


class WorkerProcess:
    """The real ``memstream worker`` in a child process, so that its memory and CPU are its own."""

    def __init__(self, settings: Settings, log_path: Path | None) -> None:
        """``log_path`` None: the child writes to this process' output, in a session of its own, so that a
        Ctrl-C at the terminal reaches only the parent, which passes one SIGINT on (a second one would cut
        faust's clean stop short)."""
        # the parent's MEMSTREAM_* variables are replaced whole: the child runs exactly these settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
        env.update(settings.to_env())
        command = [sys.executable, "-m", "streams", "worker"]
        self.log_path = log_path
        if log_path is None:
            self.proc = subprocess.Popen(command, env=env, start_new_session=True)
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=out)

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

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_workers(settings: Settings, log_dir: Path) -> list[WorkerProcess]:
    """``settings.workers`` worker processes (``worker.log``, ``worker-1.log``, ... under ``log_dir``)."""
    return [
        WorkerProcess(each, log_dir / ("worker.log" if i == 0 else f"worker-{i}.log"))
        for i, each in enumerate(settings.worker_processes())
    ]


def supervise(settings: Settings, poll_s: float = 0.5) -> int:
    """``memstream worker`` with ``workers`` > 1: run the processes, pass SIGINT/SIGTERM on as one SIGINT each,
    and return the worst exit code. A process that exits on its own stops the others too (a supervisor such
    as systemd or Kubernetes restarts the whole group; its partitions would otherwise wait for a rebalance)."""
    procs = [WorkerProcess(each, None) for each in settings.worker_processes()]
    stopping = False

    def stop_all(signum: int = signal.SIGINT, frame: FrameType | None = None) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C must not reach the children: faust would cut its clean stop short
            return
        stopping = True
        for proc in procs:
            if proc.alive:
                proc.proc.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("started %d worker processes: %s", len(procs), ", ".join(str(p.proc.pid) for p in procs))
    try:
        while any(proc.alive for proc in procs):
            if not stopping and not all(proc.alive for proc in procs):
                gone = [p for p in procs if not p.alive]
                log.error("worker %d exited with %s: stopping the others", gone[0].proc.pid, gone[0].proc.returncode)
                stop_all()
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            proc.stop()
    return max(abs(int(proc.proc.returncode or 0)) for proc in procs)
