"""The live analyzer on a quiet network: flows are visible while open, and end after the
idle timeout without another frame arriving (the analyzer's clock moves flow time on).

Frames are built here (VN-tagged UDP between two VMs of one host), so the test knows every
packet and byte it sent; the analyzer runs for real (UDP receiver, engine, store writer).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag

MAC_A, MAC_B = bytes.fromhex("020000000a01"), bytes.fromhex("020000000b01")


def udp_frame(payload: bytes, *, reply: bool = False) -> bytes:
    """A frame VM a (vif 1) → VM b (vif 2) on one host, or back with ``reply``."""
    src, dst = (MAC_B, MAC_A) if reply else (MAC_A, MAC_B)
    sip, dip = (
        (b"\x0a\x00\x00\x02", b"\x0a\x00\x00\x01")
        if reply
        else (b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
    )
    sport, dport = (53, 40000) if reply else (40000, 53)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0, 64, 17, 0, sip, dip)
    tag = VnTag(d=0, svif=2 if reply else 1, dvif=1 if reply else 2, ethertype=0x0800)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return dst + src + b"\x89\x26" + encode_vntag(tag) + ip + udp + payload


def wait_for(what: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_open_flow_is_visible_and_ends_after_the_idle_timeout_on_a_quiet_network(
    tmp_path: Path,
) -> None:
    # Regression: FlowTable.advance was never called live; a burst followed by silence left
    # its flow open (and invisible) for as long as no other frame arrived.
    config = AnalyzerConfig(
        udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"), idle_timeout=4.0
    )
    analyzer = Analyzer(config)
    analyzer.start()
    sent = {"fwd": (0, 0), "rev": (0, 0)}
    try:
        now_ns = time.time_ns()
        frames, ts = [], []
        for i in range(30):
            reply = i % 3 == 2
            frame = udp_frame(b"x" * (10 + i), reply=reply)
            frames.append(frame)
            ts.append(now_ns + i * 1_000_000)
            key = "rev" if reply else "fwd"
            sent[key] = (sent[key][0] + 1, sent[key][1] + len(frame))
        message = encode_message(collector_id=7, boot_id=1, seq=0, frames=frames, ts_ns=ts)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, analyzer.addresses()["udp"])
        started = time.monotonic()

        def shown() -> pd.DataFrame:
            return analyzer.store.query_flows(limit=None)

        wait_for(lambda: len(shown()) == 1)
        assert time.monotonic() - started < 3.5  # within the idle timeout: still open
        opened = shown().iloc[0]
        assert opened["state"] == "open"
        assert (opened["packets"], opened["bytes"]) == sent["fwd"]
        assert (opened["packets_rev"], opened["bytes_rev"]) == sent["rev"]
        assert analyzer.store.count("flows") == 0
        wait_for(lambda: analyzer.store.count("flows") == 1)  # no other frame was sent
        assert time.monotonic() - started >= 3.5  # not before the idle timeout
        flows = shown()
        assert flows["state"].tolist() == ["closed"]  # once: no longer in the open view
        row = flows.iloc[0]
        assert row["flow_uid"] == opened["flow_uid"]  # the same flow, open then closed
        assert (row["packets"], row["bytes"]) == sent["fwd"]
        assert (row["packets_rev"], row["bytes_rev"]) == sent["rev"]
        assert row["scope"] == "intra-host"
        assert analyzer.engine is not None
        assert analyzer.engine.open_flows == 0
    finally:
        analyzer.stop()
    assert analyzer.stored_flows() == 1


def test_a_frame_stamped_in_the_future_does_not_age_out_the_packet_ring(tmp_path: Path) -> None:
    # Regression: one datagram stamped in 2100 moved the capture clock a century on, and the
    # next maintenance round deleted every closed ring segment (segments_deleted{age}).
    config = AnalyzerConfig(
        udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"),
        ring_segment_bytes=64 << 10,
    )  # fmt: skip
    analyzer = Analyzer(config)
    analyzer.start()
    try:
        now_ns = time.time_ns()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for seq in range(40):  # about 160 kB of frames: a few closed segments
                frames = [udp_frame(b"y" * 1000) for _ in range(4)]
                ts = [now_ns + (seq * 4 + i) * 1000 for i in range(4)]
                sock.sendto(
                    encode_message(collector_id=7, boot_id=1, seq=seq, frames=frames, ts_ns=ts),
                    analyzer.addresses()["udp"],
                )
            wait_for(lambda: analyzer.ring.metrics().get("segments", 0) >= 3)
            future = [4_102_444_800 * 10**9]  # 2100-01-01
            sock.sendto(
                encode_message(
                    collector_id=8, boot_id=1, seq=0, frames=[udp_frame(b"z")], ts_ns=future
                ),
                analyzer.addresses()["udp"],
            )
            assert analyzer.engine is not None
            wait_for(lambda: analyzer.engine is not None and analyzer.engine.frames == 161)
        time.sleep(2.5)  # two maintenance rounds
        metrics = analyzer.ring.metrics()
        assert metrics.get("segments_deleted{age}", 0) == 0
        assert metrics["segments"] >= 3
    finally:
        analyzer.stop()


def test_a_flow_whose_start_moves_back_keeps_its_uid_from_open_to_stored(tmp_path: Path) -> None:
    # Regression: the flow_uid was made of the flow's first packet's time; a frame older than
    # the flow's start (another collector's copy, messages out of order) moved the start
    # back, so the stored record got another uid than the open row shown before it: the flow
    # was listed twice (open and closed), and a recovery after a kill stored it again.
    config = AnalyzerConfig(
        udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "data"), idle_timeout=4.0
    )
    analyzer = Analyzer(config)
    analyzer.start()
    try:
        t0 = time.time_ns()
        later = [udp_frame(b"y" * (10 + i)) for i in range(5)]
        earlier = udp_frame(b"z" * 9)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(
                encode_message(collector_id=7, boot_id=1, seq=0, frames=later,
                               ts_ns=[t0 + (100 + i) * 1_000_000 for i in range(5)]),
                analyzer.addresses()["udp"],
            )  # fmt: skip
            wait_for(lambda: len(analyzer.store.query_flows(limit=None)) == 1)
            opened = analyzer.store.query_flows(limit=None).iloc[0]
            assert opened["state"] == "open"
            assert opened["first_ns"] == t0 + 100_000_000
            sock.sendto(
                encode_message(collector_id=7, boot_id=1, seq=1, frames=[earlier], ts_ns=[t0]),
                analyzer.addresses()["udp"],
            )
        wait_for(lambda: analyzer.store.count("flows") == 1)
        flows = analyzer.store.query_flows(limit=None)
        assert flows["state"].tolist() == ["closed"]
        row = flows.iloc[0]
        assert row["first_ns"] == t0  # the older frame is the flow's first
        assert row["packets"] == 6
        assert row["bytes"] == sum(map(len, later)) + len(earlier)
        assert row["flow_uid"] == opened["flow_uid"]
    finally:
        analyzer.stop()
    assert analyzer.stored_flows() == 1
