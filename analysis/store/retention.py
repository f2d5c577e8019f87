"""Retention: the store's rows kept within an age and its file within a size.

``apply_retention(store, now)`` deletes rows older than ``retention_days`` before ``now`` —
by ``ingest_time``, or by the rows' own time with ``retention_basis="capture"`` — then, if the
file is over ``max_bytes``, the oldest flows (by the same basis), as many as the live data is
over 90 % of it at its present bytes per row. Space comes back a row group (122,880 rows) at
a time and freed blocks are reused before the file grows, so the file stays bounded. Every
deletion is counted (``Store.counters()["deleted"]``) and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import pandas as pd

from vspan.analysis.store.schema import INGEST_COLUMN, TABLES, Table, quote
from vspan.analysis.store.sql import time_param

if TYPE_CHECKING:
    from vspan.analysis.store.store import Store, StoreSize

__all__ = ["RetentionResult", "apply_retention"]

log = logging.getLogger("vspan.store")

_DAY_NS: Final = 86_400 * 10**9


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """Rows ``apply_retention`` deleted per table (by age and by size), and the size after."""

    deleted: dict[str, int]
    size: StoreSize


def apply_retention(store: Store, now: object) -> RetentionResult:
    """Apply ``store``'s ``retention_days`` and ``max_bytes`` at ``now`` (see the module)."""
    deleted = dict.fromkeys(TABLES, 0)
    now_ns = int(time_param(now).value)
    if store.retention_days is not None:
        cutoff = now_ns - int(store.retention_days * _DAY_NS)
        for spec in TABLES.values():
            if spec.time_column is not None:
                column = _age_column(store, spec)
                n = _delete(store, spec, (column,), (_value(spec, column, cutoff),))
                deleted[spec.name] += _deleted(
                    store,
                    spec.name,
                    "age",
                    n,
                    f"{column} before {_iso(cutoff)}",
                    level=logging.INFO,
                )
    store.checkpoint()
    size, rows = store.size(), store.count("flows")
    if store.max_bytes is not None and size.file_bytes > store.max_bytes and rows:
        keep = int(rows * min(1.0, store.max_bytes * 0.9 / max(size.used_bytes, 1)))
        if keep < rows:
            spec = TABLES["flows"]
            key = tuple(dict.fromkeys((_age_column(store, spec), "last_ns")))
            order = ", ".join(f"{quote(c)} DESC" for c in key)
            nth = store.query(
                f"SELECT {', '.join(map(quote, key))} FROM flows ORDER BY {order} LIMIT 1 OFFSET ?",
                [keep],
            )
            last = tuple(_scalar(nth[c].iloc[0]) for c in key)
            n = _delete(store, spec, key, last, inclusive=True)
            why = (
                f"store {size.file_bytes:,} bytes over max_store_bytes {store.max_bytes:,}: "
                f"the oldest by {', '.join(key)}, up to {', '.join(map(str, last))}"
            )
            deleted["flows"] += _deleted(store, "flows", "size", n, why, level=logging.WARNING)
            store.checkpoint()
            size = store.size()
    return RetentionResult({k: v for k, v in deleted.items() if v}, size)


def _age_column(store: Store, spec: Table) -> str:
    """The column retention ages ``spec``'s rows by."""
    if store.retention_basis == "ingest":
        return INGEST_COLUMN
    return spec.time_column or INGEST_COLUMN


def _value(spec: Table, column: str, ns: int) -> object:
    """``ns`` as the column holds it: an integer, or a UTC timestamp."""
    return ns if spec.column(column).duckdb == "BIGINT" else time_param(ns)


def _delete(
    store: Store,
    spec: Table,
    key: tuple[str, ...],
    bound: tuple[object, ...],
    *,
    inclusive: bool = False,
) -> int:
    """Delete the rows whose ``key`` sorts before ``bound`` (or equal, ``inclusive``)."""
    names = ", ".join(map(quote, key))
    marks = ", ".join("?" * len(key))
    op = "<=" if inclusive else "<"
    row = store.execute(f"DELETE FROM {quote(spec.name)} WHERE ({names}) {op} ({marks})", bound)
    return int(row[0]) if row is not None else 0


def _deleted(store: Store, table: str, why: str, rows: int, detail: str, *, level: int) -> int:
    """Count and log one deletion; ``rows``."""
    if rows:
        store.count_deleted(table, why, rows)
        log.log(
            level,
            "store %s: deleted %d rows (%s, basis %s): %s",
            table,
            rows,
            "retention_days" if why == "age" else "max_store_bytes",
            store.retention_basis,
            detail,
        )
    return rows


def _scalar(value: object) -> object:
    """A value read back as DuckDB binds it (numpy integers as ``int``)."""
    return int(value) if isinstance(value, np.integer) else value


def _iso(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").isoformat()
