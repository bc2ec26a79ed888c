"""The reading process's GC policy: survivors are frozen (never walked by full collections), and a frozen object
a cache drops is still freed."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from streams.runtime.gc_policy import freeze_periodically, freeze_survivors


class Row:
    """Stands for a cached value: plain data, no cycles."""

    def __init__(self, n: int) -> None:
        self.n = n


@pytest.fixture(autouse=True)
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_survivors_leave_the_collected_generations_and_are_still_freed_when_dropped() -> None:
    cache = {i: Row(i) for i in range(1_000)}
    probe = weakref.ref(cache[7])
    frozen = freeze_survivors()

    assert frozen >= 1_000 and gc.get_freeze_count() == frozen
    assert all(not any(obj is cache[7] for obj in gen) for gen in [gc.get_objects(g) for g in range(3)])
    del cache  # a cache dropping its entries: reference counting frees them, frozen or not
    assert probe() is None


def test_young_cyclic_garbage_is_collected_before_a_freeze() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    probe = weakref.ref(Node())  # a cycle, already garbage
    assert probe() is not None
    freeze_survivors()
    assert probe() is None  # collected, not frozen


async def test_freezes_on_a_timer_until_cancelled() -> None:
    task = asyncio.create_task(freeze_periodically(every_s=0.01))
    await asyncio.sleep(0.05)
    first = gc.get_freeze_count()
    keep = [Row(i) for i in range(500)]
    await asyncio.sleep(0.05)
    assert first > 0 and gc.get_freeze_count() >= first + len(keep)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
