"""Pieces shared by the capture-file readers and writers (private to vspan): the record
rows the walkers fill, why a walker stopped, byte readers for kernels. Layouts are
``vspan.fields`` tables."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.kernels import kernel

__all__ = [
    "MAX_CAPLEN",
    "MESSAGES",
    "REC_COLUMNS",
    "Parsed",
    "Stop",
    "grow",
    "new_records",
    "u16",
    "u32",
    "wrap_i64",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

MAX_CAPLEN: Final = 262144
"""Captured lengths above ``max(snaplen, MAX_CAPLEN)`` mark a corrupt record (as libpcap)."""


def wrap_i64(value: int) -> int:
    """``value`` wrapped to a signed 64-bit integer (as numpy arrays wrap)."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


class Stop(IntEnum):
    """Why a walker returned; ``a``/``b`` in the messages are its two detail values."""

    END = 0
    SPECIAL = 1
    BAD_LENGTH = 2
    BAD_TRAILER = 3
    SHORT_BLOCK = 4
    UNKNOWN_IFACE = 5
    CAPLEN_BLOCK = 6
    CAPLEN_LIMIT = 7


MESSAGES: Final[dict[Stop, str]] = {
    Stop.BAD_LENGTH: "pcapng block length {a} is not a multiple of 4 of at least 12",
    Stop.BAD_TRAILER: "pcapng block trailing length {a} does not match its length {b}",
    Stop.SHORT_BLOCK: "pcapng block of type {b} is {a} bytes, shorter than its fields",
    Stop.UNKNOWN_IFACE: "packet for interface {a}, but the section describes {b} interfaces",
    Stop.CAPLEN_BLOCK: "captured length {a} does not fit in a block of {b} bytes",
    Stop.CAPLEN_LIMIT: "captured length {a} is over the limit {b} (max of snaplen, 262144)",
}

# Record columns the walkers fill, one int64 row per packet. TS_HI/TS_LO are the two
# timestamp words (pcap: seconds and fraction; pcapng: high and low 32 bits).
REC_DATA, REC_CAPLEN, REC_ORIGLEN, REC_TS_HI, REC_TS_LO, REC_IFACE, REC_KIND = range(7)
REC_COLUMNS: Final = 7


@kernel
def u32(buf: U8, p: int, big: bool) -> int:
    """The unsigned 32-bit integer at ``buf[p:p + 4]``."""
    b0, b1, b2, b3 = np.int64(buf[p]), np.int64(buf[p + 1]), np.int64(buf[p + 2]), buf[p + 3]
    if big:
        return int((b0 << 24) | (b1 << 16) | (b2 << 8) | np.int64(b3))
    return int(b0 | (b1 << 8) | (b2 << 16) | (np.int64(b3) << 24))


@kernel
def u16(buf: U8, p: int, big: bool) -> int:
    """The unsigned 16-bit integer at ``buf[p:p + 2]``."""
    if big:
        return int((np.int64(buf[p]) << 8) | np.int64(buf[p + 1]))
    return int(np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8))


@kernel
def new_records(nbytes: int) -> I64:
    """An initial record table for a walk over ``nbytes`` bytes (grown as needed)."""
    return np.empty((max(64, nbytes // 512), REC_COLUMNS), np.int64)


TOUCH_STEP: Final = 1 << 20
"""Bytes a walk loads ahead at a time (they stay in the CPU cache while it walks them)."""


@kernel
def load_lines(buf: U8, lo: int, hi: int) -> int:
    """Read one byte of every cache line of ``buf[lo:hi]``, in order; return their sum.

    A walk is a chain of dependent reads (each header gives the next offset): from memory,
    each costs a full memory latency. Read in order first, the lines stream in at memory
    bandwidth (the CPU prefetches them) and the walk finds them in the cache.
    """
    total = 0
    for i in range(max(lo, 0), min(hi, buf.shape[0]), 64):
        total += buf[i]
    return total


@kernel
def end_records(rec: I64, n: int, loaded: int) -> I64:
    """The first ``n`` rows of ``rec``; the sum ``load_lines`` gave is stored past them, so
    that its reads are not optimized away."""
    if n == rec.shape[0]:
        rec = grow(rec)
    rec[n, REC_KIND] = loaded
    return rec[:n]


@kernel
def grow(rec: I64) -> I64:
    """``rec`` with twice the rows, the first ones copied."""
    bigger = np.empty((2 * rec.shape[0], REC_COLUMNS), np.int64)
    bigger[: rec.shape[0]] = rec
    return bigger


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a parser found in ``buf[start:end]``: packets, and where and why it stopped."""

    rec: I64
    """One row per packet, ``REC_*`` columns, ``REC_IFACE`` numbered across the file."""
    ts_ns: I64
    """Capture time of each packet, ns since the epoch."""
    linktype: npt.NDArray[np.uint16]
    """Link type of each packet."""
    stop: int
    """First byte not consumed (the start of an incomplete or corrupt record)."""
    need: int
    """Bytes needed from ``stop`` to go on (0 when stopped by an error)."""
    error: str | None
    """Why the record at ``stop`` is corrupt, or None."""
