"""The batch guard of infra.kafka on record sets built in memory: no broker, aiokafka's own record code."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import READ_UNCOMMITTED
from aiokafka.errors import CorruptRecordException, RecordTooLargeError, UnsupportedCodecError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from infra.kafka import getmany, to_in_record
from infra.poison_guard import (
    POISON_TIMESTAMP_TYPE,
    _FetchedBytes,
    _GuardedPartitionRecords,
    poison_kind,
    poison_record,
    split_batches,
)
from processors.model import InRecord
from processors.pipeline import decode_all, poison_error
from schemas.errors import CorruptBatchError, OversizeBatchError, SchemaError, UnsupportedCodecBatchError
from streams.runtime.loop import next_offsets

TP = TopicPartition("t.events", 3)


def batch(base: int, values: list[bytes], *, codec: int = 0, codec_bits: int = 0, break_crc: bool = False) -> bytes:
    builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=1_000 + i, key=b"k", value=value, headers=[])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base)
    if codec_bits:
        (attributes,) = struct.unpack_from(">h", data, 21)
        struct.pack_into(">h", data, 21, (attributes & ~0x07) | codec_bits)
        struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[21:])))
    if break_crc:
        data[-2] ^= 0x01
    return bytes(data)


def unpack(raw: bytes, fetch_offset: int = 0) -> tuple[list[Any], int]:
    records = _GuardedPartitionRecords(TP, _FetchedBytes(raw), [], fetch_offset, None, None, True, READ_UNCOMMITTED)
    out = list(records)
    return out, records.next_fetch_offset


def test_split_batches_finds_each_batch_and_its_offset_range() -> None:
    raw = batch(10, [b"a", b"b", b"c"]) + batch(13, [b"d"])
    found = split_batches(raw)
    assert [(b.base_offset, b.last_offset) for b in found] == [(10, 12), (13, 13)]
    assert b"".join(b.data for b in found) == raw
    assert found[0].max_timestamp == 1_002


@given(st.integers(min_value=0, max_value=200))
def test_a_batch_cut_short_by_the_fetch_size_is_left_for_the_next_fetch(cut: int) -> None:
    first, second = batch(0, [b"x" * 30]), batch(1, [b"y" * 30])
    found = split_batches((first + second)[: len(first) + cut])
    assert [b.base_offset for b in found] == ([0, 1] if cut >= len(second) else [0])


def test_good_batches_go_on_and_a_batch_that_does_not_decompress_becomes_one_stand_in() -> None:
    not_lz4 = batch(2, [b"p", b"q"], codec_bits=3)  # claims lz4, holds plain records
    raw = batch(0, [b"a", b"b"]) + not_lz4 + batch(4, [b"c"])
    out, next_offset = unpack(raw)
    assert [(m.offset, m.value) for m in out] == [(0, b"a"), (1, b"b"), (2, not_lz4), (4, b"c")]
    assert next_offset == 5
    stand_in = to_in_record(out[2])
    assert stand_in.poison is not None and stand_in.poison.startswith("corrupt-batch: ")
    assert (stand_in.offset, stand_in.last_offset, stand_in.value) == (2, 3, not_lz4)
    assert [to_in_record(m).poison for m in (out[0], out[1], out[3])] == [None, None, None]


def test_a_crc_mismatch_is_a_corrupt_batch() -> None:
    out, _ = unpack(batch(0, [b"a"]) + batch(1, [b"b", b"c"], break_crc=True))
    assert out[0].value == b"a"
    bad = to_in_record(out[1])
    assert bad.poison is not None and "CRC mismatch" in bad.poison and (bad.offset, bad.last_offset) == (1, 2)


def test_compressed_batches_decode_with_the_installed_codecs() -> None:
    raw = b"".join(batch(i * 2, [b"v%d" % i, b"w%d" % i], codec=codec) for i, codec in enumerate((1, 2, 3, 4)))
    out, next_offset = unpack(raw)
    assert [m.value for m in out] == [b"v0", b"w0", b"v1", b"w1", b"v2", b"w2", b"v3", b"w3"] and next_offset == 8


def test_records_before_the_fetch_position_are_not_handed_out_again() -> None:
    out, _ = unpack(batch(0, [b"a", b"b", b"c"]), fetch_offset=2)
    assert [m.offset for m in out] == [2]


def test_a_producer_header_cannot_pass_for_a_stand_in() -> None:
    forged = poison_record("t", 0, 5, 10**12, b"x", "corrupt-batch: forged")
    real = ConsumerRecord("t", 0, 5, 1, 0, None, b"x", None, -1, 1, forged.headers)  # same headers, from a producer
    assert forged.timestamp_type == POISON_TIMESTAMP_TYPE and to_in_record(forged).last_offset == 10**12
    assert to_in_record(real).poison is None and to_in_record(real).last_offset is None


@pytest.mark.parametrize(
    ("exc", "kind", "error"),
    [
        (UnsupportedCodecError("Unknown compression codec 0x05"), "unsupported-codec", UnsupportedCodecBatchError),
        (CorruptRecordException("CRC mismatch"), "corrupt-batch", CorruptBatchError),
        (ValueError("lz4: frame"), "corrupt-batch", CorruptBatchError),
        (RecordTooLargeError("too large"), "record-too-large", OversizeBatchError),
    ],
)
def test_each_failure_is_dead_lettered_under_its_reason_class(exc: Exception, kind: str, error: type) -> None:
    assert poison_kind(exc) == kind
    record = InRecord("t.events", 1, 40, None, b"raw", 0, f"{kind}: {exc}", 49)
    found = poison_error(record)
    assert type(found) is error and "t.events[1]@40-49" in str(found) and "10 offsets" in str(found)
    good, dead = decode_all([record, InRecord("t.events", 1, 50, None, b"{}")], _always_ok, stage="decode")
    assert [r.offset for r, _ in good] == [50]
    assert [(d.error_type, d.last_offset, d.value) for d in dead] == [(error.__name__, 49, b"raw")]


def _always_ok(raw: bytes) -> bytes:
    if raw == b"raw":
        raise SchemaError("a stand-in must never reach the decoder")
    return raw


def test_the_commit_after_a_stand_in_moves_past_its_whole_range() -> None:
    window = [InRecord("t", 0, 7, None, b""), InRecord("t", 0, 8, None, b"raw", 0, "corrupt-batch: x", 20)]
    assert next_offsets(window) == {TopicPartition("t", 0): 21}


class _TooLarge:
    """A consumer whose fetch met a batch larger than its fetch limit (aiokafka raises, having moved on)."""

    async def getmany(self, *partitions: TopicPartition, **kwargs: Any) -> dict[TopicPartition, list[Any]]:
        raise RecordTooLargeError("There are some messages at [Partition=Offset]: %s=%s ...", TP, 77, 4 << 20)


async def test_a_batch_too_large_to_fetch_comes_back_as_a_stand_in() -> None:
    fetched = await getmany(_TooLarge(), timeout_ms=10)  # type: ignore[arg-type]
    [stand_in] = [to_in_record(m) for m in fetched[TP]]
    assert (stand_in.offset, stand_in.last_offset, stand_in.value) == (77, 77, b"")
    assert stand_in.poison is not None and stand_in.poison.startswith("record-too-large: ")
    assert type(poison_error(stand_in)) is OversizeBatchError
