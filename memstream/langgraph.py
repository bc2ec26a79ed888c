"""``MemstreamStore``: a LangGraph store (``langgraph.store.base.BaseStore``) on ``memstream.Memory``.

    from langgraph.graph import StateGraph
    from memstream.langgraph import MemstreamStore

    store = MemstreamStore.from_env(index={"fields": ["text"]})   # or MemstreamStore(Memory(url=..., api_key=...))
    graph = StateGraph(State).add_node(...).compile(store=store)

How LangGraph's items map to memories (``pip install memstream[langgraph]``):

- **Namespaces are scopes**: ``(user_id,)``, ``(user_id, agent_id)`` or ``(user_id, agent_id, run_id)``; each label a
  memstream id (letters, digits, ``_.:@-``, at most 128). A search or ``list_namespaces`` prefix must name the
  user at least (memstream searches within a user); a prefix finds the deeper namespaces too, as in LangGraph.
  The tenant is the Memory's (``tenant_id=`` in process, the API key's over HTTP): a wall no namespace crosses.
- **Keys**: the memory id is ``lg-`` + a hash of namespace and key, so a put of the same namespace and key
  overwrites and a put of ``None`` (``delete``) deletes.
- **Values** are the memory's metadata (top-level keys, at most 16 KiB as JSON), beside two reserved keys
  (``_lg_key``, ``_lg_indexed``; a value may not use the ``_lg_`` prefix). ``search(filter=...)`` filters on
  value keys, by equality or with ``$eq $ne $gt $gte $lt $lte $in $nin``.
- **The embedded text** is the text at the ``index`` fields (LangGraph paths: ``"text"``, ``"a.b"``,
  ``"items[*].text"``), joined by newlines: the put's own ``index=[...]``, else the store's
  ``index={"fields": [...]}``, else the whole value as JSON (LangGraph's ``"$"``). memstream embeds with its own
  model, so ``index``'s ``embed`` and ``dims`` are ignored. ``index=False`` (or no text at the fields): the item
  is stored (``get`` and a search without a query find it) but is **not searchable by a query**.
- **Visibility**: a put waits until the memory is searchable (``wait=True``: up to 60 s; ``wait=`` seconds
  or ``False`` on the store), so the next get or search from any store instance sees it, as with LangGraph's
  own stores. A put that is not searchable in time raises ``StoreError``.
- **TTL**: ``put(..., ttl=minutes)`` (or ``ttl={"default_ttl": minutes}`` on the store, LangGraph's
  ``TTLConfig``) sets the memory's ``expires_at``: from then on no get or search returns the item, and memstream's
  expiry sweep deletes it. Reads refresh it as LangGraph's stores do (``refresh_ttl``, default
  ``ttl["refresh_on_read"]``, else True): an item read with a ttl gets ``expires_at`` = now + its ttl again (an
  update published without waiting). ``sweep_interval_minutes`` is not used: the sweep runs in the worker.
- **Times**: ``created_at`` is when the item was first put, ``updated_at`` its last put.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import orjson
from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
)
from langgraph.store.base.embed import get_text_at_path, tokenize_path

from memstream.client import AsyncMemory, Memory
from schemas.errors import SchemaError, ServiceError, StoreError
from schemas.events import ID_PATTERN, MAX_TEXT_CHARS

LEVELS: Final = ("user_id", "agent_id", "run_id")
KEY_FIELD: Final = "_lg_key"
INDEXED_FIELD: Final = "_lg_indexed"
TTL_FIELD: Final = "_lg_ttl"  # the put's ttl in minutes: what a read refreshes the expiry by
RESERVED_PREFIX: Final = "_lg_"
ID_PREFIX: Final = "lg-"
WHOLE_VALUE: Final = "$"
MAX_TOP_K: Final = 1_000  # memstream's search and page limit
FILTER_OPS: Final = {f"${op}": op for op in ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")}
_LABEL: Final = re.compile(ID_PATTERN)


def memory_id_of(namespace: Sequence[str], key: str) -> str:
    """The memory id of a LangGraph item: deterministic, so a put of the same namespace and key overwrites."""
    digest = hashlib.sha256(orjson.dumps([list(namespace), key])).hexdigest()
    return f"{ID_PREFIX}{digest[:40]}"


def scope_of(namespace: Sequence[str], field: str = "namespace") -> dict[str, str]:
    """``(user_id[, agent_id[, run_id]])`` as memstream's scope arguments; SchemaError naming ``field`` else."""
    if not 1 <= len(namespace) <= len(LEVELS):
        raise SchemaError(
            f"a namespace is (user_id,), (user_id, agent_id) or (user_id, agent_id, run_id); got {tuple(namespace)!r}",
            field=field,
        )
    for label in namespace:
        if not isinstance(label, str) or not _LABEL.match(label):
            raise SchemaError(
                f"namespace label {label!r} is not a memstream id (letters, digits, _.:@-, at most 128)", field=field
            )
    return dict(zip(LEVELS, namespace, strict=False))


