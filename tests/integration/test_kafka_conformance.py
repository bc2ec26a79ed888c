"""Any Kafka (issue 26, item 5): every broker behaviour memstream relies on, through memstream's own code paths.

Against the broker ``MEMSTREAM_TEST_KAFKA_BOOTSTRAP`` names (``host:port`` of a Kafka or Redpanda, PLAINTEXT),
else the session's embedded Tansu broker::

    MEMSTREAM_TEST_KAFKA_BOOTSTRAP=host:9092 .venv/bin/pytest tests/integration/test_kafka_conformance.py

Safe on a shared cluster: every topic and consumer group name carries a fresh tag, and the topics a test made are
deleted after it (consumer groups are left to the broker's offsets retention: aiokafka has no DeleteGroups).
Nothing here needs Redis or LanceDB.

What the worker does with such records end to end (each codec from aiokafka, librdkafka producers interleaved
with memstream's publisher, batches nobody can decode) is tests/integration/test_foreign_producers.py; here the
broker and the client paths alone are checked, record by record.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

from infra.kafka import (
    KafkaPublisher,
    OneOwnerAssignor,
    admin_client,
    committed_offsets,
    consumer_config,
    ensure_topics,
    getmany,
    producer_config,
    start_consumer,
    wait_for_commits,
)
from infra.log_reader import LogReader, StartAt
from infra.settings import Settings
from processors.model import InRecord
from processors.ports import OutRecord
from schemas.events import VECTOR_HEADER
from streams.runtime.loop import Batching, Committed, ConsumeLoop, Fence, NoHooks
from tests.integration.helpers import make_settings

BOOTSTRAP_ENV = "MEMSTREAM_TEST_KAFKA_BOOTSTRAP"
NO_REDIS = "redis://127.0.0.1:1/0"  # never connected to: these tests touch only the broker
WAIT_S = 30.0
# the largest single record the tests send: a compensation record (processors.retry.CompensationPolicy.chunk
# memories, each with its vector) is kept well under 1 MB, so 900 KB stands for the largest memstream writes
LARGE_RECORD_BYTES = 900_000
HOLD_S = 7.0  # how long the rebalance test holds its batch: Tansu completes a rebalance ~5 s after it begins


@pytest.fixture(scope="module")
def bootstrap(request: pytest.FixtureRequest) -> str:
    """The outside broker ``MEMSTREAM_TEST_KAFKA_BOOTSTRAP`` names, else the session's embedded broker."""
    outside = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if outside:
        return outside
    embedded: str = request.getfixturevalue("kafka_bootstrap")
    return embedded


@pytest.fixture
async def kafka(tmp_path: Path, bootstrap: str) -> AsyncIterator[Settings]:
    """Settings with topic and group names nobody else uses; every topic of them (``settings.topics`` and any
    ``<topic_prefix>...`` name a test made) is deleted afterwards, where the broker allows."""
    settings = make_settings(tmp_path, bootstrap, NO_REDIS, partitions=2)
    yield settings
    admin = admin_client(settings)
    try:
        await admin.start()
        mine = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
        if mine:
            await admin.delete_topics(mine)
    except KafkaError:
        pass  # a broker that refuses deletes keeps them: their names are unique, nothing reads them again
    finally:
        await admin.close()


async def make_topic(settings: Settings, name: str) -> str:
    """A topic of ``settings.partitions`` partitions created the way memstream creates its own."""
    topic = f"{settings.topic_prefix}{name}"
    assert await ensure_topics(settings, [topic]) == [topic]
    return topic


async def publish(settings: Settings, topic: str, records: Sequence[OutRecord]) -> list[tuple[int, int]]:
    """memstream's publisher (acknowledged batches); where each record landed, (partition, offset), in order."""
    publisher = await KafkaPublisher.start(settings)
    try:
        return [(ref.partition, ref.offset) for ref in await publisher.publish_positioned(topic, records)]
    finally:
        await publisher.stop()


async def read_all(settings: Settings, topic: str) -> list[InRecord]:
    """The whole topic through memstream's group-less reader, in (partition, offset) order."""
    async with await LogReader.open(settings, topic) as reader:
        await reader.seek(StartAt.beginning())
        read = [r async for window in reader.read_to_end() for r in window]
    return sorted(read, key=lambda r: (r.partition, r.offset))


