"""Tunnel receivers: sockets in, chunks of datagrams out (``Chunk``: buffer, offsets, sizes).

The receiving side does not parse (akvorado's inlet): ``UdpReceiver`` copies datagrams back
to back into a large preallocated buffer (``recv_into``) and hands the buffer over when it is
nearly full, after ``linger_s`` without a datagram, or ``max_delay_s`` after its first one;
``ingest`` validates and decodes later, vectorized. Buffers come from a pool (triple
buffering by default) and go back on ``Chunk.release()``. When the consumer is behind and
no buffer is free, datagrams are read and counted as ``dropped_backpressure``: the loop
never blocks on the consumer, so the kernel's socket buffer keeps draining.

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
import time

import numpy as np

from vspan.analysis._receivers_common import (
    MAX_DATAGRAM,
    U8,
    Address,
    Chunk,
    ReceiverBase,
    ReceiverConfig,
)
from vspan.analysis._receivers_tcp import TcpReceiver

__all__ = ["MAX_DATAGRAM", "Chunk", "ReceiverConfig", "TcpReceiver", "UdpReceiver"]

log = logging.getLogger(__name__)


def _grow_rcvbuf(sock: socket.socket, size: int) -> int:
    """Ask for ``size`` bytes of receive buffer (beyond rmem_max when privileged)."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, size)
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


def _pool(count: int, size: int) -> queue.SimpleQueue[U8]:
    """Free chunk buffers (taken without waiting, given back by ``Chunk.release``)."""
    pool: queue.SimpleQueue[U8] = queue.SimpleQueue()
    for _ in range(count):
        pool.put(np.empty(size, np.uint8))
    return pool


def _take(pool: queue.SimpleQueue[U8]) -> tuple[U8 | None, memoryview | None]:
    try:
        buf = pool.get_nowait()
    except queue.Empty:
        return None, None
    return buf, buf.data


class UdpReceiver(ReceiverBase):
    """Receive datagrams on ``addr`` into chunks put on ``sink``."""

    _COUNTERS = ("datagrams", "bytes", "chunks", "dropped_backpressure", "errors", "rcvbuf")

    def __init__(
        self, addr: Address, *, sink: queue.Queue[Chunk], config: ReceiverConfig | None = None
    ) -> None:
        super().__init__(addr, sink, config)
        self.datagrams = 0
        """Datagrams handed over in chunks."""
        self.bytes = 0
        self.chunks = 0
        self.dropped_backpressure = 0
        """Datagrams read but dropped because no buffer was free (the consumer is behind)."""
        self.errors = 0
        """Socket errors other than "no data"."""
        self.rcvbuf = 0
        """SO_RCVBUF as the kernel reports it after our request (Linux reports twice the
        usable size)."""

    def start(self) -> None:
        """Bind and start the receive thread."""

        def setup(sock: socket.socket) -> None:
            self.rcvbuf = _grow_rcvbuf(sock, self.config.rcvbuf)
            sock.setblocking(False)

        self._bind(socket.SOCK_DGRAM, setup)
        self._spawn(self._run, "vspan-udp")

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped for this socket (its buffer was full), if known."""
        return None if self._sock is None else _kernel_drops(self._sock)

    def counters(self) -> dict[str, int]:
        """Every counter, the kernel's drops for the socket included (-1: unknown)."""
        drops = self.kernel_drops()
        return {**super().counters(), "kernel_drops": -1 if drops is None else drops}

    def _run(self) -> None:
        assert self._sock is not None
        cfg, sock = self.config, self._sock
        pool = _pool(cfg.buffers, cfg.buffer_bytes)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        linger_ms, poll_ms = max(1, round(cfg.linger_s * 1000)), max(1, round(cfg.poll_s * 1000))
        scratch = memoryview(bytearray(MAX_DATAGRAM))
        buf, view = _take(pool)
        limit = cfg.buffer_bytes - MAX_DATAGRAM
        offsets: list[int] = []
        sizes: list[int] = []
        pos, first_at = 0, 0.0
        while not self._stop.is_set():
            if view is None:  # the consumer holds every buffer: read and drop
                buf, view = _take(pool)
            try:
                n = sock.recv_into(scratch if view is None else view[pos:], MAX_DATAGRAM)
            except BlockingIOError:
                if not poller.poll(linger_ms if offsets else poll_ms) and offsets:
                    buf, view = self._hand_over(buf, offsets, sizes, pool)
                    pos = 0
                continue
            except OSError as exc:
                self.errors += 1
                log.warning("UDP receive on %s failed: %s", self._addr, exc)
                continue
            if view is None:
                self.dropped_backpressure += 1
                continue
            if not offsets:
                first_at = time.monotonic()
            offsets.append(pos)
            sizes.append(n)
            pos += n
            if pos > limit or time.monotonic() - first_at >= cfg.max_delay_s:
                buf, view = self._hand_over(buf, offsets, sizes, pool)
                pos = 0
        if offsets:
            self._hand_over(buf, offsets, sizes, pool)

    def _hand_over(
        self, buf: U8 | None, offsets: list[int], sizes: list[int], pool: queue.SimpleQueue[U8]
    ) -> tuple[U8 | None, memoryview | None]:
        """Put the filled buffer on the sink; return the next buffer (``None``: none free)."""
        assert buf is not None
        full = buf
        chunk = Chunk(
            data=buf,
            offsets=np.array(offsets, np.int64),
            sizes=np.array(sizes, np.int64),
            received_at=time.time(),
            source="udp",
            _release=lambda: pool.put(full),
        )
        count, total = len(offsets), sum(sizes)
        offsets.clear()
        sizes.clear()
        try:
            self._sink.put_nowait(chunk)
        except queue.Full:  # a bounded sink that is full: drop this chunk, keep the buffer
            self.dropped_backpressure += count
            return buf, buf.data
        self.datagrams += count
        self.bytes += total
        self.chunks += 1
        return _take(pool)
