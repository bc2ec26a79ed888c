"""The reconciler against fakes: whatever was done to the stores, they end holding what the log says."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.model import MemoryRow, memory_key
from processors.reconcile import Reconciler, diff_store
from schemas.consistency import ReconcileReport, ReconcileRequest
from schemas.events import MemoryEvent, Op, Scope
from tests.unit.processors.fakes import Rig
from tests.unit.processors.test_pipeline import event, expected_state, histories, record

NOW = 10**13


def reconciler(rig: Rig, grace_ms: int = 60_000) -> Reconciler:
    return Reconciler(
        rig.log,
        rig.vectors,
        rig.cache,
        rig.vectors,
        rig.cache,
        grace_ms=grace_ms,
        clock=lambda: NOW,
        duplicates=rig.vectors,
    )


def request(**kwargs: Any) -> ReconcileRequest:
    return ReconcileRequest(request_id="r1", ts=NOW, **kwargs)


async def ingest(rig: Rig, events: list[MemoryEvent]) -> None:
    await rig.ingest.process([record(e) for e in events])


def tampered(row: MemoryRow, **changes: Any) -> MemoryRow:
    return dataclasses.replace(row, **changes)


CORRUPTIONS = ("missing", "stale", "ahead", "hash_mismatch")


def corrupt(rig: Rig, plan: list[tuple[str, str, str]]) -> dict[str, int]:
    """Apply (store, memory id, kind) corruptions; return the counts the reconciler must find."""
    found: dict[str, int] = {}
    for store_name, memory_id, kind in plan:
        store = rig.vectors if store_name == "lancedb" else rig.cache
        row = store.rows.get(memory_id)
        if row is None:
            continue
        if kind == "missing":
            del store.rows[memory_id]
        elif kind == "stale":
            if row.version == 0:
                continue
            store.rows[memory_id] = tampered(row, version=row.version - 1)
        elif kind == "ahead":
            store.rows[memory_id] = tampered(row, version=row.version + 1000)
        else:
            store.rows[memory_id] = tampered(row, content_hash="tampered")
        key = f"{store_name}_{kind}"
        found[key] = found.get(key, 0) + 1
    return found


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.data())
def test_any_corruption_of_either_store_is_found_and_repaired(history: list[MemoryEvent], data: Any) -> None:
    rig = Rig()
    asyncio.run(ingest(rig, history))
    ids = sorted({memory_key(e.scope.tenant_id, e.memory_id) for e in history})
    plan = data.draw(
        st.lists(
            st.tuples(st.sampled_from(["lancedb", "redis"]), st.sampled_from(ids), st.sampled_from(CORRUPTIONS)),
            max_size=6,
            unique_by=lambda t: (t[0], t[1]),
        )
    )
    orphan = tampered(rig.cache.rows[ids[0]], memory_id="orphan", updated_at=5)
    expected_counts = corrupt(rig, plan)
    rig.cache.rows["default/orphan"] = orphan

    report = asyncio.run(reconciler(rig).run(request()))

    counts = {k: v for k, v in report.counts.items() if v and k.split("_", 1)[0] in ("lancedb", "redis")}
    assert counts == {**expected_counts, "redis_orphaned": 1}
    assert report.consistent and report.counts["unrepaired"] == 0
    assert report.counts["repaired"] == len({m for _, m, _ in plan if m}) + 1 - _skipped(plan, history)
    want = expected_state(history)
    assert asyncio.run(rig.vectors.states()) == want and asyncio.run(rig.cache.states()) == want
    again = asyncio.run(reconciler(rig).run(request()))
    assert again.consistent and again.counts["repaired"] == 0


def _skipped(plan: list[tuple[str, str, str]], history: list[MemoryEvent]) -> int:
    """Memories whose every planned corruption was a no-op (a 'stale' of version 0)."""
    versions = {m: s.version for m, s in expected_state(history).items()}
    by_id: dict[str, list[str]] = {}
    for _, memory_id, kind in plan:
        by_id.setdefault(memory_id, []).append(kind)
    return sum(1 for m, kinds in by_id.items() if all(k == "stale" and versions[m] == 0 for k in kinds))


async def test_redis_restarted_empty_is_refilled_from_lancedb_without_reading_vectors_from_the_log() -> None:
    rig = Rig()
    events = [event(f"m{i}", 1) for i in range(20)] + [event("m3", 2)]
    await ingest(rig, events)
    rig.cache.rows.clear()
    fetched: list[int] = []
    original = rig.log.fetch

    async def counting_fetch(refs: Any) -> Any:
        fetched.append(len(refs))
        return await original(refs)

    rig.log.fetch = counting_fetch  # type: ignore[method-assign]
    report = await reconciler(rig).run(request())
    assert report.counts["redis_missing"] == 20 and report.consistent
    assert await rig.cache.states() == expected_state(events)
    assert sum(fetched) == 0  # LanceDB agreed with the log: the cache was refilled from it


async def test_a_scope_request_touches_only_that_scope() -> None:
    rig = Rig()
    await ingest(rig, [event("a1", 1, user_id="alice"), event("b1", 1, user_id="bob")])
    rig.cache.rows.clear()
    report = await reconciler(rig).run(request(user_id="alice"))
    assert report.counts["log_memories"] == 1 and report.scope == "user alice"
    assert set(rig.cache.rows) == {"default/a1"}
    by_ids = await reconciler(rig).run(request(memory_ids=("b1",)))
    assert by_ids.counts["redis_missing"] == 1 and set(rig.cache.rows) == {"default/a1", "default/b1"}


async def test_report_only_changes_nothing() -> None:
    rig = Rig()
    await ingest(rig, [event("m1", 1)])
    rig.cache.rows.clear()
    report = await reconciler(rig).run(request(repair=False))
    assert not report.consistent and report.counts["unrepaired"] == 1 and rig.cache.rows == {}


async def test_lancedb_rows_the_log_no_longer_holds_are_kept_and_refill_redis() -> None:
    """A restarted memory-only broker: the log is empty, LanceDB (durable) holds everything, Redis nothing."""
    rig = Rig()
    events = [event(f"m{i}", 1) for i in range(10)] + [event("m3", 2), event("m4", 2, op=Op.DELETE)]
    await ingest(rig, events)
    rig.publisher.sent.clear()  # the log is gone
    rig.cache.rows.clear()  # and so is the cache
    report = await reconciler(rig).run(request())
    assert report.consistent and report.counts["lancedb_beyond_log"] == 10
    assert report.counts["redis_missing"] == 10 and report.counts["lancedb_orphaned"] == 0
    want = expected_state(events)
    assert await rig.vectors.states() == want and await rig.cache.states() == want
    again = await reconciler(rig).run(request())
    assert again.consistent and again.counts["repaired"] == 0


async def test_redis_only_orphans_stay_when_the_log_is_incomplete_and_young_rows_are_held_back() -> None:
    rig = Rig()
    await ingest(rig, [event("m1", 1)])
    rig.cache.rows["default/old"] = tampered(rig.cache.rows["default/m1"], memory_id="old", updated_at=5)
    rig.log.truncated = True
    report = await reconciler(rig).run(request())
    assert "default/old" in rig.cache.rows and not report.consistent and report.notes
    rig.log.truncated = False
    rig.cache.rows["default/young"] = tampered(rig.cache.rows["default/m1"], memory_id="young", updated_at=NOW - 10)
    report = await reconciler(rig).run(request())
    assert "default/old" not in rig.cache.rows and "default/young" in rig.cache.rows
    assert report.counts["held_back"] == 1 and not report.consistent


async def test_duplicate_lancedb_rows_are_collapsed_to_the_log_winner() -> None:
    rig = Rig()
    await ingest(rig, [event("m1", 1), event("m1", 2), event("m2", 1)])
    rig.vectors.extra_rows["default/m1"] = tampered(rig.vectors.rows["default/m1"], version=1, event_id="e-m1-1")
    report = await reconciler(rig).run(request())
    assert report.counts["lancedb_duplicated"] == 1 and report.consistent
    assert rig.vectors.extra_rows == {} and await rig.vectors.states() == expected_state(
        [event("m1", 2), event("m2", 1)]
    )


def test_diff_store_classifies_each_kind() -> None:
    from processors.reconcile import LogEntry

    entry = LogEntry(5, "e", "h", False, Scope("t", "u"), 0, 0, 0)
    log = {"missing": entry, "stale": entry, "ahead": entry, "hash": entry, "same": entry}
    held = {
        "stale": dataclasses.replace(entry.state(), version=4),
        "ahead": dataclasses.replace(entry.state(), version=6),
        "hash": dataclasses.replace(entry.state(), content_hash="x"),
        "same": entry.state(),
        "orphan": entry.state(),
    }
    diff = diff_store("redis", log, held)
    assert {k: sorted(v) for k, v in diff.found.items()} == {
        "missing": ["missing"],
        "stale": ["stale"],
        "ahead": ["ahead"],
        "hash_mismatch": ["hash"],
        "orphaned": ["orphan"],
    }


def test_report_type() -> None:
    assert isinstance(asyncio.run(reconciler(Rig()).run(request())), ReconcileReport)


async def test_a_write_given_up_by_compensation_is_still_repaired_from_the_log() -> None:
    """Past the retry budget the compensation is dead-lettered, but the log still has the event: the next
    reconciliation (the timer, or the sentinel after a Redis restart) writes it."""
    from schemas.errors import StoreError

    rig = Rig()
    rig.cache.failures = [StoreError("redis down")] * 3
    events = [event("m1", 1), event("m2", 1)]
    await ingest(rig, events)
    assert rig.publisher.values("t.compensations") and rig.cache.rows == {}  # handed over, never applied
    report = await reconciler(rig).run(request(reason="timer"))
    assert report.consistent and report.counts["redis_missing"] == 2
    assert await rig.cache.states() == expected_state(events)
