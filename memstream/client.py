"""``AsyncMemory`` and ``Memory``: the Mem0-shaped API, in-process or over HTTP, answering alike.

Two backends behind one front:

- direct (``AsyncMemory.from_env()`` or ``AsyncMemory(settings)``): the stores, read service and publisher in this
  process, through streams/surface/memories.py (what the HTTP routes run too);
- HTTP (``AsyncMemory(url=..., api_key=...)``): the ``/v1/memories*`` and ``/v1/search`` routes of
  ``memstream serve``; the tenant is the key's.

The front checks the arguments (so both modes refuse the same input the same way, before anything is sent),
turns Mem0 messages into memories and shapes the answers. ``Memory`` runs an ``AsyncMemory`` on an event loop of
its own, in a background thread, so it works from plain scripts and from threads that have a loop of their own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import orjson

from infra.settings import Settings
from schemas.errors import AuthError, NotFoundError, SchemaError, ServiceError, StoreError
from schemas.events import DEFAULT_TENANT, validate_id
from streams.surface.memories import (
    DeleteOp,
    MemoryService,
    Operation,
    UpdateOp,
    add_operations,
    expiry_ms,
    iso_time,
    operation_to_dict,
    raise_for,
    wait_seconds,
)

T = TypeVar("T")
MODES = ("vector", "hybrid")
BATCH_PATH_ID = "batch"  # /v1/memories/batch is the batch route, not the memory named "batch"
HTTP_SLACK_S = 60.0  # an HTTP request may take this much longer than the wait it asks for


class Backend(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def apply(self, ops: Sequence[Operation], wait_s: float) -> list[dict[str, Any]]: ...
    async def search(self, query: str, scope: dict[str, Any], **options: Any) -> dict[str, Any]: ...
    async def get(self, memory_id: str) -> dict[str, Any] | None: ...
    async def page(self, scope: dict[str, Any], **options: Any) -> dict[str, Any]: ...
    async def history(self, memory_id: str) -> list[dict[str, Any]]: ...
    async def one(self, op: UpdateOp | DeleteOp, wait_s: float) -> dict[str, Any]: ...
    async def delete_all(self, scope: dict[str, Any], wait_s: float) -> dict[str, Any]: ...


class DirectBackend:
    """This process' own stores and publisher (what ``memstream serve`` runs per request)."""

    def __init__(self, settings: Settings, tenant_id: str) -> None:
        self.settings = settings
        self.tenant_id = tenant_id
        self._service: MemoryService | None = None

    async def open(self) -> None:
        from streams.runtime.reading import ReadService
        from streams.runtime.stores import Stores
        from streams.surface.api import MemoryPublisher

        stores = await Stores.open(self.settings)
        reads = ReadService(stores)
        reads.start()
        publisher = MemoryPublisher(self.settings)
        try:
            await publisher.start()
        except BaseException:
            await reads.close()
            await stores.close()
            raise
        self._service = MemoryService(stores, reads, publisher)

    async def close(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            await service.publisher.stop()
            await service.reads.close()
            await service.stores.close()

    @property
    def service(self) -> MemoryService:
        assert self._service is not None, "not open"
        return self._service

    async def apply(self, ops: Sequence[Operation], wait_s: float) -> list[dict[str, Any]]:
        return await self.service.apply(self.tenant_id, ops, wait_s)

    async def search(self, query: str, scope: dict[str, Any], **options: Any) -> dict[str, Any]:
        return await self.service.search(self.tenant_id, query, **scope, **options)

    async def get(self, memory_id: str) -> dict[str, Any] | None:
        return await self.service.get(self.tenant_id, memory_id)

    async def page(self, scope: dict[str, Any], **options: Any) -> dict[str, Any]:
        return await self.service.page(self.tenant_id, **scope, **options)

    async def history(self, memory_id: str) -> list[dict[str, Any]]:
        return await self.service.history(self.tenant_id, memory_id)

    async def one(self, op: UpdateOp | DeleteOp, wait_s: float) -> dict[str, Any]:
        [outcome] = await self.service.apply(self.tenant_id, [op], wait_s)
        return dict(raise_for(outcome))

    async def delete_all(self, scope: dict[str, Any], wait_s: float) -> dict[str, Any]:
        return await self.service.delete_all(self.tenant_id, **scope, wait_s=wait_s)


class HttpBackend:
    """``memstream serve`` over HTTP: the same operations, run by the server's MemoryService."""

    def __init__(self, url: str, api_key: str | None, tenant_id: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.tenant = {"tenant_id": tenant_id} if tenant_id is not None else {}  # else: the key's
        self._http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._http = aiohttp.ClientSession(headers=self.headers)

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        wait_s: float = 0.0,
    ) -> tuple[int, Any]:
        assert self._http is not None, "not open"
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        timeout = aiohttp.ClientTimeout(total=wait_s + HTTP_SLACK_S)
        data = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._http.request(
                method, self.url + path, params=query, data=data, headers=headers, timeout=timeout
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceError(f"memstream serve at {self.url} did not answer {method} {path}: {exc!r}") from exc
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = {"error": raw[:200].decode(errors="replace")}
        if status >= 400 and status != 404:
            _raise_http(status, payload)
        return status, payload

    async def apply(self, ops: Sequence[Operation], wait_s: float) -> list[dict[str, Any]]:
        body = {"operations": [operation_to_dict(op) for op in ops]}
        _, payload = await self._call(
            "POST", "/v1/memories/batch", params={**self.tenant, "wait": wait_s}, body=body, wait_s=wait_s
        )
        results: list[dict[str, Any]] = payload["results"]
        return results

    async def search(self, query: str, scope: dict[str, Any], **options: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, **self.tenant, **{k: v for k, v in scope.items() if v is not None}}
        body["k"] = options["top_k"]
        body["mode"] = options["mode"]
        if options.get("filters") is not None:
            body["filters"] = options["filters"]
        if options.get("threshold") is not None:
            body["min_score"] = options["threshold"]
        _, payload = await self._call("POST", "/v1/search", body=body)
        return {"results": [_item_from_http(hit) for hit in payload["hits"]]}

    async def get(self, memory_id: str) -> dict[str, Any] | None:
        if memory_id == BATCH_PATH_ID:
            raise SchemaError(
                "a memory named 'batch' cannot be read by path over HTTP (/v1/memories/batch is the batch route): "
                "list its scope with get_all",
                field="memory_id",
            )
        status, payload = await self._call("GET", f"/v1/memories/{quote(memory_id)}", params=self.tenant)
        return None if status == 404 else _item_from_http(payload)

    async def history(self, memory_id: str) -> list[dict[str, Any]]:
        status, payload = await self._call("GET", f"/v1/memories/{quote(memory_id)}/history", params=self.tenant)
        return [] if status == 404 else list(payload["results"])

    async def page(self, scope: dict[str, Any], **options: Any) -> dict[str, Any]:
        params = {**self.tenant, **scope, "limit": options["limit"], "cursor": options.get("cursor")}
        if options.get("filters") is not None:
            params["filters"] = orjson.dumps(options["filters"]).decode()
        _, payload = await self._call("GET", "/v1/memories", params=params)
        return {"results": payload["results"], "next_cursor": payload["next_cursor"]}

    async def one(self, op: UpdateOp | DeleteOp, wait_s: float) -> dict[str, Any]:
        if op.memory_id == BATCH_PATH_ID:  # its path is the batch route's: the batch route changes it alike
            [outcome] = await self.apply([op], wait_s)
            return dict(raise_for(outcome))
        path = f"/v1/memories/{quote(op.memory_id)}"
        params = {**self.tenant, "wait": wait_s}
        if isinstance(op, UpdateOp):
            pairs = (("text", op.text), ("metadata", op.metadata), ("expires_at", op.expires_at))
            body = {k: v for k, v in pairs if v is not None}
            status, payload = await self._call("PATCH", path, params=params, body=body, wait_s=wait_s)
        else:
            status, payload = await self._call("DELETE", path, params=params, wait_s=wait_s)
        if status == 404:
            raise NotFoundError(op.memory_id)
        return dict(payload)

    async def delete_all(self, scope: dict[str, Any], wait_s: float) -> dict[str, Any]:
        params = {**self.tenant, **scope, "wait": wait_s}
        _, payload = await self._call("DELETE", "/v1/memories", params=params, wait_s=wait_s)
        return dict(payload)


def _raise_http(status: int, payload: Any) -> None:
    """The exception an HTTP refusal stands for: the same classes the direct mode raises."""
    reason = str(payload.get("error") if isinstance(payload, dict) else payload)
    field = payload.get("field") if isinstance(payload, dict) else None
    if status in (400, 413):
        raise SchemaError(reason, field=field)
    if status in (401, 403):
        raise AuthError(f"memstream serve refused the request ({status}): {reason}")
    raise StoreError(f"memstream serve answered {status}: {reason}")


def _item_from_http(hit: Mapping[str, Any]) -> dict[str, Any]:
    """A memory of /v1/search or GET /v1/memories/{id} (the older row shape) as the Mem0-shaped item."""
    item: dict[str, Any] = {"id": hit["memory_id"], "memory": hit["text"]}
    if "score" in hit:
        item["score"] = hit["score"]
    item.update(
        {
            "metadata": hit.get("metadata") or {},
            "user_id": hit["user_id"],
            "agent_id": hit.get("agent_id"),
            "run_id": hit.get("run_id"),
            "created_at": iso_time(int(hit.get("created_at") or hit["updated_at"])),  # absent from older servers
            "updated_at": iso_time(int(hit["updated_at"])),
            "expires_at": None if hit.get("expires_at") is None else iso_time(int(hit["expires_at"])),
        }
    )
    return item


def _scope(user_id: object, agent_id: object, run_id: object) -> dict[str, Any]:
    validate_id(user_id, "user_id")
    validate_id(agent_id, "agent_id", optional=True)
    validate_id(run_id, "run_id", optional=True)
    return {"user_id": user_id, "agent_id": agent_id, "run_id": run_id}


def _int_in(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SchemaError(f"'{name}' must be an integer between {low} and {high}", field=name)
    return value


def _filters(value: object) -> Mapping[str, Any] | None:
    if value is not None and not isinstance(value, Mapping):
        raise SchemaError("'filters' must be a dict", field="filters")
    return value


def _summary(result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": result["id"], "event_id": result["event_id"], "status": result["status"]}


class AsyncMemory:
    """Mem0-shaped memory for agents; see the module docstring. Use ``async with`` or call :meth:`close`."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        tenant_id: str | None = None,
    ) -> None:
        if (settings is None) == (url is None):
            raise SchemaError("give settings (or use from_env()) or url, not both", field="url")
        if tenant_id is not None:
            validate_id(tenant_id, "tenant_id")
        self.backend: Backend = (
            HttpBackend(url, api_key, tenant_id)
            if url is not None
            else DirectBackend(settings or Settings(), tenant_id or DEFAULT_TENANT)
        )
        self._opened = False
        self._lock = asyncio.Lock()

    @classmethod
    def from_env(cls, *, tenant_id: str | None = None, environ: Mapping[str, str] | None = None) -> AsyncMemory:
        """Settings from ``MEMSTREAM_*`` (the one place besides the CLI that reads the environment); the embedded
        broker and Redis are started when none is configured. A ``memstream worker`` must run for writes to
        become searchable."""
        return cls(_settings_from_env(environ), tenant_id=tenant_id)

    async def open(self) -> AsyncMemory:
        async with self._lock:
            if not self._opened:
                await self.backend.open()
                self._opened = True
        return self

    async def close(self) -> None:
        async with self._lock:
            if self._opened:
                self._opened = False
                await self.backend.close()

    async def __aenter__(self) -> AsyncMemory:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _ready(self) -> Backend:
        if not self._opened:
            await self.open()
        return self.backend

    # ------------------------------------------------------------------------------------------ writes

    async def add(
        self,
        text_or_messages: str | list[dict[str, Any]],
        *,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        memory_id: str | None = None,
        wait: bool | float = False,
        expires_at: int | str | datetime | None = None,
    ) -> dict[str, Any]:
        """A text: ``{"id", "event_id", "status"}``. Mem0 messages: ``{"results": [{"id", "event_id", "status",
        "event": "ADD", "index"}, ...]}``, one memory per message. ``wait``: True (60 s) or seconds, until
        searchable (status ``searchable``, else ``not_searchable``); without it ``queued``. ``expires_at``: ms since
        the epoch, an ISO 8601 time or an aware datetime; no read returns the memory from then on, and the system
        deletes it."""
        ops = add_operations(
            text_or_messages,
            user_id=user_id,
            agent_id=agent_id,
            run_id=run_id,
            metadata=metadata,
            memory_id=memory_id,
            expires_at=expires_at,
        )
        results = await (await self._ready()).apply(ops, wait_seconds(wait))
        for result in results:
            raise_for(result)
        if isinstance(text_or_messages, str):
            return _summary(results[0])
        return {"results": results}

    async def update(
        self,
        memory_id: str,
        text: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        wait: bool | float = False,
        expires_at: int | str | datetime | None = None,
    ) -> dict[str, Any]:
        """Change the text, the metadata (replaced whole) and/or the expiry; the rest stays. NotFoundError if the
        tenant has no such memory (it must be readable: added with wait, or some time ago)."""
        validate_id(memory_id, "memory_id")
        if text is None and metadata is None and expires_at is None:
            raise SchemaError("give text, metadata or expires_at to update", field="text")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise SchemaError("'metadata' must be a dict", field="metadata")
        op = UpdateOp(memory_id, text, None if metadata is None else dict(metadata), expiry_ms(expires_at))
        return _summary(await (await self._ready()).one(op, wait_seconds(wait)))

    async def delete(self, memory_id: str, *, wait: bool | float = False) -> dict[str, Any]:
        validate_id(memory_id, "memory_id")
        return _summary(await (await self._ready()).one(DeleteOp(memory_id), wait_seconds(wait)))

    async def delete_all(
        self, *, user_id: str, agent_id: str | None = None, run_id: str | None = None, wait: bool | float = False
    ) -> dict[str, Any]:
        """Delete every live memory of the scope: ``{"results": [...]}``, one outcome per memory deleted."""
        scope = _scope(user_id, agent_id, run_id)
        return await (await self._ready()).delete_all(scope, wait_seconds(wait))

    async def add_many(self, items: Sequence[Mapping[str, Any]], *, wait: bool | float = False) -> dict[str, Any]:
        """Each item as ``add``'s arguments (``text``, ``user_id``, ``agent_id``, ``run_id``, ``metadata``,
        ``memory_id``): ``{"results": [...]}`` in order. All are checked before any is published."""
        ops: list[Operation] = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "text" not in item or "user_id" not in item:
                raise SchemaError(f"item {i} needs 'text' and 'user_id'", field="items")
            unknown = sorted(
                set(item) - {"text", "user_id", "agent_id", "run_id", "metadata", "memory_id", "expires_at"}
            )
            if unknown:
                raise SchemaError(f"item {i}: unknown key(s) {', '.join(unknown)}", field=unknown[0])
            if not isinstance(item["text"], str):
                raise SchemaError(f"item {i}: 'text' must be a string", field="text")
            ops += add_operations(item["text"], **{k: v for k, v in item.items() if k != "text"})
        return await self._batch(ops, wait)

    async def update_many(self, items: Sequence[Mapping[str, Any]], *, wait: bool | float = False) -> dict[str, Any]:
        """Each item ``{"memory_id", "text"?, "metadata"?, "expires_at"?}``; a missing memory is reported
        (``not_found``)."""
        ops: list[Operation] = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "memory_id" not in item:
                raise SchemaError(f"item {i} needs 'memory_id'", field="memory_id")
            text, metadata, expires = item.get("text"), item.get("metadata"), expiry_ms(item.get("expires_at"))
            validate_id(item["memory_id"], "memory_id")
            if text is None and metadata is None and expires is None:
                raise SchemaError(f"item {i}: give text, metadata or expires_at", field="text")
            if metadata is not None and not isinstance(metadata, Mapping):
                raise SchemaError(f"item {i}: 'metadata' must be a dict", field="metadata")
            ops.append(UpdateOp(item["memory_id"], text, None if metadata is None else dict(metadata), expires))
        return await self._batch(ops, wait)

    async def delete_many(
        self, memory_ids: Sequence[str | Mapping[str, Any]], *, wait: bool | float = False
    ) -> dict[str, Any]:
        """Ids, or ``{"memory_id"}`` items as Mem0's batch_delete takes; a missing memory is ``not_found``."""
        ops: list[Operation] = []
        for item in memory_ids:
            memory_id = item.get("memory_id") if isinstance(item, Mapping) else item
            ops.append(DeleteOp(str(validate_id(memory_id, "memory_id"))))
        return await self._batch(ops, wait)

    async def _batch(self, ops: Sequence[Operation], wait: bool | float) -> dict[str, Any]:
        if not ops:
            raise SchemaError("nothing to do: the batch is empty", field="items")
        if len(ops) > 1_000:
            raise SchemaError("at most 1000 operations per batch", field="items")
        return {"results": await (await self._ready()).apply(ops, wait_seconds(wait))}

    # ------------------------------------------------------------------------------------------ reads

    async def search(
        self,
        query: str,
        *,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: Mapping[str, Any] | None = None,
        top_k: int = 10,
        threshold: float | None = None,
        mode: str = "vector",
    ) -> dict[str, Any]:
        """``{"results": [{"id", "memory", "score", "metadata", "user_id", "agent_id", "run_id", "created_at",
        "updated_at"}]}``, best first, within the user (and agent, run) of this tenant."""
        if not isinstance(query, str) or not query.strip():
            raise SchemaError("the query is empty", field="query")
        options = {
            "top_k": _int_in(top_k, "top_k", 1, 1_000),
            "filters": _filters(filters),
            "threshold": threshold,
            "mode": mode,
        }
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise SchemaError("'threshold' must be a number", field="threshold")
        if mode not in MODES:
            raise SchemaError(f"'mode' must be one of {', '.join(MODES)}", field="mode")
        return await (await self._ready()).search(query, _scope(user_id, agent_id, run_id), **options)

    async def get(self, memory_id: str) -> dict[str, Any] | None:
        """The memory, or None (absent, deleted, or another tenant's)."""
        validate_id(memory_id, "memory_id")
        return await (await self._ready()).get(memory_id)

    async def history(self, memory_id: str) -> list[dict[str, Any]]:
        """Every version of the memory, oldest first: ``{"event": "ADD"|"UPDATE"|"DELETE", "memory",
        "previous_memory", "version", "event_id", "created_at"}``; [] when there is none (absent, or another
        tenant's). Kept by the index sink: it lasts beyond the log, and lags a write by the sink's latency."""
        validate_id(memory_id, "memory_id")
        return await (await self._ready()).history(memory_id)

    async def get_all(
        self,
        *,
        user_id: str,
        agent_id: str | None = None,
        run_id: str | None = None,
        filters: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``{"results": [...], "next_cursor"}``: a page of the scope's live memories in id order; pass
        ``next_cursor`` back for the next page (None: this was the last)."""
        validate_id(cursor, "cursor", optional=True)
        options = {"limit": _int_in(limit, "limit", 1, 1_000), "filters": _filters(filters), "cursor": cursor}
        return await (await self._ready()).page(_scope(user_id, agent_id, run_id), **options)


def _settings_from_env(environ: Mapping[str, str] | None) -> Settings:
    from streams.runtime.stores import resolve_services

    return resolve_services(Settings.from_env(os.environ if environ is None else environ), start=True)


class Memory:
    """The synchronous ``AsyncMemory``: the same methods, run on an event loop in a background thread."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        tenant_id: str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="memstream-memory", daemon=True)
        self._thread.start()
        try:
            self._async = self._run(_make(settings, url, api_key, tenant_id))
        except BaseException:  # bad arguments: no thread left behind
            self._stop_loop()
            raise

    @classmethod
    def from_env(cls, *, tenant_id: str | None = None, environ: Mapping[str, str] | None = None) -> Memory:
        """See :meth:`AsyncMemory.from_env`."""
        return cls(_settings_from_env(environ), tenant_id=tenant_id)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ServiceError("this Memory is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add(self, text_or_messages: str | list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        """See :meth:`AsyncMemory.add`."""
        return self._run(self._async.add(text_or_messages, **kwargs))

    def search(self, query: str, **kwargs: Any) -> dict[str, Any]:
        """See :meth:`AsyncMemory.search`."""
        return self._run(self._async.search(query, **kwargs))

    def get(self, memory_id: str) -> dict[str, Any] | None:
        return self._run(self._async.get(memory_id))

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        """See :meth:`AsyncMemory.history`."""
        return self._run(self._async.history(memory_id))

    def get_all(self, **kwargs: Any) -> dict[str, Any]:
        """See :meth:`AsyncMemory.get_all`."""
        return self._run(self._async.get_all(**kwargs))

    def update(
        self, memory_id: str, text: str | None = None, metadata: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self._run(self._async.update(memory_id, text, metadata, **kwargs))

    def delete(self, memory_id: str, **kwargs: Any) -> dict[str, Any]:
        return self._run(self._async.delete(memory_id, **kwargs))

    def delete_all(self, **kwargs: Any) -> dict[str, Any]:
        return self._run(self._async.delete_all(**kwargs))

    def add_many(self, items: Sequence[Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
        return self._run(self._async.add_many(items, **kwargs))

    def update_many(self, items: Sequence[Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
        return self._run(self._async.update_many(items, **kwargs))

    def delete_many(self, memory_ids: Sequence[str | Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
        return self._run(self._async.delete_many(memory_ids, **kwargs))


async def _make(settings: Settings | None, url: str | None, api_key: str | None, tenant_id: str | None) -> AsyncMemory:
    """Built on the loop that will run it (its lock belongs to that loop)."""
    return AsyncMemory(settings, url=url, api_key=api_key, tenant_id=tenant_id)


__all__ = ["AsyncMemory", "Memory"]
