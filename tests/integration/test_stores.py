"""The store adapters on real LanceDB (on disk) and a real Redis: the version guard, tombstones, scopes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from infra.lance_store import INDEXED_COLUMNS, KEY_COLUMN, LanceVectorStore, MaintenancePolicy
from infra.read_cache import RedisReadCache, scope_field
from infra.redis_store import RedisCacheStore, RedisCounters, RedisEmbeddingCache, connect
from infra.settings import Settings
from processors.model import MemoryRow, ScopeQuery, WriteOutcome, memory_key
from schemas.errors import ConfigError
from schemas.events import Scope

DIM = 8


def row(
    memory_id: str,
    version: int,
    text: str = "t",
    *,
    event_id: str = "e",
    user: str = "u1",
    deleted: bool = False,
    vector_seed: int = 0,
    tenant: str = "acme",
) -> MemoryRow:
    rng = np.random.default_rng(vector_seed)
    vector = rng.standard_normal(DIM).astype("<f4")
    vector /= np.linalg.norm(vector)
    return MemoryRow(
        memory_id=memory_id,
        scope=Scope(tenant, user, "agent", None),
        text="" if deleted else text,
        metadata={"n": version},
        version=version,
        event_id=event_id,
        content_hash="deleted" if deleted else f"h-{text}",
        deleted=deleted,
        updated_at=version,
        vector=b"" if deleted else vector.tobytes(),
    )


async def test_lancedb_keeps_the_newest_version_whatever_the_order(tmp_path: Path) -> None:
    store = await LanceVectorStore.open(str(tmp_path), "m", model="test", dim=DIM)
    await store.upsert([row("a", 3, "three"), row("b", 1, "one")])
    await store.upsert([row("a", 2, "two"), row("b", 5, "five")])  # a: older, ignored; b: newer, applied
    # a tie on the version is broken by the event id, whichever arrives first: a's higher one ("f") after its
    # held "e" is applied, and the lower "d" after it refused; c gets the lower one first, then the higher
    await store.upsert([row("a", 3, "tie-higher", event_id="f"), row("c", 3, "tie-lower", event_id="d")])
    await store.upsert([row("a", 3, "tie-lower", event_id="d"), row("c", 3, "tie-higher", event_id="f")])
    got = {r.memory_id: r for r in await store.get(["acme/a", "acme/b", "acme/c", "acme/missing"])}
    assert (got["a"].text, got["a"].version, got["a"].event_id) == ("tie-higher", 3, "f")
    assert (got["c"].text, got["c"].version, got["c"].event_id) == ("tie-higher", 3, "f")
    assert (got["b"].text, got["b"].version) == ("five", 5)
    assert got["a"].scope == Scope("acme", "u1", "agent", None) and got["a"].metadata == {"n": 3}
    assert await store.count(live_only=False) == 3  # no duplicate rows for replays


async def test_lancedb_tombstones_hide_memories_and_block_older_adds(tmp_path: Path) -> None:
    store = await LanceVectorStore.open(str(tmp_path), "m", model="test", dim=DIM)
    await store.upsert([row("a", 1, "alive", vector_seed=1), row("b", 1, "other", vector_seed=2)])
    await store.upsert([row("a", 2, deleted=True)])
    await store.upsert([row("a", 1, "alive", vector_seed=1)])  # a replay of the add, older than the delete
    states = await store.states()
    assert states["acme/a"].deleted and states["acme/a"].version == 2
    probe = np.frombuffer(row("a", 1, vector_seed=1).vector, dtype="<f4")
    hits = await store.search(probe, ScopeQuery(user_id="u1"), 5)
    assert [h.row.memory_id for h in hits] == ["b"]
    assert await store.count(live_only=True) == 1


async def test_lancedb_search_stays_inside_the_scope(tmp_path: Path) -> None:
    store = await LanceVectorStore.open(str(tmp_path), "m", model="test", dim=DIM)
    await store.upsert([row("a", 1, user="u1", vector_seed=1), row("b", 1, user="u2", vector_seed=1)])
    probe = np.frombuffer(row("x", 1, vector_seed=1).vector, dtype="<f4")
    hits = await store.search(probe, ScopeQuery(tenant_id="acme", user_id="u2"), 5)
    assert [h.row.memory_id for h in hits] == ["b"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)  # same vector: cosine similarity 1
    assert set(await store.states(ScopeQuery(user_id="u1"))) == {"acme/a"}


async def test_lancedb_delete_exact_removes_only_rows_still_in_the_state_seen(tmp_path: Path) -> None:
    """The reconciler's conditional delete: a row changed since it was seen (another version, event or content,
    or a tombstone now) stays; one still as seen goes, and the count says how many went."""
    store = await LanceVectorStore.open(str(tmp_path), "m", model="test", dim=DIM)
    await store.upsert([row(m, 1, f"{m} one") for m in ("same", "newer", "other_event", "now_deleted")])
    seen = await store.states()
    # each differs from what was seen in one field only: the version, the event id, the deleted flag
    await store.upsert([row("newer", 2, "newer one"), row("other_event", 1, "other_event one", event_id="f")])
    await store.upsert([row("now_deleted", 2, deleted=True)])
    assert await store.delete_exact(seen) == 1
    after = await store.states()
    assert set(after) == {"acme/newer", "acme/other_event", "acme/now_deleted"}
    assert (after["acme/newer"].version, after["acme/other_event"].event_id) == (2, "f")
    assert after["acme/now_deleted"].deleted
    assert await store.delete_exact(after) == 3 and await store.count(live_only=False) == 0


# What the index sink passes: thresholds no small test reaches, so only idleness can call for maintenance
# (and no pacing after a run: these tests call it again at once)
BY_NEED = MaintenancePolicy(index_rows=0, compact_rows=0, compact_commits=0, idle_s=1.0, idle_duty=0.0)


async def index_names(store: LanceVectorStore) -> set[str]:
    return {index.name for index in await store._table.list_indices()}


async def test_an_idle_sink_brings_a_small_bulk_load_up_to_date(tmp_path: Path) -> None:
    """Issue 24: ten commits of a bulk load left the table without any index (maintenance waited for commit counts
    and 10,000 rows). Idle for the policy's moment, the sink builds every index, covers every row and compacts."""
    store = await LanceVectorStore.open(str(tmp_path), "m", model="m", dim=DIM, background_maintenance=False)
    for start in range(0, 1_000, 100):
        await store.upsert([row(f"m{i}", 1, f"memory {i}", user=f"u{i % 7}") for i in range(start, start + 100)])
    before = await store.backlog()
    assert (before.rows, before.fragments, before.unindexed_rows) == (1_000, 10, 1_000)
    assert set(before.missing) == set(INDEXED_COLUMNS) and not before.clean
    assert await store.maintain_if_due(BY_NEED, idle_for_s=0.0) is None  # under load, below every threshold
    assert await store.maintain_if_due(BY_NEED, idle_for_s=0.5) is None  # not idle long enough yet

    run = await store.maintain_if_due(BY_NEED, idle_for_s=1.0)

    assert run is not None and run["kind"] == "compaction" and run["unindexed_rows"] == 1_000, run
    assert (run["fragments_before"], run["fragments_after"]) == (10, 1)
    assert await index_names(store) == {f"{column}_idx" for column in INDEXED_COLUMNS}
    after = await store.backlog()
    assert (after.unindexed_rows, after.missing, after.fragments) == (0, (), 1) and after.clean
    assert await store.maintain_if_due(BY_NEED, idle_for_s=5.0) is None  # nothing new written: nothing to do
    hits = await store.search(np.ones(DIM, dtype="<f4"), ScopeQuery(tenant_id="acme", user_id="u3"), 5)
    assert len(hits) == 5 and {h.row.scope.user_id for h in hits} == {"u3"}


