"""Tests of the live flow engine (vspan.analysis.service.engine) and ``FlowTable.evict``.

The reference for flows is ``vspan report``'s pipeline over a capture file
(``analyze_captures``): the same synthetic frames, sent as tunnel messages through a real
UDP receiver into the engine, must give the same flows with the same packets and bytes.
"""

from __future__ import annotations

import queue
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.flows.endpoints import EndpointResolver
from vspan.analysis.flows.table import FlowTable
from vspan.analysis.ingest.accounting import AccountingConfig
from vspan.analysis.ingest.receivers import Chunk, ReceiverConfig, TcpReceiver, UdpReceiver
from vspan.analysis.records.build import HostNames, flow_records
from vspan.analysis.report import analyze_captures
from vspan.analysis.service.engine import Engine, EngineConfig, warm_batch
from vspan.batch import FrameBatch
from vspan.synth import SynthCapture, generate_small, write_capture
from vspan.wire.tunnel import encode_message
from vspan.wire.tunnel_stream import MessageBuilder
from vspan.wire.vntag import VnTag, encode_vntag
from vspan_testing.decoded import decoded

KEY_COLUMNS = ["src_ip", "dst_ip", "src_port", "dst_port", "proto", "icmp_id", "first_ns"]
COUNTS = ["packets", "bytes", "packets_rev", "bytes_rev"]


def tunnel_messages(capture: SynthCapture, max_message: int = 8900) -> list[bytes]:
    """The capture's frames as each host's collector would send them, in time order."""
    batch = capture.frames
    builders = {
        h.collector_id: MessageBuilder(
            collector_id=h.collector_id, boot_id=42, max_message=max_message
        )
        for h in capture.hosts
    }
    out = []
    host, ts, orig = batch.host_column(), batch.ts_ns, batch.origlen
    for i in range(len(batch)):
        done = builders[int(host[i])].add(batch.frame(i), int(ts[i]), int(orig[i]))
        if done is not None:
            out.append(done)
    out += [m for b in builders.values() if (m := b.flush()) is not None]
    return out


def by_key(records: pd.DataFrame) -> pd.DataFrame:
    return records[KEY_COLUMNS + COUNTS].astype(str).sort_values(KEY_COLUMNS, ignore_index=True)


