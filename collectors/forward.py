"""Forwarding: tagged frames → tunnel messages → the analyzer, over UDP or TCP.

``Forwarder`` holds the tunnel identity (``collector_id``, the ``boot_id`` of this start,
``seq``) and the frames waiting for a message: whole messages leave as soon as
they are full, the rest when ``flush_due(now)`` says the oldest waited ``flush_interval_s``
(20 ms). ``now`` is always an argument: the outer loop passes ``time.monotonic()``.

Senders never block the capture loop:

- ``UdpSender``: one datagram per message on a non-blocking connected socket; a message
  the kernel refuses (no buffer, ICMP unreachable) is dropped as ``send_error``.
- ``TcpSender``: a bounded queue (in bytes) drained by a thread that connects, reconnects
  with exponential backoff (capped), and sends. A full queue drops its OLDEST messages
  (``queue_full``); a message whose send failed goes back to the head of the queue and is
  sent whole on the next connection (the receiver discards the partial copy it may have
  seen), so errors alone lose nothing. Messages still queued at ``stop`` after the drain
  timeout are counted as ``stopped``.

``boot_id``: a collector takes the time of its start in quarter seconds since the Unix epoch
(``boot_id_at``), so that its boots increase (modulo 2^32 in serial-number order, like seqs:
any two starts less than 17 years apart compare right): the analyzer refuses, from a
collector with a key, a boot older than its current one as a replay of captured traffic
(``docs/tunnel.md``). Starting a collector process takes longer than a quarter second, so two
starts do not share a value; a clock set back by more than the time between two starts makes
the analyzer refuse the new boot until the clock has caught up (counted as ``stale_boot``).

Memory is bounded when the analyzer is down: the forwarder keeps less than one message of
frames, the TCP queue ``max_queue_bytes``, UDP nothing.
"""

from __future__ import annotations

import random
import select
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np

from vspan.batch import FrameBatch
from vspan.tunnel import HEADER_LEN, MAX_UDP_MESSAGE, RECORD_LEN
from vspan.tunnel_batch import concat_batches, encode_batch, plan_messages, slice_batch

__all__ = [
    "BOOT_TICKS_PER_S",
    "DROP_REASONS",
    "Forwarder",
    "ForwarderConfig",
    "SendCounters",
    "Sender",
    "TcpSender",
    "UdpSender",
    "boot_id_at",
]

DROP_REASONS: Final = ("queue_full", "send_error", "stopped", "truncated")
"""Keys of ``SendCounters.dropped``: messages for the first three, frames for truncated."""
_COUNT_AT: Final = slice(20, 22)  # the header's ``count`` field


def _frames_in(message: bytes) -> int:
    return int.from_bytes(message[_COUNT_AT], "big")


@dataclass
class SendCounters:
    """What a sender did (monotonic)."""

    messages_sent: int = 0
    """Messages handed to the kernel whole."""
    frames_sent: int = 0
    """Frames in those messages."""
    bytes_sent: int = 0
    """Bytes of those messages."""
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    """Messages lost by reason (``queue_full``, ``send_error``, ``stopped``), and frames cut
    to fit a message (``truncated``; they were still sent)."""
    frames_dropped: int = 0
    """Frames in the messages lost."""
    connects: int = 0
    """Successful connections (TCP)."""
    errors: int = 0
    """Failed connection or send attempts (TCP)."""


class Sender(Protocol):
    """Where a ``Forwarder`` puts finished messages."""

    counters: SendCounters
    max_message: int

    def start(self) -> None:
        """Open sockets, start threads."""
        ...

    def stop(self) -> None:
        """Release everything; idempotent."""
        ...

    def send(self, message: bytes) -> None:
        """Send or queue one message; never blocks for long, never raises for I/O."""
        ...


