"""The numpy NaN check that replaces LanceDB's: the same answer per row as LanceDB's own function."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

from infra import lance_nan_check

lance_table = pytest.importorskip("lancedb.table")


@pytest.fixture
def lancedb_own() -> Iterator[object]:
    """LanceDB's function as it was before any install (restored after the test)."""
    before = lance_table.has_nan_values
    original = lance_nan_check._original or before
    yield original
    lance_table.has_nan_values = before


def vectors(rows: int, dim: int, nan_rows: tuple[int, ...] = ()) -> pa.FixedSizeListArray:
    values = np.random.default_rng(rows).standard_normal(rows * dim).astype("<f4")
    for row in nan_rows:
        values[row * dim + dim // 2] = np.nan
    return pa.FixedSizeListArray.from_arrays(pa.array(values), dim)


@pytest.mark.parametrize("rows", [0, 1, 5, 300])
def test_rows_with_nan_are_flagged_as_lancedb_flags_them(lancedb_own: object, rows: int) -> None:
    arr = vectors(rows, 16, nan_rows=tuple(r for r in (0, 3, rows - 1) if 0 <= r < rows))
    shapes = [arr, pa.chunked_array([arr, arr]), arr.slice(min(2, rows))]
    for shape in shapes:
        ours = lance_nan_check.has_nan_values(shape)
        assert ours.equals(lancedb_own(shape))  # type: ignore[operator]
    if rows >= 4:
        assert lance_nan_check.has_nan_values(arr).to_pylist()[:4] == [True, False, False, True]


def test_a_shape_it_does_not_handle_goes_to_lancedb(lancedb_own: object) -> None:
    lance_nan_check.install()
    variable = pa.array([[1.0, float("nan")], [1.0, 2.0, 3.0], None], type=pa.list_(pa.float32()))
    assert lance_nan_check.has_nan_values(variable).equals(lancedb_own(variable))  # type: ignore[operator]
    with_null = pa.array([[1.0, 2.0], None, [float("nan"), 0.0]], type=pa.list_(pa.float32(), 2))
    assert lance_nan_check.has_nan_values(with_null).equals(lancedb_own(with_null))  # type: ignore[operator]


def test_install_replaces_lancedbs_function_once(lancedb_own: object) -> None:
    assert lance_nan_check.install() and lance_nan_check.install()
    assert lance_table.has_nan_values is lance_nan_check.has_nan_values
    assert lance_nan_check._original is lancedb_own


def test_another_lancedb_keeps_its_own_check(lancedb_own: object) -> None:
    lance_table.has_nan_values = lancedb_own
    assert not lance_nan_check.install(version="0.41.0")
    assert lance_table.has_nan_values is lancedb_own