async def until(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if not isinstance(done, bool):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        await asyncio.sleep(0.05)


# -------------------------------------------------------------------------------------------------- topics


async def test_topics_are_created_with_the_partitions_and_replication_memstream_asks(kafka: Settings) -> None:
    """``ensure_topics`` creates every topic of the deployment once (a second call creates nothing), each with
    ``MEMSTREAM_PARTITIONS`` partitions of ``MEMSTREAM_REPLICATION_FACTOR`` replicas, each with a leader."""
    wanted = list(kafka.topics.all())
    assert sorted(await ensure_topics(kafka)) == sorted(wanted)
    assert await ensure_topics(kafka) == []
    admin = admin_client(kafka)
    try:
        await admin.start()
        described = await admin.describe_topics(wanted)
    finally:
        await admin.close()
    assert sorted(t["topic"] for t in described) == sorted(wanted)
    for topic in described:
        assert topic["error_code"] == 0, topic
        partitions = topic["partitions"]
        assert sorted(p["partition"] for p in partitions) == list(range(kafka.partitions)), topic
        assert all(len(p["replicas"]) == kafka.replication_factor and p["leader"] >= 0 for p in partitions), topic


async def test_topic_configs_hold_memstreams_largest_records_and_keep_history(kafka: Settings) -> None:
    """memstream sets no per-topic configs: it relies on the broker's defaults for its topics. Read back with
    DescribeConfigs, they must keep records (``cleanup.policy`` deletes by retention, no compaction that would
    drop a memory's older versions from the log a rebuild replays) and take its largest records
    (``max.message.bytes``)."""
    topic = (await ensure_topics(kafka, [kafka.topics.events]))[0]
    admin = admin_client(kafka)
    try:
        await admin.start()
        response = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    error_code, _, _, name, entries = response[0].resources[0][:5]
    assert (error_code, name) == (0, topic), response
    configs = {entry[0]: entry[1] for entry in entries}
    if not configs:
        pytest.skip(
            f"the broker at {kafka.kafka_bootstrap} answers DescribeConfigs with no entries (Tansu 0.6.0 does): "
            "cleanup.policy and max.message.bytes cannot be read back; the topics' creation and a "
            f"{LARGE_RECORD_BYTES}-byte record are checked by the other tests of this module"
        )
    assert "compact" not in (configs.get("cleanup.policy") or "delete"), configs
    assert int(configs["max.message.bytes"]) > LARGE_RECORD_BYTES, configs


# --------------------------------------------------------------------------------------- consumer groups


async def poll(consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
    """Keep a group member fetching (and so taking part in rebalances) until ``stop``."""
    while not stop.is_set():
        await getmany(consumer, timeout_ms=100)


@pytest.mark.slow
async def test_the_one_owner_assignor_gives_every_partition_to_one_member_and_the_standby_takes_over(
    kafka: Settings,
) -> None:
    """The index sink's group: with two members one owns every partition and the other stands by with none;
    when the owner leaves, the standby is given every partition."""
    topic = await make_topic(kafka, "sink")
    group = f"{kafka.group_id}-one-owner"
    everything = {TopicPartition(topic, p) for p in range(kafka.partitions)}
    config = consumer_config(kafka, group_id=group)
    members = [AIOKafkaConsumer(**config, partition_assignment_strategy=(OneOwnerAssignor,)) for _ in range(2)]
    stops = [asyncio.Event() for _ in members]
    tasks: list[asyncio.Task[None]] = []
    try:
        for member in members:
            member.subscribe([topic])
        await asyncio.gather(*(m.start() for m in members))  # both join the first generation
        tasks += [asyncio.create_task(poll(m, stop)) for m, stop in zip(members, stops, strict=True)]

        def split() -> bool:
            held = sorted((set(m.assignment()) for m in members), key=len)
            return held == [set(), everything]

        await until(split, "one member owning every partition, the other none")
        owner = next(i for i, m in enumerate(members) if m.assignment())
        standby = members[1 - owner]
        stops[owner].set()
        await tasks[owner]
        await members[owner].stop()  # leaves the group
        await until(lambda: set(standby.assignment()) == everything, "the standby owning every partition")
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for member in members:
            await member.stop()


@dataclass
class Held(NoHooks):
    """A handler whose writes wait at ``gate``; records every record it wrote and every batch committed."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    written: list[tuple[int, int]] = field(default_factory=list)
    done: list[Committed] = field(default_factory=list)

    async def prepare(self, records: Sequence[InRecord]) -> Sequence[InRecord]:
        return records

    async def write(self, prepared: Sequence[InRecord]) -> int:
        self.entered.set()
        await self.gate.wait()
        self.written += [(r.partition, r.offset) for r in prepared]
        return len(prepared)

    async def committed(self, batch: Committed) -> None:
        self.done.append(batch)


class WatchedFence(Fence):
    """The loop's fence, noting when a revocation of owned partitions begins."""

    def __init__(self, loop: ConsumeLoop, who: str) -> None:
        super().__init__(loop, who)
        self.revoking = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            self.revoking.set()
        await super().on_partitions_revoked(revoked)


async def member(
    settings: Settings, topic: str, group: str, loop: ConsumeLoop, stop: asyncio.Event, out: list[AIOKafkaConsumer]
) -> None:
    """A group member on the one consume loop: a consumer subscribed with the loop's fence (appended to ``out``
    before it starts), then the loop."""
    consumer = AIOKafkaConsumer(**consumer_config(settings, group_id=group))
    consumer.subscribe([topic], listener=loop.fence("member"))
    out.append(consumer)
    await consumer.start()
    await loop.run(consumer, stop)


@pytest.mark.slow
async def test_a_rebalance_during_a_batch_waits_for_its_commit(kafka: Settings) -> None:
    """A member that holds a batch when a second member joins gives its partitions up only after that batch
    is written and committed (the loop's fence): the commit succeeds, and no record is written twice."""
    topic = await make_topic(kafka, "fenced")
    group = f"{kafka.group_id}-fenced"
    first = await publish(kafka, topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(20)])
    batching = Batching(max_records=1000, wait_ms=100, linger_ms=100)
    handlers = [Held(), Held()]
    handlers[1].gate.set()  # the second member writes at once
    loops = [ConsumeLoop(h, batching, member=f"member {i}") for i, h in enumerate(handlers)]
    fence = WatchedFence(loops[0], "member 0")
    stops = [asyncio.Event(), asyncio.Event()]
    tasks: list[asyncio.Task[None]] = []
    try:
        consumer = await start_consumer(kafka, [topic], group_id=group, listener=fence)
        tasks.append(asyncio.create_task(loops[0].run(consumer, stops[0])))
        await asyncio.wait_for(handlers[0].entered.wait(), WAIT_S)  # a batch in hand, its write held

        # not awaited here: a subscribed consumer's start() returns once it has been given its partitions, and
        # that waits for the first member to rejoin, after its batch
        second: list[AIOKafkaConsumer] = []
        tasks.append(asyncio.create_task(member(kafka, topic, group, loops[1], stops[1], second)))
        await asyncio.wait_for(fence.revoking.wait(), WAIT_S)  # the rebalance reached the first member
        # without the fence the partitions would move now (~5 s later on Tansu); with it, not while the
        # batch is in hand (held well inside the rebalance timeout, 10 s, after which the broker would evict it)
        held_until = time.monotonic() + HOLD_S
        while time.monotonic() < held_until:
            assert not second[0].assignment(), f"partitions moved while a batch was in hand: {second[0].assignment()}"
            await asyncio.sleep(0.05)
        assert handlers[0].done == [] and handlers[1].written == []
        handlers[0].gate.set()

        await until(lambda: bool(handlers[0].done), "the held batch committed")
        held = handlers[0].done[0]
        assert held.commit_ok, "the commit of the batch in hand failed: the rebalance did not wait for it"
        assert all(offset > 0 for offset in held.positions.values()), held.positions

        second = await publish(kafka, topic, [(f"k{i}".encode(), f"w{i}".encode()) for i in range(20)])
        wanted = sorted(first + second)
        await until(lambda: len(handlers[0].written) + len(handlers[1].written) >= len(wanted), "every record written")
        await asyncio.sleep(0.5)  # a record written twice would show up now
        assert sorted(handlers[0].written + handlers[1].written) == wanted
        assert handlers[1].written, "the second member was never given a partition"
    finally:
        for stop, handler in zip(stops, handlers, strict=True):
            stop.set()
            handler.gate.set()  # a failed assertion must not leave a write waiting forever
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT_S)


