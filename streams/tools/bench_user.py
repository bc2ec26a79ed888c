"""``memstream bench`` scenarios measured as a user meets the system, through the public path only.

- publish-wait: a fresh stack (broker and Redis, as ``memstream up`` starts them), the default ``memstream worker``
  (a supervisor of an ingest and an index-sink process) as a subprocess, and N events loaded from a JSON-lines
  file by ``memstream publish FILE --wait``, a subprocess too (``--chunks``: the file in K parts, one after the
  other). Events/s for the whole command, CPU per event of every process (broker, Redis, supervisor, ingest, sink,
  publisher), then the time until LanceDB caught up.
- serve: the same stack, N memories loaded by ``memstream publish --wait --indexed``, a read key made by
  ``memstream keys create``, ``memstream serve`` driven over HTTP by C concurrent keep-alive connections: random
  users and queries (uncached), one repeated query (cached), hybrid search and ``GET /v1/context``; right after
  the load and again after ``settle_s`` (steady state). Requests/s, p50/p99, errors and CPU per request. Also on
  one connection: uncached searches (first, right after the load) and tenant-wide ones (``all_users``), with
  the recall@10 of tenant-wide searches against numpy's exact search (hash embedder).

Nothing is written into the stores directly: the only shortcut is one warm-up event through a plain Kafka
producer, before any clock starts, so that the worker's start-up (models, tables, group joins) is not timed.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from infra.kafka import KafkaPublisher, ensure_topics, group_state
from infra.redis_store import RedisCounters, connect
from infra.services import LocalStack
from infra.settings import Settings
from infra.sharded_store import ShardedVectorStore
from schemas.events import MemoryEvent, Op, encode
from streams.runtime.sink import wait_for_index
from streams.runtime.stores import Stores
from streams.runtime.worker_process import WorkerProcess
from streams.tools.bench_data import synthetic_events
from streams.tools.bench_procs import CpuSampler, RssSampler, child_pids, wait_quiet, wait_with_cpu, worker_children

Log = Callable[[str], None]
SUPERVISOR = "worker (supervisor)"
READY_TIMEOUT_S = 180.0


@dataclass
class UserConfig:
    """The two scenarios' sizes (``memstream bench`` flags; ``--quick`` makes them tiny)."""

    publish_events: int = 200_000
    chunks: int = 1
    serve_memories: int = 100_000
    serve_users: int = 2_000
    connections: int = 32
    serve_seconds: float = 10.0
    settle_s: float = 10.0  # between the reads right after ingest and the steady-state ones
    serve_workers: int = 0  # `memstream serve --workers N`; 0: serve's default (one process per core)
    http_driver: str = "auto"  # serve: "wrk" (C, 2 threads), "aiohttp" (this process), "auto": wrk where installed
    freshness_events: int = 1_000_000  # freshness: the bulk load through `publish --wait` before the probes
    freshness_rate: int = 2_000  # freshness: background events/s while the probes run
    freshness_probes: int = 50  # freshness: probe events, one every PROBE_GAP_S