async def test_new_rows_after_maintenance_are_indexed_at_the_next_idle_spell(tmp_path: Path) -> None:
    store = await LanceVectorStore.open(str(tmp_path), "m", model="m", dim=DIM, background_maintenance=False)
    await store.upsert([row(f"m{i}", 1, f"memory {i}") for i in range(300)])
    assert await store.maintain_if_due(BY_NEED, idle_for_s=1.0) is not None
    await store.upsert([row(f"n{i}", 1, f"new memory {i}") for i in range(50)])
    await store.upsert([row("m1", 2, "memory 1, updated")])
    assert (await store.backlog()).unindexed_rows == 51

    run = await store.maintain_if_due(BY_NEED, idle_for_s=1.0)

    assert run is not None and run["unindexed_rows"] == 51, run
    for column in INDEXED_COLUMNS:
        index = await store._table.index_stats(f"{column}_idx")
        assert index is not None and (index.num_indexed_rows, index.num_unindexed_rows) == (350, 0), column
    assert (await store.get(["acme/m1"]))[0].text == "memory 1, updated"


async def test_idle_maintenance_is_paced_by_what_the_last_one_cost(tmp_path: Path) -> None:
    """A trickle into a big table must not keep the sink compacting: after a run of t seconds, idle maintenance
    waits idle_duty * t (huge here); the thresholds under load still apply."""
    paced = dataclasses.replace(BY_NEED, idle_duty=1e9)
    store = await LanceVectorStore.open(str(tmp_path), "m", model="m", dim=DIM, background_maintenance=False)
    await store.upsert([row(f"m{i}", 1) for i in range(100)])
    assert await store.maintain_if_due(paced, idle_for_s=1.0) is not None
    await store.upsert([row("n1", 1)])
    assert await store.maintain_if_due(paced, idle_for_s=1e6) is None
    run = await store.maintain_if_due(dataclasses.replace(paced, compact_commits=1))
    assert run is not None and run["kind"] == "compaction" and run["unindexed_rows"] == 1, run


