"""memstream for agents, shaped like Mem0: ``Memory`` (sync) and ``AsyncMemory``.

    from memstream import Memory

    m = Memory.from_env()                                # or Memory(url="http://host:8750", api_key="ms_...")
    m.add("Alice is vegetarian", user_id="alice", wait=True)
    m.search("what does alice eat?", user_id="alice")    # {"results": [{"id", "memory", "score", ...}]}

The package sits on top of everything else (schemas <- processors <- infra <- streams <- memstream); nothing
below imports it.
"""

from __future__ import annotations

from memstream.client import AsyncMemory, Memory
from schemas.errors import AuthError, MemStreamError, NotFoundError, SchemaError, ServiceError, StoreError

__all__ = [
    "AsyncMemory",
    "AuthError",
    "MemStreamError",
    "Memory",
    "NotFoundError",
    "SchemaError",
    "ServiceError",
    "StoreError",
]
