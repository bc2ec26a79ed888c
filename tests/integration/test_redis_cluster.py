"""memstream on a real Redis Cluster: three masters and three replicas of the system ``redis-server``.

The fixture starts six cluster-enabled servers on free ports, joins them with ``redis-cli --cluster create``
(one replica per master) and waits for ``cluster_state:ok``; the worker and the CLI get a ``redis+cluster://``
URL. Covered: the memory pipeline (publish, worker, search, get, recency, context), verify and reconcile, a plain
``redis://`` URL of one node detected as a cluster, and a master failed over (``CLUSTER FAILOVER`` on its replica)
while events stream in, audited to 0 lost, 0 duplicated, 0 stale.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from infra import services
from infra.read_cache import RedisReadCache, scope_field
from infra.redis_store import open_redis
from infra.settings import Settings
from processors.model import ScopeQuery
from schemas.events import Scope
from streams.runtime.stores import Stores
from streams.surface.api import MemoryReader
from streams.tools.chaos import ChaosConfig, as_records, converge, publish_paced, read_counters, workload
from tests.integration.helpers import WorkerProcess, make_settings, run_cli, unique_tag, write_jsonl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli (to create the cluster) not on PATH"),
]

NODE_TIMEOUT_MS = 2_000  # how long a master may be silent before its replica takes over (the default is 15 s)
WAIT_S = 90.0


def _cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port and free too."""
    for _ in range(200):
        port = services.free_port()
        if port not in taken and port + 10000 < 65536 and services.port_is_free(port + 10000):
            return port
    raise AssertionError("no free port pair for a cluster node")


@dataclass
class Cluster:
    nodes: list[services.ManagedProcess]

    @property
    def url(self) -> str:
        # every node as a seed: a client opened after a node was killed (the audit after a failover, a restarted
        # process) must not depend on that node (a fresh-clone run failed when the victim was the only seed)
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def node_url(self, node: services.ManagedProcess) -> str:
        return services.redis_url(node.host, node.port)

    async def info(self, node: services.ManagedProcess) -> dict[str, str]:
        client = aioredis.Redis(host=node.host, port=node.port)
        try:
            raw = (await client.execute_command("CLUSTER", "INFO")).decode()
        finally:
            await client.aclose()
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)

    async def masters(self) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """(host, port) of each master -> its slot ranges, as the cluster sees it now (asked of a live node: the
        first may be the one a test killed)."""
        node = next(n for n in self.nodes if n.alive)
        client = aioredis.Redis(host=node.host, port=node.port)
        try:
            slots = await client.execute_command("CLUSTER", "SLOTS")
        finally:
            await client.aclose()
        out: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for first, last, master, *_ in slots:
            out.setdefault((master[0].decode(), int(master[1])), []).append((int(first), int(last)))
        return out

    async def replica_of(self, port: int) -> services.ManagedProcess:
        for node in self.nodes:
            client = aioredis.Redis(host=node.host, port=node.port)
            try:
                info = await client.info("replication")
            finally:
                await client.aclose()
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == port:
                return node
        raise AssertionError(f"no replica of the master on port {port}")


