"""Export frames of the packet ring to a pcapng (or classic pcap) file for Wireshark.

``export`` asks the ring's index (``ring_index``) which segments can hold what is wanted,
reads only those, a chunk at a time (``CaptureReader``: memory stays bounded by a chunk),
decodes each chunk with ``decode_batch`` and selects frames with numpy masks:

* ``vm``: a frame whose tag names one of the VM's (host, vif) ports, or whose source or
  destination MAC is one of the VM's MACs (so both copies of a cross-host packet match).
  Ports come from the inventory and from the segments' interface tables, which remember
  where a VM was before it migrated.
* ``host``: captured by that host's collector (name or collector_id).
* ``ip``, ``port``: either side. ``flow``: its addresses, protocol and ports either way,
  within its first/last time (looked up in the store's ``flows`` by ``flow_uid`` or
  ``flow_id``; pass ``store`` when the analyzer holds the store open).
* ``since``/``until``: capture time in ``[since, until)``.

pcapng output has one interface per (host, vif) named ``host/vm`` and a comment per frame
naming the VMs at both ends and, when the ring recorded one, the policy verdict.
``strip_tag`` removes the VN-Tag (6 bytes; an E-TAG: 8) so that frames look as they did on
the vswitch. Classic pcap keeps the tags unless stripped; it has no interfaces or comments.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch
from vspan.errors import CaptureFileError
from vspan.inventory import InventoryView
from vspan.pcapfile import CaptureReader
from vspan.pcapwrite import PcapngWriter, PcapWriter

from .columns import Decoded, TagKind
from .decode import decode_batch
from .export_select import (
    ExportError,
    VmNames,
    Want,
    add_flow,
    comments,
    fallback_interface,
    resolve,
    select,
)
from .ring_comments import epb_comments
from .ring_index import Interface, load_index
from .store import Store
from .store_sql import StoreError

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
    query = want.query()
    chosen = [s for s in segments if s.matches(query)]
    result = ExportResult(Path(out), segments_skipped=len(segments) - len(chosen))
    names = VmNames(segments, inventory)
    with open(out, "wb") as fh:
        writer: PcapngWriter | PcapWriter = (
            PcapngWriter(fh, application="vspan export") if fmt == "pcapng" else PcapWriter(fh)
        )
        outputs: dict[Interface, int] = {}
        for info in chosen:
            reader = CaptureReader(ring / info.name, chunk_bytes=chunk_bytes)
            result.segments_scanned += 1
            try:
                for batch in reader:
                    result.frames_read += len(batch)
                    ifaces = info.interfaces + [
                        fallback_interface(n, inventory)
                        for n in reader.iface_names[len(info.interfaces) :]
                    ]
                    part = _Chunk(batch, ifaces or [Interface(0, "unknown", 0)], want, strip_tag)
                    result.frames_written += part.write(writer, outputs, names)
            except CaptureFileError as exc:
                result.errors.append(str(exc))
            if reader.error is not None:
                result.errors.append(str(reader.error))
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


class _Chunk:
    """One chunk of a segment: decoded, filtered, and written."""

    def __init__(self, batch: FrameBatch, ifaces: list[Interface], want: Want, strip: bool):
        self.batch, self.ifaces, self.strip = batch, ifaces, strip
        self.iface = np.clip(batch.iface_column(), 0, len(ifaces) - 1)
        self.dec = decode_batch(batch)
        self.rows = np.flatnonzero(select(want, self.dec, ifaces, self.iface))

    def write(
        self, writer: PcapngWriter | PcapWriter, outputs: dict[Interface, int], names: VmNames
    ) -> int:
        rows, dec = self.rows, self.dec
        if not rows.size:
            return 0
        verdicts = epb_comments(self.batch) if isinstance(writer, PcapngWriter) else []
        batch = strip_tags(self.batch, dec, rows) if self.strip else self.batch
        if isinstance(writer, PcapWriter):
            writer.write_batch(batch, rows)
            return int(rows.size)
        target = np.zeros(len(self.ifaces), np.int32)
        for k in np.unique(self.iface[rows]).tolist():  # only interfaces with frames
            i = self.ifaces[k]
            if i not in outputs:
                outputs[i] = writer.add_interface(name=i.name, description=i.description)
            target[k] = outputs[i]
        target = target[self.iface]
        host = np.array([i.host for i in self.ifaces], np.uint64)[self.iface[rows]]
        src = names.of(host, dec.svif[rows], dec.src_mac[rows])
        dst = names.of(host, dec.dvif[rows], dec.dst_mac[rows])
        notes = comments(names, src, dst, [verdicts[i] for i in rows.tolist()])
        writer.write_batch(batch, iface=target, index=rows, comments=notes)
        return int(rows.size)
