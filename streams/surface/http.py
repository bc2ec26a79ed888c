"""``memstream serve``: the HTTP API (aiohttp) for agents that are not in Python.

Every route but ``/healthz`` needs ``Authorization: Bearer <key>`` (infra/api_keys.py); the key's tenant is the
tenant of every read and write, whatever the body says, and its role (read < write < admin) what it may do.
``--no-auth`` (loopback only) trusts every caller instead: the tenant then comes from the request.

Routes (the OpenAPI document, built by streams/surface/contract.py from the schemas that validate, is
``/openapi.json``):
- ``POST /v1/events``: one event object or a list; validated; answers what was accepted and what was rejected
  and why (``?wait=S`` also waits up to S seconds until the accepted events are in both stores).
- ``POST /v1/search``: scoped search with filters, ``k``, ``min_score``, ``mode`` (vector | hybrid).
- ``GET /v1/memories/{memory_id}``, ``GET /v1/memories/{memory_id}/history`` (its versions, oldest first),
  ``GET /v1/context?user_id=U[&agent_id=A][&budget=N][&format=text]``.
- ``GET /v1/memories`` (a page of a scope), ``PATCH`` / ``DELETE /v1/memories/{memory_id}``, ``DELETE
  /v1/memories`` (a whole user scope), ``POST /v1/memories/batch``: the Mem0-shaped routes that
  ``memstream.Memory(url=...)`` speaks (streams/surface/memories.py), ``?wait=S`` on the writes.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (broker, Redis and LanceDB answer), ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from infra.api_keys import KeyStore, Principal, Role
from infra.redis_store import IndexProgress
from infra.settings import Settings
from processors.reading import ContextBlock
from schemas.errors import ConfigError, MemStreamError, NotFoundError, SchemaError, StoreError
from schemas.events import DEFAULT_TENANT, MemoryEvent, as_integer, validate_id
from streams.runtime.gc_policy import freeze_periodically
from streams.runtime.gil_policy import favour_the_event_loop
from streams.runtime.reading import ReadService, SearchRequest
from streams.runtime.stores import Stores
from streams.surface.api import MemoryPublisher, hit_to_dict, row_to_dict, wait_until_materialized
from streams.surface.contract import (
    MAX_EVENTS_PER_REQUEST,
    MAX_PAGE,
    MAX_WAIT_S,
    openapi_document,
    validate_request,
)
from streams.surface.memories import DeleteOp, MemoryService, UpdateOp, expiry_ms, operation_from_dict, raise_for
from streams.surface.serve_group import stop_when_orphaned

log = logging.getLogger("memstream.http")

MAX_BODY_BYTES = 32 << 20
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
NOT_FOUND = "no such memory (or it was deleted)"  # the same words whether the id exists in another tenant or not
MISSING_KEY = "an API key is required: send 'Authorization: Bearer <key>' (keys: `memstream keys create`)"

# What each route needs: None is open to anyone; a role is the least one a key must have.
ROUTE_ROLES: dict[str, Role | None] = {
    "/healthz": None,
    "/readyz": Role.READ,
    "/openapi.json": Role.READ,
    "/v1/search": Role.READ,
    "/v1/memories/{memory_id}": Role.READ,
    "/v1/memories/{memory_id}/history": Role.READ,
    "/v1/context": Role.READ,
    "/v1/events": Role.WRITE,
    "/metrics": Role.ADMIN,
    # The Mem0-shaped routes (issue 25): one path, a role per method where they differ.
    "/v1/memories": Role.READ,
    "DELETE /v1/memories": Role.WRITE,
    "PATCH /v1/memories/{memory_id}": Role.WRITE,
    "DELETE /v1/memories/{memory_id}": Role.WRITE,
    "/v1/memories/batch": Role.WRITE,
}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def problem(status: int, reason: str, field: str | None = None) -> web.Response:
    return json_response({"error": reason, "field": field}, status)


def unauthorized(reason: str) -> web.Response:
    challenge = 'Bearer realm="memstream"'
    if reason != MISSING_KEY:
        challenge += ', error="invalid_token"'
    return json_response({"error": reason, "field": None}, 401, headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request is from: a key's principal, or anyone (``--no-auth``: the tenant comes from the request)."""

    principal: Principal | None

    def tenant(self, asked: object, present: bool) -> str:
        """The tenant of the request: the key's. A ``tenant_id`` given in the request must be that one."""
        if present:
            validate_id(asked, "tenant_id")
        if self.principal is None:
            return str(asked) if present else DEFAULT_TENANT
        if present and asked != self.principal.tenant:
            raise Forbidden("tenant_id is not this API key's tenant: a key reads and writes its own tenant only")
        return self.principal.tenant


