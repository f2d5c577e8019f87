"""Byte access for the columnar decoder: fixed-width windows of many frames at once.

Reading a field of a million frames scattered over a large buffer costs one cache miss per
frame, whatever the field's width. So the decoder never reads fields from the buffer: each
layer copies one small window per frame (a single numpy gather of ``width``-byte void items)
into a compact ``(rows, width)`` array, and reads its fields as columns of that array. The
first ``HEAD`` bytes of every frame of a chunk are copied once, up front; windows that lie
in them (most: Ethernet, tags, IP and often L4) are cut from that copy, which is in cache.

A window may run past the end of its frame (into the next frame, or past the buffer, where
it reads zeros). ``Frames.window`` therefore also returns ``avail``, the number of window
bytes that belong to the frame; a field is valid only where ``avail >= offset + size``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .columns import Decoded, Layer, Status

__all__ = ["HEAD", "Buffer", "Frames", "Seen", "be16", "be32", "be64", "keep"]

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Rows = npt.NDArray[np.intp]

HEAD = 96
"""Bytes at the start of each frame copied once, up front (see ``Frames.head``): enough for
Ethernet, a VLAN / VN-Tag / VLAN stack, IPv6 and the TCP flags."""
MAX_WINDOW = HEAD
"""The widest window any layer asks for."""


class Buffer:
    """The byte buffer of a batch, with a strided view per window width."""

    def __init__(self, data: npt.NDArray[Any]) -> None:
        raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        if raw.size < MAX_WINDOW:  # so that every width has at least one window
            raw = np.concatenate([raw, np.zeros(MAX_WINDOW, np.uint8)])
        self.data: U8 = raw
        self.size = int(data.size)
        """Bytes of the batch (the padding above is not part of any frame)."""
        self._views: dict[int, tuple[npt.NDArray[Any], U8]] = {}

    def _view(self, width: int) -> tuple[npt.NDArray[Any], U8]:
        """``width``-byte items starting at every byte, and the zero-padded buffer tail."""
        if width not in self._views:
            n = self.data.size
            items = np.ndarray(
                shape=(n - width + 1,),
                dtype=np.dtype((np.void, width)),
                buffer=self.data,
                strides=(1,),
            )
            tail = np.zeros(2 * width, np.uint8)
            tail[:width] = self.data[n - width :]
            self._views[width] = (items, tail)
        return self._views[width]

    def gather(self, start: I64, width: int) -> U8:
        """``data[s:s + width]`` for each ``s >= 0`` in ``start``, as a ``(len, width)`` array."""
        items, tail = self._view(width)
        last = items.shape[0] - 1
        out: U8 = items[np.minimum(start, last)].view(np.uint8).reshape(-1, width)
        over = np.flatnonzero(start > last)  # windows that run past the buffer (rare)
        if over.size:
            windows = np.lib.stride_tricks.sliding_window_view(tail, width)
            out[over] = windows[np.minimum(start[over] - last, width)]
        return out


class Frames:
    """One chunk of a batch as the decoder sees it, and the ``Decoded`` rows it fills."""

    def __init__(self, buf: Buffer, *, offset: I64, caplen: I32, wirelen: I32, out: Decoded):
        inside = (offset >= 0) & (offset <= buf.size)
        self.buf = buf
        self.start: I64 = np.where(inside, offset, 0).astype(np.int64)
        room = np.minimum(caplen.astype(np.int64), buf.size - self.start)
        self.cap: I32 = np.where(inside, np.maximum(room, 0), 0).astype(np.int32)
        """Captured bytes of each frame that really lie in the buffer."""
        self.wire = wirelen
        self.out = out
        self.head = Buffer(buf.gather(self.start, HEAD).reshape(-1))
        """The first ``HEAD`` bytes of every frame, back to back: a compact copy that stays
        in cache, from which most windows are cut."""

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def heads(self) -> tuple[U8, I32]:
        """``window(all rows, 0, HEAD)`` without a copy."""
        return self.head.data[: len(self) * HEAD].reshape(-1, HEAD), self.cap

    def window(self, rows: Rows, pos: I32 | int, width: int) -> tuple[U8, I32]:
        """Bytes ``pos .. pos + width`` of the frames ``rows``, and how many are captured."""
        avail: I32 = (self.cap[rows] - pos).astype(np.int32)
        inside = np.asarray(pos + width <= HEAD)
        if inside.all():
            return self.head.gather(rows * HEAD + pos, width), avail
        at = self.start[rows] + pos
        if not inside.any():
            return self.buf.gather(at, width), avail
        near, far = np.flatnonzero(inside), np.flatnonzero(~inside)
        out = np.empty((rows.size, width), np.uint8)
        out[near] = self.head.gather(rows[near] * HEAD + np.asarray(pos)[near], width)
        out[far] = self.buf.gather(at[far], width)
        return out, avail

    def stop(self, rows: Rows, status: Status, layer: Layer) -> None:
        """Record that decoding of ``rows`` ended with ``status`` at ``layer``."""
        self.out.status[rows] = status
        self.out.layer[rows] = layer


def keep(values: npt.NDArray[Any], valid: npt.NDArray[np.bool_]) -> npt.NDArray[Any]:
    """``values`` where ``valid``, else 0 (same dtype)."""
    return np.where(valid, values, 0).astype(values.dtype, copy=False)


class Seen:
    """How many bytes of a header each frame has: fields beyond that read as 0."""

    def __init__(self, avail: I32, width: int) -> None:
        self.avail = avail
        self.whole = bool(avail.size == 0 or avail.min() >= width)
        """Every frame has ``width`` bytes: nothing to mask below that."""

    def keep(self, values: npt.NDArray[Any], end: int) -> npt.NDArray[Any]:
        """``values`` of a field ending at byte ``end``, 0 where it was not seen."""
        return values if self.whole else keep(values, self.avail >= end)


def be16(w: U8, k: int) -> U16:
    """Big-endian 16-bit field at byte ``k`` of every window row."""
    return (w[:, k].astype(np.uint16) << np.uint16(8)) | w[:, k + 1]


def be32(w: U8, k: int) -> U32:
    """Big-endian 32-bit field at byte ``k`` of every window row."""
    if k % 4 == 0 and w.shape[1] % 4 == 0:
        return w.view(">u4")[:, k // 4].astype(np.uint32)
    return (be16(w, k).astype(np.uint32) << np.uint32(16)) | be16(w, k + 2)


def be64(w: U8, k: int) -> U64:
    """Big-endian 64-bit field at byte ``k`` of every window row."""
    if k % 8 == 0 and w.shape[1] % 8 == 0:
        return w.view(">u8")[:, k // 8].astype(np.uint64)
    return (be32(w, k).astype(np.uint64) << np.uint64(32)) | be32(w, k + 4)
