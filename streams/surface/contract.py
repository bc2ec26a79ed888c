"""The HTTP API's contract, defined once: the request schemas that validate every request and the OpenAPI
document served at ``/openapi.json`` are built here from the same dicts, so the two cannot disagree.

Identifiers, texts and integers come from :mod:`schemas.contract` (built from the codec's constants), so the
HTTP contract and the topic schemas share them too. Checks JSON Schema cannot express (metadata size as
encoded JSON, nesting depth) stay in the codec and are said in the descriptions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any, Final

import jsonschema_rs
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match

from processors.reading import MAX_BUDGET, MAX_K, MIN_BUDGET
from schemas.contract import (
    NON_BLANK_PATTERN,
    expires_at_schema,
    id_schema,
    op_schema,
    text_schema,
    uint53_schema,
)
from schemas.errors import SchemaError
from schemas.events import MAX_TEXT_CHARS, integral
from streams.runtime.reading import MAX_PAGE

MAX_EVENTS_PER_REQUEST: Final = 10_000
MAX_WAIT_S: Final = 600
SEARCH_MODES: Final = ("vector", "hybrid")
MAX_BATCH_OPERATIONS: Final = 1_000
MEMORY_STATUSES: Final = ("queued", "searchable", "not_searchable", "not_found", "invalid")
FILTER_OPERATORS: Final = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "contains")
REF = "#/components/schemas/"


def _id(description: str) -> dict[str, Any]:
    return {**id_schema(), "description": description}


def _nullable(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "oneOf": [{k: v for k, v in schema.items() if k != "description"}, {"type": "null"}],
    }


TENANT_DESCRIPTION = "optional: the tenant is the API key's; a different one is refused (403)"


def _expires_at(description: str) -> dict[str, Any]:
    return {**expires_at_schema(), "description": description}


EXPIRES_DESCRIPTION = (
    "when the memory expires, in milliseconds since the epoch (the Python API and the MCP tools also take ISO "
    "8601 and convert); from then on no read returns it and the system deletes it"
)


def event_input_schema() -> dict[str, Any]:
    """One event as an agent sends it; the server fills in ids, version, time and the key's tenant."""
    return {
        "type": "object",
        "description": "One memory event. 'user_id' is required; 'text' for add and update; 'memory_id' for update "
        "and delete. 'metadata' is at most 16384 bytes as compact JSON (the codec checks it).",
        "additionalProperties": False,
        "required": ["user_id"],
        "properties": {
            "op": {**op_schema(), "default": "add"},
            "memory_id": _id("the memory (default for add: derived from scope and text, so re-adding is a no-op)"),
            "tenant_id": _id(TENANT_DESCRIPTION),
            "user_id": _id("the user the memory belongs to"),
            "agent_id": _nullable(id_schema(), "the agent, or null for none"),
            "run_id": _nullable(id_schema(), "the run (session), or null for none"),
            "text": _nullable(text_schema(), "the memory's text (null only for delete)"),
            "metadata": {"type": ["object", "null"], "description": "free-form JSON object; null means {}"},
            "version": _nullable(uint53_schema(), "order among the memory's events (default: a hybrid clock, µs)"),
            "event_id": _id("unique id of this event (default: a random one)"),
            "ts": _nullable(uint53_schema(), "event time, ms since the epoch (default: now)"),
            "expires_at": _nullable(
                expires_at_schema(), EXPIRES_DESCRIPTION + " (add and update only; default: never)"
            ),
        },
        "allOf": [
            {
                "if": {"required": ["op"], "properties": {"op": {"const": "delete"}}},
                "then": {"required": ["memory_id"], "properties": {"text": {"type": "null"}}},
                "else": {"required": ["text"], "properties": {"text": text_schema()}},
            },
            {
                "if": {"required": ["op"], "properties": {"op": {"const": "update"}}},
                "then": {"required": ["memory_id"]},
            },
        ],
    }


def filter_value_schema() -> dict[str, Any]:
    operators: dict[str, Any] = {op: {} for op in FILTER_OPERATORS}
    operators["in"] = operators["nin"] = {"type": "array"}
    return {
        "description": "a value (equality) or {operator: value} with operators "
        f"{', '.join(FILTER_OPERATORS)} ('in' and 'nin' take a list)",
        "anyOf": [
            {"type": ["string", "number", "boolean", "null", "array"]},
            {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": operators},
        ],
    }


def filters_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "metadata key (or created_at, updated_at, version, memory_id, run_id, agent_id) -> filter "
        "('contains': a substring of a string, or an element of a list)",
        "propertyNames": {"minLength": 1},
        "additionalProperties": filter_value_schema(),
    }


