"""Appends that one bad value cannot fail: the per-column checks (``store.append.prepare``),
the split of refused inserts (``insert_in_parts``), and what the store and its writer count.

Regression (issue 17, point 1): flows of VMs without a UUID (a Linux bridge's) reached the
store with ``src_vm_uuid = ""``; the cast to UUID failed the whole append and the other
VMs' flows of the batch were lost with them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from vspan.analysis.store.append import AppendResult, insert_in_parts, prepare
from vspan.analysis.store.schema import TABLES
from vspan.analysis.store.store import Store, StoreError
from vspan.analysis.store.writer import StoreWriter

WEB = "6f1c2d9e-0000-4000-8000-000000000001"
DB = "6f1c2d9e-0000-4000-8000-000000000002"
T0 = 1_700_000_000 * 10**9


def flow_rows(n: int, **columns: Any) -> pd.DataFrame:
    """``n`` minimal flow records (every NOT NULL column), ``columns`` replacing some."""
    stamps = pd.Series([T0 + i * 10**6 for i in range(n)])
    rows = pd.DataFrame({
        "flow_id": range(1, n + 1), "src_vm": [f"vm{i}" for i in range(n)], "dst_vm": "db",
        "scope": "intra-host", "ethertype": 0x0800, "proto": 17, "src_port": 5000,
        "packets": 1, "bytes": 100, "packets_rev": 0, "bytes_rev": 0,
        "first": pd.to_datetime(stamps, unit="ns", utc=True),
        "last": pd.to_datetime(stamps, unit="ns", utc=True), "first_ns": stamps,
        "last_ns": stamps, "duration_s": 0.0, "copies": 1,
    })  # fmt: skip
    return rows.assign(**columns)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path, retention_days=None) as opened:
        yield opened


# --- prepare ------------------------------------------------------------------------------


def test_a_value_that_does_not_fit_a_nullable_column_becomes_null_and_is_counted() -> None:
    rows = flow_rows(
        5,
        src_vm_uuid=["", WEB.upper(), None, "not-a-uuid", f"{{{WEB}}}"],
        src_port=[80, 70_000, None, -1, 443],
    )
    ready = prepare(TABLES["flows"], rows)
    assert ready.rejected == {}
    assert ready.coerced == {"src_vm_uuid": 2, "src_port": 2}
    assert ready.frame["src_vm_uuid"].tolist() == [None, WEB, None, None, WEB]
    ports = ready.frame["src_port"].tolist()
    assert ports[0] == 80
    assert ports[4] == 443
    assert all(pd.isna(p) for p in ports[1:4])


def test_a_row_that_cannot_be_stored_is_left_out_under_its_reason() -> None:
    rows = flow_rows(6)
    rows.loc[1, "scope"] = "elsewhere"  # outside the CHECK list
    rows.loc[2, "ethertype"] = 70_000  # not a USMALLINT
    rows["first_ns"] = rows["first_ns"].astype(object)
    rows.loc[3, "first_ns"] = None  # NOT NULL
    rows.loc[4, "scope"] = "nowhere"
    ready = prepare(TABLES["flows"], rows)
    assert ready.rejected == {"bad_scope": 2, "bad_ethertype": 1, "null_first_ns": 1}
    assert ready.frame["flow_id"].tolist() == [1, 6]
    assert ready.coerced == {}


def test_a_frame_without_problems_is_handed_on_as_it_is() -> None:
    rows = flow_rows(4, src_vm_uuid=[WEB, DB, None, WEB])
    ready = prepare(TABLES["flows"], rows)
    assert (ready.coerced, ready.rejected) == ({}, {})
    assert ready.frame is rows


# --- insert_in_parts --------------------------------------------------------------------------


class RefusedError(Exception):
    pass


def refusing(bad: set[int], calls: list[int]) -> Any:
    """A ``write`` that refuses (atomically) any part holding a flow_id in ``bad``."""
    written: list[int] = []

    def write(part: pd.DataFrame) -> None:
        calls.append(len(part))
        if bad & set(part["flow_id"]):
            raise RefusedError(f"row refused\nsecond line of {len(part)}")
        written.extend(part["flow_id"])

    write.written = written  # type: ignore[attr-defined]
    return write


def test_only_the_rows_the_database_refuses_are_left_out() -> None:
    rows, calls = flow_rows(1000), []
    write = refusing({17, 500, 501}, calls)
    written, refused, error = insert_in_parts(write, rows, refused_by=(RefusedError,))
    assert (written, refused) == (997, {"refused_RefusedError": 3})
    assert sorted(write.written) == sorted(set(range(1, 1001)) - {17, 500, 501})
    assert error == "row refused"
    assert len(calls) < 3 * 2 * 11  # splits along the bad rows only: O(bad × log n)


def test_a_database_refusing_everything_costs_a_bounded_number_of_tries() -> None:
    rows, calls = flow_rows(5000), []
    write = refusing(set(range(1, 5001)), calls)
    written, refused, _ = insert_in_parts(write, rows, refused_by=(RefusedError,), max_refusals=20)
    assert (written, refused) == (0, {"refused_RefusedError": 5000})
    assert len(calls) <= 20 + 21  # the budget, then each part left in the queue once


def test_other_errors_are_not_split() -> None:
    calls: list[int] = []

    def broken(part: pd.DataFrame) -> None:
        calls.append(len(part))
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        insert_in_parts(broken, flow_rows(10), refused_by=(RefusedError,))
    assert calls == [10]


# --- the store and its writer ---------------------------------------------------------------


def test_flows_of_vms_without_a_uuid_are_stored_with_the_others(store: Store) -> None:
    # The batch of the regression: one VM known by UUID, the others (bridge) with "".
    rows = flow_rows(4, src_vm_uuid=[WEB, "", "", WEB], dst_vm_uuid=["", "", DB, None])
    result = store.append_flows(rows)
    assert result == AppendResult(4, {"src_vm_uuid": 2, "dst_vm_uuid": 2}, {})
    got = store.query(
        "SELECT flow_id, CAST(src_vm_uuid AS VARCHAR) AS s, CAST(dst_vm_uuid AS VARCHAR) AS d "
        "FROM flows ORDER BY flow_id"
    )
    got = got.astype(object).where(got.notna(), None)
    assert got.to_dict("list") == {
        "flow_id": [1, 2, 3, 4], "s": [WEB, None, None, WEB], "d": [None, None, DB, None]
    }  # fmt: skip
    assert store.query_flows(vm=WEB, limit=None)["flow_id"].tolist() == [1, 4]


def test_a_row_the_database_refuses_takes_no_other_row_with_it(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # observed_at is not checked before the insert: DuckDB refuses the row with a string.
    rows = flow_rows(9, observed_at=[["hv1"]] * 4 + ["hv1"] + [["hv2"]] * 4)
    with caplog.at_level(logging.WARNING, logger="vspan.store"):
        result = store.append_flows(rows)
    assert (result.written, result.rejected) == (8, {"refused_ConversionException": 1})
    assert store.count("flows") == 8
    assert 5 not in store.query_flows(limit=None)["flow_id"].tolist()
    assert store.counters()["rejected"] == {"flows": {"refused_ConversionException": 1}}
    assert store.counters()["written"] == {"flows": {"rows": 8}}
    (line,) = [r.getMessage() for r in caplog.records if r.name == "vspan.store"]
    assert "store flows: 1 of 9 rows not stored (refused_ConversionException 1)" in line
    assert "VARCHAR[]" in line  # what the database said


def test_an_append_without_a_required_column_still_fails_as_a_whole(store: Store) -> None:
    with pytest.raises(StoreError, match="needs column 'scope'"):
        store.append_flows(flow_rows(3).drop(columns="scope"))
    assert store.count("flows") == 0


def test_the_writer_counts_what_the_store_wrote_and_what_it_could_not(store: Store) -> None:
    writer = StoreWriter()
    lane = writer.lane("flows", lambda parts: store.append("flows", pd.concat(parts)), size=len)
    writer.start()
    good = flow_rows(10, src_vm_uuid="")
    bad = flow_rows(3, scope="nowhere")
    assert lane.submit(good)
    assert lane.submit(bad)
    writer.stop()
    metrics = writer.metrics()
    assert metrics["rows_written{flows}"] == store.count("flows") == 10
    assert metrics["rejected{flows,bad_scope}"] == 3
    assert metrics["coerced{flows,src_vm_uuid}"] == 10
