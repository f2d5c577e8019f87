"""IPv4, IPv6 and IPv6 extension headers: the IP stages of the decoding kernel (private).

* IPv4: version 4, IHL >= 5 and total length >= IHL * 4, else MALFORMED at IP; the whole
  IHL * 4 header must be captured, else TRUNCATED at IP. A total length of 0 is taken from
  the frame (TCP segmentation offload), as tshark does.
* IPv6: version 6, 40 bytes captured; then extension headers HBH (0), routing (43),
  fragment (44), destination options (60) and AH (51), at most ``MAX_EXT``. A cut extension
  header is TRUNCATED at IP_EXT; one reaching past the payload length is MALFORMED there.
  A payload length of 0 (jumbogram, offload) is taken from the frame.
* Only first fragments (offset 0) go on to ``L4``; others are OK with ``l4_offset == -1``
  and the IP payload as ``payload_len``.

Lengths are computed as the int32 columns hold them (``wrap32``), so a wire length near the
int32 limits gives the payload it always did.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from vspan.analysis.decode._common import (
    CAP,
    DONE,
    IPV4,
    IPV6,
    IPV6_EXT,
    KIND,
    L4,
    L_IP,
    L_IP_EXT,
    LENGTH,
    MALFORMED,
    POS,
    START,
    STEP,
    TRUNCATED,
    Frames,
    State,
    be16,
    be32,
    be64,
    byte,
    fold,
    wrap32,
)
from vspan.analysis.decode.columns import IPV4_MAPPED_PREFIX, Decoded
from vspan.kernels import kernel

__all__ = ["MAX_EXT", "ipv4_headers", "ipv6_extensions", "ipv6_headers"]

MAX_EXT: Final = 8
"""IPv6 extension headers walked; a longer chain is MALFORMED at IP_EXT."""

_V4_PREFIX: Final = int(IPV4_MAPPED_PREFIX)
# IPv4 header (RFC 791): version/IHL, total length, identification, flags/fragment offset,
# TTL, protocol, source, destination; the smallest header.
_V4_TLEN, _V4_ID, _V4_FRAG, _V4_TTL, _V4_PROTO, _V4_SRC, _V4_DST = 2, 4, 6, 8, 9, 12, 16
_V4_SEED, _V6_SEED = np.uint64(4), np.uint64(6)
"""Where a fingerprint's hash starts: the two IP versions never share one."""
_FLOW_LABEL = 0xFFFFF
_V4_MIN: Final = 20
# IPv6 fixed header (RFC 8200): payload length, next header, hop limit, source, destination.
_V6_PLEN, _V6_NEXT, _V6_HLIM, _V6_SRC, _V6_DST, _V6_LEN = 4, 6, 7, 8, 24, 40

_HBH, _ROUTING, _FRAGMENT, _AH, _DSTOPTS = 0, 43, 44, 51, 60
_IS_EXT = np.zeros(256, np.bool_)
_IS_EXT[[_HBH, _ROUTING, _FRAGMENT, _AH, _DSTOPTS]] = True
_FRAG_LEN: Final = 8
"""The fragment header's size; ``(len + 1) * 8`` bytes for the others, AH ``(len + 2) * 4``."""
# Extension header fields: next header, length; the fragment header's offset word and id.
_EXT_NEXT, _EXT_LEN, _FRAG_WORD, _FRAG_ID = 0, 1, 2, 4


@kernel
def _ip_start(first: int, avail: int, version: int) -> tuple[int, int]:
    """(status, layer) of an IP header of ``avail`` bytes, the first of them ``first``: (0, 0)
    when it may be decoded as IP ``version``."""
    if avail < 1:
        return TRUNCATED, L_IP
    if first >> 4 != version:
        return MALFORMED, L_IP
    return 0, 0


