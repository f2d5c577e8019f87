"""``TcpReceiver``: TCP streams of tunnel messages in, chunks out; one selector thread.

Part of ``analysis.receivers`` (import it from there; its docstring describes both
receivers). One thread runs a selector (epoll) over the listening socket and every
connection: each connection feeds its own ``StreamDecoder``; the whole valid messages of one
round of the loop, from every connection, go out as one ``Chunk``; ``_emit`` bounds the
chunks in flight (``ReceiverConfig.buffers``) by waiting — meanwhile nothing is read, and
TCP's own flow control slows the senders.

One thread rather than one per connection: the cost of a connection is its socket and its
decoder's buffer, not a thread's stack; idle timeouts are one sweep over a dict; and
accepting can be paused (at the fd limit) without sleeping threads that hold streams.

Bounds on hostile peers (``ReceiverConfig``), each counted:

* ``tcp_max_connections`` at once — lowered at ``start`` so that ``tcp_reserve_fds``
  descriptors stay free for the API, store and ring; beyond, a connection is accepted and
  closed at once (``rejected_connections``), so the kernel's backlog does not fill;
* a connection that completes no message in ``tcp_idle_timeout_s`` is closed
  (``closed_idle``): measured from its last whole message, so a slowloris trickling bytes
  is closed as surely as a silent peer;
* a header announcing more than ``max_message`` bytes closes the stream at its 24th byte,
  and at most ``tcp_read_bytes`` are read at a time: a connection holds less than
  ``max_message + tcp_read_bytes`` bytes before the tag is checked;
* when ``accept`` fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
  ENOMEM), accepting pauses — 10 ms, doubling up to 1 s, reset by the next success — and
  the failure is logged at most once per 10 s (``accept_errors`` counts every one): no
  spin, and established streams are served meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.analysis.ingest._receive import Address, Chunk, ReceiverBase, ReceiverConfig
from vspan.errors import TunnelError
from vspan.wire.tunnel_stream import NEED_DATA, StreamDecoder

__all__ = ["TcpReceiver"]

log = logging.getLogger("vspan.analysis.ingest.receivers")
"""The logger of ``analysis.receivers``, which this module is part of."""

_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BACKOFF_FIRST_S: Final = 0.01
_BACKOFF_MAX_S: Final = 1.0
_LOG_EVERY_S: Final = 10.0
_ACCEPTS_PER_ROUND: Final = 64
_SWEEP_EVERY_S: Final = 0.25

RegisteredGetter = Callable[[], npt.ArrayLike]


class _Registered:
    """A live ``Container`` of registered collector ids for the stream decoders."""

    def __init__(self, getter: RegisteredGetter | None) -> None:
        self._getter = getter

    def __contains__(self, collector_id: object) -> bool:
        if self._getter is None or not isinstance(collector_id, int):
            return False
        return bool(np.isin(collector_id, self._getter()))


class _RateLimited:
    """One log line per ``every_s`` at most, saying how many were held back."""

    def __init__(self, every_s: float = _LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._next = 0.0
        self._held = 0

    def warning(self, now: float, message: str, *args: object) -> None:
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.every_s
        suffix = f" ({held} more like it not logged)" if held else ""
        log.warning(message + suffix, *args)


@dataclass(eq=False, slots=True)
class _Conn:
    sock: socket.socket
    peer: str
    decoder: StreamDecoder
    since: float
    """When it was accepted or last completed a message (monotonic seconds)."""


@dataclass(slots=True)
class _Round:
    """Whole messages and rejections of one round of the loop."""

    messages: list[bytes] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    size: int = 0


class TcpReceiver(ReceiverBase):
    """Accept TCP streams of messages on ``addr``; whole valid messages go to ``sink``."""

    _COUNTERS = (
        "connections",
        "open_connections",
        "max_connections",
        "rejected_connections",
        "closed_idle",
        "closed_invalid",
        "accept_errors",
        "messages",
        "bytes",
    )

    def __init__(
        self,
        addr: Address,
        *,
        sink: queue.Queue[Chunk],
        keys: Mapping[int, bytes] | None = None,
        require_known: bool = False,
        registered: RegisteredGetter | None = None,
        config: ReceiverConfig | None = None,
    ) -> None:
        super().__init__(addr, sink, config)
        self._keys = keys
        self._require_known = require_known
        self._registered = _Registered(registered)
        self._in_flight = threading.BoundedSemaphore(self.config.buffers)
        self._conns: dict[int, _Conn] = {}
        self._selector: selectors.BaseSelector | None = None
        self._paused_until: float | None = None
        self._backoff = 0.0
        self._log = {"accept": _RateLimited(), "full": _RateLimited()}
        self.connections = 0
        """Connections accepted and served."""
        self.max_connections = self.config.tcp_max_connections
        """The connection limit in force (``tcp_max_connections``, lowered to the fds left)."""
        self.rejected_connections = 0
        """Connections closed at once because ``max_connections`` were open."""
        self.closed_idle = 0
        """Connections closed after ``tcp_idle_timeout_s`` without a whole message."""
        self.closed_invalid = 0
        """Streams closed because of an invalid message."""
        self.accept_errors = 0
        """Failed ``accept`` calls (out of descriptors or memory: accepting paused)."""
        self.messages = 0
        self.bytes = 0
        self.rejected: dict[str, int] = {}
        """Invalid messages by reason (each also handed over in ``Chunk.rejected``)."""

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def start(self) -> None:
        """Listen and start the loop thread."""

        def setup(sock: socket.socket) -> None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)

        self._bind(socket.SOCK_STREAM, setup)
        assert self._sock is not None
        self._sock.listen(128)
        self.max_connections = self._connection_budget()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, None)
        self._spawn(self._run, "vspan-tcp")

    def _connection_budget(self) -> int:
        """``tcp_max_connections``, lowered to leave ``tcp_reserve_fds`` descriptors free."""
        cfg = self.config
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cfg.tcp_max_connections
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 0
        budget = max(1, soft - in_use - cfg.tcp_reserve_fds)
        if budget < cfg.tcp_max_connections:
            log.warning(
                "TCP tunnel on %s: serving at most %d connections, not %d: the fd limit is "
                "%d, %d are in use and %d are kept for the rest of the analyzer",
                self._addr, budget, cfg.tcp_max_connections, soft, in_use, cfg.tcp_reserve_fds,
            )  # fmt: skip
            return budget
        return cfg.tcp_max_connections

    # --- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._selector
        assert sel is not None
        assert self._sock is not None
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                timeout = self.config.poll_s
                if self._paused_until is not None:
                    timeout = min(timeout, max(0.0, self._paused_until - time.monotonic()))
                events = sel.select(timeout)
                now = time.monotonic()
                batch = _Round()
                for key, _ in events:
                    if key.data is None:
                        self._accept(now)
                    elif batch.size < self.config.buffer_bytes:  # the rest: next round
                        self._read(key.data, now, batch)
                if (batch.messages or batch.rejected) and not self._emit(batch):
                    return
                if self._paused_until is not None and now >= self._paused_until:
                    self._paused_until = None
                    sel.register(self._sock, selectors.EVENT_READ, None)
                if now >= next_sweep:
                    next_sweep = now + _SWEEP_EVERY_S
                    self._sweep(now)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()

    def _accept(self, now: float) -> None:
        assert self._sock is not None
        assert self._selector is not None
        for _ in range(_ACCEPTS_PER_ROUND):
            try:
                sock, peer = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self.accept_errors += 1
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._pause_accepting(now, exc)
                    return
                self._log["accept"].warning(now, "TCP accept on %s failed: %s", self._addr, exc)
                continue
            self._backoff = 0.0
            if len(self._conns) >= self.max_connections:
                sock.close()
                self.rejected_connections += 1
                self._log["full"].warning(
                    now, "TCP tunnel on %s: %d connections open, the limit: refused %s",
                    self._addr, len(self._conns), peer[0],
                )  # fmt: skip
                continue
            sock.setblocking(False)
            decoder = StreamDecoder(
                keys=self._keys,
                require_known=self._require_known,
                registered=self._registered,
                max_message=self.config.max_message,
            )
            conn = _Conn(sock, f"{peer[0]}:{peer[1]}", decoder, now)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self.connections += 1

    def _pause_accepting(self, now: float, exc: OSError) -> None:
        """Stop watching the listener for a while: it stays readable while accept fails."""
        assert self._sock is not None
        assert self._selector is not None
        self._backoff = min(_BACKOFF_MAX_S, max(_BACKOFF_FIRST_S, self._backoff * 2))
        self._paused_until = now + self._backoff
        self._selector.unregister(self._sock)
        self._log["accept"].warning(
            now, "TCP accept on %s failed: %s; accepting paused for %.2f s (%d connections open)",
            self._addr, exc, self._backoff, len(self._conns),
        )  # fmt: skip

    def _read(self, conn: _Conn, now: float, batch: _Round) -> None:
        try:
            data = conn.sock.recv(self.config.tcp_read_bytes)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        try:
            if data:
                conn.decoder.feed(data)
                while (raw := conn.decoder.next_raw()) is not NEED_DATA:
                    batch.messages.append(raw)
                    batch.size += len(raw)
                    conn.since = now
            else:
                conn.decoder.end_of_stream()
        except TunnelError as exc:
            batch.rejected.append((conn.decoder.current_collector, exc.reason))
            self.closed_invalid += 1
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            self._close(conn)
            return
        if not data:
            self._close(conn)

    def _sweep(self, now: float) -> None:
        """Close the connections that completed no message in ``tcp_idle_timeout_s``."""
        limit = self.config.tcp_idle_timeout_s
        for conn in [c for c in self._conns.values() if now - c.since >= limit]:
            self.closed_idle += 1
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):  # never registered, or closed
                self._selector.unregister(conn.sock)
        conn.sock.close()

    def _emit(self, batch: _Round) -> bool:
        """Hand over one round's messages (and rejections); waits while too many are in
        flight — time that does not count towards any connection's idle timeout. False when
        ``stop()`` came meanwhile."""
        started = time.monotonic()
        while not self._in_flight.acquire(timeout=self.config.poll_s):
            if self._stop.is_set():
                return False
        waited = time.monotonic() - started
        if waited > self.config.poll_s:  # the analyzer was behind, not the peers
            for conn in self._conns.values():
                conn.since += waited
        size = np.fromiter((len(m) for m in batch.messages), np.int64, len(batch.messages))
        offsets = np.zeros(size.size, np.int64)
        np.cumsum(size[:-1], out=offsets[1:])
        chunk = Chunk(
            np.frombuffer(bytearray().join(batch.messages), np.uint8),  # writable, as UDP's
            offsets,
            size,
            time.time(),
            "tcp",
            tuple(batch.rejected),
            _release=self._in_flight.release,
        )
        self.messages += size.size
        self.bytes += batch.size
        self._sink.put(chunk)
        return True
