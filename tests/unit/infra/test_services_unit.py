"""infra.services without any server: port choice, state objects, ManagedProcess failure paths, state files."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import services
from infra.services import LocalStack, ManagedProcess, PortInUseError, ServiceState, StackState, free_port
from schemas.errors import ServiceError


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def hold_port(socks: list[socket.socket], *, listen: bool = True) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    if listen:
        sock.listen()
    socks.append(sock)
    port: int = sock.getsockname()[1]
    return port


def can_listen(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


# ----------------------------------------------------------------------------------------------- free_port


def test_free_port_without_preference_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536 and can_listen(port)


def test_free_port_keeps_a_free_preferred_port() -> None:
    preferred = free_port()
    assert free_port(preferred) == preferred


def test_free_port_avoids_a_listening_port(held: list[socket.socket]) -> None:
    taken = hold_port(held)
    assert not services.port_is_free(taken)
    other = free_port(taken)
    assert other != taken and can_listen(other)


def test_free_port_avoids_a_bound_port_that_does_not_listen(held: list[socket.socket]) -> None:
    taken = hold_port(held, listen=False)
    assert free_port(taken) != taken


@pytest.mark.parametrize("preferred", [None, 0, -1, 70000])
def test_free_port_ignores_impossible_preferences(preferred: int | None) -> None:
    port = free_port(preferred)
    assert 0 < port < 65536 and can_listen(port)


def test_port_is_free_after_the_holder_closes(held: list[socket.socket]) -> None:
    port = hold_port(held)
    held.pop().close()
    assert services.port_is_free(port)


# ------------------------------------------------------------------------------------------- state objects


def test_states_serialise_to_json(tmp_path: Path) -> None:
    kafka = ServiceState("kafka", 11, "127.0.0.1", 41233, "127.0.0.1:41233", True, tmp_path / "k.log", 9092)
    redis = ServiceState("redis", 12, "127.0.0.1", 6390, "redis://127.0.0.1:6390/0", False, tmp_path / "r.log", 6390)
    state = StackState(kafka=kafka, redis=redis, home=tmp_path)
    assert kafka.port_changed and not redis.port_changed and not state.running
    data = json.loads(json.dumps(state.to_dict()))
    assert data["kafka"]["port"] == 41233 and data["kafka"]["requested_port"] == 9092
    assert data["redis"]["log_path"] == str(tmp_path / "r.log") and data["home"] == str(tmp_path)
    assert state.kafka_bootstrap == "127.0.0.1:41233" and state.redis_url == "redis://127.0.0.1:6390/0"


def test_urls() -> None:
    assert services.kafka_url("127.0.0.1", 9092) == "127.0.0.1:9092"
    assert services.redis_url("127.0.0.1", 6390) == "redis://127.0.0.1:6390/0"


# ------------------------------------------------------------------------------- ManagedProcess, no server


def fake(tmp_path: Path, code: str, port: int, ready_marker: str | None = None) -> ManagedProcess:
    argv = [sys.executable, "-c", code]
    return ManagedProcess("fake", argv, tmp_path / "logs" / "fake.log", port, ready_marker=ready_marker)


def test_a_server_that_exits_reports_its_log(tmp_path: Path) -> None:
    proc = fake(tmp_path, "print('boom: bad config'); raise SystemExit(3)", free_port())
    with pytest.raises(ServiceError, match=r"(?s)status 3.*boom: bad config"):
        proc.start(timeout=5)
    assert proc.pid is None and not proc.alive


def test_a_server_that_loses_its_port_raises_port_in_use(tmp_path: Path) -> None:
    proc = fake(tmp_path, "print('bind: Address already in use'); raise SystemExit(1)", free_port())
    with pytest.raises(PortInUseError):
        proc.start(timeout=5)


def test_a_server_that_never_answers_times_out_and_is_killed(tmp_path: Path) -> None:
    proc = fake(tmp_path, "import time; print('starting', flush=True); time.sleep(30)", free_port())
    with pytest.raises(ServiceError, match=r"(?s)not ready .* within 0.3 s.*starting"):
        proc.start(timeout=0.3)
    assert proc.pid is None


def test_the_ready_marker_must_appear_since_this_start(tmp_path: Path, held: list[socket.socket]) -> None:
    port = hold_port(held)  # something answers TCP on the port, but it is not our process
    log = tmp_path / "logs" / "fake.log"
    log.parent.mkdir(parents=True)
    log.write_text("READY from an earlier run\n")
    proc = fake(tmp_path, "import time; time.sleep(30)", port, ready_marker="READY")
    with pytest.raises(ServiceError, match="not ready"):
        proc.start(timeout=0.3)


def test_a_ready_fake_server_can_be_stopped_and_killed(tmp_path: Path, held: list[socket.socket]) -> None:
    port = hold_port(held)  # stands in for the listener; the marker proves readiness
    proc = fake(tmp_path, "import time; print('READY', flush=True); time.sleep(30)", port, ready_marker="READY")
    proc.start(timeout=5)
    pid = proc.pid
    assert pid is not None and proc.alive and proc.owned()
    assert proc.start() is proc and proc.pid == pid  # already running: a no-op
    proc.stop(timeout=2)
    assert not services.pid_alive(pid) and proc.pid is None
    proc.start(timeout=5)
    pid = proc.pid
    proc.kill()
    assert pid is not None and not services.pid_alive(pid)
    assert "READY" in proc.log_tail()


def test_a_missing_binary_is_a_service_error(tmp_path: Path) -> None:
    proc = ManagedProcess("ghost", [str(tmp_path / "no-such-binary")], tmp_path / "g.log", free_port())
    with pytest.raises(ServiceError, match="cannot run ghost"):
        proc.start(timeout=1)


# ------------------------------------------------------------------------------------ LocalStack, no server


def test_status_and_down_without_state(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "nothing")
    assert stack.status() is None
    assert stack.down() is None


def test_a_broken_state_file_is_a_service_error(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    stack.state_path.write_text("{not json")
    with pytest.raises(ServiceError, match=r"stack\.json"):
        stack.status()


def test_a_dead_pid_in_the_state_file_is_not_running(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    record = {"pid": 2**22 + 12345, "host": "127.0.0.1", "port": 1, "argv": ["/nonexistent/redis-server"]}
    stack.state_path.write_text(json.dumps({"services": {"kafka": record, "redis": record}}))
    status = stack.status()
    assert status is not None and not status.running
    assert status.kafka.url == "127.0.0.1:1" and status.redis.url == "redis://127.0.0.1:1/0"
    down = stack.down()
    assert down is not None and not stack.state_path.exists()


def test_binaries_are_found() -> None:
    assert Path(services.broker_binary()).exists()
    assert Path(services.redis_binary()).exists()