class UdpSender:
    """One datagram per message, to ``addr`` (host, port)."""

    def __init__(self, addr: tuple[str, int], *, max_message: int = 1400) -> None:
        if not HEADER_LEN < max_message <= MAX_UDP_MESSAGE:
            raise ValueError(f"max_message {max_message} out of range 25..{MAX_UDP_MESSAGE}")
        self.addr = addr
        self.max_message = max_message
        """Message size the forwarder aims at (1,400 fits a 1,500-byte path)."""
        self.counters = SendCounters()
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Open a non-blocking socket connected to ``addr``."""
        family, kind, proto, _, sockaddr = socket.getaddrinfo(*self.addr, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.connect(sockaddr)
        self._sock = sock

    def stop(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, message: bytes) -> None:
        """Send one datagram; a refusal is counted as ``send_error``."""
        if self._sock is None:
            raise RuntimeError("UdpSender.send before start()")
        try:
            self._sock.send(message)
        except OSError:
            self.counters.dropped["send_error"] += 1
            self.counters.frames_dropped += _frames_in(message)
            return
        c = self.counters
        c.messages_sent += 1
        c.frames_sent += _frames_in(message)
        c.bytes_sent += len(message)


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
    ) -> None:
        self.addr = addr
        self.max_message = max_message
        """Message size the forwarder aims at."""
        self.max_queue_bytes = max_queue_bytes
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.idle_check_s = idle_check_s
        self.counters = SendCounters()
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

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

    def send(self, message: bytes) -> None:
        """Queue ``message``; drop the oldest queued messages to stay within the bound."""
        with self._cond:
            self._queue.append(message)
            self._queued_bytes += len(message)
            self._trim()
            self._cond.notify_all()

    # --- the thread ---------------------------------------------------------------------

    def _trim(self) -> None:
        while self._queued_bytes > self.max_queue_bytes and self._queue:
            oldest = self._queue.popleft()
            self._queued_bytes -= len(oldest)
            self._drop(oldest, "queue_full")

    def _drop(self, message: bytes, reason: str) -> None:
        self.counters.dropped[reason] += 1
        self.counters.frames_dropped += _frames_in(message)

    def _run(self) -> None:
        backoff = self.backoff_initial_s
        while not self._stopping.is_set():
            if self._sock is None:
                try:
                    self._sock = socket.create_connection(self.addr, timeout=self.timeout_s)
                except OSError:
                    with self._cond:
                        self.counters.errors += 1
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max_s)
                    continue
                backoff = self.backoff_initial_s
                with self._cond:
                    self.counters.connects += 1
            message = self._next_message()
            if message is None:
                continue
            try:
                self._sock.sendall(message)
            except OSError:
                self._disconnect()
                with self._cond:
                    self.counters.errors += 1
                    self._queue.appendleft(message)  # resent whole after reconnecting
                    self._queued_bytes += len(message)
                    self._trim()
                continue
            with self._cond:
                c = self.counters
                c.messages_sent += 1
                c.frames_sent += _frames_in(message)
                c.bytes_sent += len(message)
                self._cond.notify_all()

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


# --- the forwarder --------------------------------------------------------------------


BOOT_TICKS_PER_S: Final = 4
"""``boot_id`` counts quarter seconds since the Unix epoch (modulo 2^32)."""


def boot_id_at(wall_s: float, *, after: int | None = None) -> int:
    """The ``boot_id`` of a start at Unix time ``wall_s``: its quarter seconds modulo 2^32 —
    or, when ``after`` (this process's previous boot) is not older, the one after ``after``."""
    boot = int(wall_s * BOOT_TICKS_PER_S) % (1 << 32)
    if after is not None and not 0 < (boot - after) % (1 << 32) < 1 << 31:
        boot = (after + 1) % (1 << 32)
    return boot


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    """Settings of a ``Forwarder``."""

    collector_id: int
    """This collector's id in the tunnel (1..2^32-1)."""
    max_message: int | None = None
    """Largest message in bytes; None takes the sender's (``UdpSender``: 1,400, which fits
    a 1,500-byte path; 8,900 suits a jumbo-frame underlay)."""
    key: bytes | None = None
    """AUTH key (keyed BLAKE2b); None sends without AUTH."""
    flush_interval_s: float = 0.020
    """Longest a frame waits for its message to fill."""


class Forwarder:
    """Packs tagged frames into messages and hands them to a ``Sender``."""

    def __init__(
        self, config: ForwarderConfig, sender: Sender, *, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.sender = sender
        self._rng = rng
        self.boot_id = 0
        """Set at ``start``; a new value tells the analyzer the sequence restarted."""
        self.next_seq = 0
        """``seq`` of the next message."""
        self.max_message = config.max_message or sender.max_message
        """Largest message sent."""
        self._pending: FrameBatch | None = None
        self._since = 0.0

    @property
    def pending_frames(self) -> int:
        """Frames waiting for a message."""
        return 0 if self._pending is None else len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Record and frame bytes waiting (less than one message's room after ``push``)."""
        if self._pending is None:
            return 0
        return int(self._pending.caplen.sum(dtype=np.int64)) + RECORD_LEN * len(self._pending)

    def start(self, *, boot_id: int | None = None) -> None:
        """Take ``boot_id`` (a collector passes ``boot_id_at`` of the wall clock; None draws
        a random one from ``rng``), restart ``seq`` at 0, start the sender."""
        if boot_id is None:
            rng = self._rng if self._rng is not None else random.Random()
            boot_id = rng.getrandbits(32)
        if not 0 <= boot_id < 1 << 32:
            raise ValueError(f"boot_id {boot_id} out of range 0..{(1 << 32) - 1}")
        self.boot_id, self.next_seq = boot_id, 0
        self.sender.start()

    def stop(self) -> None:
        """Send what is pending, stop the sender."""
        self.flush()
        self.sender.stop()

    def push(self, frames: FrameBatch, now: float) -> None:
        """Add tagged frames; send every message they complete, keep the rest pending."""
        if len(frames) == 0:
            return
        if self._pending is None:
            self._pending, self._since = frames, now
        else:
            self._pending = concat_batches(self._pending, frames)
        auth = self.config.key is not None
        plan = plan_messages(self._pending.caplen, max_message=self.max_message, auth=auth)
        if plan.messages > 1:  # all but the last are full
            cut = int(plan.bounds[-2])
            self._send(slice_batch(self._pending, 0, cut))
            self._pending = slice_batch(self._pending, cut, len(self._pending))

    def flush_due(self, now: float) -> bool:
        """Whether pending frames have waited ``flush_interval_s`` or more at ``now``."""
        return self._pending is not None and now >= self._since + self.config.flush_interval_s

    def flush(self) -> None:
        """Send every pending frame now."""
        if self._pending is not None:
            self._send(self._pending)
            self._pending = None

    def _send(self, frames: FrameBatch) -> None:
        cfg = self.config
        plan = plan_messages(frames.caplen, max_message=self.max_message, auth=cfg.key is not None)
        messages, self.next_seq = encode_batch(
            frames,
            collector_id=cfg.collector_id,
            boot_id=self.boot_id,
            first_seq=self.next_seq,
            max_message=self.max_message,
            key=cfg.key,
        )
        self.sender.counters.dropped["truncated"] += plan.truncated
        for message in messages:
            self.sender.send(message)