@pytest.mark.slow
async def test_committed_offsets_read_back_and_a_member_resumes_from_them(kafka: Settings) -> None:
    """Offsets a member commits are what ``committed()`` (and memstream's OffsetFetch helpers) read back, and
    where a consumer of the group starts next."""
    topic = await make_topic(kafka, "commits")
    group = f"{kafka.group_id}-commits"
    landed = await publish(kafka, topic, [(f"k{i}".encode(), b"x") for i in range(12)])
    ends = {p: max(o for q, o in landed if q == p) + 1 for p, _ in landed}
    consumer = await start_consumer(kafka, [topic], group_id=group)
    try:
        seen: dict[int, int] = {}
        deadline = time.monotonic() + WAIT_S
        while seen != ends:
            assert time.monotonic() < deadline, f"read {seen}, wanted {ends}"
            for tp, messages in (await getmany(consumer, timeout_ms=200)).items():
                seen[tp.partition] = messages[-1].offset + 1
        await consumer.commit({TopicPartition(topic, p): end for p, end in ends.items()})
        for p, end in ends.items():
            assert await consumer.committed(TopicPartition(topic, p)) == end
    finally:
        await consumer.stop()
    assert await committed_offsets(kafka, group, topic) == ends
    assert await wait_for_commits(kafka, group, topic, ends, timeout=WAIT_S)
    resumed = AIOKafkaConsumer(**consumer_config(kafka, group_id=group))
    await resumed.start()
    try:
        resumed.assign([TopicPartition(topic, p) for p in ends])
        assert {p: await resumed.position(TopicPartition(topic, p)) for p in ends} == ends
    finally:
        await resumed.stop()


