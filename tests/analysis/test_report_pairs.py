"""``vspan report`` over one capture per host: the delay between the two copies of each
cross-host packet, and the host that saw a flow's first packet, against ground truth."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import dpkt
import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.pcap.write import PcapngWriter
from vspan.synth import generate_small

US = 1_000
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000


def report(*paths: Path) -> list[dict[str, object]]:
    """``vspan report PATHS --format json`` as a user runs it, without an inventory."""
    out = subprocess.run(
        [sys.executable, "-m", "vspan.cli", "report", *map(str, paths), "--format", "json",
         "--no-progress"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def write_host(path: Path, host: str, frames: list[tuple[int, bytes]]) -> None:
    """One host's capture: a pcapng with one interface named after the host."""
    frames = sorted(frames)
    batch = FrameBatch.from_frames([f for _, f in frames], ts_ns=[t for t, _ in frames])
    with open(path, "wb") as fh:
        writer = PcapngWriter(fh)
        writer.add_interface(name=host)
        writer.write_batch(batch, iface=0)


def test_delays_and_first_hosts_of_a_generated_datacenter(tmp_path: Path) -> None:
    cap = generate_small(seed=11)
    frames = cap.frames
    iface = frames.iface_column()
    paths = []
    for k, host in enumerate(cap.hosts):
        paths.append(tmp_path / f"{host.name}.pcapng")
        with open(paths[-1], "wb") as fh:
            writer = PcapngWriter(fh)
            writer.add_interface(name=host.name)
            writer.write_batch(frames, iface=0, index=np.flatnonzero(iface == k))
    # Ground truth from the generator: every copy is kept, so a flow's mean delay is the mean
    # time of its receiver copies (VN-Tag d=1) minus that of its sender copies (d=0); the
    # flow's first packet is its first frame (frames are in time order).
    tag = np.array([frames.data[o + 14] >> 7 for o in frames.offset])
    truth = cap.truth
    want: dict[tuple[str, str, int, int], tuple[float | None, str]] = {}
    for fid, flow in truth.iterrows():
        mine = np.flatnonzero(cap.flow == fid)
        ts = frames.ts_ns[mine] - T0  # ns since 2023 would lose bits in a float mean
        delay = None
        if flow["scope"] == "cross-host":
            delay = (ts[tag[mine] == 1].mean() - ts[tag[mine] == 0].mean()) / US
        icmp = flow["proto"] in (1, 58)
        ports = (0, 0) if icmp else (int(flow["src_port"]), int(flow["dst_port"]))
        key = (str(flow["src_ip"]), str(flow["dst_ip"]), *ports)
        want[key] = (delay, cap.hosts[iface[mine[0]]].name)
    got = report(*paths[::-1])
    assert len(got) == len(want)
    for row in got:
        ports = (0, 0) if row["icmp_id"] is not None else (row["src_port"], row["dst_port"])
        delay, first_host = want[(str(row["src_ip"]), str(row["dst_ip"]), *ports)]
        assert row["host"] == first_host
        if delay is None:
            assert row["delay_us"] is None, row
        else:
            assert row["delay_us"] == pytest.approx(delay, rel=1e-9, abs=1e-6), row
    assert sum(r["delay_us"] is not None for r in got) == sum(
        d is not None for d, _ in want.values()
    )


# --- hand-built: two hosts, lost sender copies ------------------------------------------

MAC = {"a": b"\x52\x54\x00\x00\x00\x03", "b": b"\x52\x54\x00\x00\x00\x04",
       "c": b"\x52\x54\x00\x00\x00\x05", "gw": b"\x02\x00\x00\x00\x00\x01"}  # fmt: skip
IP4 = {"a": "10.0.0.3", "b": "10.0.0.4", "c": "10.0.0.5", "gw": "192.0.2.1"}
VIF = {"a": 3, "b": 4, "c": 5}
HOST = {"a": "hv01", "b": "hv02", "c": "hv01"}


def vntag(d: int, dvif: int, svif: int) -> bytes:
    # spec/vntag.md: d 0x80000000, dvif 0x3FFF0000, svif 0x00000FFF.
    return struct.pack("!HI", 0x8926, d << 31 | dvif << 16 | svif)


def udp_packet(src: str, dst: str, n: int) -> bytes:
    sport, dport = (40000, 53) if src < dst else (53, 40000)
    body = dpkt.udp.UDP(sport=sport, dport=dport, data=f"packet {n}".encode())
    addr = {k: bytes(int(x) for x in v.split(".")) for k, v in IP4.items()}
    return bytes(dpkt.ip.IP(src=addr[src], dst=addr[dst], p=17, id=n, ttl=64, data=body))


def test_delay_is_the_mean_over_paired_copies_when_sender_copies_are_lost(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    at: dict[str, list[tuple[int, bytes]]] = {"hv01": [], "hv02": []}
    paired = []
    for n in range(40):
        src, dst = ("a", "b") if n % 2 == 0 else ("b", "a")
        t, delay = T0 + n * 3 * MS, int(rng.integers(20 * US, 300 * US))
        ip = udp_packet(src, dst, n)
        sender = MAC[dst] + MAC[src] + vntag(0, 0, VIF[src]) + b"\x08\x00" + ip
        receiver = MAC[dst] + MAC[src] + vntag(1, VIF[dst], 0) + b"\x08\x00" + ip
        lost = n % 5 == 1 or n % 7 == 3  # the sender's collector lost these messages
        if not lost:
            at[HOST[src]].append((t, sender))
            paired.append(delay)
        at[HOST[dst]].append((t + delay, receiver))
    # Intra-host (a -> c, both copies at hv01) and external (a -> the gateway) traffic.
    for n in range(5):
        t = T0 + n * 5 * MS + 1 * MS
        ip = udp_packet("a", "c", 100 + n)
        at["hv01"].append(
            (t, MAC["c"] + MAC["a"] + vntag(0, VIF["c"], VIF["a"]) + b"\x08\x00" + ip)
        )
        at["hv01"].append(
            (t + 5 * US, MAC["c"] + MAC["a"] + vntag(1, VIF["c"], 0) + b"\x08\x00" + ip)
        )
        ip = udp_packet("a", "gw", 200 + n)
        at["hv01"].append((t, MAC["gw"] + MAC["a"] + vntag(0, 0, VIF["a"]) + b"\x08\x00" + ip))
    paths = [tmp_path / "hv01.pcapng", tmp_path / "hv02.pcapng"]
    for path in paths:
        write_host(path, path.stem, at[path.stem])
    forward, backward = report(*paths), report(*paths[::-1])
    assert forward == backward
    by_peer = {(r["src_ip"], r["dst_ip"]): r for r in forward}
    assert len(by_peer) == 3
    cross = by_peer[(IP4["a"], IP4["b"])]
    assert cross["scope"] == "cross-host"
    assert cross["delay_us"] == pytest.approx(np.mean(paired) / US, rel=1e-12)
    assert (cross["host"], cross["src_vif"], cross["dst_vif"]) == ("hv01", 3, 0)
    assert (cross["packets"], cross["packets_rev"]) == (20, 20)
    intra = by_peer[(IP4["a"], IP4["c"])]
    assert intra["scope"] == "intra-host"
    assert intra["delay_us"] is None
    assert by_peer[(IP4["a"], IP4["gw"])]["delay_us"] is None