async def _wait_ok(cluster: Cluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        infos = [await cluster.info(n) for n in cluster.nodes]
        healthy = all(i.get("cluster_state") == "ok" and i.get("cluster_known_nodes") == "6" for i in infos)
        if healthy and len(await cluster.masters()) == 3:
            return
        assert time.monotonic() < deadline, f"the cluster never reported cluster_state:ok: {infos}"
        await asyncio.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("redis-cluster")
    nodes: list[services.ManagedProcess] = []
    try:
        taken: set[int] = set()
        for i in range(6):
            port = _cluster_port(taken)
            taken.add(port)
            proc = services.redis_process(home / f"n{i}", port)
            proc.argv += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(home / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
            ]
            nodes.append(proc.start())
        addresses = [f"{n.host}:{n.port}" for n in nodes]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        made = Cluster(nodes)
        asyncio.run(_wait_ok(made))
        yield made
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster_worker(
    tmp_path_factory: pytest.TempPathFactory, cluster: Cluster, kafka_bootstrap: str
) -> Iterator[WorkerProcess]:
    base = tmp_path_factory.mktemp("cluster-worker")
    settings = make_settings(base / "home", kafka_bootstrap, cluster.url)
    proc = WorkerProcess(settings, base / "worker.log").start()
    try:
        yield proc
    finally:
        proc.interrupt()
        code, _ = proc.wait_stopped()
        assert code == 0, proc.log_tail()
        assert "Traceback" not in proc.log(), proc.log_tail()


async def test_a_plain_url_of_one_node_gets_the_cluster_client(cluster: Cluster) -> None:
    client = await open_redis(cluster.node_url(cluster.nodes[1]))
    try:
        assert isinstance(client, RedisCluster)
        # keys of every master's slots are written and read through the one URL (no MOVED surfaces)
        keys = [f"probe-{unique_tag()}-{i}" for i in range(30)]
        for key in keys:
            await client.set(key, key, ex=60)
        assert [await client.get(k) for k in keys] == [k.encode() for k in keys]
    finally:
        await client.aclose()


async def test_memories_flow_through_the_cluster_and_verify_and_reconcile_hold(
    cluster: Cluster, cluster_worker: WorkerProcess, tmp_path: Path
) -> None:
    settings, tag = cluster_worker.settings, unique_tag()
    tenant = f"c{tag}"
    users = [f"u{tag}-{n}" for n in range(6)]
    lines = [
        {"tenant_id": tenant, "user_id": users[i % 6], "memory_id": f"{tag}-{i}", "text": f"note {i} about {tag} x{i}"}
        for i in range(60)
    ]
    lines += [
        {"op": "update", "tenant_id": tenant, "user_id": users[0], "memory_id": f"{tag}-0", "text": f"revised {tag}"},
        {"op": "delete", "tenant_id": tenant, "user_id": users[1], "memory_id": f"{tag}-1"},
    ]
    path = str(write_jsonl(tmp_path / "m.jsonl", lines))
    published = await run_cli(settings, "publish", path, "--wait", "--indexed", "--timeout", str(WAIT_S), "--json")
    assert published.rc == 0, f"{published}\n{cluster_worker.log_tail()}"
    assert published.json()["materialized"] == 60

    # the memory hashes spread over every master
    masters = await cluster.masters()
    slots = {key_slot(f"{settings.redis_prefix}m:{tenant}/{tag}-{i}".encode()) for i in range(60)}
    owners = {m for m, ranges in masters.items() for s in slots if any(a <= s <= b for a, b in ranges)}
    assert len(owners) == 3, owners

    verified = await run_cli(settings, "verify", "--tenant", tenant, "--json")
    assert verified.rc == 0 and verified.json()["consistent"], str(verified)
    assert verified.json()["live_memories"] == 59

    async with MemoryReader(settings) as reader:
        hits = await reader.search(f"revised {tag}", user_id=users[0], tenant_id=tenant, k=3)
        assert hits and hits[0].row.memory_id == f"{tag}-0" and hits[0].row.text == f"revised {tag}"
        for i in (2, 3, 4, 5, 17, 59):
            got = await reader.get(f"{tag}-{i}", tenant_id=tenant)
            assert got is not None and got.text == f"note {i} about {tag} x{i}", i
        assert await reader.get(f"{tag}-1", tenant_id=tenant) is None
        block = await reader.context(user_id=users[2], tenant_id=tenant, budget=5_000)
        assert set(block.memory_ids) == {f"{tag}-{i}" for i in range(2, 60, 6)}
        # the default budget's block is stored with its registration (two slots, one pipeline) for the stream
        await reader.context(user_id=users[2], tenant_id=tenant)
        registry = RedisReadCache(reader.stores.redis, reader.stores.cache.prefix, ttl_s=0)
        block_key = registry.context_key(scope_field(tenant, users[2], None), settings.context_budget)
        assert await registry.registered_among([block_key]) == [True] and await reader.stores.redis.exists(block_key)
        recent = await reader.stores.cache.recent(Scope(tenant, users[1], None, None), limit=50)
        assert set(recent) == {f"{tag}-{i}" for i in range(7, 60, 6)}  # the deleted one left the recency index

    # tamper: Redis forgets four memories and gets one no one published; reconcile puts it right
    stores = await Stores.open(settings)
    try:
        await stores.redis.delete(*[stores.cache.memory_key(f"{tenant}/{tag}-{i}") for i in range(2, 6)])
        [row] = await stores.vectors.get([f"{tenant}/{tag}-11"])
        await stores.cache.apply([dataclasses.replace(row, memory_id=f"{tag}-ghost", updated_at=1)])
    finally:
        await stores.close()
    broken = await run_cli(settings, "verify", "--tenant", tenant, "--json")
    assert broken.rc == 1 and not broken.json()["consistent"], str(broken)
    done = await run_cli(settings, "reconcile", "--tenant", tenant, "--wait", "--timeout", "90", "--json")
    assert done.rc == 0, f"{done}\n{cluster_worker.log_tail()}"
    counts = done.json()["counts"]
    assert (counts["redis_missing"], counts["redis_orphaned"], counts["unrepaired"]) == (4, 1, 0), counts
    fixed = await run_cli(settings, "verify", "--tenant", tenant, "--json")
    assert fixed.rc == 0 and fixed.json()["consistent"] and fixed.json()["live_memories"] == 59, str(fixed)
    stores = await Stores.open(settings)
    try:
        tail = await stores.cache.pending_rows(ScopeQuery(tenant_id=tenant))
        assert tail == []  # --indexed: the sink took everything out of the fresh tail, on every master
    finally:
        await stores.close()


async def stream_through_a_fault(
    cluster: Cluster, settings: Settings, log_path: Path, fault: Callable[[], Awaitable[None]], seed: int
) -> None:
    """A worker on the cluster; 2,000 events (adds, updates, deletes of 40 users) streamed at 500/s, ``fault``
    done one second in; then the stores must converge to exactly the newest event of every memory."""
    events = workload(ChaosConfig(events=2_000, users=40, seed=seed))
    worker = WorkerProcess(settings, log_path).start()
    try:
        head = len(events) // 10
        await publish_paced(settings, as_records(events[:head]), 100_000)
        deadline = time.monotonic() + WAIT_S
        while (await read_counters(settings)).get("events_in", 0) < head:
            worker.assert_alive()
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.2)
        publishing = asyncio.create_task(publish_paced(settings, as_records(events[head:]), 500))
        await asyncio.sleep(1.0)
        await fault()
        await publishing
        found, seconds = await converge(settings, events, timeout=WAIT_S)
        summary = f"{found}\n{worker.log_tail()}"
        assert (found.lost, found.duplicated, found.stale, found.unexpected) == (0, 0, 0, 0), summary
        assert found.lancedb_vs_redis_consistent and seconds is not None, summary
        worker.assert_alive()
        assert " died: " not in worker.log(), worker.log_tail()  # no child crashed and was restarted meanwhile
    finally:
        worker.interrupt()
        worker.wait_stopped()


