"""The pure parts of the agent integrations: MemstreamStore's mapping of LangGraph items onto memories, and the
MCP server's key check (without stores: a refused request never reaches them)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from langgraph.store.base import MatchCondition, PutOp

from infra.api_keys import KeyStore, Role
from infra.settings import Settings
from memstream import Memory
from memstream.langgraph import (
    INDEXED_FIELD,
    KEY_FIELD,
    TTL_FIELD,
    MemstreamStore,
    _matches,
    item_filters,
    memory_id_of,
    namespace_of,
    scope_of,
    to_search_item,
)
from schemas.errors import AuthError, SchemaError
from streams.surface.mcp_server import Gate, require_key


def test_the_memory_id_is_deterministic_per_namespace_and_key() -> None:
    assert memory_id_of(("alice",), "k") == memory_id_of(["alice"], "k")
    ids = {memory_id_of(ns, k) for ns, k in [(("alice",), "k"), (("alice", "k"), ""), (("alice",), "k2")]}
    assert len(ids) == 3 and all(i.startswith("lg-") and len(i) <= 128 for i in ids)


@pytest.mark.parametrize("namespace", [(), ("a", "b", "c", "d"), ("a b",), ("",), ("x" * 129,)])
def test_a_namespace_that_is_no_scope_is_refused_naming_it(namespace: tuple[str, ...]) -> None:
    with pytest.raises(SchemaError) as refused:
        scope_of(namespace)
    assert refused.value.field == "namespace"


def test_namespaces_and_scopes_round_trip() -> None:
    for ns in [("u",), ("u", "a"), ("u", "a", "r")]:
        scope = scope_of(ns)
        memory = {"user_id": scope["user_id"], "agent_id": scope.get("agent_id"), "run_id": scope.get("run_id")}
        assert namespace_of(memory) == ns


def test_filters_name_value_keys_through_metadata_and_keep_to_the_store_items() -> None:
    assert item_filters({"kind": "food", "rank": {"$gte": 3, "$lt": 9}}, indexed_only=True) == {
        "metadata.kind": {"eq": "food"},
        "metadata.rank": {"gte": 3, "lt": 9},
        f"metadata.{INDEXED_FIELD}": True,
    }
    assert item_filters({"version": {"a": 1}}, indexed_only=False) == {  # a dict value is equality; a column name
        "metadata.version": {"eq": {"a": 1}},  # is the value's key, not the row's column
        f"metadata.{INDEXED_FIELD}": {"in": [True, False]},
    }
    for bad in ({"n": {"$like": 1}}, {"_lg_key": "x"}):
        with pytest.raises(SchemaError) as refused:
            item_filters(bad, indexed_only=True)
        assert refused.value.field == "filter"


def test_a_hit_becomes_a_search_item_without_the_reserved_keys() -> None:
    hit = {
        "id": "lg-x",
        "memory": "t",
        "score": 0.5,
        "metadata": {"text": "t", KEY_FIELD: "k", INDEXED_FIELD: True},
        "user_id": "u",
        "agent_id": "a",
        "run_id": None,
        "updated_at": "2026-01-02T03:04:05.678Z",
    }
    item = to_search_item(hit)
    assert (item.namespace, item.key, item.value, item.score) == (("u", "a"), "k", {"text": "t"}, 0.5)
    assert item.updated_at.year == 2026 and item.updated_at.tzinfo is not None
    assert item.created_at == item.updated_at  # a memory read without created_at: its only time
    assert to_search_item({**hit, "score": None}).score is None
    created = to_search_item({**hit, "created_at": "2025-06-01T00:00:00.000Z"})
    assert (created.created_at.year, created.updated_at.year) == (2025, 2026)


def test_namespace_conditions_take_wildcards() -> None:
    ns = ("u", "chef", "r1")
    assert _matches(MatchCondition("prefix", ("u", "*")), ns)
    assert _matches(MatchCondition("suffix", ("r1",)), ns)
    assert not _matches(MatchCondition("suffix", ("chef",)), ns)
    assert not _matches(MatchCondition("prefix", ("u", "chef", "r1", "x")), ns)


def test_the_embedded_text_follows_the_index_fields() -> None:
    store = MemstreamStore(Memory(Settings()), index={"fields": ["text", "tags[*]"]})  # nothing opened: no I/O
    try:
        value = {"text": "Alice cooks", "tags": ["food", "home"], "title": "T"}
        assert store.embedded_text(PutOp(("u",), "k", value)) == "Alice cooks\nfood\nhome"
        assert store.embedded_text(PutOp(("u",), "k", value, index=["title"])) == "T"
        assert store.embedded_text(PutOp(("u",), "k", value, index=False)) is None
        assert store.embedded_text(PutOp(("u",), "k", {"other": 1})) is None  # no text at the fields
        whole = MemstreamStore(store.memory).embedded_text(PutOp(("u",), "k", {"b": 1, "a": "x"}))
        assert whole == '{"a": "x", "b": 1}'  # no fields: the whole value, as LangGraph's "$"
        item = store.add_item(PutOp(("u", "a"), "k", value, index=False))
        assert item["metadata"][INDEXED_FIELD] is False and item["metadata"][KEY_FIELD] == "k"
        assert (item["user_id"], item["agent_id"], item["memory_id"]) == ("u", "a", memory_id_of(("u", "a"), "k"))
        before = time.time_ns() // 1_000_000
        expiring = store.add_item(PutOp(("u",), "k", value, ttl=1.5))  # minutes, as LangGraph's
        after = time.time_ns() // 1_000_000
        assert before + 90_000 <= expiring["expires_at"] <= after + 90_000
        assert expiring["metadata"][TTL_FIELD] == 1.5  # what a read refreshes the expiry by
        assert "expires_at" not in item and TTL_FIELD not in item["metadata"]
        for bad in (0, -1.0, True, "5"):
            with pytest.raises(SchemaError) as refused:
                store.add_item(PutOp(("u",), "k", value, ttl=bad))  # type: ignore[arg-type]
            assert refused.value.field == "ttl"
        with pytest.raises(SchemaError) as refused:
            store.add_item(PutOp(("u",), "k", {"_lg_x": 1}))
        assert refused.value.field == "value"
    finally:
        store.close()


async def _asgi_status(gate: Gate, headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    reached = False

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        nonlocal reached
        reached = True
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": headers}
    await require_key(inner, gate)(scope, receive, send)
    return sent[0]["status"], reached


def test_the_http_server_refuses_requests_without_a_valid_key(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.json")
    key = keys.create("acme", Role.READ)[1]
    gate = Gate("", keys)
    for headers, status, reached in [
        ([], 401, False),
        ([(b"authorization", b"Bearer ms_00000000_nope")], 401, False),
        ([(b"authorization", b"Basic abc")], 401, False),
        ([(b"authorization", f"Bearer {key}".encode())], 200, True),
    ]:
        assert asyncio.run(_asgi_status(gate, headers)) == (status, reached), headers
    principal = gate.principal(f"bearer {key}")
    assert principal is not None and principal.tenant == "acme" and not principal.role.allows(Role.WRITE)
    assert Gate("default", None).principal(None) is None


class FakeContext:
    """What Gate reads of the SDK's Context: the request's headers."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def test_the_key_decides_the_tenant_and_its_role_what_a_tool_may_do(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.json")
    read_key = keys.create("acme", Role.READ)[1]
    write_key = keys.create("beta", Role.WRITE)[1]
    gate = Gate("ignored", keys)
    as_reader: Any = FakeContext({"authorization": f"Bearer {read_key}"})
    as_writer: Any = FakeContext({"authorization": f"Bearer {write_key}"})
    assert gate.tenant_for(as_reader, Role.READ) == "acme"
    with pytest.raises(AuthError, match="role is read"):
        gate.tenant_for(as_reader, Role.WRITE)
    assert gate.tenant_for(as_writer, Role.WRITE) == "beta"
    with pytest.raises(AuthError):
        gate.tenant_for(FakeContext({}), Role.READ)  # type: ignore[arg-type]
    assert Gate("default", None).tenant_for(FakeContext({}), Role.WRITE) == "default"  # type: ignore[arg-type]
