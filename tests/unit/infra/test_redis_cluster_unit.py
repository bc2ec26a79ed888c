"""infra.redis_store on a Redis Cluster, without a server: which client a URL gets, how cluster errors read, and what
the client does beside a cluster write script (the sets and generations the single-node script changes itself)."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, NoScriptError

from infra.redis_store import _by_slot, _cluster_info, _FollowUps, cluster_seeds, connect, guarded
from infra.settings import Settings
from processors.model import MemoryRow
from schemas.errors import ConfigError, RedisClusterError, StoreError
from schemas.events import Scope


def row(memory_id: str = "m1", *, user: str = "u1", agent: str | None = "a1", deleted: bool = False) -> MemoryRow:
    return MemoryRow(
        memory_id=memory_id,
        scope=Scope("t1", user, agent, None),
        text="" if deleted else "text",
        metadata={},
        version=2,
        event_id="e2",
        content_hash="h",
        deleted=deleted,
        updated_at=1_000,
    )


async def test_the_url_names_the_client() -> None:
    cluster = connect("redis+cluster://127.0.0.1:7000")
    single = connect("redis://127.0.0.1:7000/0")
    assert isinstance(cluster, RedisCluster) and isinstance(single, aioredis.Redis)
    await cluster.aclose()
    await single.aclose()


async def test_a_cluster_url_may_name_several_seed_nodes_each_with_the_urls_options() -> None:
    assert cluster_seeds("redis://u:pw@h1:7000,h2:7001, [::1]:7002/0?ssl_cert_reqs=none") == (
        "redis://u:pw@h1:7000/0?ssl_cert_reqs=none",
        [("h2", 7001), ("::1", 7002)],
    )
    assert cluster_seeds("redis://h1:7000") == ("redis://h1:7000", [])
    client = connect("redis+cluster://u:pw@h1:7000,h2:7001/0")
    assert isinstance(client, RedisCluster)
    seeds = {(n.host, n.port): n for n in client.startup_nodes}
    assert set(seeds) == {("h1", 7000), ("h2", 7001)}
    assert all(n.connection_kwargs.get("password") == "pw" for n in seeds.values())  # the URL's credentials: each
    await client.aclose()
    with pytest.raises(ConfigError, match="MEMSTREAM_REDIS_URL"):
        connect("redis+cluster://h1:7000,h2")


def test_settings_take_the_cluster_url_forms() -> None:
    for url in ("redis+cluster://h:7000", "rediss+cluster://h:7000"):
        assert Settings.from_env({"MEMSTREAM_REDIS_URL": url}).redis_url == url
    with pytest.raises(ConfigError, match="redis\\+cluster://host:port"):
        Settings.from_env({"MEMSTREAM_REDIS_URL": "cluster://h:7000"})


def test_cluster_info_reads_as_fields_whichever_way_redis_py_returns_it() -> None:
    text = b"cluster_state:fail\r\ncluster_slots_assigned:8192\r\n"
    assert _cluster_info(text) == {"cluster_state": "fail", "cluster_slots_assigned": "8192"}
    assert _cluster_info({"cluster_state": "ok"}) == {"cluster_state": "ok"}


def test_keys_are_grouped_by_slot_in_their_order() -> None:
    keys = [f"P m:t/{i}" for i in range(300)] + ["{x}a", "{x}b"]
    groups = _by_slot(connect("redis://127.0.0.1:1/0"), keys)
    assert sorted(i for g in groups for i in g) == list(range(302))
    for group in groups:
        assert len({key_slot(keys[i].encode()) for i in group}) == 1 and group == sorted(group)
    assert [300, 301] in groups


async def test_a_redirect_is_a_retriable_cluster_error_that_names_it() -> None:
    async def moved() -> None:
        raise MovedError("3999 127.0.0.1:7001")

    with pytest.raises(RedisClusterError) as caught:
        await guarded("reading one memory", moved)
    assert caught.value.retriable and "127.0.0.1:7001" in str(caught.value) and "redis+cluster://" in str(caught.value)

    async def down() -> None:
        raise ClusterDownError("The cluster is down")

    with pytest.raises(RedisClusterError, match="Redis Cluster cannot serve while writing"):
        await guarded("writing", down)


async def test_a_connection_closed_under_a_call_is_an_outage_and_other_attribute_errors_are_bugs() -> None:
    async def closed() -> None:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    with pytest.raises(StoreError, match="connection closed") as caught:
        await guarded("writing", closed)
    assert caught.value.retriable

    async def bug() -> None:
        raise AttributeError("'MemoryRow' object has no attribute 'nope'")

    with pytest.raises(AttributeError):
        await guarded("writing", bug)


async def test_a_node_without_the_script_is_retriable_and_says_why() -> None:
    """A replica promoted by a failover has no script cache: a window written meanwhile is retried, not
    dead-lettered (test_redis_cluster.py's failover lost 7 memories to the dead-letter topic this way)."""

    async def noscript() -> None:
        raise NoScriptError("No matching script. Please use EVAL.")

    with pytest.raises(StoreError, match="no copy of a script while writing") as caught:
        await guarded("writing", noscript)
    assert caught.value.retriable


def commands(follow: _FollowUps) -> list[tuple[str, str, Any]]:
    return follow.commands


def test_a_new_pending_memory_joins_the_tails_the_queue_and_the_recency_index() -> None:
    follow = _FollowUps("P ")
    follow.after_write(row(), 2, ["", "", "", "", "0"], "1", True, 5_000, 0)
    assert commands(follow) == [
        ("zadd", "P p:t1:u1", {"m1": 1_000}),
        ("zadd", "P pt:t1", {"m1": 1_000}),
        ("zadd", "P pq", {"t1/m1": 5_000}),
        ("zadd", "P r:t1:u1", {"m1": 1_000}),
    ]
    assert follow.scopes == {"t1|u1", "t1|u1|a1"}


def test_an_update_from_lancedb_leaves_the_tail_and_moves_the_old_agent_too() -> None:
    follow = _FollowUps("P ")
    follow.after_write(row(agent="a2"), 2, ["t1", "u1", "a1", "0", "1"], "1", False, 5_000, 60)
    assert ("zadd", "P r:t1:u1", {"m1": 1_000}) in commands(follow)  # re-scored in place, never taken out
    assert ("zrem", "P pq", "t1/m1") in commands(follow) and ("expire", "P r:t1:u1", 60) in commands(follow)
    assert follow.scopes == {"t1|u1", "t1|u1|a2", "t1|u1|a1"}
    deleting = _FollowUps("P ")
    deleting.after_write(row(deleted=True), 2, ["t1", "u1", "a1", "0", "0"], "1", False, 5_000, 0)
    assert ("zrem", "P r:t1:u1", "m1") in commands(deleting)


def test_a_batch_sends_one_command_per_key_and_kind_unless_a_member_is_both_added_and_removed() -> None:
    follow = _FollowUps("P ")
    for i in range(3):
        follow.after_write(row(f"m{i}"), 2, ["", "", "", "", "0"], "1", True, 5_000, 0)
    merged = follow.merged()
    assert ("zadd", "P pq", {"t1/m0": 5_000, "t1/m1": 5_000, "t1/m2": 5_000}) in merged
    assert len(merged) == 4  # the user's tail, the tenant's tail, the queue, the recency index
    clash = _FollowUps("P ")
    clash.commands = [("zadd", "P r", {"m": 1}), ("zrem", "P r", "m")]
    assert clash.merged() == clash.commands  # order matters there: sent as they came


def test_deleting_a_memory_redis_never_held_invalidates_every_agent_of_the_user() -> None:
    follow = _FollowUps("P ")
    follow.after_write(row(deleted=True), 2, ["", "", "", "", "0"], "1", False, 5_000, 0)
    assert commands(follow) == []  # nothing to take out, no recency entry for a tombstone
    assert "t1|u1|*" in follow.scopes


def test_a_row_already_current_asserts_the_sets_again_and_a_refill_bumps_nothing() -> None:
    follow = _FollowUps("P ")
    follow.after_write(row(), 1, ["t1", "u1", "a1", "0", "1"], "1", True, 5_000, 0)
    assert ("zaddnx", "P pq", {"t1/m1": 5_000}) in commands(follow)
    assert ("zadd", "P p:t1:u1", {"m1": 1_000}) in commands(follow)
    assert follow.scopes == {"t1|u1", "t1|u1|a1"}  # a retried window still moves the generations

    refill = _FollowUps("P ")
    refill.after_write(row(), 2, ["", "", "", "", "0"], "0", False, 5_000, 0)
    assert refill.scopes == set() and ("zadd", "P r:t1:u1", {"m1": 1_000}) in commands(refill)


def test_a_clear_takes_the_entry_out_and_moves_the_index_marks_only_if_it_was_pending() -> None:
    follow = _FollowUps("P ")
    follow.after_clear(row(), True, "a1")
    follow.after_clear(row("m2"), False, "")
    assert follow.scopes == {"t1|u1|~", "t1|u1|a1|~"}
    assert ("zrem", "P pq", "t1/m2") in commands(follow) and len(commands(follow)) == 6
