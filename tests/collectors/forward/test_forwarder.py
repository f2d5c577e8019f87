"""Tests of vspan.collectors.forward.forwarder with real sockets on 127.0.0.1.

UDP: every message arrives, ``seq`` consecutive from 0, AUTH verifies with the key. TCP:
the receiver goes away and comes back; the sender reconnects, its queue bound holds and the
``queue_full`` counter is exactly the number of messages that could not be kept.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.collectors.forward.forwarder import (
    Forwarder,
    ForwarderConfig,
    SendCounters,
    TcpSender,
    UdpSender,
    boot_id_at,
)
from vspan.errors import TunnelError
from vspan.wire.tunnel import HEADER_LEN, RECORD_LEN, Message, decode_message, encode_message
from vspan.wire.tunnel_stream import NEED_DATA, StreamDecoder

KEY = b"k" * 32
LOOPBACK = "127.0.0.1"


def tagged(size: int, fill: int) -> bytes:
    body = bytes((fill * 7 + i) % 256 for i in range(size))
    return body[:12] + b"\x89\x26" + body[14:]


def batch(sizes: list[int], first: int = 0) -> FrameBatch:
    frames = [tagged(size, first + i) for i, size in enumerate(sizes)]
    return FrameBatch.from_frames(frames, ts_ns=np.arange(first, first + len(sizes)) * 1000)


def wait_until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


class TcpReceiver:
    """Accepts connections on 127.0.0.1 and decodes the messages of each stream."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, port))
        self.listener.listen()
        self.listener.settimeout(0.02)
        self.port = self.listener.getsockname()[1]
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoders: dict[socket.socket, StreamDecoder] = {}
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
                conn.settimeout(0.01)
                self._conns.append(conn)
                decoders[conn] = StreamDecoder()
            except (TimeoutError, OSError):
                pass
            for conn, decoder in list(decoders.items()):
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    del decoders[conn]
                    continue
                if not data:
                    del decoders[conn]
                    continue
                decoder.feed(data)
                while (message := decoder.next_message()) is not NEED_DATA:
                    assert isinstance(message, Message)
                    self.messages.append(message)

    def stop(self) -> None:
        self.listener.close()  # first: no new connection can sneak in
        self._stop.set()
        self._thread.join()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def test_udp_every_message_arrives_in_sequence_with_auth(udp_socket: socket.socket) -> None:
    sender = UdpSender(udp_socket.getsockname())
    forwarder = Forwarder(ForwarderConfig(collector_id=3, key=KEY), sender, rng=random.Random(42))
    forwarder.start()
    sizes = [60 + (i * 37) % 140 for i in range(300)]
    frames = batch(sizes)
    try:
        forwarder.push(frames, now=10.0)
        capacity = 1400 - HEADER_LEN - 16
        assert forwarder.pending_frames > 0
        assert sum(RECORD_LEN + s for s in sizes[-forwarder.pending_frames :]) <= capacity
        assert not forwarder.flush_due(10.019)
        assert forwarder.flush_due(10.020)
        forwarder.flush()
        assert not forwarder.flush_due(99.0)
    finally:
        forwarder.stop()
    received = []
    while sum(m.count for m in received) < len(sizes):
        datagram = udp_socket.recv(65536)
        assert len(datagram) <= 1400
        received.append(decode_message(datagram, keys={3: KEY}))
    assert all(m.authenticated for m in received)
    assert [m.seq for m in received] == list(range(len(received)))
    assert {m.boot_id for m in received} == {random.Random(42).getrandbits(32)}
    got = [m.frame(i) for m in received for i in range(m.count)]
    assert got == [frames.frame(i) for i in range(len(frames))]
    assert sender.counters.messages_sent == len(received)
    assert sender.counters.frames_sent == len(sizes)
    with pytest.raises(TunnelError, match="bad_auth"):
        decode_message(sender_message(received[0]), keys={3: b"wrong"})


def sender_message(message: Message) -> bytes:
    """Re-encode a received message's bytes (for the wrong-key check)."""
    frames = [message.frame(i) for i in range(message.count)]
    return encode_message(
        collector_id=message.collector_id,
        boot_id=message.boot_id,
        seq=message.seq,
        frames=frames,
        ts_ns=message.ts_ns,
        orig_len=message.orig_len,
        key=KEY,
    )