# ------------------------------------------------------------------------------------------------ offsets


async def test_end_offsets_bound_what_a_reader_reads_to_the_end(kafka: Settings) -> None:
    """``LogReader.watermarks`` (``end_offsets``) are 0 on an empty topic and never past the records written
    (Tansu's may lag behind them: infra/log_reader.py); the log starts at 0 (``beginning_offsets``), and a read
    to the end returns every record written, in order."""
    topic = await make_topic(kafka, "ends")
    async with await LogReader.open(kafka, topic) as reader:
        assert await reader.watermarks() == dict.fromkeys(range(kafka.partitions), 0)
    landed = await publish(kafka, topic, [(f"k{i % 7}".encode(), f"v{i}".encode()) for i in range(50)])
    written = {p: max(o for q, o in landed if q == p) + 1 for p, _ in landed}
    async with await LogReader.open(kafka, topic) as reader:
        marks = await reader.watermarks()
        assert await reader.beginnings() == dict.fromkeys(range(kafka.partitions), 0)
    assert all(0 <= marks[p] <= written.get(p, 0) for p in marks), (marks, written)
    read = await read_all(kafka, topic)
    assert [(r.partition, r.offset) for r in read] == sorted(landed)
    assert [r.value for r in read] == [f"v{i}".encode() for _, i in sorted(zip(landed, range(50), strict=True))]


# ------------------------------------------------------------------------------------------------ records


def vector_bytes(dim: int = 384) -> bytes:
    """An embedded record's vector header: float32 little-endian, every byte value somewhere in it."""
    return np.linspace(-1.0, 1.0, dim, dtype="<f4").tobytes() + bytes(range(256))


async def test_headers_round_trip_byte_exact(kafka: Settings) -> None:
    """The embedded topic's vector header and any others a producer sets come back as sent: binary values,
    empty values, a name given twice, in order."""
    topic = await make_topic(kafka, "headers")
    headers = (
        (VECTOR_HEADER, vector_bytes()),
        ("bin", bytes(range(256))),
        ("empty", b""),
        ("twice", b"1"),
        ("twice", b"\x00\xff"),
        ("naïve-ünïcode", "ω".encode()),
    )
    records: list[OutRecord] = [(b"m1", b"one", headers), (b"m1", b"two", ()), (b"m1", b"", headers[:1])]
    landed = await publish(kafka, topic, records)
    read = await read_all(kafka, topic)
    assert [(r.partition, r.offset) for r in read] == landed
    assert [(r.key, r.value, r.headers) for r in read] == [
        (b"m1", b"one", headers),
        (b"m1", b"two", ()),
        (b"m1", b"", headers[:1]),
    ]


