"""``memstream mcp`` against the real stack, through the official MCP SDK's own client, over both transports.

stdio: the client spawns ``python -m streams mcp`` with the stack's MEMSTREAM_* settings and runs every tool;
bad input is a tool error naming the argument. Streamable HTTP (``--http PORT``): no key or a bad key is refused
(401) before any tool runs; a key of tenant A cannot read, find, change or delete tenant B's memories; a read key
cannot write.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent

from infra import services
from infra.api_keys import Role
from infra.settings import Settings
from tests.integration.helpers import (
    REPO,
    WorkerProcess,
    cli_command,
    make_settings,
    process_env,
    two_tenants_with_keys,
    unique_tag,
    wait_for,
)

pytestmark = pytest.mark.slow

TOOLS = {
    "add_memory",
    "search_memories",
    "get_memory",
    "list_memories",
    "update_memory",
    "delete_memory",
    "memory_history",
}


@dataclass
class Live:
    settings: Settings
    tenants: tuple[str, str]
    keys: dict[tuple[str, Role], str]
    url: str


def _answers(url: str) -> bool:
    """Whether the server answers at all (it refuses a request without a key: 401 is an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, redis_url: str) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("mcp")
    settings = make_settings(base / "home", kafka_bootstrap, redis_url)
    tenants, keys = two_tenants_with_keys(settings, "m")
    worker = WorkerProcess(settings, base / "worker.log").start()
    port = services.free_port()
    log_path = base / "mcp-http.log"
    with log_path.open("wb") as log:
        http = subprocess.Popen(
            [sys.executable, "-m", "streams", "mcp", "--http", str(port)],
            env=process_env(settings),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while not _answers(url):
            assert http.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield Live(settings, tenants, keys, url)
    finally:
        http.terminate()
        worker.interrupt()
        http.wait(timeout=30)
        code, _ = worker.wait_stopped()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]
    assert code == 0, worker.log_tail()


def _stdio(live: Live, tenant: str) -> Client:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "streams", "mcp", "--tenant", tenant],
        env=process_env(live.settings),
        cwd=str(REPO),
    )
    return Client(params)


@asynccontextmanager
async def _http(live: Live, key: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120.0)) as http,
        Client(streamable_http_client(live.url, http_client=http)) as client,
    ):
        yield client


