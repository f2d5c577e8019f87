"""The TPACKET_V3 receive ring of an AF_PACKET socket, walked by numba (private).

Layouts are those of ``/usr/include/linux/if_packet.h`` (struct names cited above each
table), declared as ``(field, type)`` tables in memory order with every padding byte
spelled out. At import each table is rebuilt as a ``ctypes.Structure``, which lays fields
out by the C alignment rules: its size must be the one the header implies and its offsets
those of the packed table, so a forgotten padding field fails loudly here rather than as a
misread ring.

The ring is ``block_nr`` blocks of ``block_size`` bytes. The kernel fills one block at a
time with variable-length packets, then hands it to user space by setting
``block_status`` to ``TP_STATUS_USER``; we take blocks in order, copy the frames out, and
give each block back with ``TP_STATUS_KERNEL``. Reading the status before the packets and
writing it after the copy is ordered on x86 (loads are not reordered with loads, nor
stores with earlier loads), which is where vspan's collectors run.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.fields import Fields, field_offsets, layout
from vspan.kernels import kernel

__all__ = [
    "BLOCK_DESC_FIELDS",
    "SOCKADDR_LL_FIELDS",
    "TPACKET3_HDRLEN",
    "TPACKET3_HDR_FIELDS",
    "TPACKET_REQ3_FIELDS",
    "TPACKET_STATS_V3_FIELDS",
    "Ring",
    "Walk",
    "gather",
    "walk_ring",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

if sys.byteorder != "little":  # pragma: no cover - the kernels read native words as LE
    raise ImportError("the TPACKET_V3 walker supports little-endian hosts only")

# struct tpacket_block_desc { __u32 version; __u32 offset_to_priv; union { struct
# tpacket_hdr_v1 bh1; } hdr; } with tpacket_hdr_v1's two struct tpacket_bd_ts flattened.
BLOCK_DESC_FIELDS: Final[Fields] = (
    ("version", "u4"),
    ("offset_to_priv", "u4"),
    ("block_status", "u4"),
    ("num_pkts", "u4"),
    ("offset_to_first_pkt", "u4"),
    ("blk_len", "u4"),
    ("seq_num", "u8"),  # __aligned_u64
    ("ts_first_sec", "u4"),
    ("ts_first_nsec", "u4"),
    ("ts_last_sec", "u4"),
    ("ts_last_nsec", "u4"),
)
# struct tpacket3_hdr, with the union's struct tpacket_hdr_variant1 (hv1) inlined.
TPACKET3_HDR_FIELDS: Final[Fields] = (
    ("tp_next_offset", "u4"),
    ("tp_sec", "u4"),
    ("tp_nsec", "u4"),
    ("tp_snaplen", "u4"),
    ("tp_len", "u4"),
    ("tp_status", "u4"),
    ("tp_mac", "u2"),
    ("tp_net", "u2"),
    ("tp_rxhash", "u4"),
    ("tp_vlan_tci", "u4"),
    ("tp_vlan_tpid", "u2"),
    ("hv1_padding", "u2"),
    ("tp_padding", "V8"),  # __u8 tp_padding[8]
)
# struct sockaddr_ll, which the kernel writes at TPACKET_ALIGN(sizeof(tpacket3_hdr)).
SOCKADDR_LL_FIELDS: Final[Fields] = (
    ("sll_family", "u2"),
    ("sll_protocol", "u2"),  # __be16
    ("sll_ifindex", "i4"),
    ("sll_hatype", "u2"),
    ("sll_pkttype", "u1"),
    ("sll_halen", "u1"),
    ("sll_addr", "V8"),  # unsigned char sll_addr[8]
)
# struct tpacket_req3 (setsockopt PACKET_RX_RING with TPACKET_V3).
TPACKET_REQ3_FIELDS: Final[Fields] = (
    ("tp_block_size", "u4"),
    ("tp_block_nr", "u4"),
    ("tp_frame_size", "u4"),
    ("tp_frame_nr", "u4"),
    ("tp_retire_blk_tov", "u4"),
    ("tp_sizeof_priv", "u4"),
    ("tp_feature_req_word", "u4"),
)
# struct tpacket_stats_v3 (getsockopt PACKET_STATISTICS; reading resets the counters).
TPACKET_STATS_V3_FIELDS: Final[Fields] = (
    ("tp_packets", "u4"),
    ("tp_drops", "u4"),
    ("tp_freeze_q_cnt", "u4"),
)

_CTYPES: Final = {
    "u1": ctypes.c_uint8,
    "u2": ctypes.c_uint16,
    "u4": ctypes.c_uint32,
    "i4": ctypes.c_int32,
    "u8": ctypes.c_uint64,
    "V8": ctypes.c_uint8 * 8,
}


def _checked(name: str, fields: Fields, size: int) -> dict[str, int]:
    """Offsets of ``fields``, after checking them against the C layout (``size`` bytes)."""
    struct_type = type(
        name, (ctypes.Structure,), {"_fields_": [(f, _CTYPES[c]) for f, c in fields]}
    )
    c_offsets = {f: getattr(struct_type, f).offset for f, _ in fields}
    offsets = field_offsets(fields)
    if (
        ctypes.sizeof(struct_type) != size
        or layout(fields).itemsize != size
        or offsets != c_offsets
    ):
        raise ImportError(f"{name}: the field table does not match the C layout of if_packet.h")
    return offsets


TPACKET_ALIGNMENT: Final = 16
_BLOCK = _checked("tpacket_block_desc", BLOCK_DESC_FIELDS, 48)
_HDR = _checked("tpacket3_hdr", TPACKET3_HDR_FIELDS, 48)
_SLL = _checked("sockaddr_ll", SOCKADDR_LL_FIELDS, 20)
_checked("tpacket_req3", TPACKET_REQ3_FIELDS, 28)
_checked("tpacket_stats_v3", TPACKET_STATS_V3_FIELDS, 12)
_HDR_ALIGNED: Final = -(-48 // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT
TPACKET3_HDRLEN: Final = _HDR_ALIGNED + 20
"""TPACKET3_HDRLEN of if_packet.h: the aligned header, then the sockaddr_ll."""

TP_STATUS_KERNEL: Final = 0
TP_STATUS_USER: Final = 1 << 0
TP_STATUS_VLAN_VALID: Final = 1 << 4
TP_STATUS_VLAN_TPID_VALID: Final = 1 << 6
ETH_P_8021Q: Final = 0x8100

_STATUS, _NUM, _FIRST = _BLOCK["block_status"], _BLOCK["num_pkts"], _BLOCK["offset_to_first_pkt"]
_NEXT, _SEC, _NSEC = _HDR["tp_next_offset"], _HDR["tp_sec"], _HDR["tp_nsec"]
_SNAPLEN, _LEN, _PSTATUS, _MAC = (
    _HDR["tp_snaplen"],
    _HDR["tp_len"],
    _HDR["tp_status"],
    _HDR["tp_mac"],
)
_TCI, _TPID = _HDR["tp_vlan_tci"], _HDR["tp_vlan_tpid"]
_PKTTYPE: Final = _HDR_ALIGNED + _SLL["sll_pkttype"]
_MIN_RECORD: Final = 64
"""No record is shorter (TPACKET3_HDRLEN rounded up): bounds the rows a block can hold."""

# Columns of the walker's rows, one int64 row per packet.
W_DATA, W_SNAPLEN, W_LEN, W_SEC, W_NSEC, W_PKTTYPE, W_VLAN = range(7)
W_COLUMNS: Final = 7
"""``W_DATA`` is the frame's offset in the ring; ``W_VLAN`` is ``tpid << 16 | tci`` of a
VLAN tag the kernel took off the frame (offload), or -1."""


@kernel
def walk_ring(ring: U8, block_size: int, block_nr: int, first: int) -> tuple[I64, int, int, int]:
    """Walk the user-owned blocks from ``first``: (rows, blocks, bad blocks, first bad record).

    ``blocks`` blocks from ``first`` (wrapping) are the caller's until it releases them.
    A record that would reach outside its block ends that block's walk (the rows before it
    are kept); ``bad`` counts such blocks and the last value is the bad record's offset in
    its block.
    """
    words = ring.view(np.uint32)
    nblocks, total = 0, 0
    while nblocks < block_nr:
        base = ((first + nblocks) % block_nr) * block_size
        if words[(base + _STATUS) >> 2] & TP_STATUS_USER == 0:
            break
        total += min(int(words[(base + _NUM) >> 2]), block_size // _MIN_RECORD)
        nblocks += 1
    rows = np.empty((total, W_COLUMNS), np.int64)
    n, bad, where = 0, 0, 0
    for k in range(nblocks):
        base = ((first + k) % block_nr) * block_size
        end = base + block_size
        num = min(int(words[(base + _NUM) >> 2]), block_size // _MIN_RECORD)
        p = base + int(words[(base + _FIRST) >> 2])
        for _ in range(num):
            if p < base + 48 or p + TPACKET3_HDRLEN > end or p & 3:
                bad, where = bad + 1, p - base
                break
            h = p >> 2
            snaplen = int(words[h + (_SNAPLEN >> 2)])
            data = p + (np.int64(ring[p + _MAC]) | (np.int64(ring[p + _MAC + 1]) << 8))
            if data < p + TPACKET3_HDRLEN or data + snaplen > end:
                bad, where = bad + 1, p - base
                break
            rows[n, W_DATA], rows[n, W_SNAPLEN] = data, snaplen
            rows[n, W_LEN] = words[h + (_LEN >> 2)]
            rows[n, W_SEC], rows[n, W_NSEC] = words[h + (_SEC >> 2)], words[h + (_NSEC >> 2)]
            rows[n, W_PKTTYPE] = ring[p + _PKTTYPE]
            status = words[h + (_PSTATUS >> 2)]
            rows[n, W_VLAN] = -1
            if status & TP_STATUS_VLAN_VALID and snaplen >= 12:
                tpid = np.int64(ETH_P_8021Q)
                if status & TP_STATUS_VLAN_TPID_VALID:
                    tpid = np.int64(ring[p + _TPID]) | (np.int64(ring[p + _TPID + 1]) << 8)
                rows[n, W_VLAN] = (np.int64(tpid) << 16) | (
                    np.int64(words[h + (_TCI >> 2)]) & 0xFFFF
                )
            n += 1
            p += int(words[h + (_NEXT >> 2)])
    return rows[:n], nblocks, bad, where


@kernel
def gather(ring: U8, rows: I64, caplen: I32, out: U8, dst: I64) -> None:
    """Copy the frame of walker row ``i``, ``caplen[i]`` bytes, to ``out[dst[i]:]``.

    Where the row's ``W_VLAN >= 0`` the 802.1Q tag the kernel took off is put back after
    the MAC addresses (``caplen`` counts it), as libpcap does.
    """
    for i in range(rows.shape[0]):
        s, d, c, tag = rows[i, W_DATA], dst[i], caplen[i], rows[i, W_VLAN]
        if tag < 0:
            out[d : d + c] = ring[s : s + c]
            continue
        head = min(c, 12)
        out[d : d + head] = ring[s : s + head]
        for k in range(min(4, c - 12)):
            out[d + 12 + k] = (tag >> (24 - 8 * k)) & 0xFF
        if c > 16:
            out[d + 16 : d + c] = ring[s + 12 : s + c - 4]


@dataclass(frozen=True, slots=True)
class Walk:
    """What one walk found: rows (``W_*`` columns) and the blocks to give back."""

    rows: I64
    first: int
    """Index of the first block walked."""
    blocks: int
    """Blocks walked, from ``first`` (wrapping)."""
    bad: int
    """Blocks whose walk stopped at a record reaching outside the block."""
    bad_offset: int


class Ring:
    """A mapped TPACKET_V3 ring: walk the blocks the kernel handed over, give them back."""

    def __init__(self, buffer: mmap.mmap | bytearray, block_size: int, block_nr: int) -> None:
        if len(buffer) != block_size * block_nr:
            raise ValueError(f"ring of {len(buffer)} bytes, expected {block_size * block_nr}")
        _compile_kernels()
        self.buffer = buffer
        self.view: U8 = np.frombuffer(buffer, dtype=np.uint8)
        self.block_size = block_size
        self.block_nr = block_nr
        self.next_block = 0

    def walk(self) -> Walk:
        """The packets of every block ready from ``next_block`` (no block is given back)."""
        rows, blocks, bad, where = walk_ring(
            self.view, self.block_size, self.block_nr, self.next_block
        )
        return Walk(rows, self.next_block, blocks, bad, where)

    def release(self, walk: Walk) -> None:
        """Give the blocks of ``walk`` back to the kernel (after copying their frames)."""
        if not walk.blocks:
            return
        index = (walk.first + np.arange(walk.blocks)) % self.block_nr
        words = self.view.view(np.uint32)
        words[(index * self.block_size + _STATUS) >> 2] = TP_STATUS_KERNEL
        self.next_block = (walk.first + walk.blocks) % self.block_nr

    def close(self) -> None:
        """Drop the numpy view, then unmap (an exported view would make ``close`` fail)."""
        self.view = np.zeros(0, np.uint8)
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()


@functools.cache
def _compile_kernels() -> None:
    """Compile the kernels on throwaway arrays: numba keeps a reference to the arrays of
    the call that compiles a kernel, which would keep a ring's mapping from closing."""
    rows = walk_ring(np.zeros(64, np.uint8), 32, 2, 0)[0]
    gather(
        np.zeros(64, np.uint8),
        rows,
        np.zeros(0, np.int32),
        np.zeros(0, np.uint8),
        np.zeros(0, np.int64),
    )
