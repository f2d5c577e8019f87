"""A batch of frames: one byte buffer and equal-length numpy columns that locate them.

This is the unit every reader produces (capture files, tunnel receivers, live capture) and
the columnar decoder consumes. Nothing here is per-frame Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

__all__ = ["FrameBatch", "LinkType"]


class LinkType(IntEnum):
    """The pcap/pcapng link types vspan decodes (others are counted as unsupported)."""

    NULL = 0
    ETHERNET = 1
    RAW = 101
    LINUX_SLL = 113
    LINUX_SLL2 = 276


def _no_iface() -> npt.NDArray[np.int32]:
    return np.zeros(0, dtype=np.int32)


def _no_host() -> npt.NDArray[np.uint32]:
    return np.zeros(0, dtype=np.uint32)


@dataclass(frozen=True, slots=True, eq=False)
class FrameBatch:
    """Frames back to back in ``data``; frame ``i`` is ``data[offset[i]:offset[i] + caplen[i]]``.

    All columns have one row per frame. ``host`` is the ``collector_id`` that observed the
    frame (from the tunnel header), or 0 when unknown (a capture file without that context).
    ``iface`` is the pcapng interface index (0 for classic pcap), resolved through
    ``iface_names`` when the file named its interfaces.
    """

    data: npt.NDArray[np.uint8]
    """The bytes of every frame, back to back (other bytes may sit between frames)."""
    offset: npt.NDArray[np.int64]
    """Start of each frame in ``data``."""
    caplen: npt.NDArray[np.int32]
    """Bytes of each frame present in ``data``."""
    origlen: npt.NDArray[np.int32]
    """Length of each frame on the wire (``>= caplen``)."""
    ts_ns: npt.NDArray[np.int64]
    """Capture time, nanoseconds since the Unix epoch (UTC)."""
    linktype: npt.NDArray[np.uint16]
    """Link type of each frame (see ``LinkType``)."""
    iface: npt.NDArray[np.int32] = field(default_factory=_no_iface)
    """pcapng interface index of each frame; empty means all 0."""
    host: npt.NDArray[np.uint32] = field(default_factory=_no_host)
    """collector_id that observed each frame; empty means all 0 (unknown)."""
    iface_names: tuple[str, ...] = ()
    """Names of the pcapng interfaces, by index ("" where a file gave none)."""

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def iface_column(self) -> npt.NDArray[np.int32]:
        """``iface`` with the empty default expanded to zeros."""
        return self.iface if self.iface.size == len(self) else np.zeros(len(self), np.int32)

    def host_column(self) -> npt.NDArray[np.uint32]:
        """``host`` with the empty default expanded to zeros."""
        return self.host if self.host.size == len(self) else np.zeros(len(self), np.uint32)

    def frame(self, i: int) -> bytes:
        """The captured bytes of frame ``i`` (for tests and tools, not the hot path)."""
        start = int(self.offset[i])
        return self.data[start : start + int(self.caplen[i])].tobytes()

    @classmethod
    def from_frames(
        cls,
        frames: list[bytes],
        *,
        ts_ns: npt.ArrayLike | None = None,
        origlen: npt.ArrayLike | None = None,
        linktype: int = LinkType.ETHERNET,
        host: npt.ArrayLike | None = None,
    ) -> FrameBatch:
        """Build a batch from a list of frames (tests, generators, small tools)."""
        n = len(frames)
        caplen = np.fromiter((len(f) for f in frames), dtype=np.int32, count=n)
        offset = np.zeros(n, dtype=np.int64)
        if n:
            offset[1:] = np.cumsum(caplen[:-1], dtype=np.int64)
        data = np.frombuffer(b"".join(frames), dtype=np.uint8).copy()
        return cls(
            data=data,
            offset=offset,
            caplen=caplen,
            origlen=caplen.copy() if origlen is None else np.asarray(origlen, dtype=np.int32),
            ts_ns=np.zeros(n, np.int64) if ts_ns is None else np.asarray(ts_ns, dtype=np.int64),
            linktype=np.full(n, linktype, dtype=np.uint16),
            host=np.zeros(0, np.uint32) if host is None else np.asarray(host, dtype=np.uint32),
        )
