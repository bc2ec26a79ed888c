"""The poison-batch guard: aiokafka's fetcher decoding each record batch on its own.

aiokafka decodes a fetched record set batch by batch while ``getmany`` hands records out. A batch it cannot
decode (a codec whose library is missing or unknown, a CRC mismatch, a payload that does not decompress)
raises out of ``getmany`` on every call, so the partition never moves again; worse, records drained from
other partitions in that same call are dropped with their positions already advanced (aiokafka 0.14,
``Fetcher.fetched_records``). The guard below decodes each batch on its own: records of good batches are
handed out as usual, and a batch that fails becomes one stand-in record carrying the batch's raw bytes, its
offset range and the reason (headers ``POISON_HEADER``/``LAST_OFFSET_HEADER``). The processors dead-letter
that stand-in, and committing past it moves the partition on. A batch larger than the fetch limit is
reported by aiokafka as ``RecordTooLargeError`` (it has already stepped past it): :func:`infra.kafka.getmany` turns
that into a stand-in too.

The guard replaces two private classes of ``aiokafka.consumer.fetcher`` (``MemoryRecords`` and
``PartitionRecords``), so it is tied to the aiokafka release it was written for (:data:`AIOKAFKA_VERSION`):
:func:`install_batch_guard` refuses any other with :class:`schemas.errors.DependencyVersionError`. Nothing is
patched on import; the composition roots (streams/) install it before they start a consumer.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

import aiokafka
from aiokafka import ConsumerRecord
from aiokafka.consumer import fetcher as _fetcher
from aiokafka.errors import CorruptRecordException, RecordTooLargeError, UnsupportedCodecError
from aiokafka.record.memory_records import MemoryRecords as _MemoryRecords

from schemas.errors import DependencyVersionError

log = logging.getLogger("memstream.kafka")

AIOKAFKA_VERSION = "0.14.0"  # the release whose fetcher internals the guard replaces (checked on install)

POISON_HEADER = "memstream-undecodable"
POISON_TIMESTAMP_TYPE = -7  # brokers send 0 (create time) or 1 (log append time): this marks a stand-in
LAST_OFFSET_HEADER = "memstream-last-offset"
_BATCH_HEADER = 61  # bytes of a v2 batch header (magic 2); legacy batches are shorter


@dataclass(frozen=True, slots=True)
class RawBatch:
    """One record batch of a fetched record set, undecoded."""

    data: bytes
    base_offset: int
    last_offset: int
    max_timestamp: int  # -1 when unknown (legacy batches)


def split_batches(raw: bytes) -> list[RawBatch]:
    """The whole batches of a fetched record set (a truncated last batch, cut by the fetch size, is left out).

    Layout (Kafka's message format): base offset int64, batch length int32, then for magic 2: partition leader
    epoch int32, magic int8, crc int32, attributes int16, last offset delta int32, first timestamp int64,
    max timestamp int64, ... For magic 0/1 the offset field is already the (last) offset of the entry.
    """
    out: list[RawBatch] = []
    pos, size = 0, len(raw)
    while size - pos >= 17:
        base, length = struct.unpack_from(">qi", raw, pos)
        end = pos + 12 + length
        if length < 5 or end > size:
            break
        magic = raw[pos + 16]
        if magic >= 2 and length + 12 >= _BATCH_HEADER:
            (delta,) = struct.unpack_from(">i", raw, pos + 23)
            (max_ts,) = struct.unpack_from(">q", raw, pos + 35)
            out.append(RawBatch(raw[pos:end], base, base + max(delta, 0), max_ts))
        else:
            out.append(RawBatch(raw[pos:end], base, base, -1))
        pos = end
    return out


def poison_kind(exc: BaseException) -> str:
    """The dead-letter reason kind for a batch that failed to decode with ``exc``."""
    if isinstance(exc, UnsupportedCodecError):
        return "unsupported-codec"
    if isinstance(exc, RecordTooLargeError):
        return "record-too-large"
    return "corrupt-batch"


def poison_record(
    topic: str, partition: int, first: int, last: int, data: bytes, reason: str, timestamp: int = -1
) -> ConsumerRecord[bytes, bytes]:
    """The stand-in handed out for undecodable offsets ``first``..``last``: raw bytes, reason, range."""
    headers = ((POISON_HEADER, reason.encode()), (LAST_OFFSET_HEADER, str(last).encode()))
    return ConsumerRecord(
        topic, partition, first, timestamp, POISON_TIMESTAMP_TYPE, None, data, None, -1, len(data), headers
    )


class _FetchedBytes:
    """aiokafka's ``MemoryRecords`` that also keeps the fetched bytes (the same object: no copy)."""

    __slots__ = ("_inner", "raw")

    def __init__(self, data: bytes) -> None:
        self.raw = data
        self._inner = _MemoryRecords(data)

    def size_in_bytes(self) -> int:
        return int(self._inner.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._inner.has_next())

    def next_batch(self) -> Any:
        return self._inner.next_batch()


class _GuardedPartitionRecords(_fetcher.PartitionRecords):  # type: ignore[misc]
    """aiokafka's per-partition record iterator, decoding each batch on its own (see above)."""

    def _unpack_records(self) -> Any:
        raw = getattr(self._records, "raw", None)
        if raw is None or self._isolation_level == _fetcher.READ_COMMITTED:
            yield from super()._unpack_records()  # transactions: aiokafka's own path (not used by memstream)
            return
        tp = self._tp
        for item in split_batches(raw):
            try:
                batch = _MemoryRecords(item.data).next_batch()
                if batch is None:
                    raise CorruptRecordException("truncated record batch")
                if self._check_crcs and not batch.validate_crc():
                    raise CorruptRecordException("CRC mismatch")
                if batch.is_control_batch:
                    self.next_fetch_offset = batch.next_offset
                    continue
                for record in batch:  # decompresses, then parses record by record
                    if record.offset < self.next_fetch_offset:
                        continue
                    consumer_record = self._consumer_record(tp, record)
                    self.next_fetch_offset = record.offset + 1
                    yield consumer_record  # records decoded before a failure in their batch go on
                self.next_fetch_offset = batch.next_offset
            except Exception as error:
                first = max(self.next_fetch_offset, item.base_offset)
                last = max(item.last_offset, first)
                reason = f"{poison_kind(error)}: {type(error).__name__}: {error}"
                log.error("undecodable record batch %s[%d]@%d-%d (%s)", tp.topic, tp.partition, first, last, reason)
                self.next_fetch_offset = last + 1
                yield poison_record(tp.topic, tp.partition, first, last, item.data, reason, item.max_timestamp)


def install_batch_guard(version: str | None = None) -> None:
    """Make every aiokafka consumer of this process (ours and faust's) use the guarded batch decoding.

    Called by the composition roots (``memstream`` commands, :meth:`streams.runtime.stores.Runtime.open`, the
    change feed) before they start a consumer; installing twice is harmless. ``version`` (the installed
    aiokafka's by default) must be the one the guard was written for: the classes it replaces are private, so
    another release is refused with :class:`schemas.errors.DependencyVersionError` rather than patched blind."""
    found = aiokafka.__version__ if version is None else version
    if found != AIOKAFKA_VERSION:
        raise DependencyVersionError(
            f"the poison-batch guard (infra/poison_guard.py) was written for aiokafka {AIOKAFKA_VERSION} and "
            f"replaces its private fetcher classes; aiokafka {found} is installed. Pin aiokafka=={AIOKAFKA_VERSION} "
            "or check the guard against the new release's aiokafka/consumer/fetcher.py and update AIOKAFKA_VERSION"
        )
    _fetcher.MemoryRecords = _FetchedBytes
    _fetcher.PartitionRecords = _GuardedPartitionRecords


def installed() -> bool:
    """Whether this process' aiokafka consumers decode batch by batch (:func:`install_batch_guard` ran)."""
    return _fetcher.PartitionRecords is _GuardedPartitionRecords
