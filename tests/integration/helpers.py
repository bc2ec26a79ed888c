"""Helpers for the pipeline integration tests: the worker as a subprocess, CLI runs, topic readers, store peeks.

Nothing here mocks anything: the worker and the CLI run as real processes against the session broker and Redis,
and the stores are read the way an operator would (LanceDB opened directly, Redis keys read directly).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from infra.api_keys import KeyStore, Role
from infra.settings import Settings

REPO = Path(__file__).resolve().parents[2]
WORKER_STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 120.0


def unique_tag() -> str:
    return uuid.uuid4().hex[:8]


def two_tenants_with_keys(
    settings: Settings, prefix: str, roles: Iterable[Role] = (Role.READ, Role.WRITE)
) -> tuple[tuple[str, str], dict[tuple[str, Role], str]]:
    """Two fresh tenants (``<prefix>a<tag>``, ``<prefix>b<tag>``) and a key of each role for each, in the keys file
    of ``settings``: what a test of the tenant walls needs before it starts a server."""
    tag = unique_tag()
    tenants = (f"{prefix}a{tag}", f"{prefix}b{tag}")
    store = KeyStore(settings.keys_path)
    chosen = tuple(roles)  # an iterator would be spent by the first tenant
    return tenants, {(t, role): store.create(t, role)[1] for t in tenants for role in chosen}


def make_settings(home: Path, kafka_bootstrap: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings with topic, key and consumer-group names no other test (or worker) uses."""
    tag = unique_tag()
    values: dict[str, Any] = {
        "home": home,
        "kafka_bootstrap": kafka_bootstrap,
        "redis_url": redis_url,
        "topic_prefix": f"p{tag}.",
        "redis_prefix": f"p{tag}:",
        "group_id": f"g{tag}",
        "embedder": "hash",
        "window_ms": 20,
        "sink_linger_ms": 200,  # the suite's small batches: the default 1 s would only add waits
        "partitions": 2,
    }
    values.update(overrides)
    return Settings(**values)


def process_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker or CLI process: the caller's, minus stray MEMSTREAM_*, plus these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
    env.update(settings.to_env())
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


# ------------------------------------------------------------------------------------------------ worker


