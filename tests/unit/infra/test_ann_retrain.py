"""When the vector index is retrained (infra/lance_store.py: ann_partitions, ann_stale, ANN_REGROW): an index built
at the first compaction past MEMSTREAM_ANN_MIN_ROWS keeps its partitions while optimize() folds rows into them, so
it is rebuilt once the table has grown ANN_REGROW**2-fold, and not before."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from infra.lance_store import ANN_REGROW, Backlog, ann_partitions, ann_stale


@given(st.integers(min_value=1, max_value=10**9))
def test_an_index_is_not_stale_at_the_size_it_was_trained_for(rows: int) -> None:
    assert not ann_stale(ann_partitions(rows), rows)


@given(st.integers(min_value=1, max_value=10**8), st.integers(min_value=1, max_value=10**9))
def test_stale_exactly_once_the_table_has_grown_past_regrow_squared(trained_rows: int, rows: int) -> None:
    partitions = ann_partitions(trained_rows)
    assert ann_stale(partitions, rows) == (ann_partitions(rows) >= ANN_REGROW * partitions)
    if rows >= (ANN_REGROW * partitions) ** 2:
        assert ann_stale(partitions, rows)


def test_the_bulk_load_case_a_1m_table_with_the_index_of_its_first_compaction() -> None:
    assert ann_partitions(1_000_000) == 1_000
    assert ann_stale(ann_partitions(170_000), 1_000_000)  # 412 partitions: probing 80 reads a fifth of the table
    assert not ann_stale(ann_partitions(300_000), 1_000_000)  # 547: within 2x of 1,000


def test_a_stale_index_leaves_the_backlog_unclean() -> None:
    indexed = Backlog(rows=1_000_000, fragments=1, small_fragments=0, unindexed_rows=0, missing=())
    assert indexed.clean
    stale = Backlog(1_000_000, 1, 0, 0, (), stale_vector_index=True)
    assert not stale.clean and stale.to_dict()["lancedb_vector_index_stale"] == 1
