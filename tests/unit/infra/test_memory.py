"""glibc's allocator tuning: applied where glibc is, skipped cleanly when turned off or elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from infra.memory import tune_malloc


def test_zero_leaves_glibc_alone() -> None:
    assert tune_malloc(0) is False


def test_a_fixed_threshold_is_applied_on_glibc() -> None:
    # glibc answers mallopt with 1; elsewhere (musl, macOS) the tuning is skipped, never an error
    assert tune_malloc(131_072) is (platform.libc_ver()[0] == "glibc")


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_gives_back_freed_holes_between_live_blocks() -> None:
    # Measured in a fresh interpreter: in a test process that already ran hundreds of tests (a pytest-xdist
    # worker) the freed blocks can land in holes of an older heap, and the RSS drop says nothing about the trim.
    # 64 KiB blocks (under the mmap threshold: from the heap) with small live blocks between them: once the big
    # ones are freed, glibc keeps their pages (they are not at the top of the heap) until it is asked to trim
    code = """
import sys
sys.path.insert(0, sys.argv[1])
from infra.memory import release_free_memory
from tests.unit.infra.test_memory import _rss_kb
blocks, keepers = [], []
for _ in range(1_000):
    blocks.append(bytearray(b"x" * 65_536))
    keepers.append(bytearray(b"k" * 700))
del blocks
before = _rss_kb()
assert release_free_memory() is True
assert before - _rss_kb() > 32 * 1024, "malloc_trim gave back less than half of the 64 MB freed"
assert len(keepers) == 1_000
"""
    repo = str(Path(__file__).resolve().parents[3])
    done = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