def _env(settings: Settings) -> dict[str, str]:
    """A user's shell for these settings: the parent's MEMSTREAM_* replaced whole."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
    env.update(settings.to_env())
    return env


def memstream(settings: Settings, *args: str, timeout: float, out: Path) -> tuple[float, dict[str, Any], float]:
    """``memstream ARGS --json`` as a new process: its seconds, its JSON report and the CPU seconds it spent
    (``os.wait4``). Its output goes to files, so that waiting on it never blocks on a full pipe."""
    out.parent.mkdir(parents=True, exist_ok=True)
    err = out.with_suffix(".err")
    started = time.monotonic()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams", *args, "--json"], env=_env(settings), stdout=stdout, stderr=stderr
        )
    timer = threading.Timer(timeout, proc.kill)  # a hung command ends the scenario, not the whole bench
    timer.start()
    try:
        code, cpu_s = wait_with_cpu(proc)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"memstream {' '.join(args)} exited {code}: {err.read_text(errors='replace')[-2000:]}")
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    return elapsed, report, cpu_s


class UserStack:
    """A fresh broker and Redis under ``home`` and the default ``memstream worker`` (supervisor) against them."""

    def __init__(self, base: Settings, home: Path) -> None:
        self.home = home
        self.stack = LocalStack(home / "stack")
        state = self.stack.up(None, None)  # any free ports: the configured servers are not this run's
        self.infra = {"broker": state.kafka.pid, "redis": state.redis.pid}
        self.settings = base.with_(
            home=home,
            kafka_bootstrap=state.kafka.url,
            redis_url=state.redis.url,
            lancedb_uri=str(home / "lancedb"),  # on local disk, whatever the configured store
            lancedb_storage_options="",
            worker_role="all",
            log_level="INFO",
        )
        self.worker: WorkerProcess | None = None

    async def start_worker(self, log: Log) -> None:
        """``memstream worker`` (the default), ready: both groups stable and one warm-up event searchable."""
        await ensure_topics(self.settings)
        self.worker = WorkerProcess(self.settings, self.home / "worker.log")
        log(f"started memstream worker (pid {self.worker.proc.pid}) on a fresh stack under {self.home}")
        publisher = await KafkaPublisher.start(self.settings)
        try:
            warm = next(iter(synthetic_events(1, seed=99)))
            await publisher.publish(self.settings.topics.events, [(warm.key, encode(warm))])
        finally:
            await publisher.stop()
        redis = connect(self.settings.redis_url)
        counters = RedisCounters(redis, self.settings.redis_prefix)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while not await self._ready(counters):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"memstream worker not ready within {READY_TIMEOUT_S:.0f}s: {self.home}")
                await asyncio.sleep(0.25)
        finally:
            await redis.aclose()

    async def _ready(self, counters: RedisCounters) -> bool:
        if (await counters.read()).get("events_in", 0) < 1 or len(self.worker_pids()) < 3:
            return False
        for group in (self.settings.group_id, self.settings.sink_group_id):
            state, members = await group_state(self.settings, group)
            if state != "Stable" or members < 1:
                return False
        return True

    def worker_pids(self) -> dict[str, int]:
        if self.worker is None:
            return {}
        return {SUPERVISOR: self.worker.proc.pid, **worker_children(self.worker.proc.pid)}

    def check_alive(self) -> None:
        if self.worker is not None and not self.worker.alive:
            raise RuntimeError(f"memstream worker exited {self.worker.proc.returncode}; see {self.home}/worker.log")

    def stop(self) -> int:
        code = abs(self.worker.stop() or 0) if self.worker is not None else 0
        self.stack.down()
        return code


def memories_file(events: Sequence[MemoryEvent], path: Path) -> Path:
    from streams.tools.bench import events_file  # the JSON lines a user would publish

    return events_file(events, path)


def wait_timeout_s(events: int) -> int:
    """``publish --wait --timeout``: generous (100 events/s at the least), never an hour for a quick run."""
    return 120 + events // 100


def split_file(path: Path, chunks: int) -> list[Path]:
    """``path`` in ``chunks`` files of consecutive lines, their sizes at most one line apart."""
    if chunks <= 1:
        return [path]
    lines = path.read_bytes().splitlines(keepends=True)
    size, rest = divmod(len(lines), chunks)
    parts, start = [], 0
    for i in range(chunks):
        end = start + size + (i < rest)
        part = path.with_name(f"{path.stem}-{i:02d}.jsonl")
        part.write_bytes(b"".join(lines[start:end]))
        parts.append(part)
        start = end
    return parts


async def index_catch_up(settings: Settings, timeout: float = 900.0) -> tuple[float, int]:
    """Seconds until the fresh tail is empty (LanceDB holds everything searchable), and what it still holds."""
    stores = await Stores.open(settings)
    try:
        started = time.monotonic()
        left = await wait_for_index(stores, timeout=timeout, poll_s=0.1)
        return time.monotonic() - started, left
    finally:
        await stores.close()


# --------------------------------------------------------------------------------------------- publish-wait


async def scenario_publish_wait(base: Settings, work: Path, config: UserConfig, log: Log) -> dict[str, Any]:
    n, chunks = config.publish_events, max(1, config.chunks)
    home = work / "publish-wait"
    stack = UserStack(base, home)
    try:
        await stack.start_worker(log)
        path = memories_file(list(synthetic_events(n, users=max(100, n // 50), seed=41)), home / "events.jsonl")
        parts = split_file(path, chunks)
        workers = stack.worker_pids()
        cpu = CpuSampler({**stack.infra, **workers})
        rss = RssSampler(dict(workers), own=frozenset(workers))
        log(f"publish-wait: memstream publish {path.name} --wait ({n:,} lines in {chunks} file(s))")
        per_chunk, reports, half_at = [], [], None
        cpu.start()
        rss.start()
        started = time.monotonic()
        try:
            for i, part in enumerate(parts):
                if chunks > 1 and i == chunks // 2:  # one file: the middle of the samples
                    half_at = time.monotonic() - started
                lines = sum(1 for _ in part.open("rb"))
                wait_s = wait_timeout_s(lines)
                args = ("publish", str(part), "--wait", "--timeout", str(wait_s))
                seconds, report, publisher_cpu = await asyncio.to_thread(
                    memstream, stack.settings, *args, timeout=wait_s + 60, out=home / f"publish-{i:02d}.json"
                )
                cpu.record("publisher", publisher_cpu)
                reports.append(report)
                per_chunk.append(
                    {"events": lines, "seconds": round(seconds, 3), "events_per_s": round(lines / seconds, 1)}
                )
                stack.check_alive()
            searchable_s = time.monotonic() - started
            at_searchable = cpu.figures(n)
            caught_up_s, left = await index_catch_up(stack.settings)
            at_indexed = cpu.figures(n)
        finally:
            await rss.stop()
        figures: dict[str, Any] = {
            "events": n,
            "chunks": chunks,
            "seconds": round(searchable_s, 3),
            "events_per_s": round(n / searchable_s, 1),  # the whole command(s): process start to all searchable
            "accepted": sum(r["accepted"] for r in reports),
            "materialized": sum(r.get("materialized") or 0 for r in reports),
            "not_materialized": sum(len(r.get("not_materialized", [])) for r in reports),
            "index_caught_up_after_s": round(caught_up_s, 3),
            "fresh_tail_left": left,
            # every process's CPU from the first command's start until LanceDB caught up (the sink's work counted)
            "cpu": at_indexed,
            "cpu_to_searchable": at_searchable,
            "processes": rss.figures(split_at_s=half_at),
        }
        if chunks > 1:
            figures["per_chunk"] = per_chunk
            first, last = per_chunk[0]["events_per_s"], per_chunk[-1]["events_per_s"]
            figures["last_vs_first_chunk"] = round(last / first, 3) if first else None
    finally:
        code = stack.stop()
        log(f"publish-wait: worker exited {code}")
    if base.embedder == "minilm":  # the stack has stopped: the model alone on the same texts, the same cores
        figures.update(model_alone_figures(path, searchable_s, log))
    return figures


def model_alone_figures(path: Path, pipeline_s: float, log: Log) -> dict[str, Any]:
    """The model alone on the file's texts in a process of its own (streams/tools/model_alone.py), and the
    pipeline's texts per second as a share of the model's best: issue 23's "≥ 90% of the model's best rate on this
    machine, measured alone in the same run"."""
    command = [sys.executable, "-m", "streams.tools.model_alone", str(path)]
    log("publish-wait: the MiniLM model alone on the same texts")
    done = subprocess.run(command, capture_output=True, timeout=1_800, check=False)
    if done.returncode != 0:
        log(f"publish-wait: the model alone failed: {done.stderr.decode(errors='replace')[-500:]}")
        return {}
    alone = orjson.loads(done.stdout.splitlines()[-1])
    pipeline = alone["texts"] / pipeline_s
    return {
        "model_alone": alone,
        "pipeline_texts_per_s": round(pipeline, 1),
        "of_model_best": round(pipeline / alone["best_texts_per_s"], 3),
    }


