"""The read path for real (issue #5): caches that are never stale, stream-maintained context, HTTP round trips.

One worker (batch engine) for the module, the session broker and Redis, LanceDB on disk. Readers are kept open
across changes on purpose: their L1 and Redis L2 caches are warm when the data changes under them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from infra import services
from infra.api_keys import KeyStore, Role
from infra.read_cache import RedisReadCache, scope_field
from infra.redis_store import RedisCounters
from infra.settings import Settings
from processors.model import ScopeQuery, memory_key
from schemas.errors import SchemaError
from schemas.events import MemoryEvent, decode_dead_letter, decode_event
from streams.runtime.stores import Stores
from streams.surface.api import MemoryPublisher, MemoryReader
from streams.surface.contract import openapi_document
from tests.integration.helpers import (
    ServeProcess,
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

WAIT_S = 60


@pytest.fixture(scope="module")
def read_worker(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Settings]:
    """A worker for this module; tests use its settings (topics, Redis prefix, LanceDB) with their own users."""
    base = tmp_path_factory.mktemp("read-worker")
    settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    proc = WorkerProcess(settings, base / "worker.log").start()
    try:
        yield settings
    finally:
        proc.interrupt()
        code, _ = proc.wait_stopped()
        assert code == 0, proc.log_tail()
        assert "Traceback" not in proc.log(), proc.log_tail()


@pytest.fixture
async def reader(read_worker: Settings) -> AsyncIterator[MemoryReader]:
    async with MemoryReader(read_worker) as r:
        yield r


async def publish(settings: Settings, *bodies: dict[str, Any]) -> list[MemoryEvent]:
    """Publish and wait as `publish --wait --indexed` does: every event in both stores (or superseded)."""
    async with MemoryPublisher(settings) as pub:
        events = [await pub.publish_one(b) for b in bodies]
        await pub.flush()
        missing = await pub.wait_materialized(events, timeout=WAIT_S, indexed=True)
    assert not missing, missing
    return events


async def test_reads_are_fresh_after_publish_wait_with_warm_caches(read_worker: Settings, reader: MemoryReader) -> None:
    """add, update, delete: search, get and context never return what a warm cache held before the change."""
    settings = read_worker
    tenant, user = f"t{unique_tag()}", "ana"
    scope = {"tenant_id": tenant, "user_id": user, "agent_id": "chef"}
    lines = [{**scope, "memory_id": "m-city", "text": "Ana lives in Porto"}]
    cli = await run_cli(settings, "publish", str(write_jsonl(settings.home / "ana.jsonl", lines)), "--wait", "--json")
    assert cli.rc == 0 and cli.json()["materialized"] == 1, cli

    async def reads() -> tuple[list[str], str | None, list[str]]:
        hits = await reader.search("where does Ana live", tenant_id=tenant, user_id=user, k=5)
        row = await reader.get("m-city", tenant_id=tenant)
        block = await reader.context(tenant_id=tenant, user_id=user, agent_id="chef")
        return [h.row.text for h in hits], row.text if row else None, block_texts(block.text)

    for _ in range(4):  # the first reads fill the caches, the next ones are served by them
        assert await reads() == (["Ana lives in Porto"], "Ana lives in Porto", ["Ana lives in Porto"])
    await reader.reads.flush_counters()
    totals = reader.reads.totals
    assert totals["read_search_l1"] >= 2 and totals["read_context_l1"] >= 2 and totals["read_get_l1"] >= 1, totals

    await publish(settings, {**scope, "op": "update", "memory_id": "m-city", "text": "Ana moved to Lisbon"})
    assert await reads() == (["Ana moved to Lisbon"], "Ana moved to Lisbon", ["Ana moved to Lisbon"])

    await publish(settings, {**scope, "op": "delete", "memory_id": "m-city"})
    assert await reads() == ([], None, [])

    cli = await run_cli(settings, "stats", "--json")
    assert cli.rc == 0 and cli.json()["read_search_l1"] >= 2, cli


async def test_a_search_is_cached_the_second_time_a_process_misses_it(
    read_worker: Settings, reader: MemoryReader
) -> None:
    """A question asked once is not cached; missed a second time, it is kept in L1 and written to L2 (Redis),
    where another process finds it. One-off questions, most of an uncached load, cost the caches nothing."""
    tenant, user = f"t{unique_tag()}", "bo"
    await publish(read_worker, {"tenant_id": tenant, "user_id": user, "memory_id": "m1", "text": "Bo lives in Oslo"})
    question = {"tenant_id": tenant, "user_id": user, "k": 3}

    async def counts(r: MemoryReader) -> dict[str, int]:
        await r.reads.flush_counters()
        return {k: v for k, v in r.reads.totals.items() if k.startswith("read_search_") and v}

    assert [h.row.text for h in await reader.search("where does Bo live", **question)] == ["Bo lives in Oslo"]
    assert len(reader.reads.search_l1) == 0
    async with MemoryReader(read_worker) as other:
        await other.search("where does Bo live", **question)  # another process: nothing in L2 for it
        assert await counts(other) == {"read_search_miss": 1, "read_search_cache_deferred": 1}
    assert [h.row.text for h in await reader.search("where does Bo live", **question)] == ["Bo lives in Oslo"]
    assert await counts(reader) == {"read_search_miss": 2, "read_search_cache_deferred": 1}
    await reader.search("where does Bo live", **question)
    assert await counts(reader) == {"read_search_miss": 2, "read_search_cache_deferred": 1, "read_search_l1": 1}
    async with MemoryReader(read_worker) as third:
        assert [h.row.text for h in await third.search("where does Bo live", **question)] == ["Bo lives in Oslo"]
        assert await counts(third) == {"read_search_l2": 1}


def block_texts(block: str) -> list[str]:
    """The memory texts a context block lists (each line is ``- [YYYY-MM-DD] text``)."""
    return [line.split("] ", 1)[1] for line in block.splitlines() if line.startswith("- [")]


async def test_context_block_changes_when_and_only_when_its_scope_changes(
    read_worker: Settings, reader: MemoryReader
) -> None:
    settings = read_worker
    tenant = f"t{unique_tag()}"
    await publish(
        settings,
        {"tenant_id": tenant, "user_id": "bo", "agent_id": "a1", "memory_id": "bo-1", "text": "Bo likes tea"},
        {"tenant_id": tenant, "user_id": "bo", "agent_id": "a2", "memory_id": "bo-2", "text": "Bo plays chess"},
        {"tenant_id": tenant, "user_id": "cy", "memory_id": "cy-1", "text": "Cy is a nurse"},
    )
    scopes = {"bo/a1": ("bo", "a1"), "bo/a2": ("bo", "a2"), "bo": ("bo", None), "cy": ("cy", None)}
    before = {name: await reader.context(tenant_id=tenant, user_id=u, agent_id=a) for name, (u, a) in scopes.items()}
    assert "Bo likes tea" in before["bo/a1"].text and "Bo plays chess" not in before["bo/a1"].text
    assert "Bo likes tea" in before["bo"].text and "Bo plays chess" in before["bo"].text
    raw_before = {name: await raw_block(settings, tenant, u, a) for name, (u, a) in scopes.items()}

    await publish(settings, {"tenant_id": tenant, "user_id": "bo", "agent_id": "a1", "text": "Bo is allergic to nuts"})

    # the stream itself rebuilds the changed scopes' blocks (no read involved) ...
    async def rebuilt_by_stream() -> bool:
        changed = [("bo/a1", "a1"), ("bo", None)]
        return all([await raw_block(settings, tenant, "bo", a) != raw_before[name] for name, a in changed])

    await wait_for(rebuilt_by_stream, timeout=30, what="the worker to rebuild the changed scopes' blocks")

    # ... at the scope's current generation: the ingest path's write moves it, and so does the index sink when
    # LanceDB takes the rows out of the fresh tail; the worker rebuilds after both
    async def current(name: str) -> bool:
        stored = orjson.loads(await raw_block(settings, tenant, "bo", scopes[name][1]) or b"{}")
        return bool(stored.get("g") == await generation(settings, tenant, "bo", scopes[name][1]))

    for name in ("bo/a1", "bo"):
        await wait_for(lambda n=name: current(n), timeout=30, what=f"the block of {name} at its current generation")
        stored = orjson.loads(await raw_block(settings, tenant, "bo", scopes[name][1]) or b"{}")
        assert "Bo is allergic to nuts" in stored["v"]["text"], name
    # ... and a read gets it: changed where the scope changed
    after = {name: await reader.context(tenant_id=tenant, user_id=u, agent_id=a) for name, (u, a) in scopes.items()}
    assert "Bo is allergic to nuts" in after["bo/a1"].text and "Bo is allergic to nuts" in after["bo"].text
    assert after["bo/a1"] != before["bo/a1"] and after["bo"] != before["bo"]
    # and untouched (not even rebuilt: same bytes in Redis) where it did not
    for name in ("bo/a2", "cy"):
        assert after[name] == before[name], name
        assert await raw_block(settings, tenant, *scopes[name]) == raw_before[name], name


async def raw_block(settings: Settings, tenant: str, user: str, agent: str | None) -> bytes | None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        key = f"{settings.redis_prefix}c:{scope_field(tenant, user, agent)}:{settings.context_budget}"
        value: bytes | None = await client.get(key)
        return value
    finally:
        await client.aclose()


async def generation(settings: Settings, tenant: str, user: str, agent: str | None) -> str:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        token = await RedisReadCache(client, settings.redis_prefix, 0).token(scope_field(tenant, user, agent))
        assert token is not None
        return token.decode()
    finally:
        await client.aclose()


async def test_reads_fall_through_to_lancedb_when_redis_lacks_keys_or_is_down(read_worker: Settings) -> None:
    settings = read_worker
    tenant = f"t{unique_tag()}"
    [event] = await publish(settings, {"tenant_id": tenant, "user_id": "di", "text": "Di speaks Welsh"})
    stores = await Stores.open(settings)
    try:
        await stores.redis.delete(
            stores.cache.memory_key(memory_key(tenant, event.memory_id))
        )  # evicted, or Redis restarted empty
        async with MemoryReader(settings) as reader:
            row = await reader.get(event.memory_id, tenant_id=tenant)
            assert row is not None and row.text == "Di speaks Welsh"
        [refilled] = await stores.cache.get([memory_key(tenant, event.memory_id)])
        assert refilled is not None and refilled.order() == event.order()  # refilled by compare-and-set
    finally:
        await stores.close()

    down = settings.with_(redis_url=f"redis://127.0.0.1:{services.free_port()}/0")  # nothing listens there
    async with MemoryReader(down) as reader:
        row = await reader.get(event.memory_id, tenant_id=tenant)
        hits = await reader.search("Di speaks Welsh", tenant_id=tenant, user_id="di", k=3)
        block = await reader.context(tenant_id=tenant, user_id="di")
        await reader.reads.flush_counters()
        assert reader.reads.totals["read_redis_fallbacks"] == 3
    assert row is not None and row.text == "Di speaks Welsh"
    assert [h.row.memory_id for h in hits] == [event.memory_id]
    assert "Di speaks Welsh" in block.text


async def test_search_filters_threshold_and_hybrid(read_worker: Settings, reader: MemoryReader) -> None:
    settings = read_worker
    tenant, user = f"t{unique_tag()}", "ed"
    base = {"tenant_id": tenant, "user_id": user}
    await publish(
        settings,
        {**base, "memory_id": "ed-1", "text": "Ed had sushi for lunch", "metadata": {"topic": "food", "year": 2019}},
        {**base, "memory_id": "ed-2", "text": "Ed had ramen for dinner", "metadata": {"topic": "food", "year": 2023}},
        {**base, "memory_id": "ed-3", "text": "Ed met Zbigniew at the gym", "metadata": {"topic": "people"}},
        {**base, "memory_id": "ed-4", "text": "Ed had pizza with friends", "metadata": {"topic": "food", "year": 2024}},
    )
    scope = {"tenant_id": tenant, "user_id": user}
    food = await reader.search("what did Ed eat", **scope, k=10, filters={"topic": "food"})
    assert {h.row.memory_id for h in food} == {"ed-1", "ed-2", "ed-4"}
    recent = await reader.search("what did Ed eat", **scope, k=10, filters={"year": {"gte": 2023, "lt": 2024}})
    assert [h.row.memory_id for h in recent] == ["ed-2"]
    some = await reader.search("what did Ed eat", **scope, k=10, filters={"topic": {"in": ["people"]}})
    assert [h.row.memory_id for h in some] == ["ed-3"]
    best = await reader.search("Ed had ramen for dinner", **scope, k=10, min_score=0.99)
    assert [h.row.memory_id for h in best] == ["ed-2"]
    hybrid = await reader.search("Zbigniew", **scope, k=2, mode="hybrid")
    assert hybrid[0].row.memory_id == "ed-3"


# ------------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
def server(read_worker: Settings) -> Iterator[str]:
    """``memstream serve`` as a child process on a free port; stopped with SIGINT, must exit 0."""
    server = ServeProcess(read_worker, read_worker.home / f"serve-{unique_tag()}.log").start()
    try:
        yield server.url
    finally:
        server.interrupt()
        code = server.wait_stopped()
        assert code == 0, server.log_text()


async def test_http_round_trip_ingest_then_search(read_worker: Settings, server: str) -> None:
    tenant = f"t{unique_tag()}"
    events = [
        {"tenant_id": tenant, "user_id": "flo", "agent_id": "coach", "text": "Flo runs 10k every Sunday"},
        {"tenant_id": tenant, "text": "no user"},
        {"tenant_id": tenant, "user_id": "flo", "text": "Flo's birthday is 12 May", "metadata": {"importance": 1}},
    ]
    _, key = KeyStore(read_worker.keys_path).create(tenant, Role.ADMIN)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post(f"{server}/v1/events?wait=60", json=events) as response:
            ingest = await response.json()
            assert response.status == 200, ingest
        assert [a["index"] for a in ingest["accepted"]] == [0, 2] and ingest["not_materialized"] == []
        assert [r["index"] for r in ingest["rejected"]] == [1] and "user_id" in ingest["rejected"][0]["reason"]
        first_id = ingest["accepted"][0]["memory_id"]

        query = {"query": "Flo runs 10k every Sunday", "tenant_id": tenant, "user_id": "flo", "k": 2}
        async with http.post(f"{server}/v1/search", json=query) as response:
            hits = (await response.json())["hits"]
            assert response.status == 200
        assert hits[0]["memory_id"] == first_id and hits[0]["text"] == events[0]["text"]
        async with http.post(f"{server}/v1/search", json={**query, "k": 0}) as response:
            assert response.status == 400 and (await response.json())["field"] == "k"

        async with http.get(f"{server}/v1/memories/{first_id}", params={"tenant_id": tenant}) as response:
            assert response.status == 200 and (await response.json())["agent_id"] == "coach"
        async with http.get(f"{server}/v1/memories/nope") as response:
            assert response.status == 404
        params = {"tenant_id": tenant, "user_id": "flo", "format": "text"}
        async with http.get(f"{server}/v1/context", params=params) as response:
            text = await response.text()
        assert text.startswith("## Memories\n") and text.count("\n- [") == 2, text

        async with http.get(f"{server}/readyz") as response:
            ready = await response.json()
            assert response.status == 200 and ready["ready"], ready
        async with http.get(f"{server}/metrics") as response:
            metrics = await response.text()
        assert 'memstream_http_requests_total{route="/v1/search",status="200"} 1' in metrics
        assert 'memstream_reads_total{kind="search",layer="miss"} 1' in metrics
        assert re.search(r"^memstream_fresh_tail_memories \d+$", metrics, re.M), metrics  # what the sink has left
        async with http.get(f"{server}/openapi.json") as response:
            document = await response.json()
    assert document == openapi_document()
    assert set(document["paths"]) >= {"/v1/events", "/v1/search", "/v1/context", "/metrics"}


async def test_http_integers_are_json_schemas_integers(read_worker: Settings, server: str) -> None:
    """440.0 is an integer to JSON Schema, so to the contract and to every route (issue 24): k=440.0 searched (it
    was a 503 from LanceDB's limit), version 332.0 accepted as 332 (it was a 400); 440.5, true and a k over the
    contract's maximum are 400s naming the member."""
    tenant = f"t{unique_tag()}"
    _, key = KeyStore(read_worker.keys_path).create(tenant, Role.ADMIN)
    text = "Ivy keeps bees on the roof"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        event = b'{"user_id": "ivy", "text": "%s", "version": 332.0}' % text.encode()
        async with http.post(f"{server}/v1/events?wait=60", data=event) as response:
            ingest = await response.json()
            assert response.status == 200, ingest
        assert ingest["rejected"] == [] and ingest["not_materialized"] == [], ingest
        assert ingest["accepted"][0]["version"] == 332 and b'"version":332,' in orjson.dumps(ingest["accepted"][0])

        search = b'{"query": "%s", "user_id": "ivy", "k": 440.0}' % text.encode()
        async with http.post(f"{server}/v1/search", data=search) as response:
            answer = await response.json()
            assert response.status == 200, answer
        assert [(h["text"], h["version"]) for h in answer["hits"]] == [(text, 332)]

        refused = [
            ("/v1/search", {"query": text, "user_id": "ivy", "k": 440.5}, "k"),
            ("/v1/search", {"query": text, "user_id": "ivy", "k": 5000}, "k"),
            ("/v1/search", {"query": text, "user_id": "ivy", "k": 1e4}, "k"),
            ("/v1/search", {"query": text, "user_id": "ivy", "k": True}, "k"),
            ("/v1/events", {"user_id": "ivy", "text": "x", "version": 332.5}, "version"),
            ("/v1/events", {"user_id": "ivy", "text": "x", "version": True}, "version"),
        ]
        for path, body, field in refused:
            async with http.post(f"{server}{path}", json=body) as response:
                problem = await response.json()
                assert (response.status, problem["field"]) == (400, field), (body, problem)

        async with http.get(f"{server}/v1/context", params={"user_id": "ivy", "budget": "440.0"}) as response:
            block = await response.json()
            assert response.status == 200 and block["memory_ids"], block


async def test_warmup_refills_redis_from_lancedb(read_worker: Settings) -> None:
    settings = read_worker
    tenant = f"t{unique_tag()}"
    [event] = await publish(settings, {"tenant_id": tenant, "user_id": "gus", "text": "Gus keeps bees"})
    stores = await Stores.open(settings)
    try:
        await stores.redis.delete(stores.cache.memory_key(memory_key(tenant, event.memory_id)))
        cli = await run_cli(settings, "warmup", "--scopes", "100000", "--json")
        assert cli.rc == 0 and cli.json()["memories_refilled"] >= 1, cli
        [row] = await stores.cache.get([memory_key(tenant, event.memory_id)])
        assert row is not None and row.order() == event.order()
        durable = await stores.vectors.scope_rows(ScopeQuery(tenant_id=tenant, user_id="gus"))
        assert [r.memory_id for r in durable] == [event.memory_id]
    finally:
        await stores.close()


# --------------------------------------------------------------------------------------------- tenancy (issue #14)


async def test_tenants_are_walls_for_events_and_reads(read_worker: Settings, reader: MemoryReader) -> None:
    """Two tenants with the same memory id and user: each event changes only its own tenant's memory, an event
    naming another user of the tenant is dead-lettered with its reason and counted, and no read crosses over."""
    settings = read_worker
    tag = unique_tag()
    t1, t2 = f"a{tag}", f"b{tag}"
    shared = {"user_id": "ann", "memory_id": "shared"}
    await publish(
        settings,
        {**shared, "tenant_id": t1, "text": "Ann of the first tenant likes tea"},
        {**shared, "tenant_id": t2, "text": "Ann of the second tenant likes coffee"},
        {"tenant_id": t1, "user_id": "bob", "memory_id": "bobs", "text": "Bob keeps bees"},
    )
    # the second tenant updates, then deletes, its own "shared": the first tenant's is another memory
    await publish(settings, {**shared, "tenant_id": t2, "op": "update", "text": "Ann of the second drinks water"})
    await publish(settings, {**shared, "tenant_id": t2, "op": "delete"})
    # inside the first tenant, another user's update and delete of Ann's memory are refused
    async with MemoryPublisher(settings) as pub:
        foreign = {"tenant_id": t1, "user_id": "mallory", "memory_id": "shared"}
        refused = [
            await pub.publish_one({**foreign, "op": "update", "text": "mallory was here"}),
            await pub.publish_one({**foreign, "op": "delete"}),
        ]
        await pub.flush()
        # the newest of them, at once: the memory belongs to another user, so it will never be materialized
        assert await pub.wait_materialized(refused, timeout=WAIT_S) == refused[1:]

    def ours(records: list[Any]) -> list[Any]:
        letters = [decode_dead_letter(r.value) for r in records]
        return [d for d in letters if d.error_type == "ScopeMismatchError" and f"'{t1}'" in d.reason]

    letters = ours(await read_topic(settings, f"{settings.topic_prefix}dlq", lambda rs: len(ours(rs)) == 2))
    assert [decode_event(d.value).event_id for d in letters] == [e.event_id for e in refused]
    assert all(
        d.field == "user_id" and "belongs to user 'ann', the event names user 'mallory'" in d.reason for d in letters
    )

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        counters = RedisCounters(client, settings.redis_prefix)
        await wait_for(lambda: _counted(counters), timeout=WAIT_S, what="scope_mismatch counted")
    finally:
        await client.aclose()

    rows = await lance_rows(settings, f"tenant_id IN ('{t1}', '{t2}')")
    held = {(r["tenant_id"], r["memory_id"]): (r["user_id"], r["text"], r["deleted"]) for r in rows}
    assert len(rows) == 3 and held == {
        (t1, "shared"): ("ann", "Ann of the first tenant likes tea", False),
        (t2, "shared"): ("ann", "", True),
        (t1, "bobs"): ("bob", "Bob keeps bees", False),
    }

    # reads: each tenant sees only its own memories, whatever the id or the user
    first = await reader.get("shared", tenant_id=t1)
    assert first is not None and first.text == "Ann of the first tenant likes tea"
    assert await reader.get("shared", tenant_id=t2) is None and await reader.get("bobs", tenant_id=t2) is None
    for tenant, user in ((t1, "ann"), (t2, "ann"), (t2, "bob")):
        hits = await reader.search("Ann likes tea or coffee, Bob keeps bees", tenant_id=tenant, user_id=user, k=10)
        assert {(h.row.scope.tenant_id, h.row.scope.user_id) for h in hits} <= {(tenant, user)}
    assert await reader.search("Ann likes tea", tenant_id=t2, user_id="ann", k=10) == []
    whole = await reader.search("who likes what", tenant_id=t1, whole_tenant=True, k=10)
    assert sorted(h.row.memory_id for h in whole) == ["bobs", "shared"] and {h.row.scope.tenant_id for h in whole} == {
        t1
    }
    assert (await reader.context(tenant_id=t2, user_id="ann")).memory_ids == ()
    assert (await reader.context(tenant_id=t1, user_id="ann")).memory_ids == ("shared",)

    # null, empty or missing scope values: a clear error naming the field
    for call, field in (
        (reader.search("q", tenant_id=None, user_id="ann"), "tenant_id"),  # type: ignore[arg-type]
        (reader.search("q", tenant_id=t1, user_id=""), "user_id"),
        (reader.search("q", tenant_id=t1), "user_id"),
        (reader.get("shared", tenant_id=""), "tenant_id"),
        (reader.context(tenant_id=t1, user_id=""), "user_id"),
    ):
        with pytest.raises(SchemaError) as refused_read:
            await call
        assert refused_read.value.field == field


async def _counted(counters: RedisCounters) -> bool:
    return (await counters.read()).get("scope_mismatch", 0) >= 2
