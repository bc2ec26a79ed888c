"""A Redis Cluster that cannot serve is refused with the cause, and a MOVED redirect is never reported as an outage.

Real ``redis-server`` processes in cluster mode: one node alone (no slots, or half of them: ``cluster_state:fail``),
and two masters that split the slots (a single-node client meets MOVED for a key of the other node's slot; the
cluster client that a plain URL of either node gets follows it). The working cluster: test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from infra import services
from infra.redis_store import check_credentials, connect, guarded, open_redis
from schemas.errors import RedisClusterError, StoreError

pytestmark = pytest.mark.integration


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port and free too."""
    for _ in range(200):
        port = services.free_port()
        if port + 10000 < 65536 and services.port_is_free(port + 10000):
            return port
    raise AssertionError("no free port pair for a cluster node")


def _cluster_node(home: Path) -> services.ManagedProcess:
    proc = services.redis_process(home, _cluster_port())
    proc.argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(home / f"nodes-{proc.port}.conf")]
    return proc.start()


@pytest.fixture
async def two_masters(tmp_path: Path) -> AsyncIterator[tuple[services.ManagedProcess, services.ManagedProcess]]:
    """Two cluster nodes, a with the low half of the slots and b with the high half, each knowing the other's."""
    a = _cluster_node(tmp_path / "a")
    b = _cluster_node(tmp_path / "b")
    try:
        await _split_slots(a, b)
        yield a, b
    finally:
        a.stop()
        b.stop()


async def _split_slots(a: services.ManagedProcess, b: services.ManagedProcess) -> None:
    """Give a the low half of the slots and b the high half, introduce them, and wait until a knows b's half."""
    ca, cb = aioredis.Redis(host=a.host, port=a.port), aioredis.Redis(host=b.host, port=b.port)
    await ca.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
    await cb.execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
    await ca.execute_command("CLUSTER", "MEET", b.host, b.port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = (await ca.execute_command("CLUSTER", "INFO")).decode()
        if "cluster_state:ok" in info and len(await ca.execute_command("CLUSTER", "SLOTS")) == 2:
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"node {a.port} never learned node {b.port}'s slots")
    await cb.aclose()
    await ca.aclose()


@pytest.mark.parametrize("slots", [None, (0, 8191)], ids=["no-slots", "half-the-slots"])
async def test_a_cluster_that_cannot_serve_is_refused_at_start_with_the_cause(
    tmp_path: Path, slots: tuple[int, int] | None
) -> None:
    node = _cluster_node(tmp_path)
    try:
        if slots is not None:
            admin = aioredis.Redis(host=node.host, port=node.port)
            await admin.execute_command("CLUSTER", "ADDSLOTSRANGE", *slots)
            await admin.aclose()
        client = await open_redis(services.redis_url(node.host, node.port))  # detected: cluster_enabled:1
        assert isinstance(client, RedisCluster)
        with pytest.raises(RedisClusterError, match=r"Redis Cluster that cannot serve every slot") as caught:
            await check_credentials(client, f"{node.host}:{node.port}")
        assert "unreachable" not in str(caught.value)
        await client.aclose()
    finally:
        node.stop()


async def test_a_plain_redis_passes_the_check(redis_url: str) -> None:
    client = await open_redis(redis_url)
    assert isinstance(client, aioredis.Redis)  # a single node keeps the single-node client
    assert await check_credentials(client, "the test Redis") is True
    await client.aclose()


async def test_a_moved_redirect_names_the_cluster_and_a_detected_node_follows_it(
    two_masters: tuple[services.ManagedProcess, services.ManagedProcess],
) -> None:
    a, b = two_masters
    key = next(k for k in (f"k{i}" for i in range(1000)) if key_slot(k.encode()) >= 8192)  # one of b's slots
    client = connect(services.redis_url(a.host, a.port))  # the single-node client, without detection
    with pytest.raises(StoreError) as caught:
        await guarded("reading one memory", lambda: client.get(key))
    message = str(caught.value)
    assert isinstance(caught.value, RedisClusterError)
    assert "Redis Cluster node" in message and f"at {b.host}:{b.port}" in message, message
    assert "redis+cluster://" in message and "unreachable" not in message
    assert caught.value.retriable  # waits as a compensation; never dead-letters a window
    with pytest.raises(RedisClusterError, match="reached with a single-node client"):
        await check_credentials(client, f"{a.host}:{a.port}")
    await client.aclose()

    # the same URL, opened as memstream opens it, gets the cluster client: the redirect is followed
    detected = await open_redis(services.redis_url(a.host, a.port))
    assert await check_credentials(detected, f"{a.host}:{a.port}") is True
    await guarded("writing one key", lambda: detected.set(key, b"v", ex=60))
    assert await guarded("reading one key", lambda: detected.get(key)) == b"v"
    await detected.aclose()


async def test_a_cluster_client_whose_first_seed_is_down_starts_from_the_next(
    two_masters: tuple[services.ManagedProcess, services.ManagedProcess],
) -> None:
    """A process started after a node died (its replica serving) must not depend on that node being its seed."""
    a, _ = two_masters  # a's seed is enough: the client learns b's half of the slots from a
    dead = services.free_port()
    client = connect(f"redis+cluster://127.0.0.1:{dead},{a.host}:{a.port}")
    assert await check_credentials(client, "seeds") is True
    for key in (f"k{i}" for i in range(20)):  # keys of both masters' slots
        await guarded("writing one key", lambda key=key: client.set(key, b"v", ex=60))  # type: ignore[misc]
    await client.aclose()
    alone = connect(f"redis+cluster://127.0.0.1:{dead}")  # the same dead node as the only seed: an outage
    assert await check_credentials(alone, "one dead seed") is False
    await alone.aclose()


async def test_an_unreachable_cluster_is_an_outage_not_a_refusal() -> None:
    """As with one Redis: the worker starts and compensates until the cluster answers."""
    client = connect(f"redis+cluster://127.0.0.1:{services.free_port()}")
    assert await check_credentials(client, "nowhere") is False
    with pytest.raises(StoreError, match="Redis unreachable while reading one key") as caught:
        await guarded("reading one key", lambda: client.get("k"))
    assert caught.value.retriable and not isinstance(caught.value, RedisClusterError)
    await client.aclose()
