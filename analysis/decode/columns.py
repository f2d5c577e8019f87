"""The decoded batch: equal-length numpy columns, one row per frame.

This is the contract between the columnar decoder (``vspan.analysis.decode``) and everything
after it (flows, reports, the analyzer). Rows are in the order of the ``FrameBatch`` they
came from. Integer sentinels stand for "absent" (documented per column) so that no column
needs masks or objects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ICMP_ECHO_TYPES",
    "IPV4_MAPPED_PREFIX",
    "NO_MAC",
    "Decoded",
    "Layer",
    "Status",
    "TagKind",
]

IPV4_MAPPED_PREFIX = np.uint64(0x0000_FFFF_0000_0000)
"""IPv4 addresses are stored as IPv4-mapped IPv6 (``::ffff:a.b.c.d``): hi = 0,
lo = this prefix | the 32-bit address."""
ICMP_ECHO_TYPES = {1: (0, 8), 58: (128, 129)}
"""IP protocol (ICMP, ICMPv6) → its echo reply and request types, the messages whose header
carries an identifier (``icmp_id``): a request and its replies form one flow."""
NO_MAC = np.uint64(1 << 48)
"""``src_mac``/``dst_mac`` of a frame without that address: link types without MACs (NULL,
RAW; Linux cooked captures carry only the sender's, so vspan takes neither), or an Ethernet
header cut before it. Outside the 48-bit range, so never a real MAC (all zeros is one)."""


class Status(IntEnum):
    """How far a frame decoded."""

    OK = 0
    """Decoded as far as vspan goes: through L4 for IP, through the link layer otherwise
    (ARP, 802.3/LLC and other EtherTypes are OK with ``ip_version == 0``)."""
    TRUNCATED = 1
    """The captured bytes end inside the layer named by ``layer``."""
    MALFORMED = 2
    """A header at ``layer`` contradicts its format (bad IP version, header length, ...)."""
    UNSUPPORTED = 3
    """A link type (or encapsulation at ``layer``) vspan does not decode."""


class Layer(IntEnum):
    """Where decoding stopped for a frame that is not OK (``NONE`` for OK frames)."""

    NONE = 0
    LINK = 1
    """Ethernet (or the pcap link-layer header)."""
    TAG = 2
    """VN-Tag or E-TAG."""
    VLAN = 3
    """802.1Q / 802.1ad / 0x9100 tags."""
    IP = 4
    """IPv4 header or IPv6 fixed header."""
    IP_EXT = 5
    """IPv4 options are in IP; this is IPv6 extension headers."""
    L4 = 6
    """TCP, UDP, ICMP, ICMPv6, SCTP headers."""


class TagKind(IntEnum):
    """Which virtual-interface tag a frame carries."""

    NONE = 0
    VNTAG = 1
    ETAG = 2


U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class Decoded:
    """One row per frame. Unless noted, a column is 0 where its layer is absent."""

    ts_ns: I64
    """Capture time, ns since the epoch."""
    caplen: I32
    """Captured bytes."""
    wirelen: I32
    """Bytes on the wire (``orig_len``), tag included."""
    host: U32
    """collector_id that observed the frame (0 unknown)."""
    iface: I32
    """pcapng interface index (0 for classic pcap)."""
    status: U8
    """``Status``."""
    layer: U8
    """``Layer`` where decoding stopped (``NONE`` when ``status`` is OK)."""
    dst_mac: U64
    """Destination MAC as a 48-bit integer; ``NO_MAC`` when the frame has none."""
    src_mac: U64
    """Source MAC as a 48-bit integer; ``NO_MAC`` when the frame has none."""
    tag_kind: U8
    """``TagKind``."""
    tag_d: U8
    """VN-Tag direction d."""
    tag_p: U8
    """VN-Tag pointer p."""
    tag_l: U8
    """VN-Tag looped l."""
    tag_version: U8
    """VN-Tag version."""
    dvif: U32
    """VN-Tag dvif, or E-TAG E-CID (20 bits)."""
    svif: U32
    """VN-Tag svif, or E-TAG ingress E-CID (20 bits)."""
    etag_pcp: U8
    """E-TAG E-PCP."""
    etag_dei: U8
    """E-TAG E-DEI."""
    etag_grp: U8
    """E-TAG GRP."""
    vlan_depth: U8
    """Number of VLAN tags (802.1Q 0x8100, 802.1ad 0x88A8, 0x9100), before and after the tag."""
    vlan_before_tag: U8
    """How many of those VLAN tags come before the VN-Tag/E-TAG (0 without a tag)."""
    vlan_outer: I32
    """VLAN id of the outermost tag; -1 when there is none."""
    vlan_inner: I32
    """VLAN id nearest the IP header (the innermost tag); -1 when there is none."""
    vlan_outer_tpid: U16
    """TPID of the outermost VLAN tag (0 when none)."""
    ethertype: U16
    """EtherType after every tag; 0 for an 802.3 frame (length field, LLC follows)."""
    ip_version: U8
    """4, 6, or 0 when the frame has no decoded IP header."""
    src_ip_hi: U64
    """High 64 bits of the source address (IPv4 as ``::ffff:a.b.c.d``)."""
    src_ip_lo: U64
    """Low 64 bits of the source address."""
    dst_ip_hi: U64
    """High 64 bits of the destination address."""
    dst_ip_lo: U64
    """Low 64 bits of the destination address."""
    ip_proto: U8
    """Upper-layer protocol after IPv6 extension headers (HBH, routing, fragment, dest opts, AH)."""
    ip_ttl: U8
    """IPv4 TTL or IPv6 hop limit."""
    frag_offset: I32
    """Fragment offset in bytes (IPv4, or an IPv6 fragment header)."""
    frag_mf: U8
    """More-fragments flag."""
    is_fragment: U8
    """1 when the packet is a fragment (offset > 0 or MF set)."""
    frag_id: U32
    """IPv4 identification, or the identification of an IPv6 fragment header (0 without
    one): with the addresses and protocol it ties the fragments of one datagram together."""
    l3_offset: I32
    """Offset of the IP header in the frame; -1 when none."""
    l4_offset: I32
    """Offset of the L4 header in the frame; -1 when none (including non-first fragments)."""
    src_port: U16
    """TCP/UDP/SCTP source port (first fragments only)."""
    dst_port: U16
    """TCP/UDP/SCTP destination port (first fragments only)."""
    icmp_type: U8
    """ICMP or ICMPv6 type."""
    icmp_code: U8
    """ICMP or ICMPv6 code."""
    icmp_id: U16
    """Echo identifier of ICMP/ICMPv6 echo request and reply."""
    tcp_flags: U16
    """TCP flags (9 bits: NS CWR ECE URG ACK PSH RST SYN FIN)."""
    payload_len: I32
    """L4 payload bytes as the IP/L4 length fields state (not limited by the capture);
    the IP payload for non-first fragments and other protocols; 0 without IP."""
    fingerprint: U64
    """The packet's identity, the same in every copy of it (the sender's and the receiver's
    host): a hash of the header fields that change from packet to packet and not on the way
    — IPv4 identification, total length, flags and fragment offset; IPv6 flow label and
    payload length (and a fragment header's identification and offset); the protocol; then
    TCP sequence, acknowledgement, data offset and flags, window and checksum, UDP length
    and checksum, the whole 8-byte ICMP/ICMPv6 header, SCTP verification tag and checksum.
    MACs, tags, VLANs, TTL/hop limit, TOS/traffic class and the IPv4 header checksum are
    left out (they change when a packet is routed or re-marked). Never 0 for a frame whose
    IP header, and for those protocols the L4 header fields above, were captured; 0 for
    others (non-IP, cut headers): no identity. Two different packets share one only when
    all those fields are equal (a duplicate, or a hash collision); flows pair copies with
    that in mind (``flows``)."""

    def __len__(self) -> int:
        return int(self.ts_ns.shape[0])

    @classmethod
    def column_names(cls) -> tuple[str, ...]:
        """The column names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        """Name to column."""
        return {name: getattr(self, name) for name in self.column_names()}

    def to_pandas(self) -> pd.DataFrame:
        """The columns as a DataFrame (no copy where pandas allows)."""
        import pandas as pd  # not at import: the per-batch path of ``vspan report`` needs none

        return pd.DataFrame(self.columns(), copy=False)

    def take(self, index: npt.NDArray[Any]) -> Decoded:
        """The rows selected by an index or boolean mask."""
        return Decoded(**{name: col[index] for name, col in self.columns().items()})

    @classmethod
    def concat(cls, parts: list[Decoded]) -> Decoded:
        """Rows of several batches, in order."""
        names = cls.column_names()
        if not parts:
            raise ValueError("concat needs at least one part")
        return cls(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})
