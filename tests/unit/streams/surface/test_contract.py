"""streams.surface.contract: the OpenAPI document and the request validation come from the same schemas."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from processors.reading import MAX_K
from schemas.contract import shared_defs
from schemas.errors import SchemaError
from schemas.registry import TOPIC_SCHEMAS, load_schema
from streams.surface.contract import REF, component_schemas, openapi_document, validate_request


def test_the_document_declares_bearer_security_and_only_healthz_is_open() -> None:
    doc = openapi_document()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key from `memstream keys create`",
    }
    assert doc["security"] == [{"bearer": []}]
    open_ops = [(p, m) for p, ops in doc["paths"].items() for m, op in ops.items() if op.get("security") == []]
    assert open_ops == [("/healthz", "get")]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if path != "/healthz":
                assert {"401", "403"} <= set(op["responses"]), path


def test_every_component_schema_is_valid_draft_2020_12() -> None:
    for schema in component_schemas().values():
        Draft202012Validator.check_schema(schema)


def test_the_validator_uses_the_documents_schemas() -> None:
    assert openapi_document()["components"]["schemas"] == component_schemas()


@pytest.mark.parametrize("file_name", sorted(set(TOPIC_SCHEMAS.values())))
def test_topic_schema_files_hold_the_shared_definitions(file_name: str) -> None:
    """The checked-in files (read by producers in other languages) equal what schemas.contract builds."""
    defs = load_schema(file_name).get("$defs", {})
    for name, built in shared_defs().items():
        if name in defs:
            assert defs[name] == built, f"{file_name} $defs/{name} drifted from schemas/contract.py"


def _refused(name: str, body: Any) -> SchemaError:
    with pytest.raises(SchemaError) as refused:
        validate_request(name, body)
    return refused.value


SEARCH = {"query": "what does alice eat?", "user_id": "alice"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**SEARCH, "min_score": None}, "min_score"),  # was accepted although the document says number
        ({**SEARCH, "user_id": None}, "user_id"),
        ({**SEARCH, "user_id": ""}, "user_id"),
        ({**SEARCH, "user_id": "a b"}, "user_id"),
        ({**SEARCH, "user_id": "u" * 129}, "user_id"),
        ({**SEARCH, "user_id": "alice\n"}, "user_id"),
        ({**SEARCH, "tenant_id": None}, "tenant_id"),
        ({**SEARCH, "tenant_id": ""}, "tenant_id"),
        ({**SEARCH, "agent_id": None}, "agent_id"),
        ({**SEARCH, "run_id": "x" * 500}, "run_id"),
        ({"query": "q"}, "user_id"),  # a user, or all_users
        ({"query": "q", "all_users": False}, "user_id"),
        ({**SEARCH, "all_users": True}, "user_id"),  # not both
        ({**SEARCH, "query": "   "}, "query"),
        ({**SEARCH, "k": 0}, "k"),
        ({**SEARCH, "k": True}, "k"),
        ({**SEARCH, "mode": "magic"}, "mode"),
        ({**SEARCH, "filters": {"": 1}}, "filters"),  # the document now says what the code refuses
        ({**SEARCH, "filters": {"a": {}}}, "filters"),
        ({**SEARCH, "filters": {"a": {"like": 1}}}, "filters"),
        ({**SEARCH, "filters": {"a": {"in": 1}}}, "filters"),
        ({**SEARCH, "surprise": 1}, "surprise"),
    ],
)
def test_bad_searches_are_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    assert _refused("SearchRequest", body).field == field


@pytest.mark.parametrize(
    "body",
    [
        SEARCH,
        {"query": "q", "all_users": True},
        {**SEARCH, "tenant_id": "acme", "agent_id": "chef", "run_id": "r1", "k": 1000, "mode": "hybrid"},
        {**SEARCH, "min_score": 0, "filters": {"topic": "food", "year": {"gte": 2020}, "tag": {"in": ["a"]}}},
    ],
)
def test_good_searches_pass(body: dict[str, Any]) -> None:
    validate_request("SearchRequest", body)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": "no user"}, "user_id"),
        ({"user_id": "u"}, "text"),
        ({"user_id": "u", "text": ""}, "text"),  # refused, and the document says so (minLength, pattern)
        ({"user_id": "u", "text": " \n"}, "text"),
        ({"user_id": "u", "text": "x" * 16_385}, "text"),
        ({"op": "update", "user_id": "u", "text": "t"}, "memory_id"),
        ({"op": "delete", "user_id": "u"}, "memory_id"),
        ({"op": "delete", "user_id": "u", "memory_id": "m", "text": "t"}, "text"),
        ({"user_id": "u", "text": "t", "memory_id": ""}, "memory_id"),
        ({"user_id": "u", "text": "t", "memory_id": "m/1"}, "memory_id"),
        ({"user_id": "u", "text": "t", "event_id": "e" * 129}, "event_id"),
        ({"user_id": "u", "text": "t", "tenant_id": None}, "tenant_id"),
        ({"user_id": None, "text": "t"}, "user_id"),
        ({"user_id": "u", "text": "t", "version": -1}, "version"),
        ({"user_id": "u", "text": "t", "ts": 1.5}, "ts"),
        ({"user_id": "u", "text": "t", "metadata": []}, "metadata"),
        ({"user_id": "u", "text": "t", "colour": "red"}, "colour"),
    ],
)
def test_bad_events_are_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    assert _refused("EventInput", body).field == field


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u", "text": "t"},
        {"op": "update", "memory_id": "m", "user_id": "u", "text": "t", "agent_id": None, "metadata": None},
        {"op": "delete", "memory_id": "m", "user_id": "u"},
        {"op": "delete", "memory_id": "m", "user_id": "u", "text": None, "version": 5, "ts": None},
    ],
)
def test_good_events_pass(body: dict[str, Any]) -> None:
    validate_request("EventInput", body)


# ------------------------------------------------------------------------------- Mem0-shaped routes (issue 25)


def test_the_memories_routes_are_in_the_document_with_their_methods() -> None:
    paths = openapi_document()["paths"]
    assert set(paths["/v1/memories"]) == {"get", "delete"}
    assert set(paths["/v1/memories/{memory_id}"]) == {"get", "patch", "delete"}
    assert set(paths["/v1/memories/batch"]) == {"post"}
    history = paths["/v1/memories/{memory_id}/history"]
    assert set(history) == {"get"} and set(history["get"]["responses"]) >= {"200", "401", "403", "404"}
    entry = openapi_document()["components"]["schemas"]["MemoryHistory"]["properties"]["results"]["items"]
    assert entry["properties"]["event"]["enum"] == ["ADD", "UPDATE", "DELETE"]
    wait = [p["name"] for p in paths["/v1/memories/batch"]["post"]["parameters"]]
    assert "wait" in wait and "tenant_id" in wait
    listing = {p["name"]: p for p in paths["/v1/memories"]["get"]["parameters"]}
    assert listing["user_id"]["required"] and listing["limit"]["schema"]["maximum"] == 1000


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("BatchRequest", {}, "operations"),
        ("BatchRequest", {"operations": []}, "operations"),
        ("BatchRequest", {"operations": [{"op": "add", "text": "t"}]}, "operations"),  # no user
        ("BatchRequest", {"operations": [{"op": "update", "text": "t"}]}, "operations"),  # no memory id
        ("BatchRequest", {"operations": [{"op": "delete", "memory_id": "a/b"}]}, "operations"),
        ("BatchRequest", {"operations": [{"op": "merge", "memory_id": "m"}]}, "operations"),
        ("BatchRequest", {"operations": [{"op": "delete", "memory_id": "m"}] * 1001}, "operations"),
        ("MemoryUpdate", {"text": "   "}, "text"),
        ("MemoryUpdate", {"metadata": []}, "metadata"),
        ("MemoryUpdate", {"text": "t", "user_id": "u"}, "user_id"),  # a memory's scope is not changed here
        ("Filters", {"a": {"like": 1}}, "a"),
    ],
)
def test_bad_memory_requests_are_refused_naming_the_member(name: str, body: Any, field: str) -> None:
    assert _refused(name, body).field == field


@pytest.mark.parametrize(
    ("name", "body"),
    [
        (
            "BatchRequest",
            {
                "operations": [
                    {"op": "add", "text": "t", "user_id": "u", "agent_id": None, "metadata": {"a": 1}},
                    {"op": "update", "memory_id": "m", "metadata": {}},
                    {"op": "delete", "memory_id": "m"},
                ]
            },
        ),
        ("MemoryUpdate", {"text": "t"}),
        ("MemoryUpdate", {"metadata": {"topic": "food"}}),
    ],
)
def test_good_memory_requests_pass(name: str, body: Any) -> None:
    validate_request(name, body)


@pytest.mark.parametrize(
    ("name", "body", "member", "expected"),
    [
        ("SearchRequest", {**SEARCH, "k": 440.0}, "k", 440),
        ("SearchRequest", {**SEARCH, "k": 1e3}, "k", 1000),
        ("SearchRequest", {**SEARCH, "k": 7}, "k", 7),
        ("EventInput", {"user_id": "u", "text": "t", "version": 332.0}, "version", 332),
        ("EventInput", {"user_id": "u", "text": "t", "ts": 5.0, "version": None}, "ts", 5),
    ],
)
def test_integral_floats_come_back_as_the_integers_they_are(
    name: str, body: dict[str, Any], member: str, expected: int
) -> None:
    """JSON Schema calls 440.0 an integer, so the contract accepts it; the handler must get the int (a float
    ``k`` reached LanceDB's limit and failed there: a 503 for a valid request)."""
    checked = validate_request(name, body)
    assert type(checked[member]) is int and checked[member] == expected
    assert {k: v for k, v in checked.items() if k != member} == {k: v for k, v in body.items() if k != member}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({**SEARCH, "k": 440.5}, "is not of type 'integer'"),
        ({**SEARCH, "k": 1001}, "greater than the maximum of 1000"),
        ({**SEARCH, "k": 1e6}, "greater than the maximum of 1000"),
        ({**SEARCH, "k": False}, "is not of type 'integer'"),
        ({**SEARCH, "k": "10"}, "is not of type 'integer'"),
    ],
)
def test_fractional_boolean_or_oversized_k_is_refused_naming_k(body: dict[str, Any], words: str) -> None:
    refused = _refused("SearchRequest", body)
    assert refused.field == "k" and words in refused.reason, refused.reason


