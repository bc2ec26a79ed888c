from types import SimpleNamespace

from aiokafka import TopicPartition

from processors.model import InRecord
from streams.engines import next_offsets, to_record


def test_commit_offsets_are_one_past_the_last_record_of_each_partition() -> None:
    window = [InRecord("t", 0, 5, None, b""), InRecord("t", 1, 9, None, b""), InRecord("t", 0, 7, None, b"")]
    assert next_offsets(window) == {TopicPartition("t", 0): 8, TopicPartition("t", 1): 10}


def test_a_record_without_value_becomes_empty_bytes() -> None:
    message = SimpleNamespace(topic="t", partition=2, offset=4, key=b"k", value=None, timestamp=None)
    record = to_record(message)
    assert record == InRecord("t", 2, 4, b"k", b"", 0)
    assert str(record.source) == "t[2]@4"
