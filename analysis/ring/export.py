"""Export frames of the packet ring to a pcapng (or classic pcap) file for Wireshark.

``export`` asks the ring's index (``ring.index``) which segments can hold what is wanted,
reads only those, a chunk at a time (``CaptureReader``), decodes each chunk with
``decode_batch`` and selects frames with numpy masks:

* ``vm``: a frame whose tag names one of the VM's (host, vif) ports, or whose source or
  destination MAC is one of the VM's MACs (so both copies of a cross-host packet match:
  the peer host's copies name the VM by MAC only). Ports come from the inventory and from
  the segments' interface tables, which remember where a VM was before it migrated; MACs
  from the inventory and from the frames at the VM's ports (the MAC a sender copy comes
  from, the MAC a receiver copy goes to), learned in a first pass over the segments that
  hold those ports: without an inventory, the peer's copies are found all the same.
* ``host``: captured by that host's collector (name or collector_id).
* ``ip``, ``port``: either side. ``flow``: its addresses, protocol and ports either way,
  within its first/last time (looked up in the store's ``flows`` by ``flow_uid`` or
  ``flow_id``; pass ``store`` when the analyzer holds the store open).
* ``since``/``until``: capture time in ``[since, until)``.

Frames are written in capture-time order (ties in ring order). The ring keeps frames in the
order they arrived — each collector's a little behind or ahead of the others — so each
segment's selected frames are sorted, and segments are merged: taken in order of their
first frame (from the index), a segment is opened only when the frames still to write could
come after its first one; what lies before it is final. Memory: the selected frames of the
segments that overlap in time.

pcapng output has one interface per (host, vif) named ``host/vm`` and a comment per frame
naming the VMs at both ends and, when the ring recorded one, the policy verdict.
``strip_tag`` removes the VN-Tag (6 bytes; an E-TAG: 8) so that frames look as they did on
the vswitch. Classic pcap keeps the tags unless stripped; it has no interfaces or comments.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from vspan.analysis.decode import decode_batch
from vspan.analysis.decode.columns import Decoded, TagKind
from vspan.analysis.ring.comments import epb_comments
from vspan.analysis.ring.index import Interface, SegmentInfo, load_index
from vspan.analysis.ring.select import (
    ExportError,
    VmNames,
    Want,
    add_flow,
    comments,
    fallback_interface,
    resolve,
    select,
    vm_macs,
)
from vspan.analysis.store.sql import StoreError
from vspan.analysis.store.store import Store
from vspan.batch import FrameBatch
from vspan.errors import CaptureFileError
from vspan.inventory import InventoryView
from vspan.pcap.read import CaptureReader
from vspan.pcap.write import PcapngWriter, PcapWriter
from vspan.wire.tunnel_batch import concat_batches

__all__ = ["ExportError", "ExportResult", "export", "strip_tags"]

_TAG_BYTES: Final = {TagKind.VNTAG: 6, TagKind.ETAG: 8}
"""Bytes a tag adds after the MACs (or after the VLAN tags before it): EtherType + tag."""


@dataclass
class ExportResult:
    """What an export did."""

    path: Path
    frames_written: int = 0
    frames_read: int = 0
    """Frames in the segments scanned (before filtering)."""
    segments_scanned: int = 0
    segments_skipped: int = 0
    """Segments the index ruled out without opening them."""
    segments_learned: int = 0
    """Segments read first to learn a VM's MACs at its ports (``vm`` without inventory)."""
    errors: list[str] = field(default_factory=list)
    """Segments read only in part (a torn last frame, a read error)."""


def strip_tags(batch: FrameBatch, dec: Decoded, rows: npt.NDArray[np.int64]) -> FrameBatch:
    """The batch with the VN-Tag/E-TAG of ``rows`` removed: the MACs (and any VLAN tags
    before the tag) move forward over it, so the frame starts later and is shorter. Works
    on a copy of the buffer (batches read from files are read-only); other rows unchanged."""
    offset, caplen = batch.offset.copy(), batch.caplen.copy()
    origlen, data = batch.origlen.copy(), batch.data
    for kind, size in _TAG_BYTES.items():
        for before in np.unique(dec.vlan_before_tag[rows]).tolist():
            sel = rows[(dec.tag_kind[rows] == kind) & (dec.vlan_before_tag[rows] == before)]
            head = 12 + 4 * before
            sel = sel[caplen[sel] >= head + size]
            if not sel.size:
                continue
            if data is batch.data:
                data = batch.data.copy()
            src = offset[sel, None] + np.arange(head)
            data[src + size] = data[src]
            offset[sel] += size
            caplen[sel] -= size
            origlen[sel] -= size
    return FrameBatch(
        data=data, offset=offset, caplen=caplen, origlen=origlen, ts_ns=batch.ts_ns,
        linktype=batch.linktype, iface=batch.iface, host=batch.host, iface_names=batch.iface_names,
    )  # fmt: skip


