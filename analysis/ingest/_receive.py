"""What the UDP and TCP receivers share: ``ReceiverConfig``, the ``Chunk`` they hand over,
and ``ReceiverBase`` (a bound socket, threads, ``stop()`` and counters).

``analysis.receivers`` is the public module (it re-exports ``Chunk`` and ``ReceiverConfig``
and holds ``UdpReceiver``); ``analysis._receivers_tcp`` holds ``TcpReceiver``.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["I64", "MAX_DATAGRAM", "U8", "Address", "Chunk", "ReceiverBase", "ReceiverConfig"]

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
    buffers: int = 8
    """Chunk buffers (UDP) or chunks in flight (TCP): with all of them in use, UDP datagrams
    wait in the kernel's socket buffer and TCP streams in theirs."""
    linger_s: float = 0.005
    """Hand a chunk over when no datagram arrived for this long."""
    max_delay_s: float = 0.05
    """Hand a chunk over at most this long after its first datagram."""
    poll_s: float = 0.1
    """Socket timeout of the loops: how soon ``stop()`` is noticed."""
    max_message: int = MAX_DATAGRAM
    """Largest message a TCP stream may announce (what a UDP datagram can carry, unless
    set higher): a header announcing more closes the stream at once, and a connection
    holds less than ``max_message + tcp_read_bytes`` before the tag is checked."""
    tcp_max_connections: int = 512
    """TCP connections served at once; more are accepted and closed at once (counted as
    ``rejected_connections``). Lowered at start to what the fd limit leaves after
    ``tcp_reserve_fds``."""
    tcp_idle_timeout_s: float = 20.0
    """A TCP connection that completes no message for this long is closed (counted as
    ``closed_idle``): measured from its last whole message, so trickling bytes does not
    keep it open. A sender whose connection was closed while idle reconnects."""
    tcp_reserve_fds: int = 128
    """File descriptors kept free for the rest of the analyzer (API, store, ring)."""
    tcp_read_bytes: int = 1 << 16
    """Bytes read from one connection at a time."""

    def __post_init__(self) -> None:
        if self.buffer_bytes < 2 * MAX_DATAGRAM:
            raise ValueError(
                f"buffer_bytes {self.buffer_bytes} too small: need at least {2 * MAX_DATAGRAM}"
            )
        if self.buffers < 1:
            raise ValueError(f"buffers {self.buffers}: need at least 1")
        for name in ("max_message", "tcp_max_connections", "tcp_read_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: need at least 1")
        if self.tcp_idle_timeout_s <= 0 or self.tcp_reserve_fds < 0:
            raise ValueError(
                f"tcp_idle_timeout_s {self.tcp_idle_timeout_s} must be positive and "
                f"tcp_reserve_fds {self.tcp_reserve_fds} not negative"
            )


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
    kernel_drops: int = 0
    """Datagrams the kernel dropped at the socket (its buffer was full) between the previous
    chunk's last datagram and this chunk's last one: what the sequence gaps seen in this
    chunk are attributed to first (``Accounting``), so that they are not counted as loss
    on the network."""
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the buffer back (call once the frames are decoded; later calls do nothing)."""
        done, self._release = self._release, None
        if done is not None:
            done()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class ReceiverBase:
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
