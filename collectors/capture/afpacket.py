"""Live capture on VM ports: one AF_PACKET socket with a TPACKET_V3 ring per port.

Each port (the host-side veth or tap of a vNIC) gets a ``SOCK_RAW`` packet socket bound
to it for every protocol, with a memory-mapped TPACKET_V3 receive ring. ``poll`` waits on
all the sockets, walks the blocks the kernel handed over with a numba kernel, copies the
frames into one ``FrameBatch`` buffer and gives the blocks back: no Python per frame. The
socket only reads: it is a tap beside the VM's data path, never in it.

Per port, in this order: the kernel runs the BPF filter (``bpf``, compiled by libpcap) and
cuts frames to ``snaplen``; we keep every ``sample``-th frame (the 1st, the N+1st, ...),
put back a VLAN tag the kernel took off (offload), and cut to ``snaplen`` again.

A frame the VM sent arrives on its port (packet type HOST, BROADCAST, MULTICAST or
OTHERHOST); a frame delivered to the VM leaves it (PACKET_OUTGOING): ``from_vm`` is
``pkttype != PACKET_OUTGOING``.

Sockets belong to the network namespace of the thread that creates them: ``start`` and
``add_port`` resolve port names in the caller's namespace, and ``poll`` may then run in
any thread. ``add_port``/``remove_port`` may be called while another thread polls. A port
whose interface disappears is dropped (its frames so far are kept).

Errors (all ``VspanError``; see ``vspan.errors``)::

    CaptureError                 capture cannot run
     ├── NoSuchInterfaceError     "no such interface: X"
     └── CapturePermissionError   "capturing on X needs root or CAP_NET_RAW"
    ConfigError                  bad option values, a filter libpcap rejects
"""

from __future__ import annotations

import logging
import mmap
import select
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch, LinkType
from vspan.collectors.capture._socket import (
    MAX_SNAPLEN,
    PACKET_OUTGOING,
    CaptureError,
    CapturePermissionError,
    Geometry,
    NoSuchInterfaceError,
    Tap,
    compile_filter,
    open_tap,
)
from vspan.collectors.capture._tpacket import (
    W_LEN,
    W_NSEC,
    W_PKTTYPE,
    W_SEC,
    W_SNAPLEN,
    W_VLAN,
    Walk,
    gather,
)
from vspan.collectors.model import CaptureCounters, PortBatch
from vspan.errors import ConfigError
from vspan.inventory import Port

__all__ = [
    "AfPacketConfig",
    "AfPacketSource",
    "CaptureError",
    "CapturePermissionError",
    "NoSuchInterfaceError",
]

log = logging.getLogger(__name__)
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class AfPacketConfig:
    """Options of ``AfPacketSource``."""

    snaplen: int = MAX_SNAPLEN
    """Bytes kept of each frame; ``origlen`` keeps the length on the wire."""
    sample: int = 1
    """Keep 1 frame in ``sample`` of each port, deterministically (1: keep all)."""
    bpf: str = ""
    """A libpcap filter expression (``"udp port 9999"``) run in the kernel; "" for none.
    It sees a frame as the kernel holds it: without an 802.1Q tag the kernel took off, so
    ``vlan`` primitives do not match such frames (everything else does)."""
    block_size: int = 1 << 18
    """Bytes per ring block: a power of two of pages, big enough for a GSO frame (64 KiB)."""
    block_count: int = 16
    """Ring blocks per port (the ring is ``block_size * block_count`` bytes). The kernel
    closes a block after ``block_timeout_ms`` even if nearly empty, so at low rates the
    ring holds ``block_count * block_timeout_ms`` of traffic: ``poll`` more often."""
    frame_size: int = 2048
    """Nominal frame slot; TPACKET_V3 packs frames of any size into blocks."""
    block_timeout_ms: int = 10
    """The kernel hands over a partly filled block after this long."""
    stats_interval_s: float = 1.0
    """How often ``poll`` reads the kernel's drop counters."""

    def geometry(self) -> Geometry:
        """The ring's shape."""
        return Geometry(self.block_size, self.block_count, self.frame_size, self.block_timeout_ms)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first bad field."""
        checks = (
            ("snaplen", 16 <= self.snaplen <= MAX_SNAPLEN, f"16..{MAX_SNAPLEN}"),
            ("sample", self.sample >= 1, "at least 1"),
            ("block_size", _is_block_size(self.block_size), "a power of two of pages"),
            ("block_count", 1 <= self.block_count <= 4096, "1..4096"),
            (
                "frame_size",
                _is_frame_size(self.frame_size, self.block_size),
                "a multiple of 16, >= 128, dividing block_size",
            ),
            ("block_timeout_ms", 1 <= self.block_timeout_ms <= 60_000, "1..60000"),
            ("stats_interval_s", self.stats_interval_s > 0, "positive"),
        )
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                raise ConfigError(f"{value!r} is not valid, expected {expected}", field=name)


def _is_block_size(size: int) -> bool:
    return size >= mmap.PAGESIZE and size % mmap.PAGESIZE == 0 and size & (size - 1) == 0


def _is_frame_size(size: int, block_size: int) -> bool:
    return 128 <= size <= block_size and size % 16 == 0 and block_size % size == 0


@dataclass(frozen=True, slots=True)
class _Taken:
    """What ``poll`` took from one port's ring: the walk and the kept rows."""

    tap: Tap
    walk: Walk
    rows: I64
    caplen: I64
    origlen: I64