async def test_under_load_the_scalar_indexes_follow_the_unindexed_rows(tmp_path: Path) -> None:
    """Past ``index_rows`` unindexed rows the scalar indexes are rebuilt between batches (cheap), not the whole
    table compacted; past ``compact_commits`` commits it is compacted."""
    policy = MaintenancePolicy(index_rows=250, compact_rows=0, compact_commits=6, idle_s=1.0, idle_duty=0.0)
    store = await LanceVectorStore.open(str(tmp_path), "m", model="m", dim=DIM, background_maintenance=False)
    kinds = []
    for start in range(0, 600, 100):
        await store.upsert([row(f"m{i}", 1) for i in range(start, start + 100)])
        run = await store.maintain_if_due(policy)
        kinds.append(None if run is None else run["kind"])
        if start == 200:
            user = await store._table.index_stats("user_id_idx")
            assert user is not None and user.num_unindexed_rows == 0
            assert "text_idx" not in await index_names(store)  # full text waits for the compaction
    assert kinds == [None, None, "indexes", None, None, "compaction"], kinds
    assert (await store.backlog()).clean


async def test_under_load_compaction_waits_for_small_fragments_to_pile_up(tmp_path: Path) -> None:
    """Issue 23: optimize() rewrites every fragment under LanceDB's 1M-row target, so compactions under load grew
    with the table and stopped appends for tens of seconds. With ``load_compact_fragments`` the counts rebuild the
    scalar indexes instead until that many small fragments piled up; idle maintenance still compacts at once."""
    policy = MaintenancePolicy(
        index_rows=0, compact_rows=0, compact_commits=2, idle_s=1.0, idle_duty=0.0, load_compact_fragments=5
    )
    store = await LanceVectorStore.open(str(tmp_path), "m", model="m", dim=DIM, background_maintenance=False)
    await store.upsert([row(f"m{i}", 1) for i in range(100)])
    await store.upsert([row(f"n{i}", 1) for i in range(100)])
    # an index missing (none built yet): the counts' compaction runs under load whatever the fragments
    first = await store.maintain_if_due(policy)
    assert first is not None and first["kind"] == "compaction", first
    seen = []  # (small fragments before the run, what the run did)
    for start in range(0, 1_000, 100):
        await store.upsert([row(f"k{i}", 1) for i in range(start, start + 100)])
        small = (await store.backlog()).small_fragments
        run = await store.maintain_if_due(policy)
        seen.append((small, None if run is None else run["kind"]))
    # every second commit the counts call for a compaction: indexes only, until 5 small fragments are there
    kinds = [kind for small, kind in seen]
    assert kinds[::2] == [None] * 5 and "indexes" in kinds and "compaction" in kinds, seen
    assert all((kind == "compaction") == (small >= 5) for small, kind in seen if kind), seen
    user = await store._table.index_stats("user_id_idx")
    assert user is not None and user.num_unindexed_rows == 0  # the last rebuild covered every row
    assert await store.count() == 1_200
    await store.upsert([row("late", 1)])
    idle = await store.maintain_if_due(policy, idle_for_s=1.0)  # idle: everything, few fragments or not
    assert idle is not None and idle["kind"] == "compaction", idle
    assert (await store.backlog()).clean


