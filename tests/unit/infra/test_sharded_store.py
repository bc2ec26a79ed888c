"""infra/sharded_store.py and the settings of a sharded index: table names, the layout check, key routing, the
shard's assignor, one sink per shard (the store itself runs against LanceDB in tests/integration)."""

from __future__ import annotations

import pytest
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from infra.generations import generation_numbers
from infra.kafka import OneOwnerAssignor, shard_assignor
from infra.settings import Settings
from infra.sharded_store import (
    check_layout,
    layouts_present,
    shard_table,
    shard_tables,
    shards_of_keys,
    tables_of,
    unsharded_name,
)
from schemas.errors import ConfigError

NAMES = ["memories", "memories__active", "memories__history", "memories__g2__s0of2", "memories__g2__s1of2"]


def test_one_shard_is_todays_table_and_more_carry_the_count() -> None:
    assert shard_table("memories", 0, 1) == "memories"
    assert shard_tables("memories__g3", 2) == ["memories__g3__s0of2", "memories__g3__s1of2"]
    assert unsharded_name("memories__g3__s1of2") == "memories__g3"
    assert unsharded_name("memories__g3") == "memories__g3"


def test_layouts_and_tables_are_read_from_the_names() -> None:
    assert layouts_present("memories", NAMES) == {1}
    assert layouts_present("memories__g2", NAMES) == {2}
    assert layouts_present("memories__g5", NAMES) == set()
    assert tables_of("memories__g2", NAMES) == ["memories__g2__s0of2", "memories__g2__s1of2"]
    assert tables_of("memories", NAMES) == ["memories"]  # neither the pointer nor the history table


def test_sharded_generations_count_for_the_next_generation_number() -> None:
    # a failed sharded build is never reused: its tables hold its number
    assert generation_numbers("memories", NAMES) == [0, 2]


def test_a_mismatched_count_is_refused_naming_the_rebuild() -> None:
    check_layout("memories__g2", NAMES, 2)
    check_layout("memories__g9", NAMES, 3)  # nothing there yet: any count
    with pytest.raises(ConfigError, match=r"MEMSTREAM_INDEX_SHARDS=3 memstream rebuild") as refused:
        check_layout("memories__g2", NAMES, 3)
    assert "built with 2 index shard(s)" in str(refused.value)
    with pytest.raises(ConfigError, match="MEMSTREAM_INDEX_SHARDS=1 to run"):
        check_layout("memories", NAMES, 2)


@given(st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20), max_size=30), st.data())
def test_a_key_goes_to_the_shard_of_the_partition_the_producer_picks(ids: list[str], data: st.DataObject) -> None:
    partitions = data.draw(st.integers(1, 16))
    shards = data.draw(st.integers(1, partitions))
    every = list(range(partitions))
    picked = [DefaultPartitioner()(m.encode(), every, every) % shards for m in ids]
    assert shards_of_keys(ids, shards, partitions) == picked


def members(*names: str) -> dict[str, ConsumerProtocolMemberMetadata]:
    return {name: ConsumerProtocolMemberMetadata(0, ["emb"], b"") for name in names}


class Cluster(ClusterMetadata):  # type: ignore[misc]
    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(8))


def test_a_shards_owner_gets_its_partitions_and_the_standby_none() -> None:
    assignor = shard_assignor(1, 3)
    assert assignor.name == "memstream-one-owner-s1of3"
    out = assignor.assign(Cluster(), members("b-member", "a-member"))
    assert out["a-member"].assignment == [("emb", [1, 4, 7])]
    assert out["b-member"].assignment == []
    assert shard_assignor(0, 1) is OneOwnerAssignor


def test_one_sink_per_shard_each_in_its_own_group() -> None:
    settings = Settings(index_shards=2)
    children = settings.worker_processes()
    sinks = [c for c in children if c.worker_role == "sink"]
    assert [s.index_shard for s in sinks] == [0, 1]
    assert [s.sink_group_id for s in sinks] == ["memstream-worker.index.s0of2", "memstream-worker.index.s1of2"]
    assert [c.worker_role for c in children] == ["ingest", "sink", "sink"]
    # unsharded: exactly today's sink and group
    assert [c.sink_group_id for c in Settings().worker_processes() if c.worker_role == "sink"] == [
        "memstream-worker.index"
    ]


def test_shard_settings_are_checked() -> None:
    env = {"MEMSTREAM_INDEX_SHARDS": "2", "MEMSTREAM_WORKER_ROLE": "sink"}
    with pytest.raises(ConfigError, match="--shard i"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "MEMSTREAM_INDEX_SHARD": "1"}).sink_group_id.endswith(".s1of2")
    with pytest.raises(ConfigError, match="0 to 1"):
        Settings.from_env({**env, "MEMSTREAM_INDEX_SHARD": "2"})
    with pytest.raises(ConfigError, match="more than the 4 partitions"):
        Settings.from_env({"MEMSTREAM_INDEX_SHARDS": "5"})
