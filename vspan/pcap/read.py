"""Read pcap and pcapng capture files as a stream of ``FrameBatch``.

The file is read in chunks (64 MiB by default) into a fresh buffer each, with
``readinto``; a numba kernel walks the records of a chunk and returns one row of fields
per packet, numpy turns those rows into the batch's columns, and the record cut by the
chunk's end is carried into the next chunk. Each batch's ``data`` is a view of its own
chunk, so batches stay valid after the reader moves on.

A corrupt record stops the reading: everything before it has been yielded, and
``CaptureReader.error`` names the file and the record's byte offset (``strict=True``
raises it instead, after the last batch). A file that is not a capture at all raises
``CaptureFileError`` as soon as iteration starts.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from functools import partial
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch
from vspan.errors import CaptureFileError
from vspan.fields import Fields, field_offsets, layout
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
    u32,
)
from vspan.pcap._pcapng import PcapngParser

__all__ = [
    "PCAPNG_MAGIC",
    "PCAP_HEADER_FIELDS",
    "PCAP_MAGICS",
    "PCAP_RECORD_FIELDS",
    "CaptureReader",
    "read_capture",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

# draft-ietf-opsawg-pcap §4 File Header (the link type's upper 16 bits carry FCS flags).
PCAP_HEADER_FIELDS: Final[Fields] = (
    ("magic", "u4"),
    ("major_version", "u2"),
    ("minor_version", "u2"),
    ("reserved1", "u4"),
    ("reserved2", "u4"),
    ("snaplen", "u4"),
    ("linktype", "u4"),
)
# draft-ietf-opsawg-pcap §5 Packet Record, then the captured bytes.
PCAP_RECORD_FIELDS: Final[Fields] = (
    ("ts_sec", "u4"),
    ("ts_frac", "u4"),
    ("captured_len", "u4"),
    ("original_len", "u4"),
)
PCAP_MAGICS: Final[dict[bytes, tuple[str, bool]]] = {
    b"\xd4\xc3\xb2\xa1": ("<", False),
    b"\xa1\xb2\xc3\xd4": (">", False),
    b"\x4d\x3c\xb2\xa1": ("<", True),
    b"\xa1\xb2\x3c\x4d": (">", True),
}
"""The first 4 bytes of a classic pcap file: (byte order, nanosecond timestamps)."""
PCAPNG_MAGIC: Final = b"\x0a\x0d\x0d\x0a"
"""The first 4 bytes of a pcapng file (a Section Header Block's type, a palindrome)."""

_PCAP_HEADER_LEN: Final = layout(PCAP_HEADER_FIELDS).itemsize
_REC = field_offsets(PCAP_RECORD_FIELDS)
_REC_LEN = layout(PCAP_RECORD_FIELDS).itemsize
_SEC, _FRAC, _CAP, _ORIG = (_REC[f] for f in ("ts_sec", "ts_frac", "captured_len", "original_len"))
_CAPLEN_LIMIT = int(Stop.CAPLEN_LIMIT)
_READ_STEP: Final = 1 << 20
"""Bytes read between two walks, so that the walk finds the record headers in cache."""


@kernel
def _walk_pcap(
    buf: U8, start: int, end: int, big: bool, limit: int
) -> tuple[I64, int, int, int, int]:
    """Walk pcap records from ``start``: (records, stop, need, Stop, captured length)."""
    rec = new_records(end - start)
    n, p, need, status, caplen = 0, start, 0, 0, 0
    loaded, total = start, 0
    while True:
        if p >= loaded < end:  # the next lines, ahead of the walk
            total, loaded = (
                total + load_lines(buf, loaded, loaded + TOUCH_STEP),
                loaded + TOUCH_STEP,
            )
        if end - p < _REC_LEN:
            need = _REC_LEN
            break
        caplen = u32(buf, p + _CAP, big)
        if caplen > limit:
            status = _CAPLEN_LIMIT
            break
        if end - p < _REC_LEN + caplen:
            need = _REC_LEN + caplen
            break
        if n == rec.shape[0]:
            rec = grow(rec)
        rec[n, REC_DATA], rec[n, REC_CAPLEN] = p + _REC_LEN, caplen
        rec[n, REC_ORIGLEN] = u32(buf, p + _ORIG, big)
        rec[n, REC_TS_HI], rec[n, REC_TS_LO] = u32(buf, p + _SEC, big), u32(buf, p + _FRAC, big)
        rec[n, REC_IFACE], rec[n, REC_KIND] = 0, 0
        n += 1
        p += _REC_LEN + caplen
    return end_records(rec, n, total), p, need, status, caplen


def _nothing(stop: int, need: int, error: str | None) -> Parsed:
    no_rows = np.zeros((0, REC_COLUMNS), np.int64)
    return Parsed(no_rows, np.zeros(0, np.int64), np.zeros(0, np.uint16), stop, need, error)


class _PcapParser:
    """A classic pcap file: its header, then the walk of one chunk."""

    unit: Final = "pcap record"
    names: Final[tuple[str, ...]] = ()

    def __init__(self, order: str, *, nanosecond: bool) -> None:
        self._order = order
        self._frac_ns = 1 if nanosecond else 1000
        self._linktype = -1  # before the header is read
        self._limit = MAX_CAPLEN

    def parse(self, buf: U8, start: int, end: int) -> Parsed:
        pos = start
        if self._linktype < 0:
            if end - start < _PCAP_HEADER_LEN:
                return _nothing(start, _PCAP_HEADER_LEN, None)
            dtype = layout(PCAP_HEADER_FIELDS, self._order)
            head = buf[start : start + _PCAP_HEADER_LEN].view(dtype)[0]
            if head["major_version"] != 2:
                version = f"{head['major_version']}.{head['minor_version']}"
                return _nothing(start, 0, f"pcap version {version} is not supported, expected 2.x")
            self._linktype = int(head["linktype"]) & 0xFFFF
            self._limit = max(int(head["snaplen"]), MAX_CAPLEN)
            pos += _PCAP_HEADER_LEN
        rec, stop, need, status, caplen = _walk_pcap(buf, pos, end, self._order == ">", self._limit)
        error = MESSAGES[Stop.CAPLEN_LIMIT].format(a=caplen, b=self._limit) if status else None
        ts_ns = rec[:, REC_TS_HI] * 10**9 + rec[:, REC_TS_LO] * self._frac_ns
        linktype = np.full(len(rec), self._linktype, np.uint16)
        return Parsed(rec, ts_ns, linktype, stop, need, error)


class _Parser(Protocol):
    @property
    def unit(self) -> str: ...
    @property
    def names(self) -> tuple[str, ...]: ...
    def parse(self, buf: U8, start: int, end: int) -> Parsed: ...


_FORMATS: Final[dict[bytes, tuple[str, Callable[[], _Parser]]]] = {
    **{
        magic: ("pcap", partial(_PcapParser, order, nanosecond=nano))
        for magic, (order, nano) in PCAP_MAGICS.items()
    },
    PCAPNG_MAGIC: ("pcapng", PcapngParser),
}


_MADV_POPULATE_READ: Final = getattr(mmap, "MADV_POPULATE_READ", 22)
"""madvise(2): map a range's pages now (Linux 5.14; Python names it from 3.13 on)."""
_RESIDENT_WINDOWS: Final = 4
"""Windows of a mapped file kept resident behind the reader (the prefetch depth and the
batch in use, plus one)."""


def _populate(mapped: mmap.mmap, start: int, end: int) -> None:
    """Map the pages of ``mapped[start:end]`` in one call (the page cache's pages, read if
    need be), instead of a page fault every few pages as a walk reaches them; a kernel
    without ``MADV_POPULATE_READ`` leaves them to the faults."""
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    with contextlib.suppress(OSError):
        mapped.madvise(_MADV_POPULATE_READ, first, end - first)


class CaptureReader:
    """Iterate over the frames of a pcap or pcapng file, one ``FrameBatch`` per chunk.

    ``iface`` numbers pcapng interfaces in order of appearance across all sections;
    ``iface_names`` holds their ``if_name`` ("" where absent). Classic pcap: all 0, ().
    Simple Packet Blocks have no timestamp: ``ts_ns`` 0. ``origlen`` is raised to
    ``caplen`` where a file says less. Iterating again reads the file from the start.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, chunk_bytes: int = 64 << 20, strict: bool = False
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.path = os.fspath(path)
        self.chunk_bytes = chunk_bytes
        self.strict = strict
        self.error: CaptureFileError | None = None
        """Why reading stopped before the end of the file, or None."""
        self.frames_read = 0
        self.bytes_read = 0
        """Bytes of the file consumed: up to the end of the last complete record."""
        try:
            self.size = os.stat(self.path).st_size
        except OSError:
            self.size = 0
        self.format = ""
        """``"pcap"`` or ``"pcapng"`` once iteration has started."""
        self._parser: _Parser | None = None
        self._sized = True

    @property
    def partial(self) -> bool:
        """Whether reading stopped early, on a corrupt or truncated record."""
        return self.error is not None

    @property
    def iface_names(self) -> tuple[str, ...]:
        """Names of the pcapng interfaces described so far."""
        return self._parser.names if self._parser is not None else ()

    def __iter__(self) -> Iterator[FrameBatch]:
        self.error, self.frames_read, self.bytes_read, self._parser = None, 0, 0, None
        try:
            file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise self._fail(0, f"cannot open: {exc.strerror or exc}") from exc
        with file:
            info = os.fstat(file.fileno())
            self.size = info.st_size
            self._sized = stat.S_ISREG(info.st_mode)  # a pipe's size says nothing
            if self._sized and self.size > 0:
                yield from self._mapped(file)
            else:
                yield from self._chunks(file)

    def _mapped(self, file: io.FileIO) -> Iterator[FrameBatch]:
        """Regular files: walk windows of a read-only memory map, no copy at all.

        Batches are views of the map (``offset`` counts from the start of the file); the
        map stays open as long as a batch refers to it. Records cut at a window's end are
        simply walked again from their start in the next window.
        """
        try:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise self._fail(0, f"cannot map: {exc}") from exc
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        buf = np.frombuffer(mapped, np.uint8)
        size, stop, need = len(buf), 0, 4
        window_starts: list[int] = []
        while True:
            # Resident pages of a mapping count as the process's memory: let the kernel
            # drop those a few windows back. For a read-only file mapping that only unmaps
            # them; a batch that still reads there faults them back from the page cache.
            window_starts.append(stop)
            if len(window_starts) > _RESIDENT_WINDOWS:
                behind = window_starts[-_RESIDENT_WINDOWS - 1] // mmap.PAGESIZE * mmap.PAGESIZE
                if behind > 0:
                    mapped.madvise(mmap.MADV_DONTNEED, 0, behind)
            end = min(size, stop + max(self.chunk_bytes, need))
            _populate(mapped, stop, end)
            parser = self._parser or self._sniff(buf[:end])
            part = parser.parse(buf, stop, end)  # one walk (it loads lines ahead of itself)
            stop, need, error = part.stop, part.need, part.error
            eof = end >= size
            if error is None and stop < end and eof and need > size - stop:
                error = f"{parser.unit} truncated: needs {need} bytes, the file has {size - stop}"
            self.bytes_read = stop
            if len(part.rec):
                yield self._batch(buf, [part], parser.names)
            if error is not None:
                failure = self._fail(stop, error)
                if self.strict:
                    raise failure
                return
            if eof and stop >= size:
                return
            if eof and need <= size - stop:  # pragma: no cover - the walk always advances
                return

    def _chunks(self, file: io.FileIO) -> Iterator[FrameBatch]:
        buf = np.zeros(0, np.uint8)
        filled = stop = base = 0
        need = 4  # the magic
        while True:
            carry = filled - stop
            chunk = np.empty(carry + max(self.chunk_bytes, need), np.uint8)
            chunk[:carry] = buf[stop:filled]
            buf, filled, stop = chunk, carry, 0  # the old chunk belongs to its batch now
            parts: list[Parsed] = []
            eof = False
            while filled < len(buf) and not eof:  # read a step, walk it while it is in cache
                want = min(_READ_STEP, len(buf) - filled)
                got = self._fill(file, buf[filled : filled + want], base + filled)
                filled, eof = filled + got, got < want
                parser = self._parser or self._sniff(buf[:filled])
                parts.append(parser.parse(buf, stop, filled))
                stop = parts[-1].stop
                if parts[-1].error is not None:
                    break
            need, error = parts[-1].need, parts[-1].error
            left = filled - stop if eof else self.size - base - stop
            if error is None and stop < filled and (eof or self._sized) and need > left:
                error = f"{parser.unit} truncated: needs {need} bytes, the file has {left}"
            self.bytes_read = base + stop
            if any(len(part.rec) for part in parts):
                yield self._batch(buf[:filled], parts, parser.names)
            if error is not None:
                exc = self._fail(base + stop, error)
                if self.strict:
                    raise exc
                return
            if eof:
                return
            base += stop

    def _fill(self, file: io.FileIO, view: U8, offset: int) -> int:
        """Read into ``view`` until it is full or the file ends; the bytes read."""
        target, total = view.data, 0
        while total < len(view):
            try:
                got = file.readinto(target[total:])
            except OSError as exc:
                raise self._fail(offset + total, f"read error: {exc}") from exc
            if not got:
                break
            total += got
        return total

    def _sniff(self, head: U8) -> _Parser:
        if len(head) < 4:
            raise self._fail(0, f"{len(head)} bytes is too short for a pcap or pcapng file")
        magic = bytes(head[:4])
        if (found := _FORMATS.get(magic)) is None:
            raise self._fail(0, f"not a pcap or pcapng file: magic {magic.hex()}")
        self.format, factory = found
        self._parser = factory()
        return self._parser

    def _fail(self, offset: int, message: str) -> CaptureFileError:
        self.error = CaptureFileError(self.path, offset, message)
        return self.error

    def _batch(self, data: U8, parts: list[Parsed], names: tuple[str, ...]) -> FrameBatch:
        rec = np.concatenate([part.rec for part in parts])
        caplen = rec[:, REC_CAPLEN].astype(np.int32)
        self.frames_read += len(rec)
        return FrameBatch(
            data=data,
            offset=np.ascontiguousarray(rec[:, REC_DATA]),
            caplen=caplen,
            origlen=np.clip(rec[:, REC_ORIGLEN], caplen, 2**31 - 1).astype(np.int32),
            ts_ns=np.concatenate([part.ts_ns for part in parts]),
            linktype=np.concatenate([part.linktype for part in parts]),
            iface=rec[:, REC_IFACE].astype(np.int32),
            iface_names=names,
        )


def read_capture(
    path: str | os.PathLike[str], *, chunk_bytes: int = 64 << 20, strict: bool = False
) -> FrameBatch:
    """The whole file as one batch (for small files and tests); see ``CaptureReader``."""
    reader = CaptureReader(path, chunk_bytes=chunk_bytes, strict=strict)
    batches = list(reader)
    if len(batches) == 1:
        return batches[0]
    starts = np.cumsum([0] + [len(b.data) for b in batches[:-1]], dtype=np.int64)
    return FrameBatch(
        data=np.concatenate([b.data for b in batches] or [np.zeros(0, np.uint8)]),
        offset=np.concatenate(
            [b.offset + s for b, s in zip(batches, starts, strict=False)] or [np.zeros(0, np.int64)]
        ),
        caplen=np.concatenate([b.caplen for b in batches] or [np.zeros(0, np.int32)]),
        origlen=np.concatenate([b.origlen for b in batches] or [np.zeros(0, np.int32)]),
        ts_ns=np.concatenate([b.ts_ns for b in batches] or [np.zeros(0, np.int64)]),
        linktype=np.concatenate([b.linktype for b in batches] or [np.zeros(0, np.uint16)]),
        iface=np.concatenate([b.iface for b in batches] or [np.zeros(0, np.int32)]),
        iface_names=reader.iface_names,
    )
