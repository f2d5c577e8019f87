"""Where finished tunnel messages go: the ``Sender`` protocol, its counters, and UDP.

``UdpSender``: one datagram per message on a non-blocking connected socket; a message the
kernel refuses (no buffer, ICMP unreachable) is lost as ``send_error``. ``TcpSender``
(``collectors.tcp_sender``) queues and sends from a thread. Both count in ``SendCounters``,
which says what was sent, what was lost and why — in messages and in frames — what is still
waiting, and (TCP) the state of the connection.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Final, Protocol

from vspan.wire.tunnel import HEADER_LEN, MAX_UDP_MESSAGE

__all__ = ["DROP_REASONS", "LOSS_REASONS", "SendCounters", "Sender", "UdpSender", "frames_in"]

LOSS_REASONS: Final = ("queue_full", "send_error", "stopped")
"""Why a sender lost a whole message: its queue was full (the oldest went), the kernel refused
it, or it was still queued when the sender stopped."""
DROP_REASONS: Final = (*LOSS_REASONS, "truncated")
"""Keys of ``SendCounters.dropped``: messages for ``LOSS_REASONS``, frames for truncated."""
_COUNT_AT: Final = slice(20, 22)  # the header's ``count`` field


def frames_in(message: bytes) -> int:
    """Frames in an encoded tunnel message (its header's ``count``)."""
    return int.from_bytes(message[_COUNT_AT], "big")


@dataclass
class SendCounters:
    """What a sender did (monotonic, but for ``waiting`` and the connection's state)."""

    messages_sent: int = 0
    """Messages handed to the kernel whole."""
    frames_sent: int = 0
    """Frames in those messages."""
    bytes_sent: int = 0
    """Bytes of those messages."""
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    """Messages lost by reason (``LOSS_REASONS``), and frames cut to fit a message
    (``truncated``; they were still sent)."""
    frames_lost: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOSS_REASONS, 0))
    """Frames in the messages lost, by reason."""
    frames_dropped: int = 0
    """Frames in the messages lost (all reasons)."""
    waiting: int = 0
    """Frames handed to the sender and neither sent nor lost yet (TCP: queued or in flight)."""
    connects: int = 0
    """Successful connections (TCP)."""
    errors: int = 0
    """Failed connection or send attempts (TCP)."""
    state: str = ""
    """The connection (TCP): ``connecting`` (no connection yet, or lost: messages wait),
    ``connected`` or ``stopped``; empty for UDP, which has none."""
    failed_attempts: int = 0
    """Failed connection attempts since the last connection (TCP)."""
    last_error: str = ""
    """The last connection or send error (TCP), for people."""

    def lose(self, reason: str, frames: int) -> None:
        """Count one message of ``frames`` frames lost for ``reason`` (``LOSS_REASONS``)."""
        self.dropped[reason] += 1
        self.frames_lost[reason] += frames
        self.frames_dropped += frames


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
            self.counters.lose("send_error", frames_in(message))
            return
        c = self.counters
        c.messages_sent += 1
        c.frames_sent += frames_in(message)
        c.bytes_sent += len(message)
