"""The index sink's processor against fakes: what LanceDB gets, what leaves the fresh tail, what is refused."""

from __future__ import annotations

from processors.indexing import IndexProcessor
from processors.model import InRecord
from processors.pipeline import RetryPolicy, row_from
from schemas.errors import StoreError
from schemas.events import Op, decode_dead_letter, encode
from tests.unit.processors.fakes import DIM, TOPICS, FakeCacheStore, FakeCounters, FakePublisher, FakeVectorStore
from tests.unit.processors.test_pipeline import event
from tests.unit.processors.test_replay import embedded


class SinkRig:
    def __init__(self) -> None:
        self.vectors = FakeVectorStore()
        self.cache = FakeCacheStore()
        self.publisher = FakePublisher()
        self.counters = FakeCounters()
        self.sleeps: list[float] = []
        self.sink = IndexProcessor(
            self.vectors,
            self.cache,
            self.publisher,
            TOPICS,
            model="fake",
            dim=DIM,
            retry=RetryPolicy(first_delay_s=0.001, max_delay_s=0.004, max_attempts=0),
            sleep=self._sleep,
            counters=self.counters,
            clock=lambda: self.now,
        )
        self.now = 0.0

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def ingest(self, *events: object) -> None:
        """What the ingest path leaves: Redis holding each memory's newest version in the fresh tail."""
        rows = [row_from(embedded(e)) for e in events]  # type: ignore[arg-type]
        await self.cache.apply(rows, pending=True)

    async def index(self, records: list[InRecord]) -> object:
        return await self.sink.write(self.sink.prepare(records))


def rec(value: bytes, offset: int) -> InRecord:
    return InRecord(TOPICS.embedded, 0, offset, b"k", value)


async def test_a_batch_is_written_to_lancedb_and_leaves_the_fresh_tail() -> None:
    rig = SinkRig()
    events = [event("m1", 1), event("m2", 1), event("m1", 2, op=Op.UPDATE)]
    await rig.ingest(events[1], events[2])
    report = await rig.index([rec(encode(embedded(e)), i) for i, e in enumerate(events)])
    assert {k: r.version for k, r in rig.vectors.rows.items()} == {"default/m1": 2, "default/m2": 1}
    assert rig.cache.pending == {}
    assert (report.rows, report.cleared, report.records) == (2, 2, 3)  # type: ignore[attr-defined]
    assert rig.counters.totals["indexed"] == 2


async def test_a_newer_version_waiting_in_the_tail_stays_there() -> None:
    rig = SinkRig()
    await rig.ingest(event("m1", 2, op=Op.UPDATE))
    await rig.index([rec(encode(embedded(event("m1", 1))), 0)])
    assert rig.vectors.rows["default/m1"].version == 1
    assert list(rig.cache.pending) == ["default/m1"]  # searches still merge version 2 from the tail


async def test_the_same_batch_twice_changes_nothing() -> None:
    """A crash between the LanceDB commit and the offset commit: the batch comes again."""
    rig = SinkRig()
    batch = [rec(encode(embedded(event(f"m{i}", 1))), i) for i in range(5)]
    await rig.index(batch)
    before = dict(rig.vectors.rows)
    await rig.index(batch)
    assert rig.vectors.rows == before and rig.vectors.extra_rows == {}


async def test_another_users_event_is_not_indexed() -> None:
    rig = SinkRig()
    await rig.index([rec(encode(embedded(event("m1", 1, user_id="ana"))), 0)])
    foreign = event("m1", 2, op=Op.UPDATE, user_id="bo")
    report = await rig.index([rec(encode(embedded(foreign)), 1)])
    assert rig.vectors.rows["default/m1"].scope.user_id == "ana" and rig.vectors.rows["default/m1"].version == 1
    assert report.refused == 1  # type: ignore[attr-defined]


async def test_undecodable_records_and_other_models_are_dead_lettered() -> None:
    rig = SinkRig()
    other = embedded(event("m2", 1), model="other", dim=DIM)
    await rig.index([rec(b"{not json", 0), rec(encode(other), 1), rec(encode(embedded(event("m3", 1))), 2)])
    letters = [decode_dead_letter(v) for v in rig.publisher.values(TOPICS.dlq)]
    assert sorted((d.stage, d.field or "") for d in letters) == [("index", ""), ("index", "embedding")]
    assert list(rig.vectors.rows) == ["default/m3"]


async def test_lancedb_failures_are_retried_until_they_pass() -> None:
    rig = SinkRig()
    rig.vectors.failures = [StoreError("injected: disk unavailable") for _ in range(3)]
    await rig.index([rec(encode(embedded(event("m1", 1))), 0)])
    assert len(rig.sleeps) == 3 and "default/m1" in rig.vectors.rows


async def test_the_sweep_indexes_what_only_redis_holds() -> None:
    """The log lost these (a broker restarted empty): the fresh tail in Redis still has them, vectors included."""
    rig = SinkRig()
    await rig.ingest(event("m1", 1), event("m2", 3, op=Op.DELETE))
    report = await rig.sink.sweep(older_than_ms=0, limit=100)
    assert (report.swept, rig.cache.pending) == (2, {})
    assert rig.vectors.rows["default/m2"].deleted and rig.vectors.rows["default/m1"].vector


