"""Tenancy and access over HTTP (issue 14), against the real stack: a worker, `memstream serve` with API keys.

Two tenants share user ids (alice, bob); each publishes through the ingest route with its own key. Every route
is tried with no key, a wrong key, the other tenant's key and a read-only key; none of them reads or changes
the other tenant's data, and every refusal says why.

Most tests use distinct memory ids per tenant; ``test_overlapping_memory_ids_stay_apart_per_tenant`` gives both
tenants the same memory id and user id (identity is (tenant, memory id)).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from infra.api_keys import KeyStore, Role
from infra.kafka import partitions_for_keys
from infra.settings import Settings
from tests.integration.helpers import (
    ServeProcess,
    WorkerProcess,
    make_settings,
    run_cli,
    two_tenants_with_keys,
    unique_tag,
)

pytestmark = pytest.mark.slow

WAIT_S = 60
USERS = ("alice", "bob")


@dataclass
class Stack:
    settings: Settings
    url: str
    tenants: tuple[str, str]
    keys: dict[tuple[str, Role], str]  # (tenant, role) -> key

    def auth(self, tenant: str, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[(tenant, role)]}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Stack]:
    """A worker and `memstream serve` (with keys) for the module; two tenants with a key of every role each."""
    base = tmp_path_factory.mktemp("tenancy")
    settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    tenants, keys = two_tenants_with_keys(settings, "t", Role)
    worker = WorkerProcess(settings, base / "worker.log").start()
    server = ServeProcess(settings, base / "serve.log").start()
    try:
        yield Stack(settings, server.url, tenants, keys)
    finally:
        server.interrupt()
        worker.interrupt()  # both stop, whatever the checks below find
        server_code = server.wait_stopped()
        worker_code, _ = worker.wait_stopped()
    assert server_code == 0, server.log_text()
    assert "Traceback" not in server.log_text(), server.log_text()[-5000:]
    assert worker_code == 0, worker.log_tail()


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any, Any]:
    async with http.request(method, url, headers=headers, json=body) as response:
        payload = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, payload, response.headers


@pytest.fixture(scope="module")
async def data(stack: Stack) -> dict[str, dict[str, str]]:
    """Each tenant publishes, through HTTP with its write key, memories of the same users: tenant -> text -> id."""
    out: dict[str, dict[str, str]] = {}
    async with aiohttp.ClientSession() as http:
        for tenant in stack.tenants:
            events = [
                {"user_id": user, "memory_id": f"{tenant}-{user}", "text": f"{user} likes the {tenant} garden"}
                for user in USERS
            ]
            status, body, _ = await _call(
                http, "POST", f"{stack.url}/v1/events?wait={WAIT_S}", stack.auth(tenant, Role.WRITE), events
            )
            assert status == 200 and not body["rejected"] and body["not_materialized"] == [], body
            out[tenant] = {e["text"]: e["memory_id"] for e in events}
    return out


async def settle(http: aiohttp.ClientSession, stack: Stack) -> None:
    """Publish a sentinel on every partition of the events topic (through the ingest route, for a tenant of its
    own) and wait until each is materialized. The worker takes each partition in order, so an event a refused
    request leaked before would be materialized by then: a check that it is absent can fail only after this."""
    partitions = list(range(stack.settings.partitions))
    ids: dict[int, str] = {}
    candidate = 0
    while len(ids) < len(partitions):
        memory_id = f"sentinel-{candidate}"
        [partition] = partitions_for_keys([memory_id.encode()], partitions, partitions)
        ids.setdefault(partition, memory_id)
        candidate += 1
    _, key = KeyStore(stack.settings.keys_path).create(f"ts{unique_tag()}", Role.WRITE)
    events = [{"user_id": "sentinel", "memory_id": m, "text": f"sentinel {m}"} for m in ids.values()]
    url = f"{stack.url}/v1/events?wait={WAIT_S}"
    status, body, _ = await _call(http, "POST", url, {"Authorization": f"Bearer {key}"}, events)
    assert status == 200 and len(body["accepted"]) == len(partitions) and body["not_materialized"] == [], body


def _routes(stack: Stack, memory_id: str) -> list[tuple[str, str, Any]]:
    """Every route but /healthz, with a request that is valid for a key of tenant 0."""
    return [
        ("POST", "/v1/events", {"user_id": "alice", "text": "should never land"}),
        ("POST", "/v1/search", {"query": "garden", "user_id": "alice"}),
        ("GET", f"/v1/memories/{memory_id}", None),
        ("GET", "/v1/context?user_id=alice", None),
        ("GET", "/readyz", None),
        ("GET", "/metrics", None),
        ("GET", "/openapi.json", None),
    ]


async def test_every_route_but_healthz_needs_a_valid_key(stack: Stack, data: dict[str, dict[str, str]]) -> None:
    a, _ = stack.tenants
    some_id = next(iter(data[a].values()))
    revoked = KeyStore(stack.settings.keys_path).create(a, Role.ADMIN)
    KeyStore(stack.settings.keys_path).revoke(revoked[0].key_id)
    wrong = [
        ({}, "an API key is required"),
        ({"Authorization": "Bearer ms_00000000_not-a-key"}, "not valid"),
        ({"Authorization": f"Bearer {stack.keys[(a, Role.ADMIN)]}x"}, "not valid"),
        ({"Authorization": f"Bearer {revoked[1]}"}, "not valid"),
        ({"Authorization": f"Basic {stack.keys[(a, Role.ADMIN)]}"}, "Bearer <key>"),
    ]
    async with aiohttp.ClientSession() as http:
        for method, path, body in _routes(stack, some_id):
            for headers, reason in wrong:
                status, answer, response_headers = await _call(http, method, f"{stack.url}{path}", headers, body)
                assert status == 401, (method, path, headers, answer)
                assert reason in answer["error"], answer
                assert "WWW-Authenticate" in response_headers
        status, answer, _ = await _call(http, "GET", f"{stack.url}/healthz", {})
        assert status == 200 and answer["status"] == "ok" and set(answer) == {"status", "pid"}  # nothing of tenants
        status, answer, _ = await _call(http, "GET", f"{stack.url}/nope", {})
        assert status == 401  # not even the 404 of an unknown route without a key


async def test_roles_limit_what_a_key_may_do(stack: Stack, data: dict[str, dict[str, str]]) -> None:
    a, _ = stack.tenants
    async with aiohttp.ClientSession() as http:
        event = {"user_id": "alice", "text": "a read key cannot write this"}
        status, answer, _ = await _call(http, "POST", f"{stack.url}/v1/events", stack.auth(a, Role.READ), event)
        assert status == 403 and answer["error"] == "this API key's role is read; /v1/events needs write", answer
        for role in (Role.READ, Role.WRITE):
            status, answer, _ = await _call(http, "GET", f"{stack.url}/metrics", stack.auth(a, role))
            assert status == 403 and "/metrics needs admin" in answer["error"], answer
        status, metrics, _ = await _call(http, "GET", f"{stack.url}/metrics", stack.auth(a, Role.ADMIN))
        assert status == 200 and 'route="/v1/events",status="403"' in metrics
        status, answer, _ = await _call(
            http, "POST", f"{stack.url}/v1/search", stack.auth(a, Role.READ), {"query": "garden", "user_id": "alice"}
        )
        assert status == 200 and [h["text"] for h in answer["hits"]] == [f"alice likes the {a} garden"]
        status, document, _ = await _call(http, "GET", f"{stack.url}/openapi.json", stack.auth(a, Role.READ))
        assert status == 200 and document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # nothing the read key tried landed: once the sentinels are materialized, a leaked event would be too
    async with aiohttp.ClientSession() as http:
        await settle(http, stack)
        body = {"query": event["text"], "user_id": "alice", "k": 50}
        status, answer, _ = await _call(http, "POST", f"{stack.url}/v1/search", stack.auth(a, Role.READ), body)
    assert status == 200 and [h["text"] for h in answer["hits"]] == [f"alice likes the {a} garden"], answer


async def test_the_other_tenants_key_neither_reads_nor_changes_anything(
    stack: Stack, data: dict[str, dict[str, str]]
) -> None:
    a, b = stack.tenants
    a_alice = data[a][f"alice likes the {a} garden"]
    as_b = stack.auth(b, Role.ADMIN)  # the strongest key of the other tenant
    async with aiohttp.ClientSession() as http:
        # get: another tenant's id answers exactly like an id that does not exist
        other = await _call(http, "GET", f"{stack.url}/v1/memories/{a_alice}", as_b)
        missing = await _call(http, "GET", f"{stack.url}/v1/memories/no-such-{unique_tag()}", as_b)
        assert other[0] == missing[0] == 404 and other[1] == missing[1], (other, missing)
        # search and context: the same user id, but only the caller's tenant's memories
        for body in ({"query": "garden", "user_id": "alice", "k": 50}, {"query": "garden", "all_users": True, "k": 50}):
            status, answer, _ = await _call(http, "POST", f"{stack.url}/v1/search", as_b, body)
            assert status == 200 and answer["hits"], answer
            assert {h["tenant_id"] for h in answer["hits"]} == {b}, answer
            assert all(b in h["text"] for h in answer["hits"]), answer
        status, block, _ = await _call(http, "GET", f"{stack.url}/v1/context?user_id=alice", as_b)
        assert status == 200 and block["memory_ids"] == [data[b][f"alice likes the {b} garden"]], block
        # naming the other tenant is refused with the reason, on every route that takes a tenant
        refusals = [
            ("POST", "/v1/search", {"query": "garden", "user_id": "alice", "tenant_id": a}),
            ("GET", f"/v1/context?user_id=alice&tenant_id={a}", None),
            ("POST", "/v1/events", {"tenant_id": a, "user_id": "alice", "text": "b writes into a"}),
            (
                "POST",
                "/v1/events",
                [
                    {"user_id": "alice", "text": "fine on its own"},
                    {"op": "delete", "tenant_id": a, "user_id": "alice", "memory_id": a_alice},
                ],
            ),
        ]
        for method, path, body in refusals:
            status, answer, _ = await _call(http, method, f"{stack.url}{path}", as_b, body)
            assert status == 403 and answer["field"] == "tenant_id", (path, answer)
            assert "not this API key's tenant" in answer["error"], answer
        # once the sentinels are materialized, whatever a refusal leaked would be too; then tenant a's data is as
        # it was: the same text, and nothing of b's attempts in a's scope
        await settle(http, stack)
        status, row, _ = await _call(http, "GET", f"{stack.url}/v1/memories/{a_alice}", stack.auth(a, Role.READ))
        assert status == 200 and row["text"] == f"alice likes the {a} garden" and row["tenant_id"] == a
        status, answer, _ = await _call(
            http, "POST", f"{stack.url}/v1/search", stack.auth(a, Role.READ), {"query": "x", "all_users": True, "k": 50}
        )
        assert sorted(h["memory_id"] for h in answer["hits"]) == sorted(data[a].values()), answer
        # the refused list published nothing, not even its valid first event
        status, answer, _ = await _call(
            http, "POST", f"{stack.url}/v1/search", as_b, {"query": "fine on its own", "user_id": "alice", "k": 50}
        )
        assert "fine on its own" not in [h["text"] for h in answer["hits"]], answer


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/v1/search", {"query": "garden"}, "user_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": None}, "user_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": ""}, "user_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": "a" * 129}, "user_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": "al ice"}, "user_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": "alice", "tenant_id": None}, "tenant_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": "alice", "agent_id": None}, "agent_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": "alice", "run_id": ""}, "run_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": "alice", "all_users": True}, "user_id"),
        ("POST", "/v1/search", {"query": "garden", "user_id": "alice", "min_score": None}, "min_score"),
        ("GET", "/v1/context", None, "user_id"),
        ("GET", "/v1/context?user_id=", None, "user_id"),
        ("GET", f"/v1/context?user_id={'u' * 200}", None, "user_id"),
        ("GET", "/v1/context?user_id=alice&agent_id=", None, "agent_id"),
        ("GET", "/v1/context?user_id=alice&tenant_id=", None, "tenant_id"),
        ("GET", "/v1/context?user_id=alice&budget=12.5", None, "budget"),
        ("GET", f"/v1/memories/{'m' * 129}", None, "memory_id"),
        ("POST", "/v1/events", {"user_id": None, "text": "x"}, "user_id"),
        ("POST", "/v1/events", {"user_id": "", "text": "x"}, "user_id"),
        ("POST", "/v1/events", {"user_id": "alice", "agent_id": "a" * 129, "text": "x"}, "agent_id"),
        ("POST", "/v1/events", {"user_id": "alice", "text": ""}, "text"),
    ],
)
async def test_null_empty_malformed_and_oversized_scope_values_are_400_naming_the_field(
    stack: Stack, method: str, path: str, body: Any, field: str
) -> None:
    a, _ = stack.tenants
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await _call(http, method, f"{stack.url}{path}", stack.auth(a, Role.ADMIN), body)
    assert status == 400 and answer["field"] == field and answer["error"], answer


async def test_keys_cli_creates_lists_and_revokes_without_ever_showing_a_key_again(stack: Stack) -> None:
    a, _ = stack.tenants
    created = await run_cli(stack.settings, "keys", "create", "--tenant", a, "--role", "read", "--json")
    assert created.rc == 0, created
    made = created.json()
    assert made["tenant"] == a and made["role"] == "read" and made["key"].startswith("ms_")
    headers = {"Authorization": f"Bearer {made['key']}"}
    body = {"query": "garden", "user_id": "alice"}
    async with aiohttp.ClientSession() as http:
        assert (await _call(http, "POST", f"{stack.url}/v1/search", headers, body))[0] == 200
        listed = await run_cli(stack.settings, "keys", "list", "--json")
        assert listed.rc == 0 and made["key"] not in listed.stdout, listed
        mine = [k for k in listed.json() if k["id"] == made["id"]]
        assert mine == [{k: made[k] for k in ("id", "tenant", "role", "created_at", "revoked_at")}]
        assert all(set(k) == {"id", "tenant", "role", "created_at", "revoked_at"} for k in listed.json())
        revoked = await run_cli(stack.settings, "keys", "revoke", made["id"])
        assert revoked.rc == 0 and f"revoked {made['id']}" in revoked.stdout, revoked
        status, answer, _ = await _call(http, "POST", f"{stack.url}/v1/search", headers, body)
        assert status == 401 and "not valid" in answer["error"]


async def test_overlapping_memory_ids_stay_apart_per_tenant(stack: Stack) -> None:
    """Both tenants use the same memory id for the same user; each one's update and delete touch only its own."""
    a, b = stack.tenants
    shared = f"shared-{unique_tag()}"
    async with aiohttp.ClientSession() as http:
        for tenant in (a, b):
            event = {"memory_id": shared, "user_id": "alice", "text": f"the {tenant} version"}
            status, answer, _ = await _call(
                http, "POST", f"{stack.url}/v1/events?wait={WAIT_S}", stack.auth(tenant, Role.WRITE), event
            )
            assert status == 200 and answer["not_materialized"] == [], answer
        for tenant in (a, b):
            status, row, _ = await _call(
                http, "GET", f"{stack.url}/v1/memories/{shared}", stack.auth(tenant, Role.READ)
            )
            assert status == 200 and row["text"] == f"the {tenant} version" and row["tenant_id"] == tenant, row
        # b updates, then deletes, its own memory of that id: a's is untouched
        update = {"op": "update", "memory_id": shared, "user_id": "alice", "text": "b changed it"}
        status, answer, _ = await _call(
            http, "POST", f"{stack.url}/v1/events?wait={WAIT_S}", stack.auth(b, Role.WRITE), update
        )
        assert status == 200 and answer["not_materialized"] == [], answer
        status, row, _ = await _call(http, "GET", f"{stack.url}/v1/memories/{shared}", stack.auth(a, Role.READ))
        assert status == 200 and row["text"] == f"the {a} version", row
        delete = {"op": "delete", "memory_id": shared, "user_id": "alice"}
        status, answer, _ = await _call(
            http, "POST", f"{stack.url}/v1/events?wait={WAIT_S}", stack.auth(b, Role.WRITE), delete
        )
        assert status == 200 and answer["not_materialized"] == [], answer
        status, _, _ = await _call(http, "GET", f"{stack.url}/v1/memories/{shared}", stack.auth(b, Role.READ))
        assert status == 404
        status, row, _ = await _call(http, "GET", f"{stack.url}/v1/memories/{shared}", stack.auth(a, Role.READ))
        assert status == 200 and row["text"] == f"the {a} version", row
        status, answer, _ = await _call(
            http, "POST", f"{stack.url}/v1/search", stack.auth(a, Role.READ), {"query": "version", "user_id": "alice"}
        )
        assert shared in [h["memory_id"] for h in answer["hits"]], answer
