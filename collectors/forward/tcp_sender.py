"""``TcpSender``: tunnel messages on a TCP stream, from a bounded queue drained by a thread.

The thread connects, reconnects with exponential backoff (capped), and sends. A full queue
drops its OLDEST messages (``queue_full``); a message whose send failed goes back to the head
of the queue and is sent whole on the next connection (the receiver discards the partial copy
it may have seen), so errors alone lose nothing. Messages still queued at ``stop`` after the
drain timeout are counted as ``stopped``.

Nothing fails silently: a connection that cannot be made is logged with the address and the
error — the first failure, then every ``log_every_n``-th or once a minute, with the count and
the frames waiting — and so is a connection lost, and the connection made after failures.
``counters`` say the state (``connecting``, ``connected``, ``stopped``), the failed attempts
since the last connection, the last error and the frames waiting.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from vspan.collectors._ratelog import RateLimitedLog
from vspan.collectors.forward.senders import SendCounters, frames_in

__all__ = ["TcpSender"]

log = logging.getLogger(__name__)


def _why(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the analyzer listening on TCP there?)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer (timed out)"
    return exc.strerror or str(exc) or type(exc).__name__


class TcpSender:
    """Messages on a TCP stream to ``addr``, from a bounded queue drained by a thread."""

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        max_message: int = 8900,
        max_queue_bytes: int = 4 << 20,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        timeout_s: float = 5.0,
        idle_check_s: float = 0.05,
        log_every_n: int = 100,
        log_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addr = addr
        self.max_message = max_message
        """Message size the forwarder aims at."""
        self.max_queue_bytes = max_queue_bytes
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.idle_check_s = idle_check_s
        self.clock = clock
        """The thread's clock, only to limit the rate of its log lines."""
        self.counters = SendCounters(state="connecting")
        self._connect_log = RateLimitedLog(log, every_n=log_every_n, every_s=log_every_s)
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def where(self) -> str:
        """``tcp://host:port``, for messages."""
        host, port = self.addr
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    @property
    def connected(self) -> bool:
        """Whether a connection is up now."""
        return self._sock is not None

    @property
    def queued(self) -> tuple[int, int]:
        """(messages, bytes) waiting."""
        with self._cond:
            return len(self._queue), self._queued_bytes

    def start(self) -> None:
        """Start the sending thread."""
        self._stopping.clear()
        self.counters.state = "connecting"
        self._thread = threading.Thread(target=self._run, name="vspan-tcp-sender", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout_s: float = 1.0) -> None:
        """Wait up to ``drain_timeout_s`` for the queue to empty, then stop the thread."""
        if self._thread is None:
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._queue, timeout=drain_timeout_s)
            self._stopping.set()
            self._cond.notify_all()
        self._thread.join()
        self._thread = None
        self._disconnect()
        with self._cond:
            while self._queue:
                self._drop(self._queue.popleft(), "stopped")
            self._queued_bytes = 0
            self.counters.state = "stopped"

    def send(self, message: bytes) -> None:
        """Queue ``message``; drop the oldest queued messages to stay within the bound."""
        with self._cond:
            self._queue.append(message)
            self._queued_bytes += len(message)
            self.counters.waiting += frames_in(message)
            self._trim()
            self._cond.notify_all()

    # --- the thread (counters change under the lock) -------------------------------------

    def _trim(self) -> None:
        while self._queued_bytes > self.max_queue_bytes and self._queue:
            oldest = self._queue.popleft()
            self._queued_bytes -= len(oldest)
            self._drop(oldest, "queue_full")

    def _drop(self, message: bytes, reason: str) -> None:
        frames = frames_in(message)
        self.counters.lose(reason, frames)
        self.counters.waiting -= frames

    def _run(self) -> None:
        backoff = self.backoff_initial_s
        while not self._stopping.is_set():
            if self._sock is None:
                if not self._connect():
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                    continue
                backoff = self.backoff_initial_s
            message = self._next_message()
            if message is None:
                continue
            sock = self._sock
            assert sock is not None
            try:
                sock.sendall(message)
            except OSError as exc:
                self._disconnect()
                with self._cond:
                    c = self.counters
                    c.errors += 1
                    c.state, c.last_error = "connecting", _why(exc)
                    self._queue.appendleft(message)  # resent whole after reconnecting
                    self._queued_bytes += len(message)
                    self._trim()
                    waiting = c.waiting
                log.warning("%s: connection lost (%s); reconnecting, %d frames waiting",
                            self.where, _why(exc), waiting)  # fmt: skip
                continue
            with self._cond:
                c = self.counters
                c.messages_sent += 1
                c.frames_sent += frames_in(message)
                c.bytes_sent += len(message)
                c.waiting -= frames_in(message)
                self._cond.notify_all()

    def _connect(self) -> bool:
        """One connection attempt: counted, and logged at a limited rate when it fails."""
        try:
            sock = socket.create_connection(self.addr, timeout=self.timeout_s)
        except OSError as exc:
            with self._cond:
                c = self.counters
                c.errors += 1
                c.failed_attempts += 1
                c.last_error = _why(exc)
                waiting = c.waiting
            self._connect_log.failure(
                self.clock(), "%s: cannot connect: %s; %d frames waiting (the queue keeps "
                "%d MiB at most, the oldest messages go first)", self.where, _why(exc),
                waiting, self.max_queue_bytes >> 20,
            )  # fmt: skip
            return False
        self._sock = sock
        with self._cond:
            c = self.counters
            c.connects += 1
            c.failed_attempts = 0
            c.state = "connected"
        self._connect_log.success("%s: connected", self.where)
        return True

    def _next_message(self) -> bytes | None:
        """The head of the queue, or None after ``idle_check_s`` (the peer is checked)."""
        with self._cond:
            if self._cond.wait_for(
                lambda: self._queue or self._stopping.is_set(), self.idle_check_s
            ):
                if self._queue:
                    message = self._queue.popleft()
                    self._queued_bytes -= len(message)
                    return message
                return None
        if self._peer_closed():
            self._disconnect()
            with self._cond:
                self.counters.state = "connecting"
                self.counters.last_error = "the analyzer closed the connection"
            log.warning("%s: the analyzer closed the connection; reconnecting", self.where)
        return None

    def _peer_closed(self) -> bool:
        """The analyzer never writes: a readable socket means EOF or reset."""
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        if not readable:
            return False
        try:
            return not self._sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
