"""Export from the packet ring, checked with tshark on the exported files against the
simulator's ground truth: which frames (by flow, VM, host, address, port and time), their
interfaces, comments and tags."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import NAMESPACE_DNS, uuid5

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.decode import decode_batch
from vspan.analysis.report import analyze_captures
from vspan.analysis.ring.export import ExportError, ExportResult, export
from vspan.analysis.ring.index import frame_vifs
from vspan.analysis.ring.ring import PacketRing
from vspan.analysis.store.store import Store
from vspan.batch import FrameBatch
from vspan.synth import SynthCapture, SynthVm, generate_small, write_capture
from vspan_testing.tshark import fields, needs_tshark

pytestmark = [pytest.mark.tshark, needs_tshark]

FIELDS = [
    "frame.interface_name",
    "frame.comment",
    "vntag.src",
    "vntag.dst",
    "eth.src",
    "eth.dst",
    "ip.src",
    "ip.dst",
    "frame.len",
]
Row = dict[str, str]


def verdict(i: int) -> str | None:
    return f"allow rule-{i % 3}" if i % 2 else None


def part(frames: FrameBatch, rows: np.ndarray[Any, Any]) -> FrameBatch:
    """Rows of a batch as a batch of their own (sharing the buffer)."""
    return FrameBatch(
        data=frames.data,
        offset=frames.offset[rows],
        caplen=frames.caplen[rows],
        origlen=frames.origlen[rows],
        ts_ns=frames.ts_ns[rows],
        linktype=frames.linktype[rows],
        host=frames.host[rows],
    )


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthCapture, Path, pd.DataFrame]:
    """A data directory with a ring of ~40 segments and the store's flows."""
    cap = generate_small(seed=4)
    data = tmp_path_factory.mktemp("data")
    frames, dec = cap.frames, decode_batch(cap.frames)
    ring = PacketRing(data / "ring", segment_bytes=64 << 10, inventory=cap.inventory())
    ring.start()
    for lo in range(0, len(frames), 250):
        rows = np.arange(lo, min(lo + 250, len(frames)))
        ring.append(part(frames, rows), dec.take(rows), verdicts=[verdict(int(i)) for i in rows])
    ring.stop()
    write_capture(cap, data / "all.pcapng")
    flows = analyze_captures([data / "all.pcapng"], inventory=cap.inventory()).flows
    with Store(data) as store:
        store.append_flows(flows, inventory=cap.inventory())
        stored = store.query_flows(limit=None, order="flow_id")
    return cap, data, stored


def run(
    ring: tuple[SynthCapture, Path, pd.DataFrame], name: str, **kw: Any
) -> tuple[ExportResult, list[Row]]:
    cap, data, _ = ring
    out = data / name
    result = export(data, out, inventory=cap.inventory(), **kw)
    rows = [dict(zip(FIELDS, r, strict=True)) for r in fields(out, FIELDS)]
    assert result.frames_written == len(rows)
    assert result.segments_scanned + result.segments_skipped == len(
        list((data / "ring").glob("*.pcapng"))
    )
    assert result.errors == []
    return result, rows


def vm(cap: SynthCapture, name: str) -> SynthVm:
    return next(v for v in cap.vms if v.name == name)


def truth_frames(
    cap: SynthCapture, flows: pd.Series, since: int | None = None, until: int | None = None
) -> np.ndarray[Any, Any]:
    """Frame numbers of the ground-truth flows selected by ``flows`` (a mask of the truth)."""
    mask = np.isin(cap.flow, np.flatnonzero(flows.to_numpy()))
    ts = cap.frames.ts_ns
    if since is not None:
        mask &= ts >= since
    if until is not None:
        mask &= ts < until
    return np.flatnonzero(mask)


def test_export_by_vm_has_its_frames_and_nothing_else(
    ring: tuple[SynthCapture, Path, pd.DataFrame],
) -> None:
    cap = ring[0]
    web = vm(cap, "web-01")
    result, rows = run(ring, "web.pcapng", vm="web-01")
    want = truth_frames(cap, (cap.truth.src_vm == "web-01") | (cap.truth.dst_vm == "web-01"))
    assert len(rows) == len(want) > 50
    assert all(web.mac in (r["eth.src"], r["eth.dst"]) for r in rows)
    assert all("web-01" in r["frame.comment"] for r in rows)
    names = {r["frame.interface_name"] for r in rows}
    assert f"{web.host}/web-01" in names
    assert all(n.split("/")[0] in {h.name for h in cap.hosts} for n in names)
    assert result.segments_skipped > 0  # web-01 is not in every segment