def chunk_of(datagrams: list[bytes]) -> Chunk:
    sizes = np.array([len(d) for d in datagrams], np.int64)
    offsets = np.zeros(sizes.size, np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    data = np.frombuffer(b"".join(datagrams), np.uint8).copy()
    return Chunk(data, offsets, sizes, 0.0, "udp")


def test_udp_receiver_into_engine_gives_the_flows_of_the_capture_file(tmp_path: Path) -> None:
    capture = generate_small(seed=3)
    inventory = capture.inventory()
    path = tmp_path / "small.pcapng"
    write_capture(capture, path)
    report = analyze_captures([path], inventory=inventory)

    sink: queue.Queue[Chunk] = queue.Queue()
    engine = Engine(source=sink, inventory=lambda: inventory)
    receiver = UdpReceiver(("127.0.0.1", 0), sink=sink, config=ReceiverConfig(poll_s=0.05))
    receiver.start()
    engine.start()
    messages = tunnel_messages(capture)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.connect(receiver.address)
            for i, m in enumerate(messages):
                sender.send(m)
                if i % 100 == 99:
                    time.sleep(0.002)
        deadline = time.monotonic() + 20
        while engine.frames < len(capture.frames):
            assert time.monotonic() < deadline, (engine.frames, engine.counters())
            time.sleep(0.01)
    finally:
        receiver.stop()
        engine.stop()
    assert engine.accounting.totals()["lost"] == 0
    assert engine.messages == len(messages)
    assert engine.errors == 0
    flows = engine.drain()
    records = flow_records(flows, inventory=inventory, hosts=HostNames.from_inventory(inventory))
    assert len(report.flows) > 30
    pd.testing.assert_frame_equal(by_key(records), by_key(report.flows))
    assert engine.flows_finished == len(report.flows)
    assert engine.open_flows == 0


def test_bounded_flow_table_evicts_and_loses_no_packet() -> None:
    capture = generate_small(seed=4)
    batch = capture.frames
    unbounded = Engine()
    bounded = Engine(EngineConfig(max_flows=8, evict_to=0.5))
    for lo in range(0, len(batch), 250):
        rows = np.arange(lo, min(lo + 250, len(batch)))
        part = FrameBatch.from_frames(
            [batch.frame(int(i)) for i in rows],
            ts_ns=batch.ts_ns[rows],
            origlen=batch.origlen[rows],
            host=batch.host_column()[rows],
        )
        for engine in (unbounded, bounded):
            engine.process(part)
        assert bounded.open_flows <= 8
    assert bounded.evicted > 0
    assert unbounded.evicted == 0
    totals = []
    for engine in (unbounded, bounded):
        engine.flush()
        flows = engine.drain()
        totals.append(flows[COUNTS].sum().tolist())
        assert engine.flows_finished == len(flows)
    assert totals[0] == totals[1]  # evicted flows are finished, never dropped
    assert bounded.flows_finished > unbounded.flows_finished


def test_flow_table_evict_finishes_the_least_recently_seen() -> None:
    n = 10
    dec = decoded(
        n, ts_ns=np.arange(n)[::-1] * 1000, src_port=np.arange(1000, 1000 + n), dst_port=80
    )
    dec = dec.take(np.arange(n))
    table = FlowTable()
    table.update(dec, EndpointResolver().resolve(dec))
    assert table.open_flows == n
    assert len(table.evict(0)) == 0
    gone = table.evict(3)
    # Frame i was seen at (n - 1 - i) µs: the three oldest are the last three ports.
    assert sorted(gone["last_ns"].tolist()) == [0, 1000, 2000]
    assert table.open_flows == n - 3
    assert len(table.evict(100)) == n - 3
    assert table.open_flows == 0


def test_undecodable_frames_and_invalid_messages_are_counted() -> None:
    tagged = bytes(12) + b"\x89\x26" + bytes(4)  # ends right after the VN-Tag
    ipv4 = bytes(12) + b"\x89\x26" + bytes(4) + b"\x08\x00" + b"\x45\x00"  # cut inside IPv4
    good = encode_message(collector_id=2, boot_id=1, seq=0, frames=[tagged, ipv4], ts_ns=[1, 2])
    chunk = chunk_of([good, b"junk"])
    engine = Engine()
    engine.process_chunk(chunk, now=12.5)
    assert engine.frames == 2
    assert engine.decoded == 0
    assert engine.undecodable == {"truncated at TAG": 1, "truncated at IP": 1}
    assert engine.accounting.invalid().to_dict("records") == [
        {"collector_id": 0, "reason": "bad_length", "messages": 1}
    ]
    col = engine.accounting.collector(2)
    assert col is not None
    assert col.last_seen == 12.5
    assert engine.counters()["undecodable_truncated at IP"] == 1


def test_on_flows_receives_finished_flows() -> None:
    got: list[pd.DataFrame] = []
    engine = Engine(on_flows=got.append)
    capture = generate_small(seed=5)
    engine.process(capture.frames)
    engine.flush()
    assert sum(len(df) for df in got) == engine.flows_finished > 0
    assert len(engine.drain()) == 0


def test_undrained_flows_are_bounded_and_counted() -> None:
    engine = Engine(EngineConfig(max_flows=5, evict_to=0.0, max_pending_flows=10))
    engine.process(generate_small(seed=6).frames)
    engine.flush()
    kept = len(engine.drain())
    assert kept == 10
    assert engine.dropped_flows > 0
    assert kept + engine.dropped_flows == engine.flows_finished


def test_a_failing_chunk_is_counted_released_and_the_engine_goes_on() -> None:
    sink: queue.Queue[Chunk] = queue.Queue()
    engine = Engine(source=sink)
    released: list[str] = []
    broken = Chunk(
        np.zeros(4, np.uint8),
        np.array([0]),
        np.array([99]),  # outside the buffer: a bug upstream
        0.0,
        "udp",
        _release=lambda: released.append("broken"),
    )
    engine.start()
    sink.put(broken)
    msg = encode_message(
        collector_id=3, boot_id=1, seq=0, frames=[bytes(12) + b"\x89\x26" + bytes(40)], ts_ns=[5]
    )
    sink.put(chunk_of([msg]))
    engine.stop()
    assert released == ["broken"]
    assert engine.errors == 1
    assert engine.messages == 1


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_flows 0 must be >= 1"):
        EngineConfig(max_flows=0)
    with pytest.raises(RuntimeError, match="needs a source queue"):
        Engine().start()


def test_the_warm_up_frame_decodes_into_a_flow_and_leaves_the_engine_untouched() -> None:
    # warm_up must exercise the whole compiled path: its frame has to be a usable flow.
    batch = warm_batch()
    engine = Engine()
    engine.process(batch)
    engine.flush()
    flows = engine.drain()
    assert (engine.decoded, len(flows)) == (1, 1)
    assert flows[["proto", "port_a", "port_b"]].to_numpy().tolist() == [[17, 8080, 53]]
    fresh = Engine(source=queue.Queue())
    fresh.start()
    fresh.stop()
    assert (fresh.frames, fresh.flows_finished) == (0, 0)


# --- replays: an authenticated message is ingested once -----------------------------------

KEY = bytes(range(16))


def tagged_udp(sport: int, n: int, *, svif: int = 3) -> list[bytes]:
    """``n`` VN-tagged IPv4/UDP frames of one flow 10.0.0.1:sport -> 10.0.0.2:53."""
    out = []
    for i in range(n):
        payload = bytes([i]) * 20
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), i, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
        udp = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0)
        tag = encode_vntag(VnTag(d=0, svif=svif, dvif=4, ethertype=0x0800))
        out.append(b"\x02" + bytes(4) + b"\x02" + b"\x02" + bytes(4) + b"\x01" + b"\x89\x26"
                   + tag + ip + udp + payload)  # fmt: skip
    return out


