"""``memstream.langgraph.MemstreamStore`` against the real stack (a worker on the test broker and Redis).

A compiled LangGraph ``StateGraph`` with ``store=`` puts a memory in one run and finds it in the next; then the
store's semantics as LangGraph's own stores have them (a put is seen by the very next get and search, from
another store instance too; a put overwrites; delete; index fields and ``index=False``; filters, limit and
offset; list_namespaces), its refusals, and the tenant wall.
"""

from __future__ import annotations

import asyncio
import operator
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from infra.api_keys import KeyStore, Role
from infra.settings import Settings
from memstream import AsyncMemory, Memory, SchemaError
from memstream.langgraph import MemstreamStore, memory_id_of
from tests.integration.helpers import REPO, ServeProcess, WorkerProcess, make_settings, process_env, unique_tag

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Settings]:
    base = tmp_path_factory.mktemp("langgraph")
    settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    worker = WorkerProcess(settings, base / "worker.log").start()
    try:
        yield settings
    finally:
        worker.interrupt()
        code, _ = worker.wait_stopped()
    assert code == 0, worker.log_tail()


@pytest.fixture
def stores(live: Settings) -> Iterator[tuple[MemstreamStore, MemstreamStore]]:
    """Two store instances of one tenant, each on its own Memory (as two processes would have)."""
    tenant = f"t{unique_tag()}"
    first = MemstreamStore(Memory(live, tenant_id=tenant), index={"fields": ["text"]})
    second = MemstreamStore(Memory(live, tenant_id=tenant), index={"fields": ["text"]})
    try:
        yield first, second
    finally:
        first.close()
        second.close()


class State(TypedDict):
    user: str
    said: str
    recalled: Annotated[list[str], operator.add]


async def remember(state: State, runtime: Runtime[Any]) -> dict[str, Any]:
    assert runtime.store is not None
    if state["said"]:
        await runtime.store.aput((state["user"], "assistant"), "fact-1", {"text": state["said"]})
    return {}


async def recall(state: State, runtime: Runtime[Any]) -> dict[str, Any]:
    assert runtime.store is not None
    hits = await runtime.store.asearch((state["user"],), query="what does the user eat?", limit=3)
    return {"recalled": [hit.value["text"] for hit in hits]}


async def test_a_compiled_graph_remembers_across_runs(live: Settings) -> None:
    """Run 1 puts (node remember) and searches (node recall, the very next step); run 2 only recalls, through
    another store instance: both find the memory."""
    user = f"u{unique_tag()}"
    builder = StateGraph(State)
    builder.add_node("remember", remember)
    builder.add_node("recall", recall)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", "recall")
    builder.add_edge("recall", END)
    async with AsyncMemory(live, tenant_id="graphs") as memory:
        graph = builder.compile(store=MemstreamStore(memory, index={"fields": ["text"]}))
        first = await graph.ainvoke({"user": user, "said": "The user is vegetarian", "recalled": []})
    assert first["recalled"] == ["The user is vegetarian"], first
    async with AsyncMemory(live, tenant_id="graphs") as memory:
        graph = builder.compile(store=MemstreamStore(memory))
        second = await graph.ainvoke({"user": user, "said": "", "recalled": []})
        assert second["recalled"] == ["The user is vegetarian"], second
        other = await graph.ainvoke({"user": f"x{user}", "said": "", "recalled": []})
        assert other["recalled"] == []  # another user's namespace


def test_put_get_overwrite_delete_from_two_instances(stores: tuple[MemstreamStore, MemstreamStore]) -> None:
    a, b = stores
    ns = ("alice", "chef")
    a.put(ns, "diet", {"text": "Alice is vegetarian", "kind": "food"})
    got = b.get(ns, "diet")
    assert got is not None and (got.namespace, got.key) == (ns, "diet")
    assert got.value == {"text": "Alice is vegetarian", "kind": "food"}
    assert got.updated_at.tzinfo is not None

    b.put(ns, "diet", {"text": "Alice is vegan", "kind": "food"})  # the same namespace and key: overwrites
    now = a.get(ns, "diet")
    assert now is not None and now.value["text"] == "Alice is vegan"
    hits = a.search(("alice",), query="Alice is vegan")
    assert [(h.namespace, h.key, h.value["text"]) for h in hits] == [(ns, "diet", "Alice is vegan")]
    assert hits[0].score is not None and hits[0].score > 0.99
    assert a.get(("alice",), "diet") is None  # another namespace, another item
    assert a.get(ns, "other") is None

    a.delete(ns, "diet")
    assert b.get(ns, "diet") is None
    assert b.search(("alice",), query="Alice is vegan") == []
    a.delete(ns, "never-put")  # deleting what is absent is a no-op, as in LangGraph


