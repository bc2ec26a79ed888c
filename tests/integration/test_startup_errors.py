"""Errors that say what is wrong (issue 14 item 6), and `serve --no-auth` only on loopback: real processes.

A refused Redis password stops the worker before "ready" with one line; a malformed Redis or Kafka address is
one line, never a traceback; `memstream up` with an external Redis configured starts only the broker and never
prints a line that would replace the configured Redis.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.settings import Settings
from tests.integration.helpers import make_settings, run_cli


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


async def test_a_refused_redis_password_stops_the_worker_with_one_line(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str
) -> None:
    # AUTH as a user that does not exist: WRONGPASS, the same answer as a wrong password
    wrong = redis_url.replace("redis://", "redis://nobody:not-the-password@")
    settings = make_settings(tmp_path, kafka_bootstrap, wrong)
    result = await run_cli(settings, "worker", timeout=60)
    assert result.rc == 1, result
    line = _one_line(result.stderr)
    assert "refused the credentials" in line and "MEMSTREAM_REDIS_URL" in line, line
    assert "not-the-password" not in result.stderr + result.stdout
    assert "ready" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"redis_url": "localhost:6379"}, "MEMSTREAM_REDIS_URL='localhost:6379' is not a Redis URL"),
        ({"redis_url": "redis://localhost:notaport/0"}, "MEMSTREAM_REDIS_URL is not a Redis URL"),
        ({"kafka_bootstrap": "kafka://localhost:9092"}, "is not host:port"),
    ],
)
async def test_malformed_addresses_are_one_line(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str, overrides: dict[str, str], words: str
) -> None:
    settings = make_settings(tmp_path, kafka_bootstrap, redis_url).with_(**overrides)
    result = await run_cli(settings, "worker", timeout=60)
    assert result.rc == 1, result
    assert words in _one_line(result.stderr)


async def test_no_auth_is_refused_off_loopback(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    settings = make_settings(tmp_path, kafka_bootstrap, redis_url)
    result = await run_cli(settings, "serve", "--no-auth", "--host", "0.0.0.0", "--port", "1", timeout=60)
    assert result.rc == 1, result
    assert "--no-auth serves without API keys, so only on loopback" in _one_line(result.stderr)


async def test_up_with_an_external_redis_starts_only_the_broker(tmp_path: Path, redis_url: str) -> None:
    settings = Settings(home=tmp_path / "home", redis_url=redis_url)
    up = await run_cli(settings, "up", "--kafka-port", "0")
    try:
        assert up.rc == 0, up
        assert f"redis: external {redis_url} (MEMSTREAM_REDIS_URL is set): nothing started" in up.stdout, up
        assert "MEMSTREAM_REDIS_URL=" not in up.stdout, up  # no line that would replace the configured Redis
        assert "export MEMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:" in up.stdout, up
        recorded = json.loads((settings.home / "stack.json").read_text())["services"]
        assert set(recorded) == {"kafka"}, recorded
        again = await run_cli(settings, "up", "--json")
        assert again.rc == 0, again
        body = again.json()
        assert body["redis"] == {"external": redis_url} and body["kafka"]["reused"] is True, body
    finally:
        down = await run_cli(settings, "down")
        assert down.rc == 0, down
