"""``vspan demo``: the main job on an embedded default.

Until the live analyzer, collectors and dashboard exist, the demo simulates a datacenter
(hosts, VMs in tiers, intra-host, cross-host and external traffic), writes the capture that
the collectors' remote SPAN would deliver (VN-tagged, both copies of cross-host packets),
and reports on it — checking the report against the simulator's ground truth.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="simulate a datacenter and report on its VM traffic",
        description="Simulate a datacenter, capture its VM traffic as vspan's collectors "
        "would (VN-tagged remote SPAN), and report per VM, VM pair and host pair.",
    )
    p.add_argument("--hosts", type=int, default=4, metavar="N", help="hypervisors (default 4)")
    p.add_argument(
        "--vms-per-host", type=int, default=12, metavar="M", help="VMs on each host (default 12)"
    )
    p.add_argument(
        "--packets",
        type=int,
        default=200_000,
        metavar="P",
        help="frames to simulate (default 200000)",
    )
    p.add_argument("--seed", type=int, default=1, help="simulation seed (default 1)")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep the capture and inventory in DIR (default: a temporary folder)",
    )
    p.set_defaults(run=run)


def _section(title: str) -> None:
    print(f"\n== {title}")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Simulate, capture, report, and check the report against the ground truth."""
    from vspan.analysis.groupings import group_flows, top
    from vspan.analysis.render import render
    from vspan.analysis.report import analyze_captures
    from vspan.errors import ConfigError
    from vspan.synth import generate, write_capture, write_inventory_yaml

    if not 1 <= args.hosts <= 64 or not 1 <= args.vms_per_host <= 500:
        raise ConfigError("--hosts must be 1..64 and --vms-per-host 1..500")
    if args.packets < 1000:
        raise ConfigError("--packets must be at least 1000")
    keep = args.data_dir is not None
    folder = Path(args.data_dir) if keep else Path(tempfile.mkdtemp(prefix="vspan-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        vms = args.hosts * args.vms_per_host
        cap = generate(
            packets=args.packets,
            flows=max(50, args.packets // 40),
            hosts=args.hosts,
            vms=vms,
            seed=args.seed,
        )
        capture, inventory = folder / "dc.pcapng", folder / "dc.inventory.yaml"
        write_capture(cap, capture)
        write_inventory_yaml(cap, inventory)
        print(
            f"vspan demo: simulated {args.hosts} hosts, {vms} VMs, {len(cap.frames):,} frames "
            f"as remote SPAN delivers them (VN-tagged; cross-host packets seen at both hosts)"
        )
        print(f"vspan demo: capture {capture}, inventory {inventory}")

        from vspan.inventory import Inventory

        report = analyze_captures([capture], inventory=Inventory.load(str(inventory)))
        flows = report.flows
        _section("Traffic by scope (intra-host traffic never reaches the physical network)")
        by_scope = flows.assign(total=flows["bytes"] + flows["bytes_rev"]).groupby("scope")
        summary = by_scope.agg(flows=("flow_id", "size"), bytes=("total", "sum")).reset_index()
        render(summary, "table")
        _section("Host pairs")
        render(top(group_flows(flows, "host-pair"), sort="bytes", n=20, by="host-pair"), "table")
        _section("Top VM pairs")
        render(top(group_flows(flows, "vm-pair"), sort="bytes", n=10, by="vm-pair"), "table")
        _section("Top flows")
        render(top(flows, sort="bytes", n=10, by="flow"), "table")

        truth = cap.truth
        want = int((truth["packets"] + truth["packets_rev"]).sum())
        got = int((flows["packets"] + flows["packets_rev"]).sum())
        _section("Check against the simulator's ground truth")
        print(
            f"flows {len(flows):,} (simulated {len(truth):,}); packets {got:,} "
            f"(simulated {want:,}, each counted once of {len(cap.frames):,} frames): "
            f"{'OK' if got == want and len(flows) == len(truth) else 'MISMATCH'}"
        )
        if keep:
            print(f"\nTry: vspan report {capture} --inventory {inventory} --by vm --top 10")
        return 0 if got == want and len(flows) == len(truth) else 1
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
