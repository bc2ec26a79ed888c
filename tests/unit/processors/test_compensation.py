"""The compensation processor against fakes: retried until applied, re-queued with backoff, dead-lettered
when the budget is spent or the error cannot go away, and never allowed to overwrite a newer change."""

from __future__ import annotations

from processors.compensation import CompensationProcessor
from processors.model import InRecord
from processors.pipeline import CompensationPolicy
from schemas.consistency import decode_compensation
from schemas.errors import StoreError
from schemas.events import decode_change, decode_dead_letter
from tests.unit.processors.fakes import TOPICS, Rig
from tests.unit.processors.test_pipeline import event, expected_state, record


class Clock:
    def __init__(self, now: int = 10**12) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def compensations(rig: Rig) -> list[InRecord]:
    """What is on the compensations topic now, as records, and clear it (the processor consumed it)."""
    sent = rig.publisher.sent.pop(TOPICS.compensations, [])
    return [InRecord(TOPICS.compensations, 0, i, k, v) for i, (k, v) in enumerate(sent)]


def processor(rig: Rig, clock: Clock) -> CompensationProcessor:
    return CompensationProcessor(rig.materializer, rig.counters, clock=clock, sleep=rig._sleep)


async def test_a_failed_redis_write_is_applied_later_and_announced_with_both_stores() -> None:
    rig, clock = Rig(), Clock()
    rig.cache.failures = [StoreError("redis down")] * 3
    events = [event("m1", 1), event("m2", 1)]
    await rig.ingest.process([record(e) for e in events])
    [raw] = compensations(rig)
    comp = decode_compensation(raw.value)
    clock.now = comp.next_attempt_ts - 250  # the processor waits for the backoff to pass

    report = await processor(rig, clock).write(await processor(rig, clock).prepare([raw]))

    assert 0.25 in rig.sleeps
    assert await rig.cache.states() == await rig.vectors.states() == expected_state(events)
    changes = [decode_change(v) for v in rig.publisher.values(TOPICS.changes)]
    assert sorted(c.memory_id for c in changes) == ["m1", "m2"]
    assert all(c.stores == ("lancedb", "redis") for c in changes)
    assert report.applied == 2 and rig.counters.totals["compensations_applied"] == 1


async def test_still_failing_goes_back_on_the_topic_with_its_history() -> None:
    rig, clock = Rig(), Clock()
    rig.vectors.failures = [StoreError("lancedb down")] * 4  # 3 inline, then the first compensation attempt
    await rig.ingest.process([record(event("m1", 1))])
    [raw] = compensations(rig)
    first = decode_compensation(raw.value)

    await processor(rig, clock).write(await processor(rig, clock).prepare([raw]))

    [again_raw] = compensations(rig)
    again = decode_compensation(again_raw.value)
    assert again.compensation_id == first.compensation_id
    assert again.attempt_count == 2 and again.next_attempt_ts > clock.now
    assert rig.publisher.values(TOPICS.dlq) == []
    assert rig.counters.totals["compensations_retried"] == 1
    # the next try works: LanceDB catches up
    await processor(rig, clock).write(await processor(rig, clock).prepare([again_raw]))
    assert await rig.vectors.states() == expected_state([event("m1", 1)])


async def test_the_budget_spent_sends_it_to_the_dead_letter_topic_with_every_attempt() -> None:
    rig, clock = Rig(compensation=CompensationPolicy(max_attempts=3)), Clock()
    rig.cache.failures = [StoreError("redis down")] * 10
    await rig.ingest.process([record(event("m1", 1))])
    raw = compensations(rig)
    for _ in range(2):
        await processor(rig, clock).write(await processor(rig, clock).prepare(raw))
        raw = compensations(rig)
    assert raw == []  # gone from the topic...
    [letter_raw] = rig.publisher.values(TOPICS.dlq)
    letter = decode_dead_letter(letter_raw)  # ...and dead-lettered with its history
    assert letter.stage == "compensation" and "gave up after 3 attempts" in letter.reason
    assert decode_compensation(letter.value).attempt_count == 3
    assert rig.counters.totals["compensations_exhausted"] == 1


async def test_a_non_retriable_error_is_dead_lettered_at_once() -> None:
    rig, clock = Rig(), Clock()
    rig.cache.failures = [StoreError("redis down")] * 3
    await rig.ingest.process([record(event("m1", 1))])
    raw = compensations(rig)
    rig.cache.failures = [StoreError("WRONGTYPE", retriable=False)]
    await processor(rig, clock).write(await processor(rig, clock).prepare(raw))
    [letter] = [decode_dead_letter(v) for v in rig.publisher.values(TOPICS.dlq)]
    assert "not retriable" in letter.reason and compensations(rig) == []


async def test_a_late_compensation_never_overwrites_a_newer_version() -> None:
    rig, clock = Rig(), Clock()
    rig.cache.failures = [StoreError("redis down")] * 3
    await rig.ingest.process([record(event("m1", 1))])
    raw = compensations(rig)
    await rig.ingest.process([record(event("m1", 2))])  # Redis is back: v2 lands first
    rig.publisher.sent.pop(TOPICS.changes)

    report = await processor(rig, clock).write(await processor(rig, clock).prepare(raw))

    assert await rig.cache.states() == expected_state([event("m1", 2)])
    assert report.stale == 1 and rig.publisher.values(TOPICS.changes) == []


async def test_an_unreadable_compensation_is_dead_lettered() -> None:
    rig, clock = Rig(), Clock()
    bad = InRecord(TOPICS.compensations, 0, 7, None, b'{"schema_version": 1}')
    report = await processor(rig, clock).write(await processor(rig, clock).prepare([bad]))
    [letter] = [decode_dead_letter(v) for v in rig.publisher.values(TOPICS.dlq)]
    assert report.dead_lettered == 1 and letter.source is not None and letter.source.offset == 7


async def test_a_late_lancedb_write_invalidates_the_reads_cached_meanwhile() -> None:
    """Redis took the window (and moved the scope generations) while LanceDB was down; reads cached from LanceDB's
    older rows in between must be invalidated once LanceDB catches up: the compensation touches the cache."""
    rig, clock = Rig(), Clock()
    rig.vectors.failures = [StoreError("lancedb down")] * 3
    events = [event("m1", 1), event("m2", 1)]
    await rig.ingest.process([record(e) for e in events])
    assert rig.cache.touched == []
    [raw] = compensations(rig)
    clock.now = decode_compensation(raw.value).next_attempt_ts

    await processor(rig, clock).write(await processor(rig, clock).prepare([raw]))

    assert await rig.vectors.states() == expected_state(events)
    assert sorted(rig.cache.touched) == ["default/m1", "default/m2"]
