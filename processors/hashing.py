"""Content hashes: what decides "same text" (embedding cache) and "same memory content" (verification)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from schemas.events import MemoryEvent, Op, Scope

TOMBSTONE_HASH = "deleted"


def text_hash(text: str) -> str:
    """Key of a text in the embedding cache (together with the model name)."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def content_hash(
    op: Op, scope: Scope, text: str | None, metadata: dict[str, Any], expires_at: int | None = None
) -> str:
    """Hash of everything a memory holds except its version: equal hashes mean equal content. The expiry counts
    only when set, so a memory without one hashes as it did before expiry existed."""
    if op is Op.DELETE:
        return TOMBSTONE_HASH
    parts: list[Any] = [scope.tenant_id, scope.user_id, scope.agent_id, scope.run_id, text, metadata]
    if expires_at is not None:
        parts.append(expires_at)
    canonical = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def event_content_hash(event: MemoryEvent) -> str:
    return content_hash(event.op, event.scope, event.text, event.metadata, event.expires_at)
