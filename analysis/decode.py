"""The columnar frame decoder: a ``FrameBatch`` in, a ``Decoded`` out.

``decode_batch`` works layer by layer on whole sets of frames (numpy masks and gathers,
no Python loop per frame): the link layer, the VLAN / VN-Tag / E-TAG stack, IPv4 or IPv6
with its extension headers, then TCP, UDP, SCTP, ICMP or ICMPv6 (``decode_ip``). The only
loops are over chunks of the batch (so a chunk's windows stay in cache) and over stacked
headers, a bounded number of times.

Semantics follow what tshark 4.0 shows for the same bytes (``tests/analysis/
test_decode_tshark.py`` checks it); where they differ on purpose it is said here:

* A frame whose captured bytes end inside a header is TRUNCATED at that layer, even when the
  wire length is as short (tshark calls a header cut by the *wire* end malformed).
* Each field of a cut header is filled when its bytes were captured (tshark often reads on
  before it shows a field: MACs, IPv4 destination, TCP flags, SCTP ports, ICMP type); fields
  of earlier layers stay filled; ``ip_version`` is set once a valid version nibble is read.
* More than ``MAX_STACK`` stacked tags, or a second VN-Tag/E-TAG, is MALFORMED (tshark
  decodes on); an inconsistent UDP length is not (tshark says it is): the IP payload stands
  in for it. Only the 8-byte ICMP header and the 12-byte SCTP common header are decoded.
* Link types NULL and RAW have no MACs; their ``ethertype`` is that of the IP version found.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch, LinkType
from vspan.vntag import ETAG_FIELDS, ETAG_LEN, VNTAG_LEN, EtherType, decode_vntag_array

from .columns import Decoded, Layer, Status, TagKind
from .decode_ip import decode_ip
from .decode_window import HEAD, I32, U8, U16, Buffer, Frames, Rows, Seen, be16, be32, be64

__all__ = ["CHUNK", "MAX_STACK", "decode_batch"]

CHUNK: Final = 1 << 15
"""Frames decoded together; their windows stay in the CPU cache between layers."""
MAX_STACK: Final = 8
"""Most VLAN tags plus VN-Tag/E-TAG a frame may stack; one more is MALFORMED at VLAN."""
_DEEPEST: Final = 20 + MAX_STACK * 4 + ETAG_LEN - 2
"""Bytes the deepest link header reads: SLL2 (20), 8 headers of 4 (one an E-TAG, 2 more)
and the EtherType after them; all of it must be in the first ``HEAD`` bytes of a frame."""
if HEAD < _DEEPEST:  # pragma: no cover - a bug in the constants
    raise AssertionError(f"the link layer reads {_DEEPEST} bytes, only {HEAD} are copied")

# EtherType-carrying link types: (offset of the EtherType, header length, has MACs).
_ETHERTYPE_LINKS: Final = {
    LinkType.ETHERNET: (12, 14, True),
    LinkType.LINUX_SLL: (14, 16, False),
    LinkType.LINUX_SLL2: (0, 20, False),
}
_NULL_FAMILY: Final = {2: 4, 24: 6, 28: 6, 30: 6}
"""DLT_NULL address family (host order) to IP version: AF_INET and the BSDs' AF_INET6."""
_IP_ETHERTYPE: Final = {4: EtherType.IPV4, 6: EtherType.IPV6}
_MIN_ETHERTYPE: Final = 0x0600
"""Smaller values in the EtherType field are an 802.3 length (LLC follows)."""

_VLAN, _VNTAG, _ETAG = 1, 2, 3
_TAG_OF = np.zeros(1 << 16, np.uint8)
"""EtherType to the tag it introduces (0 for none)."""
for _tpid in (EtherType.DOT1Q, EtherType.DOT1AD, EtherType.QINQ_9100):
    _TAG_OF[_tpid] = _VLAN
_TAG_OF[EtherType.VNTAG] = _VNTAG
_TAG_OF[EtherType.ETAG] = _ETAG


_DTYPE_OF_ALIAS: Final = {
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "I32": np.int32,
    "I64": np.int64,
}
_COLUMN_DTYPES: Final = {f.name: _DTYPE_OF_ALIAS[str(f.type)] for f in fields(Decoded)}
"""Column name to dtype, from the annotations of ``Decoded`` (a new alias fails here)."""


