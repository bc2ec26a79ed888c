"""Fixtures for integration tests: a real Tansu broker and a real Redis, started once per session on free ports.

Every test gets its own topic and key prefixes (the ``settings`` fixture), so tests share the servers without
seeing each other's data. Nothing here flushes or stops a server these fixtures did not start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from infra import services
from infra.services import ManagedProcess
from infra.settings import Settings
from tests.integration.helpers import S3Server, make_settings

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as ``integration`` (``-m 'not integration'`` deselects them)."""
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A memory-only Tansu broker on a free port, for the whole session."""
    proc = services.start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A Redis server without persistence on a free port, for the whole session."""
    proc = services.start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3-protocol server (moto's standalone server) on a free port, for the whole session: each test that
    uses it makes a bucket of its own (S3Server.create_bucket)."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: ManagedProcess) -> str:
    """``127.0.0.1:PORT`` of the session broker."""
    return services.kafka_url(broker.host, broker.port)


@pytest.fixture(scope="session")
def redis_url(redis_server: ManagedProcess) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session Redis."""
    return services.redis_url(redis_server.host, redis_server.port)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the session Redis, closed after the test."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def lancedb_uri(tmp_path: Path) -> Path:
    """A fresh LanceDB directory for one test (the same path ``settings.lancedb_path`` resolves to)."""
    return tmp_path / "lancedb"


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> Settings:
    """Settings for one test: the session servers, with topic, key and consumer-group names no other test uses
    (helpers.make_settings; a shared group would let tests' workers rebalance each other)."""
    return make_settings(tmp_path, kafka_bootstrap, redis_url)