def fault_settings(cluster: Cluster, kafka_bootstrap: str, home: Path, **overrides: Any) -> Settings:
    """Short compensation backoffs, so that what a fault held back lands within seconds of its end."""
    return make_settings(
        home,
        kafka_bootstrap,
        cluster.url,
        compensation_first_delay_ms=200,
        compensation_max_delay_ms=2_000,
        compensation_attempts=120,
        **overrides,
    )


async def master_of(cluster: Cluster, key: str) -> tuple[str, int]:
    slot = key_slot(key.encode())
    [master] = [m for m, ranges in (await cluster.masters()).items() if any(a <= slot <= b for a, b in ranges)]
    return master


async def wait_promoted(node: services.ManagedProcess, timeout: float = 30.0) -> None:
    admin = aioredis.Redis(host=node.host, port=node.port)
    try:
        deadline = time.monotonic() + timeout
        while (await admin.info("replication")).get("role") != "master":
            assert time.monotonic() < deadline, f"the replica on port {node.port} was never promoted"
            await asyncio.sleep(0.1)
    finally:
        await admin.aclose()


async def test_a_master_failed_over_mid_stream_loses_nothing(
    cluster: Cluster, kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = fault_settings(cluster, kafka_bootstrap, tmp_path / "home")
    # the master of the generations hash: every write bumps it, every cached read validates against it
    old = await master_of(cluster, f"{settings.redis_prefix}g")
    replica = await cluster.replica_of(old[1])

    async def failover() -> None:
        admin = aioredis.Redis(host=replica.host, port=replica.port)
        try:
            assert await admin.execute_command("CLUSTER", "FAILOVER") in (b"OK", "OK", True)
        finally:
            await admin.aclose()
        await wait_promoted(replica)

    await stream_through_a_fault(cluster, settings, tmp_path / "worker.log", failover, seed=11)
    assert old not in await cluster.masters()  # the old master now serves as a replica


async def test_a_master_killed_mid_stream_is_replaced_and_refilled(
    cluster: Cluster, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGKILL of the master of the sink's queue: its replica takes over after the node timeout. Replication is
    asynchronous, so the last writes the master acknowledged may be lost with it: the reconciler's timer (5 s
    here) refills them from LanceDB and the log, as for any Redis that forgot."""
    settings = fault_settings(cluster, kafka_bootstrap, tmp_path / "home", reconcile_interval_s=5)
    old = await master_of(cluster, f"{settings.redis_prefix}pq")
    replica = await cluster.replica_of(old[1])
    [victim] = [n for n in cluster.nodes if n.port == old[1]]

    async def kill() -> None:
        victim.kill()
        await wait_promoted(replica)

    try:
        await stream_through_a_fault(cluster, settings, tmp_path / "worker.log", kill, seed=12)
        assert old not in await cluster.masters()
    finally:
        if not victim.alive:
            victim.start()  # back as a replica of its successor