async def test_lancedb_refuses_a_table_of_another_model(tmp_path: Path) -> None:
    await LanceVectorStore.open(str(tmp_path), "m", model="test", dim=DIM)
    with pytest.raises(ConfigError, match="holds test vectors"):
        await LanceVectorStore.open(str(tmp_path), "m", model="other", dim=16)


async def test_processes_opening_one_fresh_table_at_once_all_open_it(tmp_path: Path) -> None:
    """``serve --workers 2`` on a fresh home: the processes race to create the table, and LanceDB lists a table
    whose first commit is still being written ("was not found" when opened). Each open waits for it instead of
    failing (a failed serve process stopped its whole group). Four connections of one process race the same way."""
    for attempt in range(30):
        path = tmp_path / f"race{attempt}"
        stores = await asyncio.gather(*(LanceVectorStore.open(path, "memories", model="m", dim=DIM) for _ in range(8)))
        await stores[0].upsert([row("a", 1)])
        for store in stores:  # each handle reads the one table
            assert [r.memory_id for r in await store.get([memory_key("acme", "a")])] == ["a"]


async def test_lancedb_rebuilds_its_scalar_indexes_beside_the_merges(tmp_path: Path) -> None:
    """Every ``index_every`` commits the merge key's index is rebuilt, so merges never scan many unindexed rows;
    rows written meanwhile keep their newest version."""
    store = await LanceVectorStore.open(str(tmp_path), "m", model="m", dim=DIM, optimize_every=0, index_every=2)
    windows = 0
    for start in range(0, 12_000, 3_000):
        await store.upsert([row(f"m{i}", 1, vector_seed=i) for i in range(start, start + 3_000)])
        windows += 1
        if store._maintenance is not None:
            await store._maintenance
    assert windows == 4 and store._indexed
    index = await store._table.index_stats("memory_key_idx")
    assert index is not None  # built at the first refresh (the table had rows), rebuilt after the 4th window
    assert (index.num_indexed_rows, index.num_unindexed_rows) == (12_000, 0)
    assert (await store.shape()).endswith("12000 rows, 0 unindexed")
    await store.upsert([row("m5", 2, "newer")])
    assert (await store.get(["acme/m5"]))[0].text == "newer"
    assert await store.count(live_only=False) == 12_000


async def test_redis_compare_and_set_outcomes(settings: Settings) -> None:
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    try:
        first = await store.apply([row("a", 2, "two"), row("b", 1, "one")])
        assert first == [WriteOutcome.APPLIED, WriteOutcome.APPLIED]
        again = await store.apply([row("a", 2, "two"), row("a", 1, "old"), row("b", 1, "one", event_id="f")])
        assert again == [WriteOutcome.CURRENT, WriteOutcome.STALE, WriteOutcome.APPLIED]  # f > e breaks the tie
        [a, b, missing] = await store.get(["acme/a", "acme/b", "acme/nope"])
        assert a is not None and (a.text, a.version, a.metadata) == ("two", 2, {"n": 2})
        assert b is not None and b.event_id == "f"
        assert missing is None
    finally:
        await client.aclose()


