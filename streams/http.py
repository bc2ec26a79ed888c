"""``memstream serve``: the HTTP API (aiohttp) for agents that are not in Python.

Routes (the OpenAPI document, streams/openapi.json, is served at ``/openapi.json``):
- ``POST /v1/events``: one event object or a list; validated; answers what was accepted and what was rejected
  and why (``?wait=S`` also waits up to S seconds until the accepted events are in both stores).
- ``POST /v1/search``: scoped search with filters, ``k``, ``min_score``, ``mode`` (vector | hybrid).
- ``GET /v1/memories/{memory_id}``, ``GET /v1/context?user_id=U[&agent_id=A][&budget=N][&format=text]``.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (broker, Redis and LanceDB answer), ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from infra.settings import Settings
from processors.reading import ContextBlock
from schemas.errors import MemStreamError, SchemaError, StoreError
from schemas.events import DEFAULT_TENANT, MemoryEvent
from streams.api import MemoryPublisher, hit_to_dict, row_to_dict, wait_until_materialized
from streams.reading import ReadService, SearchRequest
from streams.runtime import Stores

log = logging.getLogger("memstream.http")

MAX_EVENTS_PER_REQUEST = 10_000
MAX_BODY_BYTES = 32 << 20
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def openapi_document() -> bytes:
    return resources.files("streams").joinpath("openapi.json").read_bytes()


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def problem(status: int, reason: str, field: str | None = None) -> web.Response:
    return json_response({"error": reason, "field": field}, status)


class Metrics:
    """Request counts and latency histograms per route, in the Prometheus text format (no client library)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.counts: Counter[str] = Counter()

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] += 1
        buckets = self.buckets.setdefault(route, [0] * len(LATENCY_BUCKETS_S))
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                buckets[i] += 1
        self.sums[route] = self.sums.get(route, 0.0) + seconds
        self.counts[route] += 1

    def render(self, reads: Counter[str], shared: dict[str, int]) -> str:
        out = [
            "# HELP memstream_http_requests_total HTTP requests by route and status.",
            "# TYPE memstream_http_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'memstream_http_requests_total{{route="{route}",status="{status}"}} {n}')
        out += [
            "# HELP memstream_http_request_duration_seconds HTTP request latency by route.",
            "# TYPE memstream_http_request_duration_seconds histogram",
        ]
        for route, buckets in sorted(self.buckets.items()):
            for bound, n in zip(LATENCY_BUCKETS_S, buckets, strict=True):
                out.append(f'memstream_http_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {n}')
            out.append(
                f'memstream_http_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {self.counts[route]}'
            )
            out.append(f'memstream_http_request_duration_seconds_sum{{route="{route}"}} {self.sums[route]:.6f}')
            out.append(f'memstream_http_request_duration_seconds_count{{route="{route}"}} {self.counts[route]}')
        out += [
            "# HELP memstream_reads_total Reads served by this process, by kind (get, search, context) and layer.",
            "# TYPE memstream_reads_total counter",
        ]
        for name, n in sorted(reads.items()):
            parts = name.split("_")  # read_<kind>_<layer>
            if len(parts) == 3 and parts[1] in ("get", "search", "context"):
                out.append(f'memstream_reads_total{{kind="{parts[1]}",layer="{parts[2]}"}} {n}')
        out += [
            "# HELP memstream_read_redis_fallbacks_total Reads served from LanceDB because Redis failed.",
            "# TYPE memstream_read_redis_fallbacks_total counter",
            f"memstream_read_redis_fallbacks_total {reads.get('read_redis_fallbacks', 0)}",
        ]
        out += [
            "# HELP memstream_pipeline_total Shared counters of every worker and reader (memstream stats).",
            "# TYPE memstream_pipeline_total counter",
        ]
        for name, n in sorted(shared.items()):
            out.append(f'memstream_pipeline_total{{name="{name}"}} {n}')
        return "\n".join(out) + "\n"


class Api:
    """The handlers, over one publisher and one read service for the whole process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._stores: Stores | None = None
        self._reads: ReadService | None = None
        self._publisher: MemoryPublisher | None = None

    @property
    def stores(self) -> Stores:
        assert self._stores is not None, "the server is not started"
        return self._stores

    @property
    def reads(self) -> ReadService:
        assert self._reads is not None, "the server is not started"
        return self._reads

    @property
    def publisher(self) -> MemoryPublisher:
        assert self._publisher is not None, "the server is not started"
        return self._publisher

    async def start(self, _: web.Application) -> None:
        self._stores = await Stores.open(self.settings)
        self._reads = ReadService(self._stores)
        self._reads.start()
        self._publisher = MemoryPublisher(self.settings)
        await self._publisher.start()

    async def stop(self, _: web.Application) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
        if self._reads is not None:
            await self._reads.close()
        if self._stores is not None:
            await self._stores.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self.observe])
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_post("/v1/events", self.ingest)
        app.router.add_post("/v1/search", self.search)
        app.router.add_get("/v1/memories/{memory_id}", self.get)
        app.router.add_get("/v1/context", self.context)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/readyz", self.ready)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    @web.middleware
    async def observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Time every request; turn input errors into 400 and store outages into 503, with the reason."""
        started = time.perf_counter()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        except SchemaError as exc:
            response = problem(400, exc.reason, exc.field)
        except StoreError as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            response = problem(503, str(exc))
        except MemStreamError as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            response = problem(503 if exc.retriable else 500, str(exc))
        self.metrics.observe(route, response.status, time.perf_counter() - started)
        return response

    async def ingest(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        items = body if isinstance(body, list) else [body]
        if len(items) > MAX_EVENTS_PER_REQUEST:
            return problem(413, f"at most {MAX_EVENTS_PER_REQUEST} events per request")
        wait_s = _float_param(request, "wait", 0.0, 0.0, 600.0)
        accepted: list[tuple[int, MemoryEvent]] = []
        rejected: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise SchemaError("each event must be a JSON object")
                event = self.publisher.factory.from_input(item)
            except SchemaError as exc:
                rejected.append({"index": index, "reason": exc.reason, "field": exc.field})
                continue
            await self.publisher.send(event)
            accepted.append((index, event))
        await self.publisher.flush()
        answer: dict[str, Any] = {
            "accepted": [
                {"index": i, "memory_id": e.memory_id, "event_id": e.event_id, "version": e.version, "op": e.op.value}
                for i, e in accepted
            ],
            "rejected": rejected,
        }
        if wait_s and accepted:
            missing = await wait_until_materialized(self.stores, [e for _, e in accepted], timeout=wait_s)
            answer["not_materialized"] = sorted({e.memory_id for e in missing})
        status = 200 if accepted or not rejected else 400
        return json_response(answer, status)

    async def search(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise SchemaError("the search body must be a JSON object")
        known = {"query", "tenant_id", "user_id", "agent_id", "run_id", "k", "filters", "min_score", "mode"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise SchemaError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
        query = body.get("query")
        if not isinstance(query, str):
            raise SchemaError("'query' must be a string", field="query")
        filters = body.get("filters")
        if filters is not None and not isinstance(filters, dict):
            raise SchemaError("'filters' must be an object", field="filters")
        k = body.get("k", 10)
        min_score = body.get("min_score")
        if not isinstance(k, int) or isinstance(k, bool):
            raise SchemaError("'k' must be an integer", field="k")
        if min_score is not None and not isinstance(min_score, int | float):
            raise SchemaError("'min_score' must be a number", field="min_score")
        search = SearchRequest(
            query=query,
            tenant_id=body.get("tenant_id", DEFAULT_TENANT),
            user_id=body.get("user_id"),
            agent_id=body.get("agent_id"),
            run_id=body.get("run_id"),
            k=k,
            filters=filters,
            min_score=float(min_score) if min_score is not None else None,
            mode=body.get("mode", "vector"),
        )
        hits = await self.reads.search(search)
        return json_response({"hits": [hit_to_dict(h) for h in hits]})

    async def get(self, request: web.Request) -> web.Response:
        row = await self.reads.get(request.query.get("tenant_id", DEFAULT_TENANT), request.match_info["memory_id"])
        if row is None:
            return problem(404, "no such memory (or it was deleted)")
        return json_response(row_to_dict(row))

    async def context(self, request: web.Request) -> web.StreamResponse:
        user_id = request.query.get("user_id")
        if not user_id:
            raise SchemaError("'user_id' is required", field="user_id")
        budget = request.query.get("budget")
        block: ContextBlock = await self.reads.context(
            tenant_id=request.query.get("tenant_id", DEFAULT_TENANT),
            user_id=user_id,
            agent_id=request.query.get("agent_id"),
            budget=int(_float_param(request, "budget", 0, 16, 100_000)) if budget else None,
        )
        if request.query.get("format") == "text":
            return web.Response(text=block.text, content_type="text/plain")
        return json_response(block.to_dict())

    async def health(self, _: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def ready(self, _: web.Request) -> web.Response:
        """Ready when Redis and LanceDB answer and the broker connection is up (each checked now)."""
        checks: dict[str, str] = {}

        async def check(name: str, probe: Callable[[], Awaitable[Any]]) -> None:
            try:
                await asyncio.wait_for(probe(), 2.0)
                checks[name] = "ok"
            except Exception as exc:  # readiness reports any failure, whatever raised it
                checks[name] = f"failed: {exc}"

        await asyncio.gather(
            check("redis", lambda: self.stores.redis.ping()),
            check("lancedb", lambda: self.stores.vectors.count(live_only=False)),
            check("kafka", self._broker_probe),
        )
        ok = all(v == "ok" for v in checks.values())
        return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)

    async def _broker_probe(self) -> None:
        from infra.kafka import ensure_topics

        await ensure_topics(self.settings)

    async def prometheus(self, _: web.Request) -> web.Response:
        await self.reads.flush_counters()
        try:
            shared = await self.stores.counters.read()
        except StoreError:
            shared = {}
        text = self.metrics.render(self.reads.totals, shared)
        return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Format": "0.0.4"})

    async def openapi(self, _: web.Request) -> web.Response:
        return web.Response(body=openapi_document(), content_type="application/json")


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"the body is not valid JSON: {exc}") from None


def _float_param(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SchemaError(f"'{name}' must be a number", field=name) from None
    if not low <= value <= high:
        raise SchemaError(f"'{name}' must be between {low:g} and {high:g}", field=name)
    return value


def serve(settings: Settings, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM (aiohttp's run_app handles both and runs the cleanup hooks)."""
    web.run_app(Api(settings).app(), host=host, port=port, print=lambda msg: log.info("%s", msg), access_log=None)
