"""``vspan report``: per-VM flows and groupings over capture files.

The pipeline per chunk of a file: read (one buffer + columns) → columnar decode → endpoint
identity → flow table; flows are turned into records once, at the end. Frames that cannot
be used are counted by reason, never dropped silently; a file that is corrupt part-way is
reported as partial with the byte offset, and what was read before it is kept.
"""

from __future__ import annotations

import functools
import importlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

import numpy as np
import numpy.typing as npt

from vspan.analysis.columns import Decoded, Layer, Status
from vspan.analysis.decode import decode_batch
from vspan.analysis.endpoints import EndpointResolver
from vspan.analysis.flowkeys import usable
from vspan.analysis.flows import Finished, FlowConfig, FlowTable
from vspan.analysis.hostnames import HostNames
from vspan.analysis.records import flow_table
from vspan.analysis.recordtable import RecordTable
from vspan.batch import FrameBatch
from vspan.inventory import InventoryView
from vspan.pcapfile import CaptureReader

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CaptureReport",
    "FileStatus",
    "analyze_captures",
    "import_in_background",
    "prefetch",
    "undecodable",
]

T = TypeVar("T")

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as files are read."""


@dataclass
class FileStatus:
    """What was read from one capture file."""

    path: str
    format: str
    frames: int
    partial: bool
    error: str | None


@dataclass
class CaptureReport:
    """Flow records and the accounting of every frame."""

    records: RecordTable
    """One row per flow (``records.RECORD_COLUMNS``), in order of their first packet."""
    frames: int
    """Frames read from all files."""
    outcomes: list[tuple[str, str, int]]
    """Frames by outcome: (category — flow / not decodable —, reason, frames), sorted."""
    files: list[FileStatus] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """Whether any file could only be read in part."""
        return any(f.partial for f in self.files)

    @functools.cached_property
    def flows(self) -> pd.DataFrame:
        """The flow records as a frame."""
        return self.records.frame()

    @property
    def summary(self) -> pd.DataFrame:
        """``outcomes`` as a frame: ``category``, ``reason``, ``frames``."""
        import pandas as pd

        return pd.DataFrame(self.outcomes, columns=["category", "reason", "frames"])


_NON_IP = {0x0806: "ARP", 0: "802.3/LLC"}
_NON_IP_BASE = 0x10000
_BAD_BASE = 0x20000


def _describe(code: int) -> tuple[str, str]:
    """(category, reason) of a summary code (see ``_summary_counts``)."""
    if code < _NON_IP_BASE:
        return "flow", f"IPv{code}"
    if code < _BAD_BASE:
        et = code - _NON_IP_BASE
        return "flow", _NON_IP.get(et, f"EtherType 0x{et:04x}")
    status, layer = divmod(code - _BAD_BASE, 16)
    reason = f"{Status(status).name.lower()} at {Layer(layer).name.replace('_', ' ')}"
    return "not decodable", reason


def undecodable(dec: Decoded, ok: npt.NDArray[np.bool_]) -> list[tuple[str, int]]:
    """(reason, frames) of the frames not usable for flows, by status and layer."""
    out = []
    for code, frames in zip(*(c.tolist() for c in _summary_counts(dec, ok)), strict=True):
        category, reason = _describe(code)
        if category == "not decodable":
            out.append((reason, frames))
    return out


def _summary_counts(
    dec: Decoded, ok: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Distinct outcome codes of the frames (see ``_describe``) and their frame counts."""
    code = np.where(
        ok,
        np.where(
            dec.ip_version != 0, dec.ip_version, _NON_IP_BASE + dec.ethertype.astype(np.int64)
        ),
        _BAD_BASE + dec.status.astype(np.int64) * 16 + dec.layer,
    )
    uniq, counts = np.unique(code, return_counts=True)
    return uniq.astype(np.int64), counts.astype(np.int64)


