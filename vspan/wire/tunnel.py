"""The vspan tunnel protocol, version 1: one message carries a batch of VN-tagged frames.

Sans-I/O: ``encode_message`` turns frames into the bytes of one message and
``decode_message`` is its exact inverse; they open no socket, read no clock and log
nothing. Every rejection is a ``TunnelError`` whose ``reason`` is a counter name of
``spec/tunnel.md`` (see ``REASONS``). The stream decoder for TCP and the sender-side
``MessageBuilder`` live in ``vspan.wire.tunnel_stream``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch, LinkType
from vspan.errors import TunnelError
from vspan.fields import Fields, layout, names, struct_format

__all__ = [
    "AUTH_LEN",
    "DEFAULT_PORT",
    "FLAG_AUTH",
    "HEADER",
    "HEADER_DTYPE",
    "HEADER_FIELDS",
    "HEADER_LAYOUT",
    "HEADER_LEN",
    "KNOWN_FLAGS",
    "MAGIC",
    "MAX_UDP_MESSAGE",
    "MIN_FRAME",
    "REASONS",
    "RECORD_DTYPE",
    "RECORD_LAYOUT",
    "RECORD_LEN",
    "VERSION",
    "VNTAG_ETHERTYPE",
    "Header",
    "Message",
    "decode_message",
    "encode_message",
    "parse_header",
]

MAGIC: Final = 0x5653
VERSION: Final = 1
FLAG_AUTH: Final = 0x01
KNOWN_FLAGS: Final = FLAG_AUTH
HEADER_LEN: Final = 24
RECORD_LEN: Final = 12
AUTH_LEN: Final = 16
DEFAULT_PORT: Final = 47470
MAX_UDP_MESSAGE: Final = 65507
MIN_FRAME: Final = 18
VNTAG_ETHERTYPE: Final = 0x8926
_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF

# spec/tunnel.md, "Message": the 24-byte header, big-endian, in wire order. The struct of
# ``encode_message``/``parse_header`` and the numpy dtype of batches (``HEADER_DTYPE``) are
# both derived from this one table.
HEADER_LAYOUT: Final[Fields] = (
    ("magic", "u2"),
    ("version", "u1"),
    ("flags", "u1"),
    ("length", "u4"),
    ("collector_id", "u4"),
    ("boot_id", "u4"),
    ("seq", "u4"),
    ("count", "u2"),
    ("reserved", "u2"),
)
HEADER_FIELDS: Final = names(HEADER_LAYOUT)
HEADER: Final = struct.Struct(struct_format(HEADER_LAYOUT, ">"))
HEADER_DTYPE: Final = layout(HEADER_LAYOUT, ">")

# spec/tunnel.md, "Record table entry": one fixed-width row per frame, in frame order.
RECORD_LAYOUT: Final[Fields] = (("ts_ns", "u8"), ("cap_len", "u2"), ("orig_len", "u2"))
RECORD_DTYPE: Final = layout(RECORD_LAYOUT, ">")

if (
    HEADER.size != HEADER_LEN
    or HEADER_DTYPE.itemsize != HEADER_LEN
    or (RECORD_DTYPE.itemsize != RECORD_LEN)
):  # pragma: no cover - a bug in the tables above
    raise AssertionError("tunnel layout tables do not match the spec's sizes")

REASONS: Final[tuple[str, ...]] = (
    "bad_magic",
    "bad_version",
    "bad_flags",
    "bad_length",
    "bad_collector",
    "bad_record",
    "bad_auth",
    "unknown_collector",
)
"""Every ``TunnelError.reason`` this module raises: the receiver's drop counters."""


@dataclass(frozen=True, slots=True)
class Header:
    """The header fields a receiver needs (``magic``, ``version``, ``reserved`` are checked)."""

    flags: int
    """Flag bits; only ``FLAG_AUTH`` is defined."""
    length: int
    """Total bytes of the message: header, record table, frames and tag."""
    collector_id: int
    """The sending collector (host), never 0."""
    boot_id: int
    """Random per collector start; a new value restarts ``seq``."""
    seq: int
    """Message sequence number per (``collector_id``, ``boot_id``), modulo 2^32."""
    count: int
    """Number of frames (records) in the message."""

    @property
    def tag_len(self) -> int:
        """Bytes of the authentication tag at the end (0 or ``AUTH_LEN``)."""
        return AUTH_LEN if self.flags & FLAG_AUTH else 0


