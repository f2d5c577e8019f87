"""Record tables: typed columns of report rows, written without pandas.

A ``RecordTable`` holds the flow records of ``vspan report`` as numpy columns, each of a
declared kind, so the table has one schema whatever its data (a column of names stays a
string column when every name is missing). Text columns are dictionary-coded: codes per row
and the distinct values once. From it come a pandas frame (``frame()``), an Arrow table for
Parquet (``arrow()``), and JSON or CSV text through a compiled writer (``textrows``) — the
last two without importing pandas, which takes longer to import than a large capture takes
to read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vspan import __version__

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = ["Column", "Floats", "Ints", "Lists", "RecordTable", "Seconds", "Texts", "Times"]

I64 = npt.NDArray[np.int64]
Index = npt.NDArray[np.intp] | npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Ints:
    """Integers; ``valid`` marks the present values of a nullable column (None: a plain,
    never-missing column)."""

    values: I64
    valid: npt.NDArray[np.bool_] | None = None

    def take(self, rows: Index) -> Ints:
        return Ints(self.values[rows], None if self.valid is None else self.valid[rows])


@dataclass(frozen=True, slots=True)
class Floats:
    """Floating-point values; NaN is missing."""

    values: npt.NDArray[np.float64]

    def take(self, rows: Index) -> Floats:
        return Floats(self.values[rows])


@dataclass(frozen=True, slots=True)
class Times:
    """Instants as nanoseconds since the epoch (UTC)."""

    ns: I64

    def take(self, rows: Index) -> Times:
        return Times(self.ns[rows])


@dataclass(frozen=True, slots=True)
class Seconds:
    """Durations kept as nanoseconds and shown in seconds: a float in frames and Parquet,
    the exact decimal in text."""

    ns: I64

    def take(self, rows: Index) -> Seconds:
        return Seconds(self.ns[rows])


@dataclass(frozen=True, slots=True)
class Texts:
    """Strings (or missing), dictionary-coded: row ``i`` holds ``values[codes[i]]``."""

    codes: I64
    values: tuple[str | None, ...]

    def take(self, rows: Index) -> Texts:
        return Texts(self.codes[rows], self.values)


@dataclass(frozen=True, slots=True)
class Lists:
    """Lists of strings, dictionary-coded like ``Texts``."""

    codes: I64
    values: tuple[tuple[str, ...], ...]

    def take(self, rows: Index) -> Lists:
        return Lists(self.codes[rows], self.values)


Column = Ints | Floats | Times | Seconds | Texts | Lists


def _objects(codes: I64, values: tuple[Any, ...], convert: Callable[[Any], Any]) -> Any:
    """``convert(values[code])`` per row as an object array (one object per distinct)."""
    table = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        table[i] = convert(value)
    return table[codes]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class RecordTable:
    """Named columns of equal length, in output order."""

    columns: Mapping[str, Column]

    def __post_init__(self) -> None:
        lengths = {name: _length(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns of different lengths: {lengths}")

    def __len__(self) -> int:
        return next((_length(c) for c in self.columns.values()), 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def ints(self, name: str) -> I64:
        """The values of an integer (or time, or duration) column."""
        col = self.columns[name]
        if isinstance(col, Ints):
            return col.values
        if isinstance(col, Times | Seconds):
            return col.ns
        raise TypeError(f"column {name!r} is {type(col).__name__}, not integers")

    def take(self, rows: Index) -> RecordTable:
        """The rows at ``rows``, in that order."""
        return RecordTable({name: col.take(rows) for name, col in self.columns.items()})

    def head(self, n: int) -> RecordTable:
        """The first ``n`` rows."""
        return self.take(np.arange(min(n, len(self)), dtype=np.int64))

    def frame(self) -> pd.DataFrame:
        """A pandas frame: nullable integers as ``Int64``, times as UTC datetimes, texts and
        lists as Python objects."""
        import pandas as pd

        return pd.DataFrame({name: _series(col) for name, col in self.columns.items()})

    def arrow(self) -> pa.Table:
        """An Arrow table, with the pandas metadata that makes ``pandas.read_parquet`` give
        back ``frame()``'s integer and time types."""
        import pyarrow as pa

        table = pa.table({name: _array(col) for name, col in self.columns.items()})
        return table.replace_schema_metadata({"pandas": json.dumps(self._pandas_metadata())})

    def _pandas_metadata(self) -> dict[str, Any]:
        """pandas' Parquet metadata (its "developer" guide: "Storing pandas DataFrame
        objects in Apache Parquet format")."""
        columns = []
        for name, col in self.columns.items():
            pandas_type, numpy_type, meta = _PANDAS_TYPES[type(col)]
            if isinstance(col, Ints) and col.valid is not None:
                numpy_type = "Int64"
            columns.append(
                {
                    "name": name,
                    "field_name": name,
                    "pandas_type": pandas_type,
                    "numpy_type": numpy_type,
                    "metadata": meta,
                }
            )
        return {
            "index_columns": [],
            "column_indexes": [],
            "columns": columns,
            "attributes": {},
            "creator": {"library": "vspan", "version": __version__},
        }