def search_request_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A search within the key's tenant: of one user (user_id), or of every user of the tenant "
        "(all_users: true, never together with user_id).",
        "required": ["query"],
        "additionalProperties": False,
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS, "pattern": NON_BLANK_PATTERN},
            "tenant_id": _id(TENANT_DESCRIPTION),
            "user_id": _id("the user whose memories are searched"),
            "all_users": {"type": "boolean", "description": "true: search every user of the tenant"},
            "agent_id": _id("only this agent's memories"),
            "run_id": _id("only this run's memories"),
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
            "filters": filters_schema(),
            "min_score": {
                "type": "number",
                "description": "drop hits scoring below (cosine similarity for vector; fused RRF score for hybrid)",
            },
            "mode": {"type": "string", "enum": list(SEARCH_MODES), "default": "vector"},
        },
        "if": {"required": ["all_users"], "properties": {"all_users": {"const": True}}},
        "then": {"not": {"required": ["user_id"]}},
        "else": {"required": ["user_id"]},
    }


def _memory_schema() -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    return {
        "type": "object",
        "required": ["memory_id", "text", "tenant_id", "user_id", "version", "updated_at"],
        "properties": {
            "memory_id": {"type": "string"},
            "text": {"type": "string"},
            "tenant_id": {"type": "string"},
            "user_id": {"type": "string"},
            "agent_id": nullable_str,
            "run_id": nullable_str,
            "metadata": {"type": "object"},
            "version": {"type": "integer"},
            "updated_at": {"type": "integer"},
            "created_at": {"type": "integer", "description": "ms since the epoch: when the memory was added"},
            "expires_at": {"type": ["integer", "null"], "description": "ms since the epoch, or null: never"},
        },
    }


# ------------------------------------------------------------------------------- Mem0-shaped memories


def _memory_item_schema() -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    return {
        "type": "object",
        "description": "A memory as Mem0 shows it; score only in search results. created_at: when it was added; "
        "updated_at: its last change; expires_at: null, or when it stops being readable.",
        "required": ["id", "memory", "metadata", "user_id", "agent_id", "run_id", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string"},
            "memory": {"type": "string"},
            "score": {"type": "number"},
            "metadata": {"type": "object"},
            "user_id": {"type": "string"},
            "agent_id": nullable_str,
            "run_id": nullable_str,
            "created_at": {"type": "string", "description": "ISO 8601, UTC: when the memory was added"},
            "updated_at": {"type": "string", "description": "ISO 8601, UTC"},
            "expires_at": {**nullable_str, "description": "ISO 8601, UTC, or null: never"},
        },
    }


def _history_entry_schema() -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    return {
        "type": "object",
        "description": "One applied version. event: ADD (first live version, or live again after a delete), UPDATE, "
        "DELETE (memory null); previous_memory: the text of the version before (null first and after a delete).",
        "required": ["event", "memory", "previous_memory", "version", "event_id", "created_at"],
        "properties": {
            "event": {"type": "string", "enum": ["ADD", "UPDATE", "DELETE"]},
            "memory": nullable_str,
            "previous_memory": nullable_str,
            "version": {"type": "integer"},
            "event_id": {"type": "string"},
            "created_at": {"type": "string", "description": "ISO 8601, UTC: when the version's event was made"},
            "actor": {
                **nullable_str,
                "description": "null for an agent's event; 'memstream:expiry' for the system's delete of an expired "
                "memory",
            },
        },
    }


def _write_result_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "One write's outcome. queued: published; searchable: readable now (waited); not_searchable: "
        "waited, not readable in time (or refused: the id belongs to another user); not_found / invalid: not "
        "published, with error and field.",
        "required": ["index", "id", "status"],
        "properties": {
            "index": {"type": "integer"},
            "id": {"type": ["string", "null"]},
            "event_id": {"type": "string"},
            "event": {"type": "string", "enum": ["ADD", "UPDATE", "DELETE"]},
            "status": {"type": "string", "enum": list(MEMORY_STATUSES)},
            "error": {"type": "string"},
            "field": {"type": ["string", "null"]},
        },
    }