def parse_header(
    data: bytes | bytearray | memoryview,
    *,
    keys: Mapping[int, bytes] | None = None,
    require_known: bool = False,
) -> Header:
    """Apply every check that needs only the first 24 bytes of a message, in this order.

    ``bad_length`` (fewer than 24 bytes), ``bad_magic``, ``bad_version``, ``bad_flags`` (an
    unknown flag bit), ``bad_collector`` (``collector_id`` 0), ``unknown_collector``
    (``require_known`` and no key for the collector), ``bad_auth`` (a key is configured but
    AUTH is not set), ``bad_length`` (``length`` below 24 + 12 × ``count`` (+16 with AUTH)).
    The reserved field is ignored: the spec sets it to 0 but does not make it a rule.
    """
    if len(data) < HEADER_LEN:
        raise TunnelError("bad_length", f"{len(data)} bytes, a header needs {HEADER_LEN}")
    magic, version, flags, length, collector, boot, seq, count, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise TunnelError("bad_magic", f"magic 0x{magic:04x} at offset 0, expected 0x{MAGIC:04x}")
    if version != VERSION:
        raise TunnelError("bad_version", f"version {version} at offset 2, expected {VERSION}")
    if flags & ~KNOWN_FLAGS:
        raise TunnelError(
            "bad_flags",
            f"flags 0x{flags:02x} at offset 3 set unknown bits 0x{flags & ~KNOWN_FLAGS:02x}, "
            f"expected only 0x{KNOWN_FLAGS:02x}",
        )
    if collector == 0:
        raise TunnelError("bad_collector", "collector_id 0 at offset 8, expected non-zero")
    key = keys.get(collector) if keys is not None else None
    if key is None and require_known:
        raise TunnelError(
            "unknown_collector",
            f"collector_id {collector} has no configured key and only known collectors "
            "are accepted",
        )
    if key is not None and not flags & FLAG_AUTH:
        raise TunnelError(
            "bad_auth", f"collector_id {collector} has a key configured, AUTH flag not set"
        )
    header = Header(flags, length, collector, boot, seq, count)
    need = HEADER_LEN + RECORD_LEN * count + header.tag_len
    if length < need:
        tag = " and the tag" if header.tag_len else ""
        raise TunnelError(
            "bad_length",
            f"header says {length} bytes, {count} records{tag} need at least {need}",
        )
    return header


@dataclass(frozen=True, slots=True, eq=False)
class Message:
    """One decoded message; frame ``i`` is ``frames[offset[i]:offset[i] + cap_len[i]]``."""

    flags: int
    """Flag bits as received (``FLAG_AUTH`` when a tag ended the message)."""
    length: int
    """Total bytes of the message on the wire."""
    collector_id: int
    """The sending collector (host), never 0."""
    boot_id: int
    """Random per collector start; a new value restarts ``seq``."""
    seq: int
    """Message sequence number per (``collector_id``, ``boot_id``), modulo 2^32."""
    count: int
    """Number of frames."""
    ts_ns: npt.NDArray[np.int64]
    """Capture time of each frame, ns since the Unix epoch (the u64 read as int64)."""
    cap_len: npt.NDArray[np.int32]
    """Bytes of each frame present in ``frames``."""
    orig_len: npt.NDArray[np.int32]
    """Length of each frame untruncated (``>= cap_len``)."""
    frames: bytes | memoryview
    """The frames area: every frame back to back, without header, table or tag."""
    offset: npt.NDArray[np.int64]
    """Start of each frame in ``frames`` (cumulative sum of ``cap_len``)."""
    authenticated: bool
    """True only when the tag was verified with the collector's configured key."""

    def frame(self, i: int) -> bytes:
        """The captured bytes of frame ``i`` (for tests and tools, not the hot path)."""
        start = int(self.offset[i])
        return bytes(self.frames[start : start + int(self.cap_len[i])])

    def to_batch(self) -> FrameBatch:
        """The frames as a ``FrameBatch`` (Ethernet, ``host`` = ``collector_id``), no copy."""
        n = self.count
        return FrameBatch(
            data=np.frombuffer(self.frames, dtype=np.uint8),
            offset=self.offset,
            caplen=self.cap_len,
            origlen=self.orig_len,
            ts_ns=self.ts_ns,
            linktype=np.full(n, LinkType.ETHERNET, dtype=np.uint16),
            host=np.full(n, self.collector_id, dtype=np.uint32),
        )


