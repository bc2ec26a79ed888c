"""Redis side of the read caches: scope generations, cached search results and context blocks (L2), counters.

Keys, under the prefix P (beside those of ``infra/redis_store.py``):
- ``P g``: hash, field ``tenant|user`` or ``tenant|user|agent`` -> generation. Bumped by the write script itself,
  atomically with each applied change (``|`` is outside the id alphabet, so fields cannot collide). Also
  ``tenant|user|*``: bumped when a memory Redis does not hold (evicted, or Redis restarted empty) is deleted,
  since the agent it was filed under is then unknown; agent-level reads validate against it too.
- ``P q:<sha1>``: a cached search result, ``{"g": generation, "v": hits}`` with a TTL.
- ``P c:<tenant>|<user>|<agent>:<budget>``: a rendered context block, ``{"g": generation, "v": block}``.
- ``P hot``: sorted set of scopes by reads (what ``memstream warmup`` warms first).

A cached value is used only when its generation equals the scope's current one, read in the same round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from infra.redis_store import RedisClient, guarded, is_cluster
from schemas.errors import StoreError

SEP = "|"


def scope_field(tenant_id: str, user_id: str, agent_id: str | None) -> str:
    """The generation a read over this scope depends on: the user's, or the (user, agent) pair's."""
    return f"{tenant_id}{SEP}{user_id}" if agent_id is None else f"{tenant_id}{SEP}{user_id}{SEP}{agent_id}"


INDEX_MARK = "~"  # not in the id alphabet: no agent's field can be the user's index mark


def validation_fields(field: str, *, content_only: bool = False) -> list[str]:
    """What a cached read of this scope is validated against: its content generation (moved by every write of a
    memory in it), for an agent scope its user's ``*`` field, and its index mark (moved when the index sink takes
    the scope's memories out of the fresh tail: a result ranked from the tail may rank otherwise from LanceDB).
    ``content_only``: without the index mark, for what depends on the memories alone."""
    parts = field.split(SEP)
    fields = [field, f"{parts[0]}{SEP}{parts[1]}{SEP}*"] if len(parts) == 3 else [field]
    return fields if content_only else [*fields, f"{field}{SEP}{INDEX_MARK}"]


def validation_token(values: list[bytes | None]) -> bytes | None:
    """One comparable token from the generations; ``None`` (not cacheable) while the scope has none yet."""
    if not values or values[0] is None:
        return None
    return b"/".join(v if v is not None else b"-" for v in values)


# KEYS: any keys. Returns 1 or 0 for each: whether Redis holds it. One command with N keys instead of N commands:
# redis-py packs each command in Python, and a pipeline of ~4,000 EXISTS per window cost the worker ~7% of its
# time at 7k events/s.
EXISTS_MANY_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('EXISTS', key)
end
return out
"""
EXISTS_CHUNK = 1_000  # keys per script call: well under a millisecond of server time each