def _etag_layout() -> dict[str, tuple[int, int]]:
    """(shift, mask) of each ``ETAG_FIELDS`` field in the 48-bit E-TCI."""
    shift, out = ETAG_LEN * 8, {}
    for name, bits in ETAG_FIELDS:
        shift -= bits
        out[name] = (shift, (1 << bits) - 1)
    return out


_ET: Final = _etag_layout()
_TAG_READ: Final = ETAG_LEN + 2
"""Bytes read per stacked header: the longest (E-TAG) and the EtherType after it."""
_BODY = np.array([0, 2, VNTAG_LEN, ETAG_LEN], np.int32)
"""Bytes of each kind of stacked header before its EtherType (by ``_TAG_OF`` code)."""


def decode_batch(batch: FrameBatch) -> Decoded:
    """Decode every frame of ``batch``; never raises on any frame bytes (see ``Status``)."""
    n = len(batch)
    out = _empty(batch)
    buf = Buffer(batch.data)
    offset = np.asarray(batch.offset, np.int64)
    caplen = np.asarray(batch.caplen, np.int32)
    linktype = np.asarray(batch.linktype, np.uint16)
    for lo in range(0, n, CHUNK):
        part = slice(lo, min(n, lo + CHUNK))
        rows = Decoded(**{name: col[part] for name, col in out.columns().items()})
        frames = Frames(
            buf, offset=offset[part], caplen=caplen[part], wirelen=out.wirelen[part], out=rows
        )
        _decode_link(frames, linktype[part])
    return out


def _empty(batch: FrameBatch) -> Decoded:
    """Columns for ``batch``: pass-through columns copied, the rest 0 or their sentinel."""
    n = len(batch)
    cols = {name: np.zeros(n, dtype) for name, dtype in _COLUMN_DTYPES.items()}
    for name in ("vlan_outer", "vlan_inner", "l3_offset", "l4_offset"):
        cols[name][:] = -1
    cols["ts_ns"][:] = batch.ts_ns
    cols["caplen"][:] = batch.caplen
    cols["wirelen"][:] = batch.origlen
    cols["host"][:] = batch.host_column()
    cols["iface"][:] = batch.iface_column()
    return Decoded(**cols)


def _decode_link(f: Frames, linktype: U16) -> None:
    """Decode the link layer of every frame, then hand IP frames to ``decode_ip``."""
    first = int(linktype[0]) if len(f) else 0
    if (linktype == first).all():
        groups = {first: np.arange(len(f))}
    else:
        groups = {int(t): np.flatnonzero(linktype == t) for t in np.unique(linktype)}
    ip: list[tuple[Rows, I32, U8]] = []
    for kind, rows in groups.items():
        w, avail = f.heads() if len(groups) == 1 else f.window(rows, 0, HEAD)
        if kind in _ETHERTYPE_LINKS:
            ip.append(_ethertype_link(f, rows, w, avail, LinkType(kind)))
        elif kind == LinkType.NULL:
            ip.append(_null_link(f, rows, w, avail))
        elif kind == LinkType.RAW:
            ip.append(_raw_link(f, rows, w, avail))
        else:
            f.stop(rows, Status.UNSUPPORTED, Layer.LINK)
    if len(ip) == 1:
        decode_ip(f, *ip[0])
    elif ip:
        decode_ip(f, *(np.concatenate(parts) for parts in zip(*ip, strict=True)))


def _ip_follows(rows: Rows, pos: I32 | int, version: U8 | int) -> tuple[Rows, I32, U8]:
    """The IP stage's input: rows, offset of their IP header, and the IP version claimed."""
    return (
        rows,
        np.broadcast_to(np.asarray(pos, np.int32), rows.shape),
        np.broadcast_to(np.asarray(version, np.uint8), rows.shape),
    )


def _raw_link(f: Frames, rows: Rows, w: U8, avail: I32) -> tuple[Rows, I32, U8]:
    """LINKTYPE_RAW: the frame is an IP packet, its version nibble says which."""
    version = w[:, 0] >> np.uint8(4)
    f.out.l3_offset[rows] = 0
    f.stop(rows[avail < 1], Status.TRUNCATED, Layer.IP)
    bad = (avail >= 1) & (version != 4) & (version != 6)
    f.stop(rows[bad], Status.MALFORMED, Layer.IP)
    go = np.flatnonzero((avail >= 1) & ~bad)
    f.out.ethertype[rows[go]] = np.where(version[go] == 4, EtherType.IPV4, EtherType.IPV6)
    return _ip_follows(rows[go], 0, version[go])


