"""A cheaper NaN check for the vectors LanceDB is given, installed explicitly by the vector store on open.

Before every ``merge_insert`` or ``add``, LanceDB's Python layer looks for NaN in each vector column
(``lancedb.table.has_nan_values``): ``pc.is_nan`` over every float, ``pc.list_parent_indices`` (a uint32 per
float), ``pc.unique``/``pc.filter``/``pc.is_in`` and a Python ``range`` of the row count turned into an array.
For the index sink's batches of ~10k 384-d rows that is 3.8M floats through five kernels: 7-8% of the sink
process' CPU in a py-spy profile of 100k events through ``publish --wait``. The same answer for a fixed-size
list column without nulls (the only shape the stores write) is one ``numpy.isnan(...).any(axis=1)``; any other
shape goes to LanceDB's own function, so what LanceDB accepts or refuses does not change.

Written against LanceDB 0.40; :func:`install` leaves LanceDB alone when the function it replaces is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger("memstream.lance")

_original: Callable[[Any], Any] | None = None


def has_nan_values(arr: pa.Array | pa.ChunkedArray) -> pa.BooleanArray:
    """Per row, whether its vector holds a NaN (what ``lancedb.table.has_nan_values`` answers)."""
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    if not all(_plain_float_vectors(chunk) for chunk in chunks):
        return _lancedb_own()(arr)
    parts = [_nan_rows(chunk) for chunk in chunks]
    flags = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
    return pa.array(flags, type=pa.bool_())


def _lancedb_own() -> Callable[[Any], Any]:
    if _original is not None:
        return _original
    import lancedb.table as lance_table

    own: Callable[[Any], Any] = lance_table.has_nan_values
    return own


def _plain_float_vectors(chunk: pa.Array) -> bool:
    kind = chunk.type
    if not pa.types.is_fixed_size_list(kind) or kind.list_size <= 0 or chunk.null_count:
        return False
    return bool(pa.types.is_float32(kind.value_type) or pa.types.is_float64(kind.value_type))


def _nan_rows(chunk: pa.FixedSizeListArray) -> np.ndarray[Any, np.dtype[np.bool_]]:
    if len(chunk) == 0:
        return np.zeros(0, dtype=bool)
    values = chunk.flatten().to_numpy(zero_copy_only=False)  # flatten() honours a slice's offset
    rows: np.ndarray[Any, np.dtype[np.bool_]] = np.isnan(values.reshape(len(chunk), chunk.type.list_size)).any(axis=1)
    return rows


WRITTEN_FOR = "0.40."


def install(version: str | None = None) -> bool:
    """Replace ``lancedb.table.has_nan_values`` by :func:`has_nan_values` (once).

    False, leaving LanceDB's own check in place, on a LanceDB other than the one this was written for (a private
    function may change meaning without notice) or one that has no such function."""
    global _original
    import lancedb
    import lancedb.table as lance_table

    found = lancedb.__version__ if version is None else version
    if not found.startswith(WRITTEN_FOR):
        log.info("LanceDB %s (the NaN check was written for %sx): LanceDB's own NaN check stays", found, WRITTEN_FOR)
        return False
    current = getattr(lance_table, "has_nan_values", None)
    if current is None:
        log.info("lancedb.table.has_nan_values not found: LanceDB's own NaN check stays")
        return False
    if current is not has_nan_values:
        _original = current
        lance_table.has_nan_values = has_nan_values
    return True


__all__ = ["has_nan_values", "install"]