def memory_update_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "What changes; what is left out is kept (scope, text, metadata or expiry).",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "text": text_schema(),
            "metadata": {"type": "object", "description": "replaces the memory's metadata"},
            "expires_at": _expires_at(EXPIRES_DESCRIPTION + "; left out, the memory keeps its expiry"),
        },
    }


def batch_request_schema() -> dict[str, Any]:
    scope = {
        "user_id": _id("the user the memory belongs to"),
        "agent_id": _nullable(id_schema(), "the agent, or null for none"),
        "run_id": _nullable(id_schema(), "the run (session), or null for none"),
    }
    add = {
        "type": "object",
        "additionalProperties": False,
        "required": ["op", "text", "user_id"],
        "properties": {
            "op": {"const": "add"},
            "text": text_schema(),
            **scope,
            "metadata": {"type": "object"},
            "memory_id": _id("the memory (default: derived from scope and text, so re-adding is a no-op)"),
            "expires_at": _expires_at(EXPIRES_DESCRIPTION),
        },
    }
    update = {
        "type": "object",
        "additionalProperties": False,
        "required": ["op", "memory_id"],
        "properties": {
            "op": {"const": "update"},
            "memory_id": id_schema(),
            "text": text_schema(),
            "metadata": {"type": "object"},
            "expires_at": _expires_at(EXPIRES_DESCRIPTION + "; left out, the memory keeps its expiry"),
        },
    }
    delete = {
        "type": "object",
        "additionalProperties": False,
        "required": ["op", "memory_id"],
        "properties": {"op": {"const": "delete"}, "memory_id": id_schema()},
    }
    return {
        "type": "object",
        "description": "Adds, updates and deletes, published in order; each gets its outcome (an update or delete "
        "of a memory the tenant does not have is not_found, the others still go out).",
        "additionalProperties": False,
        "required": ["operations"],
        "properties": {
            "operations": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH_OPERATIONS,
                "items": {"oneOf": [add, update, delete]},
            }
        },
    }


def component_schemas() -> dict[str, Any]:
    nullable_str = {"type": ["string", "null"]}
    return {
        "MemoryItem": _memory_item_schema(),
        "MemoryPage": {
            "type": "object",
            "required": ["results", "next_cursor"],
            "properties": {
                "results": {"type": "array", "items": {"$ref": f"{REF}MemoryItem"}},
                "next_cursor": {**nullable_str, "description": "pass as cursor for the next page; null: last page"},
            },
        },
        "MemoryUpdate": memory_update_schema(),
        "MemoryHistory": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": _history_entry_schema()}},
        },
        "BatchRequest": batch_request_schema(),
        "Filters": filters_schema(),
        "WriteResult": _write_result_schema(),
        "WriteResults": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": {"$ref": f"{REF}WriteResult"}}},
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}, "field": nullable_str},
        },
        "EventInput": event_input_schema(),
        "IngestResult": {
            "type": "object",
            "required": ["accepted", "rejected"],
            "properties": {
                "accepted": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "memory_id", "event_id", "version", "op"],
                        "properties": {
                            "index": {"type": "integer"},
                            "memory_id": {"type": "string"},
                            "event_id": {"type": "string"},
                            "version": {"type": "integer"},
                            "op": {"type": "string"},
                        },
                    },
                },
                "rejected": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "reason"],
                        "properties": {
                            "index": {"type": "integer"},
                            "reason": {"type": "string"},
                            "field": nullable_str,
                        },
                    },
                },
                "not_materialized": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "with ?wait: memory ids not in both stores in time",
                },
            },
        },
        "SearchRequest": search_request_schema(),
        "Memory": _memory_schema(),
        "Hit": {
            "allOf": [
                {"$ref": f"{REF}Memory"},
                {"type": "object", "required": ["score"], "properties": {"score": {"type": "number"}}},
            ]
        },
        "Context": {
            "type": "object",
            "required": ["text", "memory_ids", "tokens", "total"],
            "properties": {
                "text": {"type": "string"},
                "memory_ids": {"type": "array", "items": {"type": "string"}},
                "tokens": {"type": "integer", "description": "estimated: characters / 4, rounded up"},
                "total": {"type": "integer", "description": "live memories in the scope"},
                "expires_at": {
                    "type": ["integer", "null"],
                    "description": "the earliest expires_at (ms since the epoch) of the scope's live memories: the "
                    "block is rebuilt from then on; null when none expires",
                },
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "checks"],
            "properties": {
                "ready": {"type": "boolean"},
                "checks": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    }


# ------------------------------------------------------------------------------------------------ document


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json({"$ref": f"{REF}Error"})}