class WorkerProcess:
    """``python -m streams worker`` as a child process, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.settings.home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams", "worker"],
                env=process_env(self.settings),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.proc is not None, "the worker was never started"
        code = self.proc.poll()
        assert code is None, f"the worker exited with {code}:\n{self.log_tail()}"

    async def wait_for_log(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.log():
            self.assert_alive()
            assert time.monotonic() < deadline, (
                f"no {marker!r} in the worker log after {timeout:.0f}s:\n{self.log_tail()}"
            )
            await asyncio.sleep(0.1)

    def interrupt(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait_stopped(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> tuple[int, float]:
        """Wait for the exit after :meth:`interrupt`; (exit code, seconds). Kills it (and fails) if it hangs."""
        assert self.proc is not None
        started = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"the worker did not stop within {timeout:.0f}s of SIGINT:\n{self.log_tail()}"
            ) from None
        return code, time.monotonic() - started


async def command_calls(client: Any, command: str) -> int:
    """How many times the server behind ``client`` ran ``command`` (INFO commandstats; scripts' calls included)."""
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# --------------------------------------------------------------------------------------------------- CLI


@dataclass
class CliResult:
    args: Sequence[str]
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return orjson.loads(self.stdout)
        except orjson.JSONDecodeError:
            raise AssertionError(f"`memstream {' '.join(self.args)}` printed no JSON:\n{self}") from None

    def __str__(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def cli_command() -> list[str]:
    """The installed console script (what a user runs), else the module."""
    script = Path(sys.executable).parent / "memstream"
    return [str(script)] if script.exists() else [sys.executable, "-m", "streams"]


async def run_cli(settings: Settings, *args: str, timeout: float = CLI_TIMEOUT_S) -> CliResult:
    proc = await asyncio.create_subprocess_exec(
        *cli_command(),
        *args,
        env=process_env(settings),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"`memstream {' '.join(args)}` did not finish within {timeout:.0f}s") from None
    assert proc.returncode is not None
    return CliResult(args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def write_jsonl(path: Path, lines: Iterable[dict[str, Any] | str]) -> Path:
    """One line per item: dicts as JSON, strings verbatim (for malformed lines)."""
    with path.open("wb") as handle:
        for line in lines:
            handle.write(line.encode() if isinstance(line, str) else orjson.dumps(line))
            handle.write(b"\n")
    return path


# ------------------------------------------------------------------------------------------------ topics


async def read_topic(
    settings: Settings,
    topic: str,
    done: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    *,
    timeout: float = 30.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the beginning (no group) until ``done(records)`` or ``timeout``; return what was read."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


# ------------------------------------------------------------------------------------------------ stores


async def lance_rows(settings: Settings, where: str) -> list[dict[str, Any]]:
    """Rows of the LanceDB table, read directly (no memstream code): duplicates would show here."""
    db = await lancedb.connect_async(
        settings.lancedb_path,
        read_consistency_interval=timedelta(0),
        storage_options=settings.lancedb_storage or None,  # an s3:// table: the S3 server's endpoint and keys
    )
    table = await db.open_table(settings.lancedb_table)
    columns = [
        "memory_id",
        "tenant_id",
        "user_id",
        "agent_id",
        "text",
        "version",
        "event_id",
        "content_hash",
        "deleted",
    ]
    result = await table.query().where(where).select(columns).to_arrow()
    rows: list[dict[str, Any]] = result.to_pylist()
    return rows


async def wait_for(probe: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Await ``probe()`` until it returns something truthy; fail saying ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        await asyncio.sleep(interval)


def answers_http(url: str) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class ServeProcess:
    """``memstream serve`` as a child process on a free port, logging to a file; stopped with SIGINT.

    One server process unless ``workers`` says otherwise (``/metrics`` counts one process's requests)."""

    def __init__(self, settings: Settings, log_path: Path, workers: int = 1) -> None:
        self.settings = settings
        self.log_path = log_path
        self.workers = workers
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> ServeProcess:
        from infra import services

        port = services.free_port()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*cli_command(), "serve", "--port", str(port), "--workers", str(self.workers)],
                env=process_env(self.settings),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        try:
            while not answers_http(f"{self.url}/healthz"):
                assert self.proc.poll() is None, self.log_text()
                assert time.monotonic() < deadline, f"the server did not start:\n{self.log_text()}"
                time.sleep(0.2)
        except BaseException:
            self.proc.kill()
            raise
        return self

    def interrupt(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)

    def wait_stopped(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def log_text(self) -> str:
        return self.log_path.read_text()


# ---------------------------------------------------------------------------------------------------- S3


class S3Server:
    """moto's standalone server (``python -m moto.server``), an S3-protocol server in a child process on a free
    port of the loopback: in memory, any credentials accepted. LanceDB reaches it as it would AWS S3."""

    ACCESS_KEY = "memstream-test"
    SECRET_KEY = "memstream-test-secret"
    REGION = "us-east-1"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> S3Server:
        from infra import services

        self.port = services.free_port()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        try:
            while not answers_http(f"{self.endpoint}/moto-api/data.json"):
                assert self.proc.poll() is None, f"moto_server exited:\n{self.log_path.read_text()}"
                assert time.monotonic() < deadline, f"moto_server did not answer:\n{self.log_path.read_text()}"
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION,
        )

    def create_bucket(self) -> str:
        """A new bucket no other test uses; its name."""
        name = f"memstream-{unique_tag()}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str) -> list[str]:
        """Every object key under ``prefix``, as the S3 API lists them."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def storage_options(self) -> dict[str, str]:
        """LanceDB's storage options for this server (what MEMSTREAM_LANCEDB_STORAGE_OPTIONS or the AWS_*
        variables carry)."""
        return {
            "aws_endpoint": self.endpoint,
            "aws_access_key_id": self.ACCESS_KEY,
            "aws_secret_access_key": self.SECRET_KEY,
            "aws_region": self.REGION,
            "allow_http": "true",
        }
