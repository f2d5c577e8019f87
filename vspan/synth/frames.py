"""Frame bytes for the synthetic capture generator, written column by column.

Every frame is ``dst MAC | src MAC | 0x8926 | VN-Tag | [0x8100 | TCI] | IPv4/IPv6 | TCP/UDP/
ICMP | zero payload``. Headers are written into one zeroed buffer with one scatter per header
byte over all frames at once; checksums (IPv4 header, TCP, UDP, ICMP, ICMPv6) are computed
from the header columns, which is exact because payload bytes are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.wire.vntag import VNTAG_LEN, EtherType

__all__ = ["ETH_LEN", "FrameColumns", "build_frames", "frame_lengths", "header_lengths"]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

ETH_LEN: Final = 12 + 2 + VNTAG_LEN + 2
"""MACs, 0x8926, the tag and the inner EtherType."""
PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58
_L4_LEN: Final = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMP: 8, PROTO_ICMPV6: 8}
_MSS_OPTION: Final = 0x0204
"""TCP option kind 2 (MSS), length 4."""


@dataclass(frozen=True, slots=True, eq=False)
class FrameColumns:
    """One row per frame. Integer columns are ``int64`` unless said otherwise."""

    dst_mac: I64
    src_mac: I64
    tag: I64
    """The 32-bit VN-Tag word."""
    vlan: I64
    """802.1Q VLAN id after the VN-Tag, or -1 for none."""
    ipver: I64
    """4 or 6."""
    src_hi: U64
    """IPv6 source, high 64 bits (0 for IPv4)."""
    src_lo: U64
    """IPv6 source, low 64 bits; the IPv4 source address for IPv4."""
    dst_hi: U64
    dst_lo: U64
    proto: I64
    ttl: I64
    ip_id: I64
    sport: I64
    """TCP/UDP source port; the echo identifier for ICMP."""
    dport: I64
    """TCP/UDP destination port; the echo sequence number for ICMP."""
    seq: I64
    ack: I64
    flags: I64
    """TCP flags."""
    window: I64
    icmp_type: I64
    mss: I64
    """TCP MSS option value, 0 for no option."""
    payload: I64
    """Payload bytes after the L4 header (zeros)."""


def header_lengths(cols: FrameColumns) -> tuple[I64, I64]:
    """Offsets of the IP header and of the L4 header inside each frame."""
    ip_off = ETH_LEN + np.where(cols.vlan >= 0, 4, 0)
    l4_off = ip_off + np.where(cols.ipver == 6, 40, 20)
    return ip_off.astype(np.int64), l4_off.astype(np.int64)


def _l4_len(cols: FrameColumns) -> I64:
    lut = np.zeros(256, dtype=np.int64)
    for proto, size in _L4_LEN.items():
        lut[proto] = size
    return lut[cols.proto] + np.where(cols.mss > 0, 4, 0) + cols.payload


def frame_lengths(cols: FrameColumns) -> I64:
    """Wire length of each frame."""
    _, l4_off = header_lengths(cols)
    return l4_off + _l4_len(cols)


def _put(buf: npt.NDArray[np.uint8], pos: I64, value: npt.ArrayLike, width: int) -> None:
    """Write ``value`` big-endian, ``width`` bytes, at each ``pos``."""
    v = np.asarray(value).astype(np.uint64)
    for j in range(width):
        shift = np.uint64(8 * (width - 1 - j))
        buf[pos + j] = ((v >> shift) & np.uint64(0xFF)).astype(np.uint8)


def _words(value: U64, count: int) -> I64:
    """Sum of the ``count`` low 16-bit words of ``value``."""
    v = value.astype(np.uint64)
    total = np.zeros(v.shape, dtype=np.int64)
    for j in range(count):
        total += ((v >> np.uint64(16 * j)) & np.uint64(0xFFFF)).astype(np.int64)
    return total


def _fold(total: I64) -> I64:
    """Internet checksum of a one's-complement sum."""
    s = total.astype(np.int64)
    for _ in range(3):
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def _ip_sum(cols: FrameColumns, sel: npt.NDArray[np.bool_]) -> I64:
    """Sum of the address words of the rows ``sel`` (pseudo-header addresses)."""
    v6 = cols.ipver[sel] == 6
    lo = _words(cols.src_lo[sel], 4) + _words(cols.dst_lo[sel], 4)
    hi = _words(cols.src_hi[sel], 4) + _words(cols.dst_hi[sel], 4)
    return np.where(v6, lo + hi, lo)


