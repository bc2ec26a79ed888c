"""``memstream mcp``: the Model Context Protocol server for agents (registered in streams/surface/cli/main.py)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from infra.settings import Settings
from schemas.events import DEFAULT_TENANT
from streams.runtime.stores import preflight, resolve_services

EXIT_OK = 0


def add_agent_commands(sub: Any) -> None:
    p = sub.add_parser(
        "mcp",
        help="the Model Context Protocol server: memory tools for agents (stdio, or streamable HTTP with --http)",
        description="Serves the tools add_memory, search_memories, get_memory, list_memories, update_memory and "
        "delete_memory (the official MCP SDK) until the client disconnects or SIGINT. By default over stdio: an "
        "MCP client spawns `memstream mcp` with the MEMSTREAM_* settings, and the tenant is --tenant. With --http "
        "PORT, streamable HTTP on http://HOST:PORT/mcp: every request needs 'Authorization: Bearer <key>' (keys "
        "from `memstream keys create`, as for `serve`); the key's tenant is the wall and its role decides "
        "(read: search, get, list; write: also add, update, delete). A `memstream worker` must run for writes "
        "to become searchable.",
    )
    p.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on this port instead of stdio")
    p.add_argument("--host", help="with --http: the address (default MEMSTREAM_SERVE_HOST, 127.0.0.1)")
    p.add_argument("--tenant", default=DEFAULT_TENANT, help="over stdio: the tenant (default: default)")


def cmd_mcp(args: argparse.Namespace, settings: Settings) -> int:
    from streams.surface.mcp_server import run_http, run_stdio

    settings = resolve_services(settings, start=False)
    asyncio.run(preflight(settings))
    if args.http is not None:
        asyncio.run(run_http(settings, args.host or settings.serve_host, args.http))
    else:
        asyncio.run(run_stdio(settings, args.tenant))
    return EXIT_OK
