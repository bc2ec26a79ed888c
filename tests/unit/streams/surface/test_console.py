"""What `memstream stats` prints about LanceDB's index backlog."""

from __future__ import annotations

import io

import pytest

from streams.surface.console import print_stats


@pytest.mark.parametrize(
    ("unindexed", "missing", "noted"), [(0, 0, False), (3_000, 0, True), (0, 2, True), (3_000, 5, True)]
)
def test_stats_say_who_indexes_what_is_not_indexed(unindexed: int, missing: int, noted: bool) -> None:
    out = io.StringIO()
    figures = {"lancedb_rows": 3_000, "lancedb_unindexed_rows": unindexed, "lancedb_missing_indexes": missing}
    print_stats(figures, out)
    text = out.getvalue()
    assert f"lancedb_unindexed_rows: {unindexed}\n" in text and f"lancedb_missing_indexes: {missing}\n" in text
    assert ("MEMSTREAM_SINK_IDLE_MS" in text) is noted, text
