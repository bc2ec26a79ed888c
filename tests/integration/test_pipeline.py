"""The whole pipeline for real (issue #2): agents publish, the worker materializes, both stores agree.

A real Tansu broker and Redis (session fixtures), LanceDB on disk, and ``memstream worker`` as a child process,
stopped with SIGINT at the end of the module (it must exit 0 within 30 s). Both workers of the module (the batch
engine, shared by most tests, and the faust engine) start together: each needs ~15 s to join its consumer groups.
Every test uses its own tenant and users, so tests sharing a worker do not see each other's memories.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from infra.settings import Settings
from processors.model import MemoryRow, ScopeQuery, memory_key
from processors.publishing import EventFactory
from schemas.errors import SchemaError
from schemas.events import (
    MAX_TEXT_CHARS,
    SCHEMA_VERSION,
    ChangeEvent,
    MemoryEvent,
    Op,
    Scope,
    decode_change,
    decode_dead_letter,
    encode,
)
from streams.runtime.stores import Stores
from streams.surface.api import MemoryPublisher, MemoryReader, wait_until_materialized
from streams.surface.operations import stats as read_stats
from streams.surface.operations import verify as verify_stores
from tests.integration.helpers import (
    CliResult,
    WorkerProcess,
    lance_rows,
    make_settings,
    read_topic,
    run_cli,
    unique_tag,
    wait_for,
    write_jsonl,
)

pytestmark = pytest.mark.slow

WAIT_S = 60  # what `publish --wait` and the tests give the worker (it needs ~15 s to start)


# ------------------------------------------------------------------------------------------------ workers


@dataclass
class Workers:
    batch: WorkerProcess
    faust: WorkerProcess


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Workers]:
    """Both workers, started at once (their start-up overlaps the first tests) and stopped cleanly with SIGINT."""
    procs = []
    for engine in ("batch", "faust"):
        base = tmp_path_factory.mktemp(f"worker-{engine}")
        settings = make_settings(base / "home", kafka_bootstrap, redis_url, engine=engine)
        procs.append(WorkerProcess(settings, base / "worker.log"))
    try:
        for proc in procs:
            proc.start()
        yield Workers(*procs)
    finally:
        for proc in procs:
            proc.interrupt()
        outcomes = []
        for proc in procs:
            try:
                outcomes.append((proc, *proc.wait_stopped()))
            except AssertionError as exc:  # hung: already killed; report after the others are stopped too
                outcomes.append((proc, None, str(exc)))
    for proc, code, seconds in outcomes:
        engine = proc.settings.engine
        assert code == 0, f"the {engine} worker exited with {code} after SIGINT ({seconds}):\n{proc.log_tail()}"
        assert "Traceback" not in proc.log() and "[ERROR]" not in proc.log(), f"the {engine} worker logged errors"
        if "worker ready" in proc.log():  # a worker interrupted while starting has no window to finish
            assert "worker stopped after" in proc.log(), (
                f"the {engine} worker skipped its clean stop:\n{proc.log_tail()}"
            )


@pytest.fixture
def worker(workers: Workers) -> Iterator[WorkerProcess]:
    """The shared worker (batch engine); each test also checks it is still running afterwards."""
    workers.batch.assert_alive()
    yield workers.batch
    workers.batch.assert_alive()


@pytest.fixture
def faust_worker(workers: Workers) -> Iterator[WorkerProcess]:
    workers.faust.assert_alive()
    yield workers.faust
    workers.faust.assert_alive()


# ------------------------------------------------------------------------------------------------ data

COLORS = ("amber", "cobalt", "crimson", "jade", "ochre", "silver", "violet", "teal", "umber", "ivory", "coral")
ANIMALS = ("otter", "falcon", "lynx", "heron", "badger", "marten", "ibis", "gecko", "tapir", "emu", "okapi", "yak")
PLACES = ("harbour", "orchard", "library", "market", "station", "garden", "bakery", "museum", "quarry")
AGENTS = ("planner", "chef", "coach")


def memory_text(user: str, i: int, tag: str, kind: str = "likes") -> str:
    """Distinct per (user, i, kind): with the hash embedder, searching for the exact text ranks it first."""
    return f"{user} {kind} the {COLORS[i % 11]} {ANIMALS[(i * 7) % 12]} near the {PLACES[(i * 5) % 9]} k{i}z{tag}"


@dataclass(frozen=True)
class Expected:
    """What one memory must look like in the stores after everything was applied."""

    user: str
    agent: str | None
    text: str | None  # None: deleted
    metadata: dict[str, Any]
    first_text: str

    @property
    def live(self) -> bool:
        return self.text is not None


def fleet(
    tag: str, tenant: str, n: int = 180, updates: int = 25, deletes: tuple[int, int] = (20, 35)
) -> tuple[list[dict[str, Any]], dict[str, Expected]]:
    """Input lines over 4 users and 3 agents, and the state each memory must end in. By default 225 lines:
    180 adds (a third with content-derived ids), 5 exact re-adds, 25 updates and 15 deletes (5 of them of
    updated memories); updates and deletes name memories by id."""
    factory = EventFactory()
    users = [f"user{k}-{tag}" for k in range(4)]
    lines: list[dict[str, Any]] = []
    final: dict[str, Expected] = {}
    named: list[tuple[int, str]] = []
    for i in range(n):
        user, agent = users[i % 4], AGENTS[i % 3]
        line: dict[str, Any] = {
            "tenant_id": tenant,
            "user_id": user,
            "agent_id": agent,
            "text": memory_text(user, i, tag),
            "metadata": {"i": i, "kind": "fact"},
        }
        if i % 3:
            line["memory_id"] = f"m{i}-{tag}"
        memory_id = factory.from_input(dict(line)).memory_id
        if i % 3:
            named.append((i, memory_id))
        lines.append(line)
        final[memory_id] = Expected(user, agent, line["text"], line["metadata"], line["text"])
    lines += [dict(lines[i]) for i in (0, 3, 6, 9, 12)]  # the same memory again: the same id, nothing new
    for i, memory_id in named[:updates]:
        old = final[memory_id]
        text = memory_text(old.user, i, tag, kind="now prefers")
        metadata = {"i": i, "kind": "revised"}
        lines.append(
            {
                "op": "update",
                "memory_id": memory_id,
                "tenant_id": tenant,
                "user_id": old.user,
                "agent_id": old.agent,
                "text": text,
                "metadata": metadata,
            }
        )
        final[memory_id] = Expected(old.user, old.agent, text, metadata, old.first_text)
    for _, memory_id in named[deletes[0] : deletes[1]]:
        old = final[memory_id]
        lines.append({"op": "delete", "memory_id": memory_id, "tenant_id": tenant, "user_id": old.user})
        final[memory_id] = Expected(old.user, None, None, {}, old.first_text)
    return lines, final


def make_event(
    memory_id: str, version: int, text: str, scope: Scope, *, event_id: str, op: Op = Op.UPDATE
) -> MemoryEvent:
    return MemoryEvent(
        event_id=event_id,
        op=op,
        memory_id=memory_id,
        version=version,
        ts=1_700_000_000_000 + version,
        scope=scope,
        text=text,
        metadata={"version": version},
    )


# ------------------------------------------------------------------------------------------------ checks


def assert_ok(result: CliResult, worker: WorkerProcess, rc: int = 0) -> dict[str, Any]:
    assert result.rc == rc, f"`memstream {' '.join(result.args)}`: {result}\n--- worker log\n{worker.log_tail()}"
    report: dict[str, Any] = result.json()
    return report


def assert_consistent(report: dict[str, Any], *, live: int, tombstones: int) -> None:
    total = live + tombstones
    assert report["consistent"] is True, report
    assert (report["live_memories"], report["tombstones"]) == (live, tombstones), report
    assert report["lancedb_memories"] == report["redis_memories"] == report["matching"] == total, report
    for kind in ("missing_in_redis", "missing_in_lancedb", "version_mismatch", "content_mismatch"):
        assert report[kind] == 0, report


Row = tuple[str, str, bool, int, str]  # text, content hash, deleted, version, event id


async def snapshot(settings: Settings, tenant: str) -> dict[str, Row]:
    """One tenant's memories as both stores hold them, checked to be identical and free of duplicates."""
    rows = await lance_rows(settings, f"tenant_id = '{tenant}'")
    ids = [r["memory_id"] for r in rows]
    duplicates = [m for m, count in Counter(ids).items() if count > 1]
    assert not duplicates, f"LanceDB holds several rows for {duplicates}"
    stores = await Stores.open(settings)
    try:
        keys = [memory_key(tenant, m) for m in ids]
        cached = await stores.cache.get(keys)
        redis_keys = set(await stores.cache.states(ScopeQuery(tenant_id=tenant)))
    finally:
        await stores.close()
    assert redis_keys == set(keys), "Redis and LanceDB hold different memories"
    client = aioredis.from_url(settings.redis_url)
    try:  # each user's recency index holds exactly the user's live memories (deletes leave no trace there)
        for user in {r["user_id"] for r in rows}:
            indexed = {m.decode() for m in await client.zrange(f"{settings.redis_prefix}r:{tenant}:{user}", 0, -1)}
            assert indexed == {r["memory_id"] for r in rows if r["user_id"] == user and not r["deleted"]}, user
    finally:
        await client.aclose()
    out: dict[str, Row] = {}
    for row, hot in zip(rows, cached, strict=True):
        assert hot is not None
        durable = (row["text"], row["content_hash"], row["deleted"], row["version"], row["event_id"])
        assert (hot.text, hot.content_hash, hot.deleted, hot.version, hot.event_id) == durable, row["memory_id"]
        out[row["memory_id"]] = durable
    return out