_PANDAS_TYPES: Mapping[type, tuple[str, str, dict[str, str] | None]] = {
    Ints: ("int64", "int64", None),
    Floats: ("float64", "float64", None),
    Seconds: ("float64", "float64", None),
    Times: ("datetimetz", "datetime64[ns]", {"timezone": "UTC"}),
    Texts: ("unicode", "object", None),
    Lists: ("list[unicode]", "object", None),
}


def _length(col: Column) -> int:
    if isinstance(col, Ints | Floats):
        return len(col.values)
    if isinstance(col, Times | Seconds):
        return len(col.ns)
    return len(col.codes)


def _series(col: Column) -> Any:
    import pandas as pd

    if isinstance(col, Ints):
        if col.valid is None:
            return col.values
        return pd.arrays.IntegerArray(np.where(col.valid, col.values, 0), ~col.valid)
    if isinstance(col, Floats):
        return col.values
    if isinstance(col, Seconds):
        return col.ns / 1e9
    if isinstance(col, Times):
        return pd.to_datetime(col.ns, unit="ns", utc=True)
    if isinstance(col, Texts):
        return _objects(col.codes, col.values, _same)
    return _objects(col.codes, col.values, list)


def _buffer(values: npt.NDArray[Any]) -> pa.Buffer:
    import pyarrow as pa

    return pa.py_buffer(np.ascontiguousarray(values))


def _validity(valid: npt.NDArray[np.bool_] | None) -> pa.Buffer | None:
    """Arrow's validity bitmap (least significant bit first); None when all are valid."""
    if valid is None or valid.all():
        return None
    return _buffer(np.packbits(valid, bitorder="little"))


def _offsets(lengths: I64) -> I64:
    """Where each of runs of ``lengths`` starts when back to back, then where the last ends
    (Arrow's offsets)."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _strings(values: list[str | None], rows: I64) -> pa.Array:
    """``values[rows[i]]`` per row, as Arrow strings (gathered by numpy: ``Array.take``
    would import ``pyarrow.compute``, 25 ms)."""
    import pyarrow as pa

    from vspan.wire.tunnel_batch import gather_runs

    data = [b"" if v is None else v.encode() for v in values]
    sizes = np.fromiter(map(len, data), np.int64, len(data))
    starts = _offsets(sizes)[:-1]
    lengths = sizes[rows]
    offsets = _offsets(lengths)
    text = gather_runs(np.frombuffer(b"".join(data), np.uint8), starts[rows], lengths)
    valid = np.array([v is not None for v in values], np.bool_)[rows]
    buffers = [_validity(valid), _buffer(offsets), _buffer(text)]
    return pa.Array.from_buffers(pa.large_string(), len(rows), buffers)


def _array(col: Column) -> pa.Array:
    """``col`` as an Arrow array, made from its buffers (``pyarrow.array`` would import
    pandas to check what it was given)."""
    import pyarrow as pa

    from vspan.wire.tunnel_batch import gather_runs  # here: 13 ms of imports, for Parquet only

    if isinstance(col, Ints):
        buffers = [_validity(col.valid), _buffer(col.values)]
        return pa.Array.from_buffers(pa.int64(), len(col.values), buffers)
    if isinstance(col, Floats | Seconds):
        values = col.values if isinstance(col, Floats) else col.ns / 1e9
        buffers = [_validity(~np.isnan(values)), _buffer(values)]
        return pa.Array.from_buffers(pa.float64(), len(values), buffers)
    if isinstance(col, Times):
        utc = pa.timestamp("ns", tz="UTC")
        return pa.Array.from_buffers(utc, len(col.ns), [None, _buffer(col.ns)])
    if isinstance(col, Texts):
        return _strings(list(col.values), col.codes)
    sizes = np.fromiter(map(len, col.values), np.int64, len(col.values))
    lengths = sizes[col.codes]
    offsets = _offsets(lengths)
    names = [name for names in col.values for name in names]
    rows = gather_runs(np.arange(len(names)), _offsets(sizes)[col.codes], lengths)
    starts = pa.Array.from_buffers(pa.int64(), len(offsets), [None, _buffer(offsets)])
    return pa.LargeListArray.from_arrays(starts, _strings(list(names), rows))
