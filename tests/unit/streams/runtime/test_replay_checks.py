"""The rebuild's checks: the refusal of a log that retention has trimmed (the broker's answer stubbed: Tansu never
trims), and the snapshot check and the verify on states read once."""

from __future__ import annotations

import gc
from typing import Any, cast

import pytest

from infra.generations import generation
from infra.log_reader import LogReader
from infra.settings import Settings
from processors.model import StoreState
from streams.runtime.replay import (
    LogIncompleteError,
    check_log_complete,
    memories_behind,
    rare_collections,
    verify_generation,
)


class Beginnings:
    """Only what check_log_complete asks a reader: each partition's first offset still held."""

    def __init__(self, firsts: dict[int, int]) -> None:
        self.firsts = firsts

    async def beginnings(self) -> dict[int, int]:
        return self.firsts


def reader(firsts: dict[int, int]) -> LogReader:
    stub: Any = Beginnings(firsts)
    return cast(LogReader, stub)


async def test_a_complete_log_passes() -> None:
    await check_log_complete(reader({0: 0, 1: 0}), "p.embedded")


async def test_a_trimmed_log_is_refused_naming_the_partitions_and_the_fix() -> None:
    with pytest.raises(LogIncompleteError) as caught:
        await check_log_complete(reader({0: 0, 1: 41_000, 2: 7}), "p.embedded")
    message = str(caught.value)
    assert "p.embedded[1] starts at 41000" in message and "p.embedded[2] starts at 7" in message
    assert "p.embedded[0]" not in message
    assert "retention.ms=-1" in message and "--allow-incomplete-log" in message


# ------------------------------------------------- the snapshot check and the verify on states read once


def state(version: int, event_id: str = "e", deleted: bool = False) -> StoreState:
    return StoreState(version, event_id, "h", deleted)


def test_memories_behind_names_what_the_new_generation_lacks_or_holds_older() -> None:
    serving = {"t/a": state(2), "t/b": state(1, "b"), "t/c": state(3), "t/d": state(1)}
    built = {"t/a": state(2), "t/b": state(1, "a"), "t/c": state(4), "t/e": state(1)}
    # b: same version, lower event id; d: missing; c newer in the build; e only in the build
    assert memories_behind(serving, built) == ["t/b", "t/d"]


def test_memories_behind_is_empty_when_the_serving_generation_was_not_read() -> None:
    assert memories_behind(None, {}) == []


async def test_verify_compares_the_states_it_is_given_without_opening_the_stores() -> None:
    settings = cast(Settings, None)  # opening stores with it would fail: the states given are all it may use
    gen = generation("memories", "p:", 2)
    same = await verify_generation(settings, gen, read=({"t/a": state(1)}, {"t/a": state(1)}))
    assert same["consistent"] and same["lancedb_memories"] == 1
    differ = await verify_generation(settings, gen, read=({"t/a": state(2)}, {"t/a": state(1)}))
    assert not differ["consistent"]


def test_rare_collections_raises_the_young_threshold_inside_and_restores_it_even_on_an_error() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), rare_collections(young=before[0] + 12_345):
        assert gc.get_threshold() == (before[0] + 12_345, *before[1:])
        raise RuntimeError("the build failed")
    assert gc.get_threshold() == before