def test_export_keeps_the_verdicts_as_comments(
    ring: tuple[SynthCapture, Path, pd.DataFrame],
) -> None:
    cap = ring[0]
    _, rows = run(ring, "web-verdicts.pcapng", vm="web-01")
    want = truth_frames(cap, (cap.truth.src_vm == "web-01") | (cap.truth.dst_vm == "web-01"))
    for frame, row in zip(want.tolist(), rows, strict=True):
        note = verdict(frame)
        assert row["frame.comment"].endswith(f"; verdict: {note}") == (note is not None)


def test_a_narrow_time_range_skips_segments(ring: tuple[SynthCapture, Path, pd.DataFrame]) -> None:
    cap = ring[0]
    touching = (cap.truth.src_vm == "web-01") | (cap.truth.dst_vm == "web-01")
    frames = truth_frames(cap, touching)
    middle = int(cap.frames.ts_ns[frames[len(frames) // 2]])
    since, until = middle - 150 * 10**6, middle + 150 * 10**6
    result, rows = run(ring, "slice.pcapng", vm="web-01", since=since, until=until)
    assert len(rows) == len(truth_frames(cap, touching, since, until)) > 0
    assert result.segments_scanned <= 3
    assert result.segments_skipped > 30
    _, all_rows = run(ring, "slice-all.pcapng", since=since, until=until)
    in_range = np.flatnonzero((cap.frames.ts_ns >= since) & (cap.frames.ts_ns < until))
    assert len(all_rows) == len(in_range)


def test_strip_tag_gives_the_same_ip_packets_untagged(
    ring: tuple[SynthCapture, Path, pd.DataFrame],
) -> None:
    _, tagged = run(ring, "db.pcapng", vm="db-01")
    _, plain = run(ring, "db-plain.pcapng", vm="db-01", strip_tag=True)
    assert all(r["vntag.src"] == "" and r["vntag.dst"] == "" for r in plain)
    assert all(r["vntag.src"] != "" for r in tagged)
    key = ["ip.src", "ip.dst", "eth.src", "eth.dst", "frame.comment", "frame.interface_name"]
    assert [[r[k] for k in key] for r in plain] == [[r[k] for k in key] for r in tagged]
    assert [int(r["frame.len"]) for r in plain] == [int(r["frame.len"]) - 6 for r in tagged]


def test_classic_pcap_keeps_tags_unless_stripped(
    ring: tuple[SynthCapture, Path, pd.DataFrame],
) -> None:
    _, ng = run(ring, "app.pcapng", vm="app-02")
    _, pcap = run(ring, "app.pcap", vm="app-02", fmt="pcap")
    _, bare = run(ring, "app-bare.pcap", vm="app-02", fmt="pcap", strip_tag=True)
    same = ["vntag.src", "vntag.dst", "ip.src", "ip.dst", "frame.len"]
    assert [[r[k] for k in same] for r in pcap] == [[r[k] for k in same] for r in ng]
    assert all(r["vntag.src"] == "" for r in bare)
    assert len(bare) == len(pcap)


def test_export_by_host(ring: tuple[SynthCapture, Path, pd.DataFrame]) -> None:
    cap = ring[0]
    _, rows = run(ring, "hv03.pcapng", host="hv03")
    assert len(rows) == int((cap.frames.host == 3).sum())
    assert all(r["frame.interface_name"].startswith("hv03/") for r in rows)
    _, by_id = run(ring, "hv03-id.pcapng", host=3)
    assert len(by_id) == len(rows)


def test_export_by_ip_and_port(ring: tuple[SynthCapture, Path, pd.DataFrame]) -> None:
    cap = ring[0]
    app = vm(cap, "app-01")
    _, rows = run(ring, "ip.pcapng", ip=app.ipv4)
    truth = cap.truth
    assert len(rows) == len(
        truth_frames(cap, (truth.src_ip == app.ipv4) | (truth.dst_ip == app.ipv4))
    )
    assert all(app.ipv4 in (r["ip.src"], r["ip.dst"]) for r in rows)
    port = int(truth.loc[truth.proto == 6, "dst_port"].mode()[0])
    _, by_port = run(ring, "port.pcapng", port=port)
    ported = (
        (truth.proto != 1)
        & (truth.proto != 58)
        & ((truth.src_port == port) | (truth.dst_port == port))
    )
    assert len(by_port) == len(truth_frames(cap, ported)) > 0


def test_export_one_flow_by_uid_and_by_id(ring: tuple[SynthCapture, Path, pd.DataFrame]) -> None:
    _, data, flows = ring
    tcp = flows[(flows.proto == 6) & (flows.scope == "cross-host")]
    record = tcp.iloc[int(np.argmax(tcp["copies"].to_numpy()))]
    _, rows = run(ring, "flow.pcapng", flow=str(record["flow_uid"]))
    assert len(rows) == int(record["copies"])
    assert {(r["ip.src"], r["ip.dst"]) for r in rows} == {
        (record["src_ip"], record["dst_ip"]),
        (record["dst_ip"], record["src_ip"]),
    }
    with Store(data, read_only=True) as store:
        _, by_id = run(ring, "flow-id.pcapng", flow=int(record["flow_id"]), store=store)
    assert len(by_id) == len(rows)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"vm": "nosuch-01"}, "unknown VM 'nosuch-01': not in the inventory nor in the ring"),
        ({"host": "hv99"}, "unknown host 'hv99': not in the inventory nor in the ring"),
        ({"flow": "00000000-0000-0000-0000-000000000000"}, "no flow matches"),
        ({"fmt": "erf"}, "unknown capture format 'erf', expected 'pcapng' or 'pcap'"),
    ],
)
def test_impossible_exports_say_why(
    ring: tuple[SynthCapture, Path, pd.DataFrame], filters: dict[str, Any], message: str
) -> None:
    cap, data, _ = ring
    with pytest.raises(ExportError, match=message):
        export(data, data / "never.pcapng", inventory=cap.inventory(), **filters)


