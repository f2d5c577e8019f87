"""The order of report rows: ``--sort`` and ``--top`` over flow records or groupings.

Works on a ``RecordTable`` (flow records, without pandas) and on a pandas frame (groupings)
alike: both give their columns as arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt

from vspan.analysis.records.options import SORTS
from vspan.analysis.records.table import RecordTable

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["top"]

Rows = TypeVar("Rows", "pd.DataFrame", RecordTable)


def _column(rows: pd.DataFrame | RecordTable, name: str) -> npt.NDArray[np.int64]:
    if isinstance(rows, RecordTable):
        return rows.ints(name)
    return np.asarray(rows[name].to_numpy(), dtype=np.int64)


def _order(rows: pd.DataFrame | RecordTable, sort: str, by: str) -> npt.NDArray[np.intp]:
    """Row order: descending by ``sort`` (both directions for flows), ties in row order;
    flows by ``flows`` are in order of their first packet."""
    if by != "flow":
        return np.argsort(-_column(rows, sort), kind="stable")
    if sort == "flows":
        return np.argsort(_column(rows, "first_ns"), kind="stable")
    key = _column(rows, sort) + _column(rows, f"{sort}_rev")
    return np.argsort(-key, kind="stable")


def top(rows: Rows, *, sort: str, n: int | None, by: str) -> Rows:
    """Rows sorted by ``sort`` (descending; both directions for flows), the first ``n``."""
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}; expected one of {', '.join(SORTS)}")
    order = _order(rows, sort, by)
    if n is not None:
        order = order[:n]
    if isinstance(rows, RecordTable):
        return rows.take(order)
    return rows.iloc[order].reset_index(drop=True)
