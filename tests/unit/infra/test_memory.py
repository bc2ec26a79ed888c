"""glibc's allocator tuning: applied where glibc is, skipped cleanly when turned off or elsewhere."""

from __future__ import annotations

import platform

from infra.memory import tune_malloc


def test_zero_leaves_glibc_alone() -> None:
    assert tune_malloc(0) is False


def test_a_fixed_threshold_is_applied_on_glibc() -> None:
    # glibc answers mallopt with 1; elsewhere (musl, macOS) the tuning is skipped, never an error
    assert tune_malloc(131_072) is (platform.libc_ver()[0] == "glibc")
