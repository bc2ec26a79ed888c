"""The sockets of ``memstream serve --workers N`` (streams/surface/serve_group.py): one port, a busy one refused."""

from __future__ import annotations

import socket

import pytest

from infra.settings import Settings
from schemas.errors import ConfigError
from streams.surface.serve_group import child_command, listening_sockets


def test_the_sockets_of_a_group_listen_on_one_port() -> None:
    sockets = listening_sockets("127.0.0.1", 0, 3)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(sockets) == 3 and len(ports) == 1 and 0 not in ports
        assert all(s.get_inheritable() for s in sockets)  # the children get them
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=2):
            pass  # the kernel queued it on one of them: they listen
    finally:
        for s in sockets:
            s.close()


def test_a_port_someone_holds_is_refused_before_any_process_starts() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            listening_sockets("127.0.0.1", port, 2)


def test_another_group_on_the_same_port_is_refused() -> None:
    """SO_REUSEPORT would let a second group of the same user share the port silently: the plain bind first
    refuses it."""
    first = listening_sockets("127.0.0.1", 0, 2)
    try:
        with pytest.raises(ConfigError, match="in use"):
            listening_sockets("127.0.0.1", first[0].getsockname()[1], 2)
    finally:
        for s in first:
            s.close()


def test_children_serve_one_socket_each_and_keep_no_auth() -> None:
    with socket.socket() as sock:
        command = child_command(sock, auth=False)
        assert command[-6:] == ["serve", "--workers", "1", "--listen-fd", str(sock.fileno()), "--no-auth"]
        assert "--no-auth" not in child_command(sock, auth=True)


def test_serve_workers_is_zero_for_one_per_core_or_more() -> None:
    Settings(serve_workers=0).validate()
    with pytest.raises(ConfigError, match="MEMSTREAM_SERVE_WORKERS"):
        Settings(serve_workers=-1).validate()
