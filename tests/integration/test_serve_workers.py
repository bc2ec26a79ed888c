"""``memstream serve --workers 2`` (issue 24): two processes on one port, each with its own caches, all fresh.

A worker and a two-process server for the module. Connections are pinned to one process each (a keep-alive
connection stays with the process that accepted it; every answer's ``X-Memstream-Pid`` is checked), so each
process's caches are filled and read on their own, and each process's ``/metrics`` says what it served.
"""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from infra.api_keys import KeyStore, Role
from infra.settings import Settings
from tests.integration.helpers import ServeProcess, WorkerProcess, make_settings, unique_tag, wait_for

pytestmark = pytest.mark.slow

PID_HEADER = "X-Memstream-Pid"


@dataclass
class Group:
    settings: Settings
    server: ServeProcess
    key: str

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Group]:
    base = tmp_path_factory.mktemp("serve-workers")
    settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    settings.home.mkdir(parents=True, exist_ok=True)
    _, key = KeyStore(settings.keys_path).create(f"t{unique_tag()}", Role.ADMIN)
    worker = WorkerProcess(settings, base / "worker.log").start()
    server = ServeProcess(settings, base / "serve.log", workers=2).start()
    try:
        yield Group(settings, server, key)
    finally:
        server.interrupt()  # SIGINT, as a Ctrl-C at the terminal: the parent passes it on
        worker.interrupt()
        server_code = server.wait_stopped()
        worker_code, _ = worker.wait_stopped()
    assert server_code == 0, server.log_text()
    assert "Traceback" not in server.log_text(), server.log_text()[-5000:]
    assert worker_code == 0, worker.log_tail()


