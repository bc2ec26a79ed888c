"""The scope generations the Redis write script bumps (what every cached read is validated against)."""

from __future__ import annotations

import dataclasses

from infra.read_cache import RedisReadCache, scope_field
from infra.redis_store import RedisCacheStore, connect
from infra.settings import Settings
from processors.model import MemoryRow, WriteOutcome
from schemas.events import Scope


def row(memory_id: str, version: int, scope: Scope, *, event_id: str = "e") -> MemoryRow:
    return MemoryRow(memory_id, scope, f"text {version}", {}, version, event_id, f"h{version}", False, version)


async def test_applied_changes_bump_the_scopes_they_leave_and_enter_and_nothing_else(settings: Settings) -> None:
    client = connect(settings.redis_url)
    cache = RedisCacheStore(client, settings.redis_prefix)
    reads = RedisReadCache(client, settings.redis_prefix, ttl_s=60)
    a1, a2, other = Scope("t", "u", "a1"), Scope("t", "u", "a2"), Scope("t", "v", None)
    fields = [scope_field("t", "u", None), scope_field("t", "u", "a1"), scope_field("t", "u", "a2")]
    fields += [scope_field("t", "v", None), scope_field("t", "v", "")]

    async def gens() -> list[bytes | None]:
        return [await reads.generation(f) for f in fields]

    try:
        assert await gens() == [None] * 5
        assert await cache.apply([row("m", 2, a1)]) == [WriteOutcome.APPLIED]
        first = await gens()
        assert first[0] and first[1] and first[2:] == [None, None, None]

        # a stale write and an exact replay change nothing, so they bump nothing
        assert await cache.apply([row("m", 1, a1), row("m", 2, a1)]) == [WriteOutcome.STALE, WriteOutcome.CURRENT]
        assert await gens() == first

        # moving the memory to agent a2 bumps the user, the agent it left and the agent it entered
        assert await cache.apply([row("m", 3, a2)]) == [WriteOutcome.APPLIED]
        moved = await gens()
        assert all(int(new) > int(old) for new, old in zip(moved[:2], first[:2], strict=True) if new and old)
        assert moved[2] is not None and moved[3:] == [None, None]

        # a refill (bump=False) writes the row but leaves every generation alone
        refill = row("n", 1, other)
        assert await cache.apply([refill], bump=False) == [WriteOutcome.APPLIED]
        assert await gens() == moved
        assert (await cache.get([refill.key]))[0] == dataclasses.replace(refill, vector=b"")

        # deleting a memory Redis does not hold (evicted): its agent is unknown, so the user's "*" moves, and
        # every agent-level token of that user with it, while the user-level generation moves as usual
        agent_token = await reads.token(scope_field("t", "u", "a2"))
        assert await reads.generation("t|u|*") is None
        tombstone = dataclasses.replace(row("gone", 5, Scope("t", "u", None)), deleted=True)
        assert await cache.apply([tombstone]) == [WriteOutcome.APPLIED]
        assert await reads.generation("t|u|*") is not None
        assert await reads.token(scope_field("t", "u", "a2")) not in (None, agent_token)
        assert await reads.generation(fields[2]) == moved[2]  # the a2 generation itself did not move
    finally:
        await client.aclose()


async def test_touch_bumps_the_scopes_of_rows_redis_already_holds(settings: Settings) -> None:
    client = connect(settings.redis_url)
    cache = RedisCacheStore(client, settings.redis_prefix)
    reads = RedisReadCache(client, settings.redis_prefix, ttl_s=60)
    held = row("m", 1, Scope("t", "w", "a"))
    try:
        await cache.apply([held])
        before = [await reads.generation(f) for f in ("t|w", "t|w|a")]
        assert await cache.apply([held]) == [WriteOutcome.CURRENT]  # a replay moves nothing ...
        assert [await reads.generation(f) for f in ("t|w", "t|w|a")] == before
        await cache.touch([held])  # ... a touch (LanceDB caught up on it) does
        after = [await reads.generation(f) for f in ("t|w", "t|w|a")]
        assert all(a and b and int(a) > int(b) for a, b in zip(after, before, strict=True))
    finally:
        await client.aclose()