# --------------------------------------------------------------------------------------------- serve

WORDS = ("jazz", "tea", "running", "Lisbon", "chess", "piano", "sourdough", "hiking", "Portuguese", "collie")
# search_single first: the target right after the load is one connection's uncached p99, before the 32 connections
# of search_uncached have warmed anything; search_tenant (all_users: the vector index's path) last
PHASES = ("search_single", "search_uncached", "search_cached", "search_hybrid", "context", "search_tenant")
PHASE_CONNECTIONS = {"search_single": 1, "search_tenant": 1}  # latency figures; the rest: --connections
RECALL_QUERIES = 50  # tenant-wide searches whose top 10 is checked against numpy's exact top 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request_for(phase: str, rng: random.Random, users: int) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, JSON body) of one request of ``phase``: uncached ones ask a new question each time."""
    user = f"user-{rng.randrange(users):05d}"
    words = " ".join(rng.choice(WORDS) for _ in range(3))
    if phase == "search_cached":
        return "POST", "/v1/search", {"query": "what does the user say about jazz", "user_id": "user-00001", "k": 10}
    if phase == "context":
        return "GET", f"/v1/context?user_id={user}", None
    body: dict[str, Any] = {"query": f"{words} {rng.randrange(1_000_000)}", "user_id": user, "k": 10}
    if phase == "search_tenant":
        del body["user_id"]
        body["all_users"] = True
    if phase == "search_hybrid":
        body["mode"] = "hybrid"
    return "POST", "/v1/search", body


