"""Record tables: JSON and CSV text against values formatted independently in Python,
Parquet against the table's pandas frame, and the pandas frame against its columns."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.records import textrows
from vspan.analysis.records.render import render
from vspan.analysis.records.table import (
    Column,
    Floats,
    Ints,
    Lists,
    RecordTable,
    Seconds,
    Texts,
    Times,
)
from vspan.analysis.records.textrows import text_blocks

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
I64 = st.integers(-(2**63), 2**63 - 1)
NS = st.integers(-(2**62), 2**62)  # times pandas can hold (1823-2116)
TEXT = st.one_of(st.none(), st.text(max_size=8))


def _column(kind: str, n: int) -> st.SearchStrategy[Column]:
    """A column of ``kind`` with ``n`` rows."""
    rows = st.lists
    if kind == "ints":
        return st.tuples(rows(I64, min_size=n, max_size=n), st.booleans()).map(
            lambda v: Ints(np.array(v[0], np.int64))
        )
    if kind == "nullable":
        pairs = rows(st.tuples(I64, st.booleans()), min_size=n, max_size=n)
        return pairs.map(
            lambda v: Ints(
                np.array([x for x, _ in v], np.int64), np.array([ok for _, ok in v], np.bool_)
            )
        )
    if kind == "floats":
        value = st.one_of(st.floats(allow_infinity=False), st.just(math.nan))
        return rows(value, min_size=n, max_size=n).map(lambda v: Floats(np.array(v, np.float64)))
    if kind in ("times", "seconds"):
        make = Times if kind == "times" else Seconds
        return rows(NS, min_size=n, max_size=n).map(lambda v: make(np.array(v, np.int64)))
    if kind == "texts":
        values = st.lists(TEXT, min_size=1, max_size=4).map(tuple)
        return values.flatmap(
            lambda vals: rows(st.integers(0, len(vals) - 1), min_size=n, max_size=n).map(
                lambda codes: Texts(np.array(codes, np.int64), vals)
            )
        )
    names = st.lists(st.text(alphabet="abc-é,;", min_size=1, max_size=4), max_size=3).map(tuple)
    lists = st.lists(names, min_size=1, max_size=3).map(tuple)
    return lists.flatmap(
        lambda vals: rows(st.integers(0, len(vals) - 1), min_size=n, max_size=n).map(
            lambda codes: Lists(np.array(codes, np.int64), vals)
        )
    )


KINDS = ("ints", "nullable", "floats", "times", "seconds", "texts", "lists")


@st.composite
def tables(draw: st.DrawFn) -> RecordTable:
    n = draw(st.integers(0, 6))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=7))
    return RecordTable({f"c{i}_{k}": draw(_column(k, n)) for i, k in enumerate(kinds)})


def _iso(ns: int) -> str:
    when = EPOCH + timedelta(microseconds=ns // 1000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _cells(col: Column) -> list[Any]:
    """The values of ``col`` as JSON gives them (decimals exact, missing as None)."""
    if isinstance(col, Ints):
        valid = col.valid if col.valid is not None else np.ones(len(col.values), np.bool_)
        return [int(v) if ok else None for v, ok in zip(col.values, valid, strict=True)]
    if isinstance(col, Floats):
        return [None if math.isnan(v) else float(v) for v in col.values.tolist()]
    if isinstance(col, Times):
        return [_iso(v) for v in col.ns.tolist()]
    if isinstance(col, Seconds):
        return [Decimal(v) / Decimal(10**9) for v in col.ns.tolist()]
    if isinstance(col, Texts):
        return [col.values[c] for c in col.codes.tolist()]
    return [list(col.values[c]) for c in col.codes.tolist()]


def _text(table: RecordTable, fmt: str) -> str:
    return b"".join(text_blocks(table, fmt)).decode()


@settings(max_examples=200, deadline=None)
@given(tables())
def test_json_rows_hold_each_value(table: RecordTable) -> None:
    rows = json.loads(_text(table, "json"), parse_float=Decimal)
    assert len(rows) == len(table)
    for name, col in table.columns.items():
        got = [row[name] for row in rows]
        want = _cells(col)
        if isinstance(col, Floats):  # the shortest text that reads back as the same float
            got = [None if v is None else float(v) for v in got]
        assert got == want, name
    for row in rows:
        assert list(row) == list(table)  # keys in column order


@settings(max_examples=200, deadline=None)
@given(tables())
def test_csv_rows_hold_each_value(table: RecordTable) -> None:
    lines = list(csv.reader(io.StringIO(_text(table, "csv"), newline="")))
    assert lines[0] == list(table)
    assert len(lines) == len(table) + 1
    for c, (name, col) in enumerate(table.columns.items()):
        got = [line[c] for line in lines[1:]]
        want = []
        for v in _cells(col):
            if v is None:
                want.append("")
            elif isinstance(v, list):
                want.append(";".join(v))
            elif isinstance(col, Floats):
                want.append(repr(v))
            elif isinstance(v, Decimal):
                want.append(v)  # compared as numbers below
            else:
                want.append(str(v))
        if isinstance(col, Seconds):
            got = [Decimal(g) for g in got]
        assert got == want, name


@settings(max_examples=100, deadline=None)
@given(tables())
def test_parquet_reads_back_as_the_frame(table: RecordTable) -> None:
    out = io.BytesIO()
    render(table, "parquet", out)
    back = pd.read_parquet(io.BytesIO(out.getvalue()))
    frame = table.frame()
    assert list(back.columns) == list(frame.columns)
    for name, col in table.columns.items():
        if isinstance(col, Texts):
            assert [None if pd.isna(v) else v for v in back[name]] == _cells(col)
        elif isinstance(col, Lists):
            assert [list(v) for v in back[name]] == _cells(col)
        else:
            pd.testing.assert_series_equal(back[name], frame[name], check_dtype=True)


@settings(max_examples=100, deadline=None)
@given(tables())
def test_the_frame_holds_the_columns(table: RecordTable) -> None:
    frame = table.frame()
    assert len(frame) == len(table)
    for name, col in table.columns.items():
        values = frame[name].tolist()
        if isinstance(col, Ints):
            assert frame[name].dtype == ("int64" if col.valid is None else "Int64")
            assert [None if v is pd.NA else v for v in values] == _cells(col)
        elif isinstance(col, Times):
            assert [_iso(v.value) for v in frame[name]] == _cells(col)
        elif isinstance(col, Seconds):
            assert values == [v / 1e9 for v in col.ns.tolist()]
        elif isinstance(col, Floats):
            assert [None if math.isnan(v) else v for v in values] == _cells(col)
        elif isinstance(col, Texts):  # pandas infers its string type, missing as NaN
            assert [None if not isinstance(v, str) else v for v in values] == _cells(col)
        else:
            assert values == _cells(col)


def test_rows_cross_block_boundaries() -> None:
    n = 2 * textrows.BLOCK_ROWS + 3
    table = RecordTable(
        {"a": Ints(np.arange(n, dtype=np.int64)), "b": Texts(np.zeros(n, np.int64), ("x",))}
    )
    blocks = list(text_blocks(table, "json"))
    assert len(blocks) == 5  # "[", three blocks of rows, "]"
    rows = json.loads(b"".join(blocks))
    assert [r["a"] for r in rows] == list(range(n))
    csv_rows = _text(table, "csv").splitlines()
    assert csv_rows[0] == "a,b"
    assert csv_rows[1:] == [f"{i},x" for i in range(n)]


def test_an_empty_table() -> None:
    table = RecordTable({"a": Ints(np.zeros(0, np.int64)), "t": Texts(np.zeros(0, np.int64), ())})
    assert _text(table, "json") == "[]\n"
    assert _text(table, "csv") == "a,t\n"
    assert len(table.frame()) == 0
    assert table.arrow().num_rows == 0


def test_take_head_and_bad_tables() -> None:
    table = RecordTable(
        {"a": Ints(np.array([5, 6, 7])), "t": Texts(np.array([0, 1, 0]), ("x", None))}
    )
    assert table.take(np.array([2, 0])).frame()["a"].tolist() == [7, 5]
    assert table.head(2).frame()["t"].fillna("-").tolist() == ["x", "-"]
    assert len(table.head(10)) == 3
    with pytest.raises(ValueError, match="different lengths"):
        RecordTable({"a": Ints(np.zeros(2, np.int64)), "b": Ints(np.zeros(3, np.int64))})
    with pytest.raises(TypeError, match="'t' is Texts"):
        table.ints("t")
    with pytest.raises(ValueError, match="unknown text format 'xml'"):
        list(text_blocks(table, "xml"))


def test_report_writes_json_and_parquet_without_pandas(tmp_path: Any) -> None:
    from vspan.synth import generate_small, write_capture

    capture = tmp_path / "dc.pcapng"
    write_capture(generate_small(4), capture)
    code = (
        "import sys; from vspan.cli import main\n"
        "for fmt in ('json', 'parquet', 'csv'):\n"
        f"    main(['report', {str(capture)!r}, '--format', fmt, '-o', {str(tmp_path)!r} + '/o.' + fmt])\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    rows = json.loads((tmp_path / "o.json").read_text())
    assert (
        len(rows)
        == len(pd.read_parquet(tmp_path / "o.parquet"))
        == len(pd.read_csv(tmp_path / "o.csv"))
    )


def test_negative_zero_keeps_its_sign() -> None:
    # Regression: floats were made distinct by value (np.unique), so -0.0 printed as 0.0.
    table = RecordTable({"f": Floats(np.array([0.0, -0.0]))})
    assert _text(table, "csv").splitlines() == ["f", "0.0", "-0.0"]
    signs = [math.copysign(1, row["f"]) for row in json.loads(_text(table, "json"))]
    assert signs == [1.0, -1.0]
