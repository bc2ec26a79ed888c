"""Comparing the two stores: what ``memstream verify`` reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.model import StoreState


@dataclass(slots=True)
class ConsistencyReport:
    """Counts of each kind of difference between LanceDB and Redis, and a few examples of each."""

    lancedb_memories: int = 0
    redis_memories: int = 0
    live_memories: int = 0
    tombstones: int = 0
    consistent: int = 0
    missing_in_redis: int = 0
    missing_in_lancedb: int = 0
    version_mismatch: int = 0
    content_mismatch: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing_in_redis or self.missing_in_lancedb or self.version_mismatch or self.content_mismatch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "consistent": self.ok,
            "lancedb_memories": self.lancedb_memories,
            "redis_memories": self.redis_memories,
            "live_memories": self.live_memories,
            "tombstones": self.tombstones,
            "matching": self.consistent,
            "missing_in_redis": self.missing_in_redis,
            "missing_in_lancedb": self.missing_in_lancedb,
            "version_mismatch": self.version_mismatch,
            "content_mismatch": self.content_mismatch,
            "examples": self.examples,
        }


MAX_EXAMPLES = 5


def compare(lancedb: Mapping[str, StoreState], redis: Mapping[str, StoreState]) -> ConsistencyReport:
    report = ConsistencyReport(lancedb_memories=len(lancedb), redis_memories=len(redis))

    def note(kind: str, memory_id: str) -> None:
        setattr(report, kind, getattr(report, kind) + 1)
        examples = report.examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(memory_id)

    for memory_id, durable in lancedb.items():
        if durable.deleted:
            report.tombstones += 1
        else:
            report.live_memories += 1
        cached = redis.get(memory_id)
        if cached is None:
            note("missing_in_redis", memory_id)
        elif (cached.version, cached.event_id) != (durable.version, durable.event_id):
            note("version_mismatch", memory_id)
        elif cached.content_hash != durable.content_hash or cached.deleted != durable.deleted:
            note("content_mismatch", memory_id)
        else:
            report.consistent += 1
    for memory_id in redis.keys() - lancedb.keys():
        note("missing_in_lancedb", memory_id)
    return report