def parent_of(pid: int) -> int:
    """The parent pid of a running process (field 4 of /proc/PID/stat, after the command in parentheses)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


async def pids_over_new_connections(url: str, count: int) -> list[int]:
    """``/healthz`` over ``count`` new connections (one each): the pid each answer names, body and header alike."""
    pids = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(count):
            async with http.get(f"{url}/healthz") as response:
                body = await response.json()
                assert response.status == 200 and str(body["pid"]) == response.headers[PID_HEADER], body
                pids.append(body["pid"])
    return pids


async def test_both_processes_answer_on_one_port(group: Group) -> None:
    assert group.server.proc is not None
    pids = await pids_over_new_connections(group.url, 100)
    assert len(set(pids)) == 2, f"100 new connections were answered by {set(pids)}"
    assert {parent_of(pid) for pid in pids} == {group.server.proc.pid}, "not the children of this serve"


@pytest.fixture
async def pinned(group: Group) -> AsyncIterator[dict[int, aiohttp.ClientSession]]:
    """One keep-alive connection to each process of the group: pid -> a session whose one connection is there."""
    sessions: dict[int, aiohttp.ClientSession] = {}
    headers = {"Authorization": f"Bearer {group.key}"}
    try:
        for _ in range(200):
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=headers)
            async with http.get(f"{group.url}/healthz") as response:
                pid = int(response.headers[PID_HEADER])
            if pid in sessions:
                await http.close()
            else:
                sessions[pid] = http
            if len(sessions) == 2:
                break
        assert len(sessions) == 2, f"200 new connections reached only {list(sessions)}"
        yield sessions
    finally:
        for http in sessions.values():
            await http.close()


async def call(http: aiohttp.ClientSession, pid: int, method: str, url: str, **kwargs: Any) -> Any:
    """One request on a pinned session; fails unless ``pid`` answered it with 200."""
    async with http.request(method, url, **kwargs) as response:
        body = await (response.json() if response.content_type == "application/json" else response.text())
        assert response.status == 200, body
        assert response.headers[PID_HEADER] == str(pid), "the pinned connection moved to another process"
        return body


async def test_a_write_makes_every_processs_cached_reads_fresh(
    group: Group, pinned: dict[int, aiohttp.ClientSession]
) -> None:
    """search, get and context are cached in each process (its /metrics shows L1 hits); after an update published
    with ?wait, every process answers the new version, from the same Redis generations."""
    url = group.url
    scope = {"user_id": "ana", "agent_id": "chef"}
    first = next(iter(pinned.values()))
    memory = {**scope, "memory_id": "m-city", "text": "Ana lives in Porto"}
    answer = await call(first, next(iter(pinned)), "POST", f"{url}/v1/events?wait=60", json=memory)
    assert answer["not_materialized"] == [] and len(answer["accepted"]) == 1, answer

    async def reads(pid: int) -> tuple[list[str], str, str]:
        http = pinned[pid]
        query = {"query": "where does Ana live", "k": 5, **scope}
        hits = (await call(http, pid, "POST", f"{url}/v1/search", json=query))["hits"]
        row = await call(http, pid, "GET", f"{url}/v1/memories/m-city")
        block = await call(http, pid, "GET", f"{url}/v1/context", params={**scope, "format": "text"})
        return [h["text"] for h in hits], row["text"], block

    for pid in pinned:
        # A search is cached on its second miss in a process (the doorkeeper), and the index sink moving the memory
        # out of the fresh tail (and the reconciler after it) moves the scope's generation once or twice while
        # these reads run: each such move rightly sends the next read past L1. So read until every kind was served
        # from this process's L1 at least once, a bounded number of times.
        for _ in range(12):
            hits, text, block = await reads(pid)
            assert hits == ["Ana lives in Porto"] and text == "Ana lives in Porto" and "Porto" in block, block
            metrics = await call(pinned[pid], pid, "GET", f"{url}/metrics")
            if not l1_less(metrics):
                break
        assert not l1_less(metrics), f"process {pid} served no {l1_less(metrics)} from its cache:\n{metrics}"

    update = {**memory, "op": "update", "text": "Ana moved to Lisbon"}
    answer = await call(first, next(iter(pinned)), "POST", f"{url}/v1/events?wait=60", json=update)
    assert answer["not_materialized"] == [], answer
    for pid in pinned:
        hits, text, block = await reads(pid)
        assert hits == ["Ana moved to Lisbon"], f"process {pid} searched stale: {hits}"
        assert text == "Ana moved to Lisbon", f"process {pid} got stale: {text}"
        assert "Lisbon" in block and "Porto" not in block, f"process {pid} built stale context: {block}"


async def test_sigterm_stops_every_process(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url)
    settings.home.mkdir(parents=True, exist_ok=True)
    server = ServeProcess(settings, tmp_path / "serve.log", workers=2).start()
    assert server.proc is not None
    children = set(await pids_over_new_connections(server.url, 100))
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_stopped() == 0, server.log_text()
    assert len(children) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in children), children
    assert "Traceback" not in server.log_text(), server.log_text()


async def test_the_processes_stop_when_their_parent_is_killed(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    """SIGKILL leaves the parent no chance to pass a signal on: each child notices it is orphaned and stops."""
    settings = make_settings(tmp_path / "home", kafka_bootstrap, redis_url)
    settings.home.mkdir(parents=True, exist_ok=True)
    server = ServeProcess(settings, tmp_path / "serve.log", workers=2).start()
    assert server.proc is not None
    children = set(await pids_over_new_connections(server.url, 100))
    assert len(children) == 2, children
    server.proc.kill()
    server.proc.wait()

    async def all_gone() -> bool:
        return not any(_running(pid) for pid in children)

    await wait_for(all_gone, timeout=30, what=f"the orphaned serve processes {children} to stop")
    assert "its parent" in server.log_text() and "Traceback" not in server.log_text(), server.log_text()


def l1_less(metrics: str) -> list[str]:
    """The read kinds this process's /metrics shows no L1 hit for."""
    served = {
        kind: re.search(rf'^memstream_reads_total{{kind="{kind}",layer="l1"}} (\d+)$', metrics, re.M)
        for kind in ("search", "get", "context")
    }
    return [kind for kind, found in served.items() if not found or int(found.group(1)) < 1]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by init, maybe a moment later)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
