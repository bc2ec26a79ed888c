"""processors/times.py: every time the codec accepts is shown, the same as numpy's calendar shows it.

A memory whose event carried a time past the year 9999 (ts is any integer up to 2^53-1 ms) made the API's
``datetime.fromtimestamp`` raise: GET /v1/memories/{id}/history and GET /v1/memories answered 500, and the
context block could not be rendered (schemathesis' stateful run found the first).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processors.times import utc_day, utc_iso
from schemas.events import MAX_VERSION

YEAR_9999_END = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def _numpy_iso(ms: int) -> str:
    """numpy's datetime64 reaches years past 9999 (it writes them unsigned, with no padding)."""
    text = str(np.datetime64(ms, "ms"))
    year, rest = text.split("-", 1)
    return f"{year if int(year) <= 9999 else '+' + year.zfill(6)}-{rest}Z"


@pytest.mark.parametrize(
    ("ms", "iso"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),  # a leap day of a century divisible by 400
        (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),  # 2100 is not a leap year
        (YEAR_9999_END, "9999-12-31T23:59:59.999Z"),  # a float lost this millisecond (...59.998)
        (YEAR_9999_END + 1, "+010000-01-01T00:00:00.000Z"),
        (MAX_VERSION, "+287396-10-12T08:59:00.991Z"),
    ],
)
def test_times_from_the_epoch_to_the_codecs_bound(ms: int, iso: str) -> None:
    assert utc_iso(ms) == iso == _numpy_iso(ms)
    assert utc_day(ms) == iso.split("T")[0]


@given(st.integers(min_value=0, max_value=MAX_VERSION))
def test_any_time_the_codec_accepts_is_shown_as_numpy_shows_it(ms: int) -> None:
    assert utc_iso(ms) == _numpy_iso(ms)