class Forbidden(Exception):
    """A request outside what its key may do (403), with the reason."""

    def __init__(self, reason: str, field: str | None = "tenant_id") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def authorize(keys: KeyStore | None, route: str, header: str | None, method: str = "GET") -> Caller | web.Response:
    """The caller of a request, or the refusal (401 without a valid key, 403 outside the key's role)."""
    what = f"{method} {route}" if f"{method} {route}" in ROUTE_ROLES else route
    if what != route:  # a method that needs more than the path's other methods
        needed: Role | None = ROUTE_ROLES[what]
    elif route not in ROUTE_ROLES:  # unmatched: let the router answer 404/405, but only to a valid key
        needed = Role.READ
    else:
        needed = ROUTE_ROLES[route]
    if needed is None or keys is None:
        return Caller(None)
    if not header:
        return unauthorized(MISSING_KEY)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return unauthorized("the Authorization header must read 'Bearer <key>'")
    principal = keys.authenticate(token.strip())
    if principal is None:
        return unauthorized("the API key is not valid (unknown, revoked or mistyped)")
    if not principal.role.allows(needed):
        return problem(403, f"this API key's role is {principal.role.value}; {what} needs {needed.value}")
    return Caller(principal)


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

    def render(
        self, reads: Counter[str], shared: dict[str, int], index: tuple[int, dict[int, int]] | None = None
    ) -> str:
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
        if index is not None:
            fresh_tail, positions = index
            out += [
                "# HELP memstream_fresh_tail_memories Memories searchable from Redis that LanceDB does not hold yet.",
                "# TYPE memstream_fresh_tail_memories gauge",
                f"memstream_fresh_tail_memories {fresh_tail}",
                "# HELP memstream_indexed_offset The index sink's next offset per partition of the embedded topic.",
                "# TYPE memstream_indexed_offset gauge",
            ]
            out += [f'memstream_indexed_offset{{partition="{p}"}} {o}' for p, o in sorted(positions.items())]
        return "\n".join(out) + "\n"


