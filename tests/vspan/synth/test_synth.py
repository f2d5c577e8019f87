"""The synthetic capture generator: determinism, frame validity, ground truth, files."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import dpkt
import numpy as np
import pandas as pd
import pytest

from vspan.inventory import Inventory
from vspan.synth import SynthCapture, generate, generate_small, write_capture, write_inventory_yaml
from vspan.wire.vntag import decode_vntag


@pytest.fixture(scope="module")
def small() -> SynthCapture:
    return generate_small(7)


@pytest.fixture(scope="module")
def medium() -> SynthCapture:
    return generate(packets=60_000, flows=1500, hosts=5, vms=60, seed=3)


def _parse(frame: bytes) -> dict[str, object]:
    """An independent decode: tag bytes by the spec's masks, IP and L4 by dpkt."""
    assert frame[12:14] == b"\x89\x26"
    (word,) = struct.unpack_from("!I", frame, 14)
    out: dict[str, object] = {
        "d": word >> 31,
        "p": (word >> 30) & 1,
        "dvif": (word & 0x3FFF0000) >> 16,
        "l": (word >> 15) & 1,
        "version": (word >> 12) & 3,
        "svif": word & 0xFFF,
        "dst_mac": frame[0:6].hex(),
        "src_mac": frame[6:12].hex(),
        "vlan": None,
    }
    tag = decode_vntag(frame, 14)
    assert (tag.d, tag.dvif, tag.svif) == (out["d"], out["dvif"], out["svif"])
    etype, pos = tag.ethertype, 20
    if etype == 0x8100:
        tci, etype = struct.unpack_from("!HH", frame, 20)
        out["vlan"], pos = tci & 0xFFF, 24
    raw = frame[pos:]
    if etype == 0x0800:
        ip = dpkt.ip.IP(raw)
        assert ip.len == len(raw)
        assert ip.hl == 5
        assert dpkt.in_cksum(raw[:20]) == 0
        pseudo = raw[12:20] + struct.pack("!BBH", 0, ip.p, len(raw) - 20)
        l4 = raw[20:]
    else:
        assert etype == 0x86DD
        ip = dpkt.ip6.IP6(raw)
        assert ip.plen == len(raw) - 40
        pseudo = raw[8:40] + struct.pack("!IxxxB", len(raw) - 40, ip.nxt)
        l4 = raw[40:]
    proto = ip.p if etype == 0x0800 else ip.nxt
    out.update(proto=proto, ipver=4 if etype == 0x0800 else 6, l4=ip.data)
    if proto in (6, 17, 58):
        assert dpkt.in_cksum(pseudo + l4) == 0
    else:
        assert dpkt.in_cksum(l4) == 0
    if proto == 6:
        assert isinstance(ip.data, dpkt.tcp.TCP)
        out.update(sport=ip.data.sport, dport=ip.data.dport, flags=ip.data.flags)
    elif proto == 17:
        assert isinstance(ip.data, dpkt.udp.UDP)
        assert ip.data.ulen == len(l4)
        out.update(sport=ip.data.sport, dport=ip.data.dport, flags=0)
    else:
        assert l4[0] in (0, 8, 128, 129)
        out.update(sport=0, dport=0, flags=0, icmp_id=struct.unpack_from("!H", l4, 4)[0])
    return out


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a, b = generate_small(11), generate_small(11)
    assert np.array_equal(a.frames.data, b.frames.data)
    assert np.array_equal(a.frames.ts_ns, b.frames.ts_ns)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    write_capture(a, tmp_path / "a.pcapng")
    write_capture(b, tmp_path / "b.pcapng")
    assert (tmp_path / "a.pcapng").read_bytes() == (tmp_path / "b.pcapng").read_bytes()


def test_different_seed_differs() -> None:
    a, b = generate_small(1), generate_small(2)
    assert a.frames.data.tobytes() != b.frames.data.tobytes()


def test_exact_frame_count_and_order(medium: SynthCapture) -> None:
    assert len(medium.frames) == 60_000
    assert len(medium.truth) == 1500
    assert np.all(np.diff(medium.frames.ts_ns) >= 0)
    _, first = np.unique(medium.flow, return_index=True)
    assert not medium.direction[first].any()  # the client speaks first: truth's src


@pytest.mark.parametrize(
    ("hosts", "vms", "extra"),
    [(1, 2, {}), (2, 3, {"ipv6_share": 0.0, "vlan_share": 0.0}), (4, 9, {"cross_host_share": 1.0,
     "intra_host_share": 0.0}), (3, 30, {"ipv6_share": 1.0, "vlan_share": 1.0})],
)  # fmt: skip
def test_other_shapes_keep_the_invariants(hosts: int, vms: int, extra: dict[str, float]) -> None:
    c = generate(packets=5001, flows=80, hosts=hosts, vms=vms, seed=5, **extra)
    t = c.truth
    assert len(c.frames) == 5001
    assert int(t.copies.sum()) == 5001
    if hosts == 1:
        assert "cross-host" not in set(t.scope)
    if extra.get("ipv6_share") == 0.0:
        assert not t.src_ip.str.contains(":").any()
        assert t.vlan.isna().all()
    vifs = [(v.host, v.vif) for v in c.vms]
    assert len(set(vifs)) == len(vifs)
    assert all(1 <= v.vif <= 4095 for v in c.vms)