def changes_of(records: list[ConsumerRecord[bytes, bytes]], memory_ids: set[str]) -> list[ChangeEvent]:
    return [c for c in (decode_change(r.value) for r in records if r.value) if c.memory_id in memory_ids]


def event_ids_seen(records: list[ConsumerRecord[bytes, bytes]]) -> Counter[str]:
    return Counter(orjson.loads(r.value)["event_id"] for r in records if r.value)


# ------------------------------------------------------------------------------------------------ tests


async def test_cli_publish_wait_makes_every_memory_searchable(worker: WorkerProcess, tmp_path: Path) -> None:
    """`publish --wait` returns once ~200 memories are in both stores; each is found by search, `get` shows the
    latest text (None once deleted), and `verify` finds LanceDB and Redis consistent, without duplicates."""
    settings, tag = worker.settings, unique_tag()
    tenant = f"fleet-{tag}"
    lines, final = fleet(tag, tenant)
    live = {m: e for m, e in final.items() if e.live}
    deleted = {m: e for m, e in final.items() if not e.live}
    assert (len(lines), len(final), len(live)) == (225, 180, 165)

    path = write_jsonl(tmp_path / "fleet.jsonl", lines)
    args = ("publish", str(path), "--wait", "--indexed", "--timeout", str(WAIT_S), "--json")  # LanceDB is read below
    report = assert_ok(await run_cli(settings, *args), worker)
    assert report["accepted"] == len(lines) and report["rejected"] == 0 and report["rejections"] == []
    assert report["materialized"] == len(final) and report["not_materialized"] == []

    verified = assert_ok(await run_cli(settings, "verify", "--tenant", tenant, "--json"), worker)
    assert_consistent(verified, live=len(live), tombstones=len(deleted))

    # LanceDB read directly: one row per memory, the final text, tombstones for deletes
    rows = {r["memory_id"]: r for r in await lance_rows(settings, f"tenant_id = '{tenant}'")}
    assert len(rows) == len(final) and set(rows) == set(final)
    for memory_id, expected in final.items():
        assert rows[memory_id]["deleted"] is (not expected.live), memory_id
        assert rows[memory_id]["text"] == (expected.text or ""), memory_id

    # Redis holds exactly what LanceDB holds; each user's recency index only the user's live memories
    assert (await snapshot(settings, tenant)).keys() == final.keys()

    async with MemoryReader(settings) as reader:
        for memory_id, expected in live.items():
            hits = await reader.search(expected.text or "", user_id=expected.user, tenant_id=tenant, k=3)
            assert hits, memory_id
            top = hits[0].row
            assert top.memory_id == memory_id, (expected.text, [h.row.text for h in hits])
            assert (top.text, top.scope.agent_id, top.metadata) == (expected.text, expected.agent, expected.metadata)
            assert hits[0].score > 0.999
            got = await reader.get(memory_id, tenant_id=tenant)
            assert got is not None and got.text == expected.text and got.metadata == expected.metadata
            if expected.first_text != expected.text:  # updated: the old text is gone from the store
                old_hits = await reader.search(expected.first_text, user_id=expected.user, tenant_id=tenant, k=10)
                assert expected.first_text not in {h.row.text for h in old_hits}
        # agent scope narrows a user's memories to that agent's
        for memory_id, expected in list(live.items())[:12]:
            hits = await reader.search(
                expected.text or "", user_id=expected.user, agent_id=expected.agent, tenant_id=tenant, k=50
            )
            assert hits[0].row.memory_id == memory_id
            assert {h.row.scope.agent_id for h in hits} == {expected.agent}
        for memory_id, expected in deleted.items():
            assert await reader.get(memory_id, tenant_id=tenant) is None, memory_id
            hits = await reader.search(expected.first_text, user_id=expected.user, tenant_id=tenant, k=10)
            assert memory_id not in {h.row.memory_id for h in hits}, memory_id