async def drive(
    url: str, key: str, phase: str, *, connections: int, seconds: float, users: int
) -> tuple[list[float], Counter[str]]:
    """``connections`` keep-alive connections, each sending its next request when the last one answered; the
    latencies (ms) and the failures by status (or exception)."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    until = time.perf_counter() + seconds
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=headers) as http:
            while time.perf_counter() < until:
                method, path, body = request_for(phase, rng, users)
                started = time.perf_counter()
                try:
                    data = orjson.dumps(body) if body is not None else None
                    async with http.request(method, url + path, data=data) as response:
                        await response.read()
                        if response.status != 200:
                            errors[str(response.status)] += 1
                except aiohttp.ClientError as exc:
                    errors[type(exc).__name__] += 1
                latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(one(i) for i in range(connections)))
    return latencies, errors


def _pct(samples: list[float], p: float) -> float | None:
    return round(float(np.percentile(samples, p)), 2) if samples else None


@dataclass
class Driven:
    """What one phase's load driver saw: requests answered, latency percentiles (ms), failures by kind, and the
    CPU seconds the driver itself spent (it shares the machine's cores with the server it drives)."""

    requests: int
    p50_ms: float | None
    p99_ms: float | None
    errors: Counter[str]
    driver_cpu_s: float


def http_driver(wanted: str) -> str:
    """``auto``: wrk where it is installed (a C load generator: far less CPU per request than a Python client,
    so more of the two cores are left to the server measured), else this process's aiohttp client."""
    if wanted == "auto":
        return "wrk" if shutil.which("wrk") else "aiohttp"
    if wanted == "wrk" and not shutil.which("wrk"):
        raise SystemExit("bench: --http-driver wrk, but no wrk on PATH (apt-get install wrk)")
    return wanted


async def drive_aiohttp(url: str, key: str, phase: str, *, connections: int, seconds: float, users: int) -> Driven:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    latencies, errors = await drive(url, key, phase, connections=connections, seconds=seconds, users=users)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return Driven(len(latencies), _pct(latencies, 50), _pct(latencies, 99), errors, cpu_s)


WRK_SCRIPT = """
local words = {%(words)s}
local users = %(users)d
local phase = "%(phase)s"
local headers = {["Authorization"] = "Bearer %(key)s", ["Content-Type"] = "application/json"}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  math.randomseed(1000003 * (id or 0) + 17)
end

local function three_words()
  return words[math.random(#words)] .. " " .. words[math.random(#words)] .. " " .. words[math.random(#words)]
end

request = function()
  local user = string.format("user-%%05d", math.random(0, users - 1))
  if phase == "context" then
    return wrk.format("GET", "/v1/context?user_id=" .. user, headers, nil)
  end
  local body
  if phase == "search_cached" then
    body = '{"query":"what does the user say about jazz","user_id":"user-00001","k":10}'
  else
    local query = three_words() .. " " .. math.random(0, 999999)
    if phase == "search_tenant" then
      body = '{"query":"' .. query .. '","all_users":true,"k":10}'
    elseif phase == "search_hybrid" then
      body = '{"query":"' .. query .. '","user_id":"' .. user .. '","k":10,"mode":"hybrid"}'
    else
      body = '{"query":"' .. query .. '","user_id":"' .. user .. '","k":10}'
    end
  end
  return wrk.format("POST", "/v1/search", headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%%d,"p50_us":%%d,"p99_us":%%d,"status":%%d,"connect":%%d,"read":%%d,"write":%%d,"timeout":%%d}\\n',
    summary.requests, latency:percentile(50), latency:percentile(99), e.status, e.connect, e.read, e.write,
    e.timeout))
end
"""


async def drive_wrk(
    url: str, key: str, phase: str, *, connections: int, seconds: float, users: int, script_dir: Path
) -> Driven:
    """The same requests as :func:`request_for`, sent by wrk (2 threads, ``connections`` keep-alive connections,
    each sending its next request when the last one answered): its own counts and latency percentiles."""
    script = script_dir / f"wrk-{phase}.lua"
    script_dir.mkdir(parents=True, exist_ok=True)
    words = ", ".join(f'"{w}"' for w in WORDS)
    script.write_text(WRK_SCRIPT % {"words": words, "users": users, "phase": phase, "key": key})
    threads = min(2, connections)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    command += ["-s", str(script), url]

    def run() -> tuple[int, float, str]:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            assert proc.stdout is not None
            output = proc.stdout.read().decode(errors="replace")
            code, cpu_s = wait_with_cpu(proc)
        return code, cpu_s, output

    code, cpu_s, output = await asyncio.to_thread(run)
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"wrk exited {code}: {output[-2000:]}")
    report = orjson.loads(lines[-1])
    errors: Counter[str] = Counter()
    for kind in ("status", "connect", "read", "write", "timeout"):
        if report[kind]:
            errors["non-2xx" if kind == "status" else kind] += int(report[kind])
    return Driven(int(report["requests"]), report["p50_us"] / 1000, report["p99_us"] / 1000, errors, cpu_s)