def test_too_few_packets_is_an_error() -> None:
    with pytest.raises(ValueError, match="too few for 100 flows"):
        generate(packets=50, flows=100, hosts=2, vms=4, seed=0)


def test_small_covers_every_case(small: SynthCapture) -> None:
    t = small.truth
    assert set(t.scope) == {"intra-host", "cross-host", "external"}
    assert {1, 6, 17, 58} <= set(t.proto)
    assert t.vlan.notna().any()
    assert t.src_ip.str.contains(":").any()
    assert (len(small.hosts), len(small.vms)) == (3, 12)


def test_every_frame_parses_and_matches_truth(small: SynthCapture) -> None:
    vms = {v.name: v for v in small.vms}
    host_id = {h.name: h.collector_id for h in small.hosts}
    t = small.truth
    seen_flags = np.zeros((len(t), 2), dtype=np.int64)
    for i in range(len(small.frames)):
        f = _parse(small.frames.frame(i))
        row = t.iloc[int(small.flow[i])]
        back = int(small.direction[i])
        src, dst = (row.dst_vm, row.src_vm) if back else (row.src_vm, row.dst_vm)
        sport, dport = (row.dst_port, row.src_port) if back else (row.src_port, row.dst_port)
        assert (f["proto"], f["sport"], f["dport"]) == (row.proto, sport, dport)
        assert f["vlan"] == (None if pd.isna(row.vlan) else row.vlan)
        assert f["ipver"] == (6 if ":" in row.src_ip else 4)
        if row.proto in (1, 58):
            assert f["icmp_id"] == row.icmp_id
        assert f["src_mac"] == (vms[src].mac.replace(":", "") if src else "020000000001")
        assert f["dst_mac"] == (vms[dst].mac.replace(":", "") if dst else "020000000001")
        assert (f["p"], f["l"], f["version"]) == (0, 0, 0)
        if f["d"] == 0:  # seen where the sender runs
            assert f["svif"] == vms[src].vif
            local = row.scope == "intra-host"
            assert f["dvif"] == (vms[dst].vif if local else 0)
            observer = vms[src].host
        else:  # delivered from the uplink: never intra-host
            assert row.scope != "intra-host"
            assert (f["svif"], f["dvif"]) == (0, vms[dst].vif)
            observer = vms[dst].host
        assert small.frames.host[i] == host_id[observer]
        assert small.frames.iface_names[small.frames.iface[i]] == observer
        seen_flags[int(small.flow[i]), back] |= f["flags"]
    assert np.array_equal(seen_flags[:, 0], t.tcp_flags)
    assert np.array_equal(seen_flags[:, 1], t.tcp_flags_rev)


def test_truth_counts_each_packet_once(medium: SynthCapture) -> None:
    t, fr = medium.truth, medium.frames
    mult = np.where(t.scope == "cross-host", 2, 1)
    assert int(t.copies.sum()) == len(fr)
    assert np.array_equal(t.copies, (t.packets + t.packets_rev) * mult)
    length = fr.origlen.astype(np.int64)
    for back, pk, by in ((0, "packets", "bytes"), (1, "packets_rev", "bytes_rev")):
        sel = medium.direction == back
        frames = np.bincount(medium.flow[sel], minlength=len(t))
        nbytes = np.bincount(medium.flow[sel], weights=length[sel], minlength=len(t))
        assert np.array_equal(frames, t[pk] * mult)
        assert np.array_equal(nbytes, t[by] * mult)
    first = pd.Series(fr.ts_ns).groupby(medium.flow).agg(["min", "max"])
    assert np.array_equal(first["min"], t.first_ns)
    assert np.array_equal(first["max"], t.last_ns)


def test_cross_host_packets_appear_twice(medium: SynthCapture) -> None:
    fr, t = medium.frames, medium.truth
    cross = np.flatnonzero((t.scope == "cross-host").to_numpy()[medium.flow])
    sides: dict[tuple[int, int, int], list[tuple[bytes, int, int, int]]] = {}
    for i in cross:
        frame = fr.frame(int(i))
        (word,) = struct.unpack_from("!I", frame, 14)
        key = (int(medium.flow[i]), int(medium.direction[i]), word >> 31)
        sides.setdefault(key, []).append((frame[18:], word, int(fr.host[i]), int(fr.ts_ns[i])))
    checked = 0
    for (flow, back, d), sent in sides.items():
        if d == 1:
            continue
        got = sides[(flow, back, 1)]
        assert sorted(x[0] for x in sent) == sorted(x[0] for x in got)  # same bytes after tag
        arrival = {body: (word, host, ts) for body, word, host, ts in got}
        for body, w0, h0, t0 in sent:
            assert (w0 >> 16) & 0x3FFF == 0
            assert w0 & 0xFFF != 0
            w1, h1, t1 = arrival[body]
            assert w1 & 0xFFF == 0
            assert (w1 >> 16) & 0x3FFF != 0
            assert h0 != h1
            if len(arrival) == len(got):  # every body unique: the pair is known
                assert 20_000 <= t1 - t0 <= 200_000
                checked += 1
    assert checked > 10_000


