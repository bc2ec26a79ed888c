"""The context blocks the stream keeps current (infra/read_cache.py, RedisReadCache.registered_among): a read
registers the block it stores; a worker asks the registry about the scopes a window changed, and asks Redis nothing
per scope while nobody reads context blocks."""

from __future__ import annotations

import redis.asyncio as aioredis

from infra.read_cache import RedisReadCache, scope_field
from infra.settings import Settings
from schemas.events import Scope
from streams.runtime.reading import ReadService
from streams.runtime.stores import Stores
from tests.integration.helpers import command_calls, unique_tag


async def test_a_stored_block_is_registered_with_it_and_forgotten_once_gone(redis_client: aioredis.Redis) -> None:
    prefix = f"reg{unique_tag()}:"
    reader, worker = RedisReadCache(redis_client, prefix, ttl_s=60), RedisReadCache(redis_client, prefix, ttl_s=60)
    block = reader.context_key(scope_field("t", "ann", None), 800)
    other = reader.context_key(scope_field("t", "bob", None), 800)
    assert not await worker.any_blocks_registered()

    await reader.store(block, b"1", {"text": "x"}, register_block=True)
    await reader.store(other, b"1", {"text": "z"})  # not a block the stream keeps (another budget, a search)
    assert await redis_client.get(block) is not None and await redis_client.get(other) is not None
    assert await worker.any_blocks_registered()
    many = [reader.context_key(scope_field("t", f"u{i}", None), 800) for i in range(2_500)]  # past one HMGET
    assert await worker.registered_among([*many, other, block]) == [False] * 2_501 + [True]

    await worker.unregister_blocks([block])
    assert not await worker.any_blocks_registered() and await worker.registered_among([block]) == [False]
    await reader.store(block, b"3", {"text": "w"}, register_block=True)  # read again later: registered again
    assert await worker.registered_among([block]) == [True]


async def test_the_stream_probes_and_rebuilds_only_registered_blocks_still_in_redis(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    stores = await Stores.open(settings)
    reads = ReadService(stores)
    try:
        tenant = f"t{unique_tag()}"
        ann, bob = Scope(tenant, "ann", "chef", None), Scope(tenant, "bob", None, None)
        before = {command: await command_calls(redis_client, command) for command in ("exists", "hmget", "evalsha")}
        assert await reads.refresh_contexts([ann, bob]) == 0
        after = {command: await command_calls(redis_client, command) for command in ("exists", "hmget", "evalsha")}
        # no reader of blocks: the registry's one EXISTS, no key of any scope probed
        assert {c: after[c] - before[c] for c in before} == {"exists": 1, "hmget": 0, "evalsha": 0}

        for user in ("ann", "bob"):  # the first read gives the scope a generation, the second stores its block
            for _ in range(2):
                await reads.context(tenant_id=tenant, user_id=user)  # registers the user-level block
        bob_key = reads.redis_cache.context_key(scope_field(tenant, "bob", None), settings.context_budget)
        await redis_client.delete(bob_key)  # its TTL ran out: nobody read it since
        assert await reads.refresh_contexts([ann, bob]) == 1  # ann's, rebuilt; bob's left out
        assert await redis_client.get(bob_key) is None
        assert not await redis_client.hexists(reads.redis_cache.blocks_key, bob_key)
        ann_key = reads.redis_cache.context_key(scope_field(tenant, "ann", None), settings.context_budget)
        assert await redis_client.hexists(reads.redis_cache.blocks_key, ann_key)
    finally:
        await reads.close()
        await stores.close()
