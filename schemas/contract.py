"""The JSON Schema pieces every contract shares, built from the constants the codec validates with.

``schemas/json/*.schema.json`` (read by producers in other languages) and the HTTP API's OpenAPI document
(streams/surface/contract.py) both take their identifiers, texts and integers from here; ``tests/unit/schemas`` proves
that the checked-in files hold exactly these pieces, so neither can drift from :mod:`schemas.events`.
"""

from __future__ import annotations

from typing import Any, Final

from schemas.events import (
    ID_PATTERN,
    MAX_EXPIRES_AT,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    MAX_VERSION,
    SCHEMA_VERSION,
    Op,
)

# What str.strip() removes (and str.isspace() calls whitespace): a text must hold one character outside it.
NON_BLANK_PATTERN: Final = (
    "[^\\t\\n\\u000b\\u000c\\r\\u001c-\\u001f \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
)


def id_schema() -> dict[str, Any]:
    return {
        "description": "An identifier: 1 to 128 characters from A-Z a-z 0-9 _ . : @ - (identifiers end up in Redis "
        "keys and LanceDB filter expressions, so the alphabet is closed).",
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_ID_CHARS,
        "pattern": ID_PATTERN,
    }


def uint53_schema() -> dict[str, Any]:
    return {
        "description": "A non-negative integer no greater than 2^53-1 (exact in every JSON implementation). As JSON "
        "Schema defines an integer, 5.0 and 5e0 are the integer 5 (read as 5); 5.5 and true are refused.",
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_VERSION,
    }


def expires_at_schema() -> dict[str, Any]:
    return {
        "description": "When a memory expires, in milliseconds since the Unix epoch (as 'ts'), up to "
        "9999-12-31T23:59:59.999Z. As JSON Schema defines an integer, 5.0 is the integer 5.",
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_EXPIRES_AT,
    }


def schema_version_schema() -> dict[str, Any]:
    return {
        "description": f"Version of this payload format. This build reads and writes {SCHEMA_VERSION} only.",
        "type": "integer",
        "const": SCHEMA_VERSION,
    }


def op_schema() -> dict[str, Any]:
    return {
        "description": "The operation: 'add' a memory, 'update' it (replace its text and metadata) or 'delete' it.",
        "type": "string",
        "enum": [op.value for op in Op],
    }


def text_schema() -> dict[str, Any]:
    return {
        "description": f"The memory's text: at most {MAX_TEXT_CHARS} characters (Unicode code points), with at least "
        "one character that is not whitespace (whitespace as Python's str.isspace defines it).",
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_TEXT_CHARS,
        "pattern": NON_BLANK_PATTERN,
    }


def shared_defs() -> dict[str, dict[str, Any]]:
    """The ``$defs`` the topic schemas share, by name."""
    return {
        "id": id_schema(),
        "uint53": uint53_schema(),
        "schema_version": schema_version_schema(),
        "op": op_schema(),
        "text": text_schema(),
        "expires_at": expires_at_schema(),
    }


__all__ = [
    "NON_BLANK_PATTERN",
    "expires_at_schema",
    "id_schema",
    "op_schema",
    "shared_defs",
    "text_schema",
    "uint53_schema",
]