def test_realism(medium: SynthCapture) -> None:
    t, fr = medium.truth, medium.frames
    share = t.copies / t.copies.sum()
    assert 0.07 < share[t.src_ip.str.contains(":")].sum() < 0.13
    assert 0.07 < share[t.vlan.notna()].sum() < 0.13
    assert 600 < fr.origlen.mean() < 950
    size = t.packets + t.packets_rev
    assert size.median() < 20
    assert size.max() > 100 * size.median()
    assert t.duplicated(["src_ip", "dst_ip", "proto", "src_port", "dst_port", "icmp_id"]).sum() == 0
    span = (t.last_ns - t.first_ns) / 1e9
    assert span.max() < 250
    gaps = pd.Series(np.diff(fr.ts_ns[np.argsort(medium.flow, kind="stable")]))
    same = np.diff(np.sort(medium.flow)) == 0
    assert gaps[same].max() < 30e9
    assert {443, 8080, 5432, 6379, 53} <= set(t.dst_port)


def test_inventory_yaml_loads(small: SynthCapture, tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    write_inventory_yaml(small, path)
    inv = Inventory.load(str(path))
    assert [h.name for h in inv.hosts] == ["hv01", "hv02", "hv03"]
    for vm, loaded in zip(small.vms, inv.vms, strict=True):
        assert (loaded.name, loaded.uuid, loaded.host, loaded.profile) == (
            vm.name,
            vm.uuid,
            vm.host,
            vm.profile,
        )
        nic = loaded.nics[0]
        assert (nic.vif, nic.ips) == (vm.vif, (vm.ipv4, vm.ipv6))
        assert vm.mac.startswith("52:54:00:")
    assert small.inventory().vms == inv.vms
    assert small.inventory().hosts == inv.hosts


def _pcapng_iface_names(data: bytes) -> list[str]:
    names, pos = [], 0
    while pos < len(data):
        kind, length = struct.unpack_from("<II", data, pos)
        if kind == 1:
            opt = pos + 16
            while True:
                code, size = struct.unpack_from("<HH", data, opt)
                if code == 0:
                    break
                if code == 2:
                    names.append(data[opt + 4 : opt + 4 + size].decode())
                opt += 4 + size + (-size % 4)
        pos += length
    return names


@pytest.mark.parametrize("fmt", ["pcapng", "pcap"])
def test_capture_file_reads_back(small: SynthCapture, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"s.{fmt}"
    write_capture(small, path, fmt="pcapng" if fmt == "pcapng" else "pcap")
    with path.open("rb") as fh:
        reader = dpkt.pcapng.Reader(fh) if fmt == "pcapng" else dpkt.pcap.Reader(fh)
        got = list(reader)
    assert len(got) == len(small.frames)
    for i, (ts, buf) in enumerate(got):
        assert buf == small.frames.frame(i)
        assert abs(float(ts) - small.frames.ts_ns[i] / 1e9) < 1e-6
    if fmt == "pcapng":
        assert _pcapng_iface_names(path.read_bytes()) == ["hv01", "hv02", "hv03"]


def _tshark_conversations(path: Path) -> dict[tuple[str, ...], int]:
    out = subprocess.run(
        ["tshark", "-n", "-q", "-z", "conv,tcp", "-z", "conv,udp", "-r", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    conv: dict[tuple[str, ...], int] = {}
    proto = ""
    for line in out.splitlines():
        if "Conversations" in line:
            proto = line.split()[0]
        if "<->" not in line:
            continue
        a, _, b, *nums = line.split()
        conv[(proto, *sorted([a, b]))] = int(nums[6])
    return conv


@pytest.mark.tshark
def test_tshark_conversations_match_truth(small: SynthCapture, tmp_path: Path) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    path = tmp_path / "s.pcapng"
    write_capture(small, path)
    conv = _tshark_conversations(path)
    t = small.truth[small.truth.proto.isin([6, 17])]
    expected = {}
    for r in t.itertuples():
        ends = sorted([f"{r.src_ip}:{r.src_port}", f"{r.dst_ip}:{r.dst_port}"])
        expected[("TCP" if r.proto == 6 else "UDP", *ends)] = int(r.copies)
    assert conv == expected
