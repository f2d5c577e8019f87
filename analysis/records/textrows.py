"""JSON and CSV text of a ``RecordTable``, written by a compiled kernel.

Each distinct text, float or list value is encoded once in Python (``json.dumps``, CSV
quoting); the kernel then writes the rows: integers, exact decimal seconds and ISO 8601
times formatted from their int64 values, dictionary entries copied. The table is written
in blocks of rows, so the text of a large report is never held whole in memory.

JSON is one array of objects (``[{"flow_id":1,…},…]``, keys in column order, missing values
``null``, times as ``"2026-11-24T10:00:00.123456Z"``); CSV has a header line and leaves
missing values empty, as pandas' ``to_json(orient="records")`` and ``to_csv`` do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.analysis._factorize import factorize
from vspan.analysis.records.table import Floats, Ints, RecordTable, Seconds, Times
from vspan.kernels import kernel

__all__ = ["TEXT_FORMATS", "text_blocks"]

TEXT_FORMATS: Final = ("json", "csv")

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

CODED, INT, SECONDS, TIME = 0, 1, 2, 3
"""Cell kinds: a dictionary entry, an integer, a duration in ns shown in seconds, an
instant in ns shown as ISO 8601 UTC with microseconds."""
_WIDTH: Final = {INT: 20, SECONDS: 30, TIME: 29}
"""Longest text of a cell of each formatted kind (quotes included)."""
_FORMATTED: Final = {Ints: INT, Seconds: SECONDS, Times: TIME}
BLOCK_ROWS: Final = 1 << 15
"""Rows written per kernel call."""


@kernel
def _put(out: U8, p: int, src: U8, start: int, stop: int) -> int:
    for i in range(start, stop):
        out[p] = src[i]
        p += 1
    return p


@kernel
def _put_digits(out: U8, p: int, value: np.uint64, width: int) -> int:
    """``value`` in decimal, zero-padded to at least ``width`` digits. (Unsigned: numba's
    signed division and remainder round toward minus infinity, with a fix-up each.)"""
    n = 1
    rest = value // np.uint64(10)
    while rest:
        n += 1
        rest //= np.uint64(10)
    n = max(n, width)
    for i in range(n - 1, -1, -1):
        out[p + i] = np.uint8(np.uint64(48) + value % np.uint64(10))
        value //= np.uint64(10)
    return p + n


@kernel
def _magnitude(out: U8, p: int, value: np.int64) -> tuple[int, np.uint64]:
    """Write a minus sign for a negative ``value``; return its magnitude."""
    if value >= 0:
        return p, np.uint64(value)
    out[p] = 45
    return p + 1, np.uint64(-(value + 1)) + np.uint64(1)


@kernel
def _put_seconds(out: U8, p: int, ns: np.int64) -> int:
    """``ns`` in seconds, exactly: trailing zeros dropped, at least one decimal."""
    p, m = _magnitude(out, p, ns)
    p = _put_digits(out, p, m // np.uint64(1_000_000_000), 1)
    out[p] = 46
    frac = m % np.uint64(1_000_000_000)
    digits = 9
    while digits > 1 and frac % np.uint64(10) == 0:
        frac //= np.uint64(10)
        digits -= 1
    return _put_digits(out, p + 1, frac, digits)


@kernel
def _put_time(out: U8, p: int, ns: np.int64) -> int:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` of ``ns`` (microseconds, rounded down)."""
    us = ns // 1000
    secs = us // 1_000_000
    days = secs // 86400
    sod = secs - days * 86400
    # Civil date of a day count (H. Hinnant, "chrono-compatible low-level date algorithms").
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    p = _put_digits(out, p, np.uint64(year), 4)
    two = (month, day, sod // 3600, sod // 60 % 60, sod % 60)
    marks = (45, 45, 84, 58, 58, 46)  # - - T : : .
    out[p] = marks[0]
    for i in range(5):
        out[p + 1 + 3 * i] = 48 + two[i] // 10
        out[p + 2 + 3 * i] = 48 + two[i] % 10
        out[p + 3 + 3 * i] = marks[i + 1]
    p = _put_digits(out, p + 16, np.uint64(us - secs * 1_000_000), 6)
    out[p] = 90  # Z
    return p + 1


NULL, QUOTE, ROW_OPEN, ROW_CLOSE, ROW_SEP, PREFIX = range(6)
"""Pieces of text the writer copies: the first five, then each column's prefix, then the
dictionary entries."""


@kernel
def _rows(
    cells: tuple[I64, I64, npt.NDArray[np.bool_], I64],
    pieces: tuple[I64, U8],
    start: int,
    stop: int,
    capacity: int,
) -> U8:
    """Rows ``start:stop`` as text. ``cells``: each column's kind, the values (rows ×
    columns), whether each is present, the piece of each coded column's first entry."""
    kinds, values, valid, entry = cells
    offsets, text = pieces
    out = np.empty(capacity, np.uint8)
    p = 0
    for i in range(start, stop):
        if i > 0:
            p = _put(out, p, text, offsets[ROW_SEP], offsets[ROW_SEP + 1])
        p = _put(out, p, text, offsets[ROW_OPEN], offsets[ROW_OPEN + 1])
        for c in range(kinds.size):
            p = _put(out, p, text, offsets[PREFIX + c], offsets[PREFIX + c + 1])
            v = values[i, c]
            kind = kinds[c]
            if not valid[i, c]:
                p = _put(out, p, text, offsets[NULL], offsets[NULL + 1])
            elif kind == CODED:
                p = _put(out, p, text, offsets[entry[c] + v], offsets[entry[c] + v + 1])
            elif kind == INT:
                if v >= 0:
                    p = _put_digits(out, p, np.uint64(v), 1)
                else:
                    p, m = _magnitude(out, p, v)
                    p = _put_digits(out, p, m, 1)
            elif kind == SECONDS:
                p = _put_seconds(out, p, v)
            else:
                p = _put(out, p, text, offsets[QUOTE], offsets[QUOTE + 1])
                p = _put_time(out, p, v)
                p = _put(out, p, text, offsets[QUOTE], offsets[QUOTE + 1])
        p = _put(out, p, text, offsets[ROW_CLOSE], offsets[ROW_CLOSE + 1])
    return out[:p]


@dataclass(frozen=True)
class _Syntax:
    """How one format writes names, values and rows."""

    prefix: Callable[[int, str], str]
    """Text before column ``i`` named ``name`` in every row."""
    value: Callable[[object], str]
    """A text, list or float value (None and NaN: missing)."""
    null: str
    quote: str
    row_open: str
    row_close: str
    row_sep: str
    head: Callable[[list[str]], str]
    tail: str


def _csv_field(text: str) -> str:
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _json_value(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def _csv_value(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, tuple):
        return _csv_field(";".join(value))
    return _csv_field(repr(value) if isinstance(value, float) else str(value))


_SYNTAX: Final = {
    "json": _Syntax(
        prefix=lambda i, name: ("," if i else "") + json.dumps(name) + ":",
        value=_json_value,
        null="null",
        quote='"',
        row_open="{",
        row_close="}",
        row_sep=",",
        head=lambda names: "[",
        tail="]\n",
    ),
    "csv": _Syntax(
        prefix=lambda i, name: "," if i else "",
        value=_csv_value,
        null="",
        quote="",
        row_open="",
        row_close="\n",
        row_sep="",
        head=lambda names: ",".join(map(_csv_field, names)) + "\n",
        tail="",
    ),
}


def _pieces(parts: list[bytes]) -> tuple[I64, U8]:
    lengths = np.fromiter(map(len, parts), np.int64, len(parts))
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    return offsets, np.frombuffer(b"".join(parts), np.uint8)


def text_blocks(table: RecordTable, fmt: str) -> Iterator[bytes]:
    """The text of ``table`` as ``fmt`` (``TEXT_FORMATS``), in blocks of bytes."""
    if fmt not in _SYNTAX:
        raise ValueError(f"unknown text format {fmt!r}; expected one of {', '.join(_SYNTAX)}")
    syntax = _SYNTAX[fmt]
    names = list(table)
    if fmt == "csv" and len(names) == 1:  # an empty line would be no row at all: quote it
        syntax = replace(syntax, null='""', value=lambda v: _csv_value(v) or '""')
    n, ncol = len(table), len(names)
    kinds = np.zeros(ncol, np.int64)
    values = np.zeros((n, ncol), np.int64)
    valid = np.ones((n, ncol), np.bool_)
    entry = np.zeros(ncol, np.int64)
    prefixes = [syntax.prefix(c, name).encode() for c, name in enumerate(names)]
    marks = [syntax.null, syntax.quote, syntax.row_open, syntax.row_close, syntax.row_sep]
    parts = [m.encode() for m in marks] + prefixes
    row_width = sum(map(len, parts))
    for c, name in enumerate(names):
        col = table.columns[name]
        if isinstance(col, Ints | Seconds | Times):
            kinds[c] = _FORMATTED[type(col)]
            values[:, c] = table.ints(name)
            if isinstance(col, Ints) and col.valid is not None:
                valid[:, c] = col.valid
            row_width += _WIDTH[int(kinds[c])]
            continue
        if isinstance(col, Floats):  # distinct by bits: -0.0 is not 0.0
            bits = np.ascontiguousarray(col.values).view(np.uint64)
            codes, distinct, _ = factorize(bits)
            coded: tuple[object, ...] = tuple(distinct.view(np.float64).tolist())
        else:
            codes, coded = col.codes, col.values
        encoded = [syntax.value(v).encode() for v in coded]
        kinds[c], entry[c], values[:, c] = CODED, len(parts), codes
        parts.extend(encoded)
        row_width += max(map(len, encoded), default=0)
    pieces, cells = _pieces(parts), (kinds, values, valid, entry)
    yield syntax.head(names).encode()
    for start in range(0, n, BLOCK_ROWS):
        stop = min(n, start + BLOCK_ROWS)
        yield _rows(cells, pieces, start, stop, (stop - start) * row_width).tobytes()
    yield syntax.tail.encode()