def test_index_fields_filters_limit_offset(stores: tuple[MemstreamStore, MemstreamStore]) -> None:
    a, b = stores
    ns = ("bob",)
    for i in range(5):
        a.put(ns, f"k{i}", {"text": f"Bob note number {i}", "rank": i, "kind": "even" if i % 2 == 0 else "odd"})
    a.put(ns, "secret", {"text": "Bob note hidden", "rank": 9, "kind": "odd"}, index=False)
    a.put(ns, "title", {"text": "unrelated", "title": "Bob plays the cello", "rank": 7}, index=["title"])

    by_title = b.search(ns, query="Bob plays the cello", limit=1)
    assert [h.key for h in by_title] == ["title"]  # embedded from its own index field, not from "text"
    queried = {h.key for h in b.search(ns, query="Bob note hidden", limit=20)}
    assert "secret" not in queried and {f"k{i}" for i in range(5)} <= queried  # index=False: not by a query
    listed = [h.key for h in b.search(ns, limit=20)]  # no query: every item, in memory-id order
    assert sorted(listed) == sorted([*(f"k{i}" for i in range(5)), "secret", "title"]) and len(set(listed)) == 7
    assert all(h.score is None for h in b.search(ns, limit=20))

    odd = {h.key for h in b.search(ns, filter={"kind": "odd"})}
    assert odd == {"k1", "k3", "secret"}
    high = {h.key for h in b.search(ns, query="Bob note", filter={"rank": {"$gte": 3}, "kind": {"$ne": "odd"}})}
    assert high == {"k4", "title"}  # title has no kind: $ne matches a missing key (secret: not by a query)

    page = [h.key for h in b.search(ns, limit=3, offset=0)]
    rest = [h.key for h in b.search(ns, limit=10, offset=3)]
    assert page + rest == listed
    best = [h.key for h in b.search(ns, query="Bob note number 2", limit=3)]
    assert best[0] == "k2" and [h.key for h in b.search(ns, query="Bob note number 2", limit=2, offset=1)] == best[1:]


def test_list_namespaces(stores: tuple[MemstreamStore, MemstreamStore]) -> None:
    a, b = stores
    user = f"n{unique_tag()}"
    for ns in [(user,), (user, "chef"), (user, "chef", "r1"), (user, "critic", "r1")]:
        a.put(ns, "k", {"text": f"memory of {'/'.join(ns)}"})
    assert b.list_namespaces(prefix=(user,)) == sorted(
        [(user,), (user, "chef"), (user, "chef", "r1"), (user, "critic", "r1")]
    )
    assert b.list_namespaces(prefix=(user,), max_depth=2) == [(user,), (user, "chef"), (user, "critic")]
    assert b.list_namespaces(prefix=(user, "*"), suffix=("r1",)) == [(user, "chef", "r1"), (user, "critic", "r1")]
    assert b.list_namespaces(prefix=(user,), limit=2, offset=1) == [(user, "chef"), (user, "chef", "r1")]
    with pytest.raises(SchemaError) as refused:
        b.list_namespaces(suffix=("r1",))
    assert refused.value.field == "prefix"


def test_a_put_with_a_ttl_expires_and_a_read_refreshes_it(stores: tuple[MemstreamStore, MemstreamStore]) -> None:
    """ttl is in minutes, as LangGraph's: 0.2 is 12 s. Both items expire 12 s after their put; "kept" is read (with
    LangGraph's default refresh) 6 s in, which pushes its expiry to 12 s after that read. At 12.5 s "gone" is no
    longer returned by get or search, from either instance, and "kept" still is; created_at is the put's time."""
    a, b = stores
    user = f"t{unique_tag()}"
    started = time.monotonic()
    a.put((user,), "gone", {"text": "the door code is 4711"}, ttl=0.2)
    a.put((user,), "kept", {"text": "the gate code is 1234"}, ttl=0.2)
    first = b.get((user,), "gone", refresh_ttl=False)
    assert first is not None and first.created_at == first.updated_at
    assert {h.key for h in b.search((user,), query="the code", refresh_ttl=False)} == {"gone", "kept"}
    time.sleep(max(0.0, started + 6.0 - time.monotonic()))
    assert time.monotonic() - started < 11.0, "too slow: the refresh must come well before the first expiry"
    assert b.get((user,), "kept") is not None  # refresh_ttl defaults to True: kept now expires 12 s from here
    time.sleep(max(0.0, started + 12.5 - time.monotonic()))
    for store in (a, b):
        assert store.get((user,), "gone", refresh_ttl=False) is None
        assert store.get((user,), "kept", refresh_ttl=False) is not None
        assert {h.key for h in store.search((user,), query="the code", refresh_ttl=False)} == {"kept"}
        assert {h.key for h in store.search((user,), refresh_ttl=False)} == {"kept"}  # listing too


