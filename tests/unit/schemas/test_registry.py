"""schemas.registry: the packaged JSON Schema files, by name and by topic."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from processors.model import Topics
from schemas.registry import TOPIC_SCHEMAS, load_schema, schema_for_topic, schema_names


def test_every_topic_with_a_payload_format_has_a_schema() -> None:
    topics = Topics("p.")
    assert {f"p.{suffix}" for suffix in TOPIC_SCHEMAS} <= set(topics.all())
    assert set(TOPIC_SCHEMAS.values()) == set(schema_names())


@pytest.mark.parametrize(("suffix", "file_name"), sorted(TOPIC_SCHEMAS.items()))
def test_schemas_load_and_are_valid_draft_2020_12(suffix: str, file_name: str) -> None:
    schema = load_schema(file_name)
    Draft202012Validator.check_schema(schema)
    assert load_schema(file_name.removesuffix(".schema.json")) == schema
    assert schema_for_topic(suffix) == schema


def test_each_load_returns_a_fresh_dict() -> None:
    first = load_schema("memory-event")
    first["title"] = "changed"
    assert load_schema("memory-event")["title"] == "MemoryEvent"


@pytest.mark.parametrize("name", ["nope", "../events", "memory-event.json", ""])
def test_unknown_schema_names_are_refused(name: str) -> None:
    with pytest.raises(KeyError):
        load_schema(name)


def test_unknown_topic_is_refused() -> None:
    with pytest.raises(KeyError, match="have: events"):
        schema_for_topic("gossip")
