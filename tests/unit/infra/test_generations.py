"""Naming of store generations (the pointer itself is exercised against LanceDB in tests/integration)."""

from __future__ import annotations

import pytest

from infra.generations import Generation, generation, generation_names, generation_numbers, pointer_table
from schemas.errors import ConfigError


def test_generation_zero_is_what_deployments_had_before_rebuilds() -> None:
    assert generation_names("memories", "memstream:", 0) == ("memories", "memstream:")


def test_later_generations_live_beside_it() -> None:
    assert generation_names("memories", "memstream:", 3) == ("memories__g3", "memstream:g3:")
    assert generation("memories", "p:", 2) == Generation(2, "memories__g2", "p:g2:")
    assert pointer_table("memories") == "memories__active"
    with pytest.raises(ConfigError):
        generation_names("memories", "p:", -1)


def test_generation_numbers_come_from_table_names_of_this_base_only() -> None:
    names = ["memories", "memories__g2", "memories__g10", "memories__active", "other__g7", "memories__gx"]
    assert generation_numbers("memories", names) == [0, 2, 10]
    assert generation_numbers("memories", ["memories__g1"]) == [1]


def test_memory_keys_of_two_generations_never_overlap() -> None:
    # generation 0 scans "<prefix>m:*"; generation N's keys are "<prefix>gN:m:*", which that pattern cannot match
    _, zero = generation_names("t", "memstream:", 0)
    _, one = generation_names("t", "memstream:", 1)
    assert not f"{one}m:x".startswith(f"{zero}m:")
