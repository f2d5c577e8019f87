"""TCP, UDP, SCTP, ICMP and ICMPv6 headers, for the columnar decoder (``decode_ip.py``).

A header longer than the IP payload it is in is MALFORMED at L4 (as is a TCP data offset
below 5); a header cut by the capture is TRUNCATED at L4, with the ports, flags and ICMP
fields that were captured still filled (fields past the IP payload are never filled). Other
protocols are OK with ``l4_offset`` set and no ports.

``payload_len`` is the IP payload minus the L4 header: the TCP data offset (20 when it was
not captured), 8 for ICMP, ICMPv6 and UDP (whose length field is used instead when it is
consistent: 8 to the IP payload), 12 for SCTP.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from .columns import Layer, Status
from .decode_window import I32, U8, Frames, Rows, Seen, be16, keep

__all__ = ["L4_WINDOW", "decode_l4"]

L4_WINDOW: Final = 16
"""Bytes read at the L4 header: enough for TCP's ports, data offset and flags."""

_TCP, _UDP, _SCTP, _ICMP, _ICMPV6 = 1, 2, 3, 4, 5
_KIND = np.zeros(256, np.uint8)
"""IP protocol number to the decoder above (0: none)."""
_KIND[[6, 17, 132, 1, 58]] = [_TCP, _UDP, _SCTP, _ICMP, _ICMPV6]
_MIN_HEADER = np.array([0, 20, 8, 12, 8, 8], np.int32)
"""Smallest header of each kind, in bytes."""
_ECHO = {_ICMP: (0, 8), _ICMPV6: (128, 129)}
"""Echo reply and request types, whose header carries an identifier."""


def decode_l4(f: Frames, rows: Rows, pos: I32, proto: U8, payload: I32) -> None:
    """Decode the L4 header at ``pos`` of ``rows``; ``payload`` is the IP payload length."""
    o = f.out
    o.l4_offset[rows] = pos
    o.payload_len[rows] = payload
    kind = _KIND[proto]
    sel = np.flatnonzero(kind)
    if sel.size < rows.size:
        rows, pos, payload, kind = rows[sel], pos[sel], payload[sel], kind[sel]
    w, avail = f.window(rows, pos, L4_WINDOW)
    need = _MIN_HEADER[kind]
    bad = payload < need  # the IP length leaves no room for the header
    # Bytes past the IP payload are not the packet's: no field is read there (as in tshark).
    seen = Seen(np.minimum(avail, payload), L4_WINDOW)
    a = seen.avail
    ported = (kind == _TCP) | (kind == _UDP) | (kind == _SCTP)
    for column, at in ((o.src_port, 0), (o.dst_port, 2)):
        port = seen.keep(be16(w, at), at + 2)
        column[rows] = port if ported.all() else keep(port, ported)
    header = need.copy()

    tcp = kind == _TCP
    has_offset = tcp & (a >= 13)
    data_offset = (w[:, 12] >> 4).astype(np.int32) * 4
    bad |= has_offset & (data_offset < 20)
    header = np.where(has_offset & (data_offset >= 20), data_offset, header)
    flags = ((w[:, 12] & 1).astype(np.uint16) << 8) | w[:, 13]
    o.tcp_flags[rows] = keep(flags, has_offset & (a >= 14) & (data_offset >= 20))
    bad |= header > payload
    need = np.where(tcp, header, need)  # the whole TCP header, options included

    udp = kind == _UDP
    length = be16(w, 4).astype(np.int32)
    sane = udp & (a >= 6) & (length >= 8) & (length <= payload)
    header = np.where(sane, 8 + payload - length, header)

    for code, (reply, request) in _ECHO.items():
        icmp = np.flatnonzero(kind == code)
        t, got = w[icmp, 0], a[icmp]
        o.icmp_type[rows[icmp]] = keep(t, got >= 1)
        o.icmp_code[rows[icmp]] = keep(w[icmp, 1], got >= 2)
        echo = (got >= 6) & ((t == reply) | (t == request))
        o.icmp_id[rows[icmp]] = keep(be16(w[icmp], 4), echo)

    o.payload_len[rows] = np.maximum(payload - header, 0)
    f.stop(rows[bad], Status.MALFORMED, Layer.L4)
    f.stop(rows[~bad & (avail < need)], Status.TRUNCATED, Layer.L4)
