"""``import memstream`` (issue 25) against the real stack: a worker and `memstream serve` with API keys.

The Mem0-shaped round trip (add, search, get_all page by page, update, delete, delete_all) runs twice, in process
(``AsyncMemory(settings)``) and over HTTP (``AsyncMemory(url=..., api_key=...)``), and must give the same
answers. Then the tenant walls on every new route, and the README's "Use it from an agent" snippets, run as a
user runs them (``Memory.from_env()`` in a fresh interpreter).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest

from infra.api_keys import Role
from infra.settings import Settings
from memstream import AsyncMemory, Memory, NotFoundError, SchemaError
from processors.model import MemoryRow, ScopeQuery
from schemas.events import Scope
from tests.integration.helpers import (
    REPO,
    ServeProcess,
    WorkerProcess,
    make_settings,
    process_env,
    two_tenants_with_keys,
    unique_tag,
    wait_for,
)

pytestmark = pytest.mark.slow

WAIT_S = 60


@dataclass
class Stack:
    settings: Settings
    url: str
    tenants: tuple[str, str]
    keys: dict[tuple[str, Role], str]

    def auth(self, tenant: str, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[(tenant, role)]}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("memapi")
    settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    tenants, keys = two_tenants_with_keys(settings, "m")
    worker = WorkerProcess(settings, base / "worker.log").start()
    server = ServeProcess(settings, base / "serve.log").start()
    try:
        yield Stack(settings, server.url, tenants, keys)
    finally:
        server.interrupt()
        worker.interrupt()
        server_code = server.wait_stopped()
        worker_code, _ = worker.wait_stopped()
    assert server_code == 0, server.log_text()
    assert "Traceback" not in server.log_text(), server.log_text()[-5000:]
    assert worker_code == 0, worker.log_tail()


@pytest.fixture(params=["direct", "http"])
async def memory(request: pytest.FixtureRequest, stack: Stack) -> AsyncIterator[AsyncMemory]:
    """Tenant 0's memory, in process or through `memstream serve` with its write key."""
    tenant = stack.tenants[0]
    if request.param == "direct":
        m = AsyncMemory(stack.settings, tenant_id=tenant)
    else:
        m = AsyncMemory(url=stack.url, api_key=stack.keys[(tenant, Role.WRITE)])
    async with m:
        yield m


def _ids(results: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in results]


