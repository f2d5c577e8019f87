"""The collector end to end without root: a hypervisor's capture replayed through discovery,
mirroring and forwarding to a UDP socket on loopback, checked against the simulator's tags;
and SPAN sessions doing what their fields say — frames given to the collector as port batches
(the frames the test built are the truth), tunnel messages read back from loopback sockets
standing for two analyzers: no selected VM sends nothing while sessions exist anywhere, a
filter keeps what it accepts, a destination gets its session's frames on a stream of its own."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.collectors.agent import Collector, CollectorSettings
from vspan.collectors.capture.replay import ReplaySource
from vspan.collectors.forward.forwarder import SendCounters, Sender, UdpSender
from vspan.collectors.forward.routes import make_sender
from vspan.collectors.model import CaptureCounters, PortBatch
from vspan.inventory import Port
from vspan.sessions import Destination, SessionSet
from vspan.synth import generate_small
from vspan.wire.tunnel import Message, decode_message
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
    assert set(collector.counters()["lost"].values()) == {0}  # nothing lost


class _Control:
    """A control plane stand-in whose sessions the test changes."""

    def __init__(self) -> None:
        self.docs: list[dict[str, object]] = []
        self.total: int | None = None
        """Sessions on the analyzer for all hosts; None: an analyzer that does not say."""
        self.registered = 0
        self.heartbeats: list[object] = []

    def _state(self) -> dict[str, object]:
        state: dict[str, object] = {"sessions": list(self.docs)}
        if self.total is not None:
            state["sessions_total"] = self.total
        return state

    def register(self, host: str, ports: object) -> dict[str, object]:
        self.registered += 1
        return self._state()

    def session_state(self) -> dict[str, object]:
        return self._state()

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
    assert collector.mirror.selection[0].tx.all()  # no sessions: everything is mirrored
    one = next(p for p in source.ports())
    control.docs = [{"name": "one", "vms": [one.vm_name], "direction": "tx"}]
    collector.step(now=0.5, poll_s=0.0)  # before the refresh interval: unchanged
    assert collector.mirror.selection[0].tx.all()
    collector.step(now=1.5, poll_s=0.0)
    tx = collector.mirror.selection[0].tx
    assert tx[one.vif]
    assert int(tx.sum()) == 1
    control.docs = []  # deleted on the analyzer: back to mirroring everything
    collector.step(now=3.0, poll_s=0.0)
    assert collector.mirror.selection[0].tx.all()
    assert control.registered == 1  # the ports did not change: no new registration
    assert control.heartbeats  # sent, and valid for the control plane
    collector.stop()


# --- sessions doing what their fields say -------------------------------------------------

WEB, DB, APP = 0x020000000005, 0x020000000009, 0x02000000000C
OUT = 0x02AA00000001  # outside the host
PORTS = [
    Port("vnet0", 10, 5, WEB, "web-01", profile="web"),
    Port("vnet1", 11, 9, DB, "db-01", profile="db"),
    Port("vnet2", 12, 12, APP, "app-01", profile="app"),
]
VIF = {WEB: 5, DB: 9, APP: 12}


def udp(dst: int, src: int, dport: int, mark: int) -> bytes:
    """An Ethernet/IPv4/UDP frame carrying ``mark`` (the test's ground truth)."""
    ip = bytes.fromhex("450000200000400040110000") + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    l4 = struct.pack("!HHHH", 40000, dport, 12, 0) + mark.to_bytes(4, "big")
    return dst.to_bytes(6, "big") + src.to_bytes(6, "big") + b"\x08\x00" + ip + l4


class Frames:
    """A capture source that hands out the batches the test queues (frames the VMs sent)."""

    def __init__(self) -> None:
        self.counters = CaptureCounters()
        self.queue: list[PortBatch] = []
        self.here = list(PORTS)
        """The ports discovery finds now."""

    def send(self, *frames: tuple[int, int, int, int]) -> None:
        """Queue frames (dst MAC, src MAC, UDP port, mark), each captured at its sender."""
        data = [udp(*f) for f in frames]
        batch = FrameBatch.from_frames(data, ts_ns=np.arange(len(data)))
        vifs = np.array([VIF[src] for _, src, _, _ in frames], np.uint16)
        self.queue.append(PortBatch(batch, vifs, np.ones(len(data), np.bool_)))
        self.counters.frames += len(data)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def poll(self, timeout_s: float) -> PortBatch | None:
        return self.queue.pop(0) if self.queue else None

    def ports(self) -> list[Port]:
        return list(self.here)


class Analyzer:
    """A UDP socket on loopback standing for an analyzer: the messages that reached it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr: tuple[str, int] = self.sock.getsockname()
        self.messages: list[Message] = []

    def read(self) -> Analyzer:
        """Take every datagram that arrived."""
        while True:
            try:
                self.messages.append(decode_message(self.sock.recv(65535)))
            except TimeoutError:
                return self

    def marks(self) -> list[int]:
        return [
            int.from_bytes(m.frame(i)[-4:], "big") for m in self.messages for i in range(m.count)
        ]

    def streams(self) -> dict[tuple[int, int], list[int]]:
        """(collector_id, boot_id) → the seqs received."""
        out: dict[tuple[int, int], list[int]] = {}
        for m in self.messages:
            out.setdefault((m.collector_id, m.boot_id), []).append(m.seq)
        return out


STARTED: list[Collector] = []


@pytest.fixture
def analyzers() -> Iterator[tuple[Analyzer, Analyzer]]:
    """Two analyzers; the collectors the test started are stopped after it, whatever
    happened."""
    a, b = Analyzer(), Analyzer()
    yield a, b
    while STARTED:
        STARTED.pop().stop()
    a.sock.close()
    b.sock.close()


def collector(
    a: Analyzer, *, sessions: str = "", control: _Control | None = None, **kw: Any
) -> tuple[Collector, Frames]:
    source = Frames()
    settings = CollectorSettings(
        collector_id=7, host="hv07", refresh_interval_s=1,
        analyzer=Destination(*a.addr), **kw,
    )  # fmt: skip
    c = Collector(
        settings, source=source, directory=source, sender=UdpSender(a.addr),
        sessions=SessionSet.loads_yaml(sessions) if sessions else None,
        control=control,  # type: ignore[arg-type]
    )  # fmt: skip
    c.start(now=0.0)
    STARTED.append(c)
    return c, source


def run(c: Collector, now: float) -> None:
    """Two steps at ``now``: export what is queued, then flush it."""
    c.step(now, poll_s=0.0)
    c.step(now + 1, poll_s=0.0)


def test_while_sessions_exist_a_host_without_selected_vms_sends_nothing(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    """The analyzer has a session, for another host: this host sends nothing (heartbeats
    go on); once the last session is deleted, everything again."""
    a, _ = analyzers
    control = _Control()
    control.total = 1
    c, frames = collector(a, control=control)
    frames.send((OUT, WEB, 53, 1), (DB, APP, 53, 2))
    run(c, 0.1)
    assert a.read().marks() == []
    counts = c.counters()
    assert (counts["exported"], counts["not_mirrored"]["unselected"]) == (0, 2)
    assert control.heartbeats
    line = "hv07: SPAN sessions here: none (1 on the analyzer); 0 of 3 VM ports selected"
    assert c.sessions_line() == line
    control.total = 0  # deleted on the analyzer
    version = c.selection_version
    c.step(2.5, poll_s=0.0)  # the refresh asks again
    assert c.selection_version > version
    assert c.sessions_line() == "hv07: no SPAN session: every VM port mirrored (3)"
    frames.send((OUT, WEB, 53, 3), (DB, APP, 53, 4))
    run(c, 3.0)
    assert a.read().marks() == [3, 4]


def test_an_analyzer_that_sends_sessions_without_a_total_still_selects(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    a, _ = analyzers
    control = _Control()
    control.docs = [{"name": "db", "vms": ["db-01"], "direction": "tx"}]
    c, frames = collector(a, control=control)
    frames.send((OUT, WEB, 53, 1), (OUT, DB, 53, 2))
    run(c, 0.1)
    assert (a.read().marks(), c.sessions_total) == ([2], 1)


def test_configured_sessions_select_without_a_control_plane(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    a, _ = analyzers
    c, frames = collector(a, sessions="sessions:\n  - {name: s, vms: [nobody]}\n")
    frames.send((OUT, WEB, 53, 1), (DB, APP, 53, 2))
    run(c, 0.1)
    assert a.read().marks() == []
    assert c.counters()["not_mirrored"]["unselected"] == 2


def test_a_filter_keeps_only_the_frames_it_accepts(analyzers: tuple[Analyzer, Analyzer]) -> None:
    a, _ = analyzers
    c, frames = collector(
        a, sessions='sessions:\n  - {name: s, vms: ["*"], filter: "udp port 9999"}\n'
    )
    frames.send((OUT, WEB, 9999, 1), (OUT, WEB, 53, 2), (DB, APP, 9999, 3), (DB, APP, 9998, 4))
    run(c, 0.1)
    assert a.read().marks() == [1, 3]
    assert c.counters()["not_mirrored"]["filtered"] == 2


ROUTED = """\
sessions:
  - {name: web, vms: [web-01], direction: tx}
  - name: db
    vms: [db-01]
    filter: udp port 9999
    destination: "udp://127.0.0.1:%d"
"""


def test_a_destination_gets_its_sessions_frames_on_a_stream_of_its_own(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    """web-01's frames go to the collector's analyzer A; db-01's (filtered) to B only; a
    frame both sessions select to both. Each analyzer sees one stream from seq 0, no gap."""
    a, b = analyzers
    c, frames = collector(a, sessions=ROUTED % b.addr[1], max_message=200)
    assert c.sessions_line() == (
        f"hv07: SPAN sessions here: web, db -> udp://127.0.0.1:{b.addr[1]} (0 on the "
        "analyzer); 2 of 3 VM ports selected"
    )
    sent = [
        (OUT, WEB, 53, 1),  # web: A
        (OUT, DB, 9999, 2),  # db, accepted: B
        (DB, WEB, 9999, 3),  # web's tx and db's rx: A and B
        (OUT, DB, 53, 4),  # db, filtered out: nowhere
        (OUT, APP, 9999, 5),  # nobody's: nowhere
    ]
    frames.send(*sent * 3)  # several messages each (200 bytes: two frames a message)
    run(c, 0.1)
    assert a.read().marks() == [1, 3] * 3
    assert b.read().marks() == [2, 3] * 3
    (a_stream, a_seqs), (b_stream, b_seqs) = (*a.streams().items(), *b.streams().items())
    assert a_stream[0] == b_stream[0] == 7  # the collector's id on both
    assert a_stream[1] != b_stream[1]  # a boot_id each
    assert a_seqs == list(range(len(a_seqs)))
    assert b_seqs == list(range(len(b_seqs)))
    assert min(len(a_seqs), len(b_seqs)) > 1
    counts = c.counters()
    assert (counts["exported"], counts["frames_sent"]) == (9, 6)
    assert counts["not_mirrored"]["filtered"] == 3
    assert counts["not_mirrored"]["unselected"] == 3
    to_b = counts["destinations"][f"udp://127.0.0.1:{b.addr[1]}"]
    assert (to_b["exported"], to_b["frames_sent"], to_b["messages_sent"]) == (6, 6, len(b_seqs))
    lines = c.destination_lines()
    assert lines == [f"hv07 -> udp://127.0.0.1:{b.addr[1]}: exported 6, sent 6 in "
                     f"{len(b_seqs)} messages, waiting 0, truncated 0, lost: none"]  # fmt: skip


def test_a_destination_naming_the_collectors_analyzer_is_its_stream(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    a, _ = analyzers
    c, frames = collector(a, sessions=ROUTED % a.addr[1])
    frames.send((OUT, WEB, 53, 1), (OUT, DB, 9999, 2))
    run(c, 0.1)
    assert a.read().marks() == [1, 2]
    assert len(a.streams()) == 1
    assert c.counters()["destinations"] == {}


def test_destinations_follow_the_sessions_pushed_and_keep_their_counts(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    a, b = analyzers
    control = _Control()
    dest = f"udp://127.0.0.1:{b.addr[1]}"
    elsewhere = {"name": "elsewhere", "vms": ["nowhere"], "destination": "tcp://127.0.0.1:9"}
    control.docs = [{"name": "db", "vms": ["db-01"], "destination": dest}, elsewhere]
    c, frames = collector(a, control=control)
    frames.send((OUT, DB, 1, 1), (OUT, WEB, 1, 2))
    run(c, 0.1)
    assert (a.read().marks(), b.read().marks()) == ([], [1])
    assert [d.url for d in c.routes.forwarders] == [dest]  # none where no VM here goes
    control.docs = [{"name": "web", "vms": ["web-01"]}]  # the db session went
    c.step(2.5, poll_s=0.0)
    assert c.routes.forwarders == {}
    frames.send((OUT, DB, 1, 3), (OUT, WEB, 1, 4))
    run(c, 3.0)
    assert (a.read().marks(), b.read().marks()) == ([4], [1])
    assert c.counters()["destinations"][dest]["frames_sent"] == 1  # kept after it stopped
    control.docs = [{"name": "db", "vms": ["db-01"], "destination": dest}]  # back
    c.step(5.5, poll_s=0.0)
    frames.send((OUT, DB, 1, 5))
    run(c, 6.0)
    assert b.read().marks() == [1, 5]
    assert len(b.streams()) == 2  # a new stream (boot_id), from seq 0
    assert all(seqs == list(range(len(seqs))) for seqs in b.streams().values())
    assert c.counters()["destinations"][dest]["frames_sent"] == 2


class _Refused:
    """A sender whose socket cannot be opened (a destination name that does not resolve)."""

    max_message = 1400

    def __init__(self) -> None:
        self.counters = SendCounters()

    def start(self) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    def stop(self) -> None: ...

    def send(self, message: bytes) -> None:
        raise AssertionError("never started")


def test_a_destination_that_cannot_be_opened_counts_its_frames_and_is_retried(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    a, b = analyzers
    refuse = [True]

    def senders(destination: Destination, max_message: int | None) -> Sender:
        return _Refused() if refuse[0] else make_sender(destination, max_message)

    source = Frames()
    c = Collector(
        CollectorSettings(collector_id=7, host="hv07", refresh_interval_s=1),
        source=source, directory=source, sender=UdpSender(a.addr), senders=senders,
        sessions=SessionSet.loads_yaml(ROUTED % b.addr[1]),
    )  # fmt: skip
    c.start(now=0.0)
    STARTED.append(c)
    source.send((OUT, DB, 9999, 1), (OUT, WEB, 1, 2))
    run(c, 0.1)
    dest = f"udp://127.0.0.1:{b.addr[1]}"
    assert c.counters()["destinations"][dest]["lost"]["unsent"] == 1
    assert c.routes.start_errors >= 1
    refuse[0] = False
    c.step(2.5, poll_s=0.0)  # the refresh retries it
    source.send((OUT, DB, 9999, 3))
    run(c, 3.0)
    assert (a.read().marks(), b.read().marks()) == ([2], [3])
    assert c.counters()["destinations"][dest]["lost"]["unsent"] == 1


def test_a_vm_migrating_onto_the_host_is_selected_at_the_next_refresh(
    analyzers: tuple[Analyzer, Analyzer],
) -> None:
    """A session selects web-01, which is not on this host: nothing is sent. web-01 arrives
    (a live migration: discovery finds its port): its frames are mirrored from the refresh."""
    a, _ = analyzers
    source = Frames()
    source.here = PORTS[1:]
    c = Collector(
        CollectorSettings(collector_id=7, host="hv07", refresh_interval_s=1),
        source=source, directory=source, sender=UdpSender(a.addr),
        sessions=SessionSet.loads_yaml("sessions:\n  - {name: web, vms: [web-01]}\n"),
    )  # fmt: skip
    c.start(now=0.0)
    STARTED.append(c)
    source.send((OUT, DB, 1, 1), (DB, APP, 1, 2))
    run(c, 0.1)
    assert a.read().marks() == []
    source.here = list(PORTS)  # web-01 migrated here
    c.step(2.5, poll_s=0.0)
    source.send((OUT, WEB, 1, 3), (OUT, DB, 1, 4), (WEB, DB, 1, 5))
    run(c, 3.0)
    assert a.read().marks() == [3, 5]


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


# --- VM MACs learned from traffic reach the control plane ----------------------------------


class _Recording(_Control):
    """A control plane that keeps the ports of every registration."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[list[Port]] = []

    def register(self, host: str, ports: object) -> dict[str, object]:
        assert isinstance(ports, list)
        self.ports.append(list(ports))
        return super().register(host, ports)


class _Bridge:
    """A Linux bridge's ports as discovery finds them: no VM MAC (taps, unnamed netns)."""

    def ports(self) -> list[Port]:
        return [Port("tap0", 10, 0, 0, "tap0", bridge="br0"),
                Port("tap1", 11, 0, 0, "tap1", bridge="br0")]  # fmt: skip


def test_a_vm_mac_learned_from_traffic_is_registered_and_a_flapping_one_is_bounded(
    tmp_path: Path, analyzers: tuple[Analyzer, Analyzer], caplog: pytest.LogCaptureFixture
) -> None:
    """tap0's VM sends from WEB: at the next refresh the control plane is told, once. tap1's
    VM then sends from a new MAC every second for 10 minutes: its MAC changes at most once a
    minute, and so do the registrations (on main the learned MAC never reached the control
    plane: the collector's own view already had it at the refresh)."""
    from vspan.collectors.discovery.ports import Discovery
    from vspan.collectors.discovery.vifs import VifTable

    a, _ = analyzers
    source = Frames()
    disco = Discovery(_Bridge(), VifTable(tmp_path))
    control = _Recording()
    c = Collector(
        CollectorSettings(collector_id=7, host="hv07", refresh_interval_s=1),
        source=source, directory=disco, sender=UdpSender(a.addr),
        control=control, refresh=disco.refresh,
    )  # fmt: skip
    c.start(now=0.0)
    STARTED.append(c)
    vif = {p.name: p.vif for p in disco.ports()}
    assert [[p.mac for p in ports] for ports in control.ports] == [[0, 0]]

    def sent(port: str, *srcs: int) -> None:
        data = [udp(OUT, src, 53, i) for i, src in enumerate(srcs)]
        batch = FrameBatch.from_frames(data, ts_ns=np.arange(len(data)))
        n = len(data)
        source.queue.append(PortBatch(batch, np.full(n, vif[port], np.uint16), np.ones(n, bool)))

    caplog.set_level(logging.INFO, "vspan.collectors.discovery")
    sent("tap0", WEB, WEB)
    c.step(0.1, poll_s=0.0)
    assert {p.name: p.mac for p in c.ports} == {"tap0": WEB, "tap1": 0}  # the mirror's, at once
    for t in range(2, 12):
        sent("tap0", WEB)
        c.step(float(t), poll_s=0.0)
    assert [[p.mac for p in ports] for ports in control.ports] == [[0, 0], [WEB, 0]]
    rng = np.random.default_rng(3)
    for t in range(12, 612):
        sent("tap0", WEB)
        sent("tap1", int(rng.integers(1, 1 << 40)) << 1 & ~(1 << 40))  # unicast MACs
        c.step(float(t), poll_s=0.0)
    changed = len(control.ports) - 2
    assert 1 <= changed <= 1 + 600 // 60, changed
    assert all(ports[0].mac == WEB for ports in control.ports[1:])
    assert disco.macs.counters["changed"] == changed - 1  # the first was learned
    assert (c.counters()["macs"]["learned"], c.counters()["macs"]["changed"]) == (2, changed - 1)
    learned = [r.getMessage() for r in caplog.records if "learned" in r.getMessage()]
    assert len(learned) == 2  # once per port