def _null_link(f: Frames, rows: Rows, w: U8, avail: I32) -> tuple[Rows, I32, U8]:
    """DLT_NULL: a 4-byte address family in the capturing host's byte order."""
    family = w[:, :4].copy().view("<u4")[:, 0]
    family = np.where(family > 0xFFFF, family.byteswap(), family)
    short = avail < 4
    f.stop(rows[short], Status.TRUNCATED, Layer.LINK)
    version = np.zeros(rows.size, np.uint8)
    for fam, ver in _NULL_FAMILY.items():
        version[family == fam] = ver
    go = np.flatnonzero(~short & (version != 0))
    for ver, ethertype in _IP_ETHERTYPE.items():
        f.out.ethertype[rows[go[version[go] == ver]]] = ethertype
    return _ip_follows(rows[go], 4, version[go])


def _ethertype_link(
    f: Frames, rows: Rows, w: U8, avail: I32, link: LinkType
) -> tuple[Rows, I32, U8]:
    """Ethernet and Linux cooked captures: an EtherType, maybe tags, then the payload."""
    o = f.out
    type_at, hdr_len, macs = _ETHERTYPE_LINKS[link]
    if macs:
        head, tail, seen = be64(w, 0), be64(w, 8), Seen(avail, 12)
        o.dst_mac[rows] = seen.keep(head >> np.uint64(16), 6)
        src = ((head & np.uint64(0xFFFF)) << np.uint64(32)) | (tail >> np.uint64(32))
        o.src_mac[rows] = seen.keep(src, 12)
    short = avail < hdr_len
    f.stop(rows[short], Status.TRUNCATED, Layer.LINK)
    go = np.flatnonzero(~short)
    ethertype = be16(w, type_at)[go]
    nxt = np.full(go.size, hdr_len, np.int32)
    alive = np.ones(go.size, np.bool_)
    tagged = np.flatnonzero(_TAG_OF[ethertype])
    if tagged.size:
        sel = go[tagged]
        stack = _TagStack(
            f, rows[sel], w, sel, avail=avail[sel], et=ethertype[tagged], start=hdr_len
        )
        stack.walk()
        ethertype[tagged], nxt[tagged], alive[tagged] = stack.et, stack.nxt, stack.alive
    go, ethertype, nxt = go[alive], ethertype[alive], nxt[alive]
    o.ethertype[rows[go]] = np.where(ethertype >= _MIN_ETHERTYPE, ethertype, 0)
    version = np.zeros(go.size, np.uint8)
    version[ethertype == EtherType.IPV4] = 4
    version[ethertype == EtherType.IPV6] = 6
    ip = np.flatnonzero(version)
    return _ip_follows(rows[go[ip]], nxt[ip], version[ip])


