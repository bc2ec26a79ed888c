"""The compiled validator (jsonschema-rs) that lets requests through fast must never pass what the Python
validator, the reference that says why, refuses (streams/surface/contract.py: validate_request)."""

from __future__ import annotations

from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from streams.surface.contract import _compiled, _validator, component_schemas

# the values the schemas draw lines through: ids at and past their alphabet and length, blank texts by
# str.isspace's Unicode whitespace, a final newline ($ in a pattern), integers around k's bounds, bools as numbers
EDGE_STRINGS = [
    "u1",
    "a" * 128,
    "a" * 129,
    "",
    "u 1",
    "u1\n",
    "ü",
    "a:b@c.d-e_f",
    " ",
    "\t\n",
    "\u3000",
    "\u200b",
    "x\u2028",
    "\u0085",
    "\u00a0y",
    "vector",
    "hybrid",
    "VECTOR",
    "add",
    "update",
    "delete",
]
SCALARS = st.one_of(
    st.sampled_from(EDGE_STRINGS),
    st.text(max_size=6),
    st.integers(min_value=-2, max_value=1002),
    st.sampled_from([0, 1, 1000, 1001, 2**63, -(2**63), 1.0, 10.5, True, False, None]),
    st.floats(allow_nan=False, allow_infinity=False),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["eq", "in", "gte", "x", ""]), inner),
    max_leaves=6,
)


VALID = {"SearchRequest": {"query": "where", "user_id": "u1"}, "EventInput": {"text": "hello", "user_id": "u1"}}


def bodies(name: str) -> st.SearchStrategy[Any]:
    """Mostly a valid body with a few members changed (so the checks past the first are reached), some anything."""
    members = [*sorted(component_schemas()[name].get("properties", {})), "unknown"]
    values = st.one_of(st.sampled_from(EDGE_STRINGS), SCALARS, JSON)
    changes = st.dictionaries(st.sampled_from(members), values, max_size=2)
    near = st.dictionaries(st.sampled_from(members[:-1]), values, max_size=1).map(lambda c: {**VALID[name], **c})
    return st.one_of(near, near, near, changes, JSON)


def agree(name: str, body: Any) -> bool:
    reference = _validator(name).is_valid(body)
    try:
        fast = _compiled(name).is_valid(body)
    except (ValueError, OverflowError):  # validate_request then asks the reference
        return reference
    assert fast == reference, f"{name}: jsonschema-rs says {fast}, jsonschema {reference} for {body!r}"
    return reference


@settings(max_examples=400, deadline=None)
@given(bodies("SearchRequest"))
def test_compiled_and_reference_agree_on_searches(body: Any) -> None:
    event(f"valid: {agree('SearchRequest', body)}")  # `pytest --hypothesis-show-statistics`: both kinds occur


@settings(max_examples=400, deadline=None)
@given(bodies("EventInput"))
def test_compiled_and_reference_agree_on_events(body: Any) -> None:
    event(f"valid: {agree('EventInput', body)}")


def test_the_edges_are_judged_alike() -> None:
    """Bodies that differ from a valid one in one member, so that each check is reached (not stopped earlier)."""
    for text in EDGE_STRINGS:
        for member in ("query", "user_id", "agent_id", "mode", "tenant_id"):
            agree("SearchRequest", {"query": "where", "user_id": "u1", member: text})
        for member in ("text", "user_id", "memory_id", "op", "run_id"):
            agree("EventInput", {"text": "hello", "user_id": "u1", member: text})
    for k in (0, 1, 1000, 1001, 2**63, 1.0, 1.5, True, "1"):
        agree("SearchRequest", {"query": "where", "user_id": "u1", "k": k})
    agree("SearchRequest", {"query": "where", "all_users": True})
    agree("SearchRequest", {"query": "where", "all_users": True, "user_id": "u1"})
    agree("SearchRequest", {"query": "where", "user_id": "u1", "filters": {"a": {"in": [1]}, "b": {}}})