def _guarded(responses: dict[str, Any], needs: str) -> dict[str, Any]:
    """The responses every route behind a key can give, besides its own."""
    return {
        **responses,
        "401": {
            **_error("no valid API key (Authorization: Bearer <key>)"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        },
        "403": _error(f"the key's role does not allow this (needs {needs}), or a tenant_id other than the key's"),
    }


def _query(name: str, schema: dict[str, Any], *, required: bool = False, description: str = "") -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": "query", "required": required, "schema": schema}
    if description:
        param["description"] = description
    return param


# ------------------------------------------------------------------------------------------------ links
# OpenAPI links say which value of a response the next request can take: a client (and schemathesis' stateful
# phase, which follows them) reads, changes and deletes by id the memory a write or a read names. A write is
# readable once the worker has applied it: with ?wait on the write, or after a 404 the routes declare.

MEMORY_LINKS: Final = {
    "GetMemory": "getMemory",
    "UpdateMemory": "updateMemory",
    "DeleteMemory": "deleteMemory",
    "GetMemoryHistory": "getMemoryHistory",
}


def _memory_links(expression: str, *names: str) -> dict[str, Any]:
    """Links to the operations on one memory (all of MEMORY_LINKS unless ``names``), its id at ``expression``."""
    return {
        name: {
            "operationId": MEMORY_LINKS[name],
            "parameters": {"memory_id": expression},
            "description": f"the memory whose id is at {expression}",
        }
        for name in names or MEMORY_LINKS
    }


def _scope_links(scope: str) -> dict[str, Any]:
    """Links to the reads of a (user, agent, run) scope; ``scope`` is where its members are (``$response.body#/`` or
    ``$request.query.``)."""
    return {
        "ListScope": {
            "operationId": "listMemories",
            "parameters": {name: f"{scope}{name}" for name in ("user_id", "agent_id", "run_id")},
            "description": "the memories of the same scope",
        },
        "GetScopeContext": {
            "operationId": "getContext",
            "parameters": {name: f"{scope}{name}" for name in ("user_id", "agent_id")},
            "description": "the context block of the same user (and agent)",
        },
    }


def _linked(response: dict[str, Any], links: dict[str, Any]) -> dict[str, Any]:
    return {**response, "links": links}


def _paths() -> dict[str, Any]:
    invalid = _error("invalid input; 'field' names the member at fault")
    outage = _error("a store or the broker is unavailable")
    return {
        "/v1/events": {
            "post": {
                "operationId": "publishEvents",
                "summary": "Publish one memory event or a list of them (needs a write key)",
                "description": "A single event is accepted (200) or refused (400). A list gets 200 with each item's "
                "outcome: valid events are sent, invalid ones are reported with their index, reason and field. "
                "Events take the key's tenant; one naming another tenant refuses the whole request (403).",
                "parameters": [
                    _query(
                        "wait",
                        {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
                        description="seconds to wait until every accepted event is materialized in both stores",
                    )
                ],
                "requestBody": {
                    "required": True,
                    "content": _json(
                        {
                            "oneOf": [
                                {"$ref": f"{REF}EventInput"},
                                {
                                    "type": "array",
                                    "maxItems": MAX_EVENTS_PER_REQUEST,
                                    "description": "each item is validated as an EventInput on its own",
                                    "items": {"type": "object"},
                                },
                            ]
                        }
                    ),
                },
                "responses": _guarded(
                    {
                        "200": _linked(
                            {"description": "the outcome", "content": _json({"$ref": f"{REF}IngestResult"})},
                            _memory_links("$response.body#/accepted/0/memory_id"),
                        ),
                        "400": invalid,
                        "413": {"description": "the body is larger than 32 MiB"},
                        "503": outage,
                    },
                    "write",
                ),
            }
        },
        "/v1/search": {
            "post": {
                "operationId": "searchMemories",
                "summary": "Search memories of one user (or, with all_users, of the whole tenant) of the key's tenant",
                "requestBody": {"required": True, "content": _json({"$ref": f"{REF}SearchRequest"})},
                "responses": _guarded(
                    {
                        "200": {
                            "description": "hits, best first",
                            "content": _json(
                                {
                                    "type": "object",
                                    "required": ["hits"],
                                    "properties": {"hits": {"type": "array", "items": {"$ref": f"{REF}Hit"}}},
                                }
                            ),
                            "links": _memory_links("$response.body#/hits/0/memory_id"),
                        },
                        "400": invalid,
                        "413": {"description": "the body is larger than 32 MiB"},
                        "503": outage,
                    },
                    "read",
                ),
            }
        },
        "/v1/context": {
            "get": {
                "operationId": "getContext",
                "summary": "The prompt-ready memory block of a (user[, agent]) scope of the key's tenant",
                "description": "The most important (metadata.importance, or pinned) then most recent live memories "
                "that fit the token budget (tokens estimated as characters / 4), one line each, newest first, "
                "under a '## Memories' header. Maintained by the stream; rebuilt on read when the scope changed.",
                "parameters": [
                    _query("user_id", id_schema(), required=True),
                    _query("tenant_id", id_schema(), description=TENANT_DESCRIPTION),
                    _query("agent_id", id_schema()),
                    _query("budget", {"type": "integer", "minimum": MIN_BUDGET, "maximum": MAX_BUDGET}),
                    _query("format", {"type": "string", "enum": ["json", "text"]}),
                ],
                "responses": _guarded(
                    {
                        "200": {
                            "description": "the block",
                            "content": {
                                **_json({"$ref": f"{REF}Context"}),
                                "text/plain": {"schema": {"type": "string"}},
                            },
                        },
                        "400": invalid,
                        "503": outage,
                    },
                    "read",
                ),
            }
        },
        **_memory_paths(invalid, outage),
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "The process answers (no key needed)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "alive",
                        "content": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "status": {"const": "ok"},
                                    "pid": {"type": "integer", "description": "the answering process (--workers)"},
                                },
                            }
                        ),
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "ready",
                "summary": "Redis, LanceDB and the broker answer now (any valid key)",
                "responses": _guarded(
                    {
                        "200": {"description": "ready", "content": _json({"$ref": f"{REF}Readiness"})},
                        "503": {
                            "description": "not ready; checks say which part failed",
                            "content": _json({"$ref": f"{REF}Readiness"}),
                        },
                    },
                    "read",
                ),
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics, text format 0.0.4 (needs an admin key)",
                "responses": _guarded(
                    {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
                    "admin",
                ),
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document (any valid key)",
                "responses": _guarded(
                    {"200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}},
                    "read",
                ),
            }
        },
    }