async def test_redis_clear_names_the_rows_lancedb_holds_ahead_of_redis(settings: Settings) -> None:
    """The real script: a clear that comes before the ingest path's Redis write names the row (missing or older in
    Redis), and that row, once written, leaves the fresh tail at the next clear; a newer version in Redis stays."""
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    try:
        await store.apply([row("old", 1), row("newer", 3)], pending=True)
        done = await store.clear_pending([row("missing", 1), row("old", 2), row("newer", 2), row("tie", 1)])
        assert [r.memory_id for r in done.ahead] == ["missing", "old", "tie"]
        assert done.cleared == 1 and await store.pending_count() == 1  # "old" v1 left; "newer" v3 stays
        await store.apply([row("missing", 1), row("old", 2)], pending=True)  # the ingest path's writes land
        again = await store.clear_pending([row("missing", 1), row("old", 2)])
        assert (again.cleared, again.ahead) == (2, ())
        assert await store.pending_count() == 1
    finally:
        await client.aclose()


# Orders the scripts compare: versions around each other, event ids equal, a byte apart, prefixes of each other and
# long (the scripts compare equal ids before walking their bytes; the walk decides the rest, bytewise like LanceDB).
ORDERS = [(v, e) for v in (1, 2, 3) for e in ("e", "f", "ea", "E", "7f3c-" * 7 + "a", "7f3c-" * 7 + "b")]


def _order(v: int, e: str) -> tuple[int, bytes]:
    return v, e.encode()


async def test_redis_compare_and_set_and_clear_follow_version_then_event_id_bytewise(settings: Settings) -> None:
    """Every pair of held and incoming (version, event id): the write's outcome and the sink's clear (cleared,
    LanceDB ahead) are what the (version, event id) order says, the same order LanceDB's merge applies."""
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    pairs = [(held, new) for held in ORDERS for new in ORDERS]
    try:
        assert await store.apply([row(f"w{i}", v, event_id=e) for i, ((v, e), _) in enumerate(pairs)]) == [
            WriteOutcome.APPLIED
        ] * len(pairs)
        outcomes = await store.apply([row(f"w{i}", v, event_id=e) for i, (_, (v, e)) in enumerate(pairs)])
        want = [
            WriteOutcome.STALE if _order(*h) > _order(*n) else WriteOutcome.CURRENT if h == n else WriteOutcome.APPLIED
            for h, n in pairs
        ]
        assert outcomes == want
        await store.apply([row(f"c{i}", v, event_id=e) for i, ((v, e), _) in enumerate(pairs)], pending=True)
        done = await store.clear_pending([row(f"c{i}", v, event_id=e) for i, (_, (v, e)) in enumerate(pairs)])
        assert done.cleared == sum(_order(*h) <= _order(*n) for h, n in pairs)
        assert {r.memory_id for r in done.ahead} == {
            f"c{i}" for i, (h, n) in enumerate(pairs) if _order(*n) > _order(*h)
        }
        assert await store.pending_count() == sum(_order(*h) > _order(*n) for h, n in pairs)
    finally:
        await client.aclose()


async def test_the_sinks_clear_moves_the_users_index_mark_and_not_its_content_generation(settings: Settings) -> None:
    """Issue 24: right after a bulk load each sink batch clears rows of every user from the fresh tail; a clear
    that moved the content generation made every reader's hot vector copy cold again, batch after batch. The clear
    moves only the user's index mark (a cached search ranked from the tail is still rebuilt), a write both."""
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    cache = RedisReadCache(client, settings.redis_prefix, ttl_s=60)
    field = scope_field("acme", "u1", None)

    async def tokens() -> tuple[bytes | None, bytes | None]:
        return await cache.token(field), await cache.token(field, content_only=True)

    try:
        await store.apply([row("a", 1)], pending=True)
        written = await tokens()
        assert written[1] is not None
        assert (await store.clear_pending([row("a", 1)])).cleared == 1
        cleared = await tokens()
        assert cleared[1] == written[1] and cleared[0] != written[0]
        await store.apply([row("a", 2)], pending=True)
        updated = await tokens()
        assert updated[1] != cleared[1] and updated[0] != cleared[0]
    finally:
        await client.aclose()


