"""Tunnel receivers: sockets in, chunks of datagrams out (``Chunk``: buffer, offsets, sizes).

The receiving side does not parse (akvorado's inlet): ``UdpReceiver`` copies datagrams back
to back into a large preallocated buffer (``recv_into``) and hands the buffer over when it is
nearly full, after ``linger_s`` without a datagram, or ``max_delay_s`` after its first one;
``ingest`` validates and decodes later, vectorized. Buffers come from a pool (triple
buffering by default) and go back on ``Chunk.release()``. When the consumer is behind and
no buffer is free, datagrams are read and counted as ``dropped_backpressure``: the loop
never blocks on the consumer, so the kernel's socket buffer keeps draining.

``TcpReceiver`` runs one thread per connection around a ``StreamDecoder``: whole valid
messages are re-packed into the same chunk form; the first invalid message is counted by
reason (handed over in ``Chunk.rejected``) and closes the stream. TCP chunks are bounded in
flight too, but a TCP connection waits instead of dropping (TCP's own flow control then
slows the sender).

Both are components: a config with defaults, a constructor that only stores, ``start()``
and ``stop()`` (prompt: sockets poll with short timeouts), and counters.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.errors import TunnelError
from vspan.tunnel import MAGIC, VERSION
from vspan.tunnel_stream import NEED_DATA, StreamDecoder

__all__ = ["MAX_DATAGRAM", "Chunk", "ReceiverConfig", "TcpReceiver", "UdpReceiver"]

log = logging.getLogger(__name__)

MAX_DATAGRAM: Final = 65535
"""Room kept free in a buffer for the next datagram (larger than any UDP payload)."""
Address = tuple[str, int]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    """Receiver settings."""

    rcvbuf: int = 64 << 20
    """Kernel socket receive buffer requested (the kernel may grant less)."""
    buffer_bytes: int = 8 << 20
    """Size of each chunk buffer."""
    buffers: int = 3
    """Chunk buffers (UDP) or chunks in flight (TCP) before backpressure."""
    linger_s: float = 0.005
    """Hand a chunk over when no datagram arrived for this long."""
    max_delay_s: float = 0.05
    """Hand a chunk over at most this long after its first datagram."""
    poll_s: float = 0.1
    """Socket timeout of the loops: how soon ``stop()`` is noticed."""
    max_message: int = 16 << 20
    """Largest message a TCP stream may announce."""

    def __post_init__(self) -> None:
        if self.buffer_bytes < 2 * MAX_DATAGRAM:
            raise ValueError(
                f"buffer_bytes {self.buffer_bytes} too small: need at least {2 * MAX_DATAGRAM}"
            )
        if self.buffers < 1:
            raise ValueError(f"buffers {self.buffers}: need at least 1")


@dataclass(eq=False)
class Chunk:
    """Datagrams ``data[offsets[i]:offsets[i] + sizes[i]]`` to ingest, and rejections."""

    data: U8
    offsets: I64
    sizes: I64
    received_at: float
    """Wall-clock time (seconds) the chunk was handed over."""
    source: str
    """``udp`` or ``tcp``."""
    rejected: tuple[tuple[int, str], ...] = ()
    """(collector_id or 0, reason) of messages a TCP stream decoder rejected."""
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the buffer back (call once the frames are decoded; later calls do nothing)."""
        done, self._release = self._release, None
        if done is not None:
            done()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


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


