"""MACs in flow records: those the frames carry, and none invented for link types without.

The same UDP exchange is written (with dpkt) under every link type the decoder reads and
reported with ``vspan report`` as a user runs it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

A, B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
MAC_A, MAC_B = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
LOOPBACK = bytes(6)
"""A Linux loopback capture's Ethernet header: all-zero MACs, which are the frame's own."""


def packets() -> list[bytes]:
    out = []
    for n, (src, dst, sport, dport) in enumerate([(A, B, 5000, 53), (B, A, 53, 5000)]):
        udp = dpkt.udp.UDP(sport=sport, dport=dport, data=b"x" * 10)
        out.append(bytes(dpkt.ip.IP(src=src, dst=dst, p=17, id=n, data=udp)))
    return out


def ethernet(packet: bytes, src: bytes, dst: bytes) -> bytes:
    return dst + src + b"\x08\x00" + packet


def sll(packet: bytes, sender: bytes) -> bytes:
    # Linux cooked v1: packet type, ARPHRD_ETHER, address length, address (8), protocol.
    return struct.pack("!HHH8sH", 0, 1, 6, sender + b"\0\0", 0x0800) + packet


def sll2(packet: bytes, sender: bytes) -> bytes:
    # Linux cooked v2: protocol, reserved, ifindex, ARPHRD_ETHER, type, length, address.
    return struct.pack("!HHIHBB8s", 0x0800, 0, 3, 1, 0, 6, sender + b"\0\0") + packet


def null(packet: bytes) -> bytes:
    return struct.pack("<I", 2) + packet  # AF_INET, host byte order


FRAMES = {
    "ethernet": (
        dpkt.pcap.DLT_EN10MB,
        lambda p, i: ethernet(p, *[(MAC_A, MAC_B), (MAC_B, MAC_A)][i]),
    ),
    "ethernet loopback": (dpkt.pcap.DLT_EN10MB, lambda p, i: ethernet(p, LOOPBACK, LOOPBACK)),
    "linux cooked": (113, lambda p, i: sll(p, (MAC_A, MAC_B)[i])),
    "linux cooked v2": (276, lambda p, i: sll2(p, (MAC_A, MAC_B)[i])),
    "null": (dpkt.pcap.DLT_NULL, lambda p, i: null(p)),
    "raw": (101, lambda p, i: p),
}
MACS = {
    "ethernet": ("52:54:00:00:00:01", "52:54:00:00:00:02"),
    "ethernet loopback": ("00:00:00:00:00:00", "00:00:00:00:00:00"),
}
"""The (src_mac, dst_mac) each capture's flow must show; null (None) for the others."""


@pytest.mark.parametrize("name", FRAMES)
def test_flows_show_the_macs_the_frames_carry_and_no_other(name: str, tmp_path: Path) -> None:
    linktype, frame = FRAMES[name]
    path = tmp_path / "capture.pcap"
    with open(path, "wb") as fh:
        writer = dpkt.pcap.Writer(fh, linktype=linktype)
        for i, packet in enumerate(packets()):
            writer.writepkt(frame(packet, i), ts=1_700_000_000 + i)
    out = subprocess.run(
        [sys.executable, "-m", "vspan.cli", "report", str(path), "--format", "json"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    flows = json.loads(out.stdout)
    assert len(flows) == 1  # both directions in one flow
    flow = flows[0]
    assert (flow["src_ip"], flow["packets"], flow["packets_rev"]) == ("10.0.0.1", 1, 1)
    assert (flow["src_mac"], flow["dst_mac"]) == MACS.get(name, (None, None))
