"""Ownership rules: which event wins per memory, and which user a memory belongs to (events naming another user
are refused). The reconciler's log fold applies the same rules."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from processors.model import memory_key
from processors.ports import CacheStore
from schemas.errors import MemStreamError, ScopeMismatchError
from schemas.events import EmbeddedEvent, MemoryEvent, Op

T = TypeVar("T")
log = logging.getLogger("memstream.processors")


def event_key(event: MemoryEvent) -> str:
    """The identity of the memory an event is about: its tenant and its memory id (processors.model.memory_key)."""
    return memory_key(event.scope.tenant_id, event.memory_id)


def newest_per_memory(
    items: Iterable[T], identity: Callable[[T], str], order: Callable[[T], tuple[int, str]]
) -> dict[str, T]:
    """Per memory (``identity``: its key), the item that wins by ``(version, event_id)``: what the stores keep."""
    winners: dict[str, T] = {}
    for item in items:
        key = identity(item)
        seen = winners.get(key)
        if seen is None or order(item) > order(seen):
            winners[key] = item
    return winners


def latest_per_memory(events: Sequence[EmbeddedEvent]) -> list[EmbeddedEvent]:
    """Keep, per memory, only the event that wins by ``(version, event_id)``: what the stores would keep."""
    return list(newest_per_memory(events, lambda e: event_key(e.event), lambda e: e.event.order()).values())


def split_by_owner(
    events: Iterable[EmbeddedEvent], owners: dict[str, str]
) -> tuple[list[EmbeddedEvent], list[tuple[EmbeddedEvent, str]]]:
    """Keep the events that stay within their memory's user; the others, with the user the memory belongs to.

    A memory belongs to the user of the store's row (``owners``: key -> user), or, for a memory the store does
    not hold yet, to the user of its first event in log order (``events`` are in log order, and every event of
    one memory is in one partition). The reconciler's log fold applies the same rule, so it never "repairs" a
    refused event back in. Users are compared only within a tenant: another tenant's event is another memory.
    """
    owner_of = dict(owners)
    kept: list[EmbeddedEvent] = []
    refused: list[tuple[EmbeddedEvent, str]] = []
    for item in events:
        key = event_key(item.event)
        owner = owner_of.setdefault(key, item.event.scope.user_id)
        if owner == item.event.scope.user_id:
            kept.append(item)
        else:
            refused.append((item, owner))
    return kept, refused


def keys_needing_owner(embedded: Iterable[EmbeddedEvent]) -> list[str]:
    """The memories whose owner a batch cannot decide by itself.

    A memory whose events here all name one user and begin with an add needs no lookup: new, it is that user's;
    held by another user, all of them are foreign and the stores' own checks refuse them. Any other memory needs
    its owner, or the first event here would wrongly decide it."""
    first: dict[str, Op] = {}
    users: dict[str, set[str]] = {}
    for item in embedded:
        key = event_key(item.event)
        first.setdefault(key, item.event.op)
        users.setdefault(key, set()).add(item.event.scope.user_id)
    return sorted(k for k, op in first.items() if op is not Op.ADD or len(users[k]) > 1)


def scope_mismatch(item: EmbeddedEvent, owner: str | None) -> ScopeMismatchError:
    """``owner``: the user the memory belongs to, ``None`` when only Redis knew it was another one."""
    event = item.event
    belongs = f"user {owner!r}" if owner is not None else "another user"
    return ScopeMismatchError(
        f"{event.op} of memory {event.memory_id!r} (tenant {event.scope.tenant_id!r}) refused: it belongs to "
        f"{belongs}, the event names user {event.scope.user_id!r}; the memory is unchanged"
    )


async def owners_cache_first(
    cache: CacheStore,
    keys: Sequence[str],
    durable: Callable[[list[str]], Awaitable[dict[str, str]]],
    where: str,
) -> dict[str, str]:
    """The user each of ``keys`` belongs to: from Redis first (one pipelined read; a memory never changes users, and
    Redis holds every memory the ingest path wrote, also those LanceDB does not hold yet), then from ``durable``
    (LanceDB, with the caller's policy for its failures) for the keys Redis does not hold (forgotten: TTL,
    eviction, a restart; usually none, and then no query at all). Redis failing means asking ``durable`` for all."""
    found: dict[str, str] = {}
    try:
        found = await cache.owners(keys)
    except MemStreamError as exc:
        log.warning("owners of %s not read from Redis (%s): asking LanceDB", where, exc)
    unknown = [k for k in keys if k not in found]
    if unknown:
        found.update(await durable(unknown))
    return found
