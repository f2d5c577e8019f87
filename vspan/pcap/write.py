"""Write classic pcap and pcapng files, a frame or a whole ``FrameBatch`` at a time.

Both writers take an open binary file and write little-endian files. ``write_batch`` builds
every record header at once with numpy and packs headers and frames with one numba pass,
then makes one ``write``; its output is byte-identical to calling ``write`` per frame.
The record layouts are the reader's tables (``vspan.pcap.read``, ``vspan.pcap._pcapng``).

A writer closes the file only if it opened it (``open_writer``); otherwise ``close()``
and leaving the ``with`` block only flush it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal, Self, overload

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch
from vspan.fields import layout, struct_format
from vspan.kernels import kernel
from vspan.pcap._pcapng import (
    BLOCK_TRAILER_LEN,
    EPB_FIELDS,
    IDB_FIELDS,
    OPTION_FIELDS,
    SHB_FIELDS,
    BlockType,
    Option,
)
from vspan.pcap.read import PCAP_HEADER_FIELDS, PCAP_MAGICS, PCAP_RECORD_FIELDS

__all__ = ["PcapWriter", "PcapngWriter", "open_writer"]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

_GIGA: Final = 10**9
_PCAP_TS_END: Final = 2**32 * _GIGA  # ts_sec is an unsigned 32-bit count
_PCAP_RECORD = layout(PCAP_RECORD_FIELDS)
_EPB = layout(EPB_FIELDS)
_EPB_BODY: Final = struct_format(EPB_FIELDS[2:])
_OPTION: Final = struct.Struct(struct_format(OPTION_FIELDS))
_END_OF_OPTIONS: Final = _OPTION.pack(Option.END, 0)
_BLOCK_HEAD: Final = struct.Struct("<II")  # §3.1: type, total length
_BLOCK_TAIL: Final = struct.Struct("<I")  # §3.1: total length again
_BYTE_ORDER_MAGIC: Final = 0x1A2B3C4D


@kernel
def _pack(data: U8, frames: I64, records: tuple[U8, U8, U8, I64], align: int) -> U8:
    """Per row ``i``: ``heads[i]``, its frame (``frames[i]``: offset, length) padded with zeros
    to ``align``, its options ``blob[opts[i, 0]:][:opts[i, 1]]``, then ``tails[i]``."""
    heads, tails, blob, opts = records
    offset, caplen = frames[:, 0], frames[:, 1]
    padded = (caplen + align - 1) // align * align
    size = padded.sum() + opts[:, 1].sum() + caplen.shape[0] * (heads.shape[1] + tails.shape[1])
    out = np.empty(size, np.uint8)
    q = 0
    for i in range(caplen.shape[0]):
        out[q : q + heads.shape[1]] = heads[i]
        q += heads.shape[1]
        c, o = caplen[i], offset[i]
        out[q : q + c] = data[o : o + c]
        out[q + c : q + padded[i]] = 0
        q += padded[i]
        k, n = opts[i, 0], opts[i, 1]
        out[q : q + n] = blob[k : k + n]
        q += n
        out[q : q + tails.shape[1]] = tails[i]
        q += tails.shape[1]
    return out


def _no_options(n: int) -> tuple[U8, I64]:
    return np.zeros(0, np.uint8), np.zeros((n, 2), np.int64)


def _comment_options(comments: Sequence[str | None]) -> tuple[U8, I64]:
    """The EPB options of each row's comment (none for None), each distinct one encoded once:
    a blob and per row its (offset, length) in it."""
    index = {c: k for k, c in enumerate(dict.fromkeys(comments))}
    codes = np.fromiter(map(index.__getitem__, comments), np.int64, len(comments))
    encoded = [
        b"" if c is None else _option(Option.COMMENT, c.encode()) + _END_OF_OPTIONS for c in index
    ]
    lengths = np.array([len(e) for e in encoded], np.int64)
    starts = np.cumsum(lengths) - lengths
    blob = np.frombuffer(b"".join(encoded), np.uint8)
    return blob, np.stack([starts[codes], lengths[codes]], axis=1)


def _rows(batch: FrameBatch, index: npt.NDArray[Any] | None) -> I64:
    """The batch rows to write: all, the True ones of a mask, or the given positions."""
    if index is None:
        return np.arange(len(batch), dtype=np.int64)
    index = np.asarray(index)
    if index.dtype == np.bool_:
        return np.flatnonzero(index)
    return index.astype(np.int64, copy=False)


def _frames(batch: FrameBatch, rows: I64) -> tuple[I64, I64, I64, I64]:
    """Offsets, lengths, original lengths and timestamps of ``rows``, checked."""
    offset, caplen = batch.offset[rows], batch.caplen[rows].astype(np.int64)
    origlen, ts_ns = batch.origlen[rows].astype(np.int64), batch.ts_ns[rows]
    if ((caplen < 0) | (offset < 0) | (offset + caplen > len(batch.data))).any():
        raise ValueError("batch offsets and lengths run outside its data")
    if (origlen < caplen).any():
        raise ValueError("batch has an origlen smaller than its frame's length")
    return offset, caplen, origlen, ts_ns


def _origlen(frame: bytes, origlen: int | None) -> int:
    if origlen is None:
        return len(frame)
    if origlen < len(frame):
        raise ValueError(f"origlen {origlen} is smaller than the frame's {len(frame)} bytes")
    return origlen


class _Writer:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._owns = False

    def close(self) -> None:
        """Flush; close the file if this writer opened it."""
        if self._owns:
            self._out.close()
        else:
            self._out.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PcapWriter(_Writer):
    """A classic pcap file; nanosecond timestamps unless ``nanosecond=False``.

    Frames longer than ``snaplen`` are cut to it. Timestamps must lie in 1970..2106.
    """

    def __init__(
        self, out: BinaryIO, *, linktype: int = 1, snaplen: int = 262144, nanosecond: bool = True
    ) -> None:
        super().__init__(out)
        self.linktype, self.snaplen, self.nanosecond = linktype, snaplen, nanosecond
        self._frac_unit = 1 if nanosecond else 1000
        magic = next(m for m, v in PCAP_MAGICS.items() if v == ("<", nanosecond))
        head = (int.from_bytes(magic, "little"), 2, 4, 0, 0, snaplen, linktype)
        out.write(struct.pack(struct_format(PCAP_HEADER_FIELDS), *head))

    def write(self, frame: bytes, *, ts_ns: int, origlen: int | None = None) -> None:
        if not 0 <= ts_ns < _PCAP_TS_END:
            raise ValueError(f"timestamp {ts_ns} ns is outside the pcap range 1970..2106")
        caplen, orig = min(len(frame), self.snaplen), _origlen(frame, origlen)
        sec, frac = divmod(ts_ns, _GIGA)
        head = struct.pack(
            struct_format(PCAP_RECORD_FIELDS), sec, frac // self._frac_unit, caplen, orig
        )
        self._out.write(head + frame[:caplen])

    def write_batch(self, batch: FrameBatch, index: npt.NDArray[Any] | None = None) -> None:
        """Write the frames of ``batch`` (or its ``index`` rows) in one go."""
        rows = _rows(batch, index)
        offset, caplen, origlen, ts_ns = _frames(batch, rows)
        if ((ts_ns < 0) | (ts_ns >= _PCAP_TS_END)).any():
            raise ValueError("batch has a timestamp outside the pcap range 1970..2106")
        heads = np.empty(len(rows), _PCAP_RECORD)
        heads["ts_sec"], frac = np.divmod(ts_ns, _GIGA)
        heads["ts_frac"] = frac // self._frac_unit
        heads["captured_len"] = caplen = np.minimum(caplen, self.snaplen)
        heads["original_len"] = origlen
        head_bytes = heads.view(np.uint8).reshape(len(rows), _PCAP_RECORD.itemsize)
        no_tail = np.zeros((len(rows), 0), np.uint8)
        frames = np.stack([offset, caplen], axis=1)
        records = (head_bytes, no_tail, *_no_options(len(rows)))
        self._out.write(_pack(batch.data, frames, records, 1).data)


def _option(code: int, value: bytes) -> bytes:
    """One option (draft-ietf-opsawg-pcapng §3.5), value padded to 4 bytes."""
    return _OPTION.pack(code, len(value)) + value + bytes(-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    """One block (§3.1) around a body already padded to 4 bytes."""
    total = _BLOCK_HEAD.size + len(body) + BLOCK_TRAILER_LEN
    return _BLOCK_HEAD.pack(btype, total) + body + _BLOCK_TAIL.pack(total)


class PcapngWriter(_Writer):
    """A pcapng file: one little-endian section, nanosecond interfaces added at any time."""

    def __init__(self, out: BinaryIO, *, application: str = "vspan") -> None:
        super().__init__(out)
        self._snaplen: list[int] = []
        body = struct.pack(struct_format(SHB_FIELDS[2:]), _BYTE_ORDER_MAGIC, 1, 0, -1)
        userappl = _option(Option.SHB_USERAPPL, application.encode())
        out.write(_block(BlockType.SHB, body + userappl + _END_OF_OPTIONS))

    def add_interface(
        self, *, name: str, linktype: int = 1, snaplen: int = 0, description: str | None = None
    ) -> int:
        """Describe an interface (``snaplen`` 0: no limit); returns its index."""
        opts = _option(Option.IF_NAME, name.encode())
        if description is not None:
            opts += _option(Option.IF_DESCRIPTION, description.encode())
        opts += _option(Option.IF_TSRESOL, bytes([9])) + _END_OF_OPTIONS
        body = struct.pack(struct_format(IDB_FIELDS[2:]), linktype, 0, snaplen)
        self._out.write(_block(BlockType.IDB, body + opts))
        self._snaplen.append(snaplen)
        return len(self._snaplen) - 1

    def write(
        self,
        frame: bytes,
        *,
        ts_ns: int,
        iface: int,
        origlen: int | None = None,
        comment: str | None = None,
    ) -> None:
        if not 0 <= iface < len(self._snaplen):
            raise ValueError(f"interface {iface} was not added ({len(self._snaplen)} are)")
        if not 0 <= ts_ns < 2**64:
            raise ValueError(f"timestamp {ts_ns} ns is before 1970")
        snaplen, orig = self._snaplen[iface], _origlen(frame, origlen)
        caplen = min(len(frame), snaplen) if snaplen else len(frame)
        head = struct.pack(_EPB_BODY, iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, caplen, orig)
        data = frame[:caplen] + bytes(-caplen % 4)
        opts = b""
        if comment is not None:
            opts = _option(Option.COMMENT, comment.encode()) + _END_OF_OPTIONS
        self._out.write(_block(BlockType.EPB, head + data + opts))

    def write_batch(
        self,
        batch: FrameBatch,
        *,
        iface: npt.NDArray[np.integer[Any]] | int,
        index: npt.NDArray[Any] | None = None,
        comments: Sequence[str | None] | None = None,
    ) -> None:
        """Write frames of ``batch``; ``iface`` is one index or one per row of ``batch``."""
        rows = _rows(batch, index)
        offset, caplen, origlen, ts_ns = _frames(batch, rows)
        ifaces = np.broadcast_to(iface, len(batch))[rows].astype(np.int64)
        if ((ifaces < 0) | (ifaces >= len(self._snaplen))).any():
            raise ValueError(
                f"batch names an interface that was not added ({len(self._snaplen)} are)"
            )
        if (ts_ns < 0).any():
            raise ValueError("batch has a timestamp before 1970")
        if comments is not None and len(comments) != len(rows):
            raise ValueError(f"{len(comments)} comments for {len(rows)} frames")
        blob, opts = _no_options(len(rows)) if comments is None else _comment_options(comments)
        snaplen = np.asarray(self._snaplen, np.int64)[ifaces]
        caplen = np.where(snaplen > 0, np.minimum(caplen, snaplen), caplen)
        heads = np.empty(len(rows), _EPB)
        heads["type"] = BlockType.EPB
        total = _EPB.itemsize + (caplen + 3) // 4 * 4 + opts[:, 1] + BLOCK_TRAILER_LEN
        heads["total_length"] = total
        heads["interface_id"] = ifaces
        heads["ts_high"], heads["ts_low"] = ts_ns >> 32, ts_ns & 0xFFFFFFFF
        heads["captured_len"], heads["original_len"] = caplen, origlen
        head_bytes = heads.view(np.uint8).reshape(len(rows), _EPB.itemsize)
        tails = total.astype("<u4").view(np.uint8).reshape(len(rows), BLOCK_TRAILER_LEN)
        frames = np.stack([offset, caplen], axis=1)
        self._out.write(_pack(batch.data, frames, (head_bytes, tails, blob, opts), 4).data)


@overload
def open_writer(
    path: str | os.PathLike[str], fmt: Literal["pcap"] = "pcap", **options: Any
) -> PcapWriter: ...
@overload
def open_writer(
    path: str | os.PathLike[str], fmt: Literal["pcapng"], **options: Any
) -> PcapngWriter: ...
def open_writer(
    path: str | os.PathLike[str], fmt: str = "pcap", **options: Any
) -> PcapWriter | PcapngWriter:
    """Create ``path`` and a writer that owns it (closing the writer closes the file)."""
    kinds: dict[str, type[PcapWriter] | type[PcapngWriter]] = {
        "pcap": PcapWriter,
        "pcapng": PcapngWriter,
    }
    if fmt not in kinds:
        raise ValueError(f"unknown capture format {fmt!r}, expected 'pcap' or 'pcapng'")
    out = open(path, "wb")  # noqa: SIM115 (owned by the writer)
    try:
        writer = kinds[fmt](out, **options)
    except BaseException:
        out.close()
        raise
    writer._owns = True
    return writer