def build_frames(cols: FrameColumns) -> tuple[npt.NDArray[np.uint8], I64, I64]:
    """The frames back to back: ``(data, offset, length)``."""
    length = frame_lengths(cols)
    n = length.shape[0]
    offset = np.zeros(n, dtype=np.int64)
    if n:
        offset[1:] = np.cumsum(length[:-1])
    buf = np.zeros(int(length.sum()), dtype=np.uint8)
    ip_off, l4_off = header_lengths(cols)
    _put(buf, offset, cols.dst_mac, 6)
    _put(buf, offset + 6, cols.src_mac, 6)
    _put(buf, offset + 12, EtherType.VNTAG, 2)
    _put(buf, offset + 14, cols.tag, 4)
    ip_type = np.where(cols.ipver == 6, EtherType.IPV6, EtherType.IPV4)
    tagged = cols.vlan >= 0
    _put(buf, offset + 18, np.where(tagged, EtherType.DOT1Q, ip_type), 2)
    _put(buf, offset[tagged] + 20, cols.vlan[tagged], 2)
    _put(buf, offset[tagged] + 22, ip_type[tagged], 2)
    l4_len = _l4_len(cols)
    _write_ip(buf, cols, offset + ip_off, l4_len)
    _write_l4(buf, cols, offset + l4_off, l4_len)
    return buf, offset, length


def _write_ip(buf: npt.NDArray[np.uint8], cols: FrameColumns, pos: I64, l4_len: I64) -> None:
    v4 = cols.ipver == 4
    p, n = pos[v4], l4_len[v4]
    src, dst = cols.src_lo[v4], cols.dst_lo[v4]
    total = n + 20
    ttl_proto = (cols.ttl[v4] << 8) | cols.proto[v4]
    word_sum = 0x4500 + total + cols.ip_id[v4] + 0x4000 + ttl_proto
    csum = _fold(word_sum + _words(src, 2) + _words(dst, 2))
    _put(buf, p, 0x45, 1)
    _put(buf, p + 2, total, 2)
    _put(buf, p + 4, cols.ip_id[v4], 2)
    _put(buf, p + 6, 0x4000, 2)  # don't fragment
    _put(buf, p + 8, ttl_proto, 2)
    _put(buf, p + 10, csum, 2)
    _put(buf, p + 12, src, 4)
    _put(buf, p + 16, dst, 4)
    v6 = ~v4
    p = pos[v6]
    buf[p] = 0x60  # version 6; traffic class and flow label 0
    _put(buf, p + 4, l4_len[v6], 2)
    _put(buf, p + 6, cols.proto[v6], 1)
    _put(buf, p + 7, cols.ttl[v6], 1)
    _put(buf, p + 8, cols.src_hi[v6], 8)
    _put(buf, p + 16, cols.src_lo[v6], 8)
    _put(buf, p + 24, cols.dst_hi[v6], 8)
    _put(buf, p + 32, cols.dst_lo[v6], 8)


def _write_l4(buf: npt.NDArray[np.uint8], cols: FrameColumns, pos: I64, l4_len: I64) -> None:
    tcp = cols.proto == PROTO_TCP
    p = pos[tcp]
    seq, ack = cols.seq[tcp], cols.ack[tcp]
    mss = cols.mss[tcp]
    doff_flags = ((np.where(mss > 0, 6, 5) << 12) | cols.flags[tcp]).astype(np.int64)
    opt = np.where(mss > 0, _MSS_OPTION + mss, 0)
    head = cols.sport[tcp] + cols.dport[tcp] + doff_flags + cols.window[tcp] + opt
    head = head + _words(seq.astype(np.uint64), 2) + _words(ack.astype(np.uint64), 2)
    pseudo = _ip_sum(cols, tcp) + PROTO_TCP + l4_len[tcp]
    _put(buf, p, cols.sport[tcp], 2)
    _put(buf, p + 2, cols.dport[tcp], 2)
    _put(buf, p + 4, seq, 4)
    _put(buf, p + 8, ack, 4)
    _put(buf, p + 12, doff_flags, 2)
    _put(buf, p + 14, cols.window[tcp], 2)
    _put(buf, p + 16, _fold(head + pseudo), 2)
    has_mss = mss > 0
    _put(buf, p[has_mss] + 20, _MSS_OPTION, 2)
    _put(buf, p[has_mss] + 22, mss[has_mss], 2)

    udp = cols.proto == PROTO_UDP
    p, n = pos[udp], l4_len[udp]
    pseudo = _ip_sum(cols, udp) + PROTO_UDP + n
    csum = _fold(cols.sport[udp] + cols.dport[udp] + n + pseudo)
    _put(buf, p, cols.sport[udp], 2)
    _put(buf, p + 2, cols.dport[udp], 2)
    _put(buf, p + 4, n, 2)
    _put(buf, p + 6, np.where(csum == 0, 0xFFFF, csum), 2)

    icmp = (cols.proto == PROTO_ICMP) | (cols.proto == PROTO_ICMPV6)
    p = pos[icmp]
    v6 = cols.proto[icmp] == PROTO_ICMPV6
    head = (cols.icmp_type[icmp] << 8) + cols.sport[icmp] + cols.dport[icmp]
    pseudo = np.where(v6, _ip_sum(cols, icmp) + PROTO_ICMPV6 + l4_len[icmp], 0)
    _put(buf, p, cols.icmp_type[icmp], 1)
    _put(buf, p + 2, _fold(head + pseudo), 2)
    _put(buf, p + 4, cols.sport[icmp], 2)
    _put(buf, p + 6, cols.dport[icmp], 2)
