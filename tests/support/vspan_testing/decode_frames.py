"""Frames built layer by layer for the decoder tests, each with the columns it must give.

A frame is a link part, then tag, IP, extension-header and L4 parts, then payload. Every
part knows the ``Layer`` a cut inside it stops at, and the columns that are known once it
is decoded; so the expectations come from how the frame was built, never from the decoder.
``Built.expect(n)`` gives status, layer and columns when only the first ``n`` bytes were
captured: the columns of every complete part; those of the cut part are left unchecked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

from vspan.analysis.decode.columns import IPV4_MAPPED_PREFIX, Layer, Status, TagKind
from vspan.batch import LinkType
from vspan.wire.vntag import ETag, VnTag, encode_etag, encode_vntag

Exp = dict[str, int]
TPIDS = (0x8100, 0x88A8, 0x9100)


class Part(Protocol):
    layer: Layer

    def ident(self) -> int:
        """How the part before announces this one: EtherType, or IP protocol number."""
        ...

    def encode(self, inner: bytes, nxt: int) -> bytes:
        """This part's header, given the bytes after it and the ``ident`` of the next part."""
        ...

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        """Columns known once this part (``size`` bytes at offset ``at``) is decoded."""
        ...


@dataclass(frozen=True)
class Built:
    name: str
    linktype: int
    sizes: tuple[int, ...]
    layers: tuple[Layer, ...]
    snaps: tuple[Exp, ...]
    data: bytes

    def expect(self, n: int | None = None) -> tuple[Status, Layer, Exp, set[str]]:
        """(status, layer, columns that must match, columns left unchecked) for ``n`` bytes."""
        n = len(self.data) if n is None else n
        at, done = 0, {}
        for size, layer, snap in zip(self.sizes, self.layers, self.snaps, strict=True):
            if n < at + size:
                if layer == Layer.NONE:  # payload-like part: decoding was already over
                    return Status.OK, Layer.NONE, snap, set()
                return Status.TRUNCATED, layer, done, set(snap) - set(done) | _changed(done, snap)
            at, done = at + size, snap
        return Status.OK, Layer.NONE, done, set()


def _changed(before: Exp, after: Exp) -> set[str]:
    return {k for k, v in after.items() if before.get(k) != v}


def build(name: str, *parts: Any, linktype: int = LinkType.ETHERNET, payload: bytes = b"") -> Built:
    """Encode ``parts`` (outermost first) and ``payload``, and work out the expectations."""
    items: list[Part] = list(parts)
    if payload:
        items.append(Opaque(payload))
    headers, inner = [b""] * len(items), b""
    for i in reversed(range(len(items))):
        nxt = items[i + 1].ident() if i + 1 < len(items) else -1
        headers[i] = items[i].encode(inner, nxt)
        inner = headers[i] + inner
    exp: Exp = {"vlan_outer": -1, "vlan_inner": -1, "l3_offset": -1, "l4_offset": -1}
    snaps, at = [], 0
    for i, part in enumerate(items):
        nxt = items[i + 1].ident() if i + 1 < len(items) else -1
        part.update(exp, at, len(headers[i]), inner[at + len(headers[i]) :], nxt)
        snaps.append(dict(exp))
        at += len(headers[i])
    return Built(
        name, int(linktype), tuple(map(len, headers)), tuple(p.layer for p in items),
        tuple(snaps), inner,
    )  # fmt: skip


def _set_ethertype(exp: Exp, nxt: int) -> None:
    if nxt not in TPIDS and nxt not in (0x8926, 0x893F):
        exp["ethertype"] = nxt if nxt >= 0x0600 else 0


def mac(i: int) -> bytes:
    return bytes([0x02, 0, 0, 0, i >> 8 & 0xFF, i & 0xFF])


@dataclass
class Eth:
    dst: bytes = mac(1)
    src: bytes = mac(2)
    ethertype: int | None = None
    layer: Layer = Layer.LINK

    def ident(self) -> int:
        return 0

    def encode(self, inner: bytes, nxt: int) -> bytes:
        return (
            self.dst
            + self.src
            + struct.pack("!H", nxt if self.ethertype is None else self.ethertype)
        )

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp["dst_mac"] = int.from_bytes(self.dst, "big")
        exp["src_mac"] = int.from_bytes(self.src, "big")
        _set_ethertype(exp, nxt if self.ethertype is None else self.ethertype)