def _wait_param() -> dict[str, Any]:
    return _query(
        "wait",
        {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
        description="seconds to wait until the writes are readable (status searchable, else not_searchable)",
    )


def _scope_params(*, user_required: bool = True) -> list[dict[str, Any]]:
    return [
        _query("user_id", id_schema(), required=user_required),
        _query("agent_id", id_schema()),
        _query("run_id", id_schema()),
        _query("tenant_id", id_schema(), description=TENANT_DESCRIPTION),
    ]


def _memory_paths(invalid: dict[str, Any], outage: dict[str, Any]) -> dict[str, Any]:
    """The Mem0-shaped routes (``memstream.Memory(url=...)`` speaks these), each walled to the key's tenant."""
    memory_id = {"name": "memory_id", "in": "path", "required": True, "schema": id_schema()}
    tenant = _query("tenant_id", id_schema(), description=TENANT_DESCRIPTION)
    missing = _error("no such memory in this tenant, or it was deleted")
    written = {"description": "the outcome", "content": _json({"$ref": f"{REF}WriteResult"})}
    results = {"description": "each write's outcome", "content": _json({"$ref": f"{REF}WriteResults"})}
    return {
        "/v1/memories": {
            "get": {
                "operationId": "listMemories",
                "summary": "A page of a scope's live memories in id order (cursor pagination)",
                "parameters": [
                    *_scope_params(),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}),
                    _query("cursor", id_schema(), description="next_cursor of the page before"),
                    {
                        "name": "filters",
                        "in": "query",
                        "required": False,
                        "description": "metadata filters as in search, a JSON object",
                        "content": _json({"$ref": f"{REF}Filters"}),
                    },
                ],
                "responses": _guarded(
                    {
                        "200": _linked(
                            {"description": "the page", "content": _json({"$ref": f"{REF}MemoryPage"})},
                            {
                                **_memory_links("$response.body#/results/0/id"),
                                "NextPage": {
                                    "operationId": "listMemories",
                                    "parameters": {
                                        "cursor": "$response.body#/next_cursor",
                                        **{n: f"$request.query.{n}" for n in ("user_id", "agent_id", "run_id")},
                                    },
                                    "description": "the next page of the same scope (none after the last)",
                                },
                            },
                        ),
                        "400": invalid,
                        "503": outage,
                    },
                    "read",
                ),
            },
            "delete": {
                "operationId": "deleteMemories",
                "summary": "Delete every live memory of a scope (user_id required; needs a write key)",
                "parameters": [*_scope_params(), _wait_param()],
                "responses": _guarded(
                    {
                        "200": _linked(
                            results,
                            {
                                **_memory_links("$response.body#/results/0/id", "GetMemory", "GetMemoryHistory"),
                                **_scope_links("$request.query."),
                            },
                        ),
                        "400": invalid,
                        "503": outage,
                    },
                    "write",
                ),
            },
        },
        "/v1/memories/{memory_id}": {
            "get": {
                "operationId": "getMemory",
                "summary": "One memory of the key's tenant by id",
                "parameters": [memory_id],
                "responses": _guarded(
                    {
                        "200": _linked(
                            {"description": "the memory", "content": _json({"$ref": f"{REF}Memory"})},
                            {
                                **_memory_links("$response.body#/memory_id", *list(MEMORY_LINKS)[1:]),
                                **_scope_links("$response.body#/"),
                            },
                        ),
                        "400": invalid,
                        "404": missing,
                        "503": outage,
                    },
                    "read",
                ),
            },
            "patch": {
                "operationId": "updateMemory",
                "summary": "Change a memory's text or metadata; its scope stays (needs a write key)",
                "parameters": [memory_id, tenant, _wait_param()],
                "requestBody": {"required": True, "content": _json({"$ref": f"{REF}MemoryUpdate"})},
                "responses": _guarded(
                    {
                        "200": _linked(written, _memory_links("$response.body#/id")),
                        "400": invalid,
                        "404": missing,
                        "413": {"description": "body too large"},
                        "503": outage,
                    },
                    "write",
                ),
            },
            "delete": {
                "operationId": "deleteMemory",
                "summary": "Delete a memory (needs a write key)",
                "parameters": [memory_id, tenant, _wait_param()],
                "responses": _guarded(
                    {
                        "200": _linked(written, _memory_links("$response.body#/id", "GetMemory", "GetMemoryHistory")),
                        "400": invalid,
                        "404": missing,
                        "503": outage,
                    },
                    "write",
                ),
            },
        },
        "/v1/memories/{memory_id}/history": {
            "get": {
                "operationId": "getMemoryHistory",
                "summary": "Every version of a memory of the key's tenant, oldest first (kept by the index sink: it "
                "outlasts the log, and lags a write by the sink's latency)",
                "description": "A deleted memory keeps its history: GET /v1/memories/{memory_id} answers 404 once "
                "the delete is applied, its history still answers 200 and ends with the DELETE once the sink has "
                "kept it.",
                "parameters": [memory_id, tenant],
                "responses": _guarded(
                    {
                        "200": {
                            "description": "the versions (a deleted memory's too, its last one the DELETE)",
                            "content": _json({"$ref": f"{REF}MemoryHistory"}),
                        },
                        "400": invalid,
                        "404": _error(
                            "no version of this memory is kept in this tenant: none was written, or the sink has not "
                            "kept the first yet"
                        ),
                        "503": outage,
                    },
                    "read",
                ),
            },
        },
        "/v1/memories/batch": {
            "post": {
                "operationId": "batchMemories",
                "summary": f"Up to {MAX_BATCH_OPERATIONS} adds, updates and deletes (needs a write key)",
                "parameters": [tenant, _wait_param()],
                "requestBody": {"required": True, "content": _json({"$ref": f"{REF}BatchRequest"})},
                "responses": _guarded(
                    {
                        "200": _linked(results, _memory_links("$response.body#/results/0/id")),
                        "400": invalid,
                        "413": {"description": "body too large"},
                        "503": outage,
                    },
                    "write",
                ),
            }
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, built from the schemas that validate the requests."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "memstream",
            "version": "0.1.0",
            "description": "Long-term memory for AI agent fleets: publish memory events, search, get and "
            "prompt-ready context. Every route but /healthz needs an API key (Authorization: Bearer <key>, made "
            "by `memstream keys create`), bound to one tenant and one role: read (search, get, context), write "
            "(also publish events), admin (also /metrics). The tenant is always the key's.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key from `memstream keys create`"}
            },
        },
    }