async def test_publishing_the_same_file_twice_changes_nothing(worker: WorkerProcess, tmp_path: Path) -> None:
    """Re-publishing a file leaves the same memories with the same content in both stores, no duplicates.
    Lines with an explicit version keep it (with an explicit event id too they are exact replays); the others
    are re-stamped by the publisher with newer versions, the content staying the same."""
    settings, tag = worker.settings, unique_tag()
    tenant = f"idem-{tag}"
    users = (f"ann-{tag}", f"ben-{tag}")
    lines: list[dict[str, Any]] = []
    winners: dict[str, str] = {}  # memory id -> the event id that must win (explicit version and event id)
    for i in range(10):
        memory_id, user = f"v{i}-{tag}", users[i % 2]
        lines.append(
            {
                "memory_id": memory_id,
                "tenant_id": tenant,
                "user_id": user,
                "agent_id": "planner",
                "text": memory_text(user, 100 + i, tag),
                "version": 100 + i,
                "event_id": f"e{i}a-{tag}",
            }
        )
        winners[memory_id] = f"e{i}a-{tag}"
        if i < 4:
            text = memory_text(user, 100 + i, tag, "now prefers")
            body = {"op": "update", "text": text, "version": 1000 + i, "event_id": f"e{i}b-{tag}"}
            lines.append({**lines[-1], **body})
            winners[memory_id] = f"e{i}b-{tag}"
        elif i < 6:
            body = {"op": "delete", "memory_id": memory_id, "tenant_id": tenant, "user_id": user}
            lines.append({**body, "version": 2000 + i, "event_id": f"e{i}c-{tag}"})
            winners[memory_id] = f"e{i}c-{tag}"
    versioned = set(winners)  # ...and those with an explicit version only: each publish makes new event ids
    for i in range(6):
        memory_id, user = f"w{i}-{tag}", users[i % 2]
        line = {"memory_id": memory_id, "tenant_id": tenant, "user_id": user, "text": memory_text(user, 200 + i, tag)}
        lines.append({**line, "version": 500 + i})
        if i < 2:
            lines.append({**line, "op": "update", "text": memory_text(user, 200 + i, tag, "now"), "version": 600 + i})
        versioned.add(memory_id)
    # last, without versions (`--wait` waits for their new versions: for everything before them too)
    unversioned = []
    for i in range(20):  # even ones with content-derived ids
        line = {"tenant_id": tenant, "user_id": users[i % 2], "text": memory_text(users[i % 2], i, tag)}
        unversioned.append(line if i % 2 == 0 else {**line, "memory_id": f"u{i}-{tag}"})
    lines += unversioned
    for i in (1, 3, 5, 7):
        lines.append({**unversioned[i], "op": "update", "text": memory_text(users[1], i, tag, "now prefers")})
    for i in (9, 11):
        lines.append({"op": "delete", "memory_id": f"u{i}-{tag}", "tenant_id": tenant, "user_id": users[1]})
    path = write_jsonl(tmp_path / "same.jsonl", lines)
    changes_topic = settings.topics.changes

    async def publish_and_settle(times: int) -> tuple[dict[str, Any], dict[str, Row]]:
        # --indexed: snapshot() compares LanceDB with Redis, so the sink must have written the new versions too
        args = ("publish", str(path), "--wait", "--indexed", "--timeout", str(WAIT_S), "--json")
        report = assert_ok(await run_cli(settings, *args), worker)
        # --wait cannot tell a replayed event (same version and id) from the first one: the change feed can,
        # since an exact replay of a memory's current event is re-announced there
        records = await read_topic(
            settings,
            changes_topic,
            lambda rs: all(event_ids_seen(rs)[e] >= times for e in winners.values()),
            timeout=WAIT_S,
        )
        seen = event_ids_seen(records)
        assert all(seen[e] >= times for e in winners.values()), {e: seen[e] for e in winners.values()}
        return report, await snapshot(settings, tenant)

    first_report, first = await publish_and_settle(1)
    second_report, second = await publish_and_settle(2)

    assert first_report["accepted"] == second_report["accepted"] == len(lines)
    assert first_report["materialized"] == second_report["materialized"] == 36 == len(first)
    assert second.keys() == first.keys()
    for memory_id, (text, content_hash, is_deleted, version, event_id) in first.items():
        again = second[memory_id]
        assert again[:3] == (text, content_hash, is_deleted), memory_id  # same text, content hash, liveness
        if memory_id in winners:  # replayed: the very same event stays
            assert (again[3], again[4]) == (version, event_id) and event_id == winners[memory_id], memory_id
        elif memory_id in versioned:
            assert again[3] == version, memory_id
        else:
            assert again[3] > version, memory_id  # re-stamped by the publisher, same content
    expected_live = 10 - 2 + 6 + 20 - 2
    assert sum(not row[2] for row in second.values()) == expected_live
    assert_consistent(await verify_stores(settings, ScopeQuery(tenant_id=tenant)), live=expected_live, tombstones=4)


