"""``Decoded.fingerprint``: a packet's identity, the same in every copy of it.

Packets are built with dpkt (an independent encoder, which fills in lengths and checksums)
and framed as the two collectors of a cross-host packet would see them: the sender copy with
the sender's VN-Tag, the receiver copy with the receiver's, a VLAN tag, other MACs, and —
as after a router — a lower TTL and a re-marked TOS (so another IPv4 header checksum).
"""

from __future__ import annotations

import struct

import dpkt
import pytest

from vspan.analysis.decode import decode_batch
from vspan.batch import FrameBatch, LinkType

MAC_A, MAC_B, ROUTER = b"\x52\x54\x00\x00\x00\x03", b"\x52\x54\x00\x00\x00\x04", b"\x02" * 6
V4_A, V4_B = bytes([10, 0, 0, 3]), bytes([10, 0, 0, 4])
V6_A, V6_B = b"\xfd" + bytes(14) + b"\x03", b"\xfd" + bytes(14) + b"\x04"


def vntag(*, d: int, dvif: int = 0, svif: int = 0) -> bytes:
    # spec/vntag.md: d 0x80000000, dvif 0x3FFF0000, svif 0x00000FFF.
    return struct.pack("!HI", 0x8926, d << 31 | dvif << 16 | svif)


def sender_copy(packet: bytes, ethertype: int) -> bytes:
    return MAC_B + MAC_A + vntag(d=0, svif=3) + struct.pack("!H", ethertype) + packet


def receiver_copy(packet: bytes, ethertype: int) -> bytes:
    vlan = struct.pack("!HHH", 0x8100, 100, ethertype)
    return MAC_B + ROUTER + vntag(d=1, dvif=7) + vlan + packet


def ip4(l4: dpkt.Packet, proto: int, *, ttl: int = 64, tos: int = 0, **kw: object) -> bytes:
    fields: dict[str, object] = {"id": 0x1234, "df": 1, **kw}
    return bytes(dpkt.ip.IP(src=V4_A, dst=V4_B, p=proto, ttl=ttl, tos=tos, data=l4, **fields))


def ip6(l4: dpkt.Packet, proto: int, *, hlim: int = 64, fc: int = 0, flow: int = 0x12345) -> bytes:
    pkt = dpkt.ip6.IP6(src=V6_A, dst=V6_B, nxt=proto, hlim=hlim, fc=fc, flow=flow, data=l4)
    pkt.plen = len(bytes(l4))
    return bytes(pkt)


def tcp(**kw: object) -> dpkt.tcp.TCP:
    fields: dict[str, object] = {"sport": 40000, "dport": 443, "seq": 1000, "ack": 2000,
                                 "flags": dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, "win": 512,
                                 "data": b"payload", **kw}  # fmt: skip
    return dpkt.tcp.TCP(**fields)


def udp(data: bytes = b"query") -> dpkt.udp.UDP:
    return dpkt.udp.UDP(sport=5353, dport=53, data=data)


def icmp4() -> dpkt.icmp.ICMP:
    return dpkt.icmp.ICMP(type=8, code=0, data=dpkt.icmp.ICMP.Echo(id=7, seq=3, data=b"ping"))


def fingerprints(frames: list[bytes], linktype: int = LinkType.ETHERNET) -> list[int]:
    return decode_batch(FrameBatch.from_frames(frames, linktype=linktype)).fingerprint.tolist()


def routed(packet: bytes) -> bytes:
    """The IPv4 packet after a router: TTL - 1, ECN CE marked, header checksum redone."""
    ip = dpkt.ip.IP(packet)
    ip.ttl, ip.tos, ip.sum = ip.ttl - 1, 0x03, 0
    return bytes(ip)


PACKETS = {
    "ipv4 tcp": (ip4(tcp(), 6), 0x0800),
    "ipv4 udp": (ip4(udp(), 17), 0x0800),
    "ipv4 icmp echo": (ip4(icmp4(), 1), 0x0800),
    "ipv4 gre": (ip4(dpkt.gre.GRE(data=b"\x00" * 20), 47), 0x0800),
    "ipv4 later fragment": (ip4(b"\x00" * 16, 17, df=0, mf=1, offset=3), 0x0800),
    "ipv6 tcp": (ip6(tcp(), 6), 0x86DD),
    "ipv6 udp": (ip6(udp(), 17), 0x86DD),
}


@pytest.mark.parametrize("name", PACKETS)
def test_fingerprint_is_the_same_in_both_copies_of_a_packet(name: str) -> None:
    packet, ethertype = PACKETS[name]
    at_receiver = routed(packet) if ethertype == 0x0800 else packet
    sent, received = fingerprints(
        [sender_copy(packet, ethertype), receiver_copy(at_receiver, ethertype)]
    )
    assert sent != 0
    assert sent == received
    # The bare IP packet (a raw-IP capture) has the same identity: no link field is in it.
    assert fingerprints([packet], LinkType.RAW) == [sent]


def test_fingerprint_differs_when_a_field_of_the_packet_differs() -> None:
    variants = {
        "base": ip4(tcp(), 6),
        "ip id": ip4(tcp(), 6, id=0x1235),
        "no DF": ip4(tcp(), 6, df=0),
        "seq": ip4(tcp(seq=1001), 6),
        "ack": ip4(tcp(ack=2001), 6),
        "flags": ip4(tcp(flags=dpkt.tcp.TH_ACK), 6),
        "window": ip4(tcp(win=513), 6),
        "payload": ip4(tcp(data=b"payloae"), 6),
        "length": ip4(tcp(data=b"payload!"), 6),
        "udp": ip4(udp(), 17),
        "udp payload": ip4(udp(b"queyr"), 17),
        "icmp": ip4(icmp4(), 1),
        "ipv6": ip6(tcp(), 6),
        "ipv6 flow label": ip6(tcp(), 6, flow=0x12346),
    }
    got = fingerprints([sender_copy(p, 0x86DD if "ipv6" in k else 0x0800)
                        for k, p in variants.items()])  # fmt: skip
    assert 0 not in got
    assert len(set(got)) == len(variants), dict(zip(variants, got, strict=True))


@pytest.mark.parametrize(("name", "words"), [("ipv4 tcp", 18), ("ipv4 udp", 8),
                                              ("ipv4 icmp echo", 8), ("ipv6 tcp", 18)])  # fmt: skip
def test_fingerprint_needs_its_words_captured(name: str, words: int) -> None:
    # A copy cut by a snaplen has the packet's identity once the L4 words are in, and none
    # before: two copies cut at different lengths still pair, a cut header never does.
    packet, ethertype = PACKETS[name]
    frame = sender_copy(packet, ethertype)
    l4 = len(frame) - len(packet) + (20 if ethertype == 0x0800 else 40)
    whole = fingerprints([frame])[0]
    cuts = list(range(len(frame) + 1))
    got = decode_batch(
        FrameBatch.from_frames([frame[:n] for n in cuts], origlen=[len(frame)] * len(cuts))
    ).fingerprint.tolist()
    assert got == [whole if n >= l4 + words else 0 for n in cuts]


def test_frames_without_ip_have_no_fingerprint() -> None:
    arp = dpkt.arp.ARP(sha=MAC_A, spa=V4_A, tha=bytes(6), tpa=V4_B)
    frame = bytes(dpkt.ethernet.Ethernet(src=MAC_A, dst=b"\xff" * 6, type=0x0806, data=arp))
    assert fingerprints([frame]) == [0]
