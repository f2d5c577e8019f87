"""Validate and decode many tunnel messages at once: the analyzer's vectorized ingest.

A UDP receive loop fills one large buffer with datagrams back to back (``recv_into``) and
remembers where each starts and how long it is. ``ingest`` takes that buffer whole and
applies every rule of ``spec/tunnel.md`` to all messages together with numpy, in exactly
the order of ``vspan.wire.tunnel.decode_message`` and with the same reasons (``REASONS``):

1. ``bad_length`` (fewer than 24 bytes), ``bad_magic``, ``bad_version``, ``bad_flags``,
   ``bad_collector``, ``unknown_collector``, ``bad_auth`` (key but no AUTH flag),
   ``bad_length`` (``length`` below the table and tag), ``bad_length`` (``length`` is not the
   datagram's size) — one structured-dtype gather of every header;
2. ``bad_auth`` (the tag does not verify) — keyed BLAKE2b, one ``hashlib`` call per message
   of a collector with a key (hashing is per message by nature; it releases no work to
   numpy, so this is the one Python loop, and only for authenticated collectors);
3. ``bad_length`` (the frames do not fill the space between table and tag) and
   ``bad_record`` (``cap_len > orig_len``, a frame under 18 bytes, no 0x8926 at offset 12)
   — on a flat array of every record of every message (``np.repeat`` of the counts), with
   per-message sums as differences of one cumulative sum (empty messages need no care).

An invalid message is dropped whole: none of its frames appear in the ``FrameBatch``. The
batch's offsets point into the caller's buffer (no copy), so the buffer must stay unchanged
until the batch has been decoded.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from vspan.batch import FrameBatch, LinkType
from vspan.wire.tunnel import (
    AUTH_LEN,
    FLAG_AUTH,
    HEADER_DTYPE,
    HEADER_LEN,
    KNOWN_FLAGS,
    MAGIC,
    MIN_FRAME,
    REASONS,
    RECORD_DTYPE,
    RECORD_LEN,
    VERSION,
    VNTAG_ETHERTYPE,
)

__all__ = ["OK", "REASON_CODES", "REASON_NAMES", "Ingested", "ingest"]

U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


OK: Final = 0
"""The reason code of a valid message."""
REASON_NAMES: Final[tuple[str, ...]] = ("ok", *REASONS)
"""Reason code → name: 0 is ``ok``, then ``vspan.wire.tunnel.REASONS`` in order."""
REASON_CODES: Final = {name: code for code, name in enumerate(REASON_NAMES)}
"""Reason name → code."""
_C = REASON_CODES


@dataclass(frozen=True, slots=True, eq=False)
class Ingested:
    """The frames of every valid message, and one row per message for accounting."""

    frames: FrameBatch
    """Frames of the valid messages, message by message in input order; ``host`` is the
    ``collector_id``; offsets point into the ingested buffer."""
    message: I64
    """Index (into the per-message arrays) of the message of each frame."""
    collector_id: U32
    """``collector_id`` from the header, or 0 when the header is unreadable (fewer than 24
    bytes, wrong magic or version)."""
    boot_id: U32
    """``boot_id`` from the header (0 when unreadable)."""
    seq: U32
    """``seq`` from the header (0 when unreadable)."""
    count: I64
    """Frames the header announces (0 when unreadable)."""
    size: I64
    """Bytes of each datagram."""
    reason: U8
    """``OK`` or the code (``REASON_NAMES``) of the first rule the message breaks."""
    authenticated: Mask
    """Valid and verified with its collector's key."""
    known: Mask
    """The header names a collector with a key or a registered one (what ``require_known``
    accepts)."""

    @property
    def valid(self) -> Mask:
        """Messages that passed every rule."""
        ok: Mask = self.reason == OK
        return ok

    def frames_of(self, messages: Mask) -> FrameBatch:
        """The frames of the (valid) messages selected by ``messages``, one per message."""
        keep = messages[self.message]
        if keep.all():
            return self.frames
        f, rows = self.frames, np.flatnonzero(keep)
        return FrameBatch(
            data=f.data,
            offset=f.offset[rows],
            caplen=f.caplen[rows],
            origlen=f.origlen[rows],
            ts_ns=f.ts_ns[rows],
            linktype=f.linktype[rows],
            host=f.host[rows],
        )

    def __len__(self) -> int:
        return int(self.size.shape[0])


