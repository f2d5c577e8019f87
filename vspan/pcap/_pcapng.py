"""pcapng block walking for ``vspan.pcap.read`` (private).

Block layouts are those of draft-ietf-opsawg-pcapng (section numbers of -04), declared
below as ``(field, numpy type)`` tables in wire order; the numba walker takes its field
offsets from those tables. The walker only measures: it returns one row per packet
(``REC_*`` columns) and stops at Section Header and Interface Description Blocks, which
are rare and parsed here in Python; timestamps and columns are then built with numpy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.fields import Fields, field_offsets, layout, struct_format
from vspan.kernels import kernel
from vspan.pcap._layout import (
    MAX_CAPLEN,
    MESSAGES,
    REC_CAPLEN,
    REC_COLUMNS,
    REC_DATA,
    REC_IFACE,
    REC_KIND,
    REC_ORIGLEN,
    REC_TS_HI,
    REC_TS_LO,
    TOUCH_STEP,
    Parsed,
    Stop,
    end_records,
    grow,
    load_lines,
    new_records,
    u16,
    u32,
    wrap_i64,
)

__all__ = [
    "BLOCK_TRAILER_LEN",
    "EPB_FIELDS",
    "IDB_FIELDS",
    "OPTION_FIELDS",
    "PB_FIELDS",
    "SHB_FIELDS",
    "SPB_FIELDS",
    "BlockType",
    "Clock",
    "Interface",
    "Option",
    "PcapngParser",
    "ticks_to_ns",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


class BlockType(IntEnum):
    """Block type codes (draft-ietf-opsawg-pcapng, the "Block Type Codes" registry)."""

    IDB = 0x00000001
    PB = 0x00000002
    SPB = 0x00000003
    NRB = 0x00000004
    ISB = 0x00000005
    EPB = 0x00000006
    SHB = 0x0A0D0D0A


class Option(IntEnum):
    """Option codes used by vspan (§3.5, §4.1, §4.2)."""

    END = 0
    COMMENT = 1
    IF_NAME = 2
    IF_DESCRIPTION = 3
    SHB_USERAPPL = 4
    IF_TSRESOL = 9
    IF_TSOFFSET = 14


# §3.1 General Block Structure: type, total length, body, total length again.
BLOCK_FIELDS: Final[Fields] = (("type", "u4"), ("total_length", "u4"))
BLOCK_TRAILER_LEN: Final = 4
# §3.5 Options: code, length, then the value padded to 4 bytes.
OPTION_FIELDS: Final[Fields] = (("code", "u2"), ("length", "u2"))
# §4.1 Section Header Block, then options. The byte-order magic reads 0x1A2B3C4D.
SHB_FIELDS: Final[Fields] = (
    *BLOCK_FIELDS,
    ("byte_order_magic", "u4"),
    ("major_version", "u2"),
    ("minor_version", "u2"),
    ("section_length", "i8"),
)
# §4.2 Interface Description Block, then options.
IDB_FIELDS: Final[Fields] = (
    *BLOCK_FIELDS,
    ("linktype", "u2"),
    ("reserved", "u2"),
    ("snaplen", "u4"),
)
# §4.3 Enhanced Packet Block, then the packet data padded to 4 bytes, then options.
EPB_FIELDS: Final[Fields] = (
    *BLOCK_FIELDS,
    ("interface_id", "u4"),
    ("ts_high", "u4"),
    ("ts_low", "u4"),
    ("captured_len", "u4"),
    ("original_len", "u4"),
)
# §4.4 Simple Packet Block, then the packet data (interface 0, no timestamp).
SPB_FIELDS: Final[Fields] = (*BLOCK_FIELDS, ("original_len", "u4"))
# Appendix A, Packet Block (obsolete): the EPB with a 16-bit interface id and drops count.
PB_FIELDS: Final[Fields] = (
    *BLOCK_FIELDS,
    ("interface_id", "u2"),
    ("drops_count", "u2"),
    *EPB_FIELDS[3:],
)

_EPB, _PB, _SPB = field_offsets(EPB_FIELDS), field_offsets(PB_FIELDS), field_offsets(SPB_FIELDS)
_EPB_DATA, _SPB_DATA = layout(EPB_FIELDS).itemsize, layout(SPB_FIELDS).itemsize
_EPB_LEN, _SPB_LEN = _EPB_DATA + BLOCK_TRAILER_LEN, _SPB_DATA + BLOCK_TRAILER_LEN
assert layout(PB_FIELDS).itemsize == _EPB_DATA, (
    "the PB differs from the EPB only in its interface word"
)
_IDB_LEN = layout(IDB_FIELDS).itemsize + BLOCK_TRAILER_LEN
_SHB_LEN = layout(SHB_FIELDS).itemsize + BLOCK_TRAILER_LEN
_BYTE_ORDERS: Final = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
_MAX_RESOL_EXP: Final = {False: 19, True: 63}  # units per second must fit in 64 bits

# Constants frozen into the kernel.
_SPECIAL, _BAD_LENGTH, _BAD_TRAILER = int(Stop.SPECIAL), int(Stop.BAD_LENGTH), int(Stop.BAD_TRAILER)
_SHORT, _UNKNOWN_IFACE = int(Stop.SHORT_BLOCK), int(Stop.UNKNOWN_IFACE)
_CAPLEN_BLOCK, _CAPLEN_LIMIT = int(Stop.CAPLEN_BLOCK), int(Stop.CAPLEN_LIMIT)
_T_SHB, _T_IDB, _T_EPB = int(BlockType.SHB), int(BlockType.IDB), int(BlockType.EPB)
_T_SPB, _T_PB = int(BlockType.SPB), int(BlockType.PB)
_EPB_IFACE, _PB_IFACE, _SPB_ORIG = _EPB["interface_id"], _PB["interface_id"], _SPB["original_len"]
_TS_HI, _TS_LO, _CAP, _ORIG = (
    _EPB[f] for f in ("ts_high", "ts_low", "captured_len", "original_len")
)


@kernel
def _walk(
    buf: U8, start: int, end: int, big: bool, snaplen: I64
) -> tuple[I64, int, int, int, int, int]:
    """Walk blocks from ``start``: (records, stop, need, Stop, detail a, detail b).

    ``need`` is the byte count from ``stop`` that must be present to go on when the walk
    ran out of bytes. ``snaplen`` has one entry per interface of the section (0: none).
    """
    rec = new_records(end - start)
    n, p, need, status, a, b = 0, start, 0, 0, 0, 0
    n_if = snaplen.shape[0]
    loaded, total = start, 0
    while True:
        if p >= loaded < end:  # the next lines, ahead of the walk
            total, loaded = (
                total + load_lines(buf, loaded, loaded + TOUCH_STEP),
                loaded + TOUCH_STEP,
            )
        if end - p < 12:
            need = 12
            break
        btype = u32(buf, p, big)
        if btype == _T_SHB:
            status = _SPECIAL
            break
        blen = u32(buf, p + 4, big)
        if blen < 12 or blen % 4:
            status, a = _BAD_LENGTH, blen
            break
        if end - p < blen:
            need = blen
            break
        trailer = u32(buf, p + blen - 4, big)
        if trailer != blen:
            status, a, b = _BAD_TRAILER, trailer, blen
            break
        if btype == _T_IDB:
            status = _SPECIAL
            break
        if btype in (_T_EPB, _T_PB, _T_SPB):
            if blen < (_SPB_LEN if btype == _T_SPB else _EPB_LEN):
                status, a, b = _SHORT, blen, btype
                break
            if btype == _T_SPB:
                iface, hi, lo, data = 0, 0, 0, p + _SPB_DATA
                orig = u32(buf, p + _SPB_ORIG, big)
                caplen = min(orig, blen - _SPB_LEN)
                if n_if and snaplen[0] > 0:
                    caplen = min(caplen, snaplen[0])
            else:
                iface = (
                    u32(buf, p + _EPB_IFACE, big)
                    if btype == _T_EPB
                    else u16(buf, p + _PB_IFACE, big)
                )
                hi, lo = u32(buf, p + _TS_HI, big), u32(buf, p + _TS_LO, big)
                caplen, orig = u32(buf, p + _CAP, big), u32(buf, p + _ORIG, big)
                data = p + _EPB_DATA
                if caplen > blen - _EPB_LEN:
                    status, a, b = _CAPLEN_BLOCK, caplen, blen
                    break
            if iface >= n_if:
                status, a, b = _UNKNOWN_IFACE, iface, n_if
                break
            limit = max(snaplen[iface], MAX_CAPLEN)
            if caplen > limit:
                status, a, b = _CAPLEN_LIMIT, caplen, limit
                break
            if n == rec.shape[0]:
                rec = grow(rec)
            rec[n, REC_DATA], rec[n, REC_CAPLEN], rec[n, REC_ORIGLEN] = data, caplen, orig
            rec[n, REC_TS_HI], rec[n, REC_TS_LO] = hi, lo
            rec[n, REC_IFACE], rec[n, REC_KIND] = iface, btype
            n += 1
        p += blen
    return end_records(rec, n, total), p, need, status, a, b


def ticks_to_ns(ticks: npt.NDArray[np.uint64], *, pow2: bool, exp: int) -> I64:
    """Counts of 10^-exp (or 2^-exp) seconds to ns, exactly (floor), without floats."""
    if not pow2:
        if exp <= 9:
            return (ticks * np.uint64(10 ** (9 - exp))).view(np.int64)
        return (ticks // np.uint64(10 ** (exp - 9))).view(np.int64)
    shift, giga = np.uint64(exp), np.uint64(10**9)
    sec, frac = ticks >> shift, ticks & np.uint64((1 << exp) - 1)
    if exp <= 32:  # frac * 10^9 < 2^62
        sub = (frac * giga) >> shift
    else:  # frac * 10^9 = (hi * 2^32 + lo) * 10^9, each product < 2^62
        w32 = np.uint64(32)
        hi, lo = (frac >> w32) * giga, (frac & np.uint64(0xFFFFFFFF)) * giga
        sub = (hi + (lo >> w32)) >> np.uint64(exp - 32)
    return (sec * giga + sub).view(np.int64)


@dataclass(frozen=True, slots=True)
class Clock:
    """How an interface's timestamps count (§4.2 ``if_tsresol``, ``if_tsoffset``)."""

    pow2: bool = False
    """``if_tsresol`` is a power of 2 (else of 10)."""
    exp: int = 6
    """Timestamps count units of 10^-exp (or 2^-exp) seconds."""
    offset_s: int = 0
    """Seconds added to every timestamp."""

    def to_ns(self, ticks: npt.NDArray[np.uint64]) -> I64:
        ns = ticks_to_ns(ticks, pow2=self.pow2, exp=self.exp)
        return ns + np.int64(wrap_i64(self.offset_s * 10**9)) if self.offset_s else ns


