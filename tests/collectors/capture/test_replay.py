"""Tests of vspan.collectors.capture.replay: frames of a capture file placed on the local VM ports
as a live vswitch would show them, then mirrored; pacing with a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from vspan.collectors.capture.replay import ReplaySource
from vspan.collectors.mirror import Mirror
from vspan.collectors.model import PortBatch
from vspan.errors import CaptureFileError
from vspan.inventory import Inventory
from vspan.pcap.write import open_writer
from vspan.wire.vntag import decode_vntag

A, B, F = 0x020000000005, 0x020000000009, 0x020000000003
X, Y = 0x02AA00000001, 0x02AA00000002
BCAST = 0xFFFFFFFFFFFF
T0 = 1_700_000_000 * 10**9

INVENTORY = Inventory.loads(
    """\
hosts:
  - {name: hv01, collector_id: 1}
  - {name: hv02, collector_id: 2}
vms:
  - name: web-01
    uuid: 6f1c2d9e-0000-4000-8000-000000000001
    host: hv01
    nics: [{mac: "02:00:00:00:00:05", vif: 5}]
  - name: db-01
    uuid: 6f1c2d9e-0000-4000-8000-000000000002
    host: hv01
    nics: [{mac: "02:00:00:00:00:09", vif: 9}]
  - name: far-01
    uuid: 6f1c2d9e-0000-4000-8000-000000000003
    host: hv02
    nics: [{mac: "02:00:00:00:00:03", vif: 3}]