@kernel
def ipv4_headers(lo: int, hi: int, fr: Frames, out: Decoded, st: State) -> None:
    """Decode the IPv4 headers of the ``IPV4`` frames of ``lo .. hi``; first fragments go on
    to ``L4``."""
    data, wirelen = fr.data, fr.wirelen
    status, layer, l3_offset, ip_version = out.status, out.layer, out.l3_offset, out.ip_version
    ip_ttl, ip_proto, payload_len = out.ip_ttl, out.ip_proto, out.payload_len
    frag_offset, frag_mf, frag_id = out.frag_offset, out.frag_mf, out.frag_id
    is_fragment, src_ip_lo, dst_ip_lo = out.is_fragment, out.src_ip_lo, out.dst_ip_lo
    fingerprint = out.fingerprint
    first = np.uint64(lo)  # unsigned indices: numba adds no negative-index wraparound
    for j in range(np.uint64(hi - lo)):
        if st[STEP, j] != IPV4:
            continue
        i, pos = first + j, st[POS, j]
        s, avail = st[START, j] + pos, st[CAP, j] - pos
        st[STEP, j] = DONE
        l3_offset[i] = pos
        stop, where = _ip_start(byte(data, s) if avail >= 1 else 0, avail, 4)
        if stop:
            status[i] = stop
            layer[i] = where
            continue
        ip_version[i] = 4
        hlen = (byte(data, s) & 0x0F) * 4
        tlen = 0
        has_tlen = avail >= _V4_TLEN + 2
        if has_tlen:
            tlen = be16(data, s + _V4_TLEN)
            if tlen == 0:  # offload: as long as the frame
                tlen = wrap32(int(np.int64(wirelen[i])) - pos)
        if hlen < _V4_MIN or (has_tlen and tlen < hlen):
            status[i] = MALFORMED  # and tshark shows no field after a bogus one
            layer[i] = L_IP
            continue
        offset = 0
        if avail >= _V4_FRAG + 2:
            frag = be16(data, s + _V4_FRAG)
            offset = (frag & 0x1FFF) * 8
            frag_offset[i] = offset
            frag_mf[i] = (frag >> 13) & 1
            is_fragment[i] = 1 if offset > 0 or frag & 0x2000 else 0
        if avail >= _V4_ID + 2:
            frag_id[i] = be16(data, s + _V4_ID)
        if avail >= _V4_TTL + 1:
            ip_ttl[i] = byte(data, s + _V4_TTL)
        if avail >= _V4_PROTO + 1:
            ip_proto[i] = byte(data, s + _V4_PROTO)
        if avail >= _V4_SRC + 4:
            src_ip_lo[i] = _V4_PREFIX | be32(data, s + _V4_SRC)
        if avail >= _V4_DST + 4:
            dst_ip_lo[i] = _V4_PREFIX | be32(data, s + _V4_DST)
        payload = max(wrap32(tlen - hlen), 0)
        if has_tlen:
            payload_len[i] = payload
        if avail < hlen:
            status[i] = TRUNCATED
            layer[i] = L_IP
            continue
        # identification, total length, flags and offset, protocol (TTL, TOS and checksum
        # change on the way)
        ident = (be32(data, s + _V4_ID) << 24) | (be16(data, s + _V4_TLEN) << 8)
        fingerprint[i] = fold(_V4_SEED, ident | ip_proto[i])
        if offset == 0:
            st[STEP, j] = L4
            st[POS, j] = pos + hlen
            st[KIND, j] = ip_proto[i]  # read above: the whole header is there
            st[LENGTH, j] = payload


