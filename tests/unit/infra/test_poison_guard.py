"""The poison-batch guard is installed on purpose, and only over the aiokafka release it was written for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiokafka
import pytest
from aiokafka.consumer import fetcher

from infra.poison_guard import AIOKAFKA_VERSION, _GuardedPartitionRecords, install_batch_guard, installed
from schemas.errors import ConfigError, DependencyVersionError, MemStreamError

ROOT = Path(__file__).resolve().parents[3]


def test_another_aiokafka_release_is_refused_naming_both_versions() -> None:
    before = (fetcher.PartitionRecords, fetcher.MemoryRecords)
    with pytest.raises(DependencyVersionError) as refused:
        install_batch_guard(version="0.15.1")
    message = str(refused.value)
    assert f"aiokafka {AIOKAFKA_VERSION}" in message and "aiokafka 0.15.1 is installed" in message
    assert isinstance(refused.value, ConfigError) and isinstance(refused.value, MemStreamError)
    assert not refused.value.retriable
    assert (fetcher.PartitionRecords, fetcher.MemoryRecords) == before  # nothing replaced


def test_the_release_it_was_written_for_is_the_one_installed_here() -> None:
    # if this fails, aiokafka was upgraded: check the guard against the new fetcher before moving AIOKAFKA_VERSION
    assert aiokafka.__version__ == AIOKAFKA_VERSION


def test_installing_replaces_the_fetcher_classes_and_twice_is_harmless() -> None:
    install_batch_guard()
    install_batch_guard()
    assert installed() and fetcher.PartitionRecords is _GuardedPartitionRecords


def test_importing_the_kafka_adapters_patches_nothing() -> None:
    code = (
        "import infra.kafka, infra.log_reader, infra.poison_guard as g; "
        "from aiokafka.consumer import fetcher as f; "
        "print(g.installed(), f.PartitionRecords.__module__)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "aiokafka.consumer.fetcher"]