def keyed_message(boot: int, seq: int, frames: list[bytes]) -> bytes:
    return encode_message(collector_id=7, boot_id=boot, seq=seq, frames=frames,
                          ts_ns=[1_700_000_000_000_000_000 + i for i in range(len(frames))],
                          key=KEY)  # fmt: skip


class Live:
    """A real receiver (UDP or TCP) feeding a started ``Engine``."""

    def __init__(self, transport: str, config: EngineConfig) -> None:
        self.sink: queue.Queue[Chunk] = queue.Queue()
        self.engine = Engine(config, source=self.sink)
        rcfg = ReceiverConfig(poll_s=0.05)
        self.transport = transport
        self.receiver: UdpReceiver | TcpReceiver = (
            UdpReceiver(("127.0.0.1", 0), sink=self.sink, config=rcfg)
            if transport == "udp"
            else TcpReceiver(("127.0.0.1", 0), sink=self.sink, keys=config.keys, config=rcfg)
        )

    def __enter__(self) -> Live:
        self.engine.start()
        self.receiver.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.stop()
        self.engine.stop()

    def seen(self) -> int:
        """Valid messages accounted for (those of refused old boots included)."""
        totals = self.engine.accounting.totals()
        return totals["received"] + totals.get("stale_boot", 0)

    def send(self, messages: list[bytes], connections: int = 1) -> None:
        """Send ``messages`` (over TCP split across ``connections``), then wait until the
        accounting has seen them all."""
        before = self.seen()
        if self.transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for m in messages:
                    sock.sendto(m, self.receiver.address)
        else:
            socks = [socket.create_connection(self.receiver.address) for _ in range(connections)]
            for i, m in enumerate(messages):
                socks[i % connections].sendall(m)
            for s in socks:
                s.close()
        deadline = time.monotonic() + 10
        while self.seen() < before + len(messages):
            assert time.monotonic() < deadline, self.engine.counters()
            time.sleep(0.01)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_an_authenticated_message_sent_51_times_is_counted_once_in_the_flows(
    transport: str,
) -> None:
    message = keyed_message(1000, 0, tagged_udp(40000, 3))
    with Live(transport, EngineConfig(keys={7: KEY})) as live:
        live.send([message] * 51, connections=3)
    engine = live.engine
    flows = engine.drain()
    assert len(flows) == 1
    assert int((flows["packets"] + flows["packets_rev"]).sum()) == 3  # not 153
    stream = engine.accounting.stream(7, 1000)
    assert stream is not None
    assert (stream.received, stream.duplicates, stream.frames) == (51, 50, 3)
    assert (engine.messages, engine.frames) == (1, 3)
    assert engine.counters()["dropped_duplicate"] == 50


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_replayed_old_boot_of_an_authenticated_collector_is_dropped(transport: str) -> None:
    old = keyed_message(1000, 0, tagged_udp(40000, 2))
    new = keyed_message(2000, 0, tagged_udp(40001, 1))
    config = EngineConfig(keys={7: KEY}, accounting=AccountingConfig(boot_grace_s=0.0))
    with Live(transport, config) as live:
        live.send([old])
        live.send([new])  # the collector restarted
        live.send([old] * 5)  # a capture of its previous boot, replayed
    engine = live.engine
    flows = engine.drain()
    total = flows["packets"] + flows["packets_rev"]
    assert dict(zip(flows["port_a"].tolist(), total.tolist(), strict=True)) == {
        40000: 2,  # the old boot's message once
        40001: 1,
    }
    assert (engine.messages, engine.frames) == (2, 3)
    assert engine.counters()["dropped_stale_boot"] == 5
    col = engine.accounting.collector(7)
    assert col is not None
    assert (col.boot_id, col.restarts, col.stale_boot) == (2000, 1, 5)