async def measure_phase(
    url: str, key: str, phase: str, serve_pids: dict[str, int], redis_pid: int, config: UserConfig, work: Path
) -> dict[str, Any]:
    quiet_s = await wait_quiet(serve_pids)  # the previous phase's queued requests are not this phase's
    cpu = CpuSampler({**serve_pids, "redis": redis_pid})
    cpu.start()
    started = time.monotonic()
    connections = PHASE_CONNECTIONS.get(phase, config.connections)
    driver = http_driver(config.http_driver)
    seconds, users = config.serve_seconds, config.serve_users
    if driver == "wrk":
        driven = await drive_wrk(
            url, key, phase, connections=connections, seconds=seconds, users=users, script_dir=work
        )
    else:
        driven = await drive_aiohttp(url, key, phase, connections=connections, seconds=seconds, users=users)
    elapsed = time.monotonic() - started
    n = driven.requests
    by_process = cpu.figures(n, unit="request")
    serve_s = sum(v["cpu_s"] for label, v in by_process.items() if label.startswith("serve"))
    return {
        "driver": driver,
        "connections": connections,
        "requests": n,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(n / elapsed, 1),
        "p50_ms": driven.p50_ms,
        "p99_ms": driven.p99_ms,
        "errors": sum(driven.errors.values()),
        "error_kinds": dict(driven.errors),
        "serve_cpu_us_per_request": round(serve_s * 1e6 / n, 1) if n else None,
        "driver_cpu_us_per_request": round(driven.driver_cpu_s * 1e6 / n, 1) if n else None,
        "cpu": by_process,
        "quiet_wait_s": round(quiet_s, 2),
    }


async def tenant_recall(url: str, key: str, events: Sequence[MemoryEvent], dim: int, queries: int) -> dict[str, Any]:
    """recall@10 of tenant-wide searches over HTTP (``all_users``: the vector index's path once the table is
    big enough) against numpy's exact top 10 over every loaded memory's hash vector. A hit counts when its exact
    cosine is at least the exact 10th's (less float32 rounding): synthetic texts have many equidistant
    neighbours, so the ids of a correct top 10 may differ from numpy's at the cut (``by_id`` says how often)."""
    from infra.embedders import HashEmbedder

    embedder = HashEmbedder(dim)
    ids = {e.memory_id: i for i, e in enumerate(events)}
    matrix = await asyncio.to_thread(embedder.embed_sync, [e.text or "" for e in events])
    rng = random.Random(97)
    texts = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(queries)]
    found = near = by_id = 0
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for text in texts:
            body = {"query": text, "all_users": True, "k": 10}
            async with http.post(f"{url}/v1/search", data=orjson.dumps(body)) as response:
                if response.status != 200:
                    continue
                hits = [h["memory_id"] for h in (await response.json())["hits"]]
            query = embedder.embed_sync([text])[0]
            exact = matrix @ query  # both unit length (the hash embedder normalizes): cosine
            best = np.argsort(-exact, kind="stable")[:10]
            tenth = float(exact[best[-1]])
            found += 1
            near += sum(1 for h in hits if h in ids and float(exact[ids[h]]) >= tenth - 1e-5)
            by_id += len({ids.get(h) for h in hits} & set(best.tolist()))
    return {
        "queries": found,
        "recall_at_10": round(near / (10 * found), 4) if found else None,
        "recall_at_10_by_id": round(by_id / (10 * found), 4) if found else None,
    }


async def tenant_index(settings: Settings) -> list[dict[str, Any]]:
    """The serving table (one per shard) as a tenant-wide search finds it: its rows and its vector index
    (LanceVectorStore.vector_index), read just before the search_tenant phase and again after it (right after
    the load, the sink's maintenance may refresh or retrain the index meanwhile)."""
    stores = await Stores.open(settings)
    try:
        vectors = stores.vectors
        shards = vectors.shards if isinstance(vectors, ShardedVectorStore) else [vectors]
        return [await shard.vector_index() for shard in shards]
    finally:
        await stores.close()


def index_note(tables: list[dict[str, Any]]) -> str:
    """One line per table of what tenant_index found: the rows, and the vector index or an exact scan."""

    def one(t: dict[str, Any]) -> str:
        if t["index"] is None:
            return f"{t['rows']:,} rows, no vector index (exact scan)"
        return (
            f"{t['rows']:,} rows, {t['index']} {t['partitions']} partitions, {t['unindexed_rows']:,} unindexed, "
            f"nprobes {t['nprobes']}, refine {t['refine_factor']}"
        )

    return "; ".join(one(t) for t in tables)


