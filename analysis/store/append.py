"""How an append goes: values checked column by column, inserts split where the database
refuses, and everything counted — one bad value never fails an append.

DuckDB casts a whole ``INSERT … SELECT`` or nothing: one empty string in a UUID column, one
``scope`` outside its CHECK list, one NULL in a NOT NULL column, and every row of the append
is refused. ``prepare`` looks at every column of the table the frame has, by the column's
type in ``store.schema``, and returns what DuckDB will accept:

- a value the column's type cannot hold (not a UUID, an integer out of the type's range, a
  non-number, a string outside the CHECK list, a non-string in a text column): in a
  nullable column it becomes NULL, counted in ``coerced[column]``; in a NOT NULL column the
  row is left out, counted in ``rejected["bad_<column>"]``;
- NULL in a NOT NULL column: the row is left out, counted in ``rejected["null_<column>"]``
  (a row with several problems is counted once, under the first column in table order);
- UUIDs are written in canonical form (lower case, hyphens), ns integers in time columns
  become UTC timestamps, dicts in map columns JSON text.

Each check is vectorized: integer ranges by the column's min and max (one pass when all
fit), text columns by their distinct values (a few hundred VM names or UUIDs, however many
rows). An insert the database still refuses is split in halves by ``insert_in_parts`` until
only the rows it refuses are left out (``refused_<error>``). ``AppendResult`` says what one
append wrote and did not; ``StoreCounts`` adds them up per table and logs the losses.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.store.schema import Column, Table

__all__ = ["INT_RANGES", "AppendResult", "Prepared", "StoreCounts", "insert_in_parts", "prepare"]

log = logging.getLogger("vspan.store")

INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "UTINYINT": (0, 2**8 - 1),
    "USMALLINT": (0, 2**16 - 1),
    "UINTEGER": (0, 2**32 - 1),
    "UBIGINT": (0, 2**64 - 1),
    "TINYINT": (-(2**7), 2**7 - 1),
    "SMALLINT": (-(2**15), 2**15 - 1),
    "INTEGER": (-(2**31), 2**31 - 1),
    "BIGINT": (-(2**63), 2**63 - 1),
}
"""The values each DuckDB integer type holds."""


@dataclass(slots=True)
class Prepared:
    """A frame ready for the insert, and what was changed or left out to make it so."""

    frame: pd.DataFrame
    coerced: dict[str, int] = field(default_factory=dict)
    """Column → values replaced by NULL (they did not fit the column's type)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Reason (``bad_<column>``, ``null_<column>``) → rows left out."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one append did."""

    written: int
    """Rows committed."""
    coerced: dict[str, int] = field(default_factory=dict)
    """Column → values stored as NULL because they did not fit the column."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Reason → rows left out (``bad_<column>``, ``null_<column>``, ``refused_<error>``)."""

    @property
    def lost(self) -> int:
        """Rows given that were not written."""
        return sum(self.rejected.values())


def insert_in_parts(
    write: Callable[[pd.DataFrame], None],
    frame: pd.DataFrame,
    *,
    refused_by: tuple[type[Exception], ...],
    max_refusals: int = 256,
) -> tuple[int, dict[str, int], str]:
    """``write`` the frame (one atomic statement per call); a part refused with one of
    ``refused_by`` is split in halves, down to single rows, and what is still refused is
    left out under ``refused_<error class>``. After ``max_refusals`` refusals a refused
    part is left out whole (a database refusing everything costs a bounded time). Other
    exceptions propagate. Returns (rows written, rows left out by reason, first error)."""
    written, refusals, first_error = 0, 0, ""
    refused: dict[str, int] = {}
    parts = [frame] if len(frame) else []
    while parts:
        part = parts.pop()
        try:
            write(part)
        except refused_by as exc:
            refusals += 1
            first_error = first_error or (str(exc).splitlines() or [""])[0]
            if len(part) > 1 and refusals <= max_refusals:
                half = len(part) // 2
                parts += [part.iloc[half:], part.iloc[:half]]  # the first half next
            else:
                reason = f"refused_{type(exc).__name__}"
                refused[reason] = refused.get(reason, 0) + len(part)
            continue
        written += len(part)
    return written, refused, first_error


class StoreCounts:
    """Per kind, table and key: rows ``written``, values ``coerced`` to NULL (by column),
    rows ``rejected`` (by reason), rows ``deleted`` (by why). Thread-safe. ``appended``
    logs an append that lost or changed something, per table at most every ``log_every_s``
    (with the totals so far)."""

    KINDS: Final = ("written", "coerced", "rejected", "deleted")

    def __init__(self, *, log_every_s: float = 10.0) -> None:
        self.log_every_s = log_every_s
        self._counts: dict[str, dict[str, dict[str, int]]] = {k: {} for k in self.KINDS}
        self._last_log: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, kind: str, table: str, counts: Mapping[str, int]) -> None:
        with self._lock:
            mine = self._counts[kind].setdefault(table, {})
            for key, n in counts.items():
                if n:
                    mine[key] = mine.get(key, 0) + n

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        with self._lock:
            return {k: {t: dict(c) for t, c in v.items()} for k, v in self._counts.items()}

    def appended(self, table: str, result: AppendResult, error: str = "") -> None:
        self.add("written", table, {"rows": result.written})
        self.add("coerced", table, result.coerced)
        self.add("rejected", table, result.rejected)
        if not (result.rejected or result.coerced):
            return
        with self._lock:
            now = time.monotonic()
            if now - self._last_log.get(table, -self.log_every_s) < self.log_every_s:
                return
            self._last_log[table] = now
            rejected = dict(self._counts["rejected"].get(table, {}))
            coerced = dict(self._counts["coerced"].get(table, {}))
        log.warning(
            "store %s: %d of %d rows not stored (%s), values stored as NULL (%s)%s; "
            "so far: rows not stored %s, values as NULL %s",
            table,
            result.lost,
            result.written + result.lost,
            _fmt(result.rejected),
            _fmt(result.coerced),
            f"; the database said: {error}" if error else "",
            _fmt(rejected),
            _fmt(coerced),
        )


