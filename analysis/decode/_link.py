"""Link layers and VLAN / VN-Tag / E-TAG stacks: the first stages of the decoding kernel.

``link_layers`` reads the link header of Ethernet, Linux cooked v1 and v2, NULL and RAW
frames; ``tag_stacks`` walks the tags after an EtherType and fills ``ethertype``. Header
layouts are the tables below; those of the tags come from ``vspan.wire.vntag``. (Private; the
stages are described in ``decode._common``.)
"""

from __future__ import annotations

from typing import Final

import numpy as np

from vspan.analysis.decode._common import (
    CAP,
    DONE,
    ETHER,
    IPV4,
    IPV6,
    KIND,
    L_IP,
    L_LINK,
    L_TAG,
    L_VLAN,
    MALFORMED,
    POS,
    START,
    STEP,
    TRUNCATED,
    UNSUPPORTED,
    Frames,
    State,
    be16,
    be32,
    be48,
    byte,
)
from vspan.analysis.decode.columns import Decoded, TagKind
from vspan.batch import LinkType
from vspan.kernels import kernel
from vspan.wire.vntag import ETAG_FIELDS, ETAG_LAYOUT, ETAG_LEN, VNTAG_LAYOUT, VNTAG_LEN, EtherType

__all__ = ["MAX_STACK", "link_layers", "tag_stacks"]

MAX_STACK: Final = 8
"""Most VLAN tags plus VN-Tag/E-TAG a frame may stack; one more is MALFORMED at VLAN."""

_ETHERNET, _NULL, _RAW = int(LinkType.ETHERNET), int(LinkType.NULL), int(LinkType.RAW)
_SLL, _SLL2 = int(LinkType.LINUX_SLL), int(LinkType.LINUX_SLL2)
_ETHERTYPE_LINKS: Final = {
    LinkType.ETHERNET: (12, 14),
    LinkType.LINUX_SLL: (14, 16),
    LinkType.LINUX_SLL2: (0, 20),
}
"""EtherType-carrying link types: (offset of the EtherType, header length)."""
_ETH_AT, _ETH_LEN = _ETHERTYPE_LINKS[LinkType.ETHERNET]
_SLL_AT, _SLL_LEN = _ETHERTYPE_LINKS[LinkType.LINUX_SLL]
_SLL2_AT, _SLL2_LEN = _ETHERTYPE_LINKS[LinkType.LINUX_SLL2]
_DST_MAC, _SRC_MAC, _MAC_LEN = 0, 6, 6
"""Where Ethernet's MACs are (no other link type has MACs)."""

_NULL_LEN: Final = 4
_NULL_FAMILY: Final = {2: 4, 24: 6, 28: 6, 30: 6}
"""DLT_NULL address family (host order) to IP version: AF_INET and the BSDs' AF_INET6."""
_NULL_VERSION = np.zeros(max(_NULL_FAMILY) + 1, np.int64)
_NULL_VERSION[list(_NULL_FAMILY)] = list(_NULL_FAMILY.values())
_ET_IPV4, _ET_IPV6 = int(EtherType.IPV4), int(EtherType.IPV6)
_MIN_ETHERTYPE: Final = 0x0600
"""Smaller values in the EtherType field are an 802.3 length (LLC follows)."""

_VLAN, _VNTAG, _ETAG = 1, 2, 3
_TAG_OF = np.zeros(1 << 16, np.uint8)
"""EtherType to the tag it introduces (0 for none)."""
for _tpid in (EtherType.DOT1Q, EtherType.DOT1AD, EtherType.QINQ_9100):
    _TAG_OF[_tpid] = _VLAN
_TAG_OF[EtherType.VNTAG] = _VNTAG
_TAG_OF[EtherType.ETAG] = _ETAG
_BODY = np.array([0, 2, VNTAG_LEN, ETAG_LEN], np.int64)
"""Bytes of each kind of stacked header before its EtherType (by ``_TAG_OF`` code)."""
_TAG_KIND = np.array([0, 0, TagKind.VNTAG, TagKind.ETAG], np.int64)
_VID_MASK: Final = 0xFFF
"""The VLAN id in the TCI (after priority and DEI)."""