class _Verdicts:
    """Reason per message: the first failing rule wins (``decode_message``'s order)."""

    def __init__(self, n: int) -> None:
        self.reason = np.zeros(n, np.uint8)
        self.pending = np.ones(n, np.bool_)

    def fail(self, bad: Mask, reason: str) -> None:
        hit = self.pending & bad
        self.reason[hit] = _C[reason]
        self.pending &= ~hit


def _rows(data: U8, at: I64, width: int, dtype: np.dtype[np.void]) -> npt.NDArray[np.void]:
    """The ``width``-byte records starting at each of ``at``, as one structured array."""
    if at.size == 0 or data.size < width:
        return np.zeros(at.size, dtype)
    raw = sliding_window_view(data, width)[at]  # one contiguous copy, width bytes per row
    return raw.view(dtype).reshape(at.size)


def _verify_tags(
    data: U8, rows: I64, *, offsets: I64, length: I64, collector: U32, keys: Mapping[int, bytes]
) -> Mask:
    """Whether each message ``rows`` ends with a tag that verifies (one hashlib call each)."""
    view = data.data  # the buffer itself: hashlib reads slices of it without a copy
    good = np.zeros(rows.size, np.bool_)
    starts = offsets[rows].tolist()
    ends = (offsets[rows] + length[rows] - AUTH_LEN).tolist()
    for i, (start, end, cid) in enumerate(zip(starts, ends, collector[rows].tolist(), strict=True)):
        tag = hashlib.blake2b(view[start:end], digest_size=AUTH_LEN, key=keys[cid]).digest()
        good[i] = hmac.compare_digest(tag, view[end : end + AUTH_LEN])
    return good


def _check_input(data: U8, offsets: I64, sizes: I64) -> None:
    if data.ndim != 1 or data.dtype != np.uint8 or not data.flags.c_contiguous:
        raise ValueError("data must be a contiguous one-dimensional uint8 array")
    if offsets.shape != sizes.shape or offsets.ndim != 1:
        raise ValueError(f"{offsets.size} offsets but {sizes.size} sizes")
    if offsets.size and (
        offsets.min() < 0 or sizes.min() < 0 or (offsets + sizes).max() > data.size
    ):
        raise ValueError(f"a datagram lies outside the {data.size}-byte buffer")


