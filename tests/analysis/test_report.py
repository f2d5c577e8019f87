"""``vspan report`` against the simulator's ground truth, and its command-line behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vspan.analysis.report import analyze_captures
from vspan.cli import main
from vspan.inventory import Inventory
from vspan.synth import SynthCapture, generate_small, write_capture, write_inventory_yaml
from vspan_testing.tshark import SHARED_PCAPS

FLOW_KEY = ["src_ip", "dst_ip", "src_port", "dst_port", "proto"]


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthCapture, Path, Path]:
    folder = tmp_path_factory.mktemp("dc")
    cap = generate_small(seed=3)
    write_capture(cap, folder / "dc.pcapng")
    write_inventory_yaml(cap, folder / "dc.yaml")
    return cap, folder / "dc.pcapng", folder / "dc.yaml"


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    icmp = out["proto"].isin([1, 58])
    # The truth keys echo flows by identifier with ports 0; vspan reports icmp_id.
    out.loc[icmp, ["src_port", "dst_port"]] = 0
    out["src_port"] = out["src_port"].fillna(0).astype("int64")
    out["dst_port"] = out["dst_port"].fillna(0).astype("int64")
    out["proto"] = out["proto"].astype("int64")
    return out.set_index(FLOW_KEY).sort_index()


def _texts(values: pd.Series) -> list[object]:
    """Values with every kind of missing (None, NaN, NA) as None."""
    return [None if pd.isna(v) else v for v in values]


def test_flows_equal_the_ground_truth(dc: tuple[SynthCapture, Path, Path]) -> None:
    cap, capture, inventory = dc
    report = analyze_captures([capture], inventory=Inventory.load(str(inventory)))
    ours, truth = _keyed(report.flows), _keyed(cap.truth)
    assert len(ours) == len(truth)
    assert ours.index.equals(truth.index)
    for col in (
        "packets",
        "bytes",
        "packets_rev",
        "bytes_rev",
        "tcp_flags",
        "tcp_flags_rev",
        "first_ns",
        "last_ns",
        "copies",
    ):
        # TCP flags exist for TCP flows only (vspan reports null for the others).
        rows = truth.index.get_level_values("proto") == 6 if col.startswith("tcp") else slice(None)
        assert ours.loc[rows, col].astype("int64").tolist() == truth.loc[rows, col].tolist(), col
    assert ours.loc[truth.index.get_level_values("proto") != 6, "tcp_flags"].isna().all()
    for col in ("src_vm", "dst_vm", "src_host", "dst_host", "scope"):
        assert _texts(ours[col]) == _texts(truth[col]), col
    assert _texts(ours["vlan"]) == _texts(truth["vlan"])
    echo = truth["icmp_id"].notna()
    assert ours.loc[echo, "icmp_id"].tolist() == truth.loc[echo, "icmp_id"].tolist()


def test_without_inventory_the_tags_still_tell_vms_and_scope(
    dc: tuple[SynthCapture, Path, Path],
) -> None:
    cap, capture, _ = dc
    ours, truth = _keyed(analyze_captures([capture]).flows), _keyed(cap.truth)
    assert ours.index.equals(truth.index)
    assert ours["scope"].tolist() == truth["scope"].tolist()
    assert ours["packets"].tolist() == truth["packets"].tolist()
    assert _texts(ours["src_host"]) == _texts(truth["src_host"])
    # A VM's vif on the observing host, 0 when the endpoint is on another host or outside.
    vif = {v.name: v.vif for v in cap.vms}
    host = {v.name: v.host for v in cap.vms}
    want = [
        vif[vm] if vm is not None and host[vm] == h else 0
        for vm, h in zip(_texts(truth["src_vm"]), ours["host"], strict=True)
    ]
    assert ours["src_vif"].tolist() == want


def test_chunked_reading_gives_the_same_flows(dc: tuple[SynthCapture, Path, Path]) -> None:
    _, capture, inventory = dc
    inv = Inventory.load(str(inventory))
    whole = analyze_captures([capture], inventory=inv).flows
    chunked = analyze_captures([capture], inventory=inv, chunk_bytes=4096).flows
    pd.testing.assert_frame_equal(_keyed(whole), _keyed(chunked))


def test_json_output_has_the_documented_keys(
    dc: tuple[SynthCapture, Path, Path], tmp_path: Path
) -> None:
    cap, capture, inventory = dc
    out = tmp_path / "flows.json"
    status = main(
        ["report", str(capture), "--inventory", str(inventory), "--format", "json", "-o", str(out)]
    )
    assert status == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    assert len(rows) == len(cap.truth)
    documented = {
        "src_vm",
        "dst_vm",
        "src_vif",
        "dst_vif",
        "host",
        "scope",
        "vlan",
        "proto",
        "src_ip",
        "dst_ip",
        "src_port",
        "dst_port",
        "packets",
        "bytes",
        "packets_rev",
        "bytes_rev",
        "first",
        "last",
        "tcp_flags",
        "tcp_flags_rev",
    }
    for row in rows:
        assert documented <= set(row)
        assert isinstance(row["src_vif"], int)
        assert row["vlan"] is None or isinstance(row["vlan"], int)
        assert isinstance(row["proto"], int)
        assert row["first"].endswith("Z")
    # Sorted by bytes, both directions, descending.
    totals = [r["bytes"] + r["bytes_rev"] for r in rows]
    assert totals == sorted(totals, reverse=True)


@pytest.mark.parametrize("by", ["vm", "vm-pair", "host-pair", "protocol"])
def test_groupings_add_up_to_the_flows(
    dc: tuple[SynthCapture, Path, Path], tmp_path: Path, by: str
) -> None:
    cap, capture, inventory = dc
    out = tmp_path / "g.json"
    assert (
        main(
            [
                "report",
                str(capture),
                "--inventory",
                str(inventory),
                "--by",
                by,
                "--format",
                "json",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    truth = cap.truth
    packets = int((truth["packets"] + truth["packets_rev"]).sum())
    factor = 2 if by == "vm" else 1  # each flow counts for both of its VMs
    assert sum(r["packets"] for r in rows) == factor * packets
    assert sum(r["flows"] for r in rows) == factor * len(truth)
    if by == "host-pair":
        intra = {(r["host_a"], r["host_b"]) for r in rows if r["scope"] == "intra-host"}
        assert all(a == b for a, b in intra)


def test_top_and_csv(dc: tuple[SynthCapture, Path, Path], tmp_path: Path) -> None:
    _, capture, inventory = dc
    out = tmp_path / "top.csv"
    assert (
        main(
            [
                "report",
                str(capture),
                "--inventory",
                str(inventory),
                "--by",
                "vm",
                "--top",
                "3",
                "--sort",
                "packets",
                "--format",
                "csv",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    table = pd.read_csv(out)
    assert len(table) == 3
    assert table["packets"].is_monotonic_decreasing


def test_parquet_round_trips(dc: tuple[SynthCapture, Path, Path], tmp_path: Path) -> None:
    cap, capture, inventory = dc
    out = tmp_path / "flows.parquet"
    assert (
        main(
            [
                "report",
                str(capture),
                "--inventory",
                str(inventory),
                "--format",
                "parquet",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert len(pd.read_parquet(out)) == len(cap.truth)


def test_a_corrupt_file_is_reported_partial_and_keeps_what_came_before(
    dc: tuple[SynthCapture, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, capture, _ = dc
    data = capture.read_bytes()
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(data[: len(data) // 2 + 5])  # ends in the middle of a block
    status = main(["report", str(cut), "--format", "json", "-o", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert status == 1
    assert "PARTIAL" in err
    assert str(cut) in err
    assert "byte offset" in err
    assert json.loads((tmp_path / "o.json").read_text())  # flows from the first half


@pytest.mark.skipif(not SHARED_PCAPS.is_dir(), reason="../shared/pcaps is not beside the repo")
def test_undecodable_frames_are_summarised_not_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    # plain__zeek__ip4-trunc.pcap: one frame, 20 bytes captured of 46: the IPv4 header is cut.
    path = SHARED_PCAPS / "plain__zeek__ip4-trunc.pcap"
    assert main(["report", str(path), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert "not decodable: 1 frames truncated at IP" in captured.err


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vspan.cli", "report", str(tmp_path / "missing.pcap")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "no such capture file" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts: [\n")
    cap = tmp_path / "x.pcap"
    cap.write_bytes(b"")
    assert main(["report", str(cap), "--inventory", str(bad)]) == 2
