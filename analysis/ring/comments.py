"""The ``opt_comment`` of each frame of a batch read back from a pcapng file.

The packet ring writes each frame's policy verdict as its Enhanced Packet Block comment
(§4.3, option 1); an export reads it back. ``CaptureReader`` keeps the file's bytes around
each frame, so a compiled pass finds each block's comment span and hashes its bytes; the
text is decoded once per distinct comment (a ring holds a handful: "permit", "deny ...")
and every frame checked byte for byte against its group's first, so a hash collision can
never hand a frame another's comment.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.analysis._factorize import factorize
from vspan.batch import FrameBatch
from vspan.kernels import kernel
from vspan.pcap._layout import u16, u32

__all__ = ["epb_comments"]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

_EPB_HEAD: Final = 28
"""Enhanced Packet Block bytes before the packet data (type, length, interface, ts, lens)."""
_EPB: Final = 6
_COMMENT: Final = 1
_FNV_OFFSET: Final = np.uint64(0xCBF29CE484222325)
_FNV_PRIME: Final = np.uint64(0x100000001B3)


@kernel
def _spans(data: U8, offset: I64, caplen: I64) -> I64:
    """Per frame: (start, length, hash) of its block's comment, or (-1, 0, 0) (little-endian
    pcapng; a frame not in an Enhanced Packet Block has none)."""
    n = offset.size
    out = np.zeros((n, 3), np.int64)
    out[:, 0] = -1
    for i in range(n):
        start = offset[i] - _EPB_HEAD
        if start < 0 or start + 8 > data.size or u32(data, start, False) != _EPB:
            continue
        end = start + u32(data, start + 4, False) - 4  # the options end before the trailer
        p = offset[i] + (caplen[i] + 3) // 4 * 4
        if end > data.size:
            continue
        while p + 4 <= end:
            code, length = u16(data, p, False), u16(data, p + 2, False)
            if code == 0 or p + 4 + length > end:
                break
            if code == _COMMENT:
                h = _FNV_OFFSET
                for k in range(p + 4, p + 4 + length):
                    h = (h ^ np.uint64(data[k])) * _FNV_PRIME
                out[i, 0], out[i, 1], out[i, 2] = p + 4, length, np.int64(h)
                break
            p += 4 + (length + 3) // 4 * 4
    return out


@kernel
def _same(data: U8, spans: I64, rep: I64) -> npt.NDArray[np.bool_]:
    """Whether each span's bytes equal those of span ``rep[i]``."""
    out = np.ones(rep.size, np.bool_)
    for i in range(rep.size):
        a, b, n = spans[i, 0], spans[rep[i], 0], spans[i, 1]
        if n != spans[rep[i], 1]:
            out[i] = False
            continue
        for k in range(n):
            if data[a + k] != data[b + k]:
                out[i] = False
                break
    return out


def epb_comments(batch: FrameBatch) -> list[str | None]:
    """The comment of each frame of ``batch`` (None where it has none)."""
    data = np.asarray(batch.data, np.uint8)
    spans = _spans(data, batch.offset.astype(np.int64), batch.caplen.astype(np.int64))
    out = np.full(len(batch), None, dtype=object)
    rows = np.flatnonzero(spans[:, 0] >= 0)
    if rows.size == 0:
        return list(out)
    found = spans[rows]
    hashes = np.ascontiguousarray(found[:, 2]).view(np.uint64)
    codes, _, first = factorize(hashes)  # by hash; ``_same`` checks every frame's bytes
    same = _same(data, found, first[codes])

    def text(k: int) -> str:
        s, n = int(found[k, 0]), int(found[k, 1])
        return data[s : s + n].tobytes().decode("utf-8", "replace")

    table = np.empty(first.size, dtype=object)
    table[:] = [text(int(k)) for k in first]
    out[rows] = table[codes]
    for k in np.flatnonzero(~same).tolist():  # a hash collision: decode the frame's own
        out[rows[k]] = text(k)
    comments: list[str | None] = out.tolist()
    return comments
