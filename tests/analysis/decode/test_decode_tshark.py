"""``decode_batch`` against tshark, run in the test, frame by frame.

The real captures of ``../shared/pcaps`` and generated frames (every layer combination,
each also cut at every byte, and headers that contradict their format) are written to
pcap files, read back with dpkt, decoded, and compared with what tshark shows: fields,
and where decoding stopped (tshark's "Packet size limited during capture: X truncated" and
"Malformed Packet" name the protocol; ``Layer`` is derived from it).

Known, deliberate differences are filtered out before comparing and listed in
``_deviation``.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import dpkt
import pytest

from vspan.analysis.decode import decode_batch
from vspan.analysis.decode.columns import (
    IPV4_MAPPED_PREFIX,
    NO_MAC,
    Decoded,
    Layer,
    Status,
    TagKind,
)
from vspan.batch import FrameBatch
from vspan_testing.decode_frames import IP4_TCP, IP6_UDP, Built, catalogue, patched, vlans

PCAPS = Path(__file__).resolve().parents[4] / "shared" / "pcaps"
pytestmark = [
    pytest.mark.tshark,
    pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed"),
]

FIELDS = [
    "frame.len", "frame.cap_len", "frame.protocols", "_ws.short", "_ws.malformed",
    "_ws.expert.group", "_ws.expert.message", "_ws.expert.severity",
    "eth.dst", "eth.src", "eth.type", "eth.len", "sll.etype",
    "vlan.id", "vlan.etype", "vlan.len", "ieee8021ad.id",
    "vntag.dir", "vntag.ptr", "vntag.dst", "vntag.looped", "vntag.version", "vntag.src",
    "vntag.etype", "vntag.len", "etag.pcp", "etag.dei", "etag.group", "etag.ecid_base",
    "etag.ecid_ext", "etag.iecid_base", "etag.iecid_ext", "etag.etype",
    "ip.version", "ip.src", "ip.dst", "ip.ttl", "ip.proto", "ip.frag_offset", "ip.flags.mf",
    "ipv6.version", "ipv6.src", "ipv6.dst", "ipv6.hlim", "ipv6.nxt", "ipv6.hopopts.nxt",
    "ipv6.routing.nxt", "ipv6.dstopts.nxt", "ipv6.fraghdr.nxt", "ipv6.fraghdr.offset",
    "ipv6.fraghdr.more", "ah.next_header",
    "tcp.srcport", "tcp.dstport", "tcp.flags", "tcp.len", "udp.srcport", "udp.dstport",
    "udp.checksum", "sctp.srcport", "sctp.dstport", "icmp.type", "icmp.code", "icmp.ident",
    "icmp.seq", "icmp.unused", "icmpv6.type", "icmpv6.code", "icmpv6.echo.identifier",
    "icmpv6.echo.sequence_number", "icmpv6.reserved", "icmpv6.mtu",
]  # fmt: skip
OPTIONS = ["-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE",
           "-o", "tcp.analyze_sequence_numbers:FALSE"]  # fmt: skip
# Application protocols would only add their own verdicts on the generated payloads.
NOT_OURS = ["--disable-protocol", "dns", "--disable-protocol", "tls", "--disable-protocol", "stp"]
SHORT, MALFORMED = "[Packet size limited during capture: ", "[Malformed Packet: "
MALFORMED_GROUP, PROTOCOL_GROUP, ERROR = 0x07000000, 0x09000000, 0x00800000
"""Expert info: the groups and the severity of a header that contradicts its format."""
BOGUS = {"Bogus IPv4 version": Layer.IP, "Bogus IPv6 version": Layer.IP,
         "Bogus IP": Layer.IP, "Bogus TCP": Layer.L4}  # fmt: skip
"""Expert messages of a dissector that gave up, to the layer (tshark may show "data")."""

# tshark's protocol names (short and display) to the layer decoding stops at.
LAYER_OF = {
    "eth": Layer.LINK, "Ethernet": Layer.LINK, "sll": Layer.LINK, "SLL": Layer.LINK,
    "null": Layer.LINK, "Null": Layer.LINK, "raw": Layer.IP, "Raw": Layer.IP,
    "vlan": Layer.VLAN, "VLAN": Layer.VLAN, "ieee8021ad": Layer.VLAN,
    "IEEE 802.1AD": Layer.VLAN, "vntag": Layer.TAG, "VNTAG": Layer.TAG, "etag": Layer.TAG,
    "ETAG": Layer.TAG, "ip": Layer.IP, "IPv4": Layer.IP, "ipv6": Layer.IP, "IPv6": Layer.IP,
    "ipv6.hopopts": Layer.IP_EXT, "IPv6 Hop-by-Hop": Layer.IP_EXT,
    "ipv6.routing": Layer.IP_EXT, "IPv6 Routing": Layer.IP_EXT, "ipv6.fraghdr": Layer.IP_EXT,
    "IPv6 Fragment": Layer.IP_EXT, "ipv6.dstopts": Layer.IP_EXT,
    "IPv6 Destination": Layer.IP_EXT, "ah": Layer.IP_EXT, "AH": Layer.IP_EXT,
    "tcp": Layer.L4, "TCP": Layer.L4, "udp": Layer.L4, "UDP": Layer.L4, "sctp": Layer.L4,
    "SCTP": Layer.L4, "icmp": Layer.L4, "ICMP": Layer.L4, "icmpv6": Layer.L4,
    "ICMPv6": Layer.L4,
}  # fmt: skip
TAGS = ("vlan", "ieee8021ad", "vntag", "etag")
EXT_NXT = {"ipv6.hopopts": "ipv6.hopopts.nxt", "ipv6.routing": "ipv6.routing.nxt",
           "ipv6.dstopts": "ipv6.dstopts.nxt", "ipv6.fraghdr": "ipv6.fraghdr.nxt",
           "ah": "ah.next_header"}  # fmt: skip
L4 = ("tcp", "udp", "sctp", "icmp", "icmpv6")

ICMP_BYTES_4_TO_8 = {"icmp.seq", "icmp.unused", "icmpv6.echo.sequence_number",
                     "icmpv6.reserved", "icmpv6.mtu"}  # fmt: skip
"""Fields that end at byte 8 of an ICMP header (or past it)."""

Frame = dict[str, list[str]]


def tshark(path: Path) -> list[Frame]:
    args = ["tshark", "-n", "-r", str(path), *OPTIONS, *NOT_OURS, "-T", "fields",
            "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=\x1f"]  # fmt: skip
    for name in FIELDS:
        args += ["-e", name]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300).stdout
    return [
        {k: v.split("\x1f") for k, v in zip(FIELDS, line.split("\t"), strict=True) if v}
        for line in out.splitlines()
    ]


def num(text: str) -> int:
    return int(text, 0) if text.startswith("0x") else int(text)


def first(fr: Frame, name: str) -> int | None:
    return num(fr[name][0]) if name in fr else None


def stopped(fr: Frame) -> tuple[Status, Layer]:
    """Where tshark's decoding stopped, in vspan's terms (OK past our layers)."""
    protocols = fr["frame.protocols"][0].split(":")
    for text in fr.get("_ws.short", []):
        name = text.removeprefix(SHORT).removesuffix(" truncated]")
        return (Status.TRUNCATED, LAYER_OF[name]) if name in LAYER_OF else (Status.OK, Layer.NONE)
    for text in fr.get("_ws.malformed", []):
        if text.startswith(MALFORMED):
            name = text.removeprefix(MALFORMED).removesuffix("]")
            return (
                (Status.MALFORMED, LAYER_OF[name]) if name in LAYER_OF else (Status.OK, Layer.NONE)
            )
    errors = [
        message
        for message, group, severity in zip(fr.get("_ws.expert.message", []),
                                            fr.get("_ws.expert.group", []),
                                            fr.get("_ws.expert.severity", []), strict=True)
        if num(severity) == ERROR and num(group) in (MALFORMED_GROUP, PROTOCOL_GROUP)
    ]  # fmt: skip
    for message in errors:
        for prefix, layer in BOGUS.items():
            if message.startswith(prefix):
                return Status.MALFORMED, layer
    if errors and protocols[-1] in LAYER_OF:
        return Status.MALFORMED, LAYER_OF[protocols[-1]]
    return Status.OK, Layer.NONE


def columns(fr: Frame) -> dict[str, int]:
    """The ``Decoded`` columns tshark shows for this frame (absent fields as 0 / -1)."""
    protocols = fr["frame.protocols"][0].split(":")
    net = next((i for i, p in enumerate(protocols) if p in ("ip", "ipv6")), len(protocols))
    tags = [p for p in protocols[:net] if p in TAGS]
    out: dict[str, int] = {}
    for name, key in (("dst_mac", "eth.dst"), ("src_mac", "eth.src")):
        out[name] = int(fr[key][0].replace(":", ""), 16) if key in fr else int(NO_MAC)
    ids = {"vlan": list(map(num, fr.get("vlan.id", []))),
           "ieee8021ad": list(map(num, fr.get("ieee8021ad.id", [])))}  # fmt: skip
    seen: list[int] = []
    out["vlan_before_tag"] = 0
    for p in tags:
        if ids.get(p):
            seen.append(ids[p].pop(0))
        elif p in ("vntag", "etag"):
            out["vlan_before_tag"] = len(seen)
    out["vlan_depth"] = len(seen)
    out["vlan_outer"], out["vlan_inner"] = (seen[0], seen[-1]) if seen else (-1, -1)
    out["vlan_outer_tpid"] = 0
    if seen:
        vlans = [p for p in tags if p in ids]
        if vlans[0] == "ieee8021ad":
            out["vlan_outer_tpid"] = 0x88A8
        elif tags[0] in ids:
            out["vlan_outer_tpid"] = first(fr, "eth.type") or first(fr, "sll.etype") or 0
        else:
            out["vlan_outer_tpid"] = first(fr, f"{tags[0]}.etype") or 0
    out["tag_kind"] = TagKind.VNTAG if "vntag" in tags else TagKind.ETAG if "etag" in tags else 0
    for name, key in (("tag_d", "vntag.dir"), ("tag_p", "vntag.ptr"), ("tag_l", "vntag.looped"),
                      ("tag_version", "vntag.version"), ("etag_pcp", "etag.pcp"),
                      ("etag_dei", "etag.dei"), ("etag_grp", "etag.group")):  # fmt: skip
        out[name] = first(fr, key) or 0
    if "vntag" in tags:
        out["dvif"], out["svif"] = first(fr, "vntag.dst") or 0, first(fr, "vntag.src") or 0
    else:
        ext = {k: first(fr, f"etag.{k}") or 0 for k in ("ecid_base", "ecid_ext", "iecid_base",
                                                        "iecid_ext")}  # fmt: skip
        out["dvif"] = ext["ecid_ext"] << 12 | ext["ecid_base"]
        out["svif"] = ext["iecid_ext"] << 12 | ext["iecid_base"]
    out["ethertype"] = _ethertype(fr, protocols, tags)
    out.update(_ip(fr, protocols[net:]))
    return out


def _ethertype(fr: Frame, protocols: list[str], tags: list[str]) -> int:
    if tags:
        last = tags[-1]
        if f"{last}.len" in fr:
            return 0
        if f"{last}.etype" in fr:
            return num(fr[f"{last}.etype"][-1])
    elif "eth.len" in fr:
        return 0
    elif "eth.type" in fr or "sll.etype" in fr:
        return num((fr.get("eth.type") or fr["sll.etype"])[0])
    # after an 802.1ad tag (no EtherType field of its own), or on a NULL or RAW link
    after = protocols[protocols.index(tags[-1]) + 1 :] if tags else protocols
    known = {"ip": 0x0800, "ipv6": 0x86DD, "arp": 0x0806}
    return next((known[p] for p in after if p in known), 0)


def _ip(fr: Frame, protocols: list[str]) -> dict[str, int]:
    out = dict.fromkeys(("ip_version", "src_ip_hi", "src_ip_lo", "dst_ip_hi", "dst_ip_lo",
                         "ip_ttl", "ip_proto", "frag_offset", "frag_mf", "src_port", "dst_port",
                         "icmp_type", "icmp_code", "icmp_id", "tcp_flags"), 0)  # fmt: skip
    if not protocols:
        return out
    if protocols[0] == "ip":
        out["ip_version"] = first(fr, "ip.version") or 0
        for side in ("src", "dst"):
            if f"ip.{side}" in fr:
                addr = int(ipaddress.IPv4Address(fr[f"ip.{side}"][0]))
                out[f"{side}_ip_lo"] = int(IPV4_MAPPED_PREFIX) | addr
        out["ip_ttl"], out["ip_proto"] = first(fr, "ip.ttl") or 0, first(fr, "ip.proto") or 0
        out["frag_offset"] = (first(fr, "ip.frag_offset") or 0) * 8
        out["frag_mf"] = first(fr, "ip.flags.mf") or 0
    else:
        out["ip_version"] = first(fr, "ipv6.version") or 0
        for side in ("src", "dst"):
            if f"ipv6.{side}" in fr:
                addr = int(ipaddress.IPv6Address(fr[f"ipv6.{side}"][0]))
                out[f"{side}_ip_hi"], out[f"{side}_ip_lo"] = addr >> 64, addr & (1 << 64) - 1
        out["ip_ttl"], out["ip_proto"] = first(fr, "ipv6.hlim") or 0, first(fr, "ipv6.nxt") or 0
        taken: dict[str, int] = {}
        for p in protocols[1:]:
            if p not in EXT_NXT:
                break
            field = EXT_NXT[p]
            k = taken.get(field, 0)
            if len(fr.get(field, [])) > k:
                out["ip_proto"], taken[field] = num(fr[field][k]), k + 1
        out["frag_offset"] = (first(fr, "ipv6.fraghdr.offset") or 0) * 8
        out["frag_mf"] = first(fr, "ipv6.fraghdr.more") or 0
    if out["ip_version"] not in (4, 6):  # a bogus version: no IP header decoded
        out["ip_version"] = 0
    out["is_fragment"] = int(out["frag_offset"] > 0 or out["frag_mf"] > 0)
    l4 = next((p for p in protocols[1:] if p in L4), None)
    if l4 in ("tcp", "udp", "sctp"):
        out["src_port"] = first(fr, f"{l4}.srcport") or 0
        out["dst_port"] = first(fr, f"{l4}.dstport") or 0
    if l4 == "tcp":
        out["tcp_flags"] = (first(fr, "tcp.flags") or 0) & 0x1FF
    if l4 in ("icmp", "icmpv6"):
        out["icmp_type"], out["icmp_code"] = (
            first(fr, f"{l4}.type") or 0,
            first(fr, f"{l4}.code") or 0,
        )
        ident = "icmp.ident" if l4 == "icmp" else "icmpv6.echo.identifier"
        out["icmp_id"] = first(fr, ident) or 0
    if l4 == "tcp" and "tcp.len" in fr:
        out["payload_len"] = num(fr["tcp.len"][0])
    return out


def _deviation(fr: Frame, status: Status, layer: Layer) -> tuple[Status, Layer]:
    """Where vspan deliberately differs from tshark (see ``analysis/decode/__init__.py``)."""
    messages = " ".join(fr.get("_ws.expert.message", []))
    if status == Status.MALFORMED and layer == Layer.L4 and "Bad length value" in messages:
        return Status.OK, Layer.NONE  # an inconsistent UDP length falls back to the IP payload
    if status == Status.TRUNCATED and layer == Layer.L4 and "udp.checksum" in fr:
        return Status.OK, Layer.NONE  # tshark: a whole UDP header with no payload captured
    if status == Status.TRUNCATED and layer == Layer.L4 and "sctp.srcport" in fr:
        return Status.OK, Layer.NONE  # a whole SCTP common header; vspan reads no chunks
    if status == Status.TRUNCATED and "llc" in fr["frame.protocols"][0].split(":"):
        return Status.OK, Layer.NONE  # 802.3: tshark blames the length field for a cut LLC
    if status == Status.TRUNCATED and layer == Layer.L4 and set(fr) & ICMP_BYTES_4_TO_8:
        return Status.OK, Layer.NONE  # a whole 8-byte ICMP header; vspan reads no more
    return status, layer


def read(path: Path) -> tuple[FrameBatch, list[Frame]]:
    with path.open("rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        linktype = reader.datalink()
        frames = [bytes(buf) for _, buf in reader]
    ts = tshark(path)
    assert len(ts) == len(frames)
    origlen = [num(fr["frame.len"][0]) for fr in ts]
    return FrameBatch.from_frames(frames, origlen=origlen, linktype=linktype), ts


def compare(path: Path) -> int:
    batch, ts = read(path)
    d = decode_batch(batch)
    for i, fr in enumerate(ts):
        check(d, i, fr, f"{path.name} frame {i + 1}")
    return len(ts)


def check(d: Decoded, i: int, fr: Frame, where: str) -> None:
    status, layer = _deviation(fr, *stopped(fr))
    got = {name: int(col[i]) for name, col in d.columns().items()}
    assert (got["status"], got["layer"]) == (status, layer), (where, fr)
    assert got["caplen"] == num(fr["frame.cap_len"][0]), where
    want = columns(fr)
    protocols = fr["frame.protocols"][0].split(":")
    if status == Status.TRUNCATED and layer in (Layer.LINK, Layer.TAG, Layer.VLAN):
        del want["ethertype"]  # tshark shows the EtherType of a cut stack, vspan does not
    if status == Status.TRUNCATED and layer == Layer.LINK:
        del want["dst_mac"], want["src_mac"]  # vspan keeps MACs captured before the cut
    if status != Status.OK:
        want.pop("payload_len", None)
    if status == Status.TRUNCATED and layer == Layer.IP and "ip.dst" not in fr:
        del want["dst_ip_lo"]  # tshark shows the IPv4 destination after the options
    if protocols[-1] == "raw":  # tshark's RAW needs 8 bytes to choose: compare no IP field
        want = {k: v for k, v in want.items() if k not in _ip(fr, ["ip"]) | {"ethertype": 0}}
    tags = [p for p in protocols if p in TAGS]
    if status == Status.TRUNCATED and layer == Layer.VLAN and tags[-1] == "ieee8021ad":
        for name in ("vlan_depth", "vlan_outer", "vlan_inner", "vlan_outer_tpid"):
            del want[name]  # tshark shows an 802.1ad id once the next EtherType is read
    if status == Status.TRUNCATED and layer == Layer.L4:
        # tshark reads ahead before showing fields (the TCP window before the flags, the
        # whole SCTP common header, the ICMP checksum): vspan shows each field captured.
        l4 = next(p for p in protocols if p in L4)
        shown = {"src_port": f"{l4}.srcport", "dst_port": f"{l4}.dstport",
                 "tcp_flags": "tcp.flags", "icmp_type": f"{l4}.type", "icmp_code": f"{l4}.code",
                 "icmp_id": "icmp.ident" if l4 == "icmp" else "icmpv6.echo.identifier"}  # fmt: skip
        for name, key in shown.items():
            if key not in fr:
                del want[name]
    if status != Status.OK and layer == Layer.IP_EXT:
        del want["ip_proto"]  # the next header of the cut header, against tshark's last one
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert not wrong, f"{where}: column: (vspan, tshark) {wrong}"


@pytest.mark.parametrize("path", sorted(PCAPS.glob("*.pcap")) if PCAPS.is_dir() else [],
                         ids=lambda p: p.name)  # fmt: skip
def test_real_capture(path: Path) -> None:
    assert compare(path) > 0


def test_real_captures_are_there() -> None:
    if not PCAPS.is_dir():
        pytest.skip(f"{PCAPS} is absent")
    assert len(list(PCAPS.glob("*.pcap"))) >= 10


def test_truncated_real_captures_stop_where_tshark_does() -> None:
    if not PCAPS.is_dir():
        pytest.skip(f"{PCAPS} is absent")
    expect = {
        "plain__zeek__ip4-trunc.pcap": [(Status.TRUNCATED, Layer.IP)],
        "vntag__zeek__vntag_vlan_sandwich_clean.pcap": [(Status.TRUNCATED, Layer.L4)],
    }
    for name, stops in expect.items():
        batch, ts = read(PCAPS / name)
        assert [stopped(fr) for fr in ts] == stops  # the oracle itself says so
        d = decode_batch(batch)
        assert list(zip(d.status.tolist(), d.layer.tolist(), strict=True)) == stops
    batch, ts = read(PCAPS / "plain__zeek__tcp-truncated-header.pcap")
    d = decode_batch(batch)
    assert stopped(ts[0]) == (Status.TRUNCATED, Layer.L4)
    assert (d.status[0], d.layer[0], d.src_port[0], d.tcp_flags[0]) == (1, Layer.L4, 60827, 0xC2)


def write_pcap(path: Path, linktype: int, frames: list[tuple[bytes, int]]) -> None:
    """A classic pcap; records keep their wire length, so cut frames look snaplen-limited."""
    with path.open("wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype))
        for i, (data, wire) in enumerate(frames):
            fh.write(struct.pack("<IIII", i, 0, len(data), wire) + data)


def by_linktype(built: list[Built]) -> dict[int, list[Built]]:
    out: dict[int, list[Built]] = {}
    for b in built:
        out.setdefault(b.linktype, []).append(b)
    return out


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut at every byte"])
def test_generated_frames(tmp_path: Path, cut: bool) -> None:
    total = 0
    for linktype, built in by_linktype(catalogue()).items():
        path = tmp_path / f"generated-{linktype}.pcap"
        frames = [(b.data[:n], len(b.data)) for b in built
                  for n in (range(len(b.data) + 1) if cut else [len(b.data)])]  # fmt: skip
        write_pcap(path, linktype, frames)
        total += compare(path)
    assert total > (2000 if cut else 30)


def _bad_frames() -> list[bytes]:
    return [
        patched(IP4_TCP, 14, b"\x55"), patched(IP4_TCP, 14, b"\x44"),
        patched(IP4_TCP, 16, b"\x00\x13"), patched(IP4_TCP, 16, b"\x00\x1e"),
        patched(IP4_TCP, 16, b"\x00\x00"),
        patched(IP4_TCP, 46, b"\x40"), patched(IP4_TCP, 46, b"\xf0"),
        patched(IP6_UDP, 14, b"\x40"), patched(IP6_UDP, 18, b"\x00\x04"),
        patched(IP6_UDP, 58, b"\x03\xe8"), patched(IP6_UDP, 58, b"\x00\x03"),
        IP4_TCP[:12] + vlans(8) + IP4_TCP[12:],
        IP4_TCP[:12] + b"\x89\x26" + bytes(4) + vlans(3) + IP4_TCP[12:],
    ]  # fmt: skip


def test_malformed_frames(tmp_path: Path) -> None:
    # Not here, as vspan differs on purpose: more than 8 stacked tags, two VN-Tags/E-TAGs.
    path = tmp_path / "malformed.pcap"
    frames = [(f, len(f)) for f in _bad_frames()]
    ihl15 = patched(IP4_TCP, 14, b"\x4f\x00\x01\x00")  # 60-byte header, 256 bytes long
    frames.append((ihl15, 14 + 256))  # cut by the capture, not on the wire
    write_pcap(path, 1, frames)
    assert compare(path) == len(frames)