def test_the_contract_declares_the_readers_bound_on_k() -> None:
    search = component_schemas()["SearchRequest"]["properties"]["k"]
    assert (search["type"], search["minimum"], search["maximum"]) == ("integer", 1, MAX_K)


# ------------------------------------------------------------------------------- links (issue 24: stateful testing)


def _operations() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (method, path, operation)."""
    return {
        op["operationId"]: (method, path, op)
        for path, ops in openapi_document()["paths"].items()
        for method, op in ops.items()
    }


def _links() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(source operationId, status, link name, link) of every link in the document."""
    return [
        (source, status, name, link)
        for source, (_, _, op) in _operations().items()
        for status, response in op["responses"].items()
        for name, link in response.get("links", {}).items()
    ]


def _resolve(schema: dict[str, Any], pointer: str) -> dict[str, Any]:
    """The schema of the member at a JSON pointer into an instance of ``schema`` (refs and allOf followed)."""
    components = component_schemas()
    for token in [t for t in pointer.split("/") if t]:
        while "$ref" in schema:
            schema = components[schema["$ref"].removeprefix(REF)]
        if token.isdigit():
            assert schema.get("type") == "array", (pointer, schema)
            schema = schema["items"]
        else:
            properties = schema.get("properties", {})
            for part in schema.get("allOf", []):
                part = components[part["$ref"].removeprefix(REF)] if "$ref" in part else part
                properties = {**properties, **part.get("properties", {})}
            assert token in properties, (pointer, token, sorted(properties))
            schema = properties[token]
    while "$ref" in schema:
        schema = components[schema["$ref"].removeprefix(REF)]
    return schema