def export(
    data_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    vm: str | None = None,
    host: str | int | None = None,
    flow: int | str | uuid.UUID | None = None,
    ip: str | None = None,
    port: int | None = None,
    since: object = None,
    until: object = None,
    strip_tag: bool = False,
    fmt: Literal["pcapng", "pcap"] = "pcapng",
    inventory: InventoryView | None = None,
    store: Store | None = None,
    chunk_bytes: int = 16 << 20,
) -> ExportResult:
    """Write the ring's frames that match every filter given to ``out``; see the module."""
    if fmt not in ("pcapng", "pcap"):
        raise ExportError(f"unknown capture format {fmt!r}, expected 'pcapng' or 'pcap'")
    ring = Path(data_dir) / "ring"
    segments = load_index(ring) if ring.is_dir() else []
    want = resolve(
        segments, inventory, vm=vm, host=host, ip=ip, port=port, since=since, until=until
    )
    if flow is not None:
        add_flow(want, _flow_record(data_dir, flow, store))
    reader = _Reader(ring, inventory, chunk_bytes)
    if want.vm_keys is not None:
        at_ports = want.ports_query()
        learned = [info for info in segments if info.matches(at_ports)]
        for info in learned:
            for chunk, ifaces, iface in reader.chunks(info):
                want.vm_macs |= vm_macs(want, decode_batch(chunk), ifaces, iface)
    query = want.query()
    chosen = [s for s in segments if s.matches(query)]
    result = ExportResult(Path(out), segments_skipped=len(segments) - len(chosen))
    if want.vm_keys is not None:
        result.segments_learned = len(learned)
    names = VmNames(segments, inventory)
    with open(out, "wb") as fh:
        writer: PcapngWriter | PcapWriter = (
            PcapngWriter(fh, application="vspan export") if fmt == "pcapng" else PcapWriter(fh)
        )
        outputs: dict[Interface, int] = {}
        for part in _in_time_order(chosen, lambda info: reader.selected(info, want, result)):
            interfaces = list(reader.interfaces)
            result.frames_written += part.write(writer, outputs, interfaces, names, strip_tag)
    result.errors = reader.errors
    return result


def _flow_record(
    data_dir: str | os.PathLike[str], flow: int | str | uuid.UUID, store: Store | None
) -> dict[str, Any]:
    key = flow if isinstance(flow, int) else str(flow)
    try:
        if store is not None:
            return store.flow(key)
        with Store(data_dir, read_only=True) as opened:
            return opened.flow(key)
    except StoreError as exc:
        raise ExportError(f"cannot export flow {flow!r}: {exc}") from exc


class _Reader:
    """Reads ring segments a chunk at a time, with each frame's ring interface."""

    def __init__(self, ring: Path, inventory: InventoryView | None, chunk_bytes: int) -> None:
        self.ring, self.inventory, self.chunk_bytes = ring, inventory, chunk_bytes
        self.errors: list[str] = []
        """Segments read only in part (a torn last frame, a read error)."""
        self.interfaces: dict[Interface, int] = {}
        """Every interface met, numbered (``_Frames.iface``)."""

    def chunks(
        self, info: SegmentInfo
    ) -> Iterator[tuple[FrameBatch, list[Interface], npt.NDArray[np.intp]]]:
        """Each chunk of the segment, its interfaces, and each frame's interface among them."""
        reader = CaptureReader(self.ring / info.name, chunk_bytes=self.chunk_bytes)
        try:
            for batch in reader:
                ifaces = info.interfaces + [
                    fallback_interface(n, self.inventory)
                    for n in reader.iface_names[len(info.interfaces) :]
                ]
                ifaces = ifaces or [Interface(0, "unknown", 0)]
                yield batch, ifaces, np.clip(batch.iface_column(), 0, len(ifaces) - 1)
        except CaptureFileError as exc:
            self.errors.append(str(exc))
        if reader.error is not None:
            self.errors.append(str(reader.error))

    def selected(self, info: SegmentInfo, want: Want, result: ExportResult) -> _Frames:
        """The segment's frames that ``want`` selects, in capture-time order."""
        result.segments_scanned += 1
        parts = []
        for batch, ifaces, iface in self.chunks(info):
            result.frames_read += len(batch)
            dec = decode_batch(batch)
            rows = np.flatnonzero(select(want, dec, ifaces, iface))
            if rows.size:
                codes = np.array([self.interfaces.setdefault(i, len(self.interfaces))
                                  for i in ifaces], np.int32)  # fmt: skip
                verdicts = np.array(epb_comments(batch), dtype=object)[rows]
                compact = concat_batches(_take(batch, rows))  # out of the segment's pages
                parts.append(_Frames(compact, dec.take(rows), codes[iface[rows]], verdicts))
        return _Frames.concat(parts).sorted()


