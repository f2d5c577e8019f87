"""Tests of the UDP and TCP receivers (vspan.analysis.ingest.receivers) on real loopback sockets.

Messages are built with the codec (``encode_message`` / ``MessageBuilder``); what the
accounting must show is derived from what each test sent, and the reason of every bad
datagram from ``decode_message``.
"""

from __future__ import annotations

import queue
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest

from vspan.analysis.ingest.accounting import Accounting
from vspan.analysis.ingest.messages import ingest
from vspan.analysis.ingest.receivers import Chunk, ReceiverConfig, TcpReceiver, UdpReceiver
from vspan.errors import TunnelError
from vspan.wire.tunnel import decode_message, encode_message
from vspan.wire.tunnel_stream import MessageBuilder

KEY = bytes(range(16))
CONFIG = ReceiverConfig(buffer_bytes=1 << 20, poll_s=0.05)
LOCAL = ("127.0.0.1", 0)


def frames(r: random.Random, n: int) -> list[bytes]:
    return [r.randbytes(12) + b"\x89\x26" + r.randbytes(r.randint(4, 300)) for _ in range(n)]


def build(
    collector: int, boot: int, fs: list[bytes], *, key: bytes | None = None, max_message: int = 1400
) -> list[bytes]:
    builder = MessageBuilder(collector_id=collector, boot_id=boot, max_message=max_message, key=key)
    out = [m for i, f in enumerate(fs) if (m := builder.add(f, i)) is not None]
    last = builder.flush()
    return [*out, last] if last is not None else out


class Consumer:
    """What the engine does with chunks, minus flows: ingest, account, keep the frames."""

    def __init__(self, keys: Mapping[int, bytes] | None = None, require_known: bool = False):
        self.sink: queue.Queue[Chunk] = queue.Queue()
        self.acc = Accounting()
        self.frames: list[bytes] = []
        self.keys, self.require_known = keys, require_known
        self.chunks: list[Chunk] = []

    def pump(self, until: Callable[[], bool], timeout: float = 10.0, release: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out waiting for the receiver"
            try:
                chunk = self.sink.get(timeout=0.05)
            except queue.Empty:
                continue
            got = ingest(
                chunk.data,
                chunk.offsets,
                chunk.sizes,
                keys=self.keys,
                require_known=self.require_known,
            )
            accepted = self.acc.update(got, now=chunk.received_at, kernel_drops=chunk.kernel_drops)
            for cid, reason in chunk.rejected:
                self.acc.add_rejected(cid, reason, known=cid in (self.keys or {}))
            ingested = got.frames_of(accepted)
            self.frames += [ingested.frame(i) for i in range(len(ingested))]
            self.chunks.append(chunk)
            if release:
                chunk.release()

    def received(self) -> int:
        return self.acc.totals()["received"]

    def invalid(self) -> dict[tuple[int, str], int]:
        table = self.acc.invalid()
        return {(int(c), str(r)): int(n) for c, r, n in table.itertuples(index=False)}


@pytest.fixture
def udp() -> Iterator[tuple[UdpReceiver, Consumer, socket.socket]]:
    consumer = Consumer(keys={5: KEY})
    receiver = UdpReceiver(LOCAL, sink=consumer.sink, config=CONFIG)
    receiver.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.address)
    try:
        yield receiver, consumer, sender
    finally:
        sender.close()
        receiver.stop()


def send_paced(sock: socket.socket, datagrams: list[bytes], burst: int = 200) -> None:
    for i, d in enumerate(datagrams):
        sock.send(d)
        if i % burst == burst - 1:
            time.sleep(0.002)


def test_udp_every_frame_arrives(udp: tuple[UdpReceiver, Consumer, socket.socket]) -> None:
    receiver, consumer, sender = udp
    sent = frames(random.Random(1), 3000)
    messages = build(3, 77, sent)
    send_paced(sender, messages)
    consumer.pump(lambda: consumer.received() == len(messages))
    assert Counter(consumer.frames) == Counter(sent)
    stream = consumer.acc.stream(3, 77)
    assert stream is not None
    assert (stream.lost, stream.duplicates, stream.frames) == (0, 0, len(sent))
    assert receiver.datagrams == len(messages)
    assert receiver.backpressure_waits == 0
    assert receiver.rcvbuf > 0
    assert receiver.kernel_drops() == 0
    assert receiver.counters()["kernel_drops"] == 0
    assert receiver.counters()["datagrams"] == len(messages)


def test_udp_sender_restarted_with_a_new_boot_id(
    udp: tuple[UdpReceiver, Consumer, socket.socket],
) -> None:
    receiver, consumer, sender = udp
    r = random.Random(2)
    first, second = build(8, 1111, frames(r, 200)), build(8, 2222, frames(r, 100))
    send_paced(sender, first)
    consumer.pump(lambda: consumer.received() == len(first))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as restarted:  # a new process
        restarted.connect(receiver.address)
        send_paced(restarted, second)
        consumer.pump(lambda: consumer.received() == len(first) + len(second))
    col = consumer.acc.collector(8)
    assert col is not None
    assert (col.restarts, col.boot_id) == (1, 2222)
    for boot, sent in ((1111, first), (2222, second)):
        stream = consumer.acc.stream(8, boot)
        assert stream is not None
        assert (stream.received, stream.lost) == (len(sent), 0)