def test_a_reused_vif_belongs_to_the_vm_that_had_it(
    ring: tuple[SynthCapture, Path, pd.DataFrame], tmp_path: Path
) -> None:
    """web-01's port is labelled as VM "old" for the first half of the capture and as VM
    "new" for the second (a migration away, then another VM, with a MAC of its own, given
    the same vif); without an inventory, each export gets the frames of its own half only —
    both copies of each packet, the peer host's too (those name the VM by MAC only)."""
    cap = ring[0]
    web = vm(cap, "web-01")
    host = next(h.collector_id for h in cap.hosts if h.name == web.host)
    half = len(cap.frames) // 2
    old_mac, new_mac = bytes.fromhex(web.mac.replace(":", "")), bytes.fromhex("02ee00000001")
    frames = cap.frames
    data = frames.data.copy()
    for at in frames.offset[half:].tolist():  # the new VM's frames carry its own MAC
        for field in (slice(at, at + 6), slice(at + 6, at + 12)):
            if data[field].tobytes() == old_mac:
                data[field] = np.frombuffer(new_mac, np.uint8)
    frames = FrameBatch(data=data, offset=frames.offset, caplen=frames.caplen,
                        origlen=frames.origlen, ts_ns=frames.ts_ns, linktype=frames.linktype,
                        host=frames.host)  # fmt: skip
    dec = decode_batch(frames)
    at_port = (frames.host == host) & (frame_vifs(dec) == web.vif)
    store = PacketRing(tmp_path / "ring", segment_bytes=256 << 10)
    for label, rows in (("old", np.arange(half)), ("new", np.arange(half, len(frames)))):
        store.start()
        mark = at_port[rows]
        names = np.where(mark, f"{label}-vm", None)
        uuids = np.where(mark, str(uuid5(NAMESPACE_DNS, label)), None)
        store.append(part(frames, rows), dec.take(rows), vm_names=names, vm_uuids=uuids)
        store.stop()  # the move: the next frames start a new segment
    touching = (cap.truth.src_vm == "web-01") | (cap.truth.dst_vm == "web-01")
    mine = np.zeros(len(frames), np.bool_)
    mine[truth_frames(cap, touching)] = True
    for label, rows, mac in (
        ("old", mine[:half], web.mac),
        ("new", mine[half:], "02:ee:00:00:00:01"),
    ):
        result = export(tmp_path, tmp_path / f"{label}.pcapng", vm=f"{label}-vm")
        got = fields(tmp_path / f"{label}.pcapng", ["eth.src", "eth.dst"])
        assert result.frames_written == len(got) == int(rows.sum()) > 0
        assert all(mac in pair for pair in got)