def _fmt(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def prepare(spec: Table, df: pd.DataFrame) -> Prepared:
    """``df`` checked and converted for an append to ``spec`` (columns it lacks are left to
    the insert: defaults, generated ids, or an error naming a missing NOT NULL column)."""
    n = len(df)
    changed: dict[str, Any] = {}
    coerced: dict[str, int] = {}
    drop_reason = np.full(n, "", dtype=object)
    for col in spec.columns:
        if col.name not in df.columns:
            continue
        original = df[col.name]
        values, bad = _convert(col, original)
        missing = values.isna().to_numpy(dtype=bool) & ~bad
        if bad.any():
            if col.null:
                coerced[col.name] = int(bad.sum())
                values = values.where(~bad, None)
            else:
                drop_reason[bad & (drop_reason == "")] = f"bad_{col.name}"
        if not col.null and missing.any():
            drop_reason[missing & (drop_reason == "")] = f"null_{col.name}"
        if values is not original:
            changed[col.name] = values
    out = df.assign(**changed) if changed else df
    dropped = drop_reason != ""
    rejected: dict[str, int] = {}
    if dropped.any():
        reasons, counts = np.unique(drop_reason[dropped].astype(str), return_counts=True)
        rejected = {str(r): int(c) for r, c in zip(reasons, counts, strict=True)}
        out = out.loc[~dropped].reset_index(drop=True)
    return Prepared(out, coerced, rejected)


def _convert(col: Column, values: pd.Series) -> tuple[pd.Series, npt.NDArray[np.bool_]]:
    """The column's values as the insert takes them, and a mask of those that cannot be."""
    kind = col.duckdb
    if kind == "UUID":
        values, bad = _by_distinct(values, _canonical_uuid)
    elif kind in INT_RANGES:
        bad = _int_out_of_range(values, *INT_RANGES[kind])
    elif kind == "DOUBLE":
        values, bad = _numbers(values)
    elif kind == "TIMESTAMPTZ":
        values, bad = _timestamps(values)
    elif kind == "VARCHAR":
        values, bad = _strings(values)
    elif kind.startswith("MAP(") and values.dtype == object:
        values = pd.Series(
            [None if v is None else json.dumps(dict(v)) for v in values], index=values.index
        )
        bad = np.zeros(len(values), dtype=bool)
    else:
        bad = np.zeros(len(values), dtype=bool)
    if col.check:
        outside = set(pd.unique(values.dropna())) - set(col.check)
        if outside:
            bad |= values.isin(outside).to_numpy(dtype=bool)
    return values, bad


def _strings(values: pd.Series) -> tuple[pd.Series, npt.NDArray[np.bool_]]:
    """A text column: anything but a string is bad (a string dtype, or an object column
    of strings, is checked without a pass in Python)."""
    if isinstance(values.dtype, pd.StringDtype) or pd.api.types.infer_dtype(
        values, skipna=True
    ) in ("string", "empty"):
        return values, np.zeros(len(values), dtype=bool)
    return _by_distinct(values, lambda v: v if isinstance(v, str) else None)


def _canonical_uuid(value: object) -> str | None:
    if isinstance(value, uuidlib.UUID):
        return str(value)
    if not isinstance(value, str):
        return None
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        return None


def _by_distinct(values: pd.Series, convert: Any) -> tuple[pd.Series, npt.NDArray[np.bool_]]:
    """Apply ``convert`` (value → value, or None when it does not fit) to each distinct
    non-null value once; the converted series and the mask of values that did not fit."""
    present = values.notna().to_numpy(dtype=bool)
    if not present.any():
        return values, np.zeros(len(values), dtype=bool)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    converted = [convert(u) for u in uniques]  # one call per distinct value
    if all(c is not None and c == u for c, u in zip(converted, uniques, strict=True)):
        return values, np.zeros(len(values), dtype=bool)  # all fine as they are
    table = np.array([*converted, None], dtype=object)  # code -1 (NULL) → the last entry
    out = pd.Series(table[codes], index=values.index, dtype=object)
    return out, present & out.isna().to_numpy(dtype=bool)


def _int_out_of_range(values: pd.Series, lo: int, hi: int) -> npt.NDArray[np.bool_]:
    """Values that are not integers in ``lo..hi`` (NULLs are not bad)."""
    if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values):
        present = values.dropna()
        if present.empty or (int(present.min()) >= lo and int(present.max()) <= hi):
            return np.zeros(len(values), dtype=bool)
        mask = values.notna() & ((values < lo) | (values > hi))
        return mask.to_numpy(dtype=bool)
    numbers = pd.to_numeric(values, errors="coerce")
    numeric = np.asarray(numbers, dtype=np.float64)
    integral = np.isfinite(numeric) & (np.floor(numeric) == numeric)
    fits: npt.NDArray[np.bool_] = integral & (numeric >= lo) & (numeric <= hi)
    return values.notna().to_numpy(dtype=bool) & ~fits


def _numbers(values: pd.Series) -> tuple[pd.Series, npt.NDArray[np.bool_]]:
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values):
        return values, np.zeros(len(values), dtype=bool)
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers, values.notna().to_numpy(dtype=bool) & numbers.isna().to_numpy(dtype=bool)


def _timestamps(values: pd.Series) -> tuple[pd.Series, npt.NDArray[np.bool_]]:
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values):
        return values, np.zeros(len(values), dtype=bool)
    if pd.api.types.is_integer_dtype(values.dtype):
        return pd.to_datetime(values, unit="ns", utc=True), np.zeros(len(values), dtype=bool)
    stamps = pd.to_datetime(values, utc=True, errors="coerce", format="mixed")
    return stamps, values.notna().to_numpy(dtype=bool) & stamps.isna().to_numpy(dtype=bool)
