"""Replay a pcap/pcapng file as if its frames crossed this host's VM ports.

``ReplaySource`` is a ``CaptureSource`` (and a ``PortDirectory``): each frame is placed on
the ports a live vswitch would have shown it on, by MAC, using an ``Inventory``:

- source MAC of a local VM → that VM's port, ``from_vm=True`` (the sender's copy);
- unicast destination MAC of a local VM (another one) → that VM's port, ``from_vm=False``
  (the delivery copy: a frame between two local VMs yields both, and ``mirror`` keeps one);
- broadcast/multicast destination → a delivery copy on every local port but the sender's
  (a bridge floods them; ``mirror`` drops the copies of a local sender's frame and keeps
  those of a frame from outside, once per VM);
- a frame that touches no local VM, or is not Ethernet, is counted in ``unmatched`` and
  skipped.

"Local" VMs are those of ``host`` in the inventory (all VMs when ``host`` is None). Each
vNIC is a port named ``<vm>-nic<i>`` with the inventory's vif. Timestamps stay those of the
file. Pacing: with ``speed`` a frame captured ``t`` seconds after the first one is released
when ``now() - start >= t / speed`` (``start`` is the clock at the first ``poll``); with
``speed=None`` frames come as fast as ``poll`` is called. ``now`` and ``sleep`` are
constructor arguments so that tests replay with a fake clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch, LinkType
from vspan.collectors.mirror import MIN_FRAME, read_macs
from vspan.collectors.model import CaptureCounters, PortBatch
from vspan.inventory import Inventory, Port
from vspan.pcap.read import CaptureReader

__all__ = ["ReplaySource", "place_frames"]

I64 = npt.NDArray[np.int64]
_NS: Final = 1_000_000_000


def place_frames(
    frames: FrameBatch, mac_table: npt.NDArray[np.uint64], vif_table: npt.NDArray[np.uint16]
) -> tuple[I64, npt.NDArray[np.uint16], npt.NDArray[np.bool_]]:
    """(input row, port vif, from_vm) of every copy a vswitch would show, in frame order.

    ``mac_table`` is sorted and ``vif_table`` sorted by ``mac_table``'s order, one row per
    local port. Frames placed nowhere are absent from the rows.
    """
    rows = np.flatnonzero((frames.caplen >= MIN_FRAME) & (frames.linktype == LinkType.ETHERNET))
    dst, src = read_macs(frames, rows.astype(np.int64))
    n_local = mac_table.size

    def lookup(macs: npt.NDArray[np.uint64]) -> I64:
        if n_local == 0:
            return np.full(macs.size, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(mac_table, macs), n_local - 1)
        return np.where(mac_table[pos] == macs, pos, -1).astype(np.int64)

    s, d = lookup(src), lookup(dst)
    group = ((dst >> np.uint64(40)) & np.uint64(1)).astype(np.bool_)
    sent = s >= 0
    to_one = ~group & (d >= 0) & (d != s)
    one = sent.astype(np.int64)
    copies = one + to_one.astype(np.int64) + np.where(group, n_local - one, 0)
    row = np.repeat(rows, copies)
    first = np.repeat(np.cumsum(copies) - copies, copies)
    k = np.arange(row.size, dtype=np.int64) - first  # copy number within its frame
    own = np.repeat(np.where(sent, s, -1), copies)
    is_sent = np.repeat(sent, copies) & (k == 0)
    is_one = np.repeat(to_one, copies) & ~is_sent
    flood = k - np.repeat(one, copies)  # rank among the other local ports
    flood_port = flood + ((own >= 0) & (flood >= own))  # skip the sender's own port
    port = np.where(is_sent, own, np.where(is_one, np.repeat(d, copies), flood_port))
    return row.astype(np.int64), vif_table[port], is_sent


class ReplaySource:
    """A capture file replayed onto the local VM ports of an inventory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        inventory: Inventory,
        speed: float | None = 1.0,
        *,
        host: str | None = None,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_batch: int = 4096,
        chunk_bytes: int = 16 << 20,
    ) -> None:
        if speed is not None and not speed > 0:
            raise ValueError(f"speed must be positive or None, got {speed}")
        self.path = os.fspath(path)
        self.inventory = inventory
        self.speed = speed
        self.host = host
        self.now = now
        self.sleep = sleep
        self.max_batch = max_batch
        self.chunk_bytes = chunk_bytes
        self.counters = CaptureCounters()
        self.unmatched = 0
        """Frames that touched no local VM (or were not Ethernet), skipped."""
        self.finished = False
        """The whole file has been handed out."""
        self._ports = self._local_ports()
        by_mac = sorted((p.mac, p.vif) for p in self._ports)
        self._macs = np.array([m for m, _ in by_mac], dtype=np.uint64)
        self._vifs = np.array([v for _, v in by_mac], dtype=np.uint16)
        self._names = {p.vif: p.name for p in self._ports}
        self._reader: Iterator[FrameBatch] | None = None
        self._batch: FrameBatch | None = None
        self._next = 0  # first frame of ``_batch`` not handed out
        self._start: float | None = None
        self._t0: int | None = None

    def _local_ports(self) -> list[Port]:
        ports: list[Port] = []
        for vm in self.inventory.vms:
            if self.host is not None and vm.host != self.host:
                continue
            for i, nic in enumerate(vm.nics):
                ports.append(
                    Port(f"{vm.name}-nic{i}", 0, nic.vif, nic.mac, vm.name, vm.uuid, vm.profile)
                )
        return ports

    def ports(self) -> list[Port]:
        """The local VM ports frames are placed on."""
        return list(self._ports)

    def start(self) -> None:
        """Open the file (``CaptureFileError`` if it is not a capture)."""
        self._reader = iter(CaptureReader(self.path, chunk_bytes=self.chunk_bytes, strict=True))
        self._batch, self._next, self._start, self._t0 = None, 0, None, None
        self.finished = False
        self._current()  # reads the first chunk: a bad file fails here, not in poll

    def stop(self) -> None:
        """Forget the file; idempotent."""
        self._reader, self._batch = None, None

    def poll(self, timeout_s: float) -> PortBatch | None:
        """Frames due by now (at most ``max_batch``), sleeping up to ``timeout_s`` for one."""
        if self._reader is None:
            raise RuntimeError("ReplaySource.poll before start()")
        batch = self._current()
        if batch is None:
            return None
        now = self.now()
        if self._start is None:
            self._start, self._t0 = now, int(batch.ts_ns[self._next])
        stop = min(self._next + self.max_batch, len(batch))
        if self.speed is not None:
            assert self._t0 is not None
            due_ns = self._t0 + round((now - self._start) * self.speed * _NS)
            late = batch.ts_ns[self._next : stop] > due_ns  # the leading run of due frames
            stop = self._next + (int(np.argmax(late)) if late.any() else int(late.size))
            if stop == self._next:
                wait = (int(batch.ts_ns[self._next]) - due_ns) / _NS / self.speed
                self.sleep(min(max(wait, 0.0), timeout_s))
                return None if wait > timeout_s else self.poll(0.0)
        start, self._next = self._next, stop
        return self._place(batch, start, stop)

    def _current(self) -> FrameBatch | None:
        while self._batch is None or self._next >= len(self._batch):
            assert self._reader is not None
            nxt = next(self._reader, None)
            if nxt is None:
                self.finished = True
                return None
            self._batch, self._next = nxt, 0
        return self._batch

    def _place(self, batch: FrameBatch, start: int, stop: int) -> PortBatch | None:
        frames = FrameBatch(
            data=batch.data,
            offset=batch.offset[start:stop],
            caplen=batch.caplen[start:stop],
            origlen=batch.origlen[start:stop],
            ts_ns=batch.ts_ns[start:stop],
            linktype=batch.linktype[start:stop],
        )
        rows, vif, from_vm = place_frames(frames, self._macs, self._vifs)
        self.unmatched += len(frames) - np.unique(rows).size
        if rows.size == 0:
            return None
        placed = FrameBatch(
            data=frames.data,
            offset=frames.offset[rows],
            caplen=frames.caplen[rows],
            origlen=frames.origlen[rows],
            ts_ns=frames.ts_ns[rows],
            linktype=frames.linktype[rows],
        )
        c = self.counters
        c.frames += int(rows.size)
        c.bytes += int(placed.caplen.sum(dtype=np.int64))
        per_vif = np.bincount(vif, minlength=1)
        for v in np.flatnonzero(per_vif).tolist():
            name = self._names[v]
            c.per_port[name] = c.per_port.get(name, 0) + int(per_vif[v])
        return PortBatch(placed, vif, from_vm)