def test_every_operation_has_a_unique_operation_id() -> None:
    ids = [op.get("operationId") for ops in openapi_document()["paths"].values() for op in ops.values()]
    assert None not in ids and len(ids) == len(set(ids)) == len(_operations())


def test_every_link_names_an_operation_and_its_parameters_and_a_member_of_the_response() -> None:
    operations = _operations()
    assert _links(), "the document has no links: stateful clients (schemathesis) have nothing to follow"
    for source, status, name, link in _links():
        _, _, source_op = operations[source]
        assert link["operationId"] in operations, (source, name)
        _, _, target = operations[link["operationId"]]
        target_params = {p["name"]: p["in"] for p in target.get("parameters", [])}
        source_params = {p["name"] for p in source_op.get("parameters", [])}
        response_schema = source_op["responses"][status]["content"]["application/json"]["schema"]
        for parameter, expression in link["parameters"].items():
            assert parameter in target_params, (source, name, parameter)
            if expression.startswith("$response.body#"):
                member = _resolve(response_schema, expression.removeprefix("$response.body#"))
                assert "string" in (member.get("type") if isinstance(member.get("type"), list) else [member["type"]])
            else:
                assert expression.removeprefix("$request.query.") in source_params, (source, name, expression)


@pytest.mark.parametrize(
    ("source", "expression"),
    [
        ("publishEvents", "$response.body#/accepted/0/memory_id"),
        ("batchMemories", "$response.body#/results/0/id"),
        ("listMemories", "$response.body#/results/0/id"),
        ("searchMemories", "$response.body#/hits/0/memory_id"),
        ("updateMemory", "$response.body#/id"),
    ],
)
def test_a_memory_a_write_or_read_names_links_to_every_operation_on_it(source: str, expression: str) -> None:
    targets = {
        link["operationId"]: link["parameters"]["memory_id"]
        for s, _, _, link in _links()
        if s == source and link["operationId"] != "listMemories"  # the next page of a listing
    }
    assert targets == {op: expression for op in ("getMemory", "updateMemory", "deleteMemory", "getMemoryHistory")}


