"""TCP, UDP, SCTP, ICMP and ICMPv6 headers: the last stage of the decoding kernel (private).

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

from vspan.analysis.decode._common import (
    CAP,
    DONE,
    KIND,
    L4,
    L_L4,
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
    byte,
    fold,
)
from vspan.analysis.decode.columns import ICMP_ECHO_TYPES, Decoded
from vspan.kernels import kernel

__all__ = ["l4_headers"]

_TCP, _UDP, _SCTP, _ICMP, _ICMPV6 = 1, 2, 3, 4, 5
_PROTOCOLS: Final = {6: _TCP, 17: _UDP, 132: _SCTP, 1: _ICMP, 58: _ICMPV6}
_KIND = np.zeros(256, np.uint8)
"""IP protocol number to the header decoded (0: none)."""
_KIND[list(_PROTOCOLS)] = list(_PROTOCOLS.values())
_MIN_HEADER = np.array([0, 20, 8, 12, 8, 8], np.int64)
"""Smallest header of each kind, in bytes."""
_ECHO: Final = {_PROTOCOLS[p]: types for p, types in ICMP_ECHO_TYPES.items()}
"""Echo reply and request types of each ICMP kind."""
_ECHO_REPLY = np.full(_MIN_HEADER.size, -1, np.int64)
_ECHO_REQUEST = np.full(_MIN_HEADER.size, -1, np.int64)
for _kind, (_reply, _request) in _ECHO.items():
    _ECHO_REPLY[_kind], _ECHO_REQUEST[_kind] = _reply, _request
# Header fields: the ports (TCP, UDP, SCTP), TCP's data offset and flags, UDP's length,
# ICMP's type, code and echo identifier.
_SPORT, _DPORT, _TCP_OFFSET, _TCP_FLAGS, _UDP_LENGTH = 0, 2, 12, 13, 4
_ICMP_TYPE, _ICMP_CODE, _ICMP_ID = 0, 1, 4
# The header words in a packet's fingerprint (``Decoded.fingerprint``), and where they end.
_TCP_SEQ, _TCP_CSUM, _SCTP_TAG = 4, 16, 4
_IDENT_END = np.array([0, _TCP_CSUM + 2, 8, 12, 8, 8], np.int64)
"""Bytes of each kind of header that hold its fingerprint words (by ``_KIND`` code)."""
_NO_IDENTITY = np.uint64(0)


@kernel
def l4_headers(lo: int, hi: int, fr: Frames, out: Decoded, st: State) -> None:
    """Decode the L4 headers of the ``L4`` frames of ``lo .. hi`` (KIND: the IP protocol,
    LENGTH: the IP payload length, >= 0)."""
    data, status, layer = fr.data, out.status, out.layer
    l4_offset, payload_len = out.l4_offset, out.payload_len
    src_port, dst_port, tcp_flags = out.src_port, out.dst_port, out.tcp_flags
    icmp_type, icmp_code, icmp_id = out.icmp_type, out.icmp_code, out.icmp_id
    fingerprint = out.fingerprint
    first = np.uint64(lo)  # unsigned indices: numba adds no negative-index wraparound
    for j in range(np.uint64(hi - lo)):
        if st[STEP, j] != L4:
            continue
        i, pos, payload = first + j, st[POS, j], st[LENGTH, j]
        s, avail = st[START, j] + pos, st[CAP, j] - pos
        st[STEP, j] = DONE
        l4_offset[i] = pos
        payload_len[i] = payload
        kind = _KIND[st[KIND, j]]
        if kind == 0:
            continue
        need = _MIN_HEADER[kind]
        bad = payload < need  # the IP length leaves no room for the header
        seen = min(avail, payload)  # bytes past the IP payload are not the packet's
        header = need
        if kind in (_TCP, _UDP, _SCTP):
            if seen >= _SPORT + 2:
                src_port[i] = be16(data, s + _SPORT)
            if seen >= _DPORT + 2:
                dst_port[i] = be16(data, s + _DPORT)
        if kind == _TCP:
            if seen >= _TCP_OFFSET + 1:
                word = byte(data, s + _TCP_OFFSET)
                data_offset = (word >> 4) * 4
                if data_offset < need:
                    bad = True
                else:
                    header = data_offset
                    if seen >= _TCP_FLAGS + 1:
                        tcp_flags[i] = ((word & 1) << 8) | byte(data, s + _TCP_FLAGS)
            bad = bad or header > payload
            need = header  # the whole TCP header, options included
        elif kind == _UDP:
            if seen >= _UDP_LENGTH + 2:
                length = be16(data, s + _UDP_LENGTH)
                if 8 <= length <= payload:
                    header = 8 + payload - length
        elif kind in (_ICMP, _ICMPV6):
            if seen >= _ICMP_TYPE + 1:
                icmp_type[i] = byte(data, s + _ICMP_TYPE)
            if seen >= _ICMP_CODE + 1:
                icmp_code[i] = byte(data, s + _ICMP_CODE)
            if seen >= _ICMP_ID + 2:
                t = byte(data, s + _ICMP_TYPE)
                if t == _ECHO_REPLY[kind] or t == _ECHO_REQUEST[kind]:
                    icmp_id[i] = be16(data, s + _ICMP_ID)
        payload_len[i] = max(payload - header, 0)
        h = fingerprint[i]  # the IP fields' hash
        if seen < _IDENT_END[kind]:
            h = _NO_IDENTITY  # a word of the fingerprint was not captured
        elif kind == _TCP:  # sequence, acknowledgement; offset, flags, window, checksum
            h = fold(fold(h, be32(data, s + _TCP_SEQ)), be32(data, s + _TCP_SEQ + 4))
            h = fold(h, (be32(data, s + _TCP_OFFSET) << 16) | be16(data, s + _TCP_CSUM))
        elif kind == _UDP:  # length, checksum
            h = fold(h, be32(data, s + _UDP_LENGTH))
        elif kind == _SCTP:  # verification tag, checksum
            h = fold(fold(h, be32(data, s + _SCTP_TAG)), be32(data, s + _SCTP_TAG + 4))
        else:  # the whole ICMP/ICMPv6 header
            h = fold(fold(h, be32(data, s)), be32(data, s + 4))
        fingerprint[i] = h
        if bad:
            status[i] = MALFORMED
            layer[i] = L_L4
        elif avail < need:
            status[i] = TRUNCATED
            layer[i] = L_L4