def serve_process_pids(serve: WorkerProcess) -> dict[str, int]:
    """``memstream serve`` and the processes it started (``--workers``), by name."""
    pid = serve.proc.pid
    return {"serve": pid, **{f"serve-{i}": child for i, child in enumerate(child_pids(pid))}}


async def wait_ready(url: str, key: str, serve: WorkerProcess, timeout: float = READY_TIMEOUT_S) -> None:
    """Until ``/readyz`` (broker, Redis and LanceDB answer; a read key's route) says 200."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        while time.monotonic() < deadline:
            if not serve.alive:
                raise RuntimeError(f"memstream serve exited {serve.proc.returncode}; see {serve.log_path}")
            try:
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError(f"memstream serve not ready within {timeout:.0f}s")


async def create_read_key(settings: Settings, home: Path) -> str:
    """A read key of the default tenant, made the way a user makes one (``memstream keys create``)."""
    _, report, _ = await asyncio.to_thread(
        memstream,
        settings,
        *("keys", "create", "--tenant", "default", "--role", "read"),
        timeout=120,
        out=home / "key.json",
    )
    return str(report["key"])


async def publish_wait(settings: Settings, home: Path, path: Path, n: int, *flags: str) -> tuple[float, dict[str, Any]]:
    """``memstream publish PATH --wait [flags]`` of ``n`` events: its seconds and its report."""
    wait_s = wait_timeout_s(n)
    seconds, report, _ = await asyncio.to_thread(
        memstream,
        settings,
        *("publish", str(path), "--wait", *flags, "--timeout", str(wait_s)),
        timeout=wait_s + 60,
        out=home / "publish.json",
    )
    return seconds, report


async def start_serve(
    settings: Settings, home: Path, key: str, workers: int = 0, code: Path | None = None
) -> tuple[WorkerProcess, str]:
    """``memstream serve`` on a free port (``--workers`` when ``workers`` > 0), once ready: it and its URL.
    Stopped again when it does not become ready, since the caller never holds it then. ``code``: the checkout whose
    code it runs (its working directory), else this process's."""
    port = free_port()
    command = [sys.executable, "-m", "streams", "serve", "--port", str(port)]
    if workers > 0:
        command += ["--workers", str(workers)]
    serve = WorkerProcess(settings, home / "serve.log", command=command, cwd=code)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, key, serve)
    except BaseException:
        serve.stop()
        raise
    return serve, url


async def scenario_serve(base: Settings, work: Path, config: UserConfig, log: Log) -> dict[str, Any]:
    n = config.serve_memories
    home = work / "serve"
    stack = UserStack(base, home)
    serve: WorkerProcess | None = None
    try:
        await stack.start_worker(log)
        settings = stack.settings
        key = await create_read_key(settings, home)
        events = [e for e in synthetic_events(2 * n, users=config.serve_users, seed=43) if e.op is Op.ADD][:n]
        path = memories_file(events, home / "memories.jsonl")
        log(f"serve: memstream publish {path.name} --wait --indexed ({n:,} memories, {config.serve_users:,} users)")
        # serve starts once the load is in: with serve already running, a quick run's `publish --wait --indexed`
        # did not return within 3 minutes (300 memories, all in LanceDB after 2 s; not diagnosed here)
        ingest_s, report = await publish_wait(settings, home, path, n, "--indexed")
        serve, url = await start_serve(settings, home, key, config.serve_workers)
        serve_pids = serve_process_pids(serve)
        log(f"serve: {config.connections} connections, {config.serve_seconds:.0f}s per read, right after the load")
        results: dict[str, Any] = {
            "memories": n,
            "users": config.serve_users,
            "ingest_seconds": round(ingest_s, 3),
            "ingest_memories_per_s": round(n / ingest_s, 1),
            "accepted": report["accepted"],
            "connections": config.connections,
            "serve_workers": config.serve_workers or None,  # None: serve's default, one per core
            "serve_processes": len(serve_pids),
        }
        for when in ("after_ingest", "steady"):
            if when == "steady":
                log(f"serve: {config.settle_s:.0f}s later, at steady state")
                await asyncio.sleep(config.settle_s)
            results[when] = {}
            for phase in PHASES:
                before = await tenant_index(settings) if phase == "search_tenant" else None
                figures = await measure_phase(url, key, phase, serve_pids, stack.infra["redis"], config, home)
                if before is not None:
                    figures["index"] = {"before": before, "after": await tenant_index(settings)}
                results[when][phase] = figures
            if settings.embedder == "hash":
                log(f"serve: recall@10 of {RECALL_QUERIES} tenant-wide searches against exact ({when})")
                results[when]["tenant_recall"] = await tenant_recall(
                    url, key, events, settings.hash_dim, RECALL_QUERIES
                )
        stack.check_alive()
        return results
    finally:
        if serve is not None:
            log(f"serve: memstream serve exited {serve.stop()}")
        stack.stop()


