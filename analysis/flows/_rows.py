"""The flow key, and the flow table's open rows with their hash index (private to
``_flowtable``; compiled).

A flow's key is ``KEY_WORDS`` uint64 words (the key columns of ``flowkeys.KEY_COLUMNS``
packed, "ports" by ``flow_ports``), hashed by rounds of ``mix``. Open flows are dense rows
(0 .. n-1) of two arrays, ``keys`` and ``state`` (``state``'s layout is ``_flowtable``'s;
here only the key hash, its column 0, matters). ``index`` is an open-addressing hash table
(linear probing, a power-of-two size at least twice the rows) holding ``row + 1`` (0 =
empty); a key may have several rows (flows on different clocks), each its own entry.
Deletion shifts the probe chain back, so the table never needs tombstones or a rebuild; a
finished row is replaced by the last one (``remove_rows``).
"""

from __future__ import annotations

from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from vspan.analysis.decode.columns import ICMP_ECHO_TYPES
from vspan.kernels import kernel

__all__ = [
    "ICMP_TYPE_CODE",
    "KEY_WORDS",
    "Index",
    "Rows",
    "copy_out",
    "find_row",
    "flow_ports",
    "insert",
    "mix",
    "rebuild_index",
    "remove_rows",
]

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
_H = TypeVar("_H", np.uint64, U64)

KEY_WORDS: Final = (
    "ep_a", "ep_b", "ip_a_hi", "ip_a_lo", "ip_b_hi", "ip_b_lo",
    "ports",  # port_a << 32 | port_b
    "misc",  # proto << 32 | vlan << 16 | ethertype
)  # fmt: skip
"""The packed key of a flow."""

_M1: Final = np.uint64(0x9E3779B97F4A7C15)
_M2: Final = np.uint64(0xBF58476D1CE4E5B9)
_M3: Final = np.uint64(0x94D049BB133111EB)
"""The multipliers of the key hash (splitmix64's finalizer after an xor)."""
_R31, _R29 = np.uint64(31), np.uint64(29)
_U32, _U16, _U8 = np.uint64(32), np.uint64(16), np.uint64(8)
_LOW16 = np.uint64(0xFFFF)
ICMP_TYPE_CODE: Final = np.uint64(1 << 16)
"""Marks a key "port" that holds ICMP ``type << 8 | code`` (non-echo messages); echo
messages hold the identifier (< 2^16) in both ports."""
_ICMP, _ICMPV6 = 1, 58
_ICMP_ECHO, _ICMPV6_ECHO = ICMP_ECHO_TYPES[_ICMP], ICMP_ECHO_TYPES[_ICMPV6]

Rows = tuple[U64, I64]
"""``keys`` and ``state`` of a set of flows."""
Index = npt.NDArray[np.int32]
_HASH = 0
"""The ``state`` column of the key's hash."""


@kernel
def mix(h: _H, col: _H) -> _H:
    """One round of the key hash (also over uint64 arrays)."""
    h = (h ^ col) * _M1
    h ^= h >> _R31
    h *= _M2
    h ^= h >> _R29
    return h * _M3


@kernel
def flow_ports(
    l3: tuple[U8, U8, I32],
    l4: tuple[U16, U16, U8, U8, U16],
    out: tuple[U64, U64],
) -> None:
    """Key "ports" of every frame: ports, the ICMP/ICMPv6 echo identifier on both sides
    (request and reply share a flow), or ``ICMP_TYPE_CODE | type << 8 | code`` and 0.

    ``l3``: ip_version, ip_proto, l4_offset; ``l4``: src_port, dst_port, icmp_type,
    icmp_code, icmp_id; ``out``: the source and destination "port" of each frame.
    """
    ip_version, ip_proto, l4_offset = l3
    src_port, dst_port, icmp_type, icmp_code, icmp_id = l4
    sport, dport = out
    for i in range(ip_proto.size):
        p = ip_proto[i]
        if (p in (_ICMP, _ICMPV6)) and ip_version[i] != 0 and l4_offset[i] >= 0:
            t = icmp_type[i]
            echo = (t in _ICMP_ECHO) if p == _ICMP else (t in _ICMPV6_ECHO)
            if echo:
                sport[i] = np.uint64(icmp_id[i])
                dport[i] = np.uint64(icmp_id[i])
            else:
                sport[i] = ICMP_TYPE_CODE | (np.uint64(t) << _U8) | np.uint64(icmp_code[i])
                dport[i] = np.uint64(0)
        else:
            sport[i] = np.uint64(src_port[i])
            dport[i] = np.uint64(dst_port[i])


@kernel
def find_row(index: npt.NDArray[np.int32], keys: U64, state: I64, h: np.int64, k: U64) -> int:
    """The row holding key ``k`` (hash ``h``), or -1."""
    mask = index.size - 1
    pos = h & mask
    while True:
        e = index[pos]
        if e == 0:
            return -1
        row = e - 1
        if state[row, _HASH] == h:
            same = True
            for w in range(k.size):
                if keys[row, w] != k[w]:
                    same = False
                    break
            if same:
                return row  # type: ignore[no-any-return]
        pos = (pos + 1) & mask


@kernel
def insert(index: npt.NDArray[np.int32], h: np.int64, row: int) -> None:
    """Put ``row`` (hash ``h``) in the index."""
    mask = index.size - 1
    pos = h & mask
    while index[pos] != 0:
        pos = (pos + 1) & mask
    index[pos] = row + 1


@kernel
def _unlink(index: npt.NDArray[np.int32], state: I64, row: int) -> None:
    """Take ``row`` out of the index, shifting its probe chain back (no tombstones)."""
    mask = index.size - 1
    p = state[row, _HASH] & mask
    while index[p] != row + 1:
        p = (p + 1) & mask
    index[p] = 0
    q = p
    while True:
        q = (q + 1) & mask
        e = index[q]
        if e == 0:
            return
        home = state[e - 1, _HASH] & mask
        # The entry at q may fill the hole at p unless its home lies cyclically in (p, q].
        stays = (p < home <= q) if p <= q else (home > p or home <= q)
        if not stays:
            index[p] = e
            index[q] = 0
            p = q


@kernel
def _relink(index: npt.NDArray[np.int32], state: I64, old: int, new: int) -> None:
    """Point the index entry of ``old`` (whose row moved) at ``new``."""
    mask = index.size - 1
    p = state[new, _HASH] & mask
    while index[p] != old + 1:
        p = (p + 1) & mask
    index[p] = new + 1


@kernel
def rebuild_index(index: npt.NDArray[np.int32], state: I64, n: int) -> None:
    """Fill an empty index with rows 0 .. n-1."""
    for row in range(n):
        insert(index, state[row, _HASH], row)


@kernel
def copy_out(row: int, rows: Rows, fin: Rows, nfin: int) -> None:
    """Copy ``row`` of the open flows to row ``nfin`` of the finished ones."""
    fin[0][nfin, :] = rows[0][row, :]
    fin[1][nfin, :] = rows[1][row, :]


@kernel
def remove_rows(
    drop: I64, table: tuple[Rows, Index, int], fin: tuple[Rows, int]
) -> tuple[int, int]:
    """Finish the rows ``drop`` (sorted descending; ``fin`` has room for them): copy each
    out, then move the last row into its place. Return the rows left and finished."""
    rows, index, n = table
    state = rows[1]
    fin_rows, nfin = fin
    for row in drop:
        copy_out(row, rows, fin_rows, nfin)
        nfin += 1
        _unlink(index, state, row)
        last = n - 1
        if row != last:
            copy_out(last, rows, rows, row)
            _relink(index, state, last, row)
        n -= 1
    return n, nfin