def _assign_hosts(batch: FrameBatch, hosts: HostNames, default_host: int) -> npt.NDArray[np.uint32]:
    """Observing host per frame: the tunnel's collector, else the pcapng interface name."""
    host = batch.host_column()
    if host.any():
        return host
    if not batch.iface_names:
        return np.full(len(batch), default_host, dtype=np.uint32)
    ids = np.array(
        [hosts.id_for(name.split("/")[0]) if name else default_host for name in batch.iface_names],
        dtype=np.uint32,
    )
    iface = batch.iface_column()
    return ids[np.clip(iface, 0, ids.size - 1)]


def _with_host(dec: Decoded, host: npt.NDArray[np.uint32]) -> Decoded:
    cols = dec.columns()
    cols["host"] = host
    return Decoded(**cols)


_DONE = object()


def prefetch(batches: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield ``batches`` while a thread produces up to ``depth`` of them ahead.

    File I/O, the compiled record walk and most numpy work release the GIL, so on a machine
    with two cores the next chunk is read and decoded while this one goes into flows.
    Errors of the producer are raised here, in the consumer, after the batches before them.
    """
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer, re-raised there
            slots.put(exc)

    thread = threading.Thread(target=work, name="vspan-read", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield cast("T", item)
    finally:
        stop.set()
        thread.join()


def analyze_captures(
    paths: Sequence[str | os.PathLike[str]],
    *,
    inventory: InventoryView | None = None,
    host: str | None = None,
    flow_config: FlowConfig | None = None,
    chunk_bytes: int = 64 << 20,
    progress: Progress | None = None,
) -> CaptureReport:
    """Read every capture, in order, into one flow table; return flows and accounting.

    ``host`` names the hypervisor the captures were taken on when the files do not say
    (a classic pcap has no interface names); it is looked up in the inventory.
    """
    hosts = HostNames.from_inventory(inventory)
    default_host = hosts.id_for(host) if host else 0
    resolver = EndpointResolver(inventory)
    table = FlowTable(flow_config)
    finished: list[Finished] = []
    outcomes: dict[int, int] = {}
    files: list[FileStatus] = []
    readers = [CaptureReader(p, chunk_bytes=chunk_bytes) for p in paths]
    total = sum(os.path.getsize(p) for p in paths)
    done_before = 0
    frames = 0
    for reader in readers:
        # Reading (walking the records, faulting the file's pages in) runs in a second
        # thread; decoding (compiled, without the GIL) and flows in this one, which
        # balances the two on two cores.
        for batch in prefetch(iter(reader)):
            dec = _with_host(decode_batch(batch), _assign_hosts(batch, hosts, default_host))
            ok = usable(dec)
            for code, count in zip(*(c.tolist() for c in _summary_counts(dec, ok)), strict=True):
                outcomes[code] = outcomes.get(code, 0) + count
            frames += len(dec)
            good = dec.take(np.flatnonzero(ok)) if not ok.all() else dec
            finished.append(table.update_rows(good, resolver.resolve(good)))
            if progress is not None:
                progress(done_before + reader.bytes_read, total)
        done_before += reader.size
        error = reader.error
        files.append(
            FileStatus(
                path=os.fspath(reader.path),
                format=reader.format,
                frames=reader.frames_read,
                partial=reader.partial,
                error=None if error is None else str(error),
            )
        )
    finished.append(table.flush_rows())
    flows = Finished.concat(finished)
    cols = flows.columns()
    order = np.lexsort((cols["hash"], cols["start_ns"]))  # by first packet, then hash
    records = flow_table({c: v[order] for c, v in cols.items()}, inventory=inventory, hosts=hosts)
    return CaptureReport(records=records, frames=frames, outcomes=_outcomes(outcomes), files=files)


def _outcomes(counts: dict[int, int]) -> list[tuple[str, str, int]]:
    """(category, reason, frames) of outcome codes' frame counts, by category and reason."""
    totals: dict[tuple[str, str], int] = {}
    for code, frames in counts.items():
        key = _describe(code)
        totals[key] = totals.get(key, 0) + frames
    return [(category, reason, n) for (category, reason), n in sorted(totals.items())]


def import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` in a thread (an ``import`` of it elsewhere waits for it):
    the compiled kernels leave the GIL to the import meanwhile."""
    thread = threading.Thread(
        target=importlib.import_module, args=(module,), name="vspan-import", daemon=True
    )
    thread.start()
    return thread