# --------------------------------------------------------------------------------------------- freshness

PROBE_GAP_S = 0.2  # between two probes (each is polled until found, or PROBE_TIMEOUT_S)
PROBE_TIMEOUT_S = 10.0
POLL_S = 0.005  # one search every 5 ms per probe: the resolution of the figure


async def scenario_freshness(base: Settings, work: Path, config: UserConfig, log: Log) -> dict[str, Any]:
    """Publish to found by HTTP search right after a bulk load, with background load beside the probes.

    A fresh stack and the default ``memstream worker``; ``freshness_events`` events through ``memstream publish
    FILE --wait`` (not ``--indexed``: the state a user meets as soon as the command returns, the sink still
    catching up and the table not yet indexed); ``memstream serve``; then ``freshness_rate`` events/s produced
    with a plain Kafka producer and, beside them, ``freshness_probes`` probe events (a new memory each, of a
    user the load holds), each polled through ``POST /v1/search`` with its own text until its memory is a hit."""
    n = config.freshness_events
    home = work / "freshness"
    stack = UserStack(base, home)
    serve: WorkerProcess | None = None
    try:
        await stack.start_worker(log)
        settings = stack.settings
        key = await create_read_key(settings, home)
        users = max(100, n // 50)
        path = memories_file(list(synthetic_events(n, users=users, seed=45)), home / "events.jsonl")
        log(f"freshness: memstream publish {path.name} --wait ({n:,} events), then serve and the probes")
        load_s, report = await publish_wait(settings, home, path, n)
        serve, url = await start_serve(settings, home, key)
        log(f"freshness: {config.freshness_probes} probes beside {config.freshness_rate:,} events/s")
        pids = {**stack.infra, **stack.worker_pids(), **serve_process_pids(serve)}
        cpu = CpuSampler(pids)
        cpu.start()
        started = time.monotonic()
        probes, background = await probe_freshness(settings, url, key, config, users)
        elapsed = time.monotonic() - started
        stack.check_alive()
        found = [p for p in probes if p is not None]
        return {
            "events": n,
            "load_seconds": round(load_s, 3),
            "load_events_per_s": round(n / load_s, 1),
            "accepted": report["accepted"],
            "offered_per_s": config.freshness_rate,
            "background_events": background,
            "background_per_s": round(background / elapsed, 1),
            "probes": len(probes),
            "found": len(found),
            "p50_ms": _pct(found, 50),
            "p99_ms": _pct(found, 99),
            "max_ms": round(max(found), 2) if found else None,
            "cpu": cpu.figures(background + len(probes)),
        }
    finally:
        if serve is not None:
            log(f"freshness: memstream serve exited {serve.stop()}")
        stack.stop()


async def probe_freshness(
    settings: Settings, url: str, key: str, config: UserConfig, users: int
) -> tuple[list[float | None], int]:
    """The probes' publish-to-found latencies (ms; None: not found within PROBE_TIMEOUT_S) and how many
    background events were produced beside them."""
    from processors.publishing import EventFactory

    publisher = await KafkaPublisher.start(settings)
    stop = asyncio.Event()
    sent = [0]
    background = asyncio.create_task(_background_load(publisher, settings, config.freshness_rate, stop, sent))
    factory = EventFactory()
    latencies: list[float | None] = []
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            for i in range(config.freshness_probes):
                user = f"user-{i * 7919 % users:05d}"  # a user the load holds, a different one each time
                text = f"freshness probe {i} {random.randrange(1 << 30)} after the load"
                event = factory.from_input({"memory_id": f"fresh-probe-{i}", "user_id": user, "text": text})
                published = time.perf_counter()
                await publisher.publish(settings.topics.events, [(event.key, encode(event))])
                latencies.append(await _until_found(http, url, text, user, published))
                await asyncio.sleep(PROBE_GAP_S)
    finally:
        stop.set()
        await background
        await publisher.stop()
    return latencies, sent[0]


async def _until_found(http: aiohttp.ClientSession, url: str, text: str, user: str, published: float) -> float | None:
    body = orjson.dumps({"query": text, "user_id": user, "k": 10})
    while time.perf_counter() - published < PROBE_TIMEOUT_S:
        async with http.post(f"{url}/v1/search", data=body) as response:
            if response.status == 200:
                answer = orjson.loads(await response.read())
                if any(hit.get("text") == text for hit in answer.get("hits", [])):
                    return (time.perf_counter() - published) * 1000
        await asyncio.sleep(POLL_S)
    return None


async def _background_load(
    publisher: KafkaPublisher, settings: Settings, rate: int, stop: asyncio.Event, sent: list[int]
) -> None:
    """``rate`` events/s (synthetic, over the load's users), in a batch every 20 ms, until ``stop``."""
    events = synthetic_events(10_000_000, users=2_000, seed=47)
    started = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate) - sent[0]
        if due > 0:
            batch = [next(events) for _ in range(due)]
            await publisher.publish(settings.topics.events, [(e.key, encode(e)) for e in batch])
            sent[0] += len(batch)
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------------- the summary