@kernel
def ipv6_headers(lo: int, hi: int, fr: Frames, out: Decoded, st: State) -> None:
    """Decode the IPv6 fixed headers of the ``IPV6`` frames of ``lo .. hi``; those captured
    whole go on to ``IPV6_EXT``."""
    data, wirelen = fr.data, fr.wirelen
    status, layer, l3_offset, ip_version = out.status, out.layer, out.l3_offset, out.ip_version
    ip_ttl, ip_proto, payload_len = out.ip_ttl, out.ip_proto, out.payload_len
    src_ip_hi, src_ip_lo, dst_ip_hi, dst_ip_lo = (
        out.src_ip_hi, out.src_ip_lo, out.dst_ip_hi, out.dst_ip_lo,
    )  # fmt: skip
    fingerprint = out.fingerprint
    first = np.uint64(lo)  # unsigned indices: numba adds no negative-index wraparound
    for j in range(np.uint64(hi - lo)):
        if st[STEP, j] != IPV6:
            continue
        i, pos = first + j, st[POS, j]
        s, avail = st[START, j] + pos, st[CAP, j] - pos
        st[STEP, j] = DONE
        l3_offset[i] = pos
        stop, where = _ip_start(byte(data, s) if avail >= 1 else 0, avail, 6)
        if stop:
            status[i] = stop
            layer[i] = where
            continue
        ip_version[i] = 6
        plen = 0
        if avail >= _V6_PLEN + 2:
            plen = be16(data, s + _V6_PLEN)
            if plen == 0:  # a jumbogram, or offload: as long as the frame
                plen = max(wrap32(int(np.int64(wirelen[i])) - pos - _V6_LEN), 0)
            payload_len[i] = plen
        if avail >= _V6_NEXT + 1:
            ip_proto[i] = byte(data, s + _V6_NEXT)
        if avail >= _V6_HLIM + 1:
            ip_ttl[i] = byte(data, s + _V6_HLIM)
        if avail >= _V6_SRC + 16:
            src_ip_hi[i] = be64(data, s + _V6_SRC)
            src_ip_lo[i] = be64(data, s + _V6_SRC + 8)
        if avail >= _V6_DST + 16:
            dst_ip_hi[i] = be64(data, s + _V6_DST)
            dst_ip_lo[i] = be64(data, s + _V6_DST + 8)
        if avail < _V6_LEN:
            status[i] = TRUNCATED
            layer[i] = L_IP
        else:
            # flow label, payload length, next header (traffic class and hop limit change)
            label = be32(data, s) & _FLOW_LABEL
            ident = (label << 24) | (be16(data, s + _V6_PLEN) << 8) | byte(data, s + _V6_NEXT)
            fingerprint[i] = fold(_V6_SEED, ident)
            st[STEP, j] = IPV6_EXT
            st[POS, j] = pos + _V6_LEN
            st[KIND, j] = byte(data, s + _V6_NEXT)
            st[LENGTH, j] = plen


@kernel
def ipv6_extensions(lo: int, hi: int, fr: Frames, out: Decoded, st: State) -> None:
    """Walk the extension headers of the ``IPV6_EXT`` frames of ``lo .. hi``; fill
    ``ip_proto`` and ``payload_len``; first fragments go on to ``L4``."""
    data, status, layer = fr.data, out.status, out.layer
    ip_proto, payload_len = out.ip_proto, out.payload_len
    frag_offset, frag_mf, is_fragment = out.frag_offset, out.frag_mf, out.is_fragment
    frag_id, fingerprint = out.frag_id, out.fingerprint
    first = np.uint64(lo)  # unsigned indices: numba adds no negative-index wraparound
    for j in range(np.uint64(hi - lo)):
        if st[STEP, j] != IPV6_EXT:
            continue
        i, s, cap = first + j, st[START, j], st[CAP, j]
        pos, nh, plen = st[POS, j], st[KIND, j], st[LENGTH, j]
        used = 0  # extension header bytes
        step = L4
        for level in range(MAX_EXT + 1):
            if not _IS_EXT[nh]:
                break
            if level == MAX_EXT:
                status[i] = MALFORMED
                layer[i] = L_IP_EXT
                step = DONE
                break
            avail = cap - pos
            size = need = 2  # until the length field is captured
            if nh == _FRAGMENT:
                size = need = _FRAG_LEN
            elif avail >= _EXT_LEN + 1:
                units = byte(data, s + pos + _EXT_LEN)
                size = need = (units + 2) * 4 if nh == _AH else (units + 1) * 8
            if used + need > plen:
                status[i] = MALFORMED
                layer[i] = L_IP_EXT
                step = DONE
                break
            if avail < need:
                status[i] = TRUNCATED
                layer[i] = L_IP_EXT
                step = DONE
                break
            later = False
            if nh == _FRAGMENT:
                word = be16(data, s + pos + _FRAG_WORD)
                offset = (word >> 3) * 8
                frag_offset[i] = offset
                frag_mf[i] = word & 1
                is_fragment[i] = 1 if offset > 0 or word & 1 else 0
                frag_id[i] = be32(data, s + pos + _FRAG_ID)
                fingerprint[i] = fold(fingerprint[i], (word << 32) | frag_id[i])
                later = offset > 0  # a non-first fragment: the rest is not a header
            nh, pos, used = byte(data, s + pos + _EXT_NEXT), pos + size, used + size
            if later:
                step = DONE
                break
        payload = max(plen - used, 0)
        ip_proto[i] = nh
        payload_len[i] = payload
        st[STEP, j] = step
        st[POS, j] = pos
        st[KIND, j] = nh
        st[LENGTH, j] = payload