def test_udp_refused_datagrams_are_send_errors() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind((LOOPBACK, 0))
    addr = closed.getsockname()
    closed.close()
    sender = UdpSender(addr)
    forwarder = Forwarder(ForwarderConfig(collector_id=1), sender, rng=random.Random(0))
    forwarder.start()
    try:
        for i in range(4):
            forwarder.push(batch([100], i), now=float(i))
            forwarder.flush()
    finally:
        forwarder.stop()
    c = sender.counters
    assert c.dropped["send_error"] >= 1  # ICMP port unreachable is reported on a later send
    assert c.messages_sent + c.dropped["send_error"] == 4
    assert c.frames_dropped == c.dropped["send_error"]


def test_forwarder_keeps_less_than_a_message_and_counts_truncation() -> None:
    class Collect:
        def __init__(self) -> None:
            self.counters = SendCounters()
            self.sent: list[bytes] = []

        def start(self) -> None: ...
        def stop(self) -> None: ...
        def send(self, message: bytes) -> None:
            self.sent.append(message)

    sink = Collect()
    forwarder = Forwarder(
        ForwarderConfig(collector_id=9, max_message=500), sink, rng=random.Random(7)
    )
    forwarder.start()
    forwarder.push(batch([]), now=0.0)
    assert not forwarder.flush_due(1.0)
    for i in range(50):
        forwarder.push(batch([40, 90], 2 * i), now=0.001 * i)
        assert 0 < forwarder.pending_bytes <= 500 - HEADER_LEN
    assert not forwarder.flush_due(0.019)
    assert forwarder.flush_due(0.020)  # 20 ms after the first frame that waited
    forwarder.push(batch([2000], 500), now=1.0)
    forwarder.stop()
    decoded = [decode_message(m) for m in sink.sent]
    assert [m.seq for m in decoded] == list(range(len(decoded)))
    assert sum(m.count for m in decoded) == 101
    assert sink.counters.dropped["truncated"] == 1
    assert int(decoded[-1].orig_len[-1]) == 2000


def test_tcp_reconnects_and_the_queue_bound_holds() -> None:
    rx = TcpReceiver()
    message_size = HEADER_LEN + RECORD_LEN + 100
    sender = TcpSender(
        (LOOPBACK, rx.port),
        max_queue_bytes=10 * message_size,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        idle_check_s=0.01,
    )
    forwarder = Forwarder(ForwarderConfig(collector_id=7), sender, rng=random.Random(1))
    forwarder.start()
    rx2 = None
    try:

        def send(i: int) -> None:
            forwarder.push(batch([100], i), now=float(i))
            forwarder.flush()

        for i in range(5):
            send(i)
        wait_until(lambda: len(rx.messages) == 5)
        wait_until(lambda: sender.connected)
        rx.stop()
        wait_until(lambda: not sender.connected)  # EOF seen while idle
        for i in range(5, 30):
            send(i)
        assert sender.queued == (10, 10 * message_size)
        assert sender.counters.dropped["queue_full"] == 15
        assert sender.counters.frames_dropped == 15
        wait_until(lambda: sender.counters.errors >= 1)  # it tried the absent receiver
        rx2 = TcpReceiver(rx.port)
        wait_until(lambda: len(rx2.messages) == 10)
        assert [m.seq for m in rx.messages] == [0, 1, 2, 3, 4]
        assert [m.seq for m in rx2.messages] == list(range(20, 30))  # the newest were kept
        assert [m.frame(0) for m in rx2.messages] == [tagged(100, i) for i in range(20, 30)]
        c = sender.counters
        assert (c.connects, c.messages_sent, c.frames_sent) == (2, 15, 15)
        assert c.bytes_sent == 15 * message_size
        assert c.errors >= 1  # refused connection attempts while the receiver was away
        assert c.failed_attempts == 0  # reset by the reconnection
        assert sender.queued == (0, 0)
    finally:
        forwarder.stop()
        if rx2 is not None:
            rx2.stop()
    assert sender.counters.dropped["stopped"] == 0


