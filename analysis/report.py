"""``vspan report``: per-VM flows and groupings over capture files.

The pipeline per chunk of a file: read (one buffer + columns, in a reader thread per file)
→ columnar decode → usable frames; the chunks of all files are then merged in capture-time
order (``time_merge``) → endpoint identity → flow table; flows are turned into records
once, at the end. Frames that cannot be used are counted by reason, never dropped silently;
a file that is corrupt part-way is reported as partial with the byte offset, and what was
read before it is kept.

Several captures (one per host, or one after another) are read as one capture: whatever
order they are named in, the flow table sees their frames in capture-time order, so
``vspan report A B`` and ``vspan report B A`` give the same flows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt

from vspan.analysis.decode import decode_batch
from vspan.analysis.decode.columns import Decoded, Layer, Status
from vspan.analysis.flows.endpoints import EndpointResolver
from vspan.analysis.flows.keys import usable
from vspan.analysis.flows.table import Finished, FlowConfig, FlowTable
from vspan.analysis.records.build import flow_table
from vspan.analysis.records.hostnames import HostNames
from vspan.analysis.records.table import RecordTable
from vspan.batch import FrameBatch
from vspan.inventory import InventoryView
from vspan.pcap.read import CaptureReader

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CaptureReport",
    "FileStatus",
    "analyze_captures",
    "import_in_background",
    "prefetch",
    "time_merge",
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
    flow_counters: dict[str, int] = field(default_factory=dict)
    """The flow table's counters (``FlowTable.counters``): late frames, paired copies."""

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


def prefetch(batches: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
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


def _rows(dec: Decoded, lo: int, hi: int) -> Decoded:
    """Rows ``lo .. hi`` of ``dec`` (views, no copy)."""
    return Decoded(**{name: col[lo:hi] for name, col in dec.columns().items()})


def _in_time_order(dec: Decoded) -> Decoded:
    """``dec`` sorted by capture time (stable; most chunks already are)."""
    ts = dec.ts_ns
    if len(dec) < 2 or bool(np.all(ts[1:] >= ts[:-1])):
        return dec
    return dec.take(np.argsort(ts, kind="stable"))


def time_merge(sources: Sequence[Iterator[Decoded]]) -> Iterator[Decoded]:
    """The chunks of ``sources`` as chunks in capture-time order, ties in the order of
    ``sources`` then of each source (a k-way merge, a chunk at a time).

    Each source's chunks are sorted first (a capture file is nearly always in time order;
    one that is not is put in order a chunk at a time, and what is out of order across its
    chunks reaches the flow table out of order, where the rules for late frames apply).
    A source whose chunk ends at time ``t`` has nothing before ``t`` left, so every frame
    up to the smallest such (time, source) is final: those go out together, and the source
    that set the bound reads its next chunk. Memory: one chunk per source.
    """
    heads: list[Decoded | None] = [None] * len(sources)
    while True:
        for s, chunks in enumerate(sources):  # a chunk for each source that has more
            head = heads[s]
            while head is None or not len(head):
                chunk = next(chunks, None)
                if chunk is None:
                    break
                head = _in_time_order(chunk)
            heads[s] = head if head is not None and len(head) else None
        live = [(s, head) for s, head in enumerate(heads) if head is not None]
        if not live:
            return
        bound_ts, bound_s = min((int(head.ts_ns[-1]), s) for s, head in live)
        parts = []
        for s, head in live:
            side: Literal["left", "right"] = (
                "right" if s <= bound_s else "left"
            )  # ties: lower first
            cut = int(np.searchsorted(head.ts_ns, bound_ts, side=side))
            if cut:
                parts.append(_rows(head, 0, cut))
            heads[s] = _rows(head, cut, len(head))
        if len(parts) == 1:
            yield parts[0]
        else:  # in source order: the stable sort keeps ties so
            both = Decoded.concat(parts)
            yield both.take(np.argsort(both.ts_ns, kind="stable"))


def analyze_captures(
    paths: Sequence[str | os.PathLike[str]],
    *,
    inventory: InventoryView | None = None,
    host: str | None = None,
    flow_config: FlowConfig | None = None,
    chunk_bytes: int = 64 << 20,
    progress: Progress | None = None,
) -> CaptureReport:
    """Read every capture into one flow table, their frames merged in capture-time order;
    return flows and accounting.

    ``host`` names the hypervisor the captures were taken on when the files do not say
    (a classic pcap has no interface names); it is looked up in the inventory. With several
    files each reads chunks of ``chunk_bytes / files`` (at least 1 MiB), so that memory
    stays about the same.
    """
    hosts = HostNames.from_inventory(inventory)
    default_host = hosts.id_for(host) if host else 0
    resolver = EndpointResolver(inventory)
    table = FlowTable(flow_config)
    finished: list[Finished] = []
    outcomes: dict[int, int] = {}
    per_file = max(chunk_bytes // max(len(paths), 1), min(chunk_bytes, 1 << 20))
    readers = [CaptureReader(p, chunk_bytes=per_file) for p in paths]
    total = sum(os.path.getsize(p) for p in paths)
    frames = 0

    def usable_frames(batches: Iterable[FrameBatch]) -> Iterator[Decoded]:
        """The usable frames of each batch, decoded and counted by outcome."""
        nonlocal frames
        for batch in batches:
            dec = _with_host(decode_batch(batch), _assign_hosts(batch, hosts, default_host))
            ok = usable(dec)
            for code, count in zip(*(c.tolist() for c in _summary_counts(dec, ok)), strict=True):
                outcomes[code] = outcomes.get(code, 0) + count
            frames += len(dec)
            if progress is not None:
                progress(sum(r.bytes_read for r in readers), total)
            yield dec.take(np.flatnonzero(ok)) if not ok.all() else dec

    # Ties between files go by their paths, not by the order they were named in.
    rank = sorted(range(len(readers)), key=lambda i: (os.path.realpath(readers[i].path), i))
    with contextlib.ExitStack() as stack:
        # Reading (walking the records, faulting the file's pages in) runs in a thread per
        # file; decoding (compiled, without the GIL) and flows in this one, which balances
        # the two on two cores.
        depth = 2 if len(readers) == 1 else 1
        sources = []
        for i in rank:
            batches = stack.enter_context(contextlib.closing(prefetch(iter(readers[i]), depth)))
            sources.append(usable_frames(batches))
        for good in time_merge(sources):
            finished.append(table.update_rows(good, resolver.resolve(good)))
    files = [
        FileStatus(
            path=os.fspath(reader.path),
            format=reader.format,
            frames=reader.frames_read,
            partial=reader.partial,
            error=None if reader.error is None else str(reader.error),
        )
        for reader in readers
    ]
    finished.append(table.flush_rows())
    flows = Finished.concat(finished)
    cols = flows.columns()
    order = np.lexsort((cols["hash"], cols["start_ns"]))  # by first packet, then hash
    records = flow_table({c: v[order] for c, v in cols.items()}, inventory=inventory, hosts=hosts)
    return CaptureReport(
        records=records,
        frames=frames,
        outcomes=_outcomes(outcomes),
        files=files,
        flow_counters=table.counters(),
    )


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