class AfPacketSource:
    """A ``CaptureSource`` over AF_PACKET sockets on a changing set of VM ports."""

    def __init__(self, ports: Iterable[Port] = (), *, config: AfPacketConfig | None = None) -> None:
        self.config = config or AfPacketConfig()
        self.counters = CaptureCounters()
        self._wanted: dict[str, Port] = {port.name: port for port in ports}
        self._taps: dict[str, Tap] = {}
        self._by_fd: dict[int, Tap] = {}
        self._poller = select.poll()
        self._lock = threading.Lock()
        self._program: bytes | None = None
        self._running = False
        self._stats_due = 0.0

    def __enter__(self) -> AfPacketSource:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Validate the options, compile the filter and open every port's socket."""
        with self._lock:
            if self._running:
                return
            self.config.validate()
            cfg = self.config
            if cfg.bpf or cfg.snaplen < MAX_SNAPLEN:  # the filter's return value cuts frames
                self._program = compile_filter(cfg.bpf, cfg.snaplen)
            try:
                for port in self._wanted.values():
                    self._add(port)
            except BaseException:
                self._close_all()
                raise
            self._running = True
            self._stats_due = time.monotonic() + cfg.stats_interval_s

    def stop(self) -> None:
        """Read the last drop counters and close every socket; idempotent."""
        with self._lock:
            self._close_all()
            self._running = False

    def ports(self) -> list[Port]:
        """The ports being captured."""
        with self._lock:
            return [tap.port for tap in self._taps.values()]

    def add_port(self, port: Port) -> None:
        """Capture on ``port`` too (now if running; replaces a port of the same name)."""
        with self._lock:
            if self._running:
                if (old := self._taps.get(port.name)) is not None:
                    self._drop(old)
                self._add(port)
            self._wanted[port.name] = port

    def remove_port(self, name: str) -> bool:
        """Stop capturing on port ``name``; whether it was there."""
        with self._lock:
            known = self._wanted.pop(name, None) is not None
            if (tap := self._taps.get(name)) is not None:
                self._drop(tap)
            return known or tap is not None

    def read_kernel_stats(self) -> int:
        """Add the kernel's drops since the last read to ``counters``; the total."""
        with self._lock:
            self._read_stats()
            return self.counters.kernel_drops

    def poll(self, timeout_s: float) -> PortBatch | None:
        """Frames captured since the last call, waiting up to ``timeout_s``; None if none."""
        batch = self._collect()
        if batch is None and timeout_s > 0:
            events = self._poller.poll(max(1, int(timeout_s * 1000)))
            batch = self._collect()
            self._check_errors(events)  # after taking what a vanished port captured
        if time.monotonic() >= self._stats_due:
            self._check_errors(self._poller.poll(0))
            with self._lock:
                self._read_stats()
                self._stats_due = time.monotonic() + self.config.stats_interval_s
        return batch

    # Helpers: those that do not take the lock are called with it held.

    def _add(self, port: Port) -> None:
        tap = open_tap(port, self.config.geometry(), self._program)
        self._taps[port.name] = tap
        self._by_fd[tap.sock.fileno()] = tap
        self._poller.register(tap.sock.fileno(), select.POLLIN)
        self.counters.per_port.setdefault(port.name, 0)

    def _drop(self, tap: Tap) -> None:
        self.counters.kernel_drops += tap.kernel_drops()
        fd = tap.sock.fileno()
        self._poller.unregister(fd)
        del self._by_fd[fd], self._taps[tap.port.name]
        tap.close()

    def _close_all(self) -> None:
        for tap in list(self._taps.values()):
            self._drop(tap)

    def _read_stats(self) -> None:
        for tap in self._taps.values():
            self.counters.kernel_drops += tap.kernel_drops()

    def _check_errors(self, events: list[tuple[int, int]]) -> None:
        """Drop the ports whose interface went away (their socket reports an error)."""
        bad = [fd for fd, ev in events if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL)]
        if not bad:
            return
        with self._lock:
            for fd in bad:
                if (tap := self._by_fd.get(fd)) is None:
                    continue
                err = tap.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # clears it
                # Unregistering the device unbinds the socket: its name reads back as "".
                if err and tap.sock.getsockname()[0] != tap.port.name:
                    log.warning("port %s disappeared; capture on it stopped", tap.port.name)
                    self._drop(tap)
                    self._wanted.pop(tap.port.name, None)

    def _collect(self) -> PortBatch | None:
        with self._lock:
            taken = [took for tap in self._taps.values() if (took := self._take(tap))]
            try:
                return self._copy(taken) if taken else None
            finally:  # the frames are copied (or dropped): the blocks go back to the kernel
                for took in taken:
                    took.tap.ring.release(took.walk)

    def _take(self, tap: Tap) -> _Taken | None:
        """The rows of ``tap``'s ready blocks kept by sampling, with their lengths."""
        walk = tap.ring.walk()
        if not walk.blocks:
            return None
        if walk.bad:
            log.warning(
                "port %s: %d ring block(s) cut short at a record reaching outside its block "
                "(offset %d)",
                tap.port.name,
                walk.bad,
                walk.bad_offset,
            )
        rows = walk.rows
        if self.config.sample > 1:
            keep = (tap.seen + np.arange(len(rows))) % self.config.sample == 0
            self.counters.sampled_out += len(rows) - int(np.count_nonzero(keep))
            rows = rows[keep]
        tap.seen += len(walk.rows)
        tag = np.where(rows[:, W_VLAN] >= 0, 4, 0)
        origlen = rows[:, W_LEN] + tag
        caplen = np.minimum(rows[:, W_SNAPLEN] + tag, self.config.snaplen)
        return _Taken(tap, walk, rows, caplen, origlen)

    def _copy(self, taken: list[_Taken]) -> PortBatch | None:
        """One batch of the frames of ``taken``, copied out of the rings."""
        rows = np.concatenate([took.rows for took in taken])
        n = len(rows)
        if n == 0:
            return None
        caplen = np.concatenate([took.caplen for took in taken]).astype(np.int32)
        origlen = np.concatenate([took.origlen for took in taken]).astype(np.int32)
        offset = np.zeros(n, np.int64)
        np.cumsum(caplen[:-1], out=offset[1:])
        data = np.empty(int(caplen.sum(dtype=np.int64)), np.uint8)
        start = 0
        for took in taken:
            end = start + len(took.rows)
            gather(took.tap.ring.view, took.rows, caplen[start:end], data, offset[start:end])
            start = end
        counts = [len(took.rows) for took in taken]
        counters = self.counters
        counters.frames += n
        counters.bytes += int(origlen.sum(dtype=np.int64))
        counters.truncated += int(np.count_nonzero(caplen < origlen))
        for took, count in zip(taken, counts, strict=True):
            counters.per_port[took.tap.port.name] += count
        frames = FrameBatch(
            data=data,
            offset=offset,
            caplen=caplen,
            origlen=origlen,
            ts_ns=rows[:, W_SEC] * 1_000_000_000 + rows[:, W_NSEC],
            linktype=np.full(n, LinkType.ETHERNET, np.uint16),
        )
        vif = np.repeat(np.array([took.tap.port.vif for took in taken], np.uint16), counts)
        return PortBatch(frames=frames, vif=vif, from_vm=rows[:, W_PKTTYPE] != PACKET_OUTGOING)
