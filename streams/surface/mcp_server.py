"""``memstream mcp``: the memory operations as Model Context Protocol tools (the official ``mcp`` SDK, MCPServer).

Tools: ``add_memory``, ``search_memories``, ``get_memory``, ``list_memories``, ``update_memory``,
``delete_memory``, ``memory_history``; each runs streams/surface/memories.py, as the HTTP routes and
``memstream.Memory`` do, so the answers have the same (Mem0) shapes.

Transports: stdio (default; the MCP client spawns ``memstream mcp``, the tenant is ``--tenant``, default
``default``: the process is the client's own, trusted like the CLI) or streamable HTTP (``--http PORT``, path
``/mcp``): every request needs ``Authorization: Bearer <key>`` from ``memstream keys create`` (401 without a
valid one), the key's tenant is the wall, and its role decides: ``read`` keys search, get, list and read
histories, ``write`` keys also add, update and delete.

Bad input is a tool error (``is_error``) whose text names the argument (``invalid user_id: ...``), never a crash.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from infra.api_keys import KeyStore, Principal, Role
from infra.settings import Settings
from schemas.errors import AuthError, MemStreamError, NotFoundError, SchemaError
from schemas.events import validate_id
from streams.surface.memories import (
    DeleteOp,
    MemoryService,
    UpdateOp,
    add_operations,
    expiry_ms,
    raise_for,
    wait_seconds,
)

log = logging.getLogger("memstream.mcp")

MCP_PATH: Final = "/mcp"
MISSING_KEY: Final = "an API key is required: send 'Authorization: Bearer <key>' (keys: `memstream keys create`)"
INSTRUCTIONS: Final = (
    "Long-term memory. add_memory stores a fact for a user (optionally an agent and a run); search_memories "
    "finds the most relevant ones; list_memories pages through a scope; get, update and delete take a memory id."
)
MODES: Final = ("vector", "hybrid")

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


@dataclass
class Gate:
    """Who may call: ``keys`` None (stdio) trusts the caller with ``tenant``; else a bearer key decides."""

    tenant: str
    keys: KeyStore | None

    def principal(self, authorization: str | None) -> Principal | None:
        if self.keys is None or not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        return self.keys.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None

    def tenant_for(self, ctx: Context, needed: Role) -> str:
        """The tenant of a tool call (the key's over HTTP), or AuthError when the key may not do it."""
        if self.keys is None:
            return self.tenant
        headers = ctx.headers or {}
        principal = self.principal(headers.get("authorization"))
        if principal is None:  # the middleware refused this already; a tool never runs without a key
            raise AuthError(MISSING_KEY)
        if not principal.role.allows(needed):
            raise AuthError(f"this API key's role is {principal.role.value}; this tool needs {needed.value}")
        return principal.tenant


class MemoryTools:
    """The six tools over one MemoryService; registered on an MCPServer by :func:`build_server`."""

    def __init__(self, service: MemoryService, gate: Gate) -> None:
        self.service = service
        self.gate = gate

    async def add_memory(
        self,
        ctx: Context,
        text: str,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        memory_id: str | None = None,
        wait: bool = True,
        expires_at: int | str | None = None,
    ) -> dict[str, Any]:
        tenant = self.gate.tenant_for(ctx, Role.WRITE)
        ops = add_operations(
            text,
            user_id=user_id,
            agent_id=agent_id,
            run_id=run_id,
            metadata=metadata,
            memory_id=memory_id,
            expires_at=expires_at,
        )
        [outcome] = await self.service.apply(tenant, ops, wait_seconds(wait))
        return _summary(raise_for(outcome))

    async def search_memories(
        self,
        ctx: Context,
        query: str,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: dict[str, Any] | None = None,
        top_k: int = 10,
        threshold: float | None = None,
        mode: str = "vector",
    ) -> dict[str, Any]:
        tenant = self.gate.tenant_for(ctx, Role.READ)
        if not query.strip():
            raise SchemaError("the query is empty", field="query")
        if mode not in MODES:
            raise SchemaError(f"'mode' must be one of {', '.join(MODES)}", field="mode")
        _scope(user_id, agent_id, run_id)
        return await self.service.search(
            tenant,
            query,
            user_id=user_id,
            agent_id=agent_id,
            run_id=run_id,
            filters=filters,
            top_k=top_k,
            threshold=threshold,
            mode=mode,
        )

    async def get_memory(self, ctx: Context, memory_id: str) -> dict[str, Any]:
        tenant = self.gate.tenant_for(ctx, Role.READ)
        validate_id(memory_id, "memory_id")
        found = await self.service.get(tenant, memory_id)
        if found is None:  # absent, deleted or another tenant's: the same answer
            raise NotFoundError(memory_id)
        return found

    async def memory_history(self, ctx: Context, memory_id: str) -> dict[str, Any]:
        tenant = self.gate.tenant_for(ctx, Role.READ)
        validate_id(memory_id, "memory_id")
        entries = await self.service.history(tenant, memory_id)
        if not entries:  # absent, not indexed yet, or another tenant's: the same answer
            raise NotFoundError(memory_id)
        return {"results": entries}

    async def list_memories(
        self,
        ctx: Context,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: dict[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        tenant = self.gate.tenant_for(ctx, Role.READ)
        _scope(user_id, agent_id, run_id)
        if not 1 <= limit <= 1_000:
            raise SchemaError("'limit' must be an integer between 1 and 1000", field="limit")
        validate_id(cursor, "cursor", optional=True)
        return await self.service.page(
            tenant, user_id=user_id, agent_id=agent_id, run_id=run_id, filters=filters, limit=limit, cursor=cursor
        )

    async def update_memory(
        self,
        ctx: Context,
        memory_id: str,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        wait: bool = True,
        expires_at: int | str | None = None,
    ) -> dict[str, Any]:
        tenant = self.gate.tenant_for(ctx, Role.WRITE)
        validate_id(memory_id, "memory_id")
        if text is None and metadata is None and expires_at is None:
            raise SchemaError("give text, metadata or expires_at to update", field="text")
        op = UpdateOp(memory_id, text, metadata, expiry_ms(expires_at))
        [outcome] = await self.service.apply(tenant, [op], wait_seconds(wait))
        return _summary(raise_for(outcome))

    async def delete_memory(self, ctx: Context, memory_id: str, wait: bool = True) -> dict[str, Any]:
        tenant = self.gate.tenant_for(ctx, Role.WRITE)
        validate_id(memory_id, "memory_id")
        [outcome] = await self.service.apply(tenant, [DeleteOp(memory_id)], wait_seconds(wait))
        return _summary(raise_for(outcome))


TOOL_DOCS: Final = {
    "add_memory": "Remember a fact for a user (and optionally an agent and a run). With wait (default) it "
    "returns once the memory is searchable: {id, event_id, status}. expires_at (ms since the epoch or an ISO 8601 "
    "time such as 2030-01-01T00:00:00Z): forget it then.",
    "search_memories": "The memories of a user (optionally of one agent or run) most relevant to a query, best "
    "first: {results: [{id, memory, score, metadata, user_id, agent_id, run_id, updated_at}]}. filters: "
    'metadata conditions such as {"topic": "food", "year": {"gte": 2020}}.',
    "get_memory": "One memory by id.",
    "list_memories": "A page of a user's (agent's, run's) memories in id order: {results, next_cursor}; pass "
    "next_cursor back as cursor for the next page.",
    "update_memory": "Change a memory's text, metadata (replaced whole) and/or expires_at; the rest stays.",
    "delete_memory": "Delete a memory by id.",
    "memory_history": "Every version of a memory by id, oldest first: {results: [{event: ADD|UPDATE|DELETE, "
    "memory, previous_memory, version, event_id, created_at}]}. Kept once indexed (it lags a write a moment).",
}


def _scope(user_id: object, agent_id: object, run_id: object) -> None:
    validate_id(user_id, "user_id")
    validate_id(agent_id, "agent_id", optional=True)
    validate_id(run_id, "run_id", optional=True)


def _summary(outcome: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": outcome["id"], "event_id": outcome["event_id"], "status": outcome["status"]}


def as_tool_error(call: Callable[..., Awaitable[dict[str, Any]]]) -> Callable[..., Awaitable[dict[str, Any]]]:
    """memstream's refusals as MCP tool errors naming the argument (the SDK hides other exceptions' text)."""

    @functools.wraps(call)  # the SDK reads the arguments (and the Context one) from the wrapped signature
    async def tool(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return await call(*args, **kwargs)
        except NotFoundError as exc:
            raise ToolError(f"not found (memory_id): {exc.reason}") from None
        except SchemaError as exc:
            raise ToolError(f"invalid {exc.field or 'input'}: {exc.reason}") from None
        except AuthError as exc:
            raise ToolError(f"refused: {exc}") from None
        except MemStreamError as exc:
            log.warning("mcp tool %s failed: %s", call.__name__, exc)
            raise ToolError(f"memstream could not do it: {exc}") from None

    return tool


def build_server(tools: MemoryTools) -> MCPServer:
    server: MCPServer = MCPServer(name="memstream", instructions=INSTRUCTIONS)
    for name, doc in TOOL_DOCS.items():
        server.add_tool(as_tool_error(getattr(tools, name)), name=name, description=doc)
    return server


@contextlib.asynccontextmanager
async def memory_service(settings: Settings) -> AsyncIterator[MemoryService]:
    """This process' stores, read service and publisher (as ``memstream serve`` holds them)."""
    from streams.runtime.reading import ReadService
    from streams.runtime.stores import Stores
    from streams.surface.api import MemoryPublisher

    stores = await Stores.open(settings)
    reads = ReadService(stores)
    reads.start()
    publisher = MemoryPublisher(settings)
    try:
        await publisher.start()
        yield MemoryService(stores, reads, publisher)
    finally:
        await publisher.stop()
        await reads.close()
        await stores.close()


async def run_stdio(settings: Settings, tenant: str) -> None:
    validate_id(tenant, "tenant_id")
    async with memory_service(settings) as service:
        await build_server(MemoryTools(service, Gate(tenant, None))).run_stdio_async()


def require_key(app: ASGIApp, gate: Gate) -> ASGIApp:
    """Refuse (401) every HTTP request without a valid key before the MCP session sees it."""

    async def guarded(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            header = headers.get("authorization")
            if gate.principal(header) is None:
                reason = MISSING_KEY if not header else "the API key is not valid (unknown, revoked or mistyped)"
                body = orjson.dumps({"error": reason, "field": None})
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="memstream"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


async def run_http(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    gate = Gate("", KeyStore(settings.keys_path))
    async with memory_service(settings) as service:
        server = build_server(MemoryTools(service, gate))
        app = require_key(server.streamable_http_app(streamable_http_path=MCP_PATH, host=host), gate)
        log.info("memstream mcp: streamable HTTP on http://%s:%d%s, keys %s", host, port, MCP_PATH, settings.keys_path)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        await uvicorn.Server(config).serve()


__all__ = ["MCP_PATH", "MemoryTools", "build_server", "run_http", "run_stdio"]