"""
)

# (seconds after T0, dst, src)
FRAMES = [
    (0.0, B, A),  # 0: between two local VMs
    (0.5, X, A),  # 1: to the outside
    (1.0, A, X),  # 2: from the outside
    (2.0, BCAST, X),  # 3: broadcast from the outside
    (2.0, BCAST, A),  # 4: broadcast from a local VM
    (3.0, Y, X),  # 5: touches no local VM
    (3.5, A, F),  # 6: from a VM of the other host
]


def frame(dst: int, src: int, i: int) -> bytes:
    return dst.to_bytes(6, "big") + src.to_bytes(6, "big") + b"\x08\x00" + bytes([i]) * 46


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    path = tmp_path / "replay.pcap"
    with open_writer(path) as writer:
        for i, (t, dst, src) in enumerate(FRAMES):
            writer.write(frame(dst, src, i), ts_ns=T0 + int(t * 1e9))
    return path


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 9))
        self.t += seconds


def placed(batch: PortBatch | None) -> list[tuple[int, int, bool]]:
    assert batch is not None
    return [
        (batch.frames.frame(i)[14], int(batch.vif[i]), bool(batch.from_vm[i]))
        for i in range(len(batch.frames))
    ]


def test_frames_are_placed_on_the_local_ports(capture: Path) -> None:
    source = ReplaySource(capture, INVENTORY, None, host="hv01")
    assert [(p.name, p.vif, p.mac) for p in source.ports()] == [
        ("web-01-nic0", 5, A),
        ("db-01-nic0", 9, B),
    ]
    source.start()
    batch = source.poll(0.0)
    assert placed(batch) == [
        (0, 5, True),
        (0, 9, False),
        (1, 5, True),
        (2, 5, False),
        (3, 5, False),
        (3, 9, False),
        (4, 5, True),
        (4, 9, False),
        (6, 5, False),
    ]
    assert source.poll(0.0) is None
    assert source.finished
    assert source.unmatched == 1
    assert source.counters.frames == 9
    assert source.counters.per_port == {"web-01-nic0": 6, "db-01-nic0": 3}
    assert batch is not None
    assert batch.frames.ts_ns.tolist()[:3] == [T0, T0, T0 + 500_000_000]
    source.stop()


def test_replayed_frames_follow_the_mirroring_rules(capture: Path) -> None:
    source = ReplaySource(capture, INVENTORY, None, host="hv01")
    source.start()
    batch = source.poll(0.0)
    assert batch is not None
    mirror = Mirror()
    mirror.set_ports(source.ports())
    result = mirror.process(batch)
    got = []
    for i in range(result.exported):
        tagged = result.frames.frame(i)
        tag = decode_vntag(tagged, 14)
        got.append((tagged[20], tag.d, tag.svif, tag.dvif))
    assert got == [
        (0, 0, 5, 9),  # intra-host, once at the sender
        (1, 0, 5, 0),
        (2, 1, 0, 5),
        (3, 1, 0, 5),  # an uplink broadcast, once per receiving VM
        (3, 1, 0, 9),
        (4, 0, 5, 0),  # a local broadcast, once
        (6, 1, 0, 5),  # from another host: from outside this one
    ]
    assert result.duplicates == 2


def test_all_vms_local_without_a_host(capture: Path) -> None:
    source = ReplaySource(capture, INVENTORY, None)
    source.start()
    rows = placed(source.poll(0.0))
    assert [r for r in rows if r[0] in (3, 4, 6)] == [
        (3, 3, False),  # ports in MAC order: far-01, web-01, db-01
        (3, 5, False),
        (3, 9, False),
        (4, 5, True),
        (4, 3, False),
        (4, 9, False),
        (6, 3, True),
        (6, 5, False),
    ]


def test_pacing_follows_capture_time_with_a_fake_clock(capture: Path) -> None:
    clock = Clock(100.0)
    source = ReplaySource(capture, INVENTORY, 1.0, host="hv01", now=clock.now, sleep=clock.sleep)
    source.start()
    assert {r[0] for r in placed(source.poll(0.0))} == {0}
    assert source.poll(0.1) is None  # the next frame is due at 100.5
    assert clock.slept == [0.1]
    assert {r[0] for r in placed(source.poll(1.0))} == {1}  # waited 0.4 for it
    assert clock.slept == [0.1, 0.4]
    clock.t = 102.0
    assert {r[0] for r in placed(source.poll(0.0))} == {2, 3, 4}
    clock.t = 110.0
    assert {r[0] for r in placed(source.poll(0.0))} == {6}  # 5 touched no local VM
    assert source.poll(0.0) is None
    assert source.finished


def test_speed_factor_and_batch_limit(capture: Path) -> None:
    clock = Clock(0.0)
    fast = ReplaySource(capture, INVENTORY, 2.0, host="hv01", now=clock.now, sleep=clock.sleep)
    fast.start()
    assert {r[0] for r in placed(fast.poll(0.0))} == {0}
    clock.t = 1.0  # two seconds of capture time
    assert {r[0] for r in placed(fast.poll(0.0))} == {1, 2, 3, 4}
    small = ReplaySource(capture, INVENTORY, None, host="hv01", max_batch=2)
    small.start()
    firsts = []
    while not small.finished:
        batch = small.poll(0.0)
        if batch is not None:
            firsts.append(sorted({r[0] for r in placed(batch)}))
    assert firsts == [[0, 1], [2, 3], [4], [6]]


def test_errors(tmp_path: Path, capture: Path) -> None:
    with pytest.raises(ValueError, match="speed must be positive or None, got 0"):
        ReplaySource(capture, INVENTORY, 0)
    with pytest.raises(RuntimeError, match="before start"):
        ReplaySource(capture, INVENTORY, None).poll(0.0)
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    with pytest.raises(CaptureFileError, match="not a pcap or pcapng file"):
        ReplaySource(bad, INVENTORY, None).start()


def test_non_ethernet_frames_are_unmatched(tmp_path: Path) -> None:
    path = tmp_path / "raw.pcap"
    with open_writer(path, linktype=101) as writer:
        writer.write(frame(B, A, 0), ts_ns=T0)
    source = ReplaySource(path, INVENTORY, None)
    source.start()
    assert source.poll(0.0) is None
    assert (source.unmatched, source.counters.frames) == (1, 0)
    assert source.counters.per_port == {}