async def test_redis_orders_are_what_get_reads_without_the_documents(settings: Settings) -> None:
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    try:
        await store.apply([row("a", 2, "two", event_id="f"), row("b", 1, user="u2"), row("c", 3, deleted=True)])
        keys = ["acme/a", "acme/nope", "acme/b", "acme/c", *(f"acme/x{i}" for i in range(1_200))]  # two script calls
        orders = await store.orders(keys)
        assert orders[:4] == [(2, "f", "u1"), None, (1, "e", "u2"), (3, "e", "u1")]  # a tombstone has its version
        assert orders[4:] == [None] * 1_200
        rows = await store.get(keys[:4])
        assert [None if r is None else (r.version, r.event_id, r.scope.user_id) for r in rows] == orders[:4]
    finally:
        await client.aclose()


async def test_redis_recency_index_follows_deletes_and_scope_moves(settings: Settings) -> None:
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    scope_u1, scope_u2 = Scope("acme", "u1"), Scope("acme", "u2")
    try:
        await store.apply([row("a", 1), row("b", 2), row("c", 3)])
        assert await store.recent(scope_u1) == ["c", "b", "a"]
        outcomes = await store.apply([row("b", 4, deleted=True), row("c", 5, user="u2"), row("d", 6, user="u2")])
        assert outcomes == [WriteOutcome.APPLIED, WriteOutcome.SCOPE_MISMATCH, WriteOutcome.APPLIED]
        assert await store.recent(scope_u1) == ["c", "a"]  # c stays u1's: an event never moves it to another user
        assert await store.recent(scope_u2) == ["d"]
        states = await store.states()
        assert states["acme/b"].deleted and states["acme/c"].version == 3
        assert set(await store.states(ScopeQuery(user_id="u2"))) == {"acme/d"}
    finally:
        await client.aclose()


async def test_redis_delete_exact_removes_only_rows_still_in_the_state_seen(settings: Settings) -> None:
    """The reconciler's conditional delete on the real Lua script: a memory changed since it was seen stays (and
    keeps its place in the recency index); one still as seen goes, from the recency index too."""
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    scope = Scope("acme", "u1")
    try:
        await store.apply([row(m, 1, f"{m} one") for m in ("same", "newer", "other_event", "other_text")])
        seen = await store.states()
        # each differs from what was seen in one field only: the version, the event id, the content hash
        await store.apply([row("newer", 2, "newer one"), row("other_event", 1, "other_event one", event_id="f")])
        changed = dataclasses.replace(seen["acme/other_text"], content_hash="h-not-what-it-holds")
        assert await store.delete_exact({**seen, "acme/other_text": changed}) == 1
        assert set(await store.states()) == {"acme/newer", "acme/other_event", "acme/other_text"}
        assert set(await store.recent(scope)) == {"newer", "other_event", "other_text"}
        [gone] = await store.get(["acme/same"])
        assert gone is None
        assert await store.delete_exact(await store.states()) == 3
        assert await store.states() == {} and await store.recent(scope) == []
    finally:
        await client.aclose()


async def test_redis_refuses_another_users_write_to_a_memory_and_keeps_it(settings: Settings) -> None:
    """The scope guard of the real Lua script (the ingest path dead-letters on SCOPE_MISMATCH): an update or a
    delete naming another user of the tenant changes nothing, however new its version."""
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix)
    try:
        assert await store.apply([row("a", 1, "alice's", user="alice")]) == [WriteOutcome.APPLIED]
        foreign = [row("a", 9, "mallory's", user="mallory"), row("a", 10, deleted=True, user="mallory")]
        for attempt in foreign:
            assert await store.apply([attempt]) == [WriteOutcome.SCOPE_MISMATCH]
        [held] = await store.get(["acme/a"])
        assert held is not None and (held.text, held.version, held.scope.user_id) == ("alice's", 1, "alice")
        assert not held.deleted and await store.recent(Scope("acme", "mallory")) == []
        assert await store.recent(Scope("acme", "alice")) == ["a"]
    finally:
        await client.aclose()


async def test_redis_ttl_applies_when_configured(settings: Settings) -> None:
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, settings.redis_prefix, ttl_s=100)
    try:
        await store.apply([row("a", 1)])
        ttl = await client.ttl(store.memory_key("acme/a"))
        assert 0 < ttl <= 100
    finally:
        await client.aclose()