def test_refusals_name_the_argument(stores: tuple[MemstreamStore, MemstreamStore]) -> None:
    a, _ = stores
    for bad, field in [
        (lambda: a.put(("alice",), "k", {"text": "x"}, ttl=0), "ttl"),
        (lambda: a.put(("a", "b", "c", "d"), "k", {"text": "x"}), "namespace"),
        (lambda: a.put(("a b",), "k", {"text": "x"}), "namespace"),
        (lambda: a.put(("alice",), "k", {"_lg_key": "x"}), "value"),
        (lambda: a.put(("alice",), "k", {"blob": "x" * 20_000}), "metadata"),
        (lambda: a.search(("alice",), filter={"n": {"$like": 1}}), "filter"),
        (lambda: a.search(("alice",), limit=0), "limit"),
    ]:
        with pytest.raises(SchemaError) as refused:
            bad()
        assert refused.value.field == field, (field, refused.value)


def test_tenants_are_walls(live: Settings) -> None:
    """The same namespace and key in two tenants are two items; neither tenant reads, finds or deletes the other's."""
    ns = ("shared-user",)
    a = MemstreamStore(Memory(live, tenant_id=f"a{unique_tag()}"))
    b = MemstreamStore(Memory(live, tenant_id=f"b{unique_tag()}"))
    try:
        a.put(ns, "k", {"text": "tenant A's secret plan"})
        assert b.get(ns, "k") is None
        assert b.search(ns, query="tenant A's secret plan") == [] and b.search(ns) == []
        assert b.list_namespaces(prefix=ns) == []
        b.put(ns, "k", {"text": "tenant B's note"})
        b.delete(ns, "k")
        kept = a.get(ns, "k")
        assert kept is not None and kept.value == {"text": "tenant A's secret plan"}
        assert [h.key for h in a.search(ns, query="secret plan")] == ["k"]
        assert memory_id_of(ns, "k") == memory_id_of(list(ns), "k")  # the id depends on namespace and key only
    finally:
        a.close()
        b.close()


def test_over_http_with_api_keys(live: Settings, tmp_path: Path) -> None:
    """The store over ``Memory(url=, api_key=)``: the same semantics through `memstream serve`; the key's tenant
    is the wall."""
    store = KeyStore(live.keys_path)
    key_a = store.create(f"ha{unique_tag()}", Role.WRITE)[1]
    key_b = store.create(f"hb{unique_tag()}", Role.WRITE)[1]
    server = ServeProcess(live, tmp_path / "serve.log").start()
    a = MemstreamStore(Memory(url=server.url, api_key=key_a), index={"fields": ["text"]})
    b = MemstreamStore(Memory(url=server.url, api_key=key_b))
    try:
        ns = ("carol", "helper")
        a.put(ns, "hobby", {"text": "Carol collects stamps", "kind": "hobby"})
        a.put(ns, "note", {"text": "Carol's private note"}, index=False)
        got = a.get(ns, "hobby")
        assert got is not None and got.value == {"text": "Carol collects stamps", "kind": "hobby"}
        assert [h.key for h in a.search(("carol",), query="Carol collects stamps", filter={"kind": "hobby"})] == [
            "hobby"
        ]
        assert sorted(h.key for h in a.search(("carol",))) == ["hobby", "note"]
        assert a.list_namespaces(prefix=("carol",)) == [ns]
        assert b.get(ns, "hobby") is None and b.search(("carol",)) == []
        a.delete(ns, "hobby")
        assert a.get(ns, "hobby") is None
    finally:
        a.close()
        b.close()
        server.interrupt()
        assert server.wait_stopped() == 0, server.log_text()


async def test_the_readme_graph_runs(live: Settings) -> None:
    """README "LangGraph": the graph as a user runs it (a fresh interpreter, MemstreamStore.from_env())."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n### LangGraph", 1)[1].split("\n### ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "MemstreamStore.from_env(" in code and ".compile(store=store)" in code
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env=process_env(live),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
