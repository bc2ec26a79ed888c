"""The store adapters on real LanceDB (on disk) and a real Redis: the version guard, tombstones, scopes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from infra.lance_store import KEY_COLUMN, LanceVectorStore
from infra.redis_store import RedisCacheStore, RedisCounters, RedisEmbeddingCache, connect
from infra.settings import Settings
from processors.model import MemoryRow, ScopeQuery, WriteOutcome
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
    await store.upsert([row("a", 3, "tie-lower", event_id="d"), row("a", 3, "tie-higher", event_id="f")][1:])
    got = {r.memory_id: r for r in await store.get(["acme/a", "acme/b", "acme/missing"])}
    assert (got["a"].text, got["a"].version, got["a"].event_id) == ("tie-higher", 3, "f")
    assert (got["b"].text, got["b"].version) == ("five", 5)
    assert got["a"].scope == Scope("acme", "u1", "agent", None) and got["a"].metadata == {"n": 3}
    assert await store.count(live_only=False) == 2  # no duplicate rows for replays


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


async def test_lancedb_refuses_a_table_of_another_model(tmp_path: Path) -> None:
    await LanceVectorStore.open(str(tmp_path), "m", model="test", dim=DIM)
    with pytest.raises(ConfigError, match="holds test vectors"):
        await LanceVectorStore.open(str(tmp_path), "m", model="other", dim=16)


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
    assert index is not None  # built once the table passed 10,000 rows, rebuilt after the 4th window
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
