"""Per-frame flow keys: canonical bidirectional keys, direction, and copy roles, vectorized.

A flow is keyed by both endpoints' identity (see ``endpoints``), the VLAN nearest the IP
header, the EtherType, the IP protocol and the canonical address/port pair. The canonical
side A is the lexicographically smaller (address, port, endpoint); ``rev`` says the frame
went B → A. ICMP and ICMPv6 echo request and reply share a key through the echo identifier
(both "ports" are the identifier); other ICMP messages are keyed by type and code. Non-IP
frames are keyed by MACs and EtherType (their addresses and ports are 0).

Every key is also hashed to one ``uint64`` so that grouping is a single hash factorization;
``group_codes`` verifies the key columns within each hash group, so a hash collision can
never merge two flows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.columns import Decoded, Layer, Status, TagKind
from vspan.analysis.endpoints import Endpoints

__all__ = [
    "ICMP_TYPE_CODE",
    "KEY_COLUMNS",
    "FragmentPorts",
    "FrameKeys",
    "frame_keys",
    "group_codes",
    "usable",
]

U64 = npt.NDArray[np.uint64]
B = npt.NDArray[np.bool_]

KEY_COLUMNS = (
    "ep_a",
    "ep_b",
    "ip_a_hi",
    "ip_a_lo",
    "ip_b_hi",
    "ip_b_lo",
    "port_a",
    "port_b",
    "proto",
    "vlan",
    "ethertype",
)
"""The columns that identify a flow, in hashing order."""

ICMP_TYPE_CODE = np.uint64(1 << 16)
"""Marks a key "port" that holds ICMP ``type << 8 | code`` (non-echo messages); echo
messages hold the identifier (< 2^16) in both ports."""
_ECHO = {1: (0, 8), 58: (128, 129)}
"""Echo reply and request types of ICMP (proto 1) and ICMPv6 (proto 58)."""
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True, slots=True, eq=False)
class FrameKeys:
    """Key columns (``KEY_COLUMNS``) plus the per-frame facts flows aggregate."""

    keys: dict[str, U64]
    hash: U64
    rev: npt.NDArray[np.uint8]
    """1 when the frame went from side B to side A."""
    sender_copy: B
    """A copy taken where the sending VM is local (VN-Tag d = 0): always counted."""
    tagged: B
    """The frame carries a VN-Tag or E-TAG."""
    receiver_copy: B
    """A copy taken at the receiving host (d = 1): counted only when the flow direction has
    no sender copies (its sender is not observed)."""


def usable(dec: Decoded) -> B:
    """Frames that belong in flows: decoded, or truncated after a complete IP header."""
    status = dec.status
    truncated_late = (status == Status.TRUNCATED) & (dec.layer >= Layer.IP_EXT)
    ok: B = (status == Status.OK) | truncated_late
    return ok


def _mix(h: U64, col: U64) -> U64:
    h = (h ^ col) * _M1
    h ^= h >> np.uint64(31)
    h *= _M2
    h ^= h >> np.uint64(29)
    return h * _M3


def _ports(dec: Decoded) -> tuple[U64, U64]:
    sport = dec.src_port.astype(np.uint64)
    dport = dec.dst_port.astype(np.uint64)
    icmp_tc = ICMP_TYPE_CODE | (dec.icmp_type.astype(np.uint64) << np.uint64(8)) | dec.icmp_code
    for proto, types in _ECHO.items():
        is_proto = (dec.ip_proto == proto) & (dec.ip_version != 0) & (dec.l4_offset >= 0)
        echo = is_proto & np.isin(dec.icmp_type, types)
        other = is_proto & ~echo
        ident = dec.icmp_id.astype(np.uint64)
        sport = np.where(echo, ident, np.where(other, icmp_tc, sport))
        dport = np.where(echo, ident, np.where(other, np.uint64(0), dport))
    return sport, dport


class FragmentPorts:
    """Gives later fragments of a datagram the ports of its first fragment.

    Only a first fragment carries the L4 header. A later one is matched to it by addresses,
    protocol and identification — in the same batch, or among the first fragments of the
    previous batch (a datagram's fragments travel together, so one batch of memory is
    enough) — and takes its ports, so the whole datagram counts in one flow.
    """

    def __init__(self) -> None:
        self._hash = np.zeros(0, dtype=np.uint64)
        self._ports = np.zeros((0, 2), dtype=np.uint64)

    def apply(self, dec: Decoded, sport: U64, dport: U64) -> tuple[U64, U64]:
        """Ports of every frame, later fragments filled in where their first is known."""
        frag = dec.is_fragment != 0
        if not frag.any() and self._hash.size == 0:
            return sport, dport
        first = frag & (dec.frag_offset == 0) & (dec.l4_offset >= 0)
        later = frag & (dec.frag_offset > 0)
        h = np.zeros(len(dec), dtype=np.uint64)
        for col in (
            dec.src_ip_hi,
            dec.src_ip_lo,
            dec.dst_ip_hi,
            dec.dst_ip_lo,
            dec.ip_proto.astype(np.uint64),
            dec.frag_id.astype(np.uint64),
        ):
            h = _mix(h, col)
        # This batch's first fragments win over the previous batch's.
        known_hash = np.concatenate([h[first], self._hash])
        known_ports = np.concatenate([np.stack([sport[first], dport[first]], axis=1), self._ports])
        uniq, pick = np.unique(known_hash, return_index=True)
        self._hash, self._ports = h[first], np.stack([sport[first], dport[first]], axis=1)
        rows = np.flatnonzero(later)
        if rows.size == 0 or uniq.size == 0:
            return sport, dport
        pos = np.minimum(np.searchsorted(uniq, h[rows]), uniq.size - 1)
        hit = uniq[pos] == h[rows]
        rows, src = rows[hit], pick[pos[hit]]
        sport, dport = sport.copy(), dport.copy()
        sport[rows], dport[rows] = known_ports[src, 0], known_ports[src, 1]
        return sport, dport


def frame_keys(dec: Decoded, eps: Endpoints, fragments: FragmentPorts | None = None) -> FrameKeys:
    """Keys of every frame of ``dec`` (callers pass only ``usable`` frames)."""
    s_hi, s_lo, d_hi, d_lo = dec.src_ip_hi, dec.src_ip_lo, dec.dst_ip_hi, dec.dst_ip_lo
    sport, dport = _ports(dec)
    if fragments is not None:
        sport, dport = fragments.apply(dec, sport, dport)
    s_ep, d_ep = eps.src, eps.dst
    gt = (s_hi > d_hi) | (
        (s_hi == d_hi)
        & (
            (s_lo > d_lo)
            | ((s_lo == d_lo) & ((sport > dport) | ((sport == dport) & (s_ep > d_ep))))
        )
    )
    has_ip = dec.ip_version != 0
    keys: dict[str, U64] = {
        "ep_a": np.where(gt, d_ep, s_ep),
        "ep_b": np.where(gt, s_ep, d_ep),
        "ip_a_hi": np.where(gt, d_hi, s_hi),
        "ip_a_lo": np.where(gt, d_lo, s_lo),
        "ip_b_hi": np.where(gt, s_hi, d_hi),
        "ip_b_lo": np.where(gt, s_lo, d_lo),
        "port_a": np.where(gt, dport, sport),
        "port_b": np.where(gt, sport, dport),
        "proto": np.where(has_ip, dec.ip_proto, 0).astype(np.uint64),
        # VLAN -1 (none) becomes 0xFFFF so that VLAN 0 (priority tag) stays distinct.
        "vlan": (dec.vlan_inner & 0xFFFF).astype(np.uint64),
        "ethertype": dec.ethertype.astype(np.uint64),
    }
    h = np.zeros(len(dec), dtype=np.uint64)
    for name in KEY_COLUMNS:
        h = _mix(h, keys[name])
    vntag = dec.tag_kind == TagKind.VNTAG
    return FrameKeys(
        keys=keys,
        hash=h,
        rev=gt.astype(np.uint8),
        sender_copy=vntag & (dec.tag_d == 0) & (dec.svif != 0),
        receiver_copy=vntag & (dec.tag_d == 1),
        tagged=dec.tag_kind != TagKind.NONE,
    )


def group_codes(hashes: U64, keys: dict[str, U64]) -> tuple[npt.NDArray[np.int64], int]:
    """Dense group code per row (first-appearance order) and the number of groups.

    Groups by hash, then checks every key column against the group's first row; on a
    collision (never seen in practice, but possible) it groups on the full key instead.
    """
    codes, uniques = pd.factorize(hashes)
    codes = codes.astype(np.int64)
    first = np.full(len(uniques), len(hashes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(hashes), dtype=np.int64))
    ref = first[codes]
    clash = np.zeros(len(hashes), dtype=np.bool_)
    for name in KEY_COLUMNS:
        col = keys[name]
        clash |= col != col[ref]
    if not clash.any():
        return codes, len(uniques)
    stacked = np.stack([keys[name] for name in KEY_COLUMNS], axis=1)
    _, first_rows, inverse = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first_rows, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.ravel()].astype(np.int64), int(order.size)