@dataclass
class _Frames:
    """Selected frames in a buffer of their own, with what writing them needs."""

    batch: FrameBatch
    dec: Decoded
    iface: npt.NDArray[np.int32]
    """The ring interface of each frame (``_Reader.interfaces``)."""
    verdicts: npt.NDArray[Any]
    """The comment the ring wrote for each frame (a policy verdict; None for none)."""

    @classmethod
    def concat(cls, parts: list[_Frames]) -> _Frames:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            empty = FrameBatch.from_frames([])
            return cls(empty, decode_batch(empty), np.zeros(0, np.int32), np.zeros(0, object))
        return cls(
            concat_batches(*(p.batch for p in parts)),
            Decoded.concat([p.dec for p in parts]),
            np.concatenate([p.iface for p in parts]),
            np.concatenate([p.verdicts for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.batch)

    def take(self, rows: npt.NDArray[np.intp]) -> _Frames:
        return _Frames(
            _take(self.batch, rows), self.dec.take(rows), self.iface[rows], self.verdicts[rows]
        )

    def sorted(self) -> _Frames:
        """The frames in capture-time order (stable)."""
        ts = self.batch.ts_ns
        if len(self) < 2 or bool(np.all(ts[1:] >= ts[:-1])):
            return self
        return self.take(np.argsort(ts, kind="stable"))

    def write(
        self,
        writer: PcapngWriter | PcapWriter,
        outputs: dict[Interface, int],
        interfaces: list[Interface],
        names: VmNames,
        strip: bool,
    ) -> int:
        """Write the frames (in their order); return how many. ``interfaces``: the ring
        interfaces by number; ``outputs``: the file's interface of each, added when first
        used."""
        every = np.arange(len(self), dtype=np.int64)
        batch = strip_tags(self.batch, self.dec, every) if strip else self.batch
        if isinstance(writer, PcapWriter):
            writer.write_batch(batch)
            return len(self)
        used, inverse = np.unique(self.iface, return_inverse=True)
        target = np.empty(used.size, np.int32)
        for k, code in enumerate(used.tolist()):
            i = interfaces[code]
            if i not in outputs:
                outputs[i] = writer.add_interface(name=i.name, description=i.description)
            target[k] = outputs[i]
        host = np.array([i.host for i in interfaces], np.uint64)[self.iface]
        dec = self.dec
        src = names.of(host, dec.svif, dec.src_mac)
        dst = names.of(host, dec.dvif, dec.dst_mac)
        notes = comments(names, src, dst, self.verdicts.tolist())
        writer.write_batch(batch, iface=target[inverse.ravel()], comments=notes)
        return len(self)


def _take(batch: FrameBatch, rows: npt.NDArray[np.intp]) -> FrameBatch:
    """``rows`` of ``batch`` (bytes shared)."""
    return FrameBatch(
        data=batch.data, offset=batch.offset[rows], caplen=batch.caplen[rows],
        origlen=batch.origlen[rows], ts_ns=batch.ts_ns[rows], linktype=batch.linktype[rows],
    )  # fmt: skip


def _in_time_order(
    segments: list[SegmentInfo], read: Callable[[SegmentInfo], _Frames]
) -> Iterator[_Frames]:
    """The frames ``read`` selects in every segment, as parts in capture-time order (ties:
    segments in ring order); see the module docstring."""

    def first(info: SegmentInfo) -> int:  # no frame of the segment is older
        return info.first_ns if info.frames else _UNKNOWN_FIRST

    todo = sorted(segments, key=lambda info: (first(info), info.name))
    open_: list[_Frames] = []
    while todo or open_:
        bound = first(todo[0]) if todo else None
        heads = [int(p.batch.ts_ns[0]) for p in open_]
        if bound is not None and (not heads or min(heads) >= bound):
            part = read(todo.pop(0))
            if len(part):
                open_.append(part)
            continue
        cuts = [
            len(p) if bound is None else int(np.searchsorted(p.batch.ts_ns, bound, "left"))
            for p in open_
        ]
        out = _Frames.concat([p.take(np.arange(c)) for p, c in zip(open_, cuts, strict=True) if c])
        open_ = [
            p.take(np.arange(c, len(p))) for p, c in zip(open_, cuts, strict=True) if c < len(p)
        ]
        yield out.sorted()


_UNKNOWN_FIRST: Final = -(1 << 63)
"""The first frame of a segment the index knows nothing of: it is opened first."""
