"""Tunnel receivers: sockets in, chunks of datagrams out (``Chunk``: buffer, offsets, sizes).

The receiving side does not parse (akvorado's inlet): ``UdpReceiver`` copies datagrams back
to back into a large preallocated buffer (``recvmsg_into``) and hands the buffer over when it
is nearly full, after ``linger_s`` without a datagram, or ``max_delay_s`` after its first
one; ``ingest`` validates and decodes later, vectorized. Buffers come from a pool
(``ReceiverConfig.buffers``) and go back on ``Chunk.release()``. When the consumer is behind
and every buffer is in use, the loop stops reading (``backpressure_waits``,
``backpressure_ms``): datagrams wait in the kernel's socket buffer (``ReceiverConfig.rcvbuf``,
forced beyond ``rmem_max`` where the process may), and only what does not fit there is
dropped — by the kernel, which counts it. Each datagram carries that count
(``SO_RXQ_OVFL``), so each chunk says how many datagrams the kernel dropped before its last
one (``Chunk.kernel_drops``): the accounting charges sequence gaps to the analyzer's socket
first, never to the network.

``TcpReceiver`` runs one selector thread over every connection's ``StreamDecoder``: whole valid
messages are re-packed into the same chunk form; the first invalid message is counted by
reason (handed over in ``Chunk.rejected``) and closes the stream. TCP chunks are bounded in
flight too, but a TCP connection waits instead of dropping (TCP's own flow control then
slows the sender).

Both are components: a config with defaults, a constructor that only stores, ``start()``
and ``stop()`` (prompt: sockets poll with short timeouts), and counters.

This module holds ``UdpReceiver`` and is where every receiver name is imported from; the
TCP receiver is in ``analysis._receivers_tcp``, what both share (``Chunk``,
``ReceiverConfig``, their base class) in ``analysis._receivers_common``.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import sys
import time
from typing import Final

import numpy as np

from vspan.analysis.ingest._receive import (
    MAX_DATAGRAM,
    U8,
    Address,
    Chunk,
    ReceiverBase,
    ReceiverConfig,
)
from vspan.analysis.ingest._tcp import TcpReceiver

__all__ = ["MAX_DATAGRAM", "Chunk", "ReceiverConfig", "TcpReceiver", "UdpReceiver"]

log = logging.getLogger(__name__)


SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
"""Linux ``SO_RCVBUFFORCE`` (Python's ``socket`` module does not define it)."""
SO_RXQ_OVFL: Final = getattr(socket, "SO_RXQ_OVFL", 40)
"""Linux ``SO_RXQ_OVFL``: each datagram carries the socket's drop counter (``sk_drops``) as
it was when the datagram was queued, in a ``SOL_SOCKET`` control message (absent while 0)."""
_OVFL_SPACE: Final = socket.CMSG_SPACE(4)


def _grow_rcvbuf(sock: socket.socket, size: int) -> int:
    """Ask for ``size`` bytes of receive buffer (beyond ``rmem_max`` with CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _kernel_drops(sock: socket.socket) -> int | None:
    """The ``drops`` column of /proc/net/udp{,6} for this socket (by inode), if readable."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as fh:
                for line in fh.readlines()[1:]:
                    cols = line.split()
                    if len(cols) >= 13 and cols[9] == inode:
                        return int(cols[12])
        except OSError:
            continue
    return None


def _ovfl(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The drop counter a datagram carried (``SO_RXQ_OVFL``), if it carried one."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)
    return None


def _pool(count: int, size: int) -> queue.SimpleQueue[U8]:
    """Free chunk buffers (handed out by ``_take``, given back by ``Chunk.release``)."""
    pool: queue.SimpleQueue[U8] = queue.SimpleQueue()
    for _ in range(count):
        pool.put(np.empty(size, np.uint8))
    return pool


class UdpReceiver(ReceiverBase):
    """Receive datagrams on ``addr`` into chunks put on ``sink``."""

    _COUNTERS = (
        "datagrams", "bytes", "chunks", "backpressure_waits", "backpressure_ms", "errors",
        "rcvbuf",
    )  # fmt: skip

    def __init__(
        self, addr: Address, *, sink: queue.Queue[Chunk], config: ReceiverConfig | None = None
    ) -> None:
        super().__init__(addr, sink, config)
        self.datagrams = 0
        """Datagrams handed over in chunks."""
        self.bytes = 0
        self.chunks = 0
        self.backpressure_waits = 0
        """Times the loop stopped reading because every chunk buffer was in use (the
        datagrams waited in the kernel's socket buffer meanwhile)."""
        self.backpressure_ms = 0
        """Milliseconds spent so."""
        self.errors = 0
        """Socket errors other than "no data"."""
        self.rcvbuf = 0
        """SO_RCVBUF as the kernel reports it after our request (Linux reports twice the
        usable size)."""
        self._ovfl = 0
        """The socket's drop counter as the latest datagram carried it."""

    def start(self) -> None:
        """Bind and start the receive thread."""

        def setup(sock: socket.socket) -> None:
            self.rcvbuf = _grow_rcvbuf(sock, self.config.rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            sock.setblocking(False)

        self._bind(socket.SOCK_DGRAM, setup)
        self._spawn(self._run, "vspan-udp")

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped for this socket because its buffer was full: the
        larger of what the datagrams carried and what /proc says (which also knows drops
        that no datagram has followed yet); None before ``start``."""
        if self._sock is None:
            return None
        return max(self._ovfl, _kernel_drops(self._sock) or 0)

    def counters(self) -> dict[str, int]:
        """Every counter, the kernel's drops for the socket included."""
        return {**super().counters(), "kernel_drops": self.kernel_drops() or 0}

    def _run(self) -> None:
        """Read datagrams back to back into a chunk buffer; hand the buffer over when it is
        nearly full, after ``linger_s`` without a datagram, or ``max_delay_s`` after its
        first one. With every buffer in use, stop reading until one comes back: the
        datagrams wait in the kernel's socket buffer, which drops (and counts) only what
        does not fit."""
        assert self._sock is not None
        cfg, sock = self.config, self._sock
        pool = _pool(cfg.buffers, cfg.buffer_bytes)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        linger_ms, poll_ms = max(1, round(cfg.linger_s * 1000)), max(1, round(cfg.poll_s * 1000))
        limit = cfg.buffer_bytes - MAX_DATAGRAM
        offsets: list[int] = []
        sizes: list[int] = []
        buf: U8 | None = None
        pos, first_at, ovfl_at_start = 0, 0.0, self._ovfl
        while not self._stop.is_set():
            if buf is None:
                buf = self._wait_for_buffer(pool)
                if buf is None:
                    continue
                view = buf.data
            try:
                n, ancdata, _, _ = sock.recvmsg_into([view[pos:]], _OVFL_SPACE)
            except BlockingIOError:
                if not poller.poll(linger_ms if offsets else poll_ms) and offsets:
                    self._hand_over(buf, offsets, sizes, pool, self._ovfl - ovfl_at_start)
                    buf, pos, ovfl_at_start = None, 0, self._ovfl
                continue
            except OSError as exc:
                self.errors += 1
                log.warning("UDP receive on %s failed: %s", self._addr, exc)
                continue
            if ancdata:
                self._ovfl = _ovfl(ancdata) or self._ovfl
            if not offsets:
                first_at = time.monotonic()
            offsets.append(pos)
            sizes.append(n)
            pos += n
            if pos > limit or time.monotonic() - first_at >= cfg.max_delay_s:
                self._hand_over(buf, offsets, sizes, pool, self._ovfl - ovfl_at_start)
                buf, pos, ovfl_at_start = None, 0, self._ovfl
        if offsets and buf is not None:
            self._hand_over(buf, offsets, sizes, pool, self._ovfl - ovfl_at_start)

    def _wait_for_buffer(self, pool: queue.SimpleQueue[U8]) -> U8 | None:
        """A free chunk buffer; waits (counted as backpressure) while none is free."""
        try:
            return pool.get_nowait()
        except queue.Empty:
            pass
        self.backpressure_waits += 1
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    return pool.get(timeout=self.config.poll_s)
                except queue.Empty:
                    continue
            return None
        finally:
            self.backpressure_ms += round((time.monotonic() - started) * 1000)

    def _hand_over(
        self,
        buf: U8,
        offsets: list[int],
        sizes: list[int],
        pool: queue.SimpleQueue[U8],
        kernel_drops: int,
    ) -> None:
        """Put the filled buffer on the sink (waiting while the sink is full: its buffers
        are bounded by the pool anyway)."""
        chunk = Chunk(
            data=buf,
            offsets=np.array(offsets, np.int64),
            sizes=np.array(sizes, np.int64),
            received_at=time.time(),
            source="udp",
            kernel_drops=kernel_drops,
            _release=lambda: pool.put(buf),
        )
        count, total = len(offsets), sum(sizes)
        offsets.clear()
        sizes.clear()
        while True:
            try:
                self._sink.put(chunk, timeout=self.config.poll_s)
                break
            except queue.Full:
                if self._stop.is_set():
                    chunk.release()
                    return
        self.datagrams += count
        self.bytes += total
        self.chunks += 1