@dataclass(frozen=True, slots=True)
class Interface:
    """One Interface Description Block (§4.2)."""

    linktype: int
    snaplen: int
    name: str = ""
    clock: Clock = Clock()


def _options(body: bytes, order: str) -> dict[int, bytes] | str:
    """A block's options (§3.5), the first value of each code; or why they are bad."""
    head = struct.Struct(struct_format(OPTION_FIELDS, order))
    found: dict[int, bytes] = {}
    q = 0
    while len(body) - q >= head.size:
        code, length = head.unpack_from(body, q)
        if code == Option.END:
            break
        if q + head.size + length > len(body):
            return f"option {code} of {length} bytes runs past the end of its block"
        found.setdefault(code, body[q + head.size : q + head.size + length])
        q += head.size + (length + 3) // 4 * 4
    return found


class PcapngParser:
    """The sections and interfaces met so far, and the walk of one chunk."""

    unit: Final = "pcapng block"

    def __init__(self) -> None:
        self.interfaces: list[Interface] = []
        self._order = "<"
        self._base = 0  # file-wide index of the current section's first interface
        self._snaplen = np.zeros(0, np.int64)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces)

    def parse(self, buf: U8, start: int, end: int) -> Parsed:
        parts: list[I64] = []
        pos, error = start, None
        while True:
            big = self._order == ">"
            rec, stop, need, status, a, b = _walk(buf, pos, end, big, self._snaplen)
            if len(rec):
                rec[:, REC_IFACE] += self._base
                parts.append(rec)
            if status != Stop.SPECIAL:
                error = MESSAGES[Stop(status)].format(a=a, b=b) if status else None
                break
            pos, need, error = self._special(buf, stop, end)
            if need or error:
                break
        rec = np.concatenate(parts) if parts else np.zeros((0, REC_COLUMNS), np.int64)
        linktype = np.array([i.linktype for i in self.interfaces], np.uint16)
        return Parsed(rec, self._timestamps(rec), linktype[rec[:, REC_IFACE]], stop, need, error)

    def _timestamps(self, rec: I64) -> I64:
        ticks = rec[:, REC_TS_HI].astype(np.uint64) << np.uint64(32)
        ticks |= rec[:, REC_TS_LO].astype(np.uint64)
        clocks = list(dict.fromkeys(i.clock for i in self.interfaces))  # nearly always one
        if len(clocks) == 1:
            ts = clocks[0].to_ns(ticks)
        else:
            which = np.array([clocks.index(i.clock) for i in self.interfaces], np.int64)
            group = which[rec[:, REC_IFACE]]
            ts = np.empty(len(rec), np.int64)
            for k, clock in enumerate(clocks):
                mask = group == k
                ts[mask] = clock.to_ns(ticks[mask])
        spb = rec[:, REC_KIND] == _T_SPB
        if spb.any():
            ts[spb] = 0
        return ts

    def _special(self, buf: U8, p: int, end: int) -> tuple[int, int, str | None]:
        """Parse the SHB or IDB at ``p``: (next position, bytes needed, error)."""
        if u32(buf, p, False) == _T_SHB:
            return self._section(buf, p, end)
        return self._interface(buf, p)

    def _section(self, buf: U8, p: int, end: int) -> tuple[int, int, str | None]:
        if end - p < 12:
            return p, 12, None
        order = _BYTE_ORDERS.get(bytes(buf[p + 8 : p + 12]))
        if order is None:
            got = bytes(buf[p + 8 : p + 12]).hex()
            return p, 0, f"bad byte-order magic {got}, expected 1a2b3c4d in either order"
        blen = u32(buf, p + 4, order == ">")
        if blen < _SHB_LEN or blen % 4:
            return p, 0, f"Section Header Block length {blen} is not a multiple of 4 of >= 28"
        if end - p < blen:
            return p, blen, None
        if (trailer := u32(buf, p + blen - 4, order == ">")) != blen:
            return p, 0, MESSAGES[Stop.BAD_TRAILER].format(a=trailer, b=blen)
        dtype = layout(SHB_FIELDS, order)
        head = buf[p : p + dtype.itemsize].view(dtype)[0]
        if head["major_version"] != 1:
            version = f"{head['major_version']}.{head['minor_version']}"
            return p, 0, f"pcapng version {version} is not supported, expected 1.x"
        self._order, self._base = order, len(self.interfaces)
        self._snaplen = np.zeros(0, np.int64)
        return p + blen, 0, None

    def _interface(self, buf: U8, p: int) -> tuple[int, int, str | None]:
        blen = u32(buf, p + 4, self._order == ">")
        if blen < _IDB_LEN:
            return p, 0, MESSAGES[Stop.SHORT_BLOCK].format(a=blen, b=_T_IDB)
        dtype = layout(IDB_FIELDS, self._order)
        head = buf[p : p + dtype.itemsize].view(dtype)[0]
        opts = _options(bytes(buf[p + dtype.itemsize : p + blen - 4]), self._order)
        if isinstance(opts, str):
            return p, 0, opts
        name = opts.get(Option.IF_NAME, b"").decode("utf-8", "replace").rstrip("\0")
        iface = Interface(int(head["linktype"]), int(head["snaplen"]), name)
        if (resol := opts.get(Option.IF_TSRESOL)) is not None:
            if len(resol) != 1 or resol[0] & 0x7F > _MAX_RESOL_EXP[resol[0] >= 0x80]:
                return p, 0, f"if_tsresol {resol.hex()} is not one byte of 10^-19 .. 2^-63"
            clock = replace(iface.clock, pow2=resol[0] >= 0x80, exp=resol[0] & 0x7F)
            iface = replace(iface, clock=clock)
        if (offset := opts.get(Option.IF_TSOFFSET)) is not None:
            if len(offset) != 8:
                return p, 0, f"if_tsoffset has {len(offset)} bytes, expected 8"
            seconds = struct.unpack(self._order + "q", offset)[0]
            iface = replace(iface, clock=replace(iface.clock, offset_s=seconds))
        self.interfaces.append(iface)
        section = self.interfaces[self._base :]
        self._snaplen = np.array([i.snaplen for i in section], np.int64)
        return p + blen, 0, None
