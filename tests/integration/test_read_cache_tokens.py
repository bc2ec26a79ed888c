"""Validation tokens read together (infra/read_cache.py, RedisReadCache.token): the reads of one event-loop turn
share one HMGET, and each still gets its own scope's token, never one older than a write that finished first."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from infra import services
from infra.read_cache import RedisReadCache, scope_field, validation_fields, validation_token
from schemas.errors import StoreError
from tests.integration.helpers import command_calls, unique_tag


async def test_one_turns_reads_share_one_hmget_and_each_gets_its_scopes_token(redis_client: aioredis.Redis) -> None:
    prefix = f"tok{unique_tag()}:"
    cache = RedisReadCache(redis_client, prefix, ttl_s=60)
    user, agent, other = scope_field("t", "ann", None), scope_field("t", "ann", "chef"), scope_field("t", "bob", None)
    await redis_client.hset(
        cache.gens_key, mapping={user: b"5", agent: b"7", "t|ann|*": b"2", "t|ann|~": b"9", "t|ann|chef|~": b"3"}
    )
    fields = [user, agent, other, user, agent] * 4
    before = await command_calls(redis_client, "hmget")
    tokens = await asyncio.gather(
        *(cache.token(f) for f in fields), *(cache.token(f, content_only=True) for f in fields)
    )
    assert await command_calls(redis_client, "hmget") - before == 1
    alone = {f: validation_token(await redis_client.hmget(cache.gens_key, validation_fields(f))) for f in set(fields)}
    content = {
        f: validation_token(await redis_client.hmget(cache.gens_key, validation_fields(f, content_only=True)))
        for f in set(fields)
    }
    assert tokens == [alone[f] for f in fields] + [content[f] for f in fields]
    assert alone == {user: b"5/9", agent: b"7/2/3", other: None}
    assert content == {user: b"5", agent: b"7/2", other: None}  # the index mark left out


async def test_a_write_that_finished_before_the_read_began_is_seen(redis_client: aioredis.Redis) -> None:
    cache = RedisReadCache(redis_client, f"tok{unique_tag()}:", ttl_s=60)
    field = scope_field("t", "ann", None)
    for generation in range(1, 30):
        await redis_client.hset(cache.gens_key, field, str(generation))
        seen = await asyncio.gather(*(cache.token(field, content_only=True) for _ in range(3)))
        assert seen == [str(generation).encode()] * 3


async def test_redis_down_fails_every_read_of_the_batch_with_a_store_error() -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{services.free_port()}/0", socket_connect_timeout=1)
    try:
        cache = RedisReadCache(dead, "x:", ttl_s=60)
        results = await asyncio.gather(*(cache.token(f"t|u{i}") for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, StoreError) and "unreachable" in str(r) for r in results), results
    finally:
        await dead.aclose()
