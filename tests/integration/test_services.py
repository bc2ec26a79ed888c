"""The local services for real: Tansu and Redis processes, aiokafka and redis-py talking to them, LocalStack."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra import services
from infra.kafka import ensure_topics
from infra.redis_store import RedisCacheStore
from infra.services import LocalStack, ManagedProcess, PortInUseError
from infra.settings import Settings
from processors.model import MemoryRow
from schemas.events import Scope
from tests.integration.helpers import make_settings, read_topic

REPO = Path(__file__).resolve().parents[2]
Starter = Callable[..., ManagedProcess]


@pytest.fixture
def listening() -> Iterator[list[socket.socket]]:
    """Sockets a test binds and listens on to make ports look taken; closed afterwards."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def take_port(socks: list[socket.socket]) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    socks.append(sock)
    port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A LocalStack under a temporary home, always brought down afterwards."""
    local = LocalStack(tmp_path / "home")
    try:
        yield local
    finally:
        local.down()


# ------------------------------------------------------------------ the session servers and their clients


def test_session_servers_answer(broker: ManagedProcess, redis_server: ManagedProcess) -> None:
    assert broker.alive and broker.owned() and broker.answering()
    assert redis_server.alive and redis_server.owned() and redis_server.answering()
    assert services.kafka_ping(broker.host, broker.port)
    assert services.redis_ping(redis_server.host, redis_server.port)
    # each speaks only its own protocol
    assert not services.redis_ping(broker.host, broker.port, timeout=0.2)
    assert not services.kafka_ping(redis_server.host, redis_server.port, timeout=0.2)


async def test_kafka_round_trip(kafka_bootstrap: str, settings: Settings) -> None:
    topic = f"{settings.topic_prefix}roundtrip"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        sent = {}
        for i in range(6):
            meta = await producer.send_and_wait(topic, value=f"v{i}".encode(), key=f"k{i}".encode(), partition=i % 2)
            sent[f"k{i}"] = (meta.partition, f"v{i}")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        got: dict[str, tuple[int, str]] = {}
        async with asyncio.timeout(10):
            while len(got) < len(sent):
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        assert record.key is not None and record.value is not None
                        got[record.key.decode()] = (record.partition, record.value.decode())
    finally:
        await consumer.stop()
    assert got == sent
    assert {partition for partition, _ in got.values()} == {0, 1}


async def test_redis_round_trip(redis_url: str, settings: Settings) -> None:
    client = aioredis.from_url(redis_url)
    try:
        assert await client.ping()
        key = f"{settings.redis_prefix}hello"
        await client.set(key, "world")
        assert await client.get(key) == b"world"
        await client.delete(key)
    finally:
        await client.aclose()


_EARLIER_RUNS: list[Settings] = []  # the settings fixture's values in earlier runs of the test below


@pytest.mark.parametrize("run", ["first", "second"])
async def test_settings_fixture_isolates_tests(
    run: str, settings: Settings, tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    """What one test writes under its settings, another test's settings do not see: Redis memories, topic
    records, consumer groups, LanceDB. It runs twice, so the second run holds a second instance of the fixture
    and must not see what the first wrote; each run is also checked against two settings built by make_settings
    and against the defaults (what a fixture that forgot to isolate would hand out)."""
    others = [*_EARLIER_RUNS, *(make_settings(tmp_path / name, kafka_bootstrap, redis_url) for name in "bc")]
    everyone = [settings, *others, Settings(home=tmp_path / "defaults")]
    for attribute in ("topic_prefix", "redis_prefix", "group_id", "sink_group_id", "lancedb_path"):
        values = [getattr(s, attribute) for s in everyone]
        assert len(set(values)) == len(values), (attribute, values)
    settings.validate()
    _EARLIER_RUNS.append(settings)

    # Redis: this run's store holds exactly the memory it wrote (not an earlier run's); no other store holds it
    client = aioredis.from_url(redis_url)
    try:
        mine = RedisCacheStore(client, settings.redis_prefix)
        await mine.apply([_memory_row(f"m-{run}")])
        assert set(await mine.states()) == {f"acme/m-{run}"}
        for other in others:
            assert f"acme/m-{run}" not in await RedisCacheStore(client, other.redis_prefix).states()
    finally:
        await client.aclose()

    # Kafka: this run's events topic holds exactly its own record; another's does not hold it (a sentinel sent
    # there after it, and read back, shows that topic was read past the point the record would be at)
    other = others[-1]
    for each in (settings, other):
        await ensure_topics(each, [each.topics.events])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topics.events, run.encode(), key=b"m1")
        await producer.send_and_wait(other.topics.events, b"sentinel", key=b"m1")
    finally:
        await producer.stop()
    for each, want in ((settings, run.encode()), (other, b"sentinel")):
        seen = await read_topic(each, each.topics.events, lambda rs, want=want: any(r.value == want for r in rs))
        assert [r.value for r in seen] == [want], each.topics.events


def _memory_row(memory_id: str) -> MemoryRow:
    return MemoryRow(memory_id, Scope("acme", "u1"), "t", {}, 1, "e", "h", False, 1, b"\0" * 32)


# ----------------------------------------------------------------------------------- ManagedProcess


@pytest.mark.parametrize("start", [services.start_broker, services.start_redis], ids=["kafka", "redis"])
def test_start_and_stop(tmp_path: Path, start: Starter) -> None:
    proc: ManagedProcess = start(tmp_path)
    pid = proc.pid
    assert pid is not None and proc.alive and proc.answering()
    assert proc.log_path.parent == tmp_path / "logs" and proc.log_path.exists()
    proc.stop()
    assert not proc.alive and proc.pid is None
    assert not services.pid_alive(pid)
    assert not proc.answering(timeout=0.2)
    assert services.port_is_free(proc.port)


def test_redis_kill_then_restart_on_the_same_port(tmp_path: Path) -> None:
    proc = services.start_redis(tmp_path)
    try:
        port, first_pid = proc.port, proc.pid
        proc.kill()
        assert not proc.alive and not proc.answering(timeout=0.2)
        assert first_pid is not None and not services.pid_alive(first_pid)
        proc.restart()
        assert proc.port == port and proc.pid not in (None, first_pid)
        assert proc.alive and services.redis_ping(proc.host, port)
    finally:
        proc.stop()


def test_broker_kill_then_restart(tmp_path: Path) -> None:
    proc = services.start_broker(tmp_path)
    try:
        port = proc.port
        proc.kill()
        assert not proc.answering(timeout=0.2)
        proc.restart()
        assert proc.port == port and services.kafka_ping(proc.host, port)
    finally:
        proc.stop()


@pytest.mark.parametrize("start", [services.start_broker, services.start_redis], ids=["kafka", "redis"])
def test_exact_port_taken_raises(tmp_path: Path, start: Starter, listening: list[socket.socket]) -> None:
    port = take_port(listening)
    with pytest.raises(PortInUseError, match=str(port)):
        start(tmp_path, port)


# --------------------------------------------------------------------------------------------- LocalStack


def test_stack_up_is_idempotent_and_down_stops_both(stack: LocalStack) -> None:
    kafka_port, redis_port = services.free_port(), services.free_port()
    first = stack.up(kafka_port=kafka_port, redis_port=redis_port)
    assert first.running and not first.kafka.reused and not first.redis.reused
    assert first.kafka.url == f"127.0.0.1:{first.kafka.port}"
    assert first.redis.url == f"redis://127.0.0.1:{first.redis.port}/0"
    assert stack.state_path.exists() and first.kafka.log_path.parent == stack.log_dir

    # the stack's Redis keeps an append-only file, rewritten only after it grew 4x (services.AOF_REWRITE_PERCENTAGE)
    with redis_lib.Redis(port=first.redis.port) as client:
        config = client.config_get("appendonly") | client.config_get("auto-aof-rewrite-percentage")
    assert config == {"appendonly": "yes", "auto-aof-rewrite-percentage": "400"}, config

    second = stack.up(kafka_port=kafka_port, redis_port=redis_port)
    assert (second.kafka.pid, second.redis.pid) == (first.kafka.pid, first.redis.pid)
    assert second.kafka.reused and second.redis.reused

    status = LocalStack(stack.home).status()  # a fresh handle: everything comes from stack.json
    assert status is not None and status.running
    assert (status.kafka.pid, status.redis.pid) == (first.kafka.pid, first.redis.pid)
    data = json.loads(json.dumps(status.to_dict()))
    assert data["kafka"]["url"] == first.kafka.url and data["redis"]["port"] == first.redis.port
    recorded = json.loads(stack.state_path.read_text())["services"]
    assert recorded["kafka"]["pid"] == first.kafka.pid and recorded["redis"]["url"] == first.redis.url

    down = LocalStack(stack.home).down()
    assert down is not None and not down.running
    assert (down.kafka.pid, down.redis.pid) == (first.kafka.pid, first.redis.pid)
    assert not services.pid_alive(first.kafka.pid) and not services.pid_alive(first.redis.pid)
    assert not stack.state_path.exists()
    assert stack.status() is None and stack.down() is None


def test_stack_takes_another_port_when_the_preferred_one_is_taken(
    stack: LocalStack, listening: list[socket.socket]
) -> None:
    kafka_taken, redis_taken = take_port(listening), take_port(listening)
    state = stack.up(kafka_port=kafka_taken, redis_port=redis_taken)
    assert state.running
    assert state.kafka.port != kafka_taken and state.kafka.requested_port == kafka_taken and state.kafka.port_changed
    assert state.redis.port != redis_taken and state.redis.requested_port == redis_taken and state.redis.port_changed
    status = stack.status()
    assert status is not None and status.kafka.port == state.kafka.port and status.kafka.requested_port == kafka_taken
    assert services.kafka_ping("127.0.0.1", state.kafka.port)
    assert services.redis_ping("127.0.0.1", state.redis.port)


def test_stack_replaces_a_dead_service_and_reuses_the_live_one(stack: LocalStack) -> None:
    first = stack.up(kafka_port=None, redis_port=None)
    os.kill(first.redis.pid, signal.SIGKILL)
    assert services_wait_gone(first.redis.pid)
    status = stack.status()
    assert status is not None and status.kafka.running and not status.redis.running
    second = stack.up(kafka_port=None, redis_port=None)
    assert second.running and second.kafka.reused and second.kafka.pid == first.kafka.pid
    assert not second.redis.reused and second.redis.pid != first.redis.pid


def test_stack_daemons_outlive_the_process_that_started_them(stack: LocalStack) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from infra.services import LocalStack
        state = LocalStack(Path({str(stack.home)!r})).up(kafka_port=None, redis_port=None)
        print(state.kafka.pid, state.redis.pid)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    )
    kafka_pid, redis_pid = map(int, out.stdout.split())
    status = stack.status()
    assert status is not None and status.running
    assert (status.kafka.pid, status.redis.pid) == (kafka_pid, redis_pid)
    stack.down()
    assert services_wait_gone(kafka_pid) and services_wait_gone(redis_pid)


def test_down_never_signals_a_stranger(stack: LocalStack) -> None:
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        stack.home.mkdir(parents=True)
        record = {"pid": stranger.pid, "host": "127.0.0.1", "port": 1, "argv": [services.redis_binary()]}
        stack.state_path.write_text(json.dumps({"services": {"kafka": record, "redis": record}}))
        status = stack.status()
        assert status is not None and not status.running
        assert stack.down() is not None
        assert stranger.poll() is None  # still running
        assert not stack.state_path.exists()
    finally:
        stranger.kill()
        stranger.wait()


def services_wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while services.pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
