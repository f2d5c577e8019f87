"""``vspan export`` as a user runs it, without an inventory: every frame of a VM (both copies
of its cross-host packets), in capture-time order, checked with tshark against an
independent selection of the ring's frames by the VM's MAC."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vspan.analysis.decode import decode_batch
from vspan.analysis.ring.ring import PacketRing
from vspan.batch import FrameBatch
from vspan.synth import SynthCapture, generate_small
from vspan_testing.tshark import fields, needs_tshark

pytestmark = [pytest.mark.tshark, needs_tshark]

FIELDS = ["frame.time_epoch", "frame.len", "eth.src", "eth.dst", "frame.interface_name"]


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthCapture, Path]:
    """A ring written the way a live analyzer receives frames: each host's collector sends
    on its own, here one host after the other, so the segments overlap in time; small
    segments, so that there are many. The ring knows the VMs (from the collectors'
    registrations); the export below is given no inventory."""
    cap = generate_small(seed=8)
    data = tmp_path_factory.mktemp("data")
    frames, dec = cap.frames, decode_batch(cap.frames)
    ring = PacketRing(data / "ring", segment_bytes=32 << 10, inventory=cap.inventory())
    ring.start()
    for host in np.unique(frames.host).tolist():
        mine = np.flatnonzero(frames.host == host)
        for lo in range(0, mine.size, 200):
            rows = mine[lo : lo + 200]
            batch = FrameBatch(
                data=frames.data, offset=frames.offset[rows], caplen=frames.caplen[rows],
                origlen=frames.origlen[rows], ts_ns=frames.ts_ns[rows],
                linktype=frames.linktype[rows], host=frames.host[rows],
            )  # fmt: skip
            ring.append(batch, dec.take(rows))
    ring.stop()
    return cap, data


def export(data: Path, out: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vspan.cli", "export", *args, "-o", str(out), "--data-dir",
         str(data)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return result.stdout


def ring_frames(data: Path, display_filter: str | None = None) -> list[list[str]]:
    """tshark's fields of the ring's frames (every segment) that ``display_filter`` keeps."""
    out: list[list[str]] = []
    for segment in sorted((data / "ring").glob("ring-*.pcapng")):
        out += fields(segment, FIELDS, display_filter=display_filter)
    return out


def in_time_order(rows: list[list[str]]) -> bool:
    times = [int(r[0].replace(".", "")) for r in rows]  # ns, as tshark prints them
    return all(a <= b for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("name", ["web-01", "db-01", "app-02"])
def test_export_by_vm_without_inventory_has_every_frame_of_the_vm_in_time_order(
    ring: tuple[SynthCapture, Path], name: str
) -> None:
    cap, data = ring
    vm = next(v for v in cap.vms if v.name == name)
    out = data / f"{name}.pcapng"
    summary = export(data, out, "--vm", name)
    got = fields(out, FIELDS)
    want = ring_frames(data, f"eth.addr == {vm.mac}")
    assert sorted(map(tuple, got)) == sorted(map(tuple, want))
    # Among them the copies the peer hosts captured, which name the VM by MAC only.
    assert any(not r[4].startswith(f"{vm.host}/") for r in got)
    assert in_time_order(got)
    assert f"{len(want):,} frames written" in summary


def test_an_export_of_everything_is_the_capture_in_time_order(
    ring: tuple[SynthCapture, Path],
) -> None:
    cap, data = ring
    out = data / "all.pcapng"
    export(data, out)
    got = fields(out, FIELDS)
    assert len(got) == len(cap.frames)
    assert in_time_order(got)
    assert not in_time_order(ring_frames(data))  # the ring itself is not
    order = np.argsort(cap.frames.ts_ns, kind="stable")
    assert [int(r[1]) for r in got] == cap.frames.origlen[order].tolist()