def _text(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


async def _ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, (tool, _text(result))
    if isinstance(result.structured_content, dict):
        return result.structured_content
    parsed: dict[str, Any] = orjson.loads(_text(result))
    return parsed


async def _refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, (tool, arguments, _text(result))
    return _text(result)


async def test_every_tool_over_stdio(live: Live) -> None:
    user = f"u{unique_tag()}"
    async with _stdio(live, live.tenants[0]) as client:
        listed = await client.list_tools()
        assert {t.name for t in listed.tools} == TOOLS
        added = await _ok(
            client, "add_memory", text="Alice is vegetarian", user_id=user, agent_id="chef", metadata={"t": "food"}
        )
        assert added["status"] == "searchable", added
        other = await _ok(
            client, "add_memory", text="Alice moved to Lisbon", user_id=user, expires_at="2099-01-01T00:00:00Z"
        )
        moved = await _ok(client, "get_memory", memory_id=other["id"])
        assert moved["expires_at"] == "2099-01-01T00:00:00.000Z" and moved["created_at"] == moved["updated_at"]
        found = await _ok(client, "search_memories", query="Alice is vegetarian", user_id=user, top_k=1)
        assert [(h["id"], h["memory"]) for h in found["results"]] == [(added["id"], "Alice is vegetarian")]
        assert found["results"][0]["metadata"] == {"t": "food"}
        got = await _ok(client, "get_memory", memory_id=added["id"])
        assert (got["memory"], got["agent_id"]) == ("Alice is vegetarian", "chef")
        page = await _ok(client, "list_memories", user_id=user, limit=1)
        rest = await _ok(client, "list_memories", user_id=user, limit=1, cursor=page["next_cursor"])
        assert sorted(r["id"] for r in page["results"] + rest["results"]) == sorted([added["id"], other["id"]])
        changed = await _ok(client, "update_memory", memory_id=added["id"], text="Alice is vegan")
        assert changed["status"] == "searchable"
        got = await _ok(client, "get_memory", memory_id=added["id"])
        assert (got["memory"], got["metadata"]) == ("Alice is vegan", {"t": "food"})
        await _ok(client, "delete_memory", memory_id=added["id"])
        assert "memory_id" in await _refused(client, "get_memory", memory_id=added["id"])
        left = await _ok(client, "list_memories", user_id=user)
        assert [r["id"] for r in left["results"]] == [other["id"]]

        async def three_versions() -> list[dict[str, Any]] | None:  # kept by the index sink, a moment later
            result = await client.call_tool("memory_history", {"memory_id": added["id"]})
            if result.is_error:  # not found until the sink has kept the first version
                return None
            found = result.structured_content or orjson.loads(_text(result))
            return found["results"] if len(found["results"]) == 3 else None

        history = await wait_for(three_versions, timeout=60, what="three versions in the history")
        assert [(h["event"], h["memory"], h["previous_memory"]) for h in history] == [
            ("ADD", "Alice is vegetarian", None),
            ("UPDATE", "Alice is vegan", "Alice is vegetarian"),
            ("DELETE", None, "Alice is vegan"),
        ]


async def test_bad_input_is_a_tool_error_naming_the_field(live: Live) -> None:
    async with _stdio(live, live.tenants[0]) as client:
        for tool, arguments, field in [
            ("add_memory", {"text": "x", "user_id": "a b"}, "user_id"),
            ("add_memory", {"text": "   ", "user_id": "u"}, "text"),
            ("add_memory", {"text": "x", "user_id": "u", "metadata": {"k": "v" * 20_000}}, "metadata"),
            ("search_memories", {"query": "x", "user_id": "u", "top_k": 0}, "top_k"),
            ("search_memories", {"query": "x", "user_id": "u", "mode": "fuzzy"}, "mode"),
            ("search_memories", {"query": "x", "user_id": "u", "filters": {"n": {"like": 1}}}, "filters"),
            ("search_memories", {"query": "x", "user_id": "u", "top_k": "many"}, "top_k"),  # the SDK's own check
            ("list_memories", {"user_id": "u", "limit": 0}, "limit"),
            ("update_memory", {"memory_id": "m1"}, "text"),
            ("add_memory", {"text": "x", "user_id": "u", "expires_at": "tomorrow"}, "expires_at"),
            ("update_memory", {"memory_id": "never-added", "text": "x"}, "memory_id"),
            ("delete_memory", {"memory_id": "bad id"}, "memory_id"),
            ("get_memory", {}, "memory_id"),
            ("memory_history", {"memory_id": "bad id"}, "memory_id"),
        ]:
            text = await _refused(client, tool, **arguments)
            assert field in text, (tool, arguments, text)
        assert (await client.list_tools()).tools  # still serving after every refusal


async def test_http_needs_a_key_and_keeps_tenants_apart(live: Live) -> None:
    a, b = live.tenants
    user = f"h{unique_tag()}"
    hello = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with httpx2.AsyncClient(timeout=10) as http:
        for headers, words in [({}, "API key is required"), ({"Authorization": "Bearer ms_00000000_x"}, "not valid")]:
            answer = await http.post(live.url, json=hello, headers={**headers, "Accept": "application/json"})
            assert answer.status_code == 401 and words in answer.json()["error"], answer.text
    with pytest.raises(ExceptionGroup) as failed:  # the SDK's own client, refused the same way
        async with _http(live, "ms_00000000_not-a-key") as client:
            await client.list_tools()
    assert failed.group_contains(MCPError)

    async with _http(live, live.keys[(a, Role.WRITE)]) as as_a:
        added = await _ok(as_a, "add_memory", text="Tenant A's launch date is May 3", user_id=user)
        assert added["status"] == "searchable"
    async with _http(live, live.keys[(b, Role.WRITE)]) as as_b:
        assert (await _ok(as_b, "search_memories", query="launch date", user_id=user))["results"] == []
        assert (await _ok(as_b, "list_memories", user_id=user))["results"] == []
        for tool in ("get_memory", "delete_memory"):
            assert "not found" in await _refused(as_b, tool, memory_id=added["id"])
        assert "not found" in await _refused(as_b, "update_memory", memory_id=added["id"], text="hijacked")
    async with _http(live, live.keys[(a, Role.READ)]) as reader:  # tenant A has the history (once indexed)

        async def indexed() -> bool:
            return not (await reader.call_tool("memory_history", {"memory_id": added["id"]})).is_error

        await wait_for(indexed, timeout=60, what="the memory's history")
    async with _http(live, live.keys[(b, Role.READ)]) as as_b:  # tenant B does not, as for a missing id
        assert "not found" in await _refused(as_b, "memory_history", memory_id=added["id"])
    async with _http(live, live.keys[(a, Role.READ)]) as reader:
        assert "write" in await _refused(reader, "add_memory", text="x", user_id=user)
        assert "write" in await _refused(reader, "delete_memory", memory_id=added["id"])
        kept = await _ok(reader, "get_memory", memory_id=added["id"])
        assert kept["memory"] == "Tenant A's launch date is May 3"
        hits = await _ok(reader, "search_memories", query="launch date", user_id=user)
        assert [h["id"] for h in hits["results"]] == [added["id"]]


def _readme_blocks(language: str) -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n### MCP", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


async def test_the_readme_mcp_setup_runs(live: Live) -> None:
    """README "MCP": the stdio client configuration's command and args, spawned as a client would (the stack's
    MEMSTREAM_* stand in for its env), and the streamable HTTP snippet in a fresh interpreter with a write key."""
    [config] = _readme_blocks("json")
    server = orjson.loads(config)["mcpServers"]["memstream"]
    assert server["command"] == "memstream" and server["args"][0] == "mcp"
    command = cli_command()  # the installed console script, else python -m streams
    params = StdioServerParameters(
        command=command[0], args=[*command[1:], *server["args"]], env=process_env(live.settings), cwd=str(REPO)
    )
    async with Client(params) as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        added = await _ok(client, "add_memory", text="Dana keeps bees", user_id=f"d{unique_tag()}")
        assert added["status"] == "searchable"

    [code] = _readme_blocks("python")
    env = {**process_env(live.settings), "MEMSTREAM_KEY": live.keys[(live.tenants[1], Role.WRITE)]}
    env["MEMSTREAM_MCP_URL"] = live.url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