class RedisReadCache:
    """Generation-checked L2 entries, plus the read counters and the hot-scope ranking."""

    def __init__(self, client: RedisClient, prefix: str, ttl_s: int, stats_prefix: str | None = None) -> None:
        self._exists_many = client.register_script(EXISTS_MANY_SCRIPT)
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.gens_key = f"{prefix}g"
        self.hot_key = f"{prefix}hot"
        # the counters stay under the deployment's prefix when ``prefix`` is a store generation's (issue #4)
        self.stats_key = f"{stats_prefix or prefix}stats"
        self._asking: list[tuple[tuple[str, bool], asyncio.Future[bytes | None]]] = []  # token() calls of this turn
        self._sending: set[asyncio.Task[None]] = set()
        self.blocks_key = f"{prefix}cb"  # the context blocks someone read (see registered_among)

    def search_key(self, digest: str) -> str:
        return f"{self.prefix}q:{digest}"

    def context_key(self, field: str, budget: int) -> str:
        return f"{self.prefix}c:{field}:{budget}"

    async def generation(self, field: str) -> bytes | None:
        """The scope's generation now (``None``: never written since this Redis started)."""

        async def run() -> bytes | None:
            value: bytes | None = await self.client.hget(self.gens_key, field)  # type: ignore[assignment,misc]
            return value

        return await guarded("reading a scope generation", run)

    async def token(self, field: str, *, content_only: bool = False) -> bytes | None:
        """The scope's validation token now (the generations of ``validation_fields``).

        The reads that ask in the same turn of the event loop share one HMGET (every generation is a field of one
        hash), sent on the next turn: after each of them asked, so no token is older than a write that finished
        before its read began. Why: an L1 hit is this one round trip, and redis-py's cost per command (packing,
        the connection pool, its timeout wrapper) was most of it."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes | None] = loop.create_future()
        if not self._asking:
            loop.call_soon(self._send_tokens)
        self._asking.append(((field, content_only), waiter))
        return await waiter

    def _send_tokens(self) -> None:
        batch, self._asking = self._asking, []
        task = asyncio.ensure_future(self._read_tokens(batch))
        self._sending.add(task)  # a reference until it is done (the loop keeps only weak ones)
        task.add_done_callback(self._sending.discard)

    async def _read_tokens(self, batch: list[tuple[tuple[str, bool], asyncio.Future[bytes | None]]]) -> None:
        groups = {asked: validation_fields(asked[0], content_only=asked[1]) for asked, _ in batch}
        names = [name for group in groups.values() for name in group]
        tokens: dict[tuple[str, bool], bytes | None] = {}
        failure: StoreError | None = None
        try:
            values: list[bytes | None] = await guarded(
                "reading scope generations",
                lambda: self.client.hmget(self.gens_key, names),  # type: ignore[arg-type,return-value]
            )
            at = 0
            for asked, group in groups.items():
                tokens[asked] = validation_token(values[at : at + len(group)])
                at += len(group)
        except StoreError as exc:
            failure = exc
        finally:  # every waiter gets an answer, even when this task is cancelled at shutdown
            for asked, waiter in batch:
                if waiter.done():  # its read was cancelled meanwhile
                    continue
                if asked in tokens:
                    waiter.set_result(tokens[asked])
                else:
                    reason = str(failure or "the generation read was cancelled")
                    waiter.set_exception(StoreError(reason, retriable=failure.retriable if failure else True))

    async def lookup(
        self, field: str, key: str, content_of: str | None = None
    ) -> tuple[bytes | None, Any | None, bytes | None]:
        """(current validation token, cached value if it was built at that token, ``content_of``'s content-only
        token): one round trip. ``content_of``: a user's field, whose hot copy answers a miss (its token read here
        saves the miss a round trip of its own; None: not read)."""
        fields = validation_fields(field)
        extra = [] if content_of is None else validation_fields(content_of, content_only=True)

        async def run() -> tuple[bytes | None, Any | None, bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.gens_key, [*fields, *extra])
            pipe.get(key)
            values, raw = await pipe.execute()
            gen = validation_token(values[: len(fields)])
            copy_gen = validation_token(values[len(fields) :]) if extra else None
            if gen is None or raw is None:
                return gen, None, copy_gen
            entry = orjson.loads(raw)
            return gen, entry["v"] if entry.get("g") == gen.decode() else None, copy_gen

        return await guarded("reading the read cache", run)

    async def store(self, key: str, gen: bytes, value: Any, *, register_block: bool = False) -> None:
        """Cache ``value`` under ``key``, built at ``gen``. ``register_block``: it is a context block the stream
        keeps current (registered in the same round trip; see :meth:`registered_among`)."""
        payload = orjson.dumps({"g": gen.decode(), "v": value})
        if not register_block:
            await guarded("writing the read cache", lambda: self.client.set(key, payload, ex=self.ttl_s or None))
            return

        async def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(key, payload, ex=self.ttl_s or None)
            pipe.hset(self.blocks_key, key, "1")
            await pipe.execute()

        await guarded("writing a context block", run)

    async def any_blocks_registered(self) -> bool:
        """Whether anyone has read a context block (the registry exists): while nobody does, as during a bulk load,
        a window costs the stream this one EXISTS, not a probe of two keys per scope it changed (2.7 EXISTS per
        event at 200k events through `publish --wait`, ~7% of the index sink's Python)."""
        found = await guarded("reading the context block registry", lambda: self.client.exists(self.blocks_key))  # type: ignore[arg-type,return-value]
        return bool(found)

    async def registered_among(self, keys: Sequence[str]) -> list[bool]:
        """Which of ``keys`` are context blocks someone has read: the only ones the stream rebuilds after a write.
        One hash ``<prefix>cb`` holds them, a field per block; one HMGET per thousand keys, whatever its size."""
        if not keys:
            return []

        async def run() -> list[bool]:
            found: list[bool] = []
            for start in range(0, len(keys), EXISTS_CHUNK):
                chunk = list(keys[start : start + EXISTS_CHUNK])
                found += [value is not None for value in await self.client.hmget(self.blocks_key, chunk)]  # type: ignore[misc]
            return found

        return await guarded("reading the context block registry", run)

    async def unregister_blocks(self, keys: Sequence[str]) -> None:
        """Forget blocks that are gone (their TTL ran out, Redis evicted them): nobody read them since."""
        if keys:
            await guarded("updating the context block registry", lambda: self.client.hdel(self.blocks_key, *keys))  # type: ignore[arg-type,return-value]

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Which of ``keys`` Redis holds, in one command per thousand keys (EXISTS of many keys only counts them)."""
        if not keys:
            return []

        async def run() -> list[Any]:
            if is_cluster(self.client):  # a script reads one slot: a pipeline of EXISTS, sent per node
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(key)
                return list(await pipe.execute())
            found: list[Any] = []
            for start in range(0, len(keys), EXISTS_CHUNK):
                found += await self._exists_many(keys=list(keys[start : start + EXISTS_CHUNK]))
            return found

        return [bool(n) for n in await guarded(f"probing the read cache for {len(keys)} keys", run)]

    async def start_generation(self, field: str) -> None:
        """Give a scope never written since Redis started a generation, so its reads become cacheable.

        HSETNX: a write that bumped it meanwhile wins. Microseconds of wall time keep it above any generation the
        scope had before a restart (the write script uses the server's clock the same way).
        """
        now = str(time.time_ns() // 1_000)
        await guarded("starting a scope generation", lambda: self.client.hsetnx(self.gens_key, field, now))  # type: ignore[arg-type]

    async def flush_counters(self, counts: Mapping[str, int], hot: Mapping[str, int]) -> None:
        async def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for name, value in counts.items():
                if value:
                    pipe.hincrby(self.stats_key, name, value)
            for field, reads in hot.items():
                pipe.zincrby(self.hot_key, reads, field)
            await pipe.execute()

        await guarded("updating read counters", run)

    async def hottest(self, limit: int) -> list[str]:
        async def run() -> list[bytes]:
            fields: list[bytes] = await self.client.zrevrange(self.hot_key, 0, limit - 1)  # type: ignore[assignment]
            return fields

        return [f.decode() for f in await guarded("reading hot scopes", run)]
