"""Traffic matrices: bin spreading conserves every counter; VM-pair and host-pair matrices,
the scope split and uplink loads equal values computed by hand; files by suffix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.records.matrix import (
    EXTERNAL,
    host_matrix,
    scope_split,
    spread,
    to_file,
    uplink_load,
    vm_hosts,
    vm_matrix,
)

S = 10**9
BIN = 100  # seconds


def _flows(rows: list[tuple[object, ...]]) -> pd.DataFrame:
    columns = ["src_vm", "dst_vm", "src_host", "dst_host", "packets", "bytes", "packets_rev",
               "bytes_rev", "first_ns", "last_ns"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


FLOWS = _flows(
    [
        # a → b, cross-host hv1 → hv2, 50 s..250 s: 1/4 in bin 0, 1/2 in bin 1, 1/4 in bin 2
        ("a", "b", "hv1", "hv2", 40, 4000, 20, 2000, 50 * S, 250 * S),
        # a → c, intra-host hv1, inside bin 1
        ("a", "c", "hv1", "hv1", 10, 1000, 10, 500, 120 * S, 130 * S),
        # c → outside, external, an instant in bin 0
        ("c", None, "hv1", None, 1, 300, 0, 0, 10 * S, 10 * S),
    ]
)


def test_spread_weights_split_by_overlap() -> None:
    parts = spread(FLOWS, BIN * S)
    first = parts[parts["row"] == 0]
    assert first["bin_ns"].tolist() == [0, 100 * S, 200 * S]
    assert first["weight"].tolist() == pytest.approx([0.25, 0.5, 0.25])
    assert parts[parts["row"] == 2][["bin_ns", "weight"]].values.tolist() == [[0, 1.0]]


def test_flow_ending_on_a_boundary_stays_in_its_bin() -> None:
    flows = _flows([("a", "b", "hv1", "hv2", 1, 100, 0, 0, 0, 100 * S)])
    assert spread(flows, BIN * S)["bin_ns"].tolist() == [0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10_000), st.integers(0, 5_000), st.integers(0, 10**9),
            st.integers(0, 10**6),
        ),
        min_size=1,
        max_size=20,
    ),
    st.integers(1, 3_000),
)  # fmt: skip
def test_spreading_conserves_bytes(rows: list[tuple[int, int, int, int]], bin_s: int) -> None:
    flows = _flows([("a", "b", "h1", "h2", p, b, 0, 0, f * S, (f + d) * S) for f, d, b, p in rows])
    m = host_matrix(flows, bin_s)
    assert m["bytes"].sum() == pytest.approx(flows["bytes"].sum(), rel=1e-9)
    assert m["packets"].sum() == pytest.approx(flows["packets"].sum(), rel=1e-9)
    assert (m["bin_ns"] % (bin_s * S) == 0).all()


def _as_dict(m: pd.DataFrame, value: str) -> dict[tuple[int, str, str], float]:
    return {(b // S, s, d): v for b, s, d, v in m[["bin_ns", "src", "dst", value]].values}


def test_vm_matrix_by_hand() -> None:
    m = vm_matrix(FLOWS, BIN)
    assert _as_dict(m, "bytes") == pytest.approx(
        {
            (0, "a", "b"): 1000.0, (0, "b", "a"): 500.0, (0, "c", EXTERNAL): 300.0,
            (100, "a", "b"): 2000.0, (100, "b", "a"): 1000.0,
            (100, "a", "c"): 1000.0, (100, "c", "a"): 500.0,
            (200, "a", "b"): 1000.0, (200, "b", "a"): 500.0,
        }
    )  # fmt: skip
    flows = _as_dict(m, "flows")
    assert flows[(100, "a", "b")] == 1
    assert flows[(100, "b", "a")] == 0


def test_host_matrix_split_and_uplinks_by_hand() -> None:
    hosts = host_matrix(FLOWS, BIN)
    assert _as_dict(hosts, "bytes") == pytest.approx(
        {
            (0, "hv1", "hv2"): 1000.0, (0, "hv2", "hv1"): 500.0, (0, "hv1", EXTERNAL): 300.0,
            (100, "hv1", "hv2"): 2000.0, (100, "hv2", "hv1"): 1000.0,
            (100, "hv1", "hv1"): 1500.0,
            (200, "hv1", "hv2"): 1000.0, (200, "hv2", "hv1"): 500.0,
        }
    )  # fmt: skip
    split = scope_split(hosts).set_index(["bin_ns", "scope"])["bytes"]
    assert split[(0, "cross-host")] == pytest.approx(1500.0)
    assert split[(0, "external")] == pytest.approx(300.0)
    assert split[(100 * S, "intra-host")] == pytest.approx(1500.0)
    up = uplink_load(hosts).set_index(["bin_ns", "host"])
    assert up.loc[(0, "hv1"), ["bytes_out", "bytes_in"]].tolist() == pytest.approx([1300, 500])
    assert up.loc[(0, "hv2"), ["bytes_out", "bytes_in"]].tolist() == pytest.approx([500, 1000])
    # intra-host traffic never reaches the uplink
    assert up.loc[(100 * S, "hv1"), ["bytes_out", "bytes_in"]].tolist() == pytest.approx(
        [2000, 1000]
    )


def test_unknown_local_end_and_placement() -> None:
    flows = _flows([(None, "b", "hv1", "hv2", 1, 10, 1, 10, 0, S)])
    assert set(vm_matrix(flows, BIN)["src"]) == {"?@hv1", "b"}
    assert vm_hosts(pd.concat([FLOWS, flows])) == {
        "a": "hv1",
        "b": "hv2",
        "c": "hv1",
        "?@hv1": "hv1",
    }


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_to_file_by_suffix(tmp_path: Path, suffix: str) -> None:
    m = host_matrix(FLOWS, BIN)
    path = tmp_path / f"m{suffix}"
    to_file(m, path)
    read = {".csv": pd.read_csv, ".json": pd.read_json, ".parquet": pd.read_parquet}[suffix]
    back = read(path)
    assert back["bytes"].to_numpy() == pytest.approx(m["bytes"].to_numpy())
    assert back["src"].tolist() == m["src"].tolist()


def test_to_file_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown suffix '\.xlsx'"):
        to_file(pd.DataFrame(), tmp_path / "m.xlsx")


def test_empty_flows() -> None:
    m = host_matrix(_flows([]), BIN)
    assert m.empty
    assert np.isclose(m["bytes"].sum(), 0.0)