def _offsets(cap_len: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
    offset = np.zeros(cap_len.size, dtype=np.int64)
    np.cumsum(cap_len[:-1], dtype=np.int64, out=offset[1:])
    return offset


def _bad_record(
    cap_len: npt.NDArray[np.int32],
    orig_len: npt.NDArray[np.int32],
    offset: npt.NDArray[np.int64],
    area: npt.NDArray[np.uint8],
    base: int,
) -> str | None:
    """Describe the first frame breaking a record rule (``base``: area's message offset)."""
    too_long = cap_len > orig_len
    short = cap_len < MIN_FRAME
    whole = np.flatnonzero(~short)
    at = offset[whole] + 12
    ethertype = np.zeros(cap_len.size, dtype=np.int64)
    ethertype[whole] = (area[at].astype(np.int64) << 8) | area[at + 1]
    bad = too_long | short | ((ethertype != VNTAG_ETHERTYPE) & ~short)
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    where = f"frame {i} at offset {base + int(offset[i])}"
    if too_long[i]:
        return f"{where}: cap_len {cap_len[i]} exceeds orig_len {orig_len[i]}"
    if short[i]:
        return f"{where}: {cap_len[i]} bytes, a VN-tagged frame has at least {MIN_FRAME}"
    return (
        f"{where}: EtherType 0x{int(ethertype[i]):04x} at frame offset 12, "
        f"expected 0x{VNTAG_ETHERTYPE:04x}"
    )


def decode_message(
    data: bytes | bytearray | memoryview,
    *,
    keys: Mapping[int, bytes] | None = None,
    require_known: bool = False,
    stream: bool = False,
) -> Message:
    """Decode and validate one message; every rejection is a ``TunnelError``.

    ``keys`` maps ``collector_id`` to its BLAKE2b key; ``require_known`` accepts only the
    collectors in ``keys``. A message with AUTH from a collector without a key is accepted
    unverified (``authenticated=False``). With ``stream`` the message is the prefix of
    ``data`` that ``length`` announces (the rest belongs to the next message); otherwise
    ``data`` is one datagram and must be exactly ``length`` bytes.

    Checks, in order: the header checks of ``parse_header``; ``bad_length`` when ``length``
    differs from the datagram's size (or exceeds the bytes available, with ``stream``);
    ``bad_auth`` when the tag does not verify (before any record check, so that
    unauthenticated garbage counts as ``bad_auth``); ``bad_length`` when the frames do not
    exactly fill the space between the table and the tag; ``bad_record`` for the first
    frame with ``cap_len > orig_len``, fewer than 18 bytes or no 0x8926 at offset 12.
    """
    view = memoryview(data).cast("B")
    header = parse_header(view, keys=keys, require_known=require_known)
    length, count = header.length, header.count
    if stream and length > len(view):
        raise TunnelError("bad_length", f"header says {length} bytes, only {len(view)} available")
    if not stream and length != len(view):
        raise TunnelError("bad_length", f"header says {length} bytes, datagram has {len(view)}")
    end = length - header.tag_len
    key = keys.get(header.collector_id) if keys is not None else None
    if key is not None:
        tag = hashlib.blake2b(view[:end], digest_size=AUTH_LEN, key=key).digest()
        if not hmac.compare_digest(tag, view[end:length]):
            raise TunnelError(
                "bad_auth",
                f"tag at offset {end} does not verify with the key of collector_id "
                f"{header.collector_id}",
            )
    table = np.frombuffer(view, dtype=RECORD_DTYPE, count=count, offset=HEADER_LEN)
    cap_len = table["cap_len"].astype(np.int32)
    orig_len = table["orig_len"].astype(np.int32)
    start = HEADER_LEN + RECORD_LEN * count
    total = int(cap_len.sum(dtype=np.int64))
    if total != end - start:
        raise TunnelError(
            "bad_length",
            f"records' cap_len sum to {total} bytes, frames area at offset {start} "
            f"has {end - start}",
        )
    offset = _offsets(cap_len)
    area = np.frombuffer(view, dtype=np.uint8, count=total, offset=start)
    problem = _bad_record(cap_len, orig_len, offset, area, start)
    if problem is not None:
        raise TunnelError("bad_record", problem)
    return Message(
        flags=header.flags,
        length=length,
        collector_id=header.collector_id,
        boot_id=header.boot_id,
        seq=header.seq,
        count=count,
        ts_ns=table["ts_ns"].astype(np.uint64).view(np.int64),
        cap_len=cap_len,
        orig_len=orig_len,
        frames=view[start:end] if isinstance(data, bytes) else bytes(view[start:end]),
        offset=offset,
        authenticated=key is not None,
    )


def _check_u32(name: str, value: int, low: int = 0) -> None:
    if not low <= value <= _U32:
        raise ValueError(f"{name} {value} out of range {low}..{_U32}")


def encode_message(
    *,
    collector_id: int,
    boot_id: int,
    seq: int,
    frames: Sequence[bytes],
    ts_ns: Sequence[int] | npt.NDArray[np.int64],
    orig_len: Sequence[int] | None = None,
    key: bytes | None = None,
) -> bytes:
    """The bytes of one message: the exact inverse of ``decode_message``.

    ``orig_len`` defaults to each frame's length; ``ts_ns`` values are int64 and are sent as
    their u64 bit pattern. With ``key`` the AUTH flag is set and the 16-byte keyed BLAKE2b
    tag is appended. Raises ``ValueError`` for anything a receiver would reject.
    """
    _check_u32("collector_id", collector_id, low=1)
    _check_u32("boot_id", boot_id)
    _check_u32("seq", seq)
    n = len(frames)
    if n > _U16:
        raise ValueError(f"{n} frames, a message holds at most {_U16}")
    try:
        ts = np.asarray(ts_ns, dtype=np.int64)
        orig = np.asarray([len(f) for f in frames] if orig_len is None else orig_len, np.int64)
    except OverflowError as exc:
        raise ValueError(f"ts_ns or orig_len out of range: {exc}") from exc
    if ts.shape != (n,) or orig.shape != (n,):
        raise ValueError(f"{n} frames but {ts.size} ts_ns and {orig.size} orig_len")
    cap = np.fromiter((len(f) for f in frames), dtype=np.int64, count=n)
    for name, column in (("cap_len", cap), ("orig_len", orig)):
        if n and (column.min() < 0 or column.max() > _U16):
            i = int(np.flatnonzero((column < 0) | (column > _U16))[0])
            raise ValueError(f"frame {i}: {name} {column[i]} out of range 0..{_U16}")
    body = b"".join(frames)
    area = np.frombuffer(body, dtype=np.uint8)
    start = HEADER_LEN + RECORD_LEN * n
    cap32 = cap.astype(np.int32)
    problem = _bad_record(cap32, orig.astype(np.int32), _offsets(cap32), area, start)
    if problem is not None:
        raise ValueError(problem)
    tag_len = AUTH_LEN if key is not None else 0
    length = start + len(body) + tag_len
    if length > _U32:
        raise ValueError(f"message of {length} bytes exceeds {_U32}")
    table = np.empty(n, dtype=RECORD_DTYPE)
    table["ts_ns"] = ts.view(np.uint64)
    table["cap_len"] = cap
    table["orig_len"] = orig
    flags = FLAG_AUTH if key is not None else 0
    head = HEADER.pack(MAGIC, VERSION, flags, length, collector_id, boot_id, seq, n, 0)
    msg = head + table.tobytes() + body
    if key is None:
        return msg
    return msg + hashlib.blake2b(msg, digest_size=AUTH_LEN, key=key).digest()