@dataclass
class Sll:
    """Linux cooked capture v1 (16 bytes) or v2 (20 bytes)."""

    v2: bool = False
    layer: Layer = Layer.LINK

    def ident(self) -> int:
        return 0

    def encode(self, inner: bytes, nxt: int) -> bytes:
        addr = mac(7) + b"\0\0"
        if self.v2:
            return struct.pack("!HHIHBB8s", nxt, 0, 3, 1, 0, 6, addr)
        return struct.pack("!HHH8sH", 0, 1, 6, addr, nxt)

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        _set_ethertype(exp, nxt)


@dataclass
class Null:
    """DLT_NULL; ``family`` None picks AF_INET or macOS AF_INET6 from the next part."""

    family: int | None = None
    big_endian: bool = False
    layer: Layer = Layer.LINK

    def ident(self) -> int:
        return 0

    def _family(self, nxt: int) -> int:
        return self.family if self.family is not None else {0x0800: 2, 0x86DD: 30}.get(nxt, 99)

    def encode(self, inner: bytes, nxt: int) -> bytes:
        return struct.pack(">I" if self.big_endian else "<I", self._family(nxt))

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        family = self._family(nxt)
        exp["ethertype"] = 0x0800 if family == 2 else 0x86DD if family in (24, 28, 30) else 0


@dataclass
class Raw:
    layer: Layer = Layer.LINK

    def ident(self) -> int:
        return 0

    def encode(self, inner: bytes, nxt: int) -> bytes:
        return b""

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        pass  # the IP version nibble tells the EtherType, so the IP part sets it


@dataclass
class Vlan:
    vid: int
    tpid: int = 0x8100
    pcp: int = 0
    layer: Layer = Layer.VLAN

    def ident(self) -> int:
        return self.tpid

    def encode(self, inner: bytes, nxt: int) -> bytes:
        return struct.pack("!HH", self.pcp << 13 | self.vid, nxt)

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        if exp.get("vlan_depth", 0) == 0:
            exp["vlan_outer"], exp["vlan_outer_tpid"] = self.vid, self.tpid
        exp["vlan_inner"] = self.vid
        exp["vlan_depth"] = exp.get("vlan_depth", 0) + 1
        _set_ethertype(exp, nxt)


@dataclass
class Tag:
    """A VN-Tag or an E-TAG (its ``ethertype`` field is ignored: the next part sets it)."""

    tag: VnTag | ETag
    layer: Layer = Layer.TAG

    def ident(self) -> int:
        return 0x8926 if isinstance(self.tag, VnTag) else 0x893F

    def encode(self, inner: bytes, nxt: int) -> bytes:
        if isinstance(self.tag, VnTag):
            t = self.tag
            return encode_vntag(VnTag(t.d, t.p, t.dvif, t.l, t.r, t.version, t.svif, nxt))
        e = self.tag
        return encode_etag(ETag(e.pcp, e.dei, e.iecid, e.resv, e.grp, e.ecid, nxt))

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp["vlan_before_tag"] = exp.get("vlan_depth", 0)
        if isinstance(self.tag, VnTag):
            t = self.tag
            exp.update(tag_kind=TagKind.VNTAG, tag_d=t.d, tag_p=t.p, tag_l=t.l,
                       tag_version=t.version, dvif=t.dvif, svif=t.svif)  # fmt: skip
        else:
            e = self.tag
            exp.update(tag_kind=TagKind.ETAG, etag_pcp=e.pcp, etag_dei=e.dei, etag_grp=e.grp,
                       dvif=e.ecid, svif=e.iecid)  # fmt: skip
        _set_ethertype(exp, nxt)


def v4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def v6(text: str) -> bytes:
    import ipaddress

    return ipaddress.IPv6Address(text).packed


@dataclass
class IPv4:
    src: bytes = v4("10.0.0.1")
    dst: bytes = v4("192.168.1.2")
    ttl: int = 64
    options: bytes = b""
    frag: int = 0
    """Fragment offset in bytes (a multiple of 8)."""
    mf: int = 0
    proto: int | None = None
    """Protocol when no part follows (a non-first fragment)."""
    layer: Layer = Layer.IP

    def ident(self) -> int:
        return 0x0800

    def encode(self, inner: bytes, nxt: int) -> bytes:
        hlen = 20 + len(self.options)
        proto = nxt if self.proto is None else self.proto
        word = self.mf << 13 | self.frag // 8
        return struct.pack("!BBHHHBBH4s4s", 0x40 | hlen // 4, 0, hlen + len(inner), 0x1234,
                           word, self.ttl, proto, 0, self.src, self.dst) + self.options  # fmt: skip

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        prefix = int(IPV4_MAPPED_PREFIX)
        exp.setdefault("ethertype", 0x0800)  # LINKTYPE_RAW
        exp.update(ip_version=4, l3_offset=at, ip_ttl=self.ttl, frag_offset=self.frag,
                   frag_mf=self.mf, is_fragment=int(self.frag > 0 or self.mf > 0), frag_id=0x1234,
                   ip_proto=nxt if self.proto is None else self.proto, payload_len=len(inner),
                   src_ip_lo=prefix | int.from_bytes(self.src, "big"),
                   dst_ip_lo=prefix | int.from_bytes(self.dst, "big"))  # fmt: skip


