"""``vspan report`` of several captures: one capture-time order, whatever the file order."""

from __future__ import annotations

import io
import itertools
import json
import struct
import subprocess
import sys
from pathlib import Path

import dpkt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.report import analyze_captures, time_merge
from vspan.cli.report import _summary
from vspan.inventory import Inventory
from vspan.pcap.write import PcapngWriter
from vspan.synth import SynthCapture, generate_small, write_inventory_yaml
from vspan_testing.decoded import decoded
from vspan_testing.tshark import SHARED_PCAPS

DAY_S = 86_400
WIKIPEDIA = SHARED_PCAPS / "plain__zeek__wikipedia.pcap"


def shifted(src: Path, dst: Path, seconds: int) -> None:
    """A classic pcap with every record's time moved by ``seconds`` (its bytes otherwise)."""
    data = bytearray(src.read_bytes())
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<"}.get(bytes(data[:4]), ">")
    pos = 24
    while pos + 16 <= len(data):
        sec, _, caplen, _ = struct.unpack_from(order + "IIII", data, pos)
        struct.pack_into(order + "I", data, pos, sec + seconds)
        pos += 16 + caplen
    dst.write_bytes(bytes(data))


def report(*paths: Path, extra: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """``vspan report PATHS --format json`` run as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "vspan.cli", "report", *map(str, paths), "--format", "json",
         "--no-progress", *extra],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def _moved(row: dict[str, object], ns: int = 0) -> str:
    """A flow record as text, ``ns`` later (its number in the report left out)."""
    kept = {k: v for k, v in row.items() if k not in ("flow_id", "first", "last")}
    kept["first_ns"] = int(str(row["first_ns"])) + ns
    kept["last_ns"] = int(str(row["last_ns"])) + ns
    return json.dumps(kept, sort_keys=True)


@pytest.mark.skipif(not WIKIPEDIA.is_file(), reason="../shared/pcaps is not beside the repo")
def test_a_capture_and_its_copy_a_day_later_give_the_same_flows_in_either_order(
    tmp_path: Path,
) -> None:
    # The case: 38 flows one way, 76 the other, one of them 86,406 s long although
    # the active timeout is 300 s.
    later = tmp_path / "later.pcap"
    shifted(WIKIPEDIA, later, DAY_S)
    alone = report(WIKIPEDIA)
    forward, backward = report(WIKIPEDIA, later), report(later, WIKIPEDIA)
    assert forward == backward
    assert max(float(str(r["duration_s"])) for r in forward) <= 300
    # Each day's flows are those of the capture alone, the second day's a day later.
    day = 1_000_000_000 * DAY_S
    expected = sorted([_moved(r) for r in alone] + [_moved(r, day) for r in alone])
    assert sorted(_moved(r) for r in forward) == expected


def per_host_files(cap: SynthCapture, folder: Path) -> list[Path]:
    """The generated datacenter's frames as one pcapng per host (what each collector saw)."""
    paths = []
    iface = cap.frames.iface_column()
    for k, host in enumerate(cap.hosts):
        path = folder / f"{host.name}.pcapng"
        with open(path, "wb") as fh:
            writer = PcapngWriter(fh)
            writer.add_interface(name=host.name)
            writer.write_batch(cap.frames, iface=0, index=np.flatnonzero(iface == k))
        paths.append(path)
    return paths


FLOW = ["src_ip", "dst_ip", "src_port", "dst_port", "proto"]
COUNTS = ["packets", "bytes", "packets_rev", "bytes_rev", "first_ns", "last_ns"]


def rows(flows: pd.DataFrame) -> list[tuple[object, ...]]:
    """(key, counts) of each flow, ICMP keyed by ports 0 as the ground truth has it."""
    f = flows.copy()
    f.loc[f["proto"].isin([1, 58]), ["src_port", "dst_port"]] = 0
    return sorted(
        tuple(v if isinstance(v, str) else int(v) for v in row)
        for row in f[FLOW + COUNTS].itertuples(index=False)
    )


def test_one_capture_per_host_gives_the_ground_truth_whatever_the_order(tmp_path: Path) -> None:
    cap = generate_small(seed=5)
    write_inventory_yaml(cap, tmp_path / "dc.yaml")
    inventory = Inventory.load(str(tmp_path / "dc.yaml"))
    files = per_host_files(cap, tmp_path)
    truth = rows(cap.truth)
    results = []
    for order, chunk in ((files, 64 << 20), (files[::-1], 4096), (files[1:] + files[:1], 20_000)):
        flows = analyze_captures(order, inventory=inventory, chunk_bytes=chunk).flows
        assert rows(flows) == truth
        results.append(flows)
    for other in results[1:]:
        pd.testing.assert_frame_equal(results[0], other)


def test_a_record_far_out_of_order_in_a_file_is_a_flow_of_its_own_counted_and_said(
    tmp_path: Path,
) -> None:
    # Ten datagrams of one flow, then one two minutes older than the first (more than the
    # idle timeout): read a record a chunk, it comes when the flow is open; it must not
    # stretch it back two minutes, nor be lost, and is said. (Since each host has its own
    # clock, the host's time going back gives it a new clock, counted, instead of making
    # every frame from there a late flow of its own.)
    path = tmp_path / "late.pcap"
    with open(path, "wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for t in [*range(1000, 1010), 880]:
            udp = dpkt.udp.UDP(sport=5000, dport=53, data=b"x")
            ip = dpkt.ip.IP(src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2]), p=17, data=udp)
            writer.writepkt(bytes(dpkt.ethernet.Ethernet(data=ip)), ts=1_700_000_000 + t)
    report = analyze_captures([path], chunk_bytes=100)
    assert sorted(report.flows["packets"].tolist()) == [1, 10]
    assert (report.flow_counters["clock_resets"], report.flow_counters["late_frames"]) == (1, 0)
    err = io.StringIO()
    _summary(report, err)
    assert "1 times a host's capture time went back by more than the idle timeout" in err.getvalue()
    # Read whole, the file is put in time order first: the same two flows (two minutes
    # apart), and no frame late.
    whole = analyze_captures([path])
    assert sorted(whole.flows["packets"].tolist()) == [1, 10]
    assert whole.flow_counters["late_frames"] == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 50), max_size=40), st.lists(st.integers(1, 39))),
        min_size=1,
        max_size=4,
    )
)
def test_time_merge_gives_every_frame_once_in_time_order(
    sources: list[tuple[list[int], list[int]]],
) -> None:
    # Each source: its times (in time order, as a capture file is) cut into chunks anywhere.
    # Frame ids ride in ``wirelen``: the merge must give (time, source, position) order.
    chunked, want = [], []
    for s, (unsorted, cuts) in enumerate(sources):
        times = sorted(unsorted)
        ids = [s * 1000 + i for i in range(len(times))]
        want += [(t, s, i) for t, i in zip(times, ids, strict=True)]
        dec = decoded(len(times), ts_ns=times, wirelen=ids)
        bounds = [0, *sorted({c for c in cuts if c < len(times)}), len(times)]
        chunked.append(iter([dec.take(np.arange(a, b)) for a, b in itertools.pairwise(bounds)]))
    got = [
        (int(t), int(i) // 1000, int(i))
        for part in time_merge(chunked)
        for t, i in zip(part.ts_ns, part.wirelen, strict=True)
    ]
    assert got == sorted(want)
