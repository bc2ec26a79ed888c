"""Redis: the hot cache. Each memory is a hash, written by a Lua compare-and-set on ``(version, event_id)``.

Keys, under a configurable prefix P:
- ``P m:<tenant>/<memory_id>``: hash of the memory (tombstones kept, as in LanceDB, so that replays cannot
  resurrect). A memory is identified by its tenant and its id (processors.model.memory_key); older deployments
  keyed ``P m:<memory_id>``: those keys are never read (see :meth:`RedisCacheStore.states`), and the sentinel's
  name changed with the layout, so a worker meeting an old-layout Redis refills it by reconciliation.
- ``P r:<tenant>:<user>``: sorted set of the user's live memory ids by ``updated_at`` (the recency index; the
  tenant is in the key, so members are plain memory ids).
- ``P e:<model>:<text hash>``: float32 vector bytes (the embedding cache, with a TTL).
- ``P stats``: hash of counters.
- ``P p:<tenant>:<user>``, ``P pt:<tenant>``: sorted sets of the memory ids written by the ingest path that LanceDB
  does not hold yet (the fresh tail; the hash then also holds ``pv``, its vector, and ``p`` = 1), per user and per
  tenant, scored by ``updated_at``; ``P pq``: the same memories as ``<tenant>/<id>`` scored by when they entered,
  which the index sink sweeps (processors/indexing.py). The sink clears an entry once LanceDB holds its version.
- ``P g``: hash of scope generations (``tenant|user`` and ``tenant|user|agent``), bumped by the write script in
  the same atomic step as every applied change: what cached reads are validated against (infra/read_cache.py).

The same keys on a Redis Cluster (``redis+cluster://``, or a plain URL of a cluster node: :func:`open_redis`), with
no hash tags: a memory's hash is found from its tenant and id alone and spreads over every master. A script may
touch one slot there, so writes are two steps (CLUSTER_CAS_SCRIPT and what follows it); see the README.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterCrossSlotError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.faults import FaultSwitch
from infra.settings import redact_url
from processors.model import KEY_SEP, MemoryRow, ScopeQuery, StoreState, TailCleared, WriteOutcome, split_key
from schemas.errors import AuthError, ConfigError, RedisClusterError, StoreError
from schemas.events import Scope

T = TypeVar("T")
log = logging.getLogger("memstream.redis")

# Lua shared by the write scripts. gt: bytewise, as LanceDB compares (Lua's '>' on strings follows the server's
# locale collation). The generation bump: every scope in ``scopes`` gets max(previous + 1, server time in µs).
LUA_GT = """
local function gt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = a:byte(i), b:byte(i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
"""
# The generations of the scopes a script changed, in one HMGET and one HSET for all of them (a pair of calls per
# scope was a third of Redis' commands per event at 200k events through `publish --wait`).
# Sorted-set members gathered per key and written in one ZADD or ZREM per key at the end of a script: the user's and
# the tenant's fresh tail and the queue of every tenant take a member from each row of a call (one call per row
# before; the user's set was still a call per row until issue 23).
# A script only adds to these keys or only removes from them, so gathering keeps the outcome of the calls in order.
LUA_GATHERED_SETS = """
local gathered = {}
local function gather(command, key, ...)
  local per_key = gathered[command]
  if not per_key then per_key = {}; gathered[command] = per_key end
  local args = per_key[key]
  if not args then args = {}; per_key[key] = args end
  for _, value in ipairs({...}) do args[#args + 1] = value end
end
local function flush_gathered()
  for command, per_key in pairs(gathered) do
    local step = command == 'ZADD' and 2000 or 1000  -- within Lua's stack for unpack; a ZADD member is two values
    for key, args in pairs(per_key) do
      for first = 1, #args, step do
        redis.call(command, key, unpack(args, first, math.min(first + step - 1, #args)))
      end
    end
  end
end
"""
# The compare-and-set of one row, shared by the single-node and the cluster write scripts. ``cur``: the hash's
# v, e, t, u, d, a, c (HMGET, in this order); ``row``: as CAS_SCRIPT's packed rows. outcome_of: 0 stale,
# 1 already current, 2 apply, 3 another user's memory (processors.model.WriteOutcome). created_of: an update keeps
# when the memory was created; a memory this Redis does not hold starts now. held_agent: the agent the held version
# is under (hashes written before the ``a`` field read it from their document). write_hash: the memory's hash, and
# with ``vector`` (the ingest path) its fresh-tail fields.
LUA_WRITE_ROW = """
local function outcome_of(cur, row)
  if not cur[1] then return 2 end
  if cur[4] ~= row[7] then return 3 end
  local cv, version, event_id = tonumber(cur[1]), tonumber(row[2]), row[3]
  if cv ~= version then return cv > version and 0 or 2 end
  if cur[2] == event_id then return 1 end  -- before gt: equal ids are the common case and gt walks all their bytes
  return gt(cur[2], event_id) and 0 or 2
end
local function created_of(cur, row)
  local created = row[11] or ''
  if created ~= '' then return created end
  return (cur[1] and cur[5] == '0' and cur[7]) or row[9]
end
local function held_agent(key, cur)
  if cur[6] then return cur[6] end
  local old = cjson.decode(redis.call('HGET', key, 'doc') or '{}')
  return (type(old['a']) == 'string') and old['a'] or ''
end
local function write_hash(key, row, created, vector)
  if vector then
    redis.call('HSET', key, 'v', row[2], 'e', row[3], 'h', row[4], 'd', row[5], 't', row[6], 'u', row[7],
      'doc', row[8], 'ts', row[9], 'a', row[10] or '', 'c', created, 'x', row[12] or '', 'pv', vector, 'p', '1')
  else
    redis.call('HSET', key, 'v', row[2], 'e', row[3], 'h', row[4], 'd', row[5], 't', row[6], 'u', row[7],
      'doc', row[8], 'ts', row[9], 'a', row[10] or '', 'c', created, 'x', row[12] or '')
  end
end
"""
LUA_BUMP_GENERATIONS = """
if next(scopes) then
  local now = redis.call('TIME')
  local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local gens = prefix .. 'g'
  local names = {}
  for scope, _ in pairs(scopes) do names[#names + 1] = scope end
  for first = 1, #names, 1000 do
    local last = math.min(first + 999, #names)
    local held = redis.call('HMGET', gens, unpack(names, first, last))
    local pairs_out = {}
    for i = first, last do
      local gen = tonumber(held[i - first + 1] or '0') + 1
      if floor > gen then gen = floor end
      pairs_out[#pairs_out + 1] = names[i]
      pairs_out[#pairs_out + 1] = string.format('%d', gen)  -- exact below 2^53, and no float printing
    end
    redis.call('HSET', gens, unpack(pairs_out))
  end
end
"""

# KEYS: the memory key and the recency key of each row. ARGV: ttl, prefix, one JSON array holding every
# row as [memory_id, version, event_id, content_hash, deleted, tenant, user, doc, updated_at, agent, created_at,
# expires_at] (numbers as strings: cjson would round them to 14 digits; '' for no created_at, which keeps the one
# the hash holds (an update), and for no expiry). One argument instead of nine per row: redis-py's argument
# encoding was the largest client cost of a window.
# Returns one outcome per row: 0 stale, 1 already current, 2 applied, 3 refused because the memory belongs to
# another user of the tenant (processors.model.WriteOutcome): an event never moves a memory between users.
# ARGV[4] ('1' unless given '0' or '2'): bump the generation of every scope an applied row leaves or enters, inside
# this same script, so a cached read can never be validated against a generation older than the data it saw.
# A generation is max(previous + 1, server time in µs): unique across a Redis restarted empty (no ABA).
# Refills from LanceDB (reads, warmup) pass '0': they copy the durable truth and change no read result.
# '2' (touch) also bumps for rows already current: LanceDB caught up on rows Redis took earlier.
CAS_SCRIPT = (
    LUA_GT
    + LUA_WRITE_ROW
    + LUA_GATHERED_SETS
    + """
local ttl = tonumber(ARGV[1])
local prefix = ARGV[2]
local rows = cjson.decode(ARGV[3])
local bump = ARGV[4] ~= '0'
local touch = ARGV[4] == '2'  -- also bump for rows Redis already holds (touch: LanceDB caught up on them)
local pending = ARGV[5] == '1'  -- the ingest path: LanceDB does not hold these yet (the fresh tail)
local now_ms = '0'  -- a string, as the scores below: redis.call prints every Lua number it is given with '%.17g'
if pending then
  local t = redis.call('TIME')
  now_ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local scopes = {}
local out = {}
for i, row in ipairs(rows) do
  local key = KEYS[2 * i - 1]
  local recency = KEYS[2 * i]
  local memory_id = row[1]
  local cur = redis.call('HMGET', key, 'v', 'e', 't', 'u', 'd', 'a', 'c')
  local outcome = outcome_of(cur, row)
  if (outcome == 2 and bump) or (outcome == 1 and touch) then
    local agent = row[10] or ''
    scopes[row[6] .. '|' .. row[7]] = true
    scopes[row[6] .. '|' .. row[7] .. '|' .. agent] = true
    if cur[1] then
      local old_agent = held_agent(key, cur)
      scopes[cur[3] .. '|' .. cur[4]] = true
      scopes[cur[3] .. '|' .. cur[4] .. '|' .. old_agent] = true
    elseif row[5] == '1' then
      -- deleting a memory this Redis does not hold: the agent it was under is unknown, so every agent's
      scopes[row[6] .. '|' .. row[7] .. '|*'] = true  -- reads of this user are invalidated (infra/read_cache.py)
    end
  end
  if outcome == 2 then
    if cur[1] and cur[5] == '0' then
      redis.call('ZREM', prefix .. 'r:' .. cur[3] .. ':' .. cur[4], memory_id)
    end
    local tail_user = prefix .. 'p:' .. row[6] .. ':' .. row[7]
    local tail_tenant = prefix .. 'pt:' .. row[6]
    if pending then
      -- kept until the index sink has written this version to LanceDB: searches merge it in meanwhile
      write_hash(key, row, created_of(cur, row), ARGV[5 + i])
      gather('ZADD', tail_user, row[9], memory_id)
      gather('ZADD', tail_tenant, row[9], memory_id)
      gather('ZADD', prefix .. 'pq', now_ms, row[6] .. '/' .. memory_id)
    else
      write_hash(key, row, created_of(cur, row), nil)
      if cur[1] then
        -- written to both stores at once (replay, repair): LanceDB holds it, it is no longer in the fresh tail
        redis.call('HDEL', key, 'pv', 'p')
        gather('ZREM', tail_user, memory_id)
        gather('ZREM', tail_tenant, memory_id)
        gather('ZREM', prefix .. 'pq', row[6] .. '/' .. memory_id)
      end
    end
    if row[5] == '0' then
      redis.call('ZADD', recency, row[9], memory_id)
    end
    if ttl > 0 then
      redis.call('EXPIRE', key, ttl)
      redis.call('EXPIRE', recency, ttl)
    end
  end
  out[i] = outcome
end
flush_gathered()
"""
    + LUA_BUMP_GENERATIONS
    + "return out\n"
)

_OUTCOMES = {int(o): o for o in WriteOutcome}
HASH_FIELDS = ("v", "e", "h", "d", "t", "u", "doc", "ts", "c", "x")

# KEYS: memory keys. Per key: its version, event id and user ({false, false, false} where Redis has none).
ORDERS_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HMGET', key, 'v', 'e', 'u')
end
return out
"""
ORDERS_CHUNK = 1_000  # keys per script call: well under a millisecond of server time each

# KEYS: memory keys. Returns one string, a line per memory held: key, then v e h d t u, tab-separated (ids,
# digits and hex only: no tab or newline can occur in them).
STATES_SCRIPT = """
local out = {}
for _, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'v', 'e', 'h', 'd', 't', 'u')
  if f[1] then
    out[#out + 1] = table.concat({key, f[1], f[2] or '', f[3] or '', f[4] or '', f[5] or '', f[6] or ''}, '\\t')
  end
end
return table.concat(out, '\\n')
"""
CAS_CHUNK = 256  # rows per script call: keeps each call well under a millisecond of server time

# KEYS: memory keys. ARGV: per key, the version, event id, content hash and deleted flag it must still hold.
# Deletes the hash (and its recency entry) only if it does: the reconciler never removes a row it did not see.
DELETE_EXACT_SCRIPT = """
local prefix = ARGV[1]
local removed = 0
for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 5
  local cur = redis.call('HMGET', key, 'v', 'e', 'h', 'd', 't', 'u')
  local same = cur[1] == ARGV[base + 1] and cur[2] == ARGV[base + 2]
  if same and cur[3] == ARGV[base + 3] and cur[4] == ARGV[base + 4] then
    redis.call('DEL', key)
    redis.call('ZREM', prefix .. 'r:' .. cur[5] .. ':' .. cur[6], ARGV[base + 5])
    redis.call('ZREM', prefix .. 'p:' .. cur[5] .. ':' .. cur[6], ARGV[base + 5])
    redis.call('ZREM', prefix .. 'pt:' .. cur[5], ARGV[base + 5])
    redis.call('ZREM', prefix .. 'pq', cur[5] .. '/' .. ARGV[base + 5])
    removed = removed + 1
  end
end
return removed
"""


# KEYS: memory keys. ARGV: prefix, then per key its version, event id, tenant, user and memory id as LanceDB now
# holds them (the index sink, after its commit). An entry leaves the fresh tail when Redis holds that version or an
# older one of the same user (LanceDB then holds at least what Redis does); a newer version in Redis stays pending
# (the sink writes it later). The index marks of the scopes cleared (``tenant|user|~``, ``tenant|user|agent|~``)
# are bumped: a cached read built from the fresh tail is rebuilt from LanceDB (hybrid search ranks indexed text by
# BM25), while what depends on the memories alone (a reader's hot vector copy) keeps its content generation
# (infra/read_cache.py). Returns how many entries were cleared, then the 1-based positions of the keys LanceDB
# holds ahead of Redis (no copy, or an older one): the ingest path's write of that version may still be on its
# way, and enters the fresh tail after this clear (the sink clears those again).
# The clear of one memory's fresh-tail fields, shared by the single-node and the cluster clear scripts: LanceDB holds
# ``version``/``event_id`` of the memory under ``key``. Returns the held agent (or nil), whether its entries leave
# the fresh tail, whether LanceDB holds it ahead of Redis, and whether its hash was pending (now cleared).
LUA_CLEAR_ROW = """
local function clear_row(key, version, event_id, user)
  local cur = redis.call('HMGET', key, 'v', 'e', 'u', 'p', 'a')
  if not cur[1] then
    return nil, true, true, false  -- not written yet, or forgotten (TTL, eviction): drop the dangling entries
  end
  if cur[3] ~= user then return cur[5], false, false, false end
  local cv = tonumber(cur[1])
  -- LanceDB holds a newer version or event of this memory (ahead), or the same one (the common case, compared
  -- before gt, which walks every byte of equal ids): either way the entry leaves the fresh tail
  local clear, ahead = cv < version, cv < version
  if cv == version then
    if cur[2] == event_id then clear, ahead = true, false else ahead = gt(event_id, cur[2]); clear = ahead end
  end
  if clear and cur[4] then
    redis.call('HDEL', key, 'pv', 'p')
    return cur[5], true, ahead, true
  end
  return cur[5], clear, ahead, false
end
"""
CLEAR_PENDING_SCRIPT = (
    LUA_GT
    + LUA_CLEAR_ROW
    + LUA_GATHERED_SETS
    + """
local prefix = ARGV[1]
local cleared = 0
local ahead = {}
local scopes = {}
for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 5
  local version, event_id = tonumber(ARGV[base + 1]), ARGV[base + 2]
  local tenant, user, memory_id = ARGV[base + 3], ARGV[base + 4], ARGV[base + 5]
  local agent, clear, is_ahead, was = clear_row(key, version, event_id, user)
  if is_ahead then ahead[#ahead + 1] = i end
  if was then
    cleared = cleared + 1
    -- the index marks of the user and of the agent: what is indexed moved, not the content
    scopes[tenant .. '|' .. user .. '|~'] = true
    scopes[tenant .. '|' .. user .. '|' .. (agent or '') .. '|~'] = true
  end
  if clear then
    gather('ZREM', prefix .. 'p:' .. tenant .. ':' .. user, memory_id)
    gather('ZREM', prefix .. 'pt:' .. tenant, memory_id)
    gather('ZREM', prefix .. 'pq', tenant .. '/' .. memory_id)
  end
end
flush_gathered()
"""
    + LUA_BUMP_GENERATIONS
    + "table.insert(ahead, 1, cleared)\nreturn ahead\n"
)

# On a Redis Cluster a script may touch only keys of one hash slot, and the keys a memory's write moves (its hash,
# its user's recency and fresh-tail sets, the tenant's tail, the sink's queue, the generations) live in several.
# So there each write is two steps (RedisCacheStore._apply_cluster): these scripts compare-and-set the memory
# hashes of one slot, and say what the single-node script would then have done to the other keys, which the client
# does next (one pipeline, then the generations). The order keeps cached reads safe: a generation is bumped after
# the data it covers, never before. What a crash between the two steps leaves out, a retried window puts back:
# for a row already current (1) the sets are asserted again (adds of the same member and score change nothing).
# KEYS: memory keys of one slot. ARGV: ttl, the packed rows (as CAS_SCRIPT), mode, pending, then the vectors.
# Returns the server time in ms, then per row {outcome, held tenant, held user, held agent, held deleted flag,
# held pending flag} ('' where Redis held no hash).
CLUSTER_CAS_SCRIPT = (
    LUA_GT
    + LUA_WRITE_ROW
    + """
local ttl = tonumber(ARGV[1])
local rows = cjson.decode(ARGV[2])
local pending = ARGV[4] == '1'
local t = redis.call('TIME')
local out = {tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
for i, row in ipairs(rows) do
  local key = KEYS[i]
  local cur = redis.call('HMGET', key, 'v', 'e', 't', 'u', 'd', 'a', 'c', 'p')
  local outcome = outcome_of(cur, row)
  local old_agent = cur[1] and held_agent(key, cur) or nil
  if outcome == 2 then
    write_hash(key, row, created_of(cur, row), pending and ARGV[4 + i] or nil)
    if cur[1] and not pending then redis.call('HDEL', key, 'pv', 'p') end
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
  local held_pending = cur[8] and '1' or '0'
  if outcome == 2 then held_pending = pending and '1' or '0' end
  out[i + 1] = {outcome, cur[1] and (cur[3] or '') or '', cur[1] and (cur[4] or '') or '', old_agent or '',
    cur[1] and (cur[5] or '') or '', held_pending}
end
return out
"""
)

# KEYS: memory keys of one slot. ARGV: per key as DELETE_EXACT_SCRIPT's. Deletes the hashes that still hold that
# state and returns the 1-based positions of those it deleted with their tenant and user ({i, tenant, user}...):
# the client then takes them out of the sets (RedisCacheStore._delete_exact_cluster).
CLUSTER_DELETE_EXACT_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 5
  local cur = redis.call('HMGET', key, 'v', 'e', 'h', 'd', 't', 'u')
  local same = cur[1] == ARGV[base + 1] and cur[2] == ARGV[base + 2]
  if same and cur[3] == ARGV[base + 3] and cur[4] == ARGV[base + 4] then
    redis.call('DEL', key)
    out[#out + 1] = {i, cur[5] or '', cur[6] or ''}
  end
end
return out
"""

# KEYS: memory keys of one slot. ARGV: per key as CLEAR_PENDING_SCRIPT's (without the prefix). Per key
# {clear, was pending, ahead, agent} as 0/1 flags and the agent: the client takes the cleared entries out of the
# sets and bumps the index marks (RedisCacheStore._clear_pending_cluster).
CLUSTER_CLEAR_PENDING_SCRIPT = (
    LUA_GT
    + LUA_CLEAR_ROW
    + """
local out = {}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 5
  local version, event_id, user = tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 4]
  local agent, clear, ahead, was = clear_row(key, version, event_id, user)
  out[i] = {clear and 1 or 0, was and 1 or 0, ahead and 1 or 0, agent or ''}
end
return out
"""
)

# KEYS: the generations hash. ARGV: the scopes to bump (as LUA_BUMP_GENERATIONS, on a cluster after the data).
BUMP_GENERATIONS_SCRIPT = """
local prefix = ''
local scopes = {}
for _, scope in ipairs(ARGV) do scopes[scope] = true end
""" + LUA_BUMP_GENERATIONS.replace("local gens = prefix .. 'g'", "local gens = KEYS[1]")

_CREDENTIAL_ERRORS = (AuthenticationError, AuthorizationError, NoPermissionError)

# Either client: redis-py's cluster client speaks the same commands, routes each by its key's slot, and follows
# MOVED/ASK redirects itself (refreshing its slot map after a failover).
RedisClient = aioredis.Redis | RedisCluster
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_CLIENT_OPTIONS: dict[str, Any] = {
    # Timeouts: a Redis that stops answering must surface as a retriable error, not hang a window.
    "decode_responses": False,
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
}


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def connect(url: str) -> RedisClient:
    """A client for ``url``, without a round trip: ``redis+cluster://`` (``rediss+cluster://``) gives the cluster
    client, any other URL the single-node one (:func:`open_redis` also detects a plain URL naming a cluster node)."""
    scheme, sep, rest = url.partition("://")
    try:
        if sep and scheme in CLUSTER_SCHEMES:
            return _cluster_client(f"{CLUSTER_SCHEMES[scheme]}://{rest}")
        return aioredis.Redis.from_url(url, health_check_interval=30, **_CLIENT_OPTIONS)
    except (ValueError, RedisClusterException) as exc:  # a malformed URL: one line that names the setting
        raise ConfigError(f"MEMSTREAM_REDIS_URL is not a Redis URL ({exc})") from None


CLUSTER_MAX_CONNECTIONS = 1_000  # per node (redis-py's default, 100, is a hard limit: past it a call fails)


def _cluster_client(url: str) -> RedisCluster:
    # a failover takes the cluster's node timeout and an election: the client's own retries ride out the first
    # redirects; what outlasts them surfaces as a retriable error (the window waits as a compensation)
    first, others = cluster_seeds(url)
    seeds = [ClusterNode(host, port) for host, port in others]
    return RedisCluster.from_url(first, startup_nodes=seeds, max_connections=CLUSTER_MAX_CONNECTIONS, **_CLIENT_OPTIONS)


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis://[user:pw@]h1:p1,h2:p2/db?opts`` -> the URL of the first node and the other seed nodes.

    A client started with one seed cannot start while that node is down, even though its replica took over
    (a process restarted after a failover); with several it asks the next. The credentials, database and
    options of the URL apply to every node (redis-py passes its connection options to each)."""
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    credentials, at, hosts = netloc.rpartition("@")
    first, *others = hosts.split(",")
    seeds = []
    for server in others:
        host, colon, port = server.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"{server!r} is not host:port")
        seeds.append((host.strip("[]"), int(port)))
    return f"{scheme}{sep}{credentials}{at}{first.strip()}{tail}", seeds


async def open_redis(url: str) -> RedisClient:
    """:func:`connect`, and a plain URL that names a Redis Cluster node (``INFO cluster`` says
    ``cluster_enabled:1``) gets the cluster client too. An unreachable server keeps the client the URL names (the
    worker starts and compensates); a server that refuses INFO (an ACL) is taken as a single node."""
    client = connect(url)
    if is_cluster(client):
        return client
    try:
        info = await client.info("cluster")
    except (RedisError, OSError):
        return client
    if not int(info.get("cluster_enabled", 0)):
        return client
    await client.aclose()
    log.info("Redis at %s is a cluster node: using the cluster client", _where(url))
    try:
        return _cluster_client(url)
    except RedisClusterException as exc:
        raise ConfigError(f"MEMSTREAM_REDIS_URL is not a Redis URL ({exc})") from None


def _where(url: str) -> str:
    return redact_url(url)


async def check_credentials(client: RedisClient, where: str) -> bool:
    """Raise :class:`AuthError` when Redis refuses our credentials; True when it answers, False when unreachable.

    An unreachable Redis is an outage the worker rides out (compensations); a refused password is not, and
    retrying it would only compensate every write until someone notices. A cluster node whose cluster cannot
    serve (slots not covered, ``cluster_state:fail``) raises :class:`RedisClusterError` naming that.
    """
    try:
        await client.ping()
    except _CREDENTIAL_ERRORS as exc:
        raise AuthError(
            f"Redis at {where} refused the credentials ({exc}): check the user and password in MEMSTREAM_REDIS_URL"
        ) from None
    except (RedisClusterException, ClusterDownError) as exc:
        if _unreachable(exc):
            return False
        raise RedisClusterError(CLUSTER_UNHEALTHY.format(where=where, detail=f"{type(exc).__name__}: {exc}")) from exc
    except (RedisError, OSError):
        return False
    await check_cluster_state(client, where)
    return True


def _unreachable(exc: BaseException) -> bool:
    """The cluster client's word for "no node answered": an outage (the worker starts and compensates), not a
    cluster that is not configured."""
    return "cannot be connected" in str(exc)


async def check_cluster_state(client: RedisClient, where: str) -> None:
    """Raise :class:`RedisClusterError` when ``client`` talks to a cluster that is not serving every slot (a node
    not yet joined to a cluster, slots not assigned, a majority of masters lost), or when a single-node client
    points at a cluster node (only :func:`connect` without :func:`open_redis` can give one)."""
    try:
        if is_cluster(client):
            raw = await client.execute_command("CLUSTER INFO", target_nodes=RedisCluster.RANDOM)
            state = _cluster_info(raw)
        else:
            info = await client.info("cluster")
            if not int(info.get("cluster_enabled", 0)):
                return
            state = _cluster_info(await client.execute_command("CLUSTER", "INFO"))
    except (RedisClusterException, ClusterDownError) as exc:
        if _unreachable(exc):
            return
        raise RedisClusterError(CLUSTER_UNHEALTHY.format(where=where, detail=f"{type(exc).__name__}: {exc}")) from exc
    except (RedisError, OSError):
        return  # unreachable, or INFO refused (an ACL): not judged here
    if state.get("cluster_state") != "ok":
        detail = ", ".join(f"{k}:{state.get(k, '?')}" for k in ("cluster_state", "cluster_slots_assigned"))
        raise RedisClusterError(CLUSTER_UNHEALTHY.format(where=where, detail=f"CLUSTER INFO says {detail}"))
    if not is_cluster(client):
        raise RedisClusterError(CLUSTER_NEEDS_CLIENT.format(where=where, detail="INFO cluster says cluster_enabled:1"))


def _cluster_info(raw: Any) -> dict[str, str]:
    """CLUSTER INFO as ``field -> value``: redis-py parses it into a dict or leaves the text, by client and version."""
    if isinstance(raw, dict):
        return {_text(k): _text(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


CLUSTER_UNHEALTHY = (
    "Redis at {where} is a Redis Cluster that cannot serve every slot ({detail}): create the cluster (redis-cli "
    "--cluster create ...) or wait until it reports cluster_state:ok"
)
CLUSTER_NEEDS_CLIENT = (
    "Redis at {where} is a Redis Cluster node ({detail}) reached with a single-node client: name it "
    "redis+cluster://host:port in MEMSTREAM_REDIS_URL (memstream also detects a plain redis:// URL at start)"
)


async def guarded(what: str, action: Callable[[], Awaitable[T]]) -> T:
    """Run a Redis call, turning driver errors into :class:`StoreError` with the right policy."""
    try:
        return await action()
    except _CREDENTIAL_ERRORS as exc:
        # Say what it is (a refused password, not an outage). Still retriable: credentials changed under a running
        # worker must not dead-letter its window; the writes wait as compensations until the password is fixed,
        # and a process that starts with a refused password stops at once (check_credentials).
        raise StoreError(
            f"Redis refused the credentials while {what} ({exc}): check MEMSTREAM_REDIS_URL", retriable=True
        ) from exc
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreError(f"Redis unreachable while {what}: {exc}") from exc
    except AttributeError as exc:
        # redis-py's cluster client closes every connection of a node that failed, under the calls still using
        # them (seen as "'NoneType' object has no attribute 'writelines'" when a master is killed): an outage
        if "'NoneType' object has no attribute" not in str(exc):
            raise
        raise StoreError(f"Redis connection closed under the call while {what}: {exc}") from exc
    except (MovedError, AskError) as exc:
        # A redirect is no outage: the key lives on another cluster node. The cluster client follows redirects
        # itself (one that outlasts its retries is a failover still settling); the single-node client cannot.
        detail = f"{type(exc).__name__} to slot {exc.slot_id} at {exc.host}:{exc.port} while {what}"
        raise RedisClusterError(CLUSTER_NEEDS_CLIENT.format(where="MEMSTREAM_REDIS_URL", detail=detail)) from exc
    except (ClusterDownError, TryAgainError) as exc:
        raise RedisClusterError(f"Redis Cluster cannot serve while {what} ({type(exc).__name__}: {exc})") from exc
    except RedisClusterException as exc:  # no node serves a slot, no node answers, or a call that names no key
        if _unreachable(exc):
            raise StoreError(f"Redis unreachable while {what}: {exc}") from exc
        raise RedisClusterError(f"Redis Cluster refused a call while {what} ({type(exc).__name__}: {exc})") from exc
    except ClusterCrossSlotError as exc:
        # a command whose keys span slots (a bug: every multi-key call is grouped by slot); retriable too: a window
        # waits as a compensation while the cluster is fixed, rather than dead-lettering
        raise RedisClusterError(f"Redis Cluster refused a call while {what} ({type(exc).__name__}: {exc})") from exc
    except NoScriptError as exc:
        # A node without the script: on a cluster, a replica just promoted by a failover (the script cache is not
        # replicated) while the client still loads it on the nodes of its old slot map. A later attempt, once the
        # client has the new map, loads it there: retriable, or a failover dead-letters whole windows.
        raise StoreError(
            f"Redis has no copy of a script while {what} ({exc}): a node promoted by a failover starts without "
            "them; they are loaded again on the next attempt",
            retriable=True,
        ) from exc
    except RedisError as exc:
        raise StoreError(f"Redis failed while {what}: {exc}", retriable=False) from exc


class RedisCacheStore:
    """The :class:`processors.ports.CacheStore` on Redis."""

    def __init__(self, client: RedisClient, prefix: str, ttl_s: int = 0) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._cas = client.register_script(CAS_SCRIPT)
        self._delete_exact = client.register_script(DELETE_EXACT_SCRIPT)
        self._clear_pending = client.register_script(CLEAR_PENDING_SCRIPT)
        self._orders = client.register_script(ORDERS_SCRIPT)
        self._states = client.register_script(STATES_SCRIPT)
        self.cluster = is_cluster(client)  # scripts then touch one slot each: writes are two steps (see above)
        self._cluster_cas = client.register_script(CLUSTER_CAS_SCRIPT)
        self._cluster_delete_exact = client.register_script(CLUSTER_DELETE_EXACT_SCRIPT)
        self._cluster_clear_pending = client.register_script(CLUSTER_CLEAR_PENDING_SCRIPT)
        self._bump = client.register_script(BUMP_GENERATIONS_SCRIPT)
        self.faults: FaultSwitch | None = None  # fault injection (tests, `memstream chaos`); None: off

    def memory_key(self, key: str) -> str:
        """The Redis key of a memory, from its store key ``<tenant>/<memory id>`` (MemoryRow.key)."""
        return f"{self.prefix}m:{key}"

    def recency_key(self, scope: Scope) -> str:
        return f"{self.prefix}r:{scope.tenant_id}:{scope.user_id}"

    async def apply(self, rows: Sequence[MemoryRow], *, bump: bool = True, pending: bool = False) -> list[WriteOutcome]:
        """Compare-and-set; ``bump=False`` for refills from LanceDB (they change no scope's read results).

        ``pending``: the ingest path, LanceDB does not hold these rows yet; each applied row joins the fresh tail
        with its vector (searched by exact scores until the index sink has written it to LanceDB)."""
        return await self._apply(rows, "1" if bump else "0", pending=pending)

    async def _apply(self, rows: Sequence[MemoryRow], mode: str, *, pending: bool = False) -> list[WriteOutcome]:
        if not rows:
            return []
        if self.faults is not None:
            self.faults.check("redis_write")
        if self.cluster:
            return await guarded(f"writing {len(rows)} memories", lambda: self._apply_cluster(rows, mode, pending))

        async def run() -> list[WriteOutcome]:
            pipe = cast(aioredis.Redis, self.client).pipeline(transaction=False)  # single node (cluster: above)
            for start in range(0, len(rows), CAS_CHUNK):
                chunk = rows[start : start + CAS_CHUNK]
                keys: list[str] = []
                for row in chunk:
                    keys += [self.memory_key(row.key), self.recency_key(row.scope)]
                packed = orjson.dumps([_row_args(row) for row in chunk])
                args: list[Any] = [self.ttl_s, self.prefix, packed, mode, "1" if pending else "0"]
                if pending:
                    args += [row.vector for row in chunk]
                await self._cas(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
            return [_OUTCOMES[code] for chunk in results for code in chunk]

        return await guarded(f"writing {len(rows)} memories", run)

    async def touch(self, rows: Sequence[MemoryRow]) -> None:
        """Bump the read-cache generations of the scopes of rows Redis already holds (or applies now).

        For a LanceDB write that lands after Redis took the same rows (a compensation, a reconciler repair): until
        then cached reads could have been built from LanceDB's older rows under the generation Redis' write set.
        """
        await self._apply(rows, "2")

    async def clear_pending(self, rows: Sequence[MemoryRow]) -> TailCleared:
        """LanceDB now holds these rows (the index sink committed them): take them out of the fresh tail where
        Redis holds no newer version. Says how many entries were cleared and which rows Redis holds no copy of, or
        an older one (the ingest path's write may still be on its way)."""
        if not rows:
            return TailCleared()
        if self.cluster:
            what = f"clearing {len(rows)} memories from the fresh tail"
            return await guarded(what, lambda: self._clear_pending_cluster(rows))

        async def run() -> TailCleared:
            pipe = cast(aioredis.Redis, self.client).pipeline(transaction=False)  # single node (cluster: above)
            chunks = [rows[start : start + CAS_CHUNK] for start in range(0, len(rows), CAS_CHUNK)]
            for chunk in chunks:
                args: list[Any] = [self.prefix]
                for row in chunk:
                    args += [str(row.version), row.event_id, row.scope.tenant_id, row.scope.user_id, row.memory_id]
                await self._clear_pending(keys=[self.memory_key(r.key) for r in chunk], args=args, client=pipe)
            cleared, ahead = 0, []
            for chunk, (count, *positions) in zip(chunks, await pipe.execute(), strict=True):
                cleared += int(count)
                ahead += [chunk[int(i) - 1] for i in positions]
            return TailCleared(cleared, tuple(ahead))

        return await guarded(f"clearing {len(rows)} memories from the fresh tail", run)

    async def pending_rows(self, scope: ScopeQuery) -> list[MemoryRow]:
        """The scope's fresh tail: memories (tombstones included, vectors attached) LanceDB does not hold yet.

        Needs a tenant; with a user, reads that user's set, else the tenant's. Agent and run are filtered here."""
        if scope.tenant_id is None:
            raise ValueError("the fresh tail is read per tenant")
        tail = (
            f"{self.prefix}p:{scope.tenant_id}:{scope.user_id}"
            if scope.user_id is not None
            else f"{self.prefix}pt:{scope.tenant_id}"
        )

        async def run() -> list[MemoryRow]:
            members: list[bytes] = await self.client.zrange(tail, 0, -1)  # type: ignore[assignment]
            ids = [i.decode() for i in members]
            if not ids:
                return []
            return await self._rows_with_vectors([f"{scope.tenant_id}{KEY_SEP}{i}" for i in ids])

        rows = await guarded("reading the fresh tail", run)
        return [r for r in rows if scope.matches(r.scope)]

    async def _rows_with_vectors(self, keys: Sequence[str]) -> list[MemoryRow]:
        """Fresh-tail rows (``p`` set) under these keys, with their vectors; others are left out."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self.memory_key(key), [*HASH_FIELDS, "p", "pv"])
        out: list[MemoryRow] = []
        for key, values in zip(keys, await pipe.execute(), strict=True):
            if values[-2] is None:
                continue
            row = _row(split_key(key)[1], values[:-2])
            if row is not None:
                out.append(dataclasses.replace(row, vector=values[-1] or b""))
        return out

    async def stale_pending(self, older_than_ms: int, limit: int) -> list[MemoryRow]:
        """Fresh-tail rows that entered more than ``older_than_ms`` ago (oldest first, at most ``limit``), with
        vectors: what the index sink writes from Redis when the log no longer brings them (a broker that
        restarted empty, a log cut short)."""

        async def run() -> list[MemoryRow]:
            now_s, now_us = await self.client.time()
            cutoff = now_s * 1000 + now_us // 1000 - older_than_ms
            members: list[bytes] = await self.client.zrangebyscore(  # type: ignore[assignment]
                f"{self.prefix}pq", "-inf", cutoff, start=0, num=limit
            )
            keys = [m.decode() for m in members]
            rows = await self._rows_with_vectors(keys)
            held = {r.key for r in rows}
            gone = [k for k in keys if k not in held]
            if gone:  # entries whose memory is no longer pending (or no longer in Redis): drop them
                await self.client.zrem(f"{self.prefix}pq", *gone)
            return rows

        return await guarded("reading the fresh tail's oldest entries", run)

    async def pending_count(self) -> int:
        """Memories in the fresh tail (written by the ingest path, not in LanceDB yet)."""
        count: int = await guarded("counting the fresh tail", lambda: self.client.zcard(f"{self.prefix}pq"))  # type: ignore[arg-type,return-value]
        return int(count)

    async def get(self, keys: Sequence[str]) -> list[MemoryRow | None]:
        """The memories under these keys (``<tenant>/<memory id>``), ``None`` where Redis has none."""

        async def run() -> list[MemoryRow | None]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self.memory_key(key), HASH_FIELDS)
            results = await pipe.execute()
            return [_row(split_key(key)[1], values) for key, values in zip(keys, results, strict=True)]

        return await guarded(f"reading {len(keys)} memories", run)

    async def orders(self, keys: Sequence[str]) -> list[tuple[int, str, str] | None]:
        """Per key, the ``(version, event_id)`` the memory holds and its user; ``None`` where Redis has none.

        What waiting for a memory needs, without the text and metadata :meth:`get` decodes: one script call per
        thousand keys (a pipeline of HMGET is packed command by command in Python, and :meth:`get` decodes each
        row's document too)."""

        async def run() -> list[Any]:
            if self.cluster:  # a script reads one slot: a pipeline of HMGET, sent per node
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(self.memory_key(key), ["v", "e", "u"])
                return list(await pipe.execute())
            found: list[Any] = []
            for start in range(0, len(keys), ORDERS_CHUNK):
                chunk = [self.memory_key(k) for k in keys[start : start + ORDERS_CHUNK]]
                found += await self._orders(keys=chunk)
            return found

        values = await guarded(f"reading the versions of {len(keys)} memories", run)
        return [None if v is None else (int(v), (e or b"").decode(), (u or b"").decode()) for v, e, u in values]

    async def owners(self, keys: Sequence[str]) -> dict[str, str]:
        """The user each of these memories belongs to, for those Redis holds (one pipelined round trip)."""

        async def run() -> dict[str, str]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(self.memory_key(key), "u")
            users = await pipe.execute()
            return {k: u.decode() for k, u in zip(keys, users, strict=True) if u is not None}

        return await guarded(f"reading the owners of {len(keys)} memories", run)

    async def recent(self, scope: Scope, limit: int = 20) -> list[str]:
        """Ids of the user's most recently changed live memories, newest first."""
        ids: list[bytes] = await guarded(
            "reading the recency index",
            lambda: self.client.zrevrange(self.recency_key(scope), 0, limit - 1),  # type: ignore[arg-type,return-value]
        )
        return [i.decode() for i in ids]

    async def states(self, scope: ScopeQuery | None = None) -> dict[str, StoreState]:
        async def run() -> dict[str, StoreState]:
            out: dict[str, StoreState] = {}
            marker = len(self.prefix) + 2
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=f"{self.prefix}m:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await self._collect_states(batch, marker, scope, out)
                    batch = []
            await self._collect_states(batch, marker, scope, out)
            return out

        return await guarded("scanning memories", run)

    async def _collect_states(
        self, keys: list[bytes], marker: int, scope: ScopeQuery | None, out: dict[str, StoreState]
    ) -> None:
        if not keys:
            return
        if scope is None or (scope.agent_id is None and scope.run_id is None):
            await self._collect_plain_states(keys, marker, scope, out)
            return
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, HASH_FIELDS)
        for key, values in zip(keys, await pipe.execute(), strict=True):
            tenant_id, _, memory_id = key[marker:].decode().partition(KEY_SEP)
            if not memory_id:
                continue  # an old-layout key (m:<memory_id>): never read, reconciliation refills the new ones
            row = _row(memory_id, values)
            if row is not None and row.scope.tenant_id == tenant_id and (scope is None or scope.matches(row.scope)):
                out[row.key] = row.state()

    async def _collect_plain_states(
        self, keys: list[bytes], marker: int, scope: ScopeQuery | None, out: dict[str, StoreState]
    ) -> None:
        """States without the document (a scope of tenant and user at most needs neither agent nor run), read by
        one script call that returns them as one string: redis-py's per-reply parsing of a pipeline of HMGETs,
        and decoding every memory's text and metadata, were most of a verify's time (a rebuild verifies)."""
        for key, v, e, h, d, t, u in await self._plain_states(keys):
            tenant_id, _, memory_id = key[marker:].partition(KEY_SEP)
            if not memory_id or t != tenant_id:
                continue  # an old-layout key (m:<memory_id>): never read, reconciliation refills the new ones
            if scope is None or scope.matches(Scope(t, u, None, None)):
                out[f"{tenant_id}{KEY_SEP}{memory_id}"] = StoreState(int(v), e, h, d == "1")

    async def _plain_states(self, keys: list[bytes]) -> list[list[str]]:
        """``[key, v, e, h, d, t, u]`` of each memory held under ``keys``."""
        if self.cluster:  # a script reads one slot: a pipeline of HMGET, sent per node
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, ["v", "e", "h", "d", "t", "u"])
            return [
                [key.decode(), *((b or b"").decode() for b in values)]
                for key, values in zip(keys, await pipe.execute(), strict=True)
                if values[0] is not None
            ]
        packed: bytes = await self._states(keys=keys, args=[])
        return [line.split("\t") for line in packed.decode().split("\n")] if packed else []

    async def _apply_cluster(self, rows: Sequence[MemoryRow], mode: str, pending: bool) -> list[WriteOutcome]:
        """CAS_SCRIPT in two steps (see CLUSTER_CAS_SCRIPT): the hashes per slot, then the sets and generations."""
        calls: list[tuple[list[str], list[Any]]] = []
        groups = _by_slot(self.client, [self.memory_key(r.key) for r in rows])
        for positions in groups:
            chunk = [rows[i] for i in positions]
            args: list[Any] = [self.ttl_s, orjson.dumps([_row_args(r) for r in chunk]), mode, "1" if pending else "0"]
            if pending:
                args += [r.vector for r in chunk]
            calls.append(([self.memory_key(r.key) for r in chunk], args))
        results = await _run_scripts(self.client, self._cluster_cas, calls)
        outcomes: list[WriteOutcome] = [WriteOutcome.STALE] * len(rows)
        follow = _FollowUps(self.prefix)
        for positions, (now_ms, *held) in zip(groups, results, strict=True):
            for i, (code, *was) in zip(positions, held, strict=True):
                outcomes[i] = _OUTCOMES[int(code)]
                follow.after_write(rows[i], int(code), [_text(v) for v in was], mode, pending, int(now_ms), self.ttl_s)
        await follow.send(self.client, self._bump)
        return outcomes

    async def _clear_pending_cluster(self, rows: Sequence[MemoryRow]) -> TailCleared:
        calls: list[tuple[list[str], list[Any]]] = []
        groups = _by_slot(self.client, [self.memory_key(r.key) for r in rows])
        for positions in groups:
            args: list[Any] = []
            for i in positions:
                row = rows[i]
                args += [str(row.version), row.event_id, row.scope.tenant_id, row.scope.user_id, row.memory_id]
            calls.append(([self.memory_key(rows[i].key) for i in positions], args))
        results = await _run_scripts(self.client, self._cluster_clear_pending, calls)
        cleared, ahead = 0, []
        follow = _FollowUps(self.prefix)
        for positions, flags in zip(groups, results, strict=True):
            for i, (clear, was, is_ahead, agent) in zip(positions, flags, strict=True):
                row = rows[i]
                if int(is_ahead):
                    ahead.append(row)
                if int(clear):
                    cleared += int(was)
                    follow.after_clear(row, bool(int(was)), _text(agent))
        await follow.send(self.client, self._bump)
        ahead.sort(key=rows.index)  # in the rows' order, as the single-node script gives them
        return TailCleared(cleared, tuple(ahead))

    async def _delete_exact_cluster(self, states: Mapping[str, StoreState]) -> int:
        items = list(states.items())
        groups = _by_slot(self.client, [self.memory_key(k) for k, _ in items])
        calls: list[tuple[list[str], list[Any]]] = []
        for positions in groups:
            args: list[Any] = []
            for i in positions:
                key, st = items[i]
                args += [str(st.version), st.event_id, st.content_hash, "1" if st.deleted else "0", split_key(key)[1]]
            calls.append(([self.memory_key(items[i][0]) for i in positions], args))
        follow = _FollowUps(self.prefix)
        removed = 0
        results = await _run_scripts(self.client, self._cluster_delete_exact, calls)
        for positions, deleted in zip(groups, results, strict=True):
            for at, tenant, user in deleted:
                memory_id = split_key(items[positions[int(at) - 1]][0])[1]
                follow.forget(_text(tenant), _text(user), memory_id)
                removed += 1
        await follow.send(self.client, self._bump)
        return removed

    async def claim_sentinel(self, value: str) -> bool:
        """Set the sentinel key if it is absent; True means it was absent: this Redis lost (or never had) our
        data since the last claim, so a reconciliation must refill it."""
        # ":2": the key layout with tenant-scoped memory keys; a Redis filled by an older memstream lacks it, so
        # the worker refills it at start (its old m:<memory_id> keys are never read).
        claimed = await guarded(
            "checking the sentinel", lambda: self.client.set(f"{self.prefix}sentinel:2", value, nx=True)
        )
        return bool(claimed)

    async def delete_exact(self, states: Mapping[str, StoreState]) -> int:
        """Remove each memory only if it still holds exactly that state; return how many went."""
        if not states:
            return 0

        if self.cluster:
            return await guarded(f"deleting {len(states)} memories", lambda: self._delete_exact_cluster(states))

        async def run() -> int:
            removed = 0
            items = list(states.items())
            for start in range(0, len(items), CAS_CHUNK):
                chunk = items[start : start + CAS_CHUNK]
                args: list[Any] = [self.prefix]
                for key, st in chunk:
                    memory_id = split_key(key)[1]  # the recency index (per tenant and user) holds plain ids
                    args += [str(st.version), st.event_id, st.content_hash, "1" if st.deleted else "0", memory_id]
                keys = [self.memory_key(k) for k, _ in chunk]
                removed += int(await self._delete_exact(keys=keys, args=args))
            return removed

        return await guarded(f"deleting {len(states)} memories", run)

    async def close(self) -> None:
        await self.client.aclose()


class RedisEmbeddingCache:
    """The :class:`processors.ports.EmbeddingCache` on Redis (MGET / pipelined SET EX)."""

    def __init__(self, client: RedisClient, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        full = [f"{self.prefix}e:{k}" for k in keys]
        if isinstance(self.client, RedisCluster):  # MGET of keys in several slots: one MGET per slot, per node
            cluster = self.client
            found: list[bytes | None] = await guarded(
                "reading the embedding cache",
                lambda: cluster.mget_nonatomic(full),  # type: ignore[arg-type]
            )
            return found
        values: list[bytes | None] = await guarded("reading the embedding cache", lambda: self.client.mget(full))  # type: ignore[arg-type,return-value,union-attr]
        return values

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        async def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(f"{self.prefix}e:{key}", value, ex=self.ttl_s or None)
            await pipe.execute()

        await guarded("writing the embedding cache", run)


class IndexProgress:
    """How far the index sink has written each partition of the embedded topic into LanceDB (next offset), as the
    sink records it after each commit (its consumer group's committed offsets say the same to any Kafka tool)."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, topic: str) -> str:
        return f"{self.prefix}idx:{topic}"

    async def record(self, topic: str, positions: Mapping[int, int]) -> None:
        if not positions:
            return
        mapping = {str(p): str(o) for p, o in positions.items()}
        await guarded("recording the index progress", lambda: self.client.hset(self.key(topic), mapping=mapping))  # type: ignore[arg-type]

    async def read(self, topic: str) -> dict[int, int]:
        key = self.key(topic)
        raw: dict[bytes, bytes] = await guarded("reading the index progress", lambda: self.client.hgetall(key))  # type: ignore[arg-type,return-value]
        return {int(p): int(o) for p, o in raw.items()}


# KEYS: the counters hash. ARGV: name, amount, name, amount... One script: all the counts or none.
ADD_COUNTERS_SCRIPT = """
for i = 1, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""


class RedisCounters:
    """The :class:`processors.ports.Counters` as one Redis hash, so ``memstream stats`` sees every worker."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.key = f"{prefix}stats"
        self._pending: dict[str, int] = {}
        # on a cluster, all or none by a script: redis-py's async cluster transactions run in a thread with a loop
        # of their own, which broke on the client's lock (a worker stopped by "bound to a different event loop")
        self._add_all = client.register_script(ADD_COUNTERS_SCRIPT) if is_cluster(client) else None

    async def add(self, counts: Mapping[str, int]) -> None:
        """Add to the shared counters. While Redis is unreachable the counts are kept here and added with the
        next call that gets through, so an outage does not make the figures lie (the error is still raised)."""
        for name, value in counts.items():
            if value:
                self._pending[name] = self._pending.get(name, 0) + value
        if not self._pending:
            return
        # Take what is pending before awaiting: two windows (or a window and a compensation) can add at once, and
        # a shared snapshot would be sent twice and then subtracted twice (a KeyError that stopped the worker).
        sending, self._pending = self._pending, {}

        async def run() -> None:
            if self._add_all is not None:  # a cluster: its pipelines' transactions run in a thread of their own
                await self._add_all(keys=[self.key], args=[x for item in sending.items() for x in item])
                return
            pipe = self.client.pipeline(transaction=True)  # all or none: a retry must not count twice
            for name, value in sending.items():
                pipe.hincrby(self.key, name, value)
            await pipe.execute()

        try:
            await guarded("updating counters", run)
        except StoreError:
            for name, value in sending.items():  # not sent: kept for the next call that gets through
                self._pending[name] = self._pending.get(name, 0) + value
            raise

    async def read(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = await guarded("reading counters", lambda: self.client.hgetall(self.key))  # type: ignore[arg-type,return-value]
        return {k.decode(): int(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _by_slot(client: RedisClient, keys: Sequence[str]) -> list[list[int]]:
    """Positions of ``keys`` grouped by hash slot (in their order), at most CAS_CHUNK per group."""
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(i)
    return [
        positions[at : at + CAS_CHUNK] for positions in groups.values() for at in range(0, len(positions), CAS_CHUNK)
    ]


CLUSTER_SCRIPT_CONCURRENCY = 32  # script calls in flight per batch: within the cluster client's connections per node


async def _run_scripts(client: RedisClient, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
    """Each ``(keys, args)`` call of ``script`` (keys of one slot), up to CLUSTER_SCRIPT_CONCURRENCY at once: the
    cluster client routes each by its slot (it refuses scripts inside its pipelines) and loads the script on a node
    that does not know it yet (a fresh node, a replica just promoted). Unbounded, a window of a thousand memories
    (a slot each) asked a node for more connections than its pool holds (MaxConnectionsError)."""
    gate = asyncio.Semaphore(CLUSTER_SCRIPT_CONCURRENCY)

    async def one(keys: list[str], args: list[Any]) -> Any:
        async with gate:
            return await script(keys=keys, args=args)

    return list(await asyncio.gather(*(one(keys, args) for keys, args in calls)))


class _FollowUps:
    """On a cluster, what the single-node scripts do to the sets and generations beside the memory hashes, done by
    the client after the hashes (one pipeline sent per node, then one generation bump)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.scopes: set[str] = set()
        self.commands: list[tuple[str, str, Any]] = []

    def after_write(
        self, row: MemoryRow, outcome: int, held: list[str], mode: str, pending: bool, now_ms: int, ttl: int
    ) -> None:
        """``held``: tenant, user, agent, deleted flag, pending flag of the hash before the script ('' if none)."""
        tenant, user, agent = row.scope.tenant_id, row.scope.user_id, row.scope.agent_id or ""
        old_tenant, old_user, old_agent, old_deleted, held_pending = held
        was_held = old_deleted != ""
        p = self.prefix
        # also for a row already current (1): a window retried after a crash between the two steps must still
        # move the generations its first try did not (a spurious bump only costs a cached read its entry)
        if outcome in (1, 2) and mode != "0":
            self.scopes |= {f"{tenant}|{user}", f"{tenant}|{user}|{agent}"}
            if was_held:
                self.scopes |= {f"{old_tenant}|{old_user}", f"{old_tenant}|{old_user}|{old_agent}"}
            elif row.deleted:
                self.scopes.add(f"{tenant}|{user}|*")  # the agent it was under is unknown: every agent's reads
        recency = f"{p}r:{tenant}:{user}"
        member = f"{tenant}{KEY_SEP}{row.memory_id}"
        if outcome == 2:
            old_recency = f"{p}r:{old_tenant}:{old_user}"
            if was_held and old_deleted == "0" and (row.deleted or old_recency != recency):
                self.commands.append(("zrem", old_recency, row.memory_id))  # (a live row's ZADD moves it)
            if pending:
                self._tail("zadd", row, now_ms)
            elif was_held:
                self._tail("zrem", row, now_ms)
            if not row.deleted:
                self.commands.append(("zadd", recency, {row.memory_id: row.updated_at}))
            if ttl > 0:
                self.commands.append(("expire", recency, ttl))
        elif outcome == 1:
            # already current: a window retried after a crash between the two steps finds the sets as it left
            # them; adding the same members again changes nothing otherwise (the queue keeps its first score)
            if not row.deleted:
                self.commands.append(("zadd", recency, {row.memory_id: row.updated_at}))
            if held_pending == "1":
                self.commands.append(("zadd", f"{p}p:{tenant}:{user}", {row.memory_id: row.updated_at}))
                self.commands.append(("zadd", f"{p}pt:{tenant}", {row.memory_id: row.updated_at}))
                self.commands.append(("zaddnx", f"{p}pq", {member: now_ms}))

    def _tail(self, command: str, row: MemoryRow, now_ms: int) -> None:
        tenant, user, p = row.scope.tenant_id, row.scope.user_id, self.prefix
        member = f"{tenant}{KEY_SEP}{row.memory_id}"
        if command == "zadd":
            self.commands.append(("zadd", f"{p}p:{tenant}:{user}", {row.memory_id: row.updated_at}))
            self.commands.append(("zadd", f"{p}pt:{tenant}", {row.memory_id: row.updated_at}))
            self.commands.append(("zadd", f"{p}pq", {member: now_ms}))
        else:
            self.commands.append(("zrem", f"{p}p:{tenant}:{user}", row.memory_id))
            self.commands.append(("zrem", f"{p}pt:{tenant}", row.memory_id))
            self.commands.append(("zrem", f"{p}pq", member))

    def after_clear(self, row: MemoryRow, was_pending: bool, agent: str) -> None:
        tenant, user = row.scope.tenant_id, row.scope.user_id
        if was_pending:  # the index marks of the user and of the agent: what is indexed moved, not the content
            self.scopes |= {f"{tenant}|{user}|~", f"{tenant}|{user}|{agent}|~"}
        self._tail("zrem", row, 0)

    def forget(self, tenant: str, user: str, memory_id: str) -> None:
        p = self.prefix
        self.commands.append(("zrem", f"{p}r:{tenant}:{user}", memory_id))
        self.commands.append(("zrem", f"{p}p:{tenant}:{user}", memory_id))
        self.commands.append(("zrem", f"{p}pt:{tenant}", memory_id))
        self.commands.append(("zrem", f"{p}pq", f"{tenant}{KEY_SEP}{memory_id}"))

    def merged(self) -> list[tuple[str, str, Any]]:
        """One command per key and kind (a ZADD of every member, a ZREM of every member), in first-seen order:
        a per-deployment key (the queue, a tenant's tail) takes a member from each row of the batch. Only when no
        member is both added to and removed from one key (a batch holds each memory once): else as they came."""
        added = {(k, m) for c, k, v in self.commands if c in ("zadd", "zaddnx") for m in v}
        removed = {(k, v) for c, k, v in self.commands if c == "zrem"}
        if added & removed:
            return self.commands
        out: dict[tuple[str, str], Any] = {}
        for command, key, value in self.commands:
            held = out.get((command, key))
            if command in ("zadd", "zaddnx"):
                out[(command, key)] = {**held, **value} if held else dict(value)
            elif command == "zrem":
                out[(command, key)] = [*held, value] if held else [value]
            else:
                out[(command, key)] = value
        return [(command, key, value) for (command, key), value in out.items()]

    async def send(self, client: RedisClient, bump: Any) -> None:
        if self.commands:
            pipe = client.pipeline(transaction=False)
            for command, key, value in self.merged():
                if command == "zadd":
                    pipe.zadd(key, value)
                elif command == "zaddnx":
                    pipe.zadd(key, value, nx=True)
                elif command == "zrem":
                    pipe.zrem(key, *(value if isinstance(value, list) else [value]))
                else:
                    pipe.expire(key, value)
            await pipe.execute()
        if self.scopes:  # after the data it covers: a cached read is never validated against data older than it
            await bump(keys=[f"{self.prefix}g"], args=sorted(self.scopes))


def _row_args(row: MemoryRow) -> list[Any]:
    s = row.scope
    return [
        row.memory_id,
        str(row.version),
        row.event_id,
        row.content_hash,
        "1" if row.deleted else "0",
        s.tenant_id,
        s.user_id,
        orjson.dumps({"a": s.agent_id, "r": s.run_id, "x": row.text, "md": row.metadata}).decode(),
        str(row.updated_at),
        s.agent_id or "",
        "" if row.created_at is None else str(row.created_at),
        "" if row.expires_at is None else str(row.expires_at),
    ]


def _row(memory_id: str, values: list[bytes | None]) -> MemoryRow | None:
    if values[0] is None:
        return None
    v, e, h, d, t, u, doc, ts, c, x = (b.decode() if b is not None else "" for b in values)
    body = orjson.loads(doc) if doc else {}
    return MemoryRow(
        memory_id=memory_id,
        scope=Scope(t, u, body.get("a"), body.get("r")),
        text=body.get("x", ""),
        metadata=body.get("md", {}),
        version=int(v),
        event_id=e,
        content_hash=h,
        deleted=d == "1",
        updated_at=int(ts or 0),
        created_at=int(c) if c else None,  # None: written before created_at was kept
        expires_at=int(x) if x else None,
    )