def namespace_of(memory: Mapping[str, Any]) -> tuple[str, ...]:
    labels = (memory["user_id"], memory.get("agent_id"), memory.get("run_id"))
    if labels[1] is None:  # a run without an agent has no namespace; LangGraph items never are one
        return (labels[0],)
    return tuple(label for label in labels if label is not None)


def is_item(memory: Mapping[str, Any]) -> bool:
    return KEY_FIELD in (memory.get("metadata") or {})


def _fields(memory: Mapping[str, Any]) -> dict[str, Any]:
    metadata = memory.get("metadata") or {}
    changed = _time(memory["updated_at"])
    return {
        "namespace": namespace_of(memory),
        "key": str(metadata[KEY_FIELD]),
        "value": {k: v for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX)},
        "created_at": changed if memory.get("created_at") is None else _time(memory["created_at"]),
        "updated_at": changed,
    }


def _time(iso: object) -> datetime:
    return datetime.fromisoformat(str(iso).replace("Z", "+00:00"))


def expires_at_of(ttl_minutes: float, now_ms: int | None = None) -> int:
    """The ``expires_at`` (ms since the epoch) of an item put or read now with a ttl of ``ttl_minutes``."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return now + round(ttl_minutes * 60_000)


def to_item(memory: Mapping[str, Any]) -> Item:
    return Item(**_fields(memory))


def to_search_item(memory: Mapping[str, Any]) -> SearchItem:
    """A search hit (with its score) or a listed item (score None, as LangGraph's search without a query)."""
    score = memory.get("score")
    return SearchItem(**_fields(memory), score=None if score is None else float(score))


def item_filters(raw: Mapping[str, Any] | None, *, indexed_only: bool) -> dict[str, Any]:
    """A LangGraph filter on value keys as memstream metadata filters (``metadata.`` names the value's key even
    where it is also a row column such as ``version``), restricted to this store's items."""
    out: dict[str, Any] = {}
    for name, spec in (raw or {}).items():
        if not isinstance(name, str) or not name or name.startswith(RESERVED_PREFIX):
            raise SchemaError(f"filter key {name!r} is not a value key of this store", field="filter")
        if isinstance(spec, Mapping) and spec and all(str(k).startswith("$") for k in spec):
            unknown = sorted(str(k) for k in spec if k not in FILTER_OPS)
            if unknown:
                raise SchemaError(f"filter {name!r}: unknown operator {unknown[0]}", field="filter")
            out[f"metadata.{name}"] = {FILTER_OPS[k]: v for k, v in spec.items()}
        else:
            out[f"metadata.{name}"] = {"eq": spec}
    out[f"metadata.{INDEXED_FIELD}"] = True if indexed_only else {"in": [True, False]}  # present: one of ours
    return out


class MemstreamStore(BaseStore):
    """A LangGraph ``BaseStore`` on a ``memstream.Memory`` or ``AsyncMemory``; see the module docstring.

    With a ``Memory`` both the sync and the async methods work (they run on the Memory's own loop). With an
    ``AsyncMemory`` the async ones do; the sync ones then work from other threads once an async one has run
    (LangGraph runs sync nodes of an async graph in threads), never on the loop's own thread.
    """

    supports_ttl = True

    def __init__(
        self,
        memory: Memory | AsyncMemory,
        *,
        index: IndexConfig | Mapping[str, Any] | None = None,
        wait: bool | float = True,
        ttl: TTLConfig | None = None,
    ) -> None:
        if not isinstance(memory, Memory | AsyncMemory):
            raise SchemaError("give a memstream Memory or AsyncMemory", field="memory")
        fields = (index or {}).get("fields") or [WHOLE_VALUE]
        if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
            raise SchemaError("index['fields'] must be a list of field paths", field="index")
        self.memory = memory
        self.fields: list[str] = list(fields)
        self.wait = wait
        self.ttl_config = ttl  # BaseStore applies default_ttl to puts and refresh_on_read to reads
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_env(
        cls,
        *,
        tenant_id: str | None = None,
        index: IndexConfig | Mapping[str, Any] | None = None,
        wait: bool | float = True,
        environ: Mapping[str, str] | None = None,
        ttl: TTLConfig | None = None,
    ) -> MemstreamStore:
        """A store over ``Memory.from_env()`` (settings from ``MEMSTREAM_*``; a worker must run)."""
        return cls(Memory.from_env(tenant_id=tenant_id, environ=environ), index=index, wait=wait, ttl=ttl)

    def close(self) -> None:
        """Closes a ``Memory`` (sync); an ``AsyncMemory`` is the caller's to close."""
        if isinstance(self.memory, Memory):
            self.memory.close()

    # ------------------------------------------------------------------------------------- batches

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        work = list(ops)
        if isinstance(self.memory, Memory):
            return self.memory._run(run_ops(self.memory._async, self, work))  # its loop, its thread
        loop = self._loop
        if loop is None or loop.is_closed():
            raise ServiceError("over an AsyncMemory, call an async method (aget, aput, ...) first, or use a Memory")
        if _running_loop() is loop:
            raise ServiceError(
                "a sync store method on the AsyncMemory's own event loop would block it: await aget/aput"
            )
        return asyncio.run_coroutine_threadsafe(run_ops(self.memory, self, work), loop).result()

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        work = list(ops)
        if isinstance(self.memory, Memory):
            future = asyncio.run_coroutine_threadsafe(run_ops(self.memory._async, self, work), self.memory._loop)
            return await asyncio.wrap_future(future)
        self._loop = asyncio.get_running_loop()
        return await run_ops(self.memory, self, work)

    # ------------------------------------------------------------------------------------- puts

    def embedded_text(self, op: PutOp) -> str | None:
        """The text memstream embeds for a put, or None: not searchable by a query."""
        if op.index is False or op.value is None:
            return None
        texts: list[str] = []
        for path in op.index if op.index is not None else self.fields:
            texts += get_text_at_path(op.value, WHOLE_VALUE if path == WHOLE_VALUE else tokenize_path(path))
        text = "\n".join(t for t in texts if t.strip())
        return text[:MAX_TEXT_CHARS] if text.strip() else None

    def add_item(self, op: PutOp) -> dict[str, Any]:
        """The ``add_many`` item of a put (the value checked first: nothing is sent for a bad one)."""
        if op.ttl is not None and (
            isinstance(op.ttl, bool) or not isinstance(op.ttl, int | float) or not 0 < op.ttl < 10**9
        ):
            raise SchemaError(f"ttl must be a positive number of minutes, got {op.ttl!r}", field="ttl")
        if not isinstance(op.value, Mapping) or not all(isinstance(k, str) for k in op.value):
            raise SchemaError("a value must be a dict with string keys", field="value")
        reserved = sorted(k for k in op.value if k.startswith(RESERVED_PREFIX))
        if reserved:
            raise SchemaError(f"value key {reserved[0]!r}: the {RESERVED_PREFIX} prefix is reserved", field="value")
        text = self.embedded_text(op)
        item: dict[str, Any] = {
            "text": text if text is not None else f"(not indexed) {op.key}",  # kept out of query searches below
            **scope_of(op.namespace),
            "metadata": {**op.value, KEY_FIELD: op.key, INDEXED_FIELD: text is not None},
            "memory_id": memory_id_of(op.namespace, op.key),
        }
        if op.ttl is not None:
            item["metadata"][TTL_FIELD] = op.ttl
            item["expires_at"] = expires_at_of(op.ttl)
        return item


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def run_ops(memory: AsyncMemory, store: MemstreamStore, ops: list[Op]) -> list[Result]:
    """As LangGraph's InMemoryStore: the reads of a batch see the state before it, then its puts apply (the last
    put of a namespace and key wins)."""
    puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
    for op in ops:
        if isinstance(op, PutOp):
            scope_of(op.namespace)
            puts[(op.namespace, op.key)] = op
        elif not isinstance(op, GetOp | SearchOp | ListNamespacesOp):
            raise SchemaError(f"unknown store operation {type(op).__name__}", field="op")
    adds = [store.add_item(op) for op in puts.values() if op.value is not None]
    results: list[Result] = []
    refresh: dict[str, float] = {}  # memory id -> ttl minutes, of the items read with refresh_ttl
    for op in ops:
        if isinstance(op, GetOp):
            found = await get_memory(memory, op)
            results.append(None if found is None else to_item(found))
            if found is not None and op.refresh_ttl:
                _note_refresh(refresh, found)
        elif isinstance(op, SearchOp):
            hits = await search_memories(memory, op)
            results.append([to_search_item(hit) for hit in hits])
            if op.refresh_ttl:
                for hit in hits:
                    _note_refresh(refresh, hit)
        elif isinstance(op, ListNamespacesOp):
            results.append(await list_namespaces(memory, op))
        else:
            results.append(None)
    await apply_puts(memory, store.wait, adds, [op for op in puts.values() if op.value is None])
    put_ids = {memory_id_of(ns, key) for ns, key in puts}
    updates = [
        {"memory_id": mid, "expires_at": expires_at_of(minutes)}
        for mid, minutes in refresh.items()
        if mid not in put_ids
    ]
    if updates:  # as LangGraph's stores, a read pushes the expiry back; not waited for (the read has its answer)
        await memory.update_many(updates, wait=False)
    return results


def _note_refresh(refresh: dict[str, float], memory: Mapping[str, Any]) -> None:
    minutes = (memory.get("metadata") or {}).get(TTL_FIELD)
    if isinstance(minutes, int | float) and not isinstance(minutes, bool):
        refresh[str(memory["id"])] = float(minutes)


async def apply_puts(memory: AsyncMemory, wait: bool | float, adds: list[dict[str, Any]], deletes: list[PutOp]) -> None:
    outcomes: list[dict[str, Any]] = []
    if adds:
        outcomes += (await memory.add_many(adds, wait=wait))["results"]
    if deletes:
        ids = [memory_id_of(op.namespace, op.key) for op in deletes]
        # deleting what is absent is a no-op in LangGraph: not_found is fine
        outcomes += [r for r in (await memory.delete_many(ids, wait=wait))["results"] if r["status"] != "not_found"]
    for outcome in outcomes:
        if outcome["status"] == "invalid":
            raise SchemaError(str(outcome.get("error")), field=outcome.get("field"))
        if wait and outcome["status"] != "searchable":
            raise StoreError(
                f"memory {outcome['id']} ({outcome.get('event')}) was not searchable in time: {outcome['status']}"
            )


async def get_memory(memory: AsyncMemory, op: GetOp) -> dict[str, Any] | None:
    scope_of(op.namespace)
    found = await memory.get(memory_id_of(op.namespace, op.key))
    if found is None or not is_item(found) or namespace_of(found) != tuple(op.namespace):
        return None
    return found


async def search_memories(memory: AsyncMemory, op: SearchOp) -> list[dict[str, Any]]:
    if not op.namespace_prefix:
        raise SchemaError("a search names the user at least: namespace_prefix=(user_id, ...)", field="namespace_prefix")
    scope = scope_of(op.namespace_prefix, "namespace_prefix")
    if op.limit < 1 or op.offset < 0 or op.offset + op.limit > MAX_TOP_K:
        raise SchemaError(f"limit >= 1, offset >= 0 and offset + limit <= {MAX_TOP_K}", field="limit")
    wanted = op.offset + op.limit
    if op.query:
        filters = item_filters(op.filter, indexed_only=True)
        found = await memory.search(
            op.query,
            user_id=scope["user_id"],
            agent_id=scope.get("agent_id"),
            run_id=scope.get("run_id"),
            filters=filters,
            top_k=wanted,
        )
        hits = found["results"]
    else:
        hits = await _page_all(memory, scope, item_filters(op.filter, indexed_only=False), wanted)
    return list(hits[op.offset : wanted])


async def _page_all(
    memory: AsyncMemory, scope: Mapping[str, str], filters: Mapping[str, Any], wanted: int | None
) -> list[dict[str, Any]]:
    """The scope's items in memory-id order, page by page, until ``wanted`` (None: all)."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while wanted is None or len(out) < wanted:
        page = await memory.get_all(**scope, filters=filters, limit=MAX_TOP_K, cursor=cursor)
        out += page["results"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return out


async def list_namespaces(memory: AsyncMemory, op: ListNamespacesOp) -> list[tuple[str, ...]]:
    """The namespaces that hold items, below a prefix that names the user (memstream lists within a user)."""
    conditions = list(op.match_conditions or ())
    prefix = next((c.path for c in conditions if c.match_type == "prefix"), ())
    if not prefix or prefix[0] == "*":
        raise SchemaError("list_namespaces needs prefix=(user_id, ...): memstream lists within a user", field="prefix")
    rows = await _page_all(memory, {"user_id": prefix[0]}, item_filters(None, indexed_only=False), None)
    found = {namespace_of(row) for row in rows}
    kept = [ns for ns in found if all(_matches(c, ns) for c in conditions)]
    if op.max_depth is not None:
        kept = list({ns[: op.max_depth] for ns in kept})
    return sorted(kept)[op.offset : op.offset + op.limit]


def _matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(path) > len(namespace):
        return False
    part = namespace[: len(path)] if condition.match_type == "prefix" else namespace[len(namespace) - len(path) :]
    return all(want == "*" or want == have for want, have in zip(path, part, strict=True))


__all__ = ["MemstreamStore", "memory_id_of"]