async def test_a_shards_sweep_writes_only_its_own_memories() -> None:
    """Sharded: the fresh tail holds every shard's memories; each shard's sink sweeps its own into its table and
    leaves the others in the tail for theirs."""
    rig = SinkRig()
    await rig.ingest(event("m1", 1), event("m2", 1), event("m3", 1))
    report = await rig.sink.sweep(older_than_ms=0, limit=100, owns=lambda row: row.memory_id != "m2")
    assert report.swept == 2 and sorted(rig.vectors.rows) == ["default/m1", "default/m3"]
    assert list(rig.cache.pending) == ["default/m2"]


async def test_a_row_indexed_before_its_redis_write_leaves_the_tail_once_that_write_lands() -> None:
    """The ingest path writes Redis and the embedded topic at once: the sink can commit a row before the ingest
    path's Redis write lands, which then enters the fresh tail after the clear (found in CI: 170 of 3,000 memories
    left in the tail). The sink clears such rows again a moment later."""
    rig = SinkRig()
    first, second = event("m1", 1), event("m2", 1)
    await rig.ingest(second)  # m2's Redis write landed first; m1's had not
    report = await rig.index([rec(encode(embedded(e)), i) for i, e in enumerate([first, second])])
    assert report.cleared == 1  # type: ignore[attr-defined]
    await rig.ingest(first)  # m1's Redis write lands after the clear
    assert list(rig.cache.pending) == ["default/m1"]
    assert await rig.sink.clear_ahead() == 0  # too soon: not tried again yet
    rig.now = 0.6
    assert await rig.sink.clear_ahead() == 1
    assert rig.cache.pending == {} and rig.sink.ahead == {}


async def test_a_row_redis_never_gets_is_let_go() -> None:
    """Redis forgot the memory (TTL, eviction) or the write failed: tried again until AHEAD_GIVE_UP_S, then let go
    (the fresh-tail sweep covers a write that lands later still)."""
    rig = SinkRig()
    await rig.index([rec(encode(embedded(event("m1", 1))), 0)])
    for now in (1.0, 15.0, 29.0):
        rig.now = now
        await rig.sink.clear_ahead()
        assert list(rig.sink.ahead) == ["default/m1"], now
    rig.now = 31.0
    await rig.sink.clear_ahead()
    assert rig.sink.ahead == {}


async def test_a_newer_redis_version_is_not_ahead() -> None:
    rig = SinkRig()
    await rig.ingest(event("m1", 2, op=Op.UPDATE))
    await rig.index([rec(encode(embedded(event("m1", 1))), 0)])
    assert rig.sink.ahead == {} and list(rig.cache.pending) == ["default/m1"]


def test_an_update_indexed_with_its_add_gets_the_adds_time() -> None:
    from processors.model import added_at, with_first_add
    from processors.pipeline import row_from
    from schemas.events import EmbeddedEvent, MemoryEvent, Op, Scope

    def item(memory_id: str, version: int, op: Op) -> EmbeddedEvent:
        e = MemoryEvent(f"e{version}", op, memory_id, version, 1_000 + version, Scope("t", "u"), text="x")
        return EmbeddedEvent(e, "fake", 1, b"\0" * 4, "h")

    batch = [item("m1", 1, Op.ADD), item("m1", 2, Op.UPDATE), item("m2", 3, Op.UPDATE)]
    rows = with_first_add([row_from(batch[1]), row_from(batch[2])], added_at(batch))
    assert [(r.memory_id, r.created_at) for r in rows] == [("m1", 1_001), ("m2", None)]  # m2: the store's to keep


async def test_owners_come_from_redis_and_lancedb_is_asked_only_for_what_redis_does_not_hold() -> None:
    rig = SinkRig()
    asked: list[list[str]] = []
    lancedb_owners = rig.vectors.owners

    async def counted(keys: list[str]) -> dict[str, str]:
        asked.append(sorted(keys))
        return await lancedb_owners(keys)

    rig.vectors.owners = counted  # type: ignore[method-assign]
    await rig.index([rec(encode(embedded(event("m1", 1, user_id="ana"))), 0)])  # LanceDB holds m1 (ana's)
    await rig.ingest(event("m2", 1, user_id="ana"))  # Redis holds m2, LanceDB not yet
    assert "default/m1" not in rig.cache.rows  # Redis does not hold m1 (forgotten, or never written by ingest)
    foreign = [event("m1", 2, op=Op.UPDATE, user_id="bo"), event("m2", 2, op=Op.UPDATE, user_id="bo")]
    report = await rig.index([rec(encode(embedded(e)), 1 + i) for i, e in enumerate(foreign)])
    assert asked == [["default/m1"]]  # m2's owner was Redis' answer
    assert report.refused == 2  # type: ignore[attr-defined]
    assert "default/m2" not in rig.vectors.rows  # not inserted as bo's new memory


async def test_owners_come_from_lancedb_while_redis_cannot_answer() -> None:
    rig = SinkRig()
    await rig.index([rec(encode(embedded(event("m1", 1, user_id="ana"))), 0)])
    rig.cache.owners_down = True
    report = await rig.index([rec(encode(embedded(event("m1", 2, op=Op.UPDATE, user_id="bo"))), 1)])
    assert report.refused == 1  # type: ignore[attr-defined]
    assert rig.vectors.rows["default/m1"].version == 1