def cpu_row(label: str, cpu: dict[str, Any], unit: str = "event") -> tuple[str, str]:
    per = f"cpu_us_per_{unit}"
    parts = [f"{name} {v[per]:,.0f}" for name, v in cpu.items() if name != "total" and v.get(per) is not None]
    return label, f"{cpu['total'][per]:,.0f} µs/{unit} in all ({'; '.join(parts)})"


def user_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    p = s.get("publish-wait")
    if p:
        rows += [
            (
                f"publish-wait: memstream publish FILE --wait, fresh stack, {p['events']:,} events, "
                f"{p['chunks']} file(s)",
                f"{p['events_per_s']:,.0f} events/s ({p['seconds']:.1f}s; {p['materialized']:,} memories, "
                f"{p['not_materialized']} late)",
            ),
            (
                "  then LanceDB caught up after",
                f"{p['index_caught_up_after_s']:.1f}s (fresh tail left {p['fresh_tail_left']})",
            ),
            cpu_row("  CPU per event, until LanceDB caught up", p["cpu"]),
        ]
        if "of_model_best" in p:
            alone = p["model_alone"]
            rows.append(
                (
                    "  texts/s through the pipeline / the model alone (best threads) = share",
                    f"{p['pipeline_texts_per_s']:,.1f} / {alone['best_texts_per_s']:,.1f} = {p['of_model_best']:.0%}",
                )
            )
        if "per_chunk" in p:
            rates = " / ".join(f"{c['events_per_s']:,.0f}" for c in p["per_chunk"])
            rows.append(("  events/s per chunk (last/first)", f"{rates} ({p['last_vs_first_chunk']})"))
        for label, f in p["processes"].items():
            rows.append(
                (f"  peak RSS MB {label}", f"{f['peak_rss_mb']} (second/first half {f['second_vs_first_half']})")
            )
    f = s.get("freshness")
    if f:
        rows += [
            (
                f"freshness: after {f['events']:,} events through publish --wait ({f['load_events_per_s']:,.0f}/s), "
                f"{f['background_per_s']:,.0f} events/s beside: publish to found by HTTP search p50/p99/max ms",
                f"{f['p50_ms']} / {f['p99_ms']} / {f['max_ms']} ({f['found']} of {f['probes']} probes found)",
            ),
            cpu_row("  CPU per event while probing", f["cpu"]),
        ]
    v = s.get("serve")
    if v:
        where = f"{v['memories']:,} memories, {v['users']:,} users, {v['connections']} connections"
        rows.append(
            (f"serve: ingest (publish --wait --indexed), {where}", f"{v['ingest_memories_per_s']:,.0f} memories/s")
        )
        for when in ("after_ingest", "steady"):
            for phase, f in v[when].items():
                if phase == "tenant_recall":
                    rows.append(
                        (
                            f"  serve tenant-wide recall@10 vs exact ({when.replace('_', ' ')})",
                            f"{f['recall_at_10']} ({f['recall_at_10_by_id']} by id, {f['queries']} queries)",
                        )
                    )
                    continue
                over = ""
                if "index" in f:  # search_tenant: the table it searched, and how
                    before, after = (index_note(f["index"][k]) for k in ("before", "after"))
                    over = f"; over {before}" + ("" if after == before else f", then {after}")
                rows.append(
                    (
                        f"  serve {phase} ({when.replace('_', ' ')}, {f.get('connections', v['connections'])} "
                        f"conn.{over}) requests/s, p50/p99 ms",
                        f"{f['requests_per_s']:,.0f}, {f['p50_ms']} / {f['p99_ms']} ({f['errors']} errors; serve "
                        f"{f['serve_cpu_us_per_request']} µs CPU/request)",
                    )
                )
    return rows