def test_a_deleted_memory_links_to_its_reads_only() -> None:
    for source in ("deleteMemory", "deleteMemories"):
        targets = {link["operationId"] for s, _, _, link in _links() if s == source}
        assert {"getMemory", "getMemoryHistory"} <= targets and not {"updateMemory", "deleteMemory"} & targets


def test_schemathesis_builds_a_state_machine_from_the_links() -> None:
    """The same reading the stateful phase of tests/integration/test_api_contract.py makes: a link it cannot
    resolve (an unknown operation or parameter, a bad expression) fails here, before any server runs."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.specs.openapi.stateful import collect_transitions

    schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi_document()))
    operations = [result.ok() for result in schema.get_all_operations()]
    transitions = collect_transitions(operations)
    followed = {
        (source, link.target.label) for source, entry in transitions.operations.items() for link in entry.outgoing
    }
    for producer in ("POST /v1/memories/batch", "POST /v1/events"):
        for target in ("GET /v1/memories/{memory_id}", "PATCH /v1/memories/{memory_id}"):
            assert (producer, target) in followed
    assert ("DELETE /v1/memories/{memory_id}", "GET /v1/memories/{memory_id}") in followed
    schema.as_state_machine()  # raises InvalidStateMachine for a link it cannot follow


def test_a_bad_member_of_a_batch_operation_is_named_in_the_reason() -> None:
    """The operations are a oneOf of add, update and delete: the reason comes from the one the item names."""
    for op, why in [
        ({"op": "add", "text": "t", "user_id": "u", "expires_at": "soon"}, "'operations[0].expires_at': 'soon' is not"),
        ({"op": "update", "memory_id": "m", "expires_at": -1}, "'operations[0].expires_at': -1 is less than"),
    ]:
        refused = _refused("BatchRequest", {"operations": [op]})
        assert refused.field == "operations" and refused.reason.startswith(why), refused.reason
    refused = _refused("MemoryUpdate", {"expires_at": 253_402_300_800_000})  # past year 9999: no ISO time shows it
    assert refused.field == "expires_at"
