"""``memstream chaos`` across a network: the parts of memstream on separate hosts (network namespaces of
:mod:`streams.tools.netns`), with a delay on every link, a partition, an unreachable Redis and a lost host.

The hosts: ``broker`` (the embedded Tansu broker, advertising its host's address), ``redis`` (redis-server with an
append-only file), ``ingest1`` and ``ingest2`` (``memstream worker --role ingest``, one consumer group),
``sink1`` and ``sink2`` (``memstream worker --role sink``: the one-owner assignor makes one the owner of the
LanceDB table, the other a standby) and ``serve`` (``memstream serve --no-auth``, read back over HTTP at the end).
The driver (this process: it publishes, audits and reads) is a host too, on the subnet's first address.

LanceDB is a directory on this machine's filesystem that both sink hosts open: it models shared storage that is
always reachable (a network filesystem, or an object store that never partitions). Network faults of the storage
are not modelled here; ``lancedb-faults`` covers a failing store, and LanceDB on an S3 API has tests of its own.

Every link delays each frame by ``config.link_delay_ms`` (20 ms: 40 ms a round trip between two hosts), in every
scenario. Scenarios:

- ``netem``: the delay alone, the workload published at ``config.rate`` while both ingest workers and the sinks
  run;
- ``partition``: ``ingest1`` cut off for ``config.partition_s`` (its partitions move to ``ingest2`` after a
  session timeout; it comes back fenced), then the ``redis`` host unreachable for ``config.redis_unreachable_s``
  (no connection refused: packets vanish, as in a partition), both while events are published;
- ``host-loss``: the host of the sink that owns the table lost (its link cut, every process on it SIGKILLed: no
  FIN reaches the broker) while events are published; the standby on the other host takes over.

Each reports the figures of the other scenarios (lost, duplicated, stale, unexpected, seconds to converge from
the end of the fault), and under ``figures`` the links, the measured round trip and the scenario's own times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from infra import services
from infra.api_keys import KeyStore, Role
from infra.kafka import ensure_topics
from infra.services import ManagedProcess
from infra.settings import Settings
from processors.pipeline import event_key
from schemas.events import MemoryEvent
from streams.runtime.worker_process import WORKER_COMMAND, WorkerProcess
from streams.tools import chaos
from streams.tools.chaos import NETWORK_SCENARIOS, ChaosConfig, ChaosResult
from streams.tools.netns import NetnsError, Network, unavailable

log = logging.getLogger("memstream.chaos")

HOSTS = ("broker", "redis", "ingest1", "ingest2", "sink1", "sink2", "serve")
BROKER_PORT = 9092  # every host has an address of its own: the usual ports, no collisions
REDIS_PORT = 6379
SERVE_PORT = 8750
OWNS = re.compile(r"index sink (owns|gives up|stands by)")


class NetworkUnavailable(NetnsError):
    """The network scenarios cannot run here (not root, no ``ip``/``tc``): the reason, for a clear skip."""


class NetworkStack:
    """The broker, Redis, two ingest workers, two sinks and serve, each on its own host of ``net``."""

    def __init__(self, home: Path, base: Settings, net: Network) -> None:
        self.home = home
        self.base = base
        self.net = net
        self.broker: ManagedProcess | None = None
        self.redis: ManagedProcess | None = None
        self.workers: dict[str, WorkerProcess] = {}  # host -> its worker (ingest or sink)
        self.serve: subprocess.Popen[bytes] | None = None
        self.fault_ended: float | None = None
        self.serve_url = ""
        self.serve_key = ""  # a read key of the workload's tenant
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        assert self._settings is not None, "the stack is not up"
        return self._settings

    def ip(self, host: str) -> str:
        return self.net.hosts[host].ip

    async def __aenter__(self) -> NetworkStack:
        self.home.mkdir(parents=True, exist_ok=True)
        broker = services.broker_process(self.home / "broker", BROKER_PORT, host=self.ip("broker"))
        broker.argv = self.net.hosts["broker"].argv(broker.argv)
        self.broker = await asyncio.to_thread(broker.start)
        redis = services.redis_process(self.home / "redis", REDIS_PORT, host=self.ip("redis"), persist=True)
        # clients come from other hosts' addresses, not loopback: Redis' protected mode would refuse them (the
        # subnet is private to this run's namespaces)
        redis.argv = self.net.hosts["redis"].argv([*redis.argv, "--protected-mode", "no"])
        self.redis = await asyncio.to_thread(redis.start)
        self._settings = self.base.with_(
            home=self.home,
            kafka_bootstrap=services.kafka_url(self.ip("broker"), BROKER_PORT),
            redis_url=services.redis_url(self.ip("redis"), REDIS_PORT),
            lancedb_uri=str(self.home / "lancedb"),  # one directory both sink hosts open: shared storage
            lancedb_storage_options="",
            fault_file="",
        )
        await ensure_topics(self.settings)
        return self

    async def __aexit__(self, *exc: object) -> None:
        live = [w for w in self.workers.values() if w.alive]
        for worker in live:
            worker.interrupt()
        for worker in live:
            await asyncio.to_thread(worker.wait_stopped, 20.0)
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            await asyncio.to_thread(self.serve.wait)
        for proc in (self.redis, self.broker):
            if proc is not None:
                await asyncio.to_thread(proc.stop)

    def start_worker(self, host: str, role: str) -> WorkerProcess:
        """``memstream worker --role <role>`` on ``host`` (its settings are this stack's, by MEMSTREAM_* env)."""
        command = self.net.hosts[host].argv(WORKER_COMMAND)
        worker = WorkerProcess(self.settings.with_(worker_role=role), self.home / f"{host}.log", command=command)
        self.workers[host] = worker
        return worker

    async def start_serve(self, tenant: str, timeout: float = 90.0) -> tuple[str, str]:
        """``memstream serve`` on the serve host, with a read key of ``tenant`` (serve gives no address but
        loopback without keys); its URL once ``/healthz`` answers the driver, and the key."""
        host = self.net.hosts["serve"]
        _, key = KeyStore(self.settings.keys_path).create(tenant, Role.READ)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
        env.update(self.settings.to_env())
        argv = [sys.executable, "-m", "streams", "serve", "--host", host.ip, "--port", str(SERVE_PORT)]
        self.serve = await asyncio.to_thread(self._spawn_serve, host.argv([*argv, "--workers", "1"]), env)
        url = f"http://{host.ip}:{SERVE_PORT}"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                try:
                    async with http.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            return url, key
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if self.serve.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError(f"serve on {host.ip} did not answer within {timeout:g}s: see serve.log")
                await asyncio.sleep(0.5)

    def _spawn_serve(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.home / "serve.log").open("ab") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=out)

    def sink_state(self, host: str) -> str | None:
        """What the sink on ``host`` said last about the table: ``owns``, ``stands by``, ``gives up`` or None."""
        try:
            text = (self.home / f"{host}.log").read_text(errors="replace")
        except OSError:
            return None
        found = OWNS.findall(text)
        return found[-1] if found else None

    def log_size(self, host: str) -> int:
        path = self.home / f"{host}.log"
        return path.stat().st_size if path.exists() else 0

    def owned_every_partition(self, host: str, topic: str, since: int = 0) -> bool:
        """Whether the worker on ``host`` logged, past byte ``since`` of its log, that it owned every partition
        of ``topic`` at once."""
        wanted = [f"{topic}[{p}]" for p in range(self.settings.partitions)]
        try:
            with (self.home / f"{host}.log").open("rb") as log_file:
                log_file.seek(since)
                lines = log_file.read().decode(errors="replace").splitlines()
        except OSError:
            return False
        return any(" owns " in line and all(w in line for w in wanted) for line in lines)

    async def wait_owner(self, among: tuple[str, ...], timeout: float) -> str:
        """The sink host that owns the table once the others stand by (each has said so in its log)."""
        deadline = time.monotonic() + timeout
        while True:
            states = {host: self.sink_state(host) for host in among}
            owners = [h for h, s in states.items() if s == "owns"]
            if len(owners) == 1 and all(s in ("owns", "stands by") for s in states.values()):
                return owners[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no single owner of the table among {among} within {timeout:g}s: {states}")
            await asyncio.sleep(0.2)


async def redis_round_trip_ms(settings: Settings, pings: int = 5) -> float:
    """The driver's PING to Redis over the network, the median of ``pings`` (a check that the delay is there)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(settings.redis_url)
    try:
        times = []
        for _ in range(pings):
            started = time.perf_counter()
            await client.ping()
            times.append((time.perf_counter() - started) * 1e3)
    finally:
        await client.aclose()
    return round(sorted(times)[len(times) // 2], 1)


async def start_parts(stack: NetworkStack, config: ChaosConfig, result: ChaosResult, tenant: str) -> str:
    """Both ingest workers, both sinks (the first to join owns the table) and serve; returns the owner's host."""
    stack.start_worker("ingest1", "ingest")
    stack.start_worker("ingest2", "ingest")
    stack.start_worker("sink1", "sink")
    await stack.wait_owner(("sink1",), config.converge_timeout_s)
    stack.start_worker("sink2", "sink")
    owner = await stack.wait_owner(("sink1", "sink2"), config.converge_timeout_s)
    stack.serve_url, stack.serve_key = await stack.start_serve(tenant)
    result.figures.update(
        links=stack.net.kind,
        link_delay_ms=stack.net.delay_ms,
        redis_round_trip_ms=await redis_round_trip_ms(stack.settings),
        subnet=str(stack.net.subnet),
    )
    return owner


async def warm(stack: NetworkStack, events: list[MemoryEvent], config: ChaosConfig) -> list[MemoryEvent]:
    """The first 5% published and ingested before the fault, so that it lands on workers in full flight."""
    head = max(1, len(events) // 20)
    await chaos.publish_paced(stack.settings, chaos.as_records(events[:head]), 100_000)
    await chaos.wait_counter(stack.settings, "events_in", head, timeout=config.converge_timeout_s)
    return events[head:]


async def netem(stack: NetworkStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    events = chaos.workload(config)
    await start_parts(stack, config, result, events[0].scope.tenant_id)
    rest = await warm(stack, events, config)
    await chaos.publish_paced(stack.settings, chaos.as_records(rest), config.rate)
    stack.fault_ended = time.monotonic()
    result.faults_injected = 1
    result.fault = (
        f"{stack.net.delay_ms:g} ms on every link ({stack.net.kind}), {len(events)} events at {config.rate}/s "
        "through two ingest hosts and two sink hosts"
    )
    return events


async def partition(stack: NetworkStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    events = chaos.workload(config)
    await start_parts(stack, config, result, events[0].scope.tenant_id)
    rest = await warm(stack, events, config)
    span = config.partition_s + config.redis_unreachable_s + 2.0  # publishing goes on through both faults
    rate = max(1, int(len(rest) / span))
    publishing = asyncio.create_task(chaos.publish_paced(stack.settings, chaos.as_records(rest), rate))
    await asyncio.sleep(1.0)
    ingest2_log_at_cut = stack.log_size("ingest2")
    stack.net.link_down("ingest1")
    await asyncio.sleep(config.partition_s)
    stack.net.link_up("ingest1")
    await asyncio.sleep(1.0)
    stack.net.link_down("redis")
    await asyncio.sleep(config.redis_unreachable_s)
    stack.net.link_up("redis")
    await publishing
    stack.fault_ended = time.monotonic()
    result.faults_injected = 2
    result.figures.update(
        publish_rate=rate,
        # the partition bit: the group gave the cut-off host's partitions to the other ingest host
        ingest2_took_every_partition=stack.owned_every_partition(
            "ingest2", stack.settings.topics.events, since=ingest2_log_at_cut
        ),
    )
    result.fault = (
        f"ingest host 1 partitioned {config.partition_s:g}s, then the Redis host unreachable "
        f"{config.redis_unreachable_s:g}s, while {len(rest)} events were published at {rate}/s"
    )
    return events


async def host_loss(stack: NetworkStack, config: ChaosConfig, result: ChaosResult) -> list[MemoryEvent]:
    events = chaos.workload(config)
    owner = await start_parts(stack, config, result, events[0].scope.tenant_id)
    standby = "sink2" if owner == "sink1" else "sink1"
    rest = await warm(stack, events, config)
    publishing = asyncio.create_task(chaos.publish_paced(stack.settings, chaos.as_records(rest), config.rate))
    await asyncio.sleep(min(1.0, len(rest) / config.rate / 4))
    killed = stack.net.kill_host(owner)
    lost_at = time.monotonic()
    result.faults_injected = 1
    await stack.wait_owner((standby,), config.converge_timeout_s)
    takeover = round(time.monotonic() - lost_at, 2)
    await publishing
    stack.fault_ended = lost_at  # the host stays lost: convergence is timed from the loss, takeover included
    result.figures.update(owner_lost=owner, processes_killed=len(killed), standby_took_over_s=takeover)
    result.fault = (
        f"the host of the owning sink ({owner}) lost (link cut, {len(killed)} processes SIGKILLed) while "
        f"{len(rest)} events were published at {config.rate}/s; the standby on {standby} took over in {takeover}s"
    )
    return events


async def read_through_serve(
    stack: NetworkStack, events: list[MemoryEvent], config: ChaosConfig, result: ChaosResult
) -> None:
    """GET a sample of live memories from serve (its host, over the network): each at its newest version."""
    wanted = chaos.live_sample(events, config)
    found = 0
    headers = {"Authorization": f"Bearer {stack.serve_key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), headers=headers) as http:
        for event in wanted:
            async with http.get(f"{stack.serve_url}/v1/memories/{event.memory_id}") as response:
                body = await response.json() if response.status == 200 else {}
            if body.get("version") == event.version:
                found += 1
            else:
                log.warning("serve did not return %s at version %d: %s", event_key(event), event.version, body)
    result.reads_asked += len(wanted)
    result.reads_found += found


SCENARIO = {"netem": netem, "partition": partition, "host-loss": host_loss}


async def run_network_scenario(name: str, home: Path, config: ChaosConfig, base: Settings) -> ChaosResult:
    """One network scenario on a network of its own, removed afterwards (also on an error or a Ctrl-C)."""
    why = unavailable()
    if why:
        raise NetworkUnavailable(f"chaos {name} skipped: {why}")
    run = SCENARIO[name]
    result = ChaosResult(scenario=name)
    started = time.monotonic()
    with Network(HOSTS, delay_ms=config.link_delay_ms) as net:
        async with NetworkStack(home / name, chaos.chaos_settings(base), net) as stack:
            events = await run(stack, config, result)
            await chaos.record_outcome(stack.settings, events, stack.fault_ended, config, result)
            await read_through_serve(stack, events, config, result)
            # the lost host's, and any that died on their own (see <home>/<scenario>/<host>.log)
            result.figures["workers_not_running"] = [h for h, w in stack.workers.items() if not w.alive]
    result.figures["network_left_behind"] = net.leftovers()
    result.wall_s = round(time.monotonic() - started, 1)
    log.info("chaos %s: %s", name, result.to_dict())
    return result


__all__ = ["NETWORK_SCENARIOS", "NetworkUnavailable", "run_network_scenario"]
