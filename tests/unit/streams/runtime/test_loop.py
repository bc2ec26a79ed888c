"""The one consume loop against a scripted consumer (no broker): commits follow writes, revocations wait for the
batch in hand, batches are taken by size, the hook runs between batches, and a stop finishes the batch in hand."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.model import InRecord
from streams.runtime.loop import Batching, Committed, ConsumeLoop

T0 = TopicPartition("t", 0)


def message(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(topic="t", partition=partition, offset=offset, key=None, value=b"x", timestamp=0)


class ScriptedConsumer:
    """``getmany`` hands out the scripted fetches in turn (at most ``max_records``: the rest of a fetch comes next
    time, in order), then nothing, setting ``stopping`` once the script is spent. Records every call in ``log``."""

    def __init__(
        self,
        fetches: Sequence[dict[TopicPartition, list[SimpleNamespace]]],
        stopping: asyncio.Event,
        log: list[str],
        owned: set[TopicPartition] | None = None,
    ) -> None:
        self.fetches = [dict(f) for f in fetches]
        self.stopping = stopping
        self.log = log
        self.owned = owned if owned is not None else {tp for f in fetches for tp in f} or {T0}
        self.commits: list[dict[TopicPartition, int]] = []
        self.stopped = False
        self.fail_commits = False

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[SimpleNamespace]]:
        await asyncio.sleep(0)
        if not self.fetches:
            self.stopping.set()
            return {}
        fetch = self.fetches[0]
        out: dict[TopicPartition, list[SimpleNamespace]] = {}
        for tp in list(fetch):
            room = max_records - sum(len(v) for v in out.values())
            if room <= 0:
                break
            out[tp], fetch[tp] = fetch[tp][:room], fetch[tp][room:]
            if not fetch[tp]:
                del fetch[tp]
        if not fetch:
            self.fetches.pop(0)
        return out

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await asyncio.sleep(0)
        if self.fail_commits:
            raise CommitFailedError("rebalanced")
        self.log.append("commit " + ",".join(f"{tp.partition}:{o}" for tp, o in sorted(offsets.items())))
        self.commits.append(dict(offsets))

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    async def stop(self) -> None:
        self.stopped = True


class Handler:
    """Logs prepare/write/hook calls; ``gate`` (when given) holds every write until it is set."""

    def __init__(self, log: list[str], gate: asyncio.Event | None = None, fail_at: int | None = None) -> None:
        self.log = log
        self.gate = gate
        self.fail_at = fail_at
        self.written: list[list[InRecord]] = []
        self.done: list[Committed] = []
        self.hooks: list[bool] = []
        self.in_write = False
        self.hook_beside_write = False

    async def prepare(self, records: Sequence[InRecord]) -> list[InRecord]:
        self.log.append(f"prepare {records[0].offset}")
        return list(records)

    async def write(self, prepared: list[InRecord]) -> int:
        self.in_write = True
        try:
            self.log.append(f"write {prepared[0].offset}")
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_at is not None and prepared[0].offset == self.fail_at:
                raise RuntimeError("store exploded")
            self.written.append(prepared)
            self.log.append(f"written {prepared[0].offset}")
            return len(prepared)
        finally:
            self.in_write = False

    async def committed(self, batch: Committed) -> None:
        self.done.append(batch)

    async def between_batches(self, consumer: Any, *, idle: bool) -> None:
        self.hook_beside_write |= self.in_write
        self.hooks.append(idle)


def fetches_of(*sizes: int, partition: int = 0, start: int = 0) -> list[dict[TopicPartition, list[SimpleNamespace]]]:
    out = []
    offset = start
    for n in sizes:
        out.append({TopicPartition("t", partition): [message(partition, o) for o in range(offset, offset + n)]})
        offset += n
    return out


async def run_loop(loop: ConsumeLoop, consumer: ScriptedConsumer) -> None:
    await asyncio.wait_for(loop.run(consumer, consumer.stopping), 5)  # type: ignore[arg-type]


async def test_each_batch_is_committed_only_after_its_write() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log)
    consumer = ScriptedConsumer(fetches_of(10, 10), stopping, log)
    await run_loop(ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=5)), consumer)
    first = ["prepare 0", "write 0", "written 0", "commit 0:10"]
    assert log == [*first, "prepare 10", "write 10", "written 10", "commit 0:20"]
    assert [d.result for d in handler.done] == [10, 10] and all(d.commit_ok for d in handler.done)
    assert consumer.stopped


async def test_a_failing_write_never_commits_its_offsets_and_stops_the_loop() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log, fail_at=10)
    consumer = ScriptedConsumer(fetches_of(10, 10, 10), stopping, log)
    with pytest.raises(RuntimeError, match="store exploded"):
        await run_loop(ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=5)), consumer)
    assert consumer.commits == [{T0: 10}]  # the first batch only: the failed one (10..19) is read again later
    assert "prepare 20" not in log and consumer.stopped


async def test_a_failing_write_under_overlap_commits_nothing_after_it() -> None:
    """With overlap the next batch is prepared beside the write; the failure still leaves everything from the
    failed batch on uncommitted."""
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log, fail_at=0)
    consumer = ScriptedConsumer(fetches_of(10, 10, 10), stopping, log)
    with pytest.raises(RuntimeError, match="store exploded"):
        await run_loop(ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=5), overlap=True), consumer)
    assert consumer.commits == [] and handler.done == [] and consumer.stopped


async def test_a_revocation_during_a_write_waits_until_the_batch_is_committed() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    gate = asyncio.Event()
    handler = Handler(log, gate=gate)
    consumer = ScriptedConsumer(fetches_of(10), stopping, log)
    loop = ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=5))
    fence = loop.fence("test member")
    running = asyncio.create_task(run_loop(loop, consumer))
    while "write 0" not in log:
        await asyncio.sleep(0)

    async def revoke() -> None:
        await fence.on_partitions_revoked({T0})
        log.append("revoked")

    revoking = asyncio.create_task(revoke())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not revoking.done() and "revoked" not in log  # held while the write is in flight
    gate.set()
    await asyncio.wait_for(revoking, 5)
    await running
    assert log.index("written 0") < log.index("commit 0:10") < log.index("revoked")


async def test_a_batch_whose_partitions_moved_while_it_was_taken_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log)
    consumer = ScriptedConsumer(fetches_of(5), stopping, log, owned=set())  # revoked before the write
    with caplog.at_level(logging.INFO, logger="memstream.loop"):
        await run_loop(ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=5), member="sink"), consumer)
    assert handler.written == [] and consumer.commits == []
    assert "dropping t[0]@0..4: its partitions moved to another sink" in caplog.text


async def test_a_failed_commit_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log)
    consumer = ScriptedConsumer(fetches_of(5, 5), stopping, log)
    consumer.fail_commits = True
    with caplog.at_level(logging.WARNING, logger="memstream.loop"):
        await run_loop(ConsumeLoop(handler, Batching(5, wait_ms=5, linger_ms=5), redo="it comes again"), consumer)
    assert [d.commit_ok for d in handler.done] == [False, False] and len(handler.written) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert [w.split(" failed (")[0] for w in warnings] == ["commit of t[0]@0..4", "commit of t[0]@5..9"]
    assert all(w.endswith("); it comes again") for w in warnings)


async def test_batches_are_cut_at_the_size_and_gather_fetches_up_to_it() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log)
    consumer = ScriptedConsumer(fetches_of(3, 4, 25, 2), stopping, log)
    await run_loop(ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=60_000)), consumer)
    # the linger gathers fetches (3 + 4 + 3 of the next) until the size is reached; the last fetch's 2 join the
    # rest of the 25
    assert [len(b) for b in handler.written] == [10, 10, 10, 4]
    assert [c[T0] for c in consumer.commits] == [10, 20, 30, 34]


async def test_without_linger_a_batch_is_what_one_fetch_brought() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log)
    consumer = ScriptedConsumer(fetches_of(3, 4), stopping, log)
    await run_loop(ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=0)), consumer)
    assert [len(b) for b in handler.written] == [3, 4]


async def test_the_hook_runs_between_batches_and_when_idle_never_beside_a_write() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log)
    # a full batch under overlap, then a short one (caught up), then nothing
    consumer = ScriptedConsumer([*fetches_of(10, 10, 3), {}], stopping, log)
    consumer.fetches.insert(3, {})  # an empty fetch before the script ends: the loop is idle once
    loop = ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=0), overlap=True)
    await run_loop(loop, consumer)
    assert not handler.hook_beside_write
    # overlap: no hook between the full batches (a write is in flight); once caught up, after the short batch;
    # then idle on the empty fetch(es)
    assert handler.hooks[0] is False and all(handler.hooks[1:]) and len(handler.hooks) >= 2
    assert [c[T0] for c in consumer.commits] == [10, 20, 23]


async def test_a_stop_finishes_and_commits_the_batch_in_hand() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    gate = asyncio.Event()
    handler = Handler(log, gate=gate)
    consumer = ScriptedConsumer(fetches_of(10, 10, 10), stopping, log)
    loop = ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=0))
    running = asyncio.create_task(run_loop(loop, consumer))
    while "write 0" not in log:
        await asyncio.sleep(0)
    stopping.set()
    gate.set()
    await running
    assert consumer.commits == [{T0: 10}] and "prepare 10" not in log and consumer.stopped


async def test_a_cancelled_loop_commits_nothing_of_the_write_it_interrupts() -> None:
    log: list[str] = []
    stopping = asyncio.Event()
    handler = Handler(log, gate=asyncio.Event())  # never released
    consumer = ScriptedConsumer(fetches_of(10), stopping, log)
    running = asyncio.create_task(ConsumeLoop(handler, Batching(10, wait_ms=5, linger_ms=0)).run(consumer, stopping))  # type: ignore[arg-type]
    while "write 0" not in log:
        await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert consumer.commits == [] and consumer.stopped


@settings(max_examples=60, deadline=None)
@given(
    fetches=st.lists(
        st.dictionaries(st.integers(0, 3), st.integers(1, 12), min_size=1, max_size=4), min_size=1, max_size=12
    ),
    size=st.integers(1, 20),
    linger=st.sampled_from([0, 60_000]),
    overlap=st.booleans(),
)
def test_every_record_is_handed_exactly_once_in_order_per_partition(
    fetches: list[dict[int, int]], size: int, linger: int, overlap: bool
) -> None:
    next_offset = dict.fromkeys(range(4), 0)
    script = []
    for fetch in fetches:
        batch = {}
        for p, n in fetch.items():
            batch[TopicPartition("t", p)] = [message(p, o) for o in range(next_offset[p], next_offset[p] + n)]
            next_offset[p] += n
        script.append(batch)

    async def scenario() -> tuple[Handler, ScriptedConsumer]:
        log: list[str] = []
        stopping = asyncio.Event()
        handler = Handler(log)
        consumer = ScriptedConsumer(script, stopping, log)
        await run_loop(ConsumeLoop(handler, Batching(size, wait_ms=5, linger_ms=linger), overlap=overlap), consumer)
        return handler, consumer

    handler, consumer = asyncio.run(scenario())
    assert all(0 < len(b) <= size for b in handler.written)
    seen: dict[int, list[int]] = {}
    for batch in handler.written:
        for r in batch:
            seen.setdefault(r.partition, []).append(r.offset)
    assert seen == {p: list(range(n)) for p, n in next_offset.items() if n}  # once each, in order
    # the commits only move forward, and the last of each partition is one past its last record
    last: dict[TopicPartition, int] = {}
    for commit in consumer.commits:
        for tp, offset in commit.items():
            assert offset > last.get(tp, 0)
            last[tp] = offset
    assert {tp.partition: o for tp, o in last.items()} == {p: n for p, n in next_offset.items() if n}
