"""Records from other producers (issue 15): every codec, librdkafka's partitioners, batches nobody can decode.

One worker (batch engine) for the module, on the session broker and Redis. librdkafka (confluent-kafka) is
the foreign client: it produces events built from the JSON Schema alone and reads the change feed.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

from infra.kafka import ensure_topics
from infra.settings import Settings
from processors.model import memory_key
from schemas.events import decode_dead_letter
from schemas.registry import load_schema
from streams.runtime.stores import Stores
from streams.surface.api import MemoryPublisher
from tests.integration.helpers import WorkerProcess, make_settings, read_topic, unique_tag, wait_for

pytestmark = pytest.mark.slow

WAIT_S = 60


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[WorkerProcess]:
    base = tmp_path_factory.mktemp("foreign")
    proc = WorkerProcess(make_settings(base / "home", kafka_bootstrap, redis_url), base / "worker.log").start()
    try:
        yield proc
    finally:
        proc.interrupt()
        code, _ = proc.wait_stopped()
    assert code == 0, proc.log_tail()
    assert "Traceback" not in proc.log(), proc.log_tail()


def event(memory_id: str, version: int, text: str, user: str, tenant: str) -> dict[str, Any]:
    """A memory event as a producer in another language builds it: from the JSON Schema alone."""
    obj = {
        "schema_version": 1,
        "event_id": uuid.uuid4().hex,
        "op": "add" if version == 1 else "update",
        "memory_id": memory_id,
        "version": version,
        "ts": int(time.time() * 1000),
        "tenant_id": tenant,
        "user_id": user,
        "text": text,
    }
    jsonschema.validate(obj, load_schema("memory-event"))
    return obj


async def stored(settings: Settings, tenant: str, memory_ids: list[str]) -> dict[str, dict[str, Any]]:
    """What each store holds for these memories of ``tenant``: {"lancedb": {id: (version, text)}, "redis": {...}}."""
    keys = [memory_key(tenant, m) for m in memory_ids]
    stores = await Stores.open(settings)
    try:
        lance = {r.memory_id: (r.version, r.text) for r in await stores.vectors.get(keys)}
        redis = {r.memory_id: (r.version, r.text) for r in await stores.cache.get(keys) if r is not None}
    finally:
        await stores.close()
    return {"lancedb": lance, "redis": redis}


async def wait_stored(settings: Settings, tenant: str, want: dict[str, tuple[int, str]]) -> None:
    async def done() -> bool:
        held = await stored(settings, tenant, sorted(want))
        return held["lancedb"] == want and held["redis"] == want

    await wait_for(done, timeout=WAIT_S, what=f"{len(want)} memories in both stores")


# ------------------------------------------------------------------------------------------------ codecs


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "gzip"])
async def test_a_record_compressed_with_each_codec_materializes(worker: WorkerProcess, codec: str) -> None:
    settings = worker.settings
    await ensure_topics(settings)
    tag = unique_tag()
    obj = event(f"{codec}-{tag}", 1, f"compressed with {codec}", f"user-{tag}", f"codec-{tag}")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, compression_type=codec)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topics.events, orjson.dumps(obj), key=obj["memory_id"].encode())
    finally:
        await producer.stop()
    await wait_stored(settings, obj["tenant_id"], {obj["memory_id"]: (1, obj["text"])})
    worker.assert_alive()


# ------------------------------------------------------------------------------------------ poison batches


def raw_batch(records: list[tuple[bytes, bytes]], *, codec_bits: int = 0, break_crc: bool = False) -> bytes:
    """A v2 record batch as a producer would send it, then damaged: codec bits set to ``codec_bits`` (the
    payload left uncompressed, the CRC recomputed so the broker takes it), or one payload byte flipped after
    the CRC was computed."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for i, (key, value) in enumerate(records):
        builder.append(i, timestamp=None, key=key, value=value, headers=[])
    data = bytearray(builder.build())
    if codec_bits:
        (attributes,) = struct.unpack_from(">h", data, 21)
        struct.pack_into(">h", data, 21, (attributes & ~0x07) | codec_bits)
        struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[21:])))
    if break_crc:
        data[-3] ^= 0x5A
    return bytes(data)


async def produce_raw(producer: AIOKafkaProducer, topic: str, partition: int, data: bytes) -> None:
    """One ProduceRequest with these exact bytes (aiokafka's own producer would only send well-formed batches)."""
    client = producer.client
    node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
    response = await client.send(node, ProduceRequest(None, -1, 30_000, [(topic, [(partition, data)])]))
    error = response.topics[0][1][0][1]
    assert error == 0, f"the broker refused the batch: error code {error}"


