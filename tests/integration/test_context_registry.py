"""The context blocks the stream keeps current (infra/read_cache.py, RedisReadCache.registered_blocks): a read
registers the block it stores; a worker re-reads the registry only when its version moved, and rebuilds nothing,
asking Redis nothing per scope, while nobody reads context blocks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from infra.read_cache import BLOCKS_VERSION, RedisReadCache, scope_field
from infra.settings import Settings
from schemas.events import Scope
from streams.runtime.reading import ReadService
from streams.runtime.stores import Stores
from tests.integration.helpers import unique_tag


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        await c.aclose()


async def calls(client: aioredis.Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_stored_block_is_registered_once_and_read_again_only_when_the_registry_moved(
    client: aioredis.Redis,
) -> None:
    prefix = f"reg{unique_tag()}:"
    reader, worker = RedisReadCache(client, prefix, ttl_s=60), RedisReadCache(client, prefix, ttl_s=60)
    block = reader.context_key(scope_field("t", "ann", None), 800)
    other = reader.context_key(scope_field("t", "bob", None), 800)

    hkeys = await calls(client, "hkeys")
    assert await worker.registered_blocks() == frozenset()
    assert await calls(client, "hkeys") == hkeys  # nothing registered: the version alone was read

    await reader.store(block, b"1", {"text": "x"}, register_block=True)
    await reader.store(block, b"2", {"text": "y"}, register_block=True)  # again: no new version
    await reader.store(other, b"1", {"text": "z"})  # not a block the stream keeps (another budget, a search)
    assert await client.hget(f"{prefix}cb", BLOCKS_VERSION) == b"1"
    assert await client.get(block) is not None and await client.get(other) is not None

    seen = await worker.registered_blocks()
    assert seen == frozenset({block})
    hkeys = await calls(client, "hkeys")
    assert await worker.registered_blocks() is seen  # the version did not move: the fields are not read again
    assert await calls(client, "hkeys") == hkeys

    await worker.unregister_blocks([block])
    assert await worker.registered_blocks() == frozenset()
    assert not await client.hexists(f"{prefix}cb", block)
    await reader.store(block, b"3", {"text": "w"}, register_block=True)  # read again later: registered again
    assert await worker.registered_blocks() == frozenset({block})


async def test_the_stream_probes_and_rebuilds_only_registered_blocks_still_in_redis(
    settings: Settings, client: aioredis.Redis
) -> None:
    stores = await Stores.open(settings)
    reads = ReadService(stores)
    try:
        tenant = f"t{unique_tag()}"
        ann, bob = Scope(tenant, "ann", "chef", None), Scope(tenant, "bob", None, None)
        exists = await calls(client, "exists")
        assert await reads.refresh_contexts([ann, bob]) == 0
        assert await calls(client, "exists") == exists  # no reader of blocks: no key probed

        for user in ("ann", "bob"):  # the first read gives the scope a generation, the second stores its block
            for _ in range(2):
                await reads.context(tenant_id=tenant, user_id=user)  # registers the user-level block
        bob_key = reads.redis_cache.context_key(scope_field(tenant, "bob", None), settings.context_budget)
        await client.delete(bob_key)  # its TTL ran out: nobody read it since
        assert await reads.refresh_contexts([ann, bob]) == 1  # ann's, rebuilt; bob's left out
        assert await client.get(bob_key) is None
        assert not await client.hexists(reads.redis_cache.blocks_key, bob_key)
        ann_key = reads.redis_cache.context_key(scope_field(tenant, "ann", None), settings.context_budget)
        assert await client.hexists(reads.redis_cache.blocks_key, ann_key)
    finally:
        await reads.close()
        await stores.close()