class _TagStack:
    """The VLAN / VN-Tag / E-TAG stacks of frames whose EtherType starts one.

    ``wrow`` are the frames' rows in the link window ``w``; the first tag starts at byte
    ``start``. After ``walk``, ``et`` is the EtherType after each stack, ``nxt`` the offset
    of the header it introduces, and ``alive`` tells which frames decoded so far.
    """

    def __init__(
        self, f: Frames, rows: Rows, w: U8, wrow: Rows, *, avail: I32, et: U16, start: int
    ) -> None:
        m = rows.size
        self.f, self.rows, self.avail = f, rows, avail
        self.bytes, self.base = Buffer(w.reshape(-1)), wrow * HEAD
        self.et = et.copy()
        self.nxt = np.full(m, start, np.int32)
        self.alive = np.ones(m, np.bool_)
        self.depth = np.zeros(m, np.uint8)
        self.outer = np.full(m, -1, np.int32)
        self.inner = np.full(m, -1, np.int32)
        self.tpid = np.zeros(m, np.uint16)
        self.seen = np.zeros(m, np.uint8)  # TagKind of the VN-Tag/E-TAG met so far

    def walk(self) -> None:
        """Decode the stacks, one header of every frame at a time, and fill their columns."""
        for level in range(MAX_STACK + 1):
            kind = np.where(self.alive, _TAG_OF[self.et], 0)
            act = np.flatnonzero(kind)
            if not act.size:
                break
            if level == MAX_STACK:
                self._stop(act, Status.MALFORMED, Layer.VLAN)
                break
            self._step(act, kind[act])
        o, rows = self.f.out, self.rows
        o.tag_kind[rows], o.vlan_depth[rows], o.vlan_outer_tpid[rows] = (
            self.seen,
            self.depth,
            self.tpid,
        )
        o.vlan_outer[rows], o.vlan_inner[rows] = self.outer, self.inner

    def _stop(self, sel: Rows, status: Status, layer: Layer) -> None:
        self.f.stop(self.rows[sel], status, layer)
        self.alive[sel] = False

    def _step(self, sel: Rows, kind: U8) -> None:
        """One header of each frame ``sel``: a tag of ``kind``, then an EtherType."""
        at, avail = self.nxt[sel], self.avail[sel]
        b = self.bytes.gather(self.base[sel] + at, _TAG_READ)
        vlan = kind == _VLAN
        only_vlan = bool(vlan.all())
        body = np.int32(2) if only_vlan else _BODY[kind]
        if vlan.any():  # TCI: priority, DEI, 12-bit id; the tag counts once it is captured
            counted = np.flatnonzero(vlan & (avail >= at + 2))
            s, vid = sel[counted], (be16(b, 0) & np.uint16(0xFFF)).astype(np.int32)[counted]
            top = np.flatnonzero(self.depth[s] == 0)
            self.outer[s[top]], self.tpid[s[top]] = vid[top], self.et[s[top]]
            self.inner[s], self.depth[s] = vid, self.depth[s] + 1
        if not only_vlan:  # a VN-Tag or an E-TAG: at most one per frame
            t = np.flatnonzero(~vlan)
            dup = self.seen[sel[t]] != 0
            self._stop(sel[t[dup]], Status.MALFORMED, Layer.TAG)
            t = t[~dup]
            vn = kind[t] == _VNTAG
            self.seen[sel[t]] = np.where(vn, TagKind.VNTAG, TagKind.ETAG)
            self.f.out.vlan_before_tag[self.rows[sel[t]]] = self.depth[sel[t]]
            whole = avail[t] >= at[t] + _BODY[kind[t]]
            self._tag_fields(sel[t[whole]], b[t[whole]], vn[whole])
        end = at + body + 2  # after the EtherType that ends the header
        cut = avail < end
        if cut.any():
            self._stop(sel[cut & vlan], Status.TRUNCATED, Layer.VLAN)
            self._stop(sel[cut & ~vlan], Status.TRUNCATED, Layer.TAG)
        ethertype = be16(b, 2)
        if not only_vlan:
            ethertype = np.where(vlan, ethertype, np.where(kind == _VNTAG, be16(b, 4), be16(b, 6)))
        go = np.flatnonzero(self.alive[sel])
        self.et[sel[go]], self.nxt[sel[go]] = ethertype[go], end[go]

    def _tag_fields(self, sel: Rows, b: U8, vn: npt.NDArray[np.bool_]) -> None:
        """Fill the VN-Tag or E-TAG columns of ``sel`` from their tag bytes ``b``."""
        o = self.f.out
        v, e = np.flatnonzero(vn), np.flatnonzero(~vn)
        tags = decode_vntag_array(be32(b[v], 0))
        rows = self.rows[sel[v]]
        o.tag_d[rows], o.tag_p[rows], o.tag_l[rows] = tags.d, tags.p, tags.l
        o.tag_version[rows], o.dvif[rows], o.svif[rows] = tags.version, tags.dvif, tags.svif
        tci = (be32(b[e], 0).astype(np.uint64) << np.uint64(16)) | be16(b[e], 4)
        etag = _etag_fields(tci)
        rows = self.rows[sel[e]]
        o.etag_pcp[rows], o.etag_dei[rows], o.etag_grp[rows] = (
            etag["pcp"],
            etag["dei"],
            etag["grp"],
        )
        o.dvif[rows] = (etag["ecid_ext"] << np.uint64(12)) | etag["ecid_base"]
        o.svif[rows] = (etag["iecid_ext"] << np.uint64(12)) | etag["iecid_base"]


def _etag_fields(tci: npt.NDArray[np.uint64]) -> dict[str, npt.NDArray[np.uint64]]:
    """Split 48-bit E-TCIs into the fields of ``ETAG_FIELDS``."""
    return {name: (tci >> np.uint64(s)) & np.uint64(mask) for name, (s, mask) in _ET.items()}