async def test_embedding_cache_and_counters_round_trip(settings: Settings) -> None:
    client = connect(settings.redis_url)
    try:
        cache = RedisEmbeddingCache(client, settings.redis_prefix, ttl_s=60)
        await cache.put_many({"m:1": b"\x00\x01", "m:2": b"\x02"})
        assert await cache.get_many(["m:1", "m:3", "m:2"]) == [b"\x00\x01", None, b"\x02"]
        counters = RedisCounters(client, settings.redis_prefix)
        await counters.add({"events_in": 3, "dead_lettered": 0})
        await counters.add({"events_in": 2, "dead_lettered": 1})
        assert await counters.read() == {"events_in": 5, "dead_lettered": 1}
    finally:
        await client.aclose()


# --------------------------------------------------------------------------------------------- tenancy


async def test_lancedb_keys_memories_by_tenant_and_id_and_never_moves_one_to_another_user(tmp_path: Path) -> None:
    store = await LanceVectorStore.open(str(tmp_path), "m", model="test", dim=DIM)
    await store.upsert([row("a", 1, "acme's", tenant="acme"), row("a", 1, "beta's", tenant="beta")])
    await store.upsert([row("a", 2, "beta's newer", tenant="beta"), row("a", 9, "taken", user="u2", tenant="acme")])
    got = {r.key: r for r in await store.get(["acme/a", "beta/a"])}
    assert (got["acme/a"].text, got["acme/a"].version, got["acme/a"].scope.user_id) == ("acme's", 1, "u1")
    assert (got["beta/a"].text, got["beta/a"].version) == ("beta's newer", 2)
    assert await store.owners(["acme/a", "beta/a", "gamma/a"]) == {"acme/a": "u1", "beta/a": "u1"}
    assert await store.count(live_only=False) == 2
    assert set(await store.states(ScopeQuery(tenant_id="beta"))) == {"beta/a"}


async def test_redis_keys_memories_by_tenant_and_id(settings: Settings) -> None:
    client = connect(settings.redis_url)
    store = RedisCacheStore(client, f"{settings.redis_prefix}tenancy:")
    try:
        first = await store.apply([row("a", 1, "acme's", tenant="acme"), row("a", 1, "beta's", tenant="beta")])
        assert first == [WriteOutcome.APPLIED, WriteOutcome.APPLIED]
        assert await store.apply([row("a", 2, deleted=True, tenant="beta")]) == [WriteOutcome.APPLIED]
        [acme, beta] = await store.get(["acme/a", "beta/a"])
        assert acme is not None and beta is not None and not acme.deleted and beta.deleted
        await client.hset(f"{store.prefix}m:legacy", mapping={"v": "1", "e": "e", "t": "acme", "u": "u1"})
        assert set(await store.states()) == {"acme/a", "beta/a"}  # an old-layout key is never read
    finally:
        await client.aclose()


async def test_a_table_made_before_tenant_keys_is_migrated_at_open(tmp_path: Path) -> None:
    old_rows = [row("a", 1, "acme's", tenant="acme"), row("a", 1, "beta's", tenant="beta")]
    fresh = await LanceVectorStore.open(str(tmp_path / "new"), "m", model="test", dim=DIM)
    table = fresh._to_arrow(old_rows).drop_columns([KEY_COLUMN])  # the old layout: no memory_key column
    db = await lancedb.connect_async(str(tmp_path / "old"))
    await db.create_table("m", data=table, schema=table.schema)

    store = await LanceVectorStore.open(str(tmp_path / "old"), "m", model="test", dim=DIM)

    schema: pa.Schema = await store._table.schema()
    assert KEY_COLUMN in schema.names and schema.metadata[b"memstream.model"] == b"test"
    assert set(await store.states()) == {"acme/a", "beta/a"}
    await store.upsert([dataclasses.replace(old_rows[1], version=2, text="beta's newer")])
    await store.build_indexes()
    got = {r.key: r.text for r in await store.get(["acme/a", "beta/a"])}
    assert got == {"acme/a": "acme's", "beta/a": "beta's newer"} and await store.count(live_only=False) == 2
    reopened = await LanceVectorStore.open(str(tmp_path / "old"), "m", model="test", dim=DIM)
    assert await reopened.count() == 2
