"""The read commands: ``memstream context``, ``warmup`` and ``serve`` (registered in streams/surface/cli/main.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from typing import Any

from infra.settings import Settings
from schemas.errors import SchemaError
from schemas.events import DEFAULT_TENANT
from streams.runtime.stores import preflight, resolve_services
from streams.surface.api import MemoryReader, dumps
from streams.surface.operations import warmup

log = logging.getLogger("memstream.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_read_commands(sub: Any) -> None:
    p = sub.add_parser(
        "context",
        help="the prompt-ready memory block of a user (or a user's agent)",
        description="Prints the block an agent pastes into its prompt: the most important (metadata.importance or "
        "pinned) then most recent memories of the scope that fit the token budget (tokens estimated as characters "
        "/ 4). One round trip when the stream-maintained block is current; rebuilt from LanceDB when it is not.",
    )
    p.add_argument("--user", required=True)
    p.add_argument("--agent", help="only this agent's memories (default: all the user's)")
    p.add_argument("--tenant", default=DEFAULT_TENANT)
    p.add_argument("--budget", type=int, help="token budget (default MEMSTREAM_CONTEXT_BUDGET, 1000)")
    p.add_argument("--json", action="store_true", help="machine-readable output (block, ids, tokens)")

    p = sub.add_parser(
        "warmup",
        help="refill Redis and the context blocks of the hottest scopes from LanceDB",
        description="Takes the most-read scopes (Redis keeps a ranking; after a Redis restart, the scopes with the "
        "most recently changed memories in LanceDB), copies their memories from LanceDB into Redis by "
        "compare-and-set (a newer version in Redis is never overwritten) and builds their context blocks.",
    )
    p.add_argument("--scopes", type=int, default=1_000, help="how many scopes (default 1000)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "serve",
        help="the HTTP API: ingest, search, get, context, health, readiness, Prometheus /metrics, /openapi.json",
        description="Serves until SIGINT/SIGTERM. Settings MEMSTREAM_SERVE_HOST / _PORT (127.0.0.1:8750) unless "
        "--host / --port are given. Every route but /healthz needs 'Authorization: Bearer <key>' with a key from "
        "`memstream keys create` (kept as hashes in MEMSTREAM_API_KEYS_FILE, default <home>/api-keys.json).",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys: every caller is trusted and names its tenant (refused on any non-loopback address)",
    )
    p.add_argument(
        "--workers",
        dest="serve_workers",
        type=int,
        help="server processes sharing the port, each with its own connections and caches (default "
        "MEMSTREAM_SERVE_WORKERS, 0: one per core); 1 serves in this process",
    )
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # a process of --workers: its socket


def cmd_context(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)

    async def run() -> dict[str, Any]:
        async with MemoryReader(settings) as reader:
            block = await reader.context(
                tenant_id=args.tenant, user_id=args.user, agent_id=args.agent, budget=args.budget
            )
        return block.to_dict()

    try:
        block = asyncio.run(run())
    except SchemaError as exc:
        print(f"memstream context: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(dumps(block))
    else:
        print(block["text"] or "(no memories)")
    return EXIT_OK


def cmd_warmup(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)
    report = asyncio.run(warmup(settings, args.scopes, progress=not args.json))
    if args.json:
        print(dumps(report))
    else:
        print(
            f"warmed {report['scopes']} scopes: {report['memories_refilled']} memories copied into Redis, "
            f"{report['blocks_built']} context blocks built ({report['failed']} failed)"
        )
    return EXIT_OK if not report["failed"] else EXIT_FAILED


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from streams.surface.http import announce, check_no_auth, serve
    from streams.surface.serve_group import default_workers, run_group

    host = args.host or settings.serve_host
    port = args.port or settings.serve_port
    if args.no_auth:
        check_no_auth(host)  # before anything starts: a refusal is one line, not a half-started server
    if args.serve_workers is not None:
        settings = settings.with_(serve_workers=args.serve_workers)
        settings.validate()
    # No fixed mmap threshold here (infra/memory.py; the worker keeps it): a search that scans (a table or rows
    # the sink has not indexed yet) allocates large buffers and frees them at once, and mapping each afresh (page
    # faults, zeroed pages) tripled its CPU (15 -> 44 ms on 10k unindexed memories). With the scalar indexes the
    # two measured the same (~9 ms a search, tools/perf/serve_load.py). A reader does not merge: no heap growth.
    settings = resolve_services(settings, start=False)
    if args.listen_fd is not None:  # one process of a group: the parent checked and announced everything
        parent = os.getppid()
        sock = socket.socket(fileno=args.listen_fd)
        serve(settings, host, port, auth=not args.no_auth, sock=sock, parent=parent)
        return EXIT_OK
    asyncio.run(preflight(settings))
    announce(settings, host, port, auth=not args.no_auth)
    workers = settings.serve_workers or default_workers()
    if workers == 1:
        serve(settings, host, port, auth=not args.no_auth)
        return EXIT_OK
    return run_group(settings, host, port, workers, auth=not args.no_auth)