async def test_cli_reports_bad_lines_and_publishes_the_good_ones(worker: WorkerProcess, tmp_path: Path) -> None:
    """Each invalid line is refused with its line number and reason (exit 1); the valid ones still land."""
    settings, tag = worker.settings, unique_tag()
    tenant, user = f"bad-{tag}", f"carl-{tag}"
    good = [memory_text(user, i, tag) for i in range(4)]
    suffix = f" k9z{tag}"
    longest = ("fits " * (MAX_TEXT_CHARS // 5))[: MAX_TEXT_CHARS - len(suffix)] + suffix
    assert len(longest) == MAX_TEXT_CHARS
    base = {"tenant_id": tenant, "user_id": user}
    lines: list[dict[str, Any] | str] = [
        {**base, "text": good[0]},  # 1
        {**base, "text": ""},  # 2
        {**base, "text": good[1]},  # 3
        {"tenant_id": tenant, "text": "nobody said who"},  # 4
        {**base, "text": "x", "op": "upsert"},  # 5
        '{"user_id": "dan", "text": "unterminated',  # 6
        {**base, "text": 42},  # 7
        {"tenant_id": tenant, "user_id": 7, "text": "a number is no user"},  # 8
        {**base, "text": "y" * (MAX_TEXT_CHARS + 1)},  # 9
        "",  # 10: blank lines are skipped, neither accepted nor rejected
        {**base, "text": good[2]},  # 11
        {**base, "op": "delete"},  # 12
        "[1, 2, 3]",  # 13
        {**base, "text": "what colour", "colour": "red"},  # 14
        {**base, "text": longest},  # 15: exactly the limit is fine
        {**base, "text": good[3], "metadata": "not an object"},  # 16
        {**base, "text": good[3]},  # 17
        {**base, "text": "   "},  # 18
    ]
    expected_rejections = {
        2: ("text", "'text' is empty"),
        4: ("user_id", "'user_id' is required"),
        5: ("op", "unknown op 'upsert'"),
        6: (None, "malformed JSON"),
        7: ("text", "'text' must be a string, got integer"),
        8: ("user_id", "'user_id' must be a string, got integer"),
        9: ("text", f"more than {MAX_TEXT_CHARS}"),
        12: ("memory_id", "'memory_id' is required for op 'delete'"),
        13: (None, "expected a JSON object, got list"),
        14: ("colour", "unknown field(s): colour"),
        16: ("metadata", "'metadata' must be an object, got string"),
        18: ("text", "'text' is empty"),
    }
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    args = ("publish", str(path), "--wait", "--indexed", "--timeout", str(WAIT_S), "--json")  # lance_rows below
    report = assert_ok(await run_cli(settings, *args), worker, rc=1)

    assert report["accepted"] == 5 and report["rejected"] == len(expected_rejections)
    got = {r["line"]: r for r in report["rejections"]}
    assert sorted(got) == sorted(expected_rejections)
    for line, (field, reason) in expected_rejections.items():
        assert got[line]["field"] == field, got[line]
        assert reason in got[line]["reason"], got[line]
    assert report["materialized"] == 5 and report["not_materialized"] == []

    async with MemoryReader(settings) as reader:
        for text in [*good, longest]:
            hits = await reader.search(text, user_id=user, tenant_id=tenant, k=1)
            assert hits and hits[0].row.text == text
    stored = await lance_rows(settings, f"tenant_id = '{tenant}'")
    assert sorted(r["text"] for r in stored) == sorted([*good, longest])


async def test_bad_records_on_the_topic_go_to_the_dead_letter_topic(worker: WorkerProcess) -> None:
    """Records that bypass the publisher's checks are dead-lettered with why, their bytes and where they were
    read, while the good events around them, on the same partitions, are materialized."""
    settings, tag = worker.settings, unique_tag()
    scope = Scope(f"dlq-{tag}", f"dora-{tag}", "planner")
    valid = make_event(f"d0-{tag}", 1, "template", scope, event_id=f"t-{tag}", op=Op.ADD).to_dict()
    empty_text = {**valid, "text": ""}
    missing = {k: v for k, v in valid.items() if k != "event_id"}
    bad: list[tuple[bytes | None, str | None, str]] = [  # value, field, reason
        (b'{"schema_version": 1, "op": "add", "memory_id"', None, "malformed JSON"),
        (orjson.dumps({**valid, "schema_version": 2}), "schema_version", "unknown schema_version 2"),
        (orjson.dumps(missing), "event_id", "'event_id' must be a string, got null"),
        (orjson.dumps(empty_text), "text", "'text' is empty"),
        (b"[1, 2, 3]", None, "expected a JSON object"),
        (None, None, "malformed JSON"),  # a null value (a Kafka tombstone)
    ]
    good = [
        make_event(f"d{i}-{tag}", 1, memory_text(scope.user_id, i, tag), scope, event_id=f"g{i}-{tag}", op=Op.ADD)
        for i in range(8)
    ]

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    sent: dict[tuple[int, int], tuple[bytes | None, bytes | None, str | None, str]] = {}  # (partition, offset)
    try:
        for i, event in enumerate(good):  # good and bad interleaved on both partitions
            await producer.send_and_wait(settings.topics.events, encode(event), key=event.key, partition=i % 2)
            if i < len(bad):
                value, field, reason = bad[i]
                key = f"bad{i}-{tag}".encode()
                meta = await producer.send_and_wait(settings.topics.events, value, key=key, partition=i % 2)
                sent[(meta.partition, meta.offset)] = (key, value, field, reason)
    finally:
        await producer.stop()

    stores = await Stores.open(settings)
    try:
        late = await wait_until_materialized(stores, good, timeout=WAIT_S)
    finally:
        await stores.close()
    assert late == [], f"not materialized: {[e.memory_id for e in late]}\n{worker.log_tail()}"

    def all_dead(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        found = {(d.source.partition, d.source.offset) for d in map(decode_dead_letter, (r.value for r in records))}
        return sent.keys() <= found

    records = await read_topic(settings, settings.topics.dlq, all_dead, timeout=WAIT_S)
    letters = {}
    for record in records:
        letter = decode_dead_letter(record.value)
        assert letter.source is not None and letter.source.topic == settings.topics.events
        letters[(letter.source.partition, letter.source.offset)] = letter
    assert letters.keys() == sent.keys(), "exactly the bad records are dead-lettered"
    for where, (key, value, field, reason) in sent.items():
        letter = letters[where]
        assert letter.value == (value or b""), where  # the original bytes (value_b64)
        assert letter.key == key and letter.field == field, letter
        assert reason in letter.reason, letter
        assert (letter.stage, letter.error_type, letter.schema_version) == ("decode", "SchemaError", SCHEMA_VERSION)

    # the counters: the processor counts dead letters, the dead-letter agent counts them by error type
    client = aioredis.from_url(settings.redis_url)
    try:

        async def counted() -> bool:
            figures = await read_stats(settings)
            by_type = await client.hget(f"{settings.redis_prefix}stats", "dlq_SchemaError")
            return figures["dead_lettered"] >= len(bad) and int(by_type or 0) >= len(bad)

        await wait_for(counted, timeout=15, what="the dead-letter counters")
    finally:
        await client.aclose()
    figures = assert_ok(await run_cli(settings, "stats", "--json"), worker)
    assert figures["dead_lettered"] == len(bad)  # only this test dead-letters on this worker
    assert figures["events_in"] >= len(bad) + len(good) and figures["materialized"] >= len(good)


async def test_out_of_order_and_duplicate_events_converge_on_the_newest(worker: WorkerProcess) -> None:
    """Versions 3, 1, 2 and 3 again: both stores end on version 3, whether 3 came in an earlier window (the
    stores' version guard refuses 1 and 2) or in the same one; the change feed announces version 3 only."""
    settings, tag = worker.settings, unique_tag()
    scope = Scope(f"ooo-{tag}", f"olga-{tag}", "replayer")
    topic = settings.topics.events

    def versions(memory_id: str) -> dict[int, MemoryEvent]:
        return {
            v: make_event(
                memory_id,
                v,
                memory_text(scope.user_id, v, tag, f"{memory_id} version{v}"),
                scope,
                event_id=f"{memory_id}-e{v}",
            )
            for v in (1, 2, 3)
        }

    early, together = f"early-{tag}", f"together-{tag}"
    a, b = versions(early), versions(together)
    before = await read_stats(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False)
    sentinels: list[MemoryEvent] = []

    async def settle(*events: MemoryEvent) -> dict[str, list[MemoryRow | None]]:
        """Send the events and then a sentinel, all on partition 0: once the sentinel is materialized, every
        event before it was processed. Then what both stores hold for the two memories."""
        n = len(sentinels)
        sentinel = make_event(f"sentinel{n}-{tag}", 1, f"sentinel k{n}z{tag}", scope, event_id=f"s{n}-{tag}")
        sentinels.append(sentinel)
        for event in (*events, sentinel):
            await producer.send(topic, encode(event), key=event.key, partition=0)
        await producer.flush()
        stores = await Stores.open(settings)
        try:
            late = await wait_until_materialized(stores, [sentinel], timeout=WAIT_S, indexed=True)
            assert late == [], worker.log_tail()
            keys = [memory_key(scope.tenant_id, m) for m in (early, together)]
            durable = {r.memory_id: r for r in await stores.vectors.get(keys)}
            cached = await stores.cache.get(keys)
        finally:
            await stores.close()
        return {m: [durable.get(m), hot] for m, hot in zip((early, together), cached, strict=True)}

    def assert_holds(state: dict[str, list[MemoryRow | None]], memory_id: str, want: MemoryEvent) -> None:
        for store, row in zip(("lancedb", "redis"), state[memory_id], strict=True):
            assert row is not None, f"{memory_id} missing in {store}"
            got = (row.version, row.event_id, row.text, row.deleted)
            assert got == (want.version, want.event_id, want.text, False), f"{store} holds {got} for {memory_id}"

    await producer.start()
    try:
        assert_holds(await settle(a[3]), early, a[3])
        # 1 and 2 after 3, in later windows than 3: the stores' version guards must refuse them
        state = await settle(a[1], a[2])
        assert_holds(state, early, a[3])
        assert state[together] == [None, None]
        # 3 again (an exact replay), and the other memory's 3, 1, 2, 3 in one burst
        state = await settle(a[3], b[3], b[1], b[2], b[3])
        assert_holds(state, early, a[3])
        assert_holds(state, together, b[3])
    finally:
        await producer.stop()

    async with MemoryReader(settings) as reader:
        for events in (a, b):
            got = await reader.get(events[3].memory_id, tenant_id=scope.tenant_id)
            assert got is not None and got.text == events[3].text and got.metadata == {"version": 3}
            hits = await reader.search(events[1].text or "", user_id=scope.user_id, tenant_id=scope.tenant_id, k=10)
            assert events[1].text not in {h.row.text for h in hits}

    records = await read_topic(
        settings, settings.topics.changes, lambda rs: bool(changes_of(rs, {sentinels[-1].memory_id})), timeout=WAIT_S
    )
    changes = changes_of(records, {early, together})
    assert {(c.memory_id, c.version) for c in changes} == {(early, 3), (together, 3)}, "only version 3 announced"
    early_changes = [c for c in changes if c.memory_id == early]
    assert len(early_changes) >= 2, "the replayed version 3 is announced again (at-least-once change feed)"
    for change in changes:
        want = a[3] if change.memory_id == early else b[3]
        assert (change.op, change.event_id, change.scope, change.stores) == (
            Op.UPDATE,
            want.event_id,
            scope,
            ("redis",),  # the live path writes Redis; LanceDB is the index sink's
        )
        assert change.source is not None and (change.source.topic, change.source.partition) == (topic, 0)

    async def stale_counted() -> bool:  # versions 1 and 2 of both memories were ignored as stale
        return (await read_stats(settings))["stale_ignored"] - before["stale_ignored"] >= 4

    await wait_for(stale_counted, timeout=15, what="stale_ignored to count versions 1 and 2")
    assert (await read_stats(settings))["replayed_current"] - before["replayed_current"] >= 1  # the replay of 3


async def test_faust_engine_materializes_too(faust_worker: WorkerProcess, tmp_path: Path) -> None:
    """MEMSTREAM_ENGINE=faust: the same processor behind a faust agent; `publish --wait` and verify agree."""
    settings, tag = faust_worker.settings, unique_tag()
    tenant = f"faust-{tag}"
    lines, final = fleet(tag, tenant, n=24, updates=6, deletes=(4, 8))
    live = {m: e for m, e in final.items() if e.live}
    path = write_jsonl(tmp_path / "small.jsonl", lines)
    args = ("publish", str(path), "--wait", "--indexed", "--timeout", str(WAIT_S), "--json")  # snapshot() reads LanceDB
    report = assert_ok(await run_cli(settings, *args), faust_worker)
    assert (len(lines), len(final), len(live)) == (39, 24, 20)
    assert report["accepted"] == len(lines) and report["materialized"] == len(final)
    assert report["not_materialized"] == []

    assert_consistent(
        await verify_stores(settings, ScopeQuery(tenant_id=tenant)), live=len(live), tombstones=len(final) - len(live)
    )
    assert await snapshot(settings, tenant)
    async with MemoryReader(settings) as reader:
        for memory_id, expected in live.items():
            hits = await reader.search(expected.text or "", user_id=expected.user, tenant_id=tenant, k=1)
            assert hits and hits[0].row.memory_id == memory_id and hits[0].row.text == expected.text
        for memory_id in final.keys() - live.keys():
            assert await reader.get(memory_id, tenant_id=tenant) is None
    log = faust_worker.log()
    assert "engine=faust" in log and f"batch engine consuming {faust_worker.settings.topics.events}" not in log


async def test_python_api_publish_then_read(worker: WorkerProcess) -> None:
    """MemoryPublisher add/update/delete, flush, wait_materialized; MemoryReader sees exactly that."""
    settings, tag = worker.settings, unique_tag()
    tenant, user, other = f"api-{tag}", f"alice-{tag}", f"bob-{tag}"
    texts = [memory_text(user, i, tag) for i in range(4)]
    async with MemoryPublisher(settings) as publisher:
        with pytest.raises(SchemaError, match="'text' is empty"):
            await publisher.add(user_id=user, text=" ", tenant_id=tenant)
        added = [
            await publisher.add(user_id=user, text=text, tenant_id=tenant, agent_id=AGENTS[i % 2], metadata={"n": i})
            for i, text in enumerate(texts)
        ]
        bob = await publisher.add(user_id=other, text=texts[0], tenant_id=tenant, agent_id=AGENTS[0])
        revised = memory_text(user, 0, tag, "now prefers")
        updated = await publisher.update(
            memory_id=added[0].memory_id, user_id=user, text=revised, tenant_id=tenant, agent_id=AGENTS[0]
        )
        removed = await publisher.delete(memory_id=added[1].memory_id, user_id=user, tenant_id=tenant)
        await publisher.flush()
        events = [*added, bob, updated, removed]
        late = await publisher.wait_materialized(events, timeout=WAIT_S)
    assert late == [], worker.log_tail()
    assert updated.version > added[0].version and removed.version > added[1].version
    assert bob.memory_id != added[0].memory_id  # same text, another user: another memory

    async with MemoryReader(settings) as reader:
        first = await reader.get(added[0].memory_id, tenant_id=tenant)
        assert first is not None and (first.text, first.version, first.metadata) == (revised, updated.version, {})
        assert await reader.get(added[1].memory_id, tenant_id=tenant) is None
        for event in (added[2], added[3], bob):
            got = await reader.get(event.memory_id, tenant_id=tenant)
            assert got is not None and got.text == event.text and got.scope == event.scope

        hits = await reader.search(revised, user_id=user, tenant_id=tenant, k=10)
        assert hits[0].row.memory_id == added[0].memory_id and hits[0].row.text == revised
        ids = {h.row.memory_id for h in hits}
        assert ids == {added[0].memory_id, added[2].memory_id, added[3].memory_id}  # the user's live memories
        chef = await reader.search(texts[3], user_id=user, agent_id=AGENTS[1], tenant_id=tenant, k=10)
        assert [h.row.memory_id for h in chef] == [added[3].memory_id]  # added[1] (the chef's too) is deleted
        theirs = await reader.search(texts[0], user_id=other, tenant_id=tenant, k=10)
        assert [h.row.memory_id for h in theirs] == [bob.memory_id]
        assert await reader.search(texts[0], user_id=f"nobody-{tag}", tenant_id=tenant, k=10) == []
