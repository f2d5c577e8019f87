"""Flow keys: what identifies a flow, each frame's key "ports", and which frames go in flows.

A flow is keyed by both endpoints' identity (see ``endpoints``), the VLAN nearest the IP
header, the EtherType, the IP protocol and the canonical address/port pair. The canonical
side A is the lexicographically smaller (address, port, endpoint); ``rev`` says the frame
went B → A. ICMP and ICMPv6 echo request and reply share a key through the echo identifier
(both "ports" are the identifier); other ICMP messages are keyed by type and code. Non-IP
frames are keyed by MACs and EtherType (their addresses and ports are 0).

The flow table (``flows``, ``_flowtable``) builds the keys and hashes them in its compiled
pass; this module gives it the per-frame "ports" and says which frames belong in flows.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vspan.analysis.decode.columns import Decoded, Layer, Status
from vspan.analysis.flows._kernel import ICMP_TYPE_CODE, flow_ports, mix

__all__ = [
    "ICMP_TYPE_CODE",
    "KEY_COLUMNS",
    "FragmentPorts",
    "frame_ports",
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


def usable(dec: Decoded) -> B:
    """Frames that belong in flows: decoded, or truncated after a complete IP header."""
    status = dec.status
    truncated_late = (status == Status.TRUNCATED) & (dec.layer >= Layer.IP_EXT)
    ok: B = (status == Status.OK) | truncated_late
    return ok


def frame_ports(dec: Decoded) -> tuple[U64, U64]:
    """The key "ports" of every frame (``_flowtable.flow_ports``), before ``FragmentPorts``."""
    sport = np.empty(len(dec), np.uint64)
    dport = np.empty(len(dec), np.uint64)
    flow_ports(
        (dec.ip_version, dec.ip_proto, dec.l4_offset),
        (dec.src_port, dec.dst_port, dec.icmp_type, dec.icmp_code, dec.icmp_id),
        (sport, dport),
    )
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
            h = mix(h, col)
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