class _Component:
    """What both receivers share: a bound socket, threads, ``stop()`` and counters."""

    _COUNTERS: tuple[str, ...] = ()

    def __init__(self, addr: Address, sink: queue.Queue[Chunk], config: ReceiverConfig | None):
        self.config = config or ReceiverConfig()
        self._addr = addr
        self._sink = sink
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def address(self) -> Address:
        """The bound address (with the port the kernel chose for port 0)."""
        if self._sock is None:
            raise RuntimeError("receiver not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop every thread (each notices within ``poll_s``), then close the socket."""
        self._stop.set()
        while self._threads:
            with self._lock:
                threads, self._threads = self._threads, []
            for t in threads:
                t.join()
        if self._sock is not None:
            self._sock.close()

    def counters(self) -> dict[str, int]:
        """Every counter, for metrics."""
        return {name: getattr(self, name) for name in self._COUNTERS}

    def _bind(self, kind: socket.SocketKind, setup: Callable[[socket.socket], None]) -> None:
        sock = socket.socket(_family(self._addr[0]), kind)
        try:
            setup(sock)
            sock.bind(self._addr)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._stop.clear()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()


class UdpReceiver(_Component):
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


def _collector_of(data: bytes | bytearray) -> int:
    """``collector_id`` of a message's header when it is readable, else 0."""
    if len(data) < 12:
        return 0
    magic, version = int.from_bytes(data[0:2], "big"), data[2]
    if magic != MAGIC or version != VERSION:
        return 0
    return int.from_bytes(data[8:12], "big")


class TcpReceiver(_Component):
    """Accept TCP streams of messages on ``addr``; whole valid messages go to ``sink``."""

    _COUNTERS = ("connections", "messages", "bytes", "closed_invalid")

    def __init__(
        self,
        addr: Address,
        *,
        sink: queue.Queue[Chunk],
        keys: Mapping[int, bytes] | None = None,
        require_known: bool = False,
        config: ReceiverConfig | None = None,
    ) -> None:
        super().__init__(addr, sink, config)
        self._keys = keys
        self._require_known = require_known
        self._in_flight = threading.BoundedSemaphore(self.config.buffers)
        self.connections = 0
        self.messages = 0
        self.bytes = 0
        self.closed_invalid = 0
        """Streams closed because of an invalid message."""
        self.rejected: dict[str, int] = {}
        """Invalid messages by reason (each also handed over in ``Chunk.rejected``)."""

    def start(self) -> None:
        """Listen and start the accept thread."""

        def setup(sock: socket.socket) -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(self.config.poll_s)

        self._bind(socket.SOCK_STREAM, setup)
        assert self._sock is not None
        self._sock.listen(64)
        self._spawn(self._accept, "vspan-tcp-accept")

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                log.warning("TCP accept on %s failed: %s", self._addr, exc)
                continue
            self.connections += 1
            self._spawn(self._serve, f"vspan-tcp-{peer[0]}:{peer[1]}", conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.config.poll_s)
            decoder = StreamDecoder(
                keys=self._keys,
                require_known=self._require_known,
                max_message=self.config.max_message,
            )
            pending = bytearray()  # the decoder's bytes, kept to re-pack whole messages
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError:
                    return
                sizes: list[int] = []
                error: TunnelError | None = None
                try:
                    if data:
                        pending += data
                        decoder.feed(data)
                        while (m := decoder.next_message()) is not NEED_DATA:
                            sizes.append(m.length)
                    else:
                        decoder.end_of_stream()
                except TunnelError as exc:
                    error = exc
                used = sum(sizes)
                rejected = () if error is None else ((_collector_of(pending[used:]), error.reason),)
                if (sizes or rejected) and not self._emit(pending[:used], sizes, rejected):
                    return
                del pending[:used]
                if error is not None:
                    with self._lock:
                        self.closed_invalid += 1
                        self.rejected[error.reason] = self.rejected.get(error.reason, 0) + 1
                    return
                if not data:
                    return

    def _emit(
        self, data: bytearray, sizes: list[int], rejected: tuple[tuple[int, str], ...]
    ) -> bool:
        """Hand over whole messages (and rejections); waits while too many are in flight."""
        while not self._in_flight.acquire(timeout=self.config.poll_s):
            if self._stop.is_set():
                return False
        size = np.array(sizes, np.int64)
        offsets = np.zeros(size.size, np.int64)
        np.cumsum(size[:-1], out=offsets[1:])
        chunk = Chunk(
            np.frombuffer(data, np.uint8),  # ``data`` is already a copy (a slice)
            offsets,
            size,
            time.time(),
            "tcp",
            rejected,
            _release=self._in_flight.release,
        )
        with self._lock:  # connection threads share the counters
            self.messages += len(sizes)
            self.bytes += len(data)
        self._sink.put(chunk)
        return True
