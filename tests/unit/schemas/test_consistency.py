"""The consistency payloads (compensations, reconcile requests and reports): codec and JSON Schema agree."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.consistency import (
    Attempt,
    Compensation,
    ReconcileReport,
    ReconcileRequest,
    decode_compensation,
    decode_reconcile,
)
from schemas.errors import SchemaError
from schemas.events import EmbeddedEvent, MemoryEvent, Op, Scope, encode
from tests.unit.schemas.test_codec import (
    SETTINGS,
    _undocumented,
    embedded_events,
    ids,
    no_surrogates,
    schema_errors,
    sources,
    uint53,
    validator_for,
)

COMPENSATION_SCHEMA = validator_for("compensation")
RECONCILE_SCHEMA = validator_for("reconcile")

attempts = st.builds(
    Attempt, ts=uint53, error_type=st.text(no_surrogates, min_size=1, max_size=30), error=st.text(no_surrogates)
)
compensations = st.builds(
    Compensation,
    compensation_id=ids,
    store=st.sampled_from(["lancedb", "redis"]),
    items=st.lists(embedded_events(), min_size=1, max_size=3).map(tuple),
    retriable=st.booleans(),
    attempts=st.lists(attempts, min_size=1, max_size=5).map(tuple),
    first_failed_ts=uint53,
    next_attempt_ts=uint53,
    origin=st.none() | sources,
    acked_by=st.sampled_from([(), ("lancedb",), ("redis",)]),
)
requests = st.builds(
    ReconcileRequest,
    request_id=ids,
    ts=uint53,
    tenant_id=st.none() | ids,
    user_id=st.none() | ids,
    memory_ids=st.none() | st.lists(ids, max_size=5).map(tuple),
    repair=st.booleans(),
    reason=st.sampled_from(["manual", "timer", "verify"]),
)
reports = st.builds(
    ReconcileReport,
    request_id=ids,
    started_ts=uint53,
    finished_ts=uint53,
    scope=st.text(no_surrogates, min_size=1, max_size=40),
    consistent=st.booleans(),
    counts=st.dictionaries(st.text(min_size=1, max_size=20), st.integers(0, 10**9), max_size=6),
    notes=st.lists(st.text(no_surrogates, max_size=30), max_size=3).map(tuple),
)


@SETTINGS
@given(compensations)
def test_compensation_round_trip_and_schema(item: Compensation) -> None:
    raw = encode(item)
    assert decode_compensation(raw) == item
    assert schema_errors(COMPENSATION_SCHEMA, orjson.loads(raw)) == []


@SETTINGS
@given(requests | reports)
def test_reconcile_round_trip_and_schema(item: ReconcileRequest | ReconcileReport) -> None:
    raw = encode(item)
    assert decode_reconcile(raw) == item
    assert schema_errors(RECONCILE_SCHEMA, orjson.loads(raw)) == []


def _compensation_body() -> dict[str, Any]:
    event = MemoryEvent("e1", Op.ADD, "m1", 7, 1, Scope("t", "u"), text="hello")
    item = EmbeddedEvent(event, "hash", 2, b"\x00" * 8, "h1")
    comp = Compensation("c1", "redis", (item,), True, (Attempt(5, "StoreError", "down"),), 5, 6)
    return orjson.loads(encode(comp))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        ({"store": "postgres"}, "'store' must be one of"),
        ({"items": []}, "'items' must be a non-empty list"),
        ({"attempts": []}, "'attempts' must be a non-empty list"),
        ({"retriable": "yes"}, "'retriable' must be a boolean"),
        ({"acked_by": ["mysql"]}, "'acked_by' must be a list"),
        ({"next_attempt_ts": -1}, "'next_attempt_ts' must be between"),
    ],
)
def test_invalid_compensation_is_rejected_by_codec_and_schema(patch: dict[str, Any], words: str) -> None:
    body = {**_compensation_body(), **patch}
    with pytest.raises(SchemaError, match=words):
        decode_compensation(orjson.dumps(body))
    assert schema_errors(COMPENSATION_SCHEMA, body)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"kind": "gossip"}, "'kind' must be 'request' or 'report'"),
        ({"kind": "request", "request_id": "r", "ts": 1, "memory_ids": ["bad id"]}, "'memory_ids' must be"),
        ({"kind": "request", "request_id": "r", "ts": 1, "repair": 1}, "'repair' must be a boolean"),
        (
            {
                "kind": "report",
                "request_id": "r",
                "started_ts": 1,
                "finished_ts": 2,
                "scope": "s",
                "consistent": True,
                "counts": {"x": -1},
            },
            "'counts' must be an object of non-negative integers",
        ),
    ],
)
def test_invalid_reconcile_is_rejected_by_codec_and_schema(body: dict[str, Any], words: str) -> None:
    body = {"schema_version": 1, **body}
    with pytest.raises(SchemaError, match=words):
        decode_reconcile(orjson.dumps(body))
    assert schema_errors(RECONCILE_SCHEMA, body)


@pytest.mark.parametrize("name", ["compensation", "reconcile"])
def test_consistency_schemas_are_documented(name: str) -> None:
    from schemas.registry import load_schema

    schema = load_schema(name)
    assert schema["$id"] == f"https://memstream.dev/schemas/{name}/v1"
    assert list(_undocumented(schema)) == []
