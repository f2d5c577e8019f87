"""``TcpReceiver``: TCP streams of tunnel messages in, chunks out; a thread per connection.

Part of ``analysis.receivers`` (import it from there; its docstring describes both
receivers). Each connection feeds a ``StreamDecoder`` and re-packs the whole valid messages
it yields into a ``Chunk``; ``_emit`` bounds the chunks in flight (``ReceiverConfig.buffers``)
by waiting, never by dropping.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Mapping

import numpy as np

from vspan.analysis._receivers_common import Address, Chunk, ReceiverBase, ReceiverConfig
from vspan.errors import TunnelError
from vspan.tunnel import MAGIC, VERSION
from vspan.tunnel_stream import NEED_DATA, StreamDecoder

__all__ = ["TcpReceiver"]

log = logging.getLogger("vspan.analysis.receivers")
"""The logger of ``analysis.receivers``, which this module is part of."""


def _collector_of(data: bytes | bytearray) -> int:
    """``collector_id`` of a message's header when it is readable, else 0."""
    if len(data) < 12:
        return 0
    magic, version = int.from_bytes(data[0:2], "big"), data[2]
    if magic != MAGIC or version != VERSION:
        return 0
    return int.from_bytes(data[8:12], "big")


class TcpReceiver(ReceiverBase):
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
