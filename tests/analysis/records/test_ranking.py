"""``--sort``/``--top``: a record table is ordered as its pandas frame is."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.records.ranking import top
from vspan.analysis.records.table import Ints, RecordTable, Texts


def _flows(seed: int) -> RecordTable:
    rng = np.random.default_rng(seed)
    n = 50
    ints = {c: Ints(rng.integers(0, 5, n)) for c in ("packets", "packets_rev", "bytes")}
    return RecordTable(
        {
            **ints,
            "bytes_rev": Ints(rng.integers(0, 5, n)),
            "first_ns": Ints(rng.integers(0, 3, n)),
            "name": Texts(np.arange(n, dtype=np.int64), tuple(f"f{i}" for i in range(n))),
        }
    )


@pytest.mark.parametrize("sort", ["bytes", "packets", "flows"])
@pytest.mark.parametrize("n", [None, 7])
def test_a_table_is_ordered_as_its_frame(sort: str, n: int | None) -> None:
    table = _flows(1)
    frame = table.frame()
    got = top(table, sort=sort, n=n, by="flow").frame()["name"].tolist()
    # pandas' stable sort, independently: descending totals (ascending start for "flows").
    if sort == "flows":
        want = frame.sort_values("first_ns", kind="stable")
    else:
        total = frame[sort] + frame[f"{sort}_rev"]
        want = frame.assign(total=total).sort_values("total", ascending=False, kind="stable")
    assert got == want["name"].head(n if n is not None else len(frame)).tolist()
    assert top(frame, sort=sort, n=n, by="flow")["name"].tolist() == got


def test_groupings_sort_by_their_own_column() -> None:
    frame = pd.DataFrame({"vm": ["a", "b", "c"], "packets": [1, 9, 5], "bytes": [3, 2, 1]})
    assert top(frame, sort="packets", n=2, by="vm")["vm"].tolist() == ["b", "c"]
    with pytest.raises(ValueError, match="unknown sort 'size'"):
        top(frame, sort="size", n=None, by="vm")
