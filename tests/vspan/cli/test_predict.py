"""``vspan predict`` through the command line against a real store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.store.store import Store
from vspan.cli import main

HOUR = 3600 * 10**9
PLACEMENT = {"web-01": "hv01", "web-02": "hv02", "db-01": "hv02", "app-01": "hv01"}
PAIRS = [("web-01", "db-01"), ("web-02", "db-01"), ("app-01", "web-02")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three weeks of hourly flows with a daily rhythm between four VMs on two hosts."""
    rng = np.random.default_rng(1)
    start = 1_767_571_200 * 10**9
    rows = []
    for h in range(24 * 21):
        for s, d in PAIRS:
            b = int(1e6 * (1 + np.sin(2 * np.pi * h / 24) ** 2) * rng.lognormal(0, 0.1))
            same = PLACEMENT[s] == PLACEMENT[d]
            rows.append({
                "src_vm": s, "dst_vm": d, "src_host": PLACEMENT[s], "dst_host": PLACEMENT[d],
                "scope": "intra-host" if same else "cross-host", "packets": b // 1000,
                "bytes": b, "packets_rev": b // 2000, "bytes_rev": b // 2,
                "first_ns": start + h * HOUR + 60 * 10**9,
                "last_ns": start + h * HOUR + 1800 * 10**9,
            })  # fmt: skip
    flows = pd.DataFrame(rows)
    flows.insert(0, "flow_id", np.arange(1, len(flows) + 1))
    flows["ethertype"] = 0x0800
    flows["copies"] = flows["packets"] + flows["packets_rev"]
    flows["first"] = pd.to_datetime(flows["first_ns"], unit="ns", utc=True)
    flows["last"] = pd.to_datetime(flows["last_ns"], unit="ns", utc=True)
    flows["duration_s"] = (flows["last_ns"] - flows["first_ns"]) / 1e9
    folder = tmp_path_factory.mktemp("predict")
    with Store(folder, retention_days=None) as store:
        store.append_flows(flows)
    return folder


def test_whatif_moving_a_vm_next_to_its_peer(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", "whatif", "--data-dir", str(data_dir), "--move", "web-01=hv02"]
    assert main([*argv, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    moved = {(p["src"], p["dst"]): p for p in report["vm pairs"]}
    # web-01 (hv01) and db-01 (hv02) talk both ways: moving web-01 to hv02 takes that
    # traffic off the wire, and the hv01<->hv02 pairs lose exactly those bytes.
    for pair in (("web-01", "db-01"), ("db-01", "web-01")):
        assert moved[pair]["change"] == "to-intra-host"
    hosts = {(p["src"], p["dst"]): p for p in report["host pairs"]}
    assert hosts[("hv01", "hv02")]["bytes_delta"] == pytest.approx(
        -moved[("web-01", "db-01")]["bytes"]
    )
    assert hosts[("hv02", "hv01")]["bytes_delta"] == pytest.approx(
        -moved[("db-01", "web-01")]["bytes"]
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["forecast", "--horizon", "3"],
        ["forecast", "--backtest", "--format", "csv"],
        ["place", "--max-vms-per-host", "3", "--anti-affinity", "web-01,web-02"],
        ["place", "--pin", "web-01", "--pin", "db-01", "--format", "csv"],
    ],
)
def test_each_action_runs_on_a_real_store(data_dir: Path, argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["predict", *argv, "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out.strip()