CODEC_BITS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # a v2 record batch's attributes & 0x07


async def stored_codecs(settings: Settings, topic: str) -> list[int]:
    """The codec of each record batch the broker holds for ``topic`` (one raw Fetch per partition from offset 0:
    a consumer decompresses batches and never says how they came)."""
    producer = AIOKafkaProducer(**producer_config(settings))
    await producer.start()
    try:
        client = producer.client
        codecs: list[int] = []
        for partition in sorted(await producer.partitions_for(topic)):
            node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            request = FetchRequest(100, 1, 8 << 20, 0, [(topic, [(partition, 0, 8 << 20)])])
            response = await client.send(node, request)
            part = response.topics[0][1][0]
            assert part[1] == 0, f"fetch of {topic}[{partition}] failed: error {part[1]}"
            records = MemoryRecords(part[-1])
            while (batch := records.next_batch()) is not None:
                codecs.append(batch.compression_type)
        return codecs
    finally:
        await producer.stop()


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
async def test_records_from_librdkafka_in_every_codec_are_read_as_sent(kafka: Settings, codec: str) -> None:
    """An outside producer (librdkafka, as confluent-kafka and most non-Java clients use) compresses with each
    codec; memstream's reader decodes every record: keys, values, headers (a vector header among them)
    byte-exact, none a stand-in. (aiokafka's codecs through the whole worker: test_foreign_producers.py.)"""
    from confluent_kafka import Producer

    topic = await make_topic(kafka, f"codec-{codec}")
    # compressible values: librdkafka sends a batch uncompressed when compressing would not shrink it
    sent = [
        (
            f"mem-{i % 3}".encode(),
            (f"memory {i} about the weather in Lisbon " * 20).encode(),
            ((VECTOR_HEADER, vector_bytes()), ("h", bytes([i, 0, 255]))),
        )
        for i in range(30)
    ]
    producer = Producer(
        {
            "bootstrap.servers": kafka.kafka_bootstrap,
            "compression.type": codec,
            "enable.idempotence": False,
            "linger.ms": 50,  # many records a batch: each batch compressed as one
        }
    )
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    for key, value, headers in sent:
        pairs: list[tuple[str, str | bytes | None]] = list(headers)
        producer.produce(topic, key=key, value=value, headers=pairs, on_delivery=delivered)
    assert await asyncio.to_thread(producer.flush, WAIT_S) == 0, "librdkafka could not deliver every record"
    assert failures == []
    codecs = await stored_codecs(kafka, topic)
    assert codecs and set(codecs) == {CODEC_BITS[codec]}, f"the broker holds batches of codecs {codecs}"
    read = await read_all(kafka, topic)
    assert [r.poison for r in read] == [None] * len(sent)
    got = sorted((r.key or b"", r.value, r.headers) for r in read)
    assert got == sorted(sent)


async def test_a_record_of_900_kb_is_written_and_read(kafka: Settings) -> None:
    """The largest record memstream writes (a compensation record, ``CompensationPolicy.chunk`` memories, is
    kept under 1 MB) goes through its publisher and its consumer's fetch (the reader's and the worker's take
    the same ``consumer_config``), beside small ones, with a vector header."""
    assert producer_config(kafka)["max_request_size"] > LARGE_RECORD_BYTES
    assert consumer_config(kafka, group_id=None)["max_partition_fetch_bytes"] > LARGE_RECORD_BYTES
    topic = await make_topic(kafka, "large")
    big = np.random.default_rng(26).bytes(LARGE_RECORD_BYTES)  # incompressible
    records: list[OutRecord] = [(b"a", b"before"), (b"a", big, ((VECTOR_HEADER, vector_bytes()),)), (b"a", b"after")]
    landed = await publish(kafka, topic, records)
    read = await read_all(kafka, topic)
    assert [(r.partition, r.offset) for r in read] == landed
    assert [(r.value, r.headers, r.poison) for r in read] == [
        (b"before", (), None),
        (big, ((VECTOR_HEADER, vector_bytes()),), None),
        (b"after", (), None),
    ]
    partition, offset = landed[1]
    async with await LogReader.open(kafka, topic) as reader:
        one = await reader.read_one(partition, offset)
    assert one is not None and one.value == big