_VN, _ET = VNTAG_LAYOUT, ETAG_LAYOUT
_VN_D, _VN_P, _VN_L = _VN["d"], _VN["p"], _VN["l"]
_VN_VERSION, _VN_DVIF, _VN_SVIF = _VN["version"], _VN["dvif"], _VN["svif"]
_ET_PCP, _ET_DEI, _ET_GRP = _ET["pcp"], _ET["dei"], _ET["grp"]
_ET_ECID, _ET_ECID_EXT = _ET["ecid_base"], _ET["ecid_ext"]
_ET_IECID, _ET_IECID_EXT = _ET["iecid_base"], _ET["iecid_ext"]
_ECID_BITS, _IECID_BITS = dict(ETAG_FIELDS)["ecid_base"], dict(ETAG_FIELDS)["iecid_base"]
"""A 20-bit E-CID is ``ext << 12 | base`` (the ingress E-CID likewise)."""


@kernel
def link_layers(lo: int, hi: int, fr: Frames, out: Decoded, st: State) -> None:
    """Locate frames ``lo .. hi`` in ``fr.data`` and decode their link headers.

    A frame's captured bytes are those of its ``caplen`` that lie in ``data`` (none when its
    ``offset`` is outside). EtherType links go on to ``ETHER``, IP over NULL or RAW to
    ``IPV4`` or ``IPV6``.
    """
    status, layer, ethertype, l3_offset = out.status, out.layer, out.ethertype, out.l3_offset
    dst_mac, src_mac = out.dst_mac, out.src_mac
    data, offset, caplen, linktype = fr.data, fr.offset, fr.caplen, fr.linktype
    size = data.shape[0]
    first = np.uint64(lo)  # unsigned indices: numba adds no negative-index wraparound
    for j in range(np.uint64(hi - lo)):
        i = first + j
        s, cap = offset[i], 0
        if 0 <= s <= size:
            cap = max(min(int(np.int64(caplen[i])), size - s), 0)
        else:
            s = 0
        st[START, j] = s
        st[CAP, j] = cap
        st[STEP, j] = DONE
        link = int(np.int64(linktype[i]))
        if link in (_ETHERNET, _SLL, _SLL2):
            type_at, length = _ETH_AT, _ETH_LEN
            if link == _ETHERNET:
                if cap >= _DST_MAC + _MAC_LEN:
                    dst_mac[i] = be48(data, s + _DST_MAC)
                if cap >= _SRC_MAC + _MAC_LEN:
                    src_mac[i] = be48(data, s + _SRC_MAC)
            elif link == _SLL:
                type_at, length = _SLL_AT, _SLL_LEN
            else:
                type_at, length = _SLL2_AT, _SLL2_LEN
            if cap < length:
                status[i] = TRUNCATED
                layer[i] = L_LINK
            else:
                st[STEP, j] = ETHER
                st[POS, j] = length
                st[KIND, j] = be16(data, s + type_at)
        elif link == _NULL:  # a 4-byte address family in the capturing host's byte order
            if cap < _NULL_LEN:
                status[i] = TRUNCATED
                layer[i] = L_LINK
                continue
            family = byte(data, s) | (byte(data, s + 1) << 8) | (byte(data, s + 2) << 16)
            family |= byte(data, s + 3) << 24
            if family > 0xFFFF:  # not little-endian (as most hosts write it): big-endian
                family = be32(data, s)
            version = _NULL_VERSION[family] if family < _NULL_VERSION.size else 0
            if version:
                ethertype[i] = _ET_IPV4 if version == 4 else _ET_IPV6
                st[STEP, j] = IPV4 if version == 4 else IPV6
                st[POS, j] = _NULL_LEN
        elif link == _RAW:  # an IP packet, its version nibble says which
            l3_offset[i] = 0
            version = byte(data, s) >> 4 if cap >= 1 else 0
            if cap < 1:
                status[i] = TRUNCATED
                layer[i] = L_IP
            elif version not in (4, 6):
                status[i] = MALFORMED
                layer[i] = L_IP
            else:
                ethertype[i] = _ET_IPV4 if version == 4 else _ET_IPV6
                st[STEP, j] = IPV4 if version == 4 else IPV6
                st[POS, j] = 0
        else:
            status[i] = UNSUPPORTED
            layer[i] = L_LINK


