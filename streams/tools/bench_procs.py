"""Process-level figures for ``memstream bench``: resident memory over a run, the sink's maintenance from its log,
and the broker's and Redis' memory beside the data they hold.

Resident memory is sampled from ``/proc/<pid>/status`` (VmRSS) while the run goes on, so that the peak over the
second half of a run can be set beside the first half's: a process whose memory is bounded has about the same
peak in both; one that grows with the data it has seen does not. VmHWM (the kernel's own peak) is reported too:
it also catches a spike between two samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from infra.services import LocalStack

COMPACTED = "LanceDB compacted between batches"
MAINTENANCE_FAILED = "maintenance failed"


def proc_status_kb(pid: int, name: str) -> int | None:
    """A ``kB`` figure (``VmRSS``, ``VmHWM``) from ``/proc/<pid>/status``; None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _mb(kb: float | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


@dataclass
class RssSampler:
    """Samples VmRSS of named processes every ``interval_s`` in the background (one asyncio task)."""

    pids: dict[str, int]
    interval_s: float = 0.5
    # processes started for this run: their VmHWM is this run's peak; a server that ran before (the broker, Redis)
    # has a lifetime peak instead, so its peak is the largest sample
    own: frozenset[str] = frozenset()
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    peaks_kb: dict[str, int] = field(default_factory=dict)  # VmHWM as last read
    started: float = 0.0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()  # the last reading, whenever the caller stops

    def sample(self) -> None:
        now = time.monotonic() - self.started
        reading: dict[str, int] = {}
        for label, pid in self.pids.items():
            rss = proc_status_kb(pid, "VmRSS")
            if rss is not None:
                reading[label] = rss
            hwm = proc_status_kb(pid, "VmHWM")
            if hwm is not None:
                self.peaks_kb[label] = max(hwm, self.peaks_kb.get(label, 0))
        self.samples.append((now, reading))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def figures(self, split_at_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Per process: the peak (VmHWM for the run's own processes, else the largest sample), the sampled
        peak of each half (split at ``split_at_s`` seconds after the start, default the middle of the samples),
        their ratio, and the last reading (MB)."""
        if split_at_s is None:
            split_at_s = self.samples[-1][0] / 2 if self.samples else 0.0
        out: dict[str, dict[str, Any]] = {}
        for label in self.pids:
            first = [r[label] for t, r in self.samples if t < split_at_s and label in r]
            second = [r[label] for t, r in self.samples if t >= split_at_s and label in r]
            first_peak, second_peak = max(first, default=None), max(second, default=None)
            last = next((r[label] for _, r in reversed(self.samples) if label in r), None)
            out[label] = {
                "pid": self.pids[label],
                "peak_rss_mb": _mb(
                    self.peaks_kb.get(label) if label in self.own else max(first + second, default=None)
                ),
                "first_half_peak_mb": _mb(first_peak),
                "second_half_peak_mb": _mb(second_peak),
                "second_vs_first_half": round(second_peak / first_peak, 3) if first_peak and second_peak else None,
                "last_rss_mb": _mb(last),
                "samples": len(first) + len(second),
            }
        return out


def count_in_logs(paths: list[Path], *needles: str) -> dict[str, int]:
    """How many lines of these log files contain each needle."""
    counts = dict.fromkeys(needles, 0)
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            for needle in needles:
                if needle in line:
                    counts[needle] += 1
    return counts


def maintenance_from_logs(paths: list[Path]) -> dict[str, Any]:
    """The sink's compactions between batches, from the worker logs (it logs each at INFO, failures at WARNING)."""
    counts = count_in_logs(paths, COMPACTED, MAINTENANCE_FAILED)
    ran, failed = counts[COMPACTED], counts[MAINTENANCE_FAILED]
    return {"compactions": ran, "compactions_failed": failed, "every_compaction_succeeded": failed == 0}


def infra_pids(home: Path, ports: dict[str, int | None]) -> dict[str, int]:
    """The broker's and Redis' pids: the embedded stack's (``memstream up`` under ``home``), else the local process
    listening on the configured port, where this user may read it (a remote server's memory is not ours to read)."""
    try:
        running = {("broker" if name == "kafka" else name): s.pid for name, s in LocalStack(home).running().items()}
    except Exception:  # a missing or unreadable state file: no embedded stack
        running = {}
    for label, port in ports.items():
        if label not in running and port is not None:
            pid = listening_pid(port)
            if pid is not None:
                running[label] = pid
    return running


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on local TCP ``port`` (from ``/proc/net/tcp*`` and the processes' open
    sockets), or None when none of ours is."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def port_of(url: str) -> int | None:
    """The port of ``host:port`` or ``redis://host:port/db`` when the host is this machine's, else None."""
    first = url.split(",")[0]
    parsed = urlsplit(first if "://" in first else f"kafka://{first}")
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return parsed.port


async def redis_used_memory(client: Any) -> dict[str, int]:
    """Redis' own view of its memory (works for any server, embedded or not)."""
    info = await client.info("memory")
    return {"used_memory": int(info.get("used_memory", 0)), "used_memory_rss": int(info.get("used_memory_rss", 0))}


def infra_figures(
    pids: dict[str, int],
    before_kb: dict[str, int],
    redis_before: dict[str, int],
    redis_after: dict[str, int],
    memories: int,
) -> dict[str, Any]:
    """The broker's and Redis' RSS now, their growth since the ``before`` readings, and both per memory stored
    (the growth is the fairer figure: a server may hold other data, or have started bigger)."""
    out: dict[str, Any] = {"memories": memories}
    per = (lambda b: round(b / memories, 1)) if memories else (lambda b: None)
    for label, pid in pids.items():
        rss = proc_status_kb(pid, "VmRSS")
        if rss is None:
            continue
        out[label] = {
            "rss_mb": _mb(rss),
            "rss_before_mb": _mb(before_kb.get(label)),
            "bytes_per_memory": per(rss * 1024),
            "growth_bytes_per_memory": per((rss - before_kb.get(label, rss)) * 1024),
        }
    if redis_after:
        used = redis_after["used_memory"]
        out["redis_used_memory_mb"] = round(used / 2**20, 1)
        out["redis_used_growth_bytes_per_memory"] = per(used - redis_before.get("used_memory", used))
    return out


def rss_now_kb(pids: dict[str, int]) -> dict[str, int]:
    return {label: kb for label, pid in pids.items() if (kb := proc_status_kb(pid, "VmRSS")) is not None}


# --------------------------------------------------------------------------------------------- CPU per event

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far, all its threads (``/proc/<pid>/stat`` fields 14 and 15);
    None when the process is gone. Children it reaped are not in it: each process is counted on its own."""
    times = proc_cpu_times(pid)
    return None if times is None else times[0]


def proc_cpu_times(pid: int) -> tuple[float, float] | None:
    """(its own, the children it reaped) user + system CPU seconds of ``pid`` so far, from one read of
    ``/proc/<pid>/stat`` (fields 14-15 and 16-17; the children's: Redis' AOF rewrites); None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


FORKING = frozenset({"redis"})  # processes whose forked children do their work: counted as "<label> forks"


async def wait_quiet(
    pids: Mapping[str, int], *, busy_below: float = 0.05, window_s: float = 0.25, timeout_s: float = 15.0
) -> float:
    """Wait until the processes together use less than ``busy_below`` of a core over ``window_s``, at most
    ``timeout_s``; returns the seconds waited. Why: a phase's load driver stops at its deadline with requests still
    queued in the server (at 1M memories, 32 connections of 30-70 ms requests are seconds of work), and what they
    cost landed in the next phase: its CPU per request and, as a stall of its first requests, its p99."""
    started = time.monotonic()
    while True:
        window = CpuSampler(dict(pids))
        window.start()
        await asyncio.sleep(window_s)
        used = sum(window.seconds().values())
        waited = time.monotonic() - started
        if used < busy_below * window_s or waited >= timeout_s:
            return waited


def child_pids(parent: int) -> list[int]:
    """The live children of ``parent`` (their ``/proc/<pid>/stat`` ppid), oldest first."""
    found: list[tuple[int, int]] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            after = (proc / "stat").read_text().rpartition(")")[2].split()
            if int(after[1]) == parent:
                found.append((int(after[19]), int(proc.name)))  # field 22: start time, in clock ticks
        except (OSError, ValueError, IndexError):
            continue
    return [pid for _, pid in sorted(found)]


def proc_env(pid: int, name: str) -> str | None:
    """One variable of a process' start-up environment (``/proc/<pid>/environ``: our own processes only)."""
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            key, _, value = item.partition(b"=")
            if key.decode(errors="replace") == name:
                return value.decode(errors="replace")
    except OSError:
        return None
    return None


def worker_children(supervisor: int) -> dict[str, int]:
    """The children of a ``memstream worker`` supervisor by the name it gives them (``ingest-0``, ``sink``, and
    ``sink-0``, ``sink-1``... for a sharded index): the role each was started with (``MEMSTREAM_WORKER_ROLE``),
    numbered as the supervisor numbers them, a sink by its shard (``MEMSTREAM_INDEX_SHARD``)."""
    out: dict[str, int] = {}
    for i, pid in enumerate(child_pids(supervisor)):
        role = proc_env(pid, "MEMSTREAM_WORKER_ROLE") or "child"
        if role == "sink":  # as the supervisor names it (streams/runtime/worker_process.py sink_name)
            sharded = proc_env(pid, "MEMSTREAM_INDEX_SHARDS") not in (None, "", "1")
            out[f"sink-{proc_env(pid, 'MEMSTREAM_INDEX_SHARD')}" if sharded else "sink"] = pid
        else:
            out[f"{role}-{i}"] = pid
    return out


@dataclass
class CpuSampler:
    """CPU seconds (user + system) each named process spent between :meth:`start` and :meth:`stop`.

    ``sample`` reads every process now, so that one that exits before ``stop`` keeps its last reading; a process
    that is only known once it ran (a finished subprocess, measured by ``os.wait4``) is given by :meth:`record`.
    Redis rewrites its append-only file in a forked child (4-5 s of CPU over 200k events of a bulk load): what
    the children it reaped spent is a process of its own, ``redis forks``, beside ``redis``."""

    pids: dict[str, int]
    before: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    recorded: dict[str, float] = field(default_factory=dict)

    def readings(self) -> dict[str, float]:
        """Every process' CPU so far, and the reaped children's of the FORKING ones."""
        now: dict[str, float] = {}
        for label, pid in self.pids.items():
            times = proc_cpu_times(pid)
            if times is not None:
                now[label] = times[0]
                if label in FORKING:
                    now[f"{label} forks"] = times[1]
        return now

    def start(self) -> None:
        self.before = self.readings()
        self.last = dict(self.before)

    def add(self, label: str, pid: int) -> None:
        """A process started after :meth:`start`: all of its CPU counts."""
        self.pids[label] = pid
        self.before.setdefault(label, 0.0)
        self.sample()

    def record(self, label: str, seconds: float) -> None:
        self.recorded[label] = self.recorded.get(label, 0.0) + seconds

    def sample(self) -> None:
        self.last.update(self.readings())

    def seconds(self) -> dict[str, float]:
        self.sample()
        spent = {label: self.last[label] - self.before.get(label, 0.0) for label in self.last}
        for label, seconds in self.recorded.items():
            spent[label] = spent.get(label, 0.0) + seconds
        return spent

    def figures(self, units: int, unit: str = "event") -> dict[str, Any]:
        """Per process: pid, CPU seconds and µs per ``unit``; and their sum (``total``)."""
        spent = self.seconds()
        per = f"cpu_us_per_{unit}"

        def each(seconds: float) -> dict[str, Any]:
            return {"cpu_s": round(seconds, 3), per: round(seconds * 1e6 / units, 1) if units else None}

        out: dict[str, Any] = {label: {"pid": self.pids.get(label), **each(s)} for label, s in spent.items()}
        out["total"] = each(sum(spent.values()))
        return out


def wait_with_cpu(proc: Any) -> tuple[int, float]:
    """Wait for a ``subprocess.Popen`` child and return its exit code and the CPU seconds it (and the children it
    reaped) spent, from ``os.wait4``: a finished process has no ``/proc`` entry left to read."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime
