"""The packaged JSON Schema files (``schemas/json/``), by name and by topic.

Producers in other languages validate against these files; :mod:`schemas.events` is the codec they describe,
and ``tests/unit/schemas`` keeps the two in step.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Final

SCHEMA_SUFFIX: Final = ".schema.json"

# Topic suffix (the part after ``MEMSTREAM_TOPIC_PREFIX``) -> schema file of its record values.
TOPIC_SCHEMAS: Final[dict[str, str]] = {
    "events": "memory-event.schema.json",
    "embedded": "embedded-event.schema.json",
    "changes": "change-event.schema.json",
    "dlq": "dead-letter.schema.json",
    "compensations": "compensation.schema.json",
    "reconcile": "reconcile.schema.json",
}


def schema_names() -> list[str]:
    """File names of every packaged schema, sorted."""
    folder = resources.files("schemas").joinpath("json")
    return sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(SCHEMA_SUFFIX))


def load_schema(name: str) -> dict[str, Any]:
    """Load one schema: ``"memory-event"`` and ``"memory-event.schema.json"`` name the same file.

    Raises :class:`KeyError` for a name that is not packaged. Each call returns a fresh dict.
    """
    file_name = name if name.endswith(".json") else f"{name}{SCHEMA_SUFFIX}"
    if "/" in file_name or "\\" in file_name or file_name not in schema_names():
        raise KeyError(f"no JSON schema named {name!r} (have: {', '.join(schema_names())})")
    text = resources.files("schemas").joinpath("json", file_name).read_text(encoding="utf-8")
    schema = json.loads(text)
    if not isinstance(schema, dict):
        raise ValueError(f"{file_name} does not hold a JSON object")
    return schema


def schema_for_topic(suffix: str) -> dict[str, Any]:
    """The schema of a topic's record values, by topic suffix (``"events"``, ``"embedded"``, ...)."""
    try:
        file_name = TOPIC_SCHEMAS[suffix]
    except KeyError:
        raise KeyError(f"no JSON schema for topic suffix {suffix!r} (have: {', '.join(TOPIC_SCHEMAS)})") from None
    return load_schema(file_name)


__all__ = ["SCHEMA_SUFFIX", "TOPIC_SCHEMAS", "load_schema", "schema_for_topic", "schema_names"]
