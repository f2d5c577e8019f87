"""Tests of vspan.collectors.forward.routes: a forwarder per session destination, over real sockets
on loopback (a TCP analyzer accepting the stream, UDP ones), each a tunnel stream of its own
with the collector's id and AUTH key."""

from __future__ import annotations

import socket
import threading

import numpy as np

from vspan.batch import FrameBatch
from vspan.collectors.forward.forwarder import ForwarderConfig, TcpSender, UdpSender
from vspan.collectors.forward.routes import Routes, make_sender
from vspan.collectors.mirror import tag_frames
from vspan.sessions import Destination
from vspan.wire.tunnel import Message, decode_message
from vspan.wire.tunnel_stream import NEED_DATA, StreamDecoder
from vspan.wire.vntag import encode_vntag_array

KEY = bytes(range(32))


def tagged(n: int, first: int = 0) -> FrameBatch:
    """``n`` tagged frames carrying their number ``first + i`` at the end."""
    plain = [
        b"\x02" * 12 + b"\x08\x00" + bytes(30) + (first + i).to_bytes(4, "big") for i in range(n)
    ]
    batch = FrameBatch.from_frames(plain, ts_ns=np.arange(n))
    words = encode_vntag_array(d=np.zeros(n, np.int64), svif=np.full(n, 5), dvif=np.zeros(n))
    return tag_frames(batch, np.arange(n), words, batch.caplen.astype(np.int64))


def numbers(messages: list[Message]) -> list[int]:
    return [int.from_bytes(m.frame(i)[-4:], "big") for m in messages for i in range(m.count)]


def test_senders_by_transport() -> None:
    udp = make_sender(Destination("10.0.0.5", 47470, "udp"), None)
    tcp = make_sender(Destination("10.0.0.5", 9000, "tcp"), 2000)
    assert isinstance(udp, UdpSender)
    assert (udp.addr, udp.max_message) == (("10.0.0.5", 47470), 1400)
    assert isinstance(tcp, TcpSender)
    assert (tcp.addr, tcp.max_message) == (("10.0.0.5", 9000), 2000)


def test_a_tcp_destination_gets_an_authenticated_stream_of_its_own() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(2)
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            while chunk := conn.recv(65536):
                received.extend(chunk)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    tcp_dest = Destination("127.0.0.1", listener.getsockname()[1], "tcp")
    config = ForwarderConfig(collector_id=9, key=KEY, max_message=300)
    routes = Routes(config, UdpSender(udp.getsockname()))
    routes.start()
    routes.sync([tcp_dest])
    routes.push(tcp_dest, tagged(10), 0.0)
    routes.push(None, tagged(3, first=100), 0.0)
    routes.flush_due(1.0)
    routes.stop()  # the TCP sender drains its queue, then closes
    server.join(10)
    listener.close()
    decoder = StreamDecoder(keys={9: KEY}, require_known=True)
    decoder.feed(bytes(received))
    over_tcp = []
    while (m := decoder.next_message()) is not NEED_DATA:
        assert isinstance(m, Message)
        over_tcp.append(m)
    over_udp = [decode_message(udp.recv(65535), keys={9: KEY}, require_known=True)]
    udp.close()
    assert numbers(over_tcp) == list(range(10))
    assert numbers(over_udp) == [100, 101, 102]
    assert all(m.authenticated and m.collector_id == 9 for m in over_tcp + over_udp)
    assert [m.seq for m in over_tcp] == list(range(len(over_tcp)))
    assert len(over_tcp) > 1  # 300-byte messages
    assert {m.boot_id for m in over_tcp}.isdisjoint({m.boot_id for m in over_udp})
    counts = routes.counters()[tcp_dest]
    assert (counts.sent.frames_sent, counts.sent.messages_sent) == (10, len(over_tcp))
    assert routes.forwarders == {}  # stopped, its counts kept
