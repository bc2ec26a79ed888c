"""``memstream demo``: the main job on the embedded default, start to finish, on a sample the project ships."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from infra.api_keys import KeyStore, Role
from infra.kafka import KafkaPublisher
from infra.services import LocalStack
from infra.settings import Settings
from processors.pipeline import now_ms
from schemas.consistency import ReconcileRequest
from schemas.events import DEFAULT_TENANT
from streams.runtime.stores import Stores
from streams.runtime.worker_process import WorkerProcess
from streams.surface.api import MemoryReader
from streams.surface.console import print_reconcile, print_stats, print_verify
from streams.surface.operations import publish, reconcile_here, stats, verify

SEARCHES = (
    ("what should I cook for alice?", "alice", "chef"),
    ("where does alice live now?", "alice", None),
    ("bob's sport and exercise", "bob", "coach"),
    ("carol's pets", "carol", None),
)


def sample_lines(name: str) -> list[bytes]:
    return (Path(__file__).parents[1] / "data" / name).read_bytes().splitlines()


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(settings: Settings, *, keep: bool = False) -> int:
    home = settings.home / "demo"
    if home.exists():
        LocalStack(home).down()
        shutil.rmtree(home)
    settings = settings.with_(home=home, kafka_bootstrap="", redis_url="", lancedb_uri="", lancedb_storage_options="")
    step(f"starting the embedded broker (Tansu) and Redis under {home}")
    state = LocalStack(home).up(kafka_port=None, redis_port=None)
    print(f"broker {state.kafka.url}, redis {state.redis.url}, lancedb {settings.lancedb_path}")
    settings = settings.with_(kafka_bootstrap=state.kafka.url, redis_url=state.redis.url)
    worker = start_worker(settings)
    try:
        code = asyncio.run(demo_steps(settings))
    finally:
        step("stopping the worker (SIGINT: the window in hand is finished and committed)")
        print(f"worker exited with code {worker.stop()}")
        if not keep:
            LocalStack(home).down()
            print("stopped the embedded stack")
    return code


def start_worker(settings: Settings) -> WorkerProcess:
    step(f"starting the worker (engine {settings.engine}, embedder {settings.embedder})")
    worker = WorkerProcess(settings, settings.home / "logs" / "worker.log")
    print(f"worker pid {worker.proc.pid} (it supervises the ingest and index-sink processes), log {worker.log_path}")
    return worker


async def demo_steps(settings: Settings) -> int:
    good, bad = sample_lines("sample.jsonl"), sample_lines("bad.jsonl")
    step(f"publishing {len(good)} memory events and {len(bad)} malformed lines, waiting for both stores")
    started = time.monotonic()
    await publish(settings, bad, wait=False, timeout=0, as_json=False)
    code = await publish(settings, good, wait=True, timeout=180, as_json=False)
    print(f"published and materialized in {time.monotonic() - started:.1f}s (includes the worker's start)")
    if code:
        return code
    step("a producer that skips validation sends 2 broken records straight to the topic")
    publisher = await KafkaPublisher.start(settings)
    try:
        broken = [(b"x", b'{"schema_version": 2, "op": "add"}'), (b"y", b"\xff not json")]
        await publisher.publish(settings.topics.events, broken)
    finally:
        await publisher.stop()
    print(f"they go to {settings.topics.dlq} with their reason; the worker carries on")
    step("searching")
    async with MemoryReader(settings) as reader:
        for query, user, agent in SEARCHES:
            hits = await reader.search(query, user_id=user, agent_id=agent, k=3)
            print(f"[{user}{'/' + agent if agent else ''}] {query}")
            for hit in hits:
                print(f"   {hit.score:.3f}  v{hit.row.version}  {hit.row.text}")
        deleted = await reader.get("bob-gym")
        print(f"get bob-gym (deleted in the sample): {'gone' if deleted is None else 'STILL THERE'}")
    show_api_key(settings)
    step("publishing the same file again (idempotent: no new memories)")
    await publish(settings, good, wait=True, timeout=60, as_json=False)
    await asyncio.sleep(1.0)  # let the worker's dead-letter agent count the broken records
    step("Redis forgets 5 memories (a cache may): the reconciler refills them from the log and LanceDB")
    await forget_some(settings, 5)
    repair = await reconcile_here(settings, ReconcileRequest(uuid.uuid4().hex, now_ms(), reason="demo"))
    print_reconcile(repair.to_dict(), sys.stdout)
    step("consistency between LanceDB and Redis")
    report: dict[str, Any] = await verify(settings)
    print_verify(report, sys.stdout)
    step("counters")
    print_stats(await stats(settings), sys.stdout)
    return 0 if report["consistent"] and repair.consistent and deleted is None else 1


def show_api_key(settings: Settings) -> None:
    """The HTTP API needs a key: make one for the sample's tenant and say how to use it."""
    step("an API key for the HTTP API (`memstream serve`); the keys file keeps only its hash")
    entry, key = KeyStore(settings.keys_path).create(DEFAULT_TENANT, Role.WRITE)
    print(f"key {key}")
    print(f"(id {entry.key_id}, tenant {entry.tenant}, role {entry.role.value}, in {settings.keys_path})")
    print(
        f"with --keep: MEMSTREAM_HOME={settings.home} memstream serve, then\n"
        f'   curl -H \'Authorization: Bearer {key}\' -d \'{{"query": "alice", "user_id": "alice"}}\' '
        f"http://127.0.0.1:{settings.serve_port}/v1/search"
    )


async def forget_some(settings: Settings, count: int) -> None:
    """Delete a few of our own memory keys (only keys under this stack's prefix)."""
    stores = await Stores.open(settings)
    try:
        ids = sorted(await stores.cache.states())[:count]  # memory keys: <tenant>/<memory id>
        await stores.redis.delete(*[stores.cache.memory_key(m) for m in ids])
        print(f"deleted {', '.join(ids)} from Redis")
    finally:
        await stores.close()