@dataclass
class IPv6:
    src: bytes = v6("2001:db8::1")
    dst: bytes = v6("fe80::2:3")
    hlim: int = 63
    proto: int | None = None
    layer: Layer = Layer.IP

    def ident(self) -> int:
        return 0x86DD

    def encode(self, inner: bytes, nxt: int) -> bytes:
        proto = nxt if self.proto is None else self.proto
        return struct.pack(
            "!IHBB16s16s", 0x60000000, len(inner), proto, self.hlim, self.src, self.dst
        )

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp.setdefault("ethertype", 0x86DD)  # LINKTYPE_RAW
        exp.update(ip_version=6, l3_offset=at, ip_ttl=self.hlim, payload_len=len(inner),
                   ip_proto=nxt if self.proto is None else self.proto,
                   src_ip_hi=int.from_bytes(self.src[:8], "big"),
                   src_ip_lo=int.from_bytes(self.src[8:], "big"),
                   dst_ip_hi=int.from_bytes(self.dst[:8], "big"),
                   dst_ip_lo=int.from_bytes(self.dst[8:], "big"))  # fmt: skip


@dataclass
class Ext:
    """An IPv6 extension header: 0 HBH, 43 routing, 60 dest opts (8 * (units + 1) bytes),
    51 AH (4 * (units + 2) bytes), 44 fragment (use ``Frag``)."""

    kind: int
    units: int = 0
    proto: int | None = None
    layer: Layer = Layer.IP_EXT

    def ident(self) -> int:
        return self.kind

    def encode(self, inner: bytes, nxt: int) -> bytes:
        nxt = nxt if self.proto is None else self.proto
        if self.kind == 51:
            return struct.pack("!BBHII", nxt, self.units, 0, 0x100, 7) + bytes(4 * self.units - 4)
        if self.kind == 43:  # routing type 253 (experimental), no segments left
            body = struct.pack("!BB", 253, 0) + bytes(4 + 8 * self.units)
        else:  # a PadN option fills the header
            body = struct.pack("!BB", 1, 4 + 8 * self.units) + bytes(4 + 8 * self.units)
        return struct.pack("!BB", nxt, self.units) + body

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp.update(ip_proto=nxt if self.proto is None else self.proto, payload_len=len(inner))


