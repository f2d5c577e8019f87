"""Rendering: the terminal table is laid out as pandas' ``to_string`` would (the oracle),
with flag letters, thousands separators and "-" for missing values."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.records.render import _fixed_width, render

cell = st.one_of(
    st.integers(-(10**12), 10**12),
    st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=12),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda x: round(x, 9)),
    st.just("-"),
)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda ncol: st.lists(st.lists(cell, min_size=ncol, max_size=ncol), min_size=1, max_size=8)
    ),
    st.lists(
        st.text(alphabet="abcdefgh_", min_size=1, max_size=10), min_size=5, max_size=5, unique=True
    ),
)
def test_the_layout_is_pandas_to_string(rows: list[list[object]], names: list[str]) -> None:
    frame = pd.DataFrame(rows, columns=names[: len(rows[0])], dtype=object)
    assert _fixed_width(frame) == frame.to_string(index=False)


def test_flows_table_shows_letters_separators_and_dashes() -> None:
    frame = pd.DataFrame(
        {
            "src_vm": ["web-01", None],
            "packets": [1234567, 3],
            "tcp_flags": pd.array([0x12, None], dtype="Int64"),
            "flow_id": [1, 2],  # hidden in the table
            "delay_us": [12.5, np.nan],
        }
    )
    out = io.BytesIO()
    render(frame, "table", out)
    lines = out.getvalue().decode().splitlines()
    assert lines[0].split() == ["src_vm", "packets", "tcp_flags", "delay_us"]
    assert lines[1].split() == ["web-01", "1,234,567", "SA", "12.5"]
    assert lines[2].split() == ["-", "3", "-"]  # no flags: blank (non-TCP flows)
    assert len({len(line) for line in lines}) == 1  # every column right-justified


def test_json_keeps_nulls_and_numbers() -> None:
    frame = pd.DataFrame({"a": pd.array([1, None], dtype="Int64"), "b": ["x", None]})
    out = io.BytesIO()
    render(frame, "json", out)
    assert json.loads(out.getvalue()) == [{"a": 1, "b": "x"}, {"a": None, "b": None}]
