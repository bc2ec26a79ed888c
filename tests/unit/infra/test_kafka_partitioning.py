"""The vectorised murmur2 must pick exactly the partitions aiokafka's (and Java's) default partitioner picks."""

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from infra.kafka import murmur2_many, partitions_for_keys, round_robin


@given(st.lists(st.binary(max_size=64), max_size=50))
def test_murmur2_many_equals_the_reference_for_any_keys(keys: list[bytes]) -> None:
    assert murmur2_many(keys) == [murmur2(k) for k in keys]


def test_keys_of_every_tail_length_and_real_memory_ids() -> None:
    keys = [b"x" * n for n in range(0, 13)] + [f"mem-{i:012d}".encode() for i in range(500)]
    assert murmur2_many(keys) == [murmur2(k) for k in keys]


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=40), st.integers(min_value=1, max_value=12))
def test_partitions_match_the_default_partitioner(keys: list[bytes], count: int) -> None:
    partitions = list(range(count))
    reference = DefaultPartitioner()
    assert partitions_for_keys(keys, partitions, partitions) == [reference(k, partitions, partitions) for k in keys]


def test_records_without_key_go_to_an_available_partition() -> None:
    chosen = partitions_for_keys([None] * 50 + [b"k"], [0, 1, 2, 3], [2])
    assert set(chosen[:50]) == {2}
    assert chosen[50] == DefaultPartitioner()(b"k", [0, 1, 2, 3], [2])


def test_round_robin_takes_one_batch_of_every_partition_per_round_in_order() -> None:
    per_partition = {2: ["a1", "a2", "a3"], 0: ["b1"], 1: ["c1", "c2"]}
    assert round_robin(per_partition) == [(2, "a1"), (0, "b1"), (1, "c1"), (2, "a2"), (1, "c2"), (2, "a3")]


@given(st.dictionaries(st.integers(0, 8), st.lists(st.integers(), max_size=6), max_size=6))
def test_round_robin_keeps_every_item_and_each_partitions_order(per_partition: dict[int, list[int]]) -> None:
    out = round_robin(per_partition)
    assert len(out) == sum(len(items) for items in per_partition.values())
    for partition, items in per_partition.items():
        assert [item for p, item in out if p == partition] == items