def ingest(
    data: U8,
    offsets: npt.ArrayLike,
    sizes: npt.ArrayLike,
    *,
    keys: Mapping[int, bytes] | None = None,
    require_known: bool = False,
    registered: npt.ArrayLike = (),
) -> Ingested:
    """Validate the datagrams ``data[offsets[i]:offsets[i] + sizes[i]]``; decode the valid ones.

    ``keys`` and ``require_known`` mean what they mean for ``decode_message``: a message is
    accepted here exactly when ``decode_message`` accepts it, with the same reason when not.
    ``registered`` names collectors known without a key (registered through the control
    plane): with ``require_known`` they are accepted too (unauthenticated).
    Raises ``ValueError`` only for a caller's bug (a datagram outside the buffer).
    """
    offsets = np.asarray(offsets, np.int64)
    sizes = np.asarray(sizes, np.int64)
    _check_input(data, offsets, sizes)
    n = offsets.size
    v = _Verdicts(n)
    readable = sizes >= HEADER_LEN
    hdr = _rows(data, np.where(readable, offsets, 0), HEADER_LEN, HEADER_DTYPE)
    flags = hdr["flags"].astype(np.int64)
    length = hdr["length"].astype(np.int64)
    count = hdr["count"].astype(np.int64)
    collector = hdr["collector_id"].astype(np.uint32)
    v.fail(~readable, "bad_length")
    v.fail(hdr["magic"] != MAGIC, "bad_magic")
    v.fail(hdr["version"] != VERSION, "bad_version")
    named = readable & (hdr["magic"] == MAGIC) & (hdr["version"] == VERSION)
    v.fail(flags & ~KNOWN_FLAGS != 0, "bad_flags")
    v.fail(collector == 0, "bad_collector")
    key_ids = np.fromiter(keys or (), np.int64, count=len(keys or ()))
    has_key = np.isin(collector, key_ids)
    known = named & (has_key | np.isin(collector, np.asarray(registered, np.int64)))
    if require_known:
        v.fail(~known, "unknown_collector")
    auth = flags & FLAG_AUTH != 0
    v.fail(has_key & ~auth, "bad_auth")
    tag_len = np.where(auth, AUTH_LEN, 0)
    v.fail(length < HEADER_LEN + RECORD_LEN * count + tag_len, "bad_length")
    v.fail(length != sizes, "bad_length")
    verify = np.flatnonzero(v.pending & has_key)
    if verify.size:
        assert keys is not None
        good = _verify_tags(
            data, verify, offsets=offsets, length=length, collector=collector, keys=keys
        )
        bad_tag = np.zeros(n, np.bool_)
        bad_tag[verify[~good]] = True
        v.fail(bad_tag, "bad_auth")
    frames, message = _records(
        data, offsets, v, length=length, count=count, tag_len=tag_len, collector=collector
    )
    zero = np.zeros(n, np.uint32)
    valid = v.reason == OK
    return Ingested(
        frames=frames,
        message=message,
        collector_id=np.where(named, collector, zero),
        boot_id=np.where(named, hdr["boot_id"], zero).astype(np.uint32),
        seq=np.where(named, hdr["seq"], zero).astype(np.uint32),
        count=np.where(named, count, 0),
        size=sizes,
        reason=v.reason,
        authenticated=valid & has_key,
        known=known,
    )


def _records(
    data: U8,
    offsets: I64,
    v: _Verdicts,
    *,
    length: I64,
    count: I64,
    tag_len: I64,
    collector: U32,
) -> tuple[FrameBatch, I64]:
    """Check the record tables of the messages still pending; the frames of the valid ones."""
    msgs = np.flatnonzero(v.pending)
    cnt = count[msgs]
    first = np.zeros(msgs.size + 1, np.int64)
    np.cumsum(cnt, out=first[1:])
    total = int(first[-1])
    mi = np.repeat(msgs, cnt)  # message of each record
    local = np.arange(total, dtype=np.int64) - np.repeat(first[:-1], cnt)
    table = _rows(data, offsets[mi] + HEADER_LEN + RECORD_LEN * local, RECORD_LEN, RECORD_DTYPE)
    cap = table["cap_len"].astype(np.int64)
    orig = table["orig_len"].astype(np.int64)
    csum = np.zeros(total + 1, np.int64)
    np.cumsum(cap, out=csum[1:])
    area_start = offsets + HEADER_LEN + RECORD_LEN * count
    filled = csum[first[1:]] - csum[first[:-1]]
    short = np.zeros(v.reason.size, np.bool_)
    short[msgs] = filled != length[msgs] - (area_start[msgs] - offsets[msgs]) - tag_len[msgs]
    v.fail(short, "bad_length")

    live = v.pending[mi]  # records whose frames lie exactly inside their message
    frame_at = area_start[mi] + csum[:-1] - np.repeat(csum[first[:-1]], cnt)
    bad = (cap > orig) | (cap < MIN_FRAME)
    probe = np.flatnonzero(live & ~bad)
    at = frame_at[probe] + 12
    ethertype = (data[at].astype(np.int64) << 8) | data[at + 1]
    bad[probe[ethertype != VNTAG_ETHERTYPE]] = True
    bad_msg = np.bincount(mi[live & bad], minlength=v.reason.size) > 0
    v.fail(bad_msg, "bad_record")

    keep = np.flatnonzero(v.pending[mi])
    message = mi[keep]
    batch = FrameBatch(
        data=data,
        offset=frame_at[keep],
        caplen=cap[keep].astype(np.int32),
        origlen=orig[keep].astype(np.int32),
        ts_ns=table["ts_ns"][keep].astype(np.uint64).view(np.int64),
        linktype=np.full(keep.size, LinkType.ETHERNET, np.uint16),
        host=collector[message],
    )
    return batch, message