# ------------------------------------------------------------------------------------------------ validation


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """``pattern`` as JSON Schema means it (ECMA-262): ``$`` is the end of the string, not before a final newline."""
    if validator.is_type(instance, "string") and not re.search(_ecma(pattern), instance):
        yield ValidationError(f"{instance[:40]!r} does not match {pattern!r}")


@cache
def _ecma(pattern: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


_Validator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})


@cache
def _validator(name: str) -> Any:
    schemas = component_schemas()
    return _Validator({**schemas[name], "components": {"schemas": schemas}})


@cache
def _compiled(name: str) -> Any:
    """The same schema compiled by jsonschema-rs: 0.7 µs of CPU a search body where the Python validator took
    77 (about a tenth of a cached search's ~0.85 ms). It only says "valid"; the reasons come from the Python
    validator, which stays the reference (tests/unit/streams/surface/test_compiled_validation.py: they agree)."""
    schemas = component_schemas()
    return jsonschema_rs.validator_for({**schemas[name], "components": {"schemas": schemas}})


def _compiled_accepts(name: str, body: Any) -> bool:
    try:
        return bool(_compiled(name).is_valid(body))
    except (ValueError, OverflowError):  # what it cannot take (an integer beyond 64 bits): the reference decides
        return False


def validate_request(name: str, body: Any) -> Any:
    """Check ``body`` against component schema ``name``; a :class:`SchemaError` names the member at fault.

    Returns the body as the handlers should read it: the members the schema declares integers as ``int``. JSON
    Schema calls 440.0 an integer, so the validator lets it through; a handler that passed it on as a float
    would fail further in (LanceDB's ``limit``), a 5xx for a request the contract accepts."""
    if not _compiled_accepts(name, body):
        error = best_match(_validator(name).iter_errors(body))
        if error is not None:
            field = _field_of(error)
            error = _within_named_branch(error)
            where = f"'{_path_of(error) or field}'" if field else "the body"
            raise SchemaError(f"{where}: {_message(error)}", field=field)
    members = _integer_members(name).intersection(body) if isinstance(body, Mapping) else ()
    return {**body, **{member: integral(body[member]) for member in members}} if members else body


