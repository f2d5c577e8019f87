"""The collector end to end without root: a hypervisor's capture replayed through discovery,
mirroring and forwarding to a UDP socket on loopback, checked against the simulator's tags."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.collectors.agent import Collector, CollectorSettings
from vspan.collectors.forward import UdpSender
from vspan.collectors.replay import ReplaySource
from vspan.synth import generate_small
from vspan.tunnel import decode_message
from vspan_testing.hosts import host_capture


@pytest.fixture
def receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.settimeout(2.0)
    yield sock
    sock.close()


def _collect(tmp_path: Path, receiver: socket.socket, max_message: int | None
             ) -> tuple[FrameBatch, list[tuple[bytes, int]], Collector]:  # fmt: skip
    """Replay one simulated host through a collector; (what the host exported, what arrived
    as (frame, orig_len), the collector)."""
    cap = generate_small(seed=5)
    inventory = cap.inventory()
    host = inventory.hosts[0]
    expected = host_capture(cap, host.collector_id, tmp_path / "hv.pcap")
    source = ReplaySource(tmp_path / "hv.pcap", inventory, speed=None, host=host.name)
    collector = Collector(
        CollectorSettings(collector_id=host.collector_id, host=host.name, max_message=max_message),
        source=source, directory=source, sender=UdpSender(receiver.getsockname()),
    )  # fmt: skip
    collector.start(now=0.0)
    now = 0.0
    for _ in range(10_000):
        now += 0.001
        collector.step(now, poll_s=0.0)
        if source.finished and collector.forwarder.pending_frames == 0:
            break
    collector.stop()
    got: list[tuple[bytes, int]] = []
    seqs: list[int] = []
    while True:
        try:
            datagram = receiver.recv(65535)
        except TimeoutError:
            break
        message = decode_message(datagram)
        assert message.collector_id == host.collector_id
        seqs.append(message.seq)
        got.extend((message.frame(i), int(message.orig_len[i])) for i in range(message.count))
    assert seqs == list(range(len(seqs)))
    ports = sum(len(v.nics) for v in inventory.vms if v.host == host.name)
    assert collector.counters()["ports"] == ports
    return expected, got, collector


def test_replayed_host_traffic_arrives_tagged_exactly_as_the_rules_say(
    tmp_path: Path, receiver: socket.socket
) -> None:
    expected, got, collector = _collect(tmp_path, receiver, max_message=9000)
    # The collector re-derives every tag from ports and MACs; the simulator wrote them from
    # the mirroring rules. Same frames, same order, byte for byte.
    assert [frame for frame, _ in got] == [expected.frame(i) for i in range(len(expected))]
    assert collector.counters()["frames_sent"] == len(expected)
    assert "sent" in collector.stats_line()


def test_frames_too_large_for_a_1500_byte_path_are_truncated_not_split(
    tmp_path: Path, receiver: socket.socket
) -> None:
    expected, got, collector = _collect(tmp_path, receiver, max_message=None)
    room = 1400 - 24 - 12  # default message size less the header and one record
    assert len(got) == len(expected)
    for i, (frame, orig_len) in enumerate(got):
        want = expected.frame(i)
        assert frame == want[:room]
        assert orig_len == expected.origlen[i]
    cut = int(np.count_nonzero(expected.caplen > room))
    assert cut > 0
    assert collector.counters()["truncated"] == cut  # sent truncated, not dropped
    assert "truncated" not in collector.counters()["dropped"]


class _Control:
    """A control plane stand-in whose sessions the test changes."""

    def __init__(self) -> None:
        self.docs: list[dict[str, object]] = []
        self.registered = 0
        self.heartbeats: list[object] = []

    def register(self, host: str, ports: object) -> dict[str, object]:
        self.registered += 1
        return {"sessions": list(self.docs)}

    def sessions(self) -> list[dict[str, object]]:
        return list(self.docs)

    def heartbeat(self, body: dict[str, object]) -> None:
        # What the analyzer's control plane accepts (it rejects unknown fields).
        from vspan.api.models_control import HeartbeatIn

        self.heartbeats.append(HeartbeatIn.model_validate(body))


def test_sessions_created_on_the_analyzer_reach_the_collector(tmp_path: Path) -> None:
    cap = generate_small(seed=5)
    inventory = cap.inventory()
    host = inventory.hosts[0]
    host_capture(cap, host.collector_id, tmp_path / "hv.pcap")
    source = ReplaySource(tmp_path / "hv.pcap", inventory, speed=None, host=host.name)
    control = _Control()
    collector = Collector(
        CollectorSettings(collector_id=host.collector_id, host=host.name, refresh_interval_s=1),
        source=source, directory=source, sender=UdpSender(("127.0.0.1", 9)),
        control=control,  # type: ignore[arg-type]
    )  # fmt: skip
    collector.start(now=0.0)
    assert control.registered == 1
    assert collector.mirror.selection.tx.all()  # no sessions: everything is mirrored
    one = next(p for p in source.ports())
    control.docs = [{"name": "one", "vms": [one.vm_name], "direction": "tx"}]
    collector.step(now=0.5, poll_s=0.0)  # before the refresh interval: unchanged
    assert collector.mirror.selection.tx.all()
    collector.step(now=1.5, poll_s=0.0)
    tx = collector.mirror.selection.tx
    assert tx[one.vif]
    assert int(tx.sum()) == 1
    control.docs = []  # deleted on the analyzer: back to mirroring everything
    collector.step(now=3.0, poll_s=0.0)
    assert collector.mirror.selection.tx.all()
    assert control.registered == 1  # the ports did not change: no new registration
    assert control.heartbeats  # sent, and valid for the control plane
    collector.stop()


def test_boot_ids_are_the_start_second_and_increase_across_restarts(
    tmp_path: Path, receiver: socket.socket
) -> None:
    """The analyzer refuses a keyed collector's boot older than its current one (a replay):
    so a collector's boot_id is the time of its start in quarter seconds, and a restart
    within the same quarter second still takes a larger one."""
    cap = generate_small(seed=5)
    inventory = cap.inventory()
    host = inventory.hosts[0]
    host_capture(cap, host.collector_id, tmp_path / "hv.pcap")
    source = ReplaySource(tmp_path / "hv.pcap", inventory, speed=None, host=host.name)
    collector = Collector(
        CollectorSettings(collector_id=host.collector_id, host=host.name),
        source=source, directory=source, sender=UdpSender(receiver.getsockname()),
        wall=lambda: 1_700_000_123.9,
    )  # fmt: skip
    boots = []
    for _ in range(2):
        collector.start(now=0.0)
        collector.step(0.001, poll_s=0.0)
        collector.stop()
        boots.append(collector.forwarder.boot_id)
    seen = set()
    while True:
        try:
            seen.add(decode_message(receiver.recv(65535)).boot_id)
        except TimeoutError:
            break
    quarters = 6_800_000_495 % 2**32  # 1,700,000,123.9 s
    assert boots == [quarters, quarters + 1]
    assert seen <= set(boots)
    assert quarters in seen