@kernel
def tag_stacks(lo: int, hi: int, fr: Frames, out: Decoded, st: State) -> None:
    """Walk the tag stacks of the ``ETHER`` frames of ``lo .. hi``; fill ``ethertype``.

    IPv4 and IPv6 frames go on to ``IPV4`` or ``IPV6``.
    """
    data, status, layer, ethertype = fr.data, out.status, out.layer, out.ethertype
    tag_kind, vlan_depth, vlan_before_tag = out.tag_kind, out.vlan_depth, out.vlan_before_tag
    vlan_outer, vlan_inner, vlan_outer_tpid = out.vlan_outer, out.vlan_inner, out.vlan_outer_tpid
    tag_d, tag_p, tag_l, tag_version = out.tag_d, out.tag_p, out.tag_l, out.tag_version
    etag_pcp, etag_dei, etag_grp = out.etag_pcp, out.etag_dei, out.etag_grp
    dvif, svif = out.dvif, out.svif
    first = np.uint64(lo)  # unsigned indices: numba adds no negative-index wraparound
    for j in range(np.uint64(hi - lo)):
        if st[STEP, j] != ETHER:
            continue
        i = first + j
        s, cap, pos, et = st[START, j], st[CAP, j], st[POS, j], st[KIND, j]
        st[STEP, j] = DONE
        if _TAG_OF[et]:
            depth, outer, inner, tpid, seen = 0, -1, -1, 0, 0  # seen: TagKind of a VN/E-TAG
            alive = True
            for level in range(MAX_STACK + 1):
                kind = _TAG_OF[et]
                if kind == 0:
                    break
                if level == MAX_STACK:
                    status[i] = MALFORMED
                    layer[i] = L_VLAN
                    alive = False
                    break
                body = _BODY[kind]
                if kind == _VLAN:  # TCI: priority, DEI, 12-bit id; it counts once captured
                    if cap >= pos + 2:
                        vid = be16(data, s + pos) & _VID_MASK
                        if depth == 0:
                            outer, tpid = vid, et
                        inner, depth = vid, depth + 1
                elif seen:  # a VN-Tag or an E-TAG: at most one per frame
                    status[i] = MALFORMED
                    layer[i] = L_TAG
                    alive = False
                else:
                    seen = _TAG_KIND[kind]
                    vlan_before_tag[i] = depth
                    if cap >= pos + body and kind == _VNTAG:
                        d, p, looped, version, dv, sv = _vntag(be32(data, s + pos))
                        tag_d[i] = d
                        tag_p[i] = p
                        tag_l[i] = looped
                        tag_version[i] = version
                        dvif[i] = dv
                        svif[i] = sv
                    elif cap >= pos + body:
                        pcp, dei, grp, ecid, iecid = _etag(be48(data, s + pos))
                        etag_pcp[i] = pcp
                        etag_dei[i] = dei
                        etag_grp[i] = grp
                        dvif[i] = ecid
                        svif[i] = iecid
                if cap < pos + body + 2:  # the EtherType that ends the header is cut
                    status[i] = TRUNCATED
                    layer[i] = L_VLAN if kind == _VLAN else L_TAG
                    alive = False
                if not alive:
                    break
                et, pos = be16(data, s + pos + body), pos + body + 2
            tag_kind[i] = seen
            vlan_depth[i] = depth
            vlan_outer_tpid[i] = tpid
            vlan_outer[i] = outer
            vlan_inner[i] = inner
            if not alive:
                continue
        ethertype[i] = et if et >= _MIN_ETHERTYPE else 0
        st[POS, j] = pos
        if et == _ET_IPV4:
            st[STEP, j] = IPV4
        elif et == _ET_IPV6:
            st[STEP, j] = IPV6


@kernel
def _field(word: int, layout: tuple[int, int]) -> int:
    """The field at ``layout`` (shift, mask) of ``word``."""
    return (word >> layout[0]) & layout[1]


@kernel
def _vntag(word: int) -> tuple[int, int, int, int, int, int]:
    """The d, p, l, version, dvif and svif of a 32-bit VN-Tag."""
    return (
        _field(word, _VN_D),
        _field(word, _VN_P),
        _field(word, _VN_L),
        _field(word, _VN_VERSION),
        _field(word, _VN_DVIF),
        _field(word, _VN_SVIF),
    )


@kernel
def _etag(tci: int) -> tuple[int, int, int, int, int]:
    """The E-PCP, E-DEI, GRP, E-CID and ingress E-CID of a 48-bit E-TCI."""
    return (
        _field(tci, _ET_PCP),
        _field(tci, _ET_DEI),
        _field(tci, _ET_GRP),
        (_field(tci, _ET_ECID_EXT) << _ECID_BITS) | _field(tci, _ET_ECID),
        (_field(tci, _ET_IECID_EXT) << _IECID_BITS) | _field(tci, _ET_IECID),
    )
