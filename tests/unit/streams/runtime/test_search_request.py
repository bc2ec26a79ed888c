"""SearchRequest's k as the Python API and the HTTP route hand it over: an integer as JSON Schema defines one."""

from __future__ import annotations

import pytest

from schemas.errors import SchemaError
from schemas.events import as_integer
from streams.runtime.reading import SearchRequest


@pytest.mark.parametrize("k", [440.0, 4.4e2, 440])
def test_an_integral_k_is_the_int_lancedb_and_the_cache_key_get(k: float) -> None:
    request = SearchRequest(query="q", user_id="u", k=k)  # type: ignore[arg-type]  # a JSON number, as callers send
    request.validate()
    assert type(request.k) is int and request.k == 440
    assert request.cache_key() == SearchRequest(query="q", user_id="u", k=440).cache_key()


@pytest.mark.parametrize(
    ("k", "words"), [(440.5, "got number 440.5"), (True, "got boolean"), (1001, "between 1 and 1000"), (0, "between")]
)
def test_a_fractional_boolean_or_out_of_range_k_is_refused_naming_k(k: object, words: str) -> None:
    with pytest.raises(SchemaError, match=words) as refused:
        SearchRequest(query="q", user_id="u", k=k).validate()  # type: ignore[arg-type]
    assert refused.value.field == "k"


@pytest.mark.parametrize(("value", "expected"), [(5, 5), (5.0, 5), (-0.0, 0), (2.0**53 - 1, 2**53 - 1)])
def test_as_integer_takes_integral_numbers(value: object, expected: int) -> None:
    got = as_integer(value, "n", low=0, high=2**53 - 1)
    assert type(got) is int and got == expected


@pytest.mark.parametrize("value", [5.5, float("nan"), float("inf"), True, False, "5", None, [5]])
def test_as_integer_refuses_what_json_schema_does_not_call_an_integer(value: object) -> None:
    with pytest.raises(SchemaError, match="'n' must be an integer") as refused:
        as_integer(value, "n", low=0, high=10)
    assert refused.value.field == "n"
