"""Event times (milliseconds since the epoch, UTC) as the API shows them: ISO 8601 and the day of the context block.

A time is any integer the codec accepts (0 to 2^53-1 ms, about the year 287,396), so it is formatted with
integers, not by ``datetime.fromtimestamp``: that refuses years past 9999 (a ``ValueError`` that answered a read
of such a memory with a 500) and rounds large values through a float. The Gregorian calendar repeats every 400
years, so a time is placed within its 400-year cycle by ``datetime`` and the cycles are added to the year.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
CYCLE_MS: Final = 146_097 * 86_400_000  # 400 Gregorian years, in milliseconds
CYCLE_YEARS: Final = 400


def _split(ms: int) -> tuple[int, datetime]:
    """The year of ``ms`` and its time within its 400-year cycle (same month, day and time of day)."""
    cycles, rest = divmod(ms, CYCLE_MS)
    moment = EPOCH + timedelta(milliseconds=rest)
    return moment.year + CYCLE_YEARS * cycles, moment


def _year(year: int) -> str:
    """Four digits, or ISO 8601's expanded form past 9999 (sign and six digits, as ECMAScript writes it)."""
    return f"{year:04d}" if 0 <= year <= 9999 else f"{'+' if year > 0 else '-'}{abs(year):06d}"


def utc_iso(ms: int) -> str:
    """``2023-11-14T22:13:20.123Z``; past 9999 ``+287396-10-12T08:59:00.991Z``."""
    year, moment = _split(ms)
    return f"{_year(year)}-{moment:%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def utc_day(ms: int) -> str:
    """``2023-11-14``: the day of ``ms`` in UTC."""
    year, moment = _split(ms)
    return f"{_year(year)}-{moment:%m-%d}"


__all__ = ["utc_day", "utc_iso"]
