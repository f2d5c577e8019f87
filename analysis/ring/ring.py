"""The packet ring: recent frames on disk, as rotating pcapng segments, for export.

Frames are kept as received (VN-tagged) in ``DATA_DIR/ring/ring-NNNNNNNN.pcapng``, one
pcapng interface per (host, vif) named ``host/vm`` (or ``host/vif N``) whose description
carries the collector_id, vif and VM UUID. A batch is written with one vectorized
``PcapngWriter.write_batch`` per segment it lands in (a per-frame comment only when
verdicts are given), cut where a segment reaches ``segment_bytes``. Closed segments are
deleted oldest first while the ring is over ``max_bytes`` or older than ``max_age_s``; age
is measured against the newest frame seen (capture time, so replays are deterministic), or,
with ``clock_from_frames=False``, against the time ``trim`` is given.
Each segment has an index (``ring.index``), mirrored into the store when one is given.

A full or failing disk never escapes ``append``: the ``OSError`` is counted
(``ring_errors{enospc}``, ``{edquot}``, ``{eio}``, ``{oserror}``), the segment is cut back
to its last whole frame and closed, frames are dropped and counted until ``retry_s`` of
capture time have passed, then a new segment is tried. The rest of the analyzer goes on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd

from vspan.analysis._factorize import factorize
from vspan.analysis.decode.columns import Decoded
from vspan.analysis.ring.index import (
    Interface,
    SegmentInfo,
    SegmentQuery,
    frame_vifs,
    host_name,
    read_sidecar,
    reindex,
    segment_files,
    sidecar_path,
    write_sidecar,
)
from vspan.batch import FrameBatch
from vspan.inventory import InventoryView
from vspan.pcap.write import PcapngWriter

__all__ = ["IndexMirror", "PacketRing"]

log = logging.getLogger("vspan.ring")
_ERRNO: Final = {errno.ENOSPC: "enospc", errno.EDQUOT: "edquot", errno.EIO: "eio"}
_EPB_OVERHEAD: Final = 32
"""Enhanced Packet Block bytes around the (4-byte padded) frame."""


class IndexMirror(Protocol):
    """Where the ring's index is mirrored: ``store.Store``, or the analyzer's writer."""

    def replace_ring_segment(self, segment: Mapping[str, object], keys: pd.DataFrame) -> None:
        """Record a segment and its keys."""

    def forget_ring_segments(self, names: Sequence[str]) -> None:
        """Forget the segments whose files were deleted."""


@dataclass
class _Open:
    """The segment being written."""

    path: Path
    file: BinaryIO
    writer: PcapngWriter
    info: SegmentInfo
    good: int
    """File size after the last complete write."""
    ifaces: dict[Interface, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Frames:
    """One appended batch with its per-frame columns."""

    batch: FrameBatch
    decoded: Decoded
    host: npt.NDArray[np.uint32]
    vif: npt.NDArray[np.uint32]
    names: npt.NDArray[Any]
    uuids: npt.NDArray[Any]
    comments: list[str | None] | None


class PacketRing:
    """Rotating pcapng segments in ``directory``: ``start()``, ``append``, ``segments_for``,
    ``stop()``. Thread-safe: appends and lookups may come from different threads."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 << 20,
        max_bytes: int = 4 << 30,
        max_age_s: float = 3600.0,
        store: IndexMirror | None = None,
        inventory: InventoryView | None = None,
        retry_s: float = 10.0,
        clock_from_frames: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.clock_from_frames = clock_from_frames
        """Whether the newest frame appended moves the ring's clock (age bound, retry pause)
        on; else only ``trim(now_ns)`` does (the analyzer: one frame stamped in the future
        must not age out what the ring holds)."""
        self.segment_bytes, self.max_bytes = segment_bytes, max_bytes
        self.max_age_ns, self.retry_ns = int(max_age_s * 1e9), int(retry_s * 1e9)
        self.store, self.inventory = store, inventory
        self._segments: list[SegmentInfo] = []
        self._current: _Open | None = None
        self._seq = 0
        self._now = -(2**63)
        self._resume_ns: int | None = None
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Load the index of the segments already there; re-index those left open."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._segments = []
            for path in segment_files(self.directory):
                info = read_sidecar(path)
                if info is None or not info.closed:
                    info = self._recover(path, info)
                if info is not None:
                    self._segments.append(info)
                    self._now = max(self._now, info.last_ns)
                self._seq = max(self._seq, int(path.stem.removeprefix("ring-")) + 1)

    def stop(self) -> None:
        """Close the open segment (its index is written)."""
        with self._lock:
            self._close()

    def _recover(self, path: Path, info: SegmentInfo | None) -> SegmentInfo | None:
        """Index a segment that was not closed: read it, cut a torn last frame, close it."""
        new, good_bytes = reindex(path, info)
        try:
            if good_bytes is not None:
                os.truncate(path, good_bytes)
            if not new.frames:
                self._remove(new)
                return None
            new.bytes = path.stat().st_size
            write_sidecar(self.directory, new)
        except OSError as exc:
            self._count(f"ring_errors{{{_ERRNO.get(exc.errno or 0, 'oserror')}}}")
        self._mirror(new)
        return new

    # --- writing ----------------------------------------------------------------------

    def append(
        self,
        batch: FrameBatch,
        decoded: Decoded,
        *,
        vm_names: Sequence[str | None] | npt.NDArray[Any] | None = None,
        vm_uuids: Sequence[str | None] | npt.NDArray[Any] | None = None,
        verdicts: Sequence[str | None] | None = None,
    ) -> int:
        """Keep the frames of ``batch`` (``decoded`` is its decode, row for row); returns
        how many were written. ``vm_names``/``vm_uuids`` name the VM at each frame's port
        (default: the inventory's VM for (host, vif)); ``verdicts`` become frame comments."""
        n = len(batch)
        if len(decoded) != n:
            raise ValueError(f"{len(decoded)} decoded rows for a batch of {n} frames")
        if n == 0:
            return 0
        with self._lock:
            if self.clock_from_frames:
                self._now = max(self._now, int(batch.ts_ns.max()))
            if self._resume_ns is not None and self._now < self._resume_ns:
                self._count("frames_dropped{ring_paused}", n)
                return 0
            self._resume_ns = None
            host, vif = batch.host_column(), frame_vifs(decoded)
            names, uuids = self._vms(host, vif, vm_names, vm_uuids)
            comments = None if verdicts is None else list(verdicts)
            frames = _Frames(batch, decoded, host, vif, names, uuids, comments)
            sizes = _EPB_OVERHEAD + (batch.caplen.astype(np.int64) + 3) // 4 * 4
            if comments is not None:
                sizes += np.array([0 if c is None else len(c.encode()) + 11 for c in comments])
            cum, start = np.cumsum(sizes), 0
            try:
                while start < n:
                    cur = self._current or self._open()
                    base = int(cum[start - 1]) if start else 0
                    end = int(np.searchsorted(cum, base + self.segment_bytes - cur.good, "right"))
                    if end == start and cur.info.frames:
                        self._close()  # not one more frame fits
                        continue
                    rows = np.arange(start, max(end, start + 1))
                    self._write(cur, frames, rows)
                    start = int(rows[-1]) + 1
                    if start < n or cur.good >= self.segment_bytes:
                        self._close()
            except OSError as exc:
                self._fail(exc, n - start)
            self._enforce_bounds()
            return start

    def _vms(
        self, host: npt.NDArray[np.uint32], vif: npt.NDArray[np.uint32], names: Any, uuids: Any
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        if names is not None or self.inventory is None:
            none = np.full(len(host), None, object)
            return (
                none if names is None else np.asarray(names, object),
                none if uuids is None else np.asarray(uuids, object),
            )
        inv = self.inventory
        vm = np.full(len(host), -1, np.int64)
        nic = inv.resolve_vifs(host, vif)
        vm[nic >= 0] = inv.nic_vm()[nic[nic >= 0]]
        name_table = np.array([v.name for v in inv.vms] + [None], object)
        uuid_table = np.array([v.uuid for v in inv.vms] + [None], object)
        return name_table[vm], uuid_table[vm]

    def _open(self) -> _Open:
        path = self.directory / f"ring-{self._seq:08d}.pcapng"
        self._seq += 1
        file = open(path, "wb")  # noqa: SIM115 (closed by _close or _fail)
        try:
            writer = PcapngWriter(file, application="vspan ring")
            file.flush()
        except OSError:
            with contextlib.suppress(OSError):
                file.close()
            path.unlink(missing_ok=True)
            raise
        info = SegmentInfo(path.name)
        self._segments.append(info)
        self._current = _Open(path, file, writer, info, good=file.tell())
        self._count("segments_created")
        return self._current

    def _write(self, cur: _Open, frames: _Frames, rows: npt.NDArray[np.int64]) -> None:
        batch, host, names, uuids = frames.batch, frames.host, frames.names, frames.uuids
        key = host[rows].astype(np.uint64) << np.uint64(32) | frames.vif[rows]
        inverse, uniq, first = factorize(np.ascontiguousarray(key, np.uint64))
        local = np.empty(uniq.size, np.int32)
        added = False
        for j, (k, f) in enumerate(zip(uniq.tolist(), first.tolist(), strict=True)):
            r = int(rows[f])
            iface = Interface(k >> 32, host_name(k >> 32, self.inventory), k & 0xFFFFFFFF)
            iface = Interface(iface.host, iface.host_name, iface.vif, names[r], uuids[r])
            if iface not in cur.ifaces:
                cur.ifaces[iface] = cur.writer.add_interface(
                    name=iface.name, description=iface.description
                )
                cur.info.interfaces.append(iface)
                added = True
            local[j] = cur.ifaces[iface]
        iface_col = np.zeros(len(batch), np.int32)
        iface_col[rows] = local[inverse.ravel()]
        comments = frames.comments
        piece = None if comments is None else [comments[i] for i in rows.tolist()]
        cur.writer.write_batch(batch, iface=iface_col, index=rows, comments=piece)
        cur.file.flush()
        cur.good = cur.file.tell()
        part = frames.decoded if len(rows) == len(batch) else frames.decoded.take(rows)
        vms = {i.vm_uuid for i in cur.ifaces if i.vm_uuid}
        cur.info.add(part, host[rows], vms)
        cur.info.frames += len(rows)
        cur.info.bytes = cur.good
        self._count("frames_written", len(rows))
        if added:  # a recovery after a crash needs to know the interfaces
            write_sidecar(self.directory, cur.info, keys=False)

    def _close(self) -> None:
        cur, self._current = self._current, None
        if cur is None:
            return
        cur.file.close()
        cur.info.closed = True
        write_sidecar(self.directory, cur.info)
        self._mirror(cur.info)

    def _fail(self, exc: OSError, dropped: int) -> None:
        reason = _ERRNO.get(exc.errno or 0, "oserror")
        self._count(f"ring_errors{{{reason}}}")
        self._count("frames_dropped{ring_error}", dropped)
        log.warning("ring: writing failed (%s), paused; %d frames dropped", exc, dropped)
        self._resume_ns = self._now + self.retry_ns
        cur, self._current = self._current, None
        if cur is None:
            return
        with contextlib.suppress(OSError):  # a tail that cannot be flushed is cut off below
            cur.file.close()
        try:
            os.truncate(cur.path, cur.good)
            cur.info.closed, cur.info.bytes = True, cur.good
            if cur.info.frames:
                write_sidecar(self.directory, cur.info)
        except OSError:
            cur.info.closed = False  # indexed again at the next start
        if not cur.info.frames:
            self._segments.remove(cur.info)
            self._remove(cur.info)
        elif cur.info.closed:
            self._mirror(cur.info)

    # --- bounds -----------------------------------------------------------------------

    def trim(self, now_ns: int) -> int:
        """Delete the segments over the age and size bounds at ``now_ns``; how many."""
        with self._lock:
            self._now = max(self._now, now_ns)
            return self._enforce_bounds()

    def _enforce_bounds(self) -> int:
        total = sum(s.bytes for s in self._segments)
        gone: list[SegmentInfo] = []
        for info in self._segments:
            if self._current is not None and info is self._current.info:
                break
            old = info.last_ns < self._now - self.max_age_ns
            if not old and total <= self.max_bytes:
                break
            self._count(f"segments_deleted{{{'age' if old else 'size'}}}")
            total -= info.bytes
            gone.append(info)
        for info in gone:
            self._segments.remove(info)
            self._remove(info)
        if gone and self.store is not None:
            self._guard(self.store.forget_ring_segments, [i.name for i in gone])
        return len(gone)

    def _remove(self, info: SegmentInfo) -> None:
        path = self.directory / info.name
        for victim in (path, sidecar_path(path)):
            try:
                victim.unlink(missing_ok=True)
            except OSError as exc:
                self._count(f"ring_errors{{{_ERRNO.get(exc.errno or 0, 'oserror')}}}")

    def _mirror(self, info: SegmentInfo) -> None:
        if self.store is not None and info.closed:
            self._guard(self.store.replace_ring_segment, *info.store_rows())

    def _guard(self, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:  # the ring's index in the store is a mirror: count, go on
            self._count("store_errors")
            log.warning("ring: store update failed: %s", exc)

    # --- reading ----------------------------------------------------------------------

    @property
    def segments(self) -> list[SegmentInfo]:
        """The index, oldest segment first (a copy of the list)."""
        with self._lock:
            return list(self._segments)

    def segments_for(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        hosts: Iterable[int] | None = None,
        vifs: Iterable[tuple[int, int]] | None = None,
        vms: Iterable[str] | None = None,
        macs: Iterable[int] | None = None,
        ips: Iterable[int] | None = None,
    ) -> list[Path]:
        """Segments that may hold frames in ``[since, until)`` (ns) of one of ``hosts``
        (collector_ids) and one of ``ips`` (``ring.index.ip_key``) and, when any of
        ``vifs`` ((host, vif) pairs), ``vms`` (UUIDs) or ``macs`` is given, of that VM."""
        query = SegmentQuery(
            since_ns=since,
            until_ns=until,
            hosts=_set(hosts),
            vm_uuids=_set(vms),
            vm_vifs=_set(vifs),
            vm_macs=_set(macs),
            ips=_set(ips),
        )
        return [self.directory / s.name for s in self.segments if s.matches(query)]

    def metrics(self) -> dict[str, int]:
        """Counters: ``frames_written``, ``segments_created``, ``segments_deleted{age|size}``,
        ``ring_errors{…}``, ``frames_dropped{ring_error|ring_paused}``, ``store_errors``;
        gauges ``segments`` and ``bytes``."""
        with self._lock:
            out = dict(self._counters)
            out["segments"] = len(self._segments)
            out["bytes"] = sum(s.bytes for s in self._segments)
        return out

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n


_T = TypeVar("_T")


def _set(values: Iterable[_T] | None) -> frozenset[_T] | None:
    return None if values is None else frozenset(values)