async def test_the_mem0_round_trip(memory: AsyncMemory) -> None:
    user = f"u{unique_tag()}"  # each mode its own user: the two runs share the stack
    added = await memory.add(
        "Alice is vegetarian", user_id=user, agent_id="chef", metadata={"topic": "food"}, wait=WAIT_S
    )
    assert set(added) == {"id", "event_id", "status"} and added["status"] == "searchable", added
    said = await memory.add(
        [{"role": "user", "content": "I moved to Lisbon"}, {"role": "assistant", "content": "Noted: Lisbon"}],
        user_id=user,
        wait=WAIT_S,
    )
    assert [(r["event"], r["status"]) for r in said["results"]] == [("ADD", "searchable")] * 2, said
    many = await memory.add_many(
        [{"text": f"fact number {i}", "user_id": user, "run_id": "r1"} for i in range(5)], wait=WAIT_S
    )
    assert {r["status"] for r in many["results"]} == {"searchable"}, many
    everything = {added["id"], *_ids(said["results"]), *_ids(many["results"])}
    assert len(everything) == 8

    found = await memory.search("Alice is vegetarian", user_id=user, top_k=3)
    top = found["results"][0]
    assert top["id"] == added["id"] and top["memory"] == "Alice is vegetarian", found
    assert top["metadata"] == {"topic": "food"} and (top["user_id"], top["agent_id"]) == (user, "chef")
    assert top["created_at"] == top["updated_at"] and top["updated_at"].endswith("Z") and top["score"] > 0.99
    assert top["expires_at"] is None
    created = top["created_at"]
    only_chef = await memory.search("Lisbon", user_id=user, agent_id="chef", top_k=10)
    assert _ids(only_chef["results"]) == [added["id"]]
    role = await memory.get(said["results"][1]["id"])
    assert role is not None and role["metadata"] == {"role": "assistant"}

    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await memory.get_all(user_id=user, limit=3, cursor=cursor)
        pages.append(_ids(page["results"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    listed = [i for p in pages for i in p]
    assert [len(p) for p in pages] == [3, 3, 2] and listed == sorted(everything), pages
    in_run = await memory.get_all(user_id=user, run_id="r1", filters={"memory_id": {"ne": many["results"][0]["id"]}})
    assert sorted(_ids(in_run["results"])) == sorted(_ids(many["results"][1:]))

    changed = await memory.update(added["id"], text="Alice is vegan", wait=WAIT_S)
    assert changed["status"] == "searchable", changed
    now = await memory.get(added["id"])
    assert now is not None and now["memory"] == "Alice is vegan"
    assert (now["metadata"], now["agent_id"]) == ({"topic": "food"}, "chef")  # what the update left out stays
    assert now["created_at"] == created and now["updated_at"] > created  # created_at stays, updated_at moves
    await memory.update(added["id"], metadata={"topic": "diet"}, wait=WAIT_S)
    now = await memory.get(added["id"])
    assert now is not None and (now["memory"], now["metadata"]) == ("Alice is vegan", {"topic": "diet"})

    gone = await memory.delete(added["id"], wait=WAIT_S)
    assert gone["status"] == "searchable", gone
    assert await memory.get(added["id"]) is None
    assert added["id"] not in _ids((await memory.get_all(user_id=user))["results"])
    with pytest.raises(NotFoundError):
        await memory.update(added["id"], text="back again")

    cleared = await memory.delete_all(user_id=user, wait=WAIT_S)
    assert sorted(_ids(cleared["results"])) == sorted(everything - {added["id"]})
    assert {r["status"] for r in cleared["results"]} == {"searchable"}
    assert (await memory.get_all(user_id=user)) == {"results": [], "next_cursor": None}
    assert (await memory.search("Lisbon", user_id=user))["results"] == []


async def test_bad_input_is_a_value_error_naming_the_field_in_both_modes(memory: AsyncMemory) -> None:
    cases: list[tuple[Any, str]] = [
        (memory.add("x", user_id=""), "user_id"),
        (memory.add("   ", user_id="alice"), "text"),
        (memory.add([{"role": "user"}], user_id="alice"), "messages"),
        (memory.add("x", user_id="alice", agent_id="bad id"), "agent_id"),
        (memory.search("q", user_id="alice", top_k=0), "top_k"),
        (memory.search("q", user_id="alice", mode="fuzzy"), "mode"),
        (memory.get_all(user_id="alice", limit=5_000), "limit"),
        (memory.get_all(user_id="alice", filters={"n": {"between": 1}}), "filters"),
        (memory.update("some-id"), "text"),
        (memory.add("x", user_id="alice", expires_at="next week"), "expires_at"),
        (memory.update("some-id", expires_at=-1), "expires_at"),
        (memory.delete("no/slash"), "memory_id"),
    ]
    for call, field in cases:
        with pytest.raises(SchemaError) as refused:
            await call
        assert isinstance(refused.value, ValueError) and refused.value.field == field, (field, refused.value)
    with pytest.raises(NotFoundError):
        await memory.delete(f"never-{unique_tag()}")
    assert await memory.get(f"never-{unique_tag()}") is None


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, json=body) as response:
        return response.status, await response.json()


async def test_tenant_walls_on_every_new_route(stack: Stack) -> None:
    a, b = stack.tenants
    user = f"w{unique_tag()}"
    async with AsyncMemory(url=stack.url, api_key=stack.keys[(a, Role.WRITE)]) as mine:
        kept = await mine.add("Alice keeps a secret garden", user_id=user, memory_id=f"g{unique_tag()}", wait=WAIT_S)
        assert kept["status"] == "searchable"
    memory_id = kept["id"]
    b_write, b_read, a_read = stack.auth(b, Role.WRITE), stack.auth(b, Role.READ), stack.auth(a, Role.READ)
    url = stack.url
    batch = {
        "operations": [
            {"op": "update", "memory_id": memory_id, "text": "taken"},
            {"op": "delete", "memory_id": memory_id},
        ]
    }
    async with aiohttp.ClientSession() as http:
        # The other tenant's key: the memory does not exist for it, whatever the route.
        status, body = await _call(http, "GET", f"{url}/v1/memories?user_id={user}", b_read)
        assert (status, body) == (200, {"results": [], "next_cursor": None})
        for method, path, payload in [
            ("GET", f"/v1/memories/{memory_id}", None),
            ("PATCH", f"/v1/memories/{memory_id}?wait=5", {"text": "taken"}),
            ("DELETE", f"/v1/memories/{memory_id}?wait=5", None),
        ]:
            status, body = await _call(http, method, f"{url}{path}", b_write, payload)
            assert status == 404 and body["field"] == "memory_id", (method, path, body)
        status, body = await _call(http, "POST", f"{url}/v1/memories/batch?wait=5", b_write, batch)
        assert status == 200 and [r["status"] for r in body["results"]] == ["not_found", "not_found"], body
        status, body = await _call(http, "DELETE", f"{url}/v1/memories?user_id={user}&wait=5", b_write)
        assert (status, body) == (200, {"results": []})
        # Naming the other tenant is refused outright; a read key may not write.
        for method, path in [
            ("GET", f"/v1/memories?user_id={user}&tenant_id={a}"),
            ("PATCH", f"/v1/memories/{memory_id}?tenant_id={a}"),
            ("DELETE", f"/v1/memories/{memory_id}?tenant_id={a}"),
            ("DELETE", f"/v1/memories?user_id={user}&tenant_id={a}"),
            ("POST", f"/v1/memories/batch?tenant_id={a}"),
        ]:
            payload = {"text": "taken"} if method == "PATCH" else batch if method == "POST" else None
            status, body = await _call(http, method, f"{url}{path}", b_write, payload)
            assert status == 403 and body["field"] == "tenant_id", (method, path, body)
        for method, path, payload in [
            ("PATCH", f"/v1/memories/{memory_id}", {"text": "taken"}),
            ("DELETE", f"/v1/memories/{memory_id}", None),
            ("DELETE", f"/v1/memories?user_id={user}", None),
            ("POST", "/v1/memories/batch", batch),
        ]:
            status, body = await _call(http, method, f"{url}{path}", a_read, payload)
            assert status == 403 and "needs write" in body["error"], (method, path, body)
        status, body = await _call(http, "DELETE", f"{url}/v1/memories", b_write)  # never a whole tenant
        assert status == 400 and body["field"] == "user_id", body
        # Tenant 0 still has its memory, unchanged, and lists it.
        status, body = await _call(http, "GET", f"{url}/v1/memories?user_id={user}", a_read)
        assert status == 200 and [(m["id"], m["memory"]) for m in body["results"]] == [
            (memory_id, "Alice keeps a secret garden")
        ], body
    direct_b = AsyncMemory(stack.settings, tenant_id=b)
    async with direct_b:  # in process too: tenant_id is the wall
        assert await direct_b.get(memory_id) is None
        with pytest.raises(NotFoundError):
            await direct_b.delete(memory_id)


async def test_history_answers_alike_in_both_modes_and_stays_behind_the_tenant_wall(stack: Stack) -> None:
    a, b = stack.tenants
    memory_id = f"h{unique_tag()}"
    async with AsyncMemory(url=stack.url, api_key=stack.keys[(a, Role.WRITE)]) as over_http:
        await over_http.add("Bob drinks coffee", user_id="bob", memory_id=memory_id, wait=WAIT_S)
        await over_http.update(memory_id, text="Bob drinks decaf", wait=WAIT_S)

        async def two_versions() -> list[dict[str, Any]] | None:  # the sink keeps them a moment after searchable
            versions = await over_http.history(memory_id)
            return versions if len(versions) == 2 else None

        history = await wait_for(two_versions, timeout=WAIT_S, what="two versions in the history")
    assert [(h["event"], h["memory"], h["previous_memory"]) for h in history] == [
        ("ADD", "Bob drinks coffee", None),
        ("UPDATE", "Bob drinks decaf", "Bob drinks coffee"),
    ]
    async with AsyncMemory(stack.settings, tenant_id=a) as direct:
        assert await direct.history(memory_id) == history
    async with AsyncMemory(stack.settings, tenant_id=b) as direct_b:
        assert await direct_b.history(memory_id) == []
    path = f"{stack.url}/v1/memories/{memory_id}/history"
    async with aiohttp.ClientSession() as http:
        status, body = await _call(http, "GET", path, stack.auth(a, Role.READ))  # a read key is enough
        assert (status, body) == (200, {"results": history})
        status, missing = await _call(
            http, "GET", f"{stack.url}/v1/memories/never{unique_tag()}/history", stack.auth(a, Role.READ)
        )
        status_b, body_b = await _call(http, "GET", path, stack.auth(b, Role.READ))  # as a missing one answers
        assert status == status_b == 404 and body_b == missing and body_b["field"] == "memory_id", (missing, body_b)
        status, body = await _call(http, "GET", f"{path}?tenant_id={a}", stack.auth(b, Role.READ))
        assert status == 403 and body["field"] == "tenant_id", body
        status, body = await _call(http, "GET", f"{stack.url}/v1/memories/bad%20id/history", stack.auth(a, Role.READ))
        assert status == 400 and body["field"] == "memory_id", body


async def test_a_memory_from_past_the_year_9999_is_listed_in_context_and_in_history(stack: Stack) -> None:
    """An event's ts is any integer up to 2^53-1 ms. A memory with one past the year 9999 answered 500 on the reads
    that show times (schemathesis' stateful run found it on the history): now its time is shown in ISO 8601's
    expanded form."""
    a, _ = stack.tenants
    user, memory_id = f"y{unique_tag()}", f"y{unique_tag()}"
    shown = "+287396-10-12T08:59:00.991Z"
    event = {"user_id": user, "memory_id": memory_id, "text": "far future", "ts": 2**53 - 1}
    async with aiohttp.ClientSession() as http:
        status, body = await _call(
            http, "POST", f"{stack.url}/v1/events?wait={WAIT_S}", stack.auth(a, Role.WRITE), event
        )
        assert status == 200 and body["not_materialized"] == [], body
        status, page = await _call(http, "GET", f"{stack.url}/v1/memories?user_id={user}", stack.auth(a, Role.READ))
        assert status == 200 and [m["updated_at"] for m in page["results"]] == [shown], page
        status, context = await _call(http, "GET", f"{stack.url}/v1/context?user_id={user}", stack.auth(a, Role.READ))
        assert status == 200 and "- [+287396-10-12] far future" in context["text"].splitlines(), context

        async def kept() -> list[dict[str, Any]] | None:  # the sink keeps it a moment after it is searchable
            status, body = await _call(
                http, "GET", f"{stack.url}/v1/memories/{memory_id}/history", stack.auth(a, Role.READ)
            )
            assert status in (200, 404), body
            return body["results"] if status == 200 else None

        history = await wait_for(kept, timeout=WAIT_S, what="the version in the history")
    assert [(h["event"], h["created_at"]) for h in history] == [("ADD", shown)]


async def test_a_memory_named_batch_is_changed_through_the_batch_route_over_http(stack: Stack) -> None:
    """/v1/memories/batch is the batch route, so the client changes a memory of that name through it."""
    user = f"b{unique_tag()}"
    async with AsyncMemory(url=stack.url, api_key=stack.keys[(stack.tenants[1], Role.WRITE)]) as m:
        await m.add("named batch", user_id=user, memory_id="batch", wait=WAIT_S)
        assert (await m.update("batch", text="still batch", wait=WAIT_S))["status"] == "searchable"
        assert [i["memory"] for i in (await m.get_all(user_id=user))["results"]] == ["still batch"]
        with pytest.raises(SchemaError) as refused:
            await m.get("batch")
        assert refused.value.field == "memory_id"
        await m.delete("batch", wait=WAIT_S)
        assert (await m.get_all(user_id=user))["results"] == []


def _snippets() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it from an agent", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]  # the LangGraph and MCP subsections have tests of their own
    return re.findall(r"```python\n(.*?)```", section, re.S)


async def test_the_readme_snippets_run(stack: Stack) -> None:
    """Both snippets, as a user runs them: a fresh interpreter, settings from MEMSTREAM_* (the stack's)."""
    snippets = _snippets()
    assert len(snippets) == 2 and "Memory.from_env()" in snippets[0] and "AsyncMemory.from_env()" in snippets[1]
    for code in snippets:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            env=process_env(stack.settings),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode(errors="replace")[-4000:]


def test_the_sync_memory_over_http_matches(stack: Stack) -> None:
    """``Memory`` runs its own loop in a thread: usable from plain (non-async) code."""
    user = f"s{unique_tag()}"
    with Memory(url=stack.url, api_key=stack.keys[(stack.tenants[1], Role.WRITE)]) as m:
        added = m.add("Carol collects stamps", user_id=user, wait=WAIT_S)
        assert m.search("stamps", user_id=user, top_k=1)["results"][0]["id"] == added["id"]
        with pytest.raises(SchemaError) as refused:
            m.get_all(user_id=user, limit=0)
        assert refused.value.field == "limit"
        m.delete_all(user_id=user, wait=WAIT_S)
        assert m.get_all(user_id=user)["results"] == []


async def test_listing_merges_lancedb_with_the_fresh_tail(settings: Settings) -> None:
    """LanceDB holds n0..n6; the fresh tail (Redis, as the ingest path leaves it before the sink runs) holds a newer
    n2, a tombstone of n4, n5 moved to another agent and a new n7. Written straight into the real stores (no
    worker, so no sink can race the read): the pages show the newest versions, hide n4, leave n5 out of the old
    agent's listing, and hold every other memory once, in id order, whatever the page size."""
    from streams.runtime.reading import ListRequest, ReadService
    from streams.runtime.stores import Stores

    stores = await Stores.open(settings)
    reads = ReadService(stores)
    try:
        dim = stores.embedder.dim

        def row(memory_id: str, version: int, agent: str = "chef", *, deleted: bool = False) -> MemoryRow:
            vector = b"" if deleted else np.full(dim, version, dtype="<f4").tobytes()
            text = f"{memory_id} v{version}"
            scope = Scope("t1", "alice", agent)
            return MemoryRow(memory_id, scope, text, {}, version, f"e{version}", "h", deleted, version, vector)

        await stores.vectors.upsert([row(f"n{i}", 1) for i in range(7)])
        tail = [row("n2", 2), row("n4", 2, deleted=True), row("n5", 2, "coach"), row("n7", 1)]
        await stores.cache.apply(tail, pending=True)
        assert {r.memory_id for r in await stores.cache.pending_rows(ScopeQuery("t1", "alice"))} == {
            "n2",
            "n4",
            "n5",
            "n7",
        }
        expected = {
            None: ["n0 v1", "n1 v1", "n2 v2", "n3 v1", "n5 v2", "n6 v1", "n7 v1"],
            "chef": ["n0 v1", "n1 v1", "n2 v2", "n3 v1", "n6 v1", "n7 v1"],
        }
        for agent, texts in expected.items():
            for limit in (1, 2, 3, 100):
                listed: list[str] = []
                cursor: str | None = None
                while True:
                    rows, cursor = await reads.page(ListRequest("t1", "alice", agent, limit=limit, cursor=cursor))
                    assert len(rows) <= limit
                    listed += [r.text for r in rows]
                    if cursor is None:
                        break
                assert listed == texts, (agent, limit, listed)
        other_tenant = await reads.page(ListRequest("t2", "alice"))
        assert other_tenant == ([], None)
    finally:
        await reads.close()
        await stores.close()