@dataclass
class Frag:
    offset: int = 0
    more: int = 0
    proto: int | None = None
    layer: Layer = Layer.IP_EXT

    def ident(self) -> int:
        return 44

    def encode(self, inner: bytes, nxt: int) -> bytes:
        nxt = nxt if self.proto is None else self.proto
        return struct.pack("!BBHI", nxt, 0, self.offset // 8 << 3 | self.more, 0xABCD)

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp.update(ip_proto=nxt if self.proto is None else self.proto, payload_len=len(inner),
                   frag_offset=self.offset, frag_mf=self.more,
                   is_fragment=int(self.offset > 0 or self.more > 0), frag_id=0xABCD)  # fmt: skip


TCP_FLAGS = {"FIN": 0x001, "SYN": 0x002, "RST": 0x004, "PSH": 0x008, "ACK": 0x010,
             "URG": 0x020, "ECE": 0x040, "CWR": 0x080, "NS": 0x100}  # fmt: skip


@dataclass
class Tcp:
    sport: int = 40000
    dport: int = 443
    flags: int = 0x012
    options: bytes = b""
    layer: Layer = Layer.L4

    def ident(self) -> int:
        return 6

    def encode(self, inner: bytes, nxt: int) -> bytes:
        words = 5 + len(self.options) // 4
        off = words << 12 | self.flags
        return struct.pack("!HHIIHHHH", self.sport, self.dport, 1, 2, off, 512, 0, 0) + self.options

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp.update(l4_offset=at, src_port=self.sport, dst_port=self.dport, tcp_flags=self.flags,
                   payload_len=len(inner))  # fmt: skip


@dataclass
class Udp:
    sport: int = 5353
    dport: int = 53
    length: int | None = None
    layer: Layer = Layer.L4

    def ident(self) -> int:
        return 17

    def encode(self, inner: bytes, nxt: int) -> bytes:
        length = 8 + len(inner) if self.length is None else self.length
        return struct.pack("!HHHH", self.sport, self.dport, length, 0)

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp.update(l4_offset=at, src_port=self.sport, dst_port=self.dport, payload_len=len(inner))


@dataclass
class Sctp:
    sport: int = 2905
    dport: int = 2906
    layer: Layer = Layer.L4

    def ident(self) -> int:
        return 132

    def encode(self, inner: bytes, nxt: int) -> bytes:
        return struct.pack("!HHII", self.sport, self.dport, 0x11223344, 0)

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp.update(l4_offset=at, src_port=self.sport, dst_port=self.dport, payload_len=len(inner))


@dataclass
class Icmp:
    """ICMP (``v6`` False) or ICMPv6; the identifier is set only for echo messages."""

    type: int = 8
    code: int = 0
    ident_: int = 0x4242
    v6: bool = False
    layer: Layer = Layer.L4

    def ident(self) -> int:
        return 58 if self.v6 else 1

    def _echo(self) -> bool:
        return self.type in ((128, 129) if self.v6 else (0, 8))

    def encode(self, inner: bytes, nxt: int) -> bytes:
        return struct.pack("!BBHHH", self.type, self.code, 0, self.ident_, 7)

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        exp.update(l4_offset=at, icmp_type=self.type, icmp_code=self.code,
                   icmp_id=self.ident_ if self._echo() else 0, payload_len=len(inner))  # fmt: skip


@dataclass
class Opaque:
    """Bytes nothing decodes: a payload, ARP, LLC, or a protocol without an L4 decoder.

    ``proto`` set: the bytes are an IP protocol's (``l4_offset`` points at them);
    ``ethertype`` set: a link-level protocol (ARP; LLC announces itself by its length).
    """

    data: bytes
    proto: int | None = None
    ethertype: int | None = None
    layer: Layer = Layer.NONE
    extra: dict[str, int] = field(default_factory=dict)

    def ident(self) -> int:
        if self.proto is not None:
            return self.proto
        return self.ethertype if self.ethertype is not None else len(self.data)

    def encode(self, inner: bytes, nxt: int) -> bytes:
        return self.data

    def update(self, exp: Exp, at: int, size: int, inner: bytes, nxt: int) -> None:
        if self.proto is not None:
            exp.update(l4_offset=at, payload_len=size + len(inner))
        exp.update(self.extra)


ARP = Opaque(
    bytes.fromhex("0001080006040001") + mac(9) + v4("10.0.0.9") + bytes(10), ethertype=0x0806
)
LLC = Opaque(bytes.fromhex("424203") + bytes(35))


def catalogue() -> list[Built]:
    """Frames covering every layer combination the decoder knows."""
    vn = VnTag(d=1, p=1, dvif=0x2A5A, l=1, r=0, version=2, svif=0xB0C)
    et = ETag(pcp=5, dei=1, iecid=0xAB123, resv=0, grp=2, ecid=0x4C0DE)
    tcp, pay = Tcp(flags=0x018), bytes(range(40))
    sctp_data = struct.pack("!BBHIHHI", 0, 3, 16 + 24, 1, 0, 0, 0) + bytes(24)  # a DATA chunk
    all_flags = Tcp(flags=0x1FF)
    ip_opts = IPv4(options=bytes.fromhex("94040000") + bytes.fromhex("01010100"))
    e = LinkType
    return [
        build("eth ipv4 tcp", Eth(), IPv4(), tcp, payload=pay),
        build("eth ipv4 tcp all flags", Eth(), IPv4(), all_flags),
        build("eth ipv4 tcp options", Eth(), IPv4(), Tcp(options=bytes.fromhex("020405b40101040203030701")), payload=pay),
        build("eth ipv4 options udp", Eth(), ip_opts, Udp(), payload=pay[:13]),
        build("eth ipv4 first fragment udp", Eth(), IPv4(mf=1), Udp(length=1008), payload=pay),
        build("eth ipv4 middle fragment", Eth(), IPv4(frag=1480, mf=1, proto=17), payload=pay),
        build("eth ipv4 last fragment", Eth(), IPv4(frag=2960, proto=6), payload=pay),
        build("eth ipv4 sctp", Eth(), IPv4(), Sctp(), payload=sctp_data),
        build("eth ipv4 icmp echo", Eth(), IPv4(), Icmp(8), payload=pay),
        build("eth ipv4 icmp unreachable", Eth(), IPv4(), Icmp(3, 3, ident_=0)),
        build("eth ipv4 proto 253", Eth(), IPv4(), Opaque(pay, proto=253)),
        build("eth ipv6 tcp", Eth(), IPv6(), tcp, payload=pay),
        build("eth ipv6 udp", Eth(), IPv6(), Udp(), payload=pay),
        build("eth ipv6 icmpv6 echo", Eth(), IPv6(), Icmp(129, v6=True, ident_=0x0BAD)),
        build("eth ipv6 icmpv6 ns", Eth(), IPv6(hlim=255), Icmp(135, v6=True, ident_=0), payload=pay[:16]),
        build("eth ipv6 ext chain tcp", Eth(), IPv6(), Ext(0), Ext(43, 1), Ext(60), Frag(0, 1), Ext(51, 4), tcp, payload=pay),
        build("eth ipv6 fragment later", Eth(), IPv6(), Frag(1232, 1, proto=6), payload=pay),
        build("eth ipv6 no next header", Eth(), IPv6(), Ext(60), Opaque(b"", proto=59)),
        build("eth arp", Eth(), ARP),
        build("eth 802.3 llc", Eth(), LLC),
        build("eth local experimental ethertype", Eth(ethertype=0x88B5), Opaque(pay)),
        build("qinq 88a8 8100", Eth(), Vlan(1525, 0x88A8, pcp=3), Vlan(30), IPv4(), Icmp(0), payload=pay[:8]),
        build("vlan 9100", Eth(), Vlan(4094, 0x9100), IPv4(), tcp),
        build("vlan 0 priority tag", Eth(), Vlan(0, pcp=5), IPv6(), Udp()),
        build("vntag", Eth(), Tag(vn), IPv4(), Udp(), payload=pay),
        build("vntag vlan", Eth(), Tag(vn), Vlan(11), IPv4(), tcp),
        build("vlan vntag vlan", Eth(), Vlan(250), Tag(vn), Vlan(251), IPv4(), tcp, payload=pay),
        build("vntag zero fields arp", Eth(), Tag(VnTag()), ARP),
        build("vntag llc", Eth(), Tag(VnTag(svif=7)), LLC),
        build("etag", Eth(), Tag(et), IPv4(), tcp, payload=pay),
        build("vlan etag vlan ipv6", Eth(), Vlan(5), Tag(et), Vlan(6), IPv6(), Icmp(128, v6=True)),
        build("sll ipv4 tcp", Sll(), IPv4(), tcp, linktype=e.LINUX_SLL),
        build("sll vlan ipv6 udp", Sll(), Vlan(77), IPv6(), Udp(), payload=pay, linktype=e.LINUX_SLL),
        build("sll2 ipv6 tcp", Sll(v2=True), IPv6(), tcp, linktype=e.LINUX_SLL2),
        build("sll2 arp", Sll(v2=True), ARP, linktype=e.LINUX_SLL2),
        build("raw ipv4 udp", Raw(), IPv4(), Udp(), payload=pay, linktype=e.RAW),
        build("raw ipv6 icmpv6", Raw(), IPv6(), Icmp(128, v6=True), linktype=e.RAW),
        build("null ipv4 tcp", Null(), IPv4(), tcp, linktype=e.NULL),
        build("null be ipv6 udp", Null(24, big_endian=True), IPv6(), Udp(), linktype=e.NULL),
        build("null freebsd ipv6 tcp", Null(28), IPv6(), tcp, linktype=e.NULL),
    ]  # fmt: skip


IP4_TCP = build("ipv4 tcp", Eth(), IPv4(), Tcp(), payload=b"x" * 10).data
"""Ethernet, IPv4 at 14, TCP at 34 (data offset byte at 46), 10 bytes of payload."""
IP6_UDP = build("ipv6 udp", Eth(), IPv6(), Udp(), payload=b"y" * 6).data
"""Ethernet, IPv6 at 14 (payload length at 18), UDP at 54 (length at 58), 6 bytes."""


def patched(frame: bytes, at: int, value: bytes) -> bytes:
    """``frame`` with ``value`` written over its bytes from ``at``."""
    return frame[:at] + value + frame[at + len(value) :]


def vlans(n: int) -> bytes:
    """``n`` 802.1Q tags (ids 100, 101, ...) to insert after the MACs."""
    return b"".join(struct.pack("!HH", 0x8100, 100 + i) for i in range(n))