@cache
def _integer_members(name: str) -> frozenset[str]:
    """The members component schema ``name`` declares integers (directly, or one of a ``oneOf``: nullable)."""
    properties: dict[str, Any] = component_schemas()[name].get("properties", {})
    return frozenset(member for member, schema in properties.items() if _is_integer(schema))


def _is_integer(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "integer" or any(_is_integer(s) for s in schema.get("oneOf", []))


def _within_named_branch(error: ValidationError) -> ValidationError:
    """For a ``oneOf`` of objects told apart by ``op`` (a batch's operations): the error within the branch the
    object names, so the message says which member is at fault (``operations[0].expires_at``), not only that the
    operation matches none of add, update and delete."""
    if error.validator != "oneOf" or not isinstance(error.instance, Mapping) or not error.context:
        return error
    branches: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    named = [errors for errors in branches.values() if not any(list(e.relative_path)[:1] == ["op"] for e in errors)]
    if len(named) != 1:
        return error
    return best_match(named[0]) or error


def _path_of(error: ValidationError) -> str:
    """Where in the body: ``operations[0].expires_at``."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _field_of(error: ValidationError) -> str | None:
    path = [str(p) for p in error.absolute_path]
    if path:
        return path[0]
    if error.validator == "required" and isinstance(error.instance, Mapping):
        missing = [name for name in error.validator_value if name not in error.instance]
        return missing[0] if missing else None
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = error.schema.get("properties", {})
        unknown = sorted(k for k in error.instance if k not in known)
        return unknown[0] if unknown else None
    if error.validator == "not" and error.validator_value == {"required": ["user_id"]}:
        return "user_id"
    return None


def _message(error: ValidationError) -> str:
    if error.validator == "not" and error.validator_value == {"required": ["user_id"]}:
        return "give user_id or all_users: true, not both"
    if error.validator == "additionalProperties":
        return f"unknown member ({error.message})"
    text = str(error.message)
    return text if len(text) <= 300 else text[:300] + "..."


__all__ = ["MAX_EVENTS_PER_REQUEST", "MAX_PAGE", "openapi_document", "validate_request"]
