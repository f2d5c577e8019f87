"""IPv4, IPv6 and IPv6 extension headers, for the columnar decoder (``decode.py``).

Each function takes a set of frames (``rows``) with the offset of their header (``pos``),
fills the columns it owns, records a status for frames that stop, and hands the rest on.

* IPv4: version 4, IHL >= 5 and total length >= IHL * 4, else MALFORMED at IP; the whole
  IHL * 4 header must be captured, else TRUNCATED at IP. A total length of 0 is taken from
  the frame (TCP segmentation offload), as tshark does.
* IPv6: version 6, 40 bytes captured; then extension headers HBH (0), routing (43),
  fragment (44), destination options (60) and AH (51), at most ``MAX_EXT``. A cut extension
  header is TRUNCATED at IP_EXT; one reaching past the payload length is MALFORMED there.
  A payload length of 0 (jumbogram, offload) is taken from the frame.
* Only first fragments (offset 0) go on to L4 (``decode_l4``); others are OK with
  ``l4_offset == -1`` and the IP payload as ``payload_len``.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from .columns import IPV4_MAPPED_PREFIX, Layer, Status
from .decode_l4 import decode_l4
from .decode_window import I32, U8, Frames, Rows, Seen, be16, be32, be64

__all__ = ["MAX_EXT", "decode_ip"]

MAX_EXT: Final = 8
"""IPv6 extension headers walked; a longer chain is MALFORMED at IP_EXT."""
_EXT_WINDOW: Final = 8

_HBH, _ROUTING, _FRAGMENT, _AH, _DSTOPTS = 0, 43, 44, 51, 60
_IS_EXT = np.zeros(256, np.bool_)
_IS_EXT[[_HBH, _ROUTING, _FRAGMENT, _AH, _DSTOPTS]] = True


def decode_ip(f: Frames, rows: Rows, pos: I32, version: U8) -> None:
    """Decode the IP header at ``pos`` of ``rows``, whose link layer claims ``version``."""
    f.out.l3_offset[rows] = pos
    for ver, width, decode in ((4, 20, _ipv4), (6, 40, _ipv6)):
        mine = version == ver
        r, p = (rows, pos) if mine.all() else (rows[mine], pos[mine])
        if not r.size:
            continue
        w, avail = f.window(r, p, width)
        empty = avail < 1
        wrong = ~empty & ((w[:, 0] >> 4) != ver)
        if empty.any() or wrong.any():
            f.stop(r[empty], Status.TRUNCATED, Layer.IP)
            f.stop(r[wrong], Status.MALFORMED, Layer.IP)
            go = np.flatnonzero(~empty & ~wrong)
            r, p, w, avail = r[go], p[go], w[go], avail[go]
        decode(f, r, p, w, avail)


def _ipv4(f: Frames, rows: Rows, pos: I32, w: U8, avail: I32) -> None:
    o = f.out
    o.ip_version[rows] = 4
    hlen = (w[:, 0] & 0x0F).astype(np.int32) * 4
    tlen = be16(w, 2).astype(np.int32)
    tlen = np.where(tlen == 0, f.wire[rows] - pos, tlen)  # offload: as long as the frame
    bad_ihl = hlen < 20
    bad_len = ~bad_ihl & (avail >= 4) & (tlen < hlen)
    malformed = bad_ihl | bad_len
    f.stop(rows[malformed], Status.MALFORMED, Layer.IP)
    seen = Seen(np.where(malformed, 0, avail), 20)  # tshark shows no field after a bogus one
    frag = be16(w, 6)
    offset = seen.keep((frag & 0x1FFF).astype(np.int32) * 8, 8)
    more = seen.keep(((frag >> 13) & 1).astype(np.uint8), 8)
    o.frag_offset[rows], o.frag_mf[rows] = offset, more
    o.is_fragment[rows] = (offset > 0) | (more > 0)
    o.frag_id[rows] = seen.keep(be16(w, 4), 6)
    o.ip_ttl[rows] = seen.keep(w[:, 8], 9)
    o.ip_proto[rows] = seen.keep(w[:, 9], 10)
    o.src_ip_lo[rows] = seen.keep(be32(w, 12) | IPV4_MAPPED_PREFIX, 16)
    o.dst_ip_lo[rows] = seen.keep(be32(w, 16) | IPV4_MAPPED_PREFIX, 20)
    payload = np.maximum(tlen - hlen, 0)
    o.payload_len[rows] = seen.keep(payload, 4)
    cut = ~malformed & (avail < hlen)
    f.stop(rows[cut], Status.TRUNCATED, Layer.IP)
    go = np.flatnonzero(~malformed & ~cut & (offset == 0))
    decode_l4(f, rows[go], pos[go] + hlen[go], w[go, 9], payload[go])


def _ipv6(f: Frames, rows: Rows, pos: I32, w: U8, avail: I32) -> None:
    o = f.out
    o.ip_version[rows] = 6
    plen = be16(w, 4).astype(np.int32)
    plen = np.where(plen == 0, np.maximum(f.wire[rows] - pos - 40, 0), plen)
    seen = Seen(avail, 40)
    o.payload_len[rows] = seen.keep(plen, 6)
    o.ip_proto[rows] = seen.keep(w[:, 6], 7)
    o.ip_ttl[rows] = seen.keep(w[:, 7], 8)
    o.src_ip_hi[rows], o.src_ip_lo[rows] = seen.keep(be64(w, 8), 24), seen.keep(be64(w, 16), 24)
    o.dst_ip_hi[rows], o.dst_ip_lo[rows] = seen.keep(be64(w, 24), 40), seen.keep(be64(w, 32), 40)
    if seen.whole:
        _ipv6_ext(f, rows, pos + 40, w[:, 6], plen)
        return
    f.stop(rows[avail < 40], Status.TRUNCATED, Layer.IP)
    go = np.flatnonzero(avail >= 40)
    _ipv6_ext(f, rows[go], pos[go] + 40, w[go, 6], plen[go])


def _ipv6_ext(f: Frames, rows: Rows, pos: I32, nh: U8, plen: I32) -> None:
    """Walk the extension headers after the IPv6 fixed header, then go on to L4."""
    o = f.out
    nh, pos = nh.copy(), pos.copy()
    used = np.zeros(rows.size, np.int32)  # extension header bytes
    walking = np.ones(rows.size, np.bool_)
    to_l4 = np.ones(rows.size, np.bool_)
    for level in range(MAX_EXT + 1):
        e = np.flatnonzero(walking & _IS_EXT[nh])
        if not e.size:
            break
        if level == MAX_EXT:
            f.stop(rows[e], Status.MALFORMED, Layer.IP_EXT)
            walking[e] = to_l4[e] = False
            break
        w, avail = f.window(rows[e], pos[e], _EXT_WINDOW)
        kind = nh[e]
        size = (w[:, 1].astype(np.int32) + 1) * 8
        size[kind == _AH] = (w[kind == _AH, 1].astype(np.int32) + 2) * 4
        size[kind == _FRAGMENT] = 8
        need = np.where((avail >= 2) | (kind == _FRAGMENT), size, 2)
        bad = used[e] + need > plen[e]
        cut = ~bad & (avail < need)
        f.stop(rows[e[bad]], Status.MALFORMED, Layer.IP_EXT)
        f.stop(rows[e[cut]], Status.TRUNCATED, Layer.IP_EXT)
        walking[e[bad | cut]] = to_l4[e[bad | cut]] = False
        ok = ~bad & ~cut
        frag = np.flatnonzero(ok & (kind == _FRAGMENT))
        word = be16(w[frag], 2)
        offset = (word >> 3).astype(np.int32) * 8
        more = (word & 1).astype(np.uint8)
        fr = rows[e[frag]]
        o.frag_offset[fr], o.frag_mf[fr] = offset, more
        o.is_fragment[fr] = (offset > 0) | (more > 0)
        o.frag_id[fr] = be32(w[frag], 4)
        later = e[frag[offset > 0]]  # a non-first fragment: the rest is not a header
        walking[later] = to_l4[later] = False
        e, w, size = e[ok], w[ok], size[ok]
        nh[e], pos[e], used[e] = w[:, 0], pos[e] + size, used[e] + size
    payload = np.maximum(plen - used, 0)
    o.ip_proto[rows], o.payload_len[rows] = nh, payload
    go = np.flatnonzero(to_l4)
    decode_l4(f, rows[go], pos[go], nh[go], payload[go])