async def test_an_undecodable_batch_is_dead_lettered_and_the_partition_goes_on(worker: WorkerProcess) -> None:
    settings = worker.settings
    await ensure_topics(settings)
    tag = unique_tag()
    tenant, user = f"poison-{tag}", f"pat-{tag}"
    key = f"poison-{tag}"  # every record below goes to partition 0
    before, after = event(key, 1, "before the poison", user, tenant), event(key, 2, "after the poison", user, tenant)
    lost = event(f"lost-{tag}", 1, "inside the poison batch", user, tenant)
    # Tansu refuses an unknown codec (5-7) but stores what it does not decompress: a batch that claims lz4
    # over a plain payload, and one whose bytes changed after its CRC was computed
    not_lz4 = raw_batch([(b"k", orjson.dumps(lost))], codec_bits=3)
    bad_crc = raw_batch([(b"k", orjson.dumps(lost)), (b"k2", orjson.dumps(lost))], break_crc=True)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        topic = settings.topics.events
        first = await producer.send_and_wait(topic, orjson.dumps(before), key=key.encode(), partition=0)
        await produce_raw(producer, topic, 0, not_lz4)
        await produce_raw(producer, topic, 0, bad_crc)
        last = await producer.send_and_wait(topic, orjson.dumps(after), key=key.encode(), partition=0)
    finally:
        await producer.stop()
    await wait_stored(settings, tenant, {key: (2, "after the poison")})

    def both_dead(records: list[Any]) -> bool:
        return sum(1 for r in records if decode_dead_letter(r.value).last_offset is not None) >= 2

    letters = [decode_dead_letter(r.value) for r in await read_topic(settings, settings.topics.dlq, both_dead)]
    poison = sorted((d for d in letters if d.last_offset is not None), key=lambda d: d.source.offset if d.source else 0)
    assert [d.error_type for d in poison] == ["CorruptBatchError", "CorruptBatchError"], letters
    assert "lz4" in poison[0].reason.lower() and "CRC mismatch" in poison[1].reason, [d.reason for d in poison]
    # the raw batches as fetched: the broker has only set their base offset (the first 8 bytes)
    assert [d.value[8:] for d in poison] == [not_lz4[8:], bad_crc[8:]]
    assert [struct.unpack_from(">q", d.value)[0] for d in poison] == [d.source.offset for d in poison if d.source]
    ranges = [(d.source.partition, d.source.offset, d.last_offset) for d in poison if d.source]
    assert ranges == [(0, first.offset + 1, first.offset + 1), (0, first.offset + 2, first.offset + 3)], ranges
    assert last.offset == first.offset + 4
    assert await stored(settings, tenant, [lost["memory_id"]]) == {"lancedb": {}, "redis": {}}  # nothing of the batches

    async def counted() -> bool:  # the dead-letter agent counts them by reason class
        stores = await Stores.open(settings)
        try:
            return (await stores.counters.read()).get("dlq_CorruptBatchError", 0) >= 2
        finally:
            await stores.close()

    await wait_for(counted, timeout=30, what="dlq_CorruptBatchError counted")
    worker.assert_alive()


# ------------------------------------------------------------------------------------------ librdkafka


CODECS = ("gzip", "snappy", "lz4", "zstd")
PARTITIONERS = ("consistent_random", "murmur2_random")  # librdkafka's default (CRC32), and the Java client's


async def test_librdkafka_producers_interleaved_with_memstream_publish_converge(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """Each memory gets versions 1..9 from librdkafka producers (every codec, both partitioners) and from the
    Python publisher, sent out of order; both stores end at version 9 and the change feed, read with
    librdkafka, announces it."""
    from confluent_kafka import Consumer, Producer

    settings = worker.settings
    await ensure_topics(settings)
    tag = unique_tag()
    tenant, user = f"rdk-{tag}", f"ria-{tag}"
    ids = [f"rdk-{tag}-{i}" for i in range(6)]
    producers = {
        (codec, part): Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "compression.type": codec,
                "partitioner": part,
                "enable.idempotence": False,
                "linger.ms": 0,
            }
        )
        for codec in CODECS
        for part in PARTITIONERS
    }
    clients = list(producers.values())
    order = [4, 1, 7, 2, 9, 3, 6, 5, 8]  # versions, deliberately not in order
    async with MemoryPublisher(settings) as publisher:
        for round_, version in enumerate(order):
            for i, memory_id in enumerate(ids):
                text = f"{memory_id} at version {version}"
                if (round_ + i) % 3 == 0:  # every third event through memstream's own publisher
                    line = {"memory_id": memory_id, "user_id": user, "tenant_id": tenant, "text": text}
                    result = await publisher.publish_lines([json.dumps({**line, "op": "update", "version": version})])
                    assert not result.rejected, result.rejected
                else:
                    client = clients[(round_ * len(ids) + i) % len(clients)]
                    obj = event(memory_id, version, text, user, tenant)
                    client.produce(settings.topics.events, key=memory_id.encode(), value=json.dumps(obj).encode())
                    client.poll(0)
            await publisher.flush()
        for client in clients:
            assert client.flush(30) == 0, "librdkafka could not deliver every record"
    want = {m: (9, f"{m} at version 9") for m in ids}
    await wait_stored(settings, tenant, want)

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"feed-{tag}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topics.changes])
    newest: dict[str, tuple[int, str]] = {}
    schema = load_schema("change-event")
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline and any(newest.get(m, (0,))[0] < 9 for m in ids):
            message = await asyncio.to_thread(consumer.poll, 0.5)
            if message is None or message.error():
                continue
            change = json.loads(message.value())
            jsonschema.validate(change, schema)
            memory_id = change["memory_id"]
            assert message.key() == memory_id.encode()
            if memory_id in want:
                newest[memory_id] = max(newest.get(memory_id, (0, "")), (change["version"], change["event_id"]))
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert {m: v for m, (v, _) in newest.items()} == dict.fromkeys(ids, 9)
    worker.assert_alive()