class Api:
    """The handlers, over one publisher and one read service for the whole process."""

    def __init__(self, settings: Settings, *, auth: bool = True, parent: int | None = None) -> None:
        self.settings = settings
        self.parent = parent  # a process of `serve --workers N`: the pid of the group's parent
        self.pid = str(os.getpid())  # X-Memstream-Pid: which process of the group answered
        self._orphan_watch: asyncio.Task[None] | None = None
        self._gc_freezer: asyncio.Task[None] | None = None
        self.keys = KeyStore(settings.keys_path) if auth else None
        self.metrics = Metrics()
        self._stores: Stores | None = None
        self._reads: ReadService | None = None
        self._publisher: MemoryPublisher | None = None
        self._memories: MemoryService | None = None

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
        self._memories = MemoryService(self._stores, self._reads, self._publisher)
        if self.parent is not None:
            self._orphan_watch = asyncio.create_task(stop_when_orphaned(self.parent))
        self._gc_freezer = asyncio.create_task(freeze_periodically())  # full GC passes stalled reads 0.2-0.7 s
        favour_the_event_loop()  # the warm's thread held the GIL 5 ms at a time: one connection's p99 after a load

    async def stop(self, _: web.Application) -> None:
        if self._orphan_watch is not None:
            self._orphan_watch.cancel()
        if self._gc_freezer is not None:
            self._gc_freezer.cancel()
        if self._publisher is not None:
            await self._publisher.stop()
        if self._reads is not None:
            await self._reads.close()
        if self._stores is not None:
            await self._stores.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self.observe, self.authenticate])
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.on_response_prepare.append(self.stamp)
        app.router.add_post("/v1/events", self.ingest)
        app.router.add_post("/v1/search", self.search)
        app.router.add_get("/v1/memories/{memory_id}", self.get)
        self.add_memory_routes(app)
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
        except NotFoundError as exc:  # another tenant's id answers exactly like a missing one
            response = problem(404, NOT_FOUND, exc.field)
        except SchemaError as exc:
            response = problem(400, exc.reason, exc.field)
        except Forbidden as exc:
            response = problem(403, exc.reason, exc.field)
        except StoreError as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            response = problem(503, str(exc))
        except MemStreamError as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            response = problem(503 if exc.retriable else 500, str(exc))
        self.metrics.observe(route, response.status, time.perf_counter() - started)
        return response

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every route but /healthz needs a valid key with the role the route needs; the caller rides along."""
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        caller = authorize(self.keys, route, request.headers.get("Authorization"), request.method)
        if isinstance(caller, web.Response):
            return caller
        request["caller"] = caller
        return await handler(request)

    async def ingest(self, request: web.Request) -> web.Response:
        caller: Caller = request["caller"]
        body = await _json_body(request)
        single = not isinstance(body, list)
        if single:
            validate_request("EventInput", body)
        items = [body] if single else body
        if len(items) > MAX_EVENTS_PER_REQUEST:
            raise SchemaError(f"at most {MAX_EVENTS_PER_REQUEST} events per request")
        for index, item in enumerate(items):  # the list's shape is the request's; each object's content is its own
            if not isinstance(item, dict):
                raise SchemaError(f"event {index} is not a JSON object; nothing was published")
        wait_s = _float_param(request, "wait", 0.0, 0.0, MAX_WAIT_S)
        valid: list[tuple[int, MemoryEvent]] = []
        rejected: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            try:
                validate_request("EventInput", item)
                tenant = caller.tenant(item.get("tenant_id"), "tenant_id" in item)
                valid.append((index, self.publisher.factory.from_input({**item, "tenant_id": tenant})))
            except SchemaError as exc:
                if single:
                    raise
                rejected.append({"index": index, "reason": exc.reason, "field": exc.field})
            except Forbidden as exc:  # one event for another tenant: nothing of the request is sent
                raise Forbidden(f"event {index}: {exc.reason}; nothing was published") from None
        accepted: list[tuple[int, MemoryEvent]] = []
        for index, event in valid:
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
        return json_response(answer)

    async def search(self, request: web.Request) -> web.Response:
        """A search of one user of the caller's tenant, or of all its users when asked so explicitly."""
        caller: Caller = request["caller"]
        body = validate_request("SearchRequest", await _json_body(request))  # k=440.0 comes back as 440
        tenant = caller.tenant(body.get("tenant_id"), "tenant_id" in body)
        min_score = body.get("min_score")
        search = SearchRequest(
            query=body["query"],
            tenant_id=tenant,
            user_id=body.get("user_id"),
            agent_id=body.get("agent_id"),
            run_id=body.get("run_id"),
            k=body.get("k", 10),
            filters=body.get("filters"),
            min_score=float(min_score) if min_score is not None else None,
            mode=body.get("mode", "vector"),
            whole_tenant=bool(body.get("all_users", False)),
        )
        hits = await self.reads.search(search)
        return json_response({"hits": [hit_to_dict(h) for h in hits]})

    async def get(self, request: web.Request) -> web.Response:
        """A memory of the caller's tenant; another tenant's answers exactly as a missing one does."""
        caller: Caller = request["caller"]
        memory_id = request.match_info["memory_id"]
        validate_id(memory_id, "memory_id")
        tenant = caller.tenant(request.query.get("tenant_id"), "tenant_id" in request.query)
        row = await self.reads.get(tenant, memory_id)
        if row is None:
            return problem(404, NOT_FOUND, "memory_id")
        return json_response(row_to_dict(row))

    async def context(self, request: web.Request) -> web.StreamResponse:
        caller: Caller = request["caller"]
        query = request.query
        tenant = caller.tenant(query.get("tenant_id"), "tenant_id" in query)
        if "user_id" not in query:
            raise SchemaError("'user_id' is required", field="user_id")
        user_id = validate_id(query.get("user_id"), "user_id")
        agent_id = validate_id(query.get("agent_id"), "agent_id") if "agent_id" in query else None
        fmt = query.get("format", "json")
        if fmt not in ("json", "text"):
            raise SchemaError("'format' must be json or text", field="format")
        block: ContextBlock = await self.reads.context(
            tenant_id=tenant,
            user_id=str(user_id),
            agent_id=agent_id,
            budget=_int_param(request, "budget", 16, 100_000),
        )
        if fmt == "text":
            return web.Response(text=block.text, content_type="text/plain")
        return json_response(block.to_dict())

    # ------------------------------------------------------------------ the Mem0-shaped routes (issue 25)

    @property
    def memories(self) -> MemoryService:
        assert self._memories is not None, "the server is not started"
        return self._memories

    def add_memory_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/memories", self.list_memories)
        app.router.add_delete("/v1/memories", self.delete_scope)
        # Every method: "batch" also matches /v1/memories/{memory_id}, and a 405 would advertise that path's
        # methods. aiohttp resolves this plain path before the template, so every method of /v1/memories/batch
        # lands here: a memory named "batch" is listed, and changed through this route, not read by its path.
        app.router.add_route("*", "/v1/memories/batch", self.batch)
        app.router.add_patch("/v1/memories/{memory_id}", self.update_memory)
        app.router.add_delete("/v1/memories/{memory_id}", self.delete_memory)
        app.router.add_get("/v1/memories/{memory_id}/history", self.memory_history)

    async def list_memories(self, request: web.Request) -> web.Response:
        """A page of a scope of the caller's tenant, in memory-id order."""
        tenant, scope = _scope_query(request)
        raw_filters = request.query.get("filters")
        filters = None
        if raw_filters is not None:
            try:
                filters = orjson.loads(raw_filters)
            except orjson.JSONDecodeError:
                raise SchemaError("'filters' must be a JSON object", field="filters") from None
            try:
                validate_request("Filters", filters)
            except SchemaError as exc:  # the query parameter is at fault, as search's body member would be
                raise SchemaError(exc.reason, field="filters") from None
        page = await self.memories.page(
            tenant,
            **scope,
            filters=filters,
            limit=_int_param(request, "limit", 1, MAX_PAGE) or 100,
            cursor=_id_param(request, "cursor"),
        )
        return json_response(page)

    async def memory_history(self, request: web.Request) -> web.Response:
        """Every kept version of a memory of the caller's tenant, oldest first; none (absent, not indexed yet, or
        another tenant's id) answers 404 as a missing memory does."""
        caller: Caller = request["caller"]
        memory_id = request.match_info["memory_id"]
        validate_id(memory_id, "memory_id")
        tenant = caller.tenant(request.query.get("tenant_id"), "tenant_id" in request.query)
        entries = await self.memories.history(tenant, memory_id)
        if not entries:
            return problem(404, NOT_FOUND, "memory_id")
        return json_response({"results": entries})

    async def delete_scope(self, request: web.Request) -> web.Response:
        """Every live memory of a scope of the caller's tenant; user_id is required, so never a whole tenant."""
        tenant, scope = _scope_query(request)
        wait_s = _float_param(request, "wait", 0.0, 0.0, MAX_WAIT_S)
        return json_response(await self.memories.delete_all(tenant, **scope, wait_s=wait_s))

    async def batch(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        body = await _json_body(request)
        validate_request("BatchRequest", body)
        tenant = _tenant_query(request)
        ops = [operation_from_dict(item) for item in body["operations"]]
        wait_s = _float_param(request, "wait", 0.0, 0.0, MAX_WAIT_S)
        return json_response({"results": await self.memories.apply(tenant, ops, wait_s)})

    async def update_memory(self, request: web.Request) -> web.Response:
        memory_id = str(validate_id(request.match_info["memory_id"], "memory_id"))
        body = await _json_body(request)
        validate_request("MemoryUpdate", body)
        op = UpdateOp(memory_id, body.get("text"), body.get("metadata"), expiry_ms(body.get("expires_at")))
        return await self._one(request, op)

    async def delete_memory(self, request: web.Request) -> web.Response:
        memory_id = str(validate_id(request.match_info["memory_id"], "memory_id"))
        return await self._one(request, DeleteOp(memory_id))

    async def _one(self, request: web.Request, op: UpdateOp | DeleteOp) -> web.Response:
        tenant = _tenant_query(request)
        wait_s = _float_param(request, "wait", 0.0, 0.0, MAX_WAIT_S)
        [outcome] = await self.memories.apply(tenant, [op], wait_s)
        raise_for(outcome)  # not_found: 404, invalid: 400 (the middleware answers)
        return json_response(outcome)

    async def stamp(self, _: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Memstream-Pid"] = self.pid

    async def health(self, _: web.Request) -> web.Response:
        return json_response({"status": "ok", "pid": os.getpid()})

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
        index: tuple[int, dict[int, int]] | None
        try:
            shared = await self.stores.counters.read()
            progress = IndexProgress(self.stores.redis, self.settings.redis_prefix)
            index = (await self.stores.cache.pending_count(), await progress.read(self.settings.topics.embedded))
        except StoreError:
            shared, index = {}, None
        text = self.metrics.render(self.reads.totals, shared, index)
        return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Format": "0.0.4"})

    async def openapi(self, _: web.Request) -> web.Response:
        return json_response(openapi_document())


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"the body is not valid JSON: {exc}") from None


def _int_param(request: web.Request, name: str, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        number: object = int(raw)
    except ValueError:
        try:
            number = float(raw)  # 440.0 or 4.4e2: an integer as JSON Schema defines one (as_integer)
        except ValueError:
            raise SchemaError(f"'{name}' must be an integer", field=name) from None
    return as_integer(number, name, low=low, high=high)


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


def _tenant_query(request: web.Request) -> str:
    caller: Caller = request["caller"]
    return caller.tenant(request.query.get("tenant_id"), "tenant_id" in request.query)


def _id_param(request: web.Request, name: str, *, required: bool = False) -> str | None:
    if name not in request.query:
        if required:
            raise SchemaError(f"'{name}' is required", field=name)
        return None
    return validate_id(request.query[name], name)


def _scope_query(request: web.Request) -> tuple[str, dict[str, Any]]:
    """The tenant and the (user, agent, run) scope a memories route names in its query; user_id is required."""
    scope = {
        "user_id": _id_param(request, "user_id", required=True),
        "agent_id": _id_param(request, "agent_id"),
        "run_id": _id_param(request, "run_id"),
    }
    return _tenant_query(request), scope


def check_no_auth(host: str) -> None:
    """``--no-auth`` trusts every caller: only on a loopback address, where the callers are this machine's."""
    if host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"--no-auth serves without API keys, so only on loopback (127.0.0.1, ::1, localhost), not {host!r}: "
            "make a key with `memstream keys create --tenant T --role write` instead"
        )


class MalformedHttpFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP (a NUL byte in a header...) at ERROR with a traceback, after
    answering it 400: the client's fault, not the server's, so one warning line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = (exc.message or type(exc).__name__).strip().splitlines()[0]
            record.msg = f"{record.getMessage()}: malformed HTTP answered 400 ({first})"
            record.args = None
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def announce(settings: Settings, host: str, port: int, *, auth: bool) -> None:
    """The warnings a server starts with, said once (not by each process of ``--workers``)."""
    if not auth:
        check_no_auth(host)
        log.warning("serving WITHOUT authentication on %s:%d (--no-auth): any local process is trusted", host, port)
    elif not any(k.active for k in KeyStore(settings.keys_path).entries()):
        log.warning(
            "no API key in %s: every request but /healthz will be refused until one is made "
            "(memstream keys create --tenant T --role read|write|admin)",
            settings.keys_path,
        )


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    auth: bool = True,
    sock: socket.socket | None = None,
    parent: int | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (aiohttp's run_app handles both and runs the cleanup hooks). ``sock``: serve this
    listening socket instead of binding ``host:port`` (a process of ``--workers``, which stops when ``parent``
    is gone)."""
    logging.getLogger("aiohttp.server").addFilter(MalformedHttpFilter())
    if not auth:
        check_no_auth(host)
    app = Api(settings, auth=auth, parent=parent).app()

    def say(message: str) -> None:
        log.info("%s (process %d)", message.strip(), os.getpid())

    if sock is not None:
        web.run_app(app, sock=sock, print=say, access_log=None)
    else:
        web.run_app(app, host=host, port=port, print=say, access_log=None)