def test_tcp_stop_counts_what_was_never_sent() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind((LOOPBACK, 0))
    addr = closed.getsockname()
    closed.close()
    sender = TcpSender(addr, backoff_initial_s=0.01, backoff_max_s=0.02)
    sender.start()
    for _ in range(3):
        sender.send(b"x" * 40)
    sender.stop(drain_timeout_s=0.05)
    assert sender.counters.dropped["stopped"] == 3
    assert sender.queued == (0, 0)
    sender.stop()  # idempotent


def test_udp_sender_checks_its_size() -> None:
    with pytest.raises(ValueError, match="max_message 70000 out of range"):
        UdpSender((LOOPBACK, 1), max_message=70000)
    with pytest.raises(RuntimeError, match="before start"):
        UdpSender((LOOPBACK, 1)).send(b"x")


def test_boot_id_at_counts_quarter_seconds_modulo_2_32_after_the_previous_boot() -> None:
    now = 1_700_000_123.9  # 6,800,000,495 quarter seconds: 2,505,033,199 modulo 2^32
    assert boot_id_at(now) == 6_800_000_495 - 2**32
    assert boot_id_at(now + 0.25) == boot_id_at(now) + 1
    assert boot_id_at(now, after=boot_id_at(now) - 1000) == boot_id_at(now)
    assert boot_id_at(now, after=boot_id_at(now)) == boot_id_at(now) + 1  # same quarter
    assert boot_id_at(now - 60, after=boot_id_at(now)) == boot_id_at(now) + 1  # clock back
    assert boot_id_at(0.75, after=2**32 - 1) == 3  # after the wrap, 3 is newer
    assert boot_id_at(float(2**30), after=2**32 - 1) == 0  # 2^32 quarters wrap to 0


def test_tcp_that_cannot_connect_says_so_and_counts_what_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens: the first failure is logged with the address and the reason, later
    ones at a limited rate; the counters say ``connecting``, the attempts and the frames
    waiting; the connection made once the analyzer listens is logged, with the count."""
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind((LOOPBACK, 0))
    port = closed.getsockname()[1]
    closed.close()
    sender = TcpSender((LOOPBACK, port), backoff_initial_s=0.005, backoff_max_s=0.01,
                       idle_check_s=0.01, log_every_n=1000, log_every_s=3600.0)  # fmt: skip
    forwarder = Forwarder(ForwarderConfig(collector_id=7), sender, rng=random.Random(1))
    caplog.set_level("WARNING", logger="vspan.collectors.forward.tcp_sender")
    forwarder.start()
    rx = None
    try:
        for i in range(3):
            forwarder.push(batch([100, 100], 2 * i), now=float(i))
            forwarder.flush()
        wait_until(lambda: sender.counters.failed_attempts >= 5)
        c = sender.counters
        assert (c.state, c.messages_sent, c.waiting) == ("connecting", 0, 6)
        assert c.last_error == "connection refused (is the analyzer listening on TCP there?)"
        assert c.frames_lost == dict.fromkeys(("queue_full", "send_error", "stopped"), 0)
        lines = [r.getMessage() for r in caplog.records]
        assert re.fullmatch(  # waiting: 0 to 6, as the first attempt came before or after
            rf"tcp://127\.0\.0\.1:{port}: cannot connect: connection refused \(is the analyzer "
            r"listening on TCP there\?\); [0246] frames waiting \(the queue keeps 4 MiB at "
            r"most, the oldest messages go first\)",
            lines[0],
        ), lines
        assert len(lines) == 1  # the next failures wait for the 1,000th or an hour
        rx = TcpReceiver(port)
        wait_until(lambda: len(rx.messages) == 3)
        wait_until(lambda: sender.counters.waiting == 0)
        assert (sender.counters.state, sender.counters.failed_attempts) == ("connected", 0)
        last = caplog.records[-1].getMessage()
        assert last.startswith(f"tcp://127.0.0.1:{port}: connected (after ")
        assert last.endswith(" failed attempts)")
    finally:
        forwarder.stop()
        if rx is not None:
            rx.stop()
    assert sender.counters.state == "stopped"
