"""The rebuild's refusal of a log that retention has trimmed (the broker's answer stubbed: Tansu never trims)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from infra.log_reader import LogReader
from streams.runtime.replay import LogIncompleteError, check_log_complete


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
