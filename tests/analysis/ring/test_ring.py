"""The packet ring: rotation, bounds, index, recovery and a full disk.

Expectations come from the simulator's inventory and from tshark reading the segments
(interface names, tag fields, comments), not from vspan's own decoder.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vspan.analysis.decode import decode_batch
from vspan.analysis.ring import ring as ring_module
from vspan.analysis.ring.index import ip_key, load_index
from vspan.analysis.ring.ring import PacketRing
from vspan.analysis.store.store import Store
from vspan.batch import FrameBatch
from vspan.pcap.read import CaptureReader, read_capture
from vspan.synth import SynthCapture, generate_small
from vspan_testing.tshark import fields, needs_tshark

SEGMENT = 64 << 10
STEP = 250


@pytest.fixture(scope="module")
def cap() -> SynthCapture:
    return generate_small(seed=5)


def part(frames: FrameBatch, rows: np.ndarray[Any, Any]) -> FrameBatch:
    """Rows of a batch as a batch of their own (sharing the buffer)."""
    return FrameBatch(
        data=frames.data,
        offset=frames.offset[rows],
        caplen=frames.caplen[rows],
        origlen=frames.origlen[rows],
        ts_ns=frames.ts_ns[rows],
        linktype=frames.linktype[rows],
        host=frames.host_column()[rows],
    )


def slices(cap: SynthCapture, step: int = STEP) -> Iterator[np.ndarray[Any, Any]]:
    n = len(cap.frames)
    for lo in range(0, n, step):
        yield np.arange(lo, min(lo + step, n))


def fill(ring: PacketRing, cap: SynthCapture, *, verdicts: bool = False) -> int:
    dec = decode_batch(cap.frames)
    written = 0
    for rows in slices(cap):
        notes = [f"allow rule-{i % 3}" if i % 2 else None for i in rows] if verdicts else None
        written += ring.append(part(cap.frames, rows), dec.take(rows), verdicts=notes)
    return written


def make_ring(path: Path, cap: SynthCapture, **kw: Any) -> PacketRing:
    opts: dict[str, Any] = {"segment_bytes": SEGMENT, "max_bytes": 64 << 20, "max_age_s": 3600}
    ring = PacketRing(path, inventory=cap.inventory(), **(opts | kw))
    ring.start()
    return ring


def test_rotation_keeps_every_frame_in_order(cap: SynthCapture, tmp_path: Path) -> None:
    ring = make_ring(tmp_path, cap)
    assert fill(ring, cap) == len(cap.frames)
    ring.stop()
    segments = sorted(tmp_path.glob("ring-*.pcapng"))
    assert len(segments) == ring.metrics()["segments_created"] > 20
    sizes = [p.stat().st_size for p in segments]
    assert max(sizes) <= SEGMENT + 2048  # interface blocks may add a little
    assert min(sizes[:-1]) >= SEGMENT // 2
    got = [read_capture(p) for p in segments]
    frames = [b.frame(i) for b in got for i in range(len(b))]
    assert frames == [cap.frames.frame(i) for i in range(len(cap.frames))]
    stamps = np.concatenate([b.ts_ns for b in got])
    assert np.array_equal(stamps, cap.frames.ts_ns)


@needs_tshark
@pytest.mark.tshark
def test_interfaces_name_the_vm_at_the_port(cap: SynthCapture, tmp_path: Path) -> None:
    ring = make_ring(tmp_path, cap, segment_bytes=1 << 20)  # few files: tshark starts slowly
    fill(ring, cap, verdicts=True)
    ring.stop()
    vm_at = {(v.host, v.vif): v for v in cap.vms}
    host_of = {h.collector_id: h.name for h in cap.hosts}
    rows: list[list[str]] = []
    for seg in sorted(tmp_path.glob("ring-*.pcapng")):
        names = ["frame.interface_name", "frame.interface_description", "frame.comment"]
        rows += fields(seg, [*names, "vntag.dir", "vntag.src", "vntag.dst"])
    assert len(rows) == len(cap.frames)
    for i, (name, desc, comment, direction, src, dst) in enumerate(rows):
        host = host_of[int(cap.frames.host[i])]
        vif = int(src) if direction == "0" else int(dst)
        vm = vm_at.get((host, vif))
        assert name == f"{host}/{vm.name if vm else f'vif {vif}'}"
        assert f"vif {vif}" in desc
        if vm is not None:
            assert vm.uuid in desc
        assert comment == (f"allow rule-{i % 3}" if i % 2 else "")


def test_total_size_bound_deletes_oldest(cap: SynthCapture, tmp_path: Path) -> None:
    ring = make_ring(tmp_path, cap, max_bytes=5 * SEGMENT)
    fill(ring, cap)
    ring.stop()
    left = sorted(tmp_path.glob("ring-*.pcapng"))
    assert sum(p.stat().st_size for p in left) <= 5 * SEGMENT + 2048
    metrics = ring.metrics()
    assert metrics["segments_deleted{size}"] == metrics["segments_created"] - len(left)
    assert len(left) >= 4
    last = read_capture(left[-1])
    assert last.ts_ns[-1] == cap.frames.ts_ns[-1]  # the newest frames are kept
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [p.stem + ".json" for p in left]


def test_age_bound_is_capture_time(cap: SynthCapture, tmp_path: Path) -> None:
    ring = make_ring(tmp_path, cap, max_age_s=2.0)
    fill(ring, cap)
    newest = int(cap.frames.ts_ns[-1])
    kept = ring.segments
    assert all(s.last_ns >= newest - 2 * 10**9 for s in kept[:-1])
    assert ring.metrics()["segments_deleted{age}"] > 10
    assert ring.trim(newest + 60 * 10**9) == len(kept) - 1  # all but the open one
    ring.stop()


def test_index_lists_what_each_segment_holds(cap: SynthCapture, tmp_path: Path) -> None:
    ring = make_ring(tmp_path, cap)
    fill(ring, cap)
    ring.stop()
    web = next(v for v in cap.vms if v.name == "web-01")
    mac = int(web.mac.replace(":", ""), 16)
    for info in load_index(tmp_path):
        batch = read_capture(tmp_path / info.name)
        dec = decode_batch(batch)
        assert info.closed
        assert info.frames == len(batch)
        assert (info.first_ns, info.last_ns) == (batch.ts_ns.min(), batch.ts_ns.max())
        assert info.macs is not None
        assert (mac in info.macs) == bool(np.isin(mac, [dec.src_mac, dec.dst_mac]).any())
        lo = np.uint64(ip_key(web.ipv4))  # IPv4-mapped: the high 64 bits are 0
        seen = ((dec.src_ip_hi == 0) & (dec.src_ip_lo == lo)) | (
            (dec.dst_ip_hi == 0) & (dec.dst_ip_lo == lo)
        )
        assert info.ips is not None
        assert (ip_key(web.ipv4) in info.ips) == bool(seen.any())


def test_segments_for_selects_by_time_and_keys(cap: SynthCapture, tmp_path: Path) -> None:
    ring = make_ring(tmp_path, cap)
    fill(ring, cap)
    ring.stop()
    infos = ring.segments
    mid = int(cap.frames.ts_ns[len(cap.frames) // 2])
    got = ring.segments_for(since=mid, until=mid + 1)
    assert got == [tmp_path / s.name for s in infos if s.first_ns <= mid <= s.last_ns]
    assert 1 <= len(got) <= 2
    web = next(v for v in cap.vms if v.name == "web-01")
    mac = int(web.mac.replace(":", ""), 16)
    by_mac = set(ring.segments_for(macs=[mac]))
    holding = set()
    for info in infos:
        batch = read_capture(tmp_path / info.name)
        dec = decode_batch(batch)
        if np.isin(mac, [dec.src_mac, dec.dst_mac]).any():
            holding.add(tmp_path / info.name)
    assert by_mac == holding
    assert set(ring.segments_for(vms=[web.uuid])) <= holding
    assert len(ring.segments_for(hosts=[999])) == 0


CRASH = """
import sys
from vspan.analysis.decode import decode_batch
from vspan.analysis.ring.ring import PacketRing
from vspan.synth import generate_small
cap = generate_small(seed=5)
ring = PacketRing(sys.argv[1], segment_bytes=int(sys.argv[2]), inventory=cap.inventory())
ring.start()
ring.append(cap.frames, decode_batch(cap.frames))
print("written", len(ring.segments), flush=True)
sys.stdin.read()
"""


def test_restart_after_kill_recovers_the_open_segment(cap: SynthCapture, tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CRASH, str(tmp_path), str(SEGMENT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        line = child.stdout.readline()
        child.kill()  # SIGKILL: no stop(), the last segment stays open
    assert line.startswith("written")
    before = load_index(tmp_path)
    assert not before[-1].closed
    last = tmp_path / before[-1].name
    with open(last, "ab") as fh:
        fh.write(b"\x06\x00\x00\x00\xff\x00\x00")  # a torn block at the end
    ring = make_ring(tmp_path, cap)
    infos = ring.segments
    assert [s.name for s in infos] == [s.name for s in before]
    assert all(s.closed for s in infos)
    assert sum(s.frames for s in infos) == len(cap.frames)
    reader = CaptureReader(last)
    assert sum(len(b) for b in reader) == infos[-1].frames
    assert reader.error is None  # the torn tail was cut off
    assert infos[-1].vms == {i.vm_uuid for i in before[-1].interfaces if i.vm_uuid}
    assert infos[-1].vms
    assert infos[-1].ips
    assert infos[-1].macs
    fill(ring, cap)  # numbering goes on after the recovered segments
    ring.stop()
    index = load_index(tmp_path)
    assert [s.name for s in index[: len(infos)]] == [s.name for s in infos]
    assert len(index) > len(infos)
    assert all(s.closed for s in index)
    assert sum(s.frames for s in index) == 2 * len(cap.frames)


def test_index_is_mirrored_into_the_store(cap: SynthCapture, tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        ring = make_ring(tmp_path / "ring", cap, store=store, max_bytes=8 * SEGMENT)
        fill(ring, cap)
        ring.stop()
        kept = [s.name for s in ring.segments]
        rows = store.query("SELECT name, frames FROM ring_segments ORDER BY name")
        assert list(rows["name"]) == kept
        web = next(v for v in cap.vms if v.name == "web-01")
        hits = store.query(
            "SELECT DISTINCT segment FROM ring_segment_keys WHERE kind = 'vm' AND value = ?",
            [web.uuid],
        )
        assert set(hits["segment"]) == {s.name for s in ring.segments if web.uuid in (s.vms or ())}


class FullDisk:
    """A file that accepts ``room[0]`` more bytes, then fails like a full disk."""

    def __init__(self, real: Any, room: list[int]) -> None:
        self.real, self.room = real, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room[0]:
            self.real.write(bytes(data)[: self.room[0]])
            self.room[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= len(data)
        return int(self.real.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _check_segments_whole(folder: Path) -> int:
    total = 0
    for seg in sorted(folder.glob("ring-*.pcapng")):
        reader = CaptureReader(seg)
        total += sum(len(b) for b in reader)
        assert reader.error is None, seg
    return total


def test_full_disk_is_counted_not_raised(
    cap: SynthCapture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = [300_000]

    def full_open(path: Path, mode: str) -> FullDisk:
        return FullDisk(path.open(mode), room)

    monkeypatch.setattr(ring_module, "open", full_open, raising=False)
    ring = make_ring(tmp_path, cap, retry_s=1.0)
    written = fill(ring, cap)
    metrics = ring.metrics()
    assert 0 < written < len(cap.frames)
    assert metrics["ring_errors{enospc}"] >= 1
    dropped = metrics["frames_dropped{ring_error}"] + metrics.get("frames_dropped{ring_paused}", 0)
    assert written + dropped == len(cap.frames)
    assert _check_segments_whole(tmp_path) == written  # torn writes were cut back
    room[0] = 10 << 20  # space again: after retry_s of capture time, writing resumes
    shifted = replace(cap.frames, ts_ns=cap.frames.ts_ns + 20 * 10**9)
    assert ring.append(shifted, decode_batch(shifted)) == len(cap.frames)
    ring.stop()
    assert _check_segments_whole(tmp_path) == written + len(cap.frames)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.root
def test_full_tmpfs_is_counted_not_raised(cap: SynthCapture, tiny_tmpfs: Path) -> None:
    ring = make_ring(tiny_tmpfs / "ring", cap, segment_bytes=128 << 10, retry_s=0.5)
    written = fill(ring, cap)  # 2.5 MB of frames onto a 1 MiB file system
    metrics = ring.metrics()
    assert metrics["ring_errors{enospc}"] >= 1
    assert 0 < written < len(cap.frames)
    assert _check_segments_whole(tiny_tmpfs / "ring") == sum(s.frames for s in ring.segments)
    ring.max_bytes = 256 << 10  # make room: the size bound deletes old segments
    ring.trim(int(cap.frames.ts_ns[-1]))
    later = part(cap.frames, np.arange(100))
    later = replace(later, ts_ns=later.ts_ns + 20 * 10**9)
    assert ring.append(later, decode_batch(later)) == 100
    ring.stop()
    assert ring.segments[-1].closed