def expected_invalid(
    datagrams: list[bytes], keys: Mapping[int, bytes], require_known: bool = False
) -> Counter[tuple[int, str]]:
    """(collector or 0, reason) of every datagram ``decode_message`` rejects."""
    out: Counter[tuple[int, str]] = Counter()
    for d in datagrams:
        try:
            decode_message(d, keys=keys, require_known=require_known)
        except TunnelError as exc:
            readable = len(d) >= 24 and d[:3] == b"VS\x01"
            out[(int.from_bytes(d[8:12], "big") if readable else 0, exc.reason)] += 1
    return out


def test_udp_garbage_truncated_and_wrong_keys_are_counted_and_service_goes_on(
    udp: tuple[UdpReceiver, Consumer, socket.socket],
) -> None:
    _, consumer, sender = udp
    r = random.Random(3)
    good = build(5, 1, frames(r, 50), key=KEY) + build(6, 1, frames(r, 50))
    bad = [r.randbytes(r.randint(0, 200)) for _ in range(100)]
    bad += [m[: r.randrange(len(m))] for m in good[:20]]
    bad += build(5, 2, frames(r, 30), key=b"wrong key")
    bad += build(5, 3, frames(r, 30))  # a keyed collector without AUTH
    mixed = bad + good
    r.shuffle(mixed)
    send_paced(sender, mixed)
    want = expected_invalid(mixed, {5: KEY})
    assert sum(want.values()) == len(bad)
    consumer.pump(lambda: consumer.acc.totals()["invalid"] + consumer.received() == len(mixed))
    assert Counter(consumer.invalid()) == want
    assert consumer.received() == len(good)
    assert {reason for _, reason in want} >= {"bad_auth", "bad_length"}


def test_udp_flood_from_an_unknown_collector_with_require_known() -> None:
    consumer = Consumer(keys={5: KEY}, require_known=True)
    receiver = UdpReceiver(LOCAL, sink=consumer.sink, config=CONFIG)
    receiver.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.connect(receiver.address)
            flood = build(99, 1, frames(random.Random(4), 3000), max_message=300)
            good = build(5, 1, frames(random.Random(5), 100), key=KEY)
            send_paced(sender, flood + good)
            consumer.pump(lambda: consumer.acc.totals()["invalid"] == len(flood))
            consumer.pump(lambda: consumer.received() == len(good))
        # An unknown collector gets no counters of its own: its drops count under 0.
        assert consumer.invalid() == {(0, "unknown_collector"): len(flood)}
        assert consumer.acc.stream(99, 1) is None
        assert consumer.acc.collector(99) is None
    finally:
        receiver.stop()


def test_udp_backpressure_leaves_datagrams_in_the_kernel_and_loses_none() -> None:
    # Regression: with every chunk buffer held by a slow consumer, the receiver read
    # datagrams and dropped them (counted as network loss by the sequence accounting).
    consumer = Consumer()
    config = ReceiverConfig(buffer_bytes=1 << 18, buffers=1, poll_s=0.05)
    receiver = UdpReceiver(LOCAL, sink=consumer.sink, config=config)
    receiver.start()
    messages = build(4, 1, frames(random.Random(6), 200))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.connect(receiver.address)
            send_paced(sender, messages[:5])
            consumer.pump(lambda: consumer.received() == 5, release=False)  # hold the buffer
            send_paced(sender, messages[5:15])
            deadline = time.monotonic() + 5
            while receiver.backpressure_waits == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)  # the receiver must not read (and drop) meanwhile
            consumer.chunks[0].release()
            send_paced(sender, messages[15:18])
            consumer.pump(lambda: consumer.received() == 18)
        stream = consumer.acc.stream(4, 1)
        assert stream is not None
        assert (stream.lost, stream.kernel, stream.received) == (0, 0, 18)
        assert receiver.kernel_drops() == 0
    finally:
        receiver.stop()


def _proc_udp_drops(port: int) -> int:
    """The kernel's drop count of the UDP socket bound to ``port``, from /proc/net/udp."""
    with open("/proc/net/udp", encoding="ascii") as fh:
        for line in fh.readlines()[1:]:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == port:
                return int(cols[12])
    raise AssertionError(f"no UDP socket on port {port}")


