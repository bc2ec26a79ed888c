"""``memstream serve --workers N``: N server processes on one port, each with its own connections and caches.

Why processes: one Python process tops out near one core, and most of a search's cost is per request (HTTP,
auth, validation, the event loop), not per row. Why it stays correct: every process validates its cached reads
by the same Redis generations (streams/runtime/reading.py), so a write that bumps a scope's generation makes
every process's cached value of it stale at once.

How: this process binds N listening sockets with ``SO_REUSEPORT`` on the port (the kernel spreads new
connections over them) and starts N ``memstream serve`` children, each serving one of them (``--listen-fd``).
The port is first bound without ``SO_REUSEPORT``, so a busy port (another ``serve`` of the same user included)
is refused here, once, before any child starts. The children run in sessions of their own: a Ctrl-C at the
terminal reaches this process only, which passes one SIGTERM to each (a second signal would cut aiohttp's
cleanup short). A child that exits on its own stops the others (a supervisor restarts the group), and a child
whose parent is gone stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from infra.machine import usable_cores
from infra.settings import Settings
from schemas.errors import ConfigError

log = logging.getLogger("memstream.http")

STOP_TIMEOUT_S = 30.0
PARENT_CHECK_S = 1.0
BACKLOG = 1024


def default_workers() -> int:
    """One serve process per core this process may run on."""
    return usable_cores()


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` in one ``SO_REUSEPORT`` group (port 0: a free one)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # without SO_REUSEPORT: fails if anyone holds it
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror} (another server holds it?)") from None
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
            address = sock.getsockname()  # port 0: the others join the port the first one got
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
    return sockets


def child_command(sock: socket.socket, *, auth: bool) -> list[str]:
    command = [sys.executable, "-m", "streams", "serve", "--workers", "1", "--listen-fd", str(sock.fileno())]
    return command if auth else [*command, "--no-auth"]


def run_group(settings: Settings, host: str, port: int, count: int, *, auth: bool) -> int:
    """Serve with ``count`` child processes until SIGINT/SIGTERM; returns the worst exit code of the children."""
    sockets = listening_sockets(host, port, count)
    # the parent's MEMSTREAM_* variables are replaced whole: the children run exactly these (resolved) settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
    env.update(settings.to_env())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for sock in sockets:
            procs.append(
                subprocess.Popen(
                    child_command(sock, auth=auth), env=env, pass_fds=(sock.fileno(),), start_new_session=True
                )
            )
    finally:
        for sock in sockets:  # the children hold them now; this process accepts nothing
            sock.close()
    bound = f"{host}:{port or sockets[0].getsockname()[1]}" if sockets else f"{host}:{port}"
    log.info("serving on %s with %d processes: %s", bound, len(procs), ", ".join(str(p.pid) for p in procs))
    return supervise(procs)


def supervise(procs: list[subprocess.Popen[bytes]], poll_s: float = 0.2) -> int:
    """Pass SIGINT/SIGTERM on as one SIGTERM each; one child exiting on its own stops the others."""
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C must not reach the children: it would cut their cleanup short
            return
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(proc.poll() is None for proc in procs):
            gone = [p for p in procs if p.poll() is not None]
            if gone and not stopping:
                log.error("serve process %d exited with %s: stopping the others", gone[0].pid, gone[0].returncode)
                stop_all()
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_all()
        for proc in procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("serve process %d did not stop in %.0f s: killed", proc.pid, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
    return max(abs(proc.returncode or 0) for proc in procs) if procs else 0


async def stop_when_orphaned(parent: int) -> None:
    """In a child: SIGTERM to itself (aiohttp's clean stop) once the parent that started it is gone (killed with
    SIGKILL, it could not pass a signal on; the child, in a session of its own, would otherwise serve forever)."""
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_CHECK_S)
    log.warning("serve process %d: its parent %d is gone, stopping", os.getpid(), parent)
    with contextlib.suppress(ProcessLookupError):
        os.kill(os.getpid(), signal.SIGTERM)