def test_kernel_drops_are_charged_to_the_analyzer_not_to_the_network() -> None:
    # A slow consumer and a small socket buffer: the kernel drops datagrams. The gaps they
    # leave in the sequence must be counted as the analyzer's (kernel), not lost.
    consumer = Consumer()
    config = ReceiverConfig(rcvbuf=8192, buffer_bytes=1 << 18, buffers=1, poll_s=0.05)
    receiver = UdpReceiver(LOCAL, sink=consumer.sink, config=config)
    receiver.start()
    messages = build(4, 1, frames(random.Random(7), 800))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.connect(receiver.address)
            send_paced(sender, messages[:3])
            consumer.pump(lambda: consumer.received() == 3, release=False)  # hold the buffer
            send_paced(sender, messages[3:80])
            dropped = _proc_udp_drops(receiver.address[1])
            assert dropped > 0  # the test's premise: the socket buffer overflowed
            consumer.chunks[0].release()
            time.sleep(0.3)
            send_paced(sender, messages[80:85])
            consumer.pump(lambda: consumer.acc.totals()["received"] + dropped == 85)
        stream = consumer.acc.stream(4, 1)
        assert stream is not None
        assert (stream.kernel, stream.lost) == (dropped, 0)
        assert receiver.kernel_drops() == dropped == _proc_udp_drops(receiver.address[1])
    finally:
        receiver.stop()


def test_stop_returns_promptly_with_idle_peers() -> None:
    consumer = Consumer()
    udp = UdpReceiver(LOCAL, sink=consumer.sink, config=CONFIG)
    tcp = TcpReceiver(LOCAL, sink=consumer.sink, config=CONFIG)
    udp.start()
    tcp.start()
    with socket.create_connection(tcp.address) as idle:
        deadline = time.monotonic() + 5
        while tcp.connections == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        udp.stop()
        tcp.stop()
        assert time.monotonic() - started < 1.0
        assert idle.recv(10) == b""  # the server closed the stream


# --- TCP ---------------------------------------------------------------------------------


@pytest.fixture
def tcp() -> Iterator[tuple[TcpReceiver, Consumer]]:
    consumer = Consumer(keys={5: KEY})
    receiver = TcpReceiver(LOCAL, sink=consumer.sink, keys={5: KEY}, config=CONFIG)
    receiver.start()
    try:
        yield receiver, consumer
    finally:
        receiver.stop()


def send_split(sock: socket.socket, data: bytes, r: random.Random) -> None:
    pos = 0
    while pos < len(data):
        step = r.randint(1, 5000)
        sock.sendall(data[pos : pos + step])
        pos += step


def test_tcp_every_frame_arrives_whatever_the_segmentation(
    tcp: tuple[TcpReceiver, Consumer],
) -> None:
    receiver, consumer = tcp
    r = random.Random(7)
    sent = frames(r, 2000)
    messages = build(5, 9, sent, key=KEY, max_message=8900)
    with socket.create_connection(receiver.address) as conn:
        send_split(conn, b"".join(messages), r)
        consumer.pump(lambda: consumer.received() == len(messages))
    assert consumer.frames == sent  # one stream keeps the order
    stream = consumer.acc.stream(5, 9)
    assert stream is not None
    assert stream.lost == 0
    assert receiver.messages == len(messages)


@pytest.mark.parametrize(
    ("tail", "reason", "collector"),
    [
        (b"garbage that is no tunnel message", "bad_magic", 0),
        (encode_message(collector_id=5, boot_id=1, seq=0, frames=[], ts_ns=[]), "bad_auth", 5),
        (
            encode_message(collector_id=6, boot_id=1, seq=0, frames=[], ts_ns=[])[:-1],
            "bad_length",
            6,
        ),
    ],
    ids=["garbage", "keyed-collector-without-auth", "cut-by-eof"],
)
def test_tcp_invalid_message_closes_the_stream_after_counting_it(
    tcp: tuple[TcpReceiver, Consumer], tail: bytes, reason: str, collector: int
) -> None:
    receiver, consumer = tcp
    r = random.Random(8)
    good = build(6, 1, frames(r, 40))
    with socket.create_connection(receiver.address) as conn:
        conn.sendall(b"".join(good) + tail)
        if reason == "bad_length":
            conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5)
        assert conn.recv(10) == b""  # closed by the receiver
    consumer.pump(lambda: consumer.acc.totals()["invalid"] == 1)
    assert consumer.invalid() == {(collector, reason): 1}
    assert consumer.received() == len(good)
    assert (receiver.closed_invalid, receiver.rejected) == (1, {reason: 1})
    # The receiver keeps serving other streams.
    more = build(6, 2, frames(r, 10))
    with socket.create_connection(receiver.address) as conn:
        conn.sendall(b"".join(more))
        consumer.pump(lambda: consumer.received() == len(good) + len(more))


def test_tcp_chunks_in_flight_are_bounded(tcp: tuple[TcpReceiver, Consumer]) -> None:
    receiver, consumer = tcp
    messages = build(6, 1, frames(random.Random(9), 400))
    with socket.create_connection(receiver.address) as conn:
        for m in messages:  # one message per segment, so one chunk each
            conn.sendall(m)
            time.sleep(0.001)
        time.sleep(0.3)
        assert consumer.sink.qsize() <= CONFIG.buffers  # the connection waits, nothing lost
        consumer.pump(lambda: consumer.received() == len(messages))
    assert np.sum([c.sizes.size for c in consumer.chunks]) == len(messages)
