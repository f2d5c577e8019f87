"""Tests of vspan.pcap.write: byte vectors built here by hand, round trips through vspan's
reader and through tshark, and ``write_batch`` against repeated ``write``."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.pcap.read import read_capture
from vspan.pcap.write import PcapngWriter, PcapWriter, open_writer

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")

FRAMES = [b"\x00" * 60, bytes(range(1, 101)), b"", b"\xff" * 1514, b"abc"]
TS_NS = [
    1_700_000_000_123_456_789,
    1_700_000_000_999_999_999,
    1_600_000_000_000_000_000,
    1_700_000_001_000_000_001,
    1_500_000_000_000_999_000,
]
ORIGLEN = [60, 200, 0, 1514, 3]


def sample() -> FrameBatch:
    return FrameBatch.from_frames(FRAMES, ts_ns=TS_NS, origlen=ORIGLEN)


# --- pcapng byte builders, by hand (draft-ietf-opsawg-pcapng §3.1, §3.5) -----------------


def pad(body: bytes) -> bytes:
    return body + bytes(-len(body) % 4)


def block(btype: int, body: bytes) -> bytes:
    total = len(pad(body)) + 12
    return struct.pack("<II", btype, total) + pad(body) + struct.pack("<I", total)


def opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + pad(value)


END = opt(0, b"")


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-r", str(path), "-T", "fields"]
    for name in fields:
        args += ["-e", name]
    run = subprocess.run(args, capture_output=True, text=True, check=True)
    return [line.split("\t") for line in run.stdout.splitlines()]


# --- byte vectors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nano", "magic", "frac"), [(True, 0xA1B23C4D, 42), (False, 0xA1B2C3D4, 0)]
)
def test_pcap_bytes(nano: bool, magic: int, frac: int) -> None:
    out = io.BytesIO()
    writer = PcapWriter(out, linktype=113, snaplen=4, nanosecond=nano)
    writer.write(b"abcdef", ts_ns=1_700_000_000_000_000_042)
    writer.write(b"xy", ts_ns=1_700_000_001_123_456_789, origlen=80)
    assert out.getvalue() == (
        struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 4, 113)
        + struct.pack("<IIII", 1_700_000_000, frac, 4, 6)  # cut to snaplen 4
        + b"abcd"
        + struct.pack("<IIII", 1_700_000_001, 123_456_789 if nano else 123_456, 2, 80)
        + b"xy"
    )


def test_pcapng_bytes() -> None:
    out = io.BytesIO()
    writer = PcapngWriter(out, application="vspan-test")
    first = writer.add_interface(name="vnic0", description="VM 7")
    second = writer.add_interface(name="uplink", linktype=113, snaplen=3)
    ts = 0x0123_4567_89AB_CDEF
    writer.write(b"hello", ts_ns=ts, iface=first, comment="first")
    writer.write(b"abcdef", ts_ns=5, iface=second, origlen=9)
    assert (first, second) == (0, 1)
    assert out.getvalue() == (
        block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + opt(4, b"vspan-test") + END)
        + block(
            1,
            struct.pack("<HHI", 1, 0, 0)
            + opt(2, b"vnic0")
            + opt(3, b"VM 7")
            + opt(9, b"\x09")
            + END,
        )
        + block(1, struct.pack("<HHI", 113, 0, 3) + opt(2, b"uplink") + opt(9, b"\x09") + END)
        + block(
            6,
            struct.pack("<IIIII", 0, 0x01234567, 0x89ABCDEF, 5, 5)
            + pad(b"hello")
            + opt(1, b"first")
            + END,
        )
        + block(6, struct.pack("<IIIII", 1, 0, 5, 3, 9) + pad(b"abc"))
    )


# --- write_batch is write, repeated ---------------------------------------------------------

INDEXES = {
    "all": None,
    "positions": np.array([3, 0, 4, 4]),
    "mask": np.array([True, False, True, True, False]),
}


@pytest.mark.parametrize("index", INDEXES.values(), ids=INDEXES.keys())
@pytest.mark.parametrize(("nano", "snaplen"), [(True, 262144), (False, 64)])
def test_pcap_write_batch_is_write_repeated(
    index: np.ndarray | None, nano: bool, snaplen: int
) -> None:
    batch = sample()
    rows = range(len(batch)) if index is None else np.arange(len(batch))[index]
    one, many = io.BytesIO(), io.BytesIO()
    writer = PcapWriter(one, linktype=101, snaplen=snaplen, nanosecond=nano)
    for i in rows:
        writer.write(batch.frame(int(i)), ts_ns=int(batch.ts_ns[i]), origlen=int(batch.origlen[i]))
    PcapWriter(many, linktype=101, snaplen=snaplen, nanosecond=nano).write_batch(batch, index)
    assert one.getvalue() == many.getvalue()


def two_interfaces(out: io.BytesIO) -> PcapngWriter:
    writer = PcapngWriter(out)
    writer.add_interface(name="eth0")
    writer.add_interface(name="vnic7", linktype=113, snaplen=50, description="VM 7 port")
    return writer


COMMENTS = {
    "none": None,
    "distinct": lambda i: f"frame {i}" if i % 2 else None,
    # Few distinct comments (VM and verdict), encoded once each; lengths 1..4 mod 4, UTF-8.
    "shared": lambda i: ["vm=db-ü verdict=deny", "a", None, "vm=web permit"][i % 4],
}


@pytest.mark.parametrize("index", INDEXES.values(), ids=INDEXES.keys())
@pytest.mark.parametrize("comment", COMMENTS.values(), ids=COMMENTS.keys())
def test_pcapng_write_batch_is_write_repeated(
    index: np.ndarray | None, comment: Callable[[int], str | None] | None
) -> None:
    batch, iface = sample(), np.array([1, 0, 1, 1, 0])
    rows = np.arange(len(batch)) if index is None else np.arange(len(batch))[index]
    comments = [comment(int(i)) for i in rows] if comment else None
    one, many = io.BytesIO(), io.BytesIO()
    writer = two_interfaces(one)
    for k, i in enumerate(rows):
        writer.write(
            batch.frame(int(i)),
            ts_ns=int(batch.ts_ns[i]),
            iface=int(iface[i]),
            origlen=int(batch.origlen[i]),
            comment=comments[k] if comments else None,
        )
    two_interfaces(many).write_batch(batch, iface=iface, index=index, comments=comments)
    assert one.getvalue() == many.getvalue()


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("nano", [True, False])
def test_pcap_round_trip(tmp_path: Path, nano: bool) -> None:
    path = tmp_path / "out.pcap"
    with open_writer(path, "pcap", linktype=113, snaplen=100, nanosecond=nano) as writer:
        writer.write_batch(sample())
    back = read_capture(path, strict=True)
    assert [back.frame(i) for i in range(len(back))] == [f[:100] for f in FRAMES]
    assert back.origlen.tolist() == ORIGLEN
    assert back.ts_ns.tolist() == [t if nano else t // 1000 * 1000 for t in TS_NS]
    assert back.linktype.tolist() == [113] * len(FRAMES)


def test_pcapng_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.pcapng"
    with open_writer(path, "pcapng") as writer:
        writer.add_interface(name="eth0")
        writer.add_interface(name="vnic7", linktype=113, snaplen=50)
        writer.write_batch(sample(), iface=np.array([1, 0, 1, 1, 0]))
        writer.write(b"late", ts_ns=7, iface=0, comment="a comment")
    back = read_capture(path, strict=True)
    assert back.iface_names == ("eth0", "vnic7")
    assert back.iface.tolist() == [1, 0, 1, 1, 0, 0]
    assert back.linktype.tolist() == [113, 1, 113, 113, 1, 1]
    caps = [50, None, 50, 50, None, None]
    assert [back.frame(i) for i in range(6)] == [
        f[:c] for f, c in zip([*FRAMES, b"late"], caps, strict=True)
    ]
    assert back.origlen.tolist() == [*ORIGLEN, 4]
    assert back.ts_ns.tolist() == [*TS_NS, 7]


@pytest.mark.tshark
@needs_tshark
def test_pcapng_through_tshark(tmp_path: Path) -> None:
    path = tmp_path / "out.pcapng"
    comments = ["first frame", None, "third", None, "last one"]
    with open_writer(path, "pcapng", application="vspan tests") as writer:
        writer.add_interface(name="eth0")
        writer.add_interface(name="vnic7", linktype=1, snaplen=50)
        writer.write_batch(sample(), iface=np.array([1, 0, 1, 1, 0]), comments=comments)
        writer.write_batch(sample(), iface=0, index=np.array([4]))
    fields = (
        "frame.interface_name",
        "frame.comment",
        "frame.len",
        "frame.cap_len",
        "frame.time_epoch",
    )
    rows = tshark_fields(path, *fields)
    expected = [
        [name, comment or "", str(orig), str(min(len(f), cap)), str(ts)]
        for name, comment, orig, f, cap, ts in zip(
            ["vnic7", "eth0", "vnic7", "vnic7", "eth0", "eth0"],
            [*comments, None],
            [*ORIGLEN, ORIGLEN[4]],
            [*FRAMES, FRAMES[4]],
            [50, 10**6, 50, 50, 10**6, 10**6],
            [*TS_NS, TS_NS[4]],
            strict=True,
        )
    ]
    got = [[*r[:4], str(int(Decimal(r[4]) * 10**9))] for r in rows]
    assert got == expected


@pytest.mark.tshark
@needs_tshark
@pytest.mark.parametrize("nano", [True, False])
def test_pcap_through_tshark(tmp_path: Path, nano: bool) -> None:
    path = tmp_path / "out.pcap"
    with path.open("wb") as out, PcapWriter(out, snaplen=100, nanosecond=nano) as writer:
        writer.write_batch(sample())
    rows = tshark_fields(path, "frame.len", "frame.cap_len", "frame.time_epoch")
    assert [int(r[0]) for r in rows] == ORIGLEN
    assert [int(r[1]) for r in rows] == [min(len(f), 100) for f in FRAMES]
    assert [int(Decimal(r[2]) * 10**9) for r in rows] == [
        t if nano else t // 1000 * 1000 for t in TS_NS
    ]


# --- ownership and errors ---------------------------------------------------------------


def test_writer_leaves_a_file_it_did_not_open_open() -> None:
    out = io.BytesIO()
    with PcapngWriter(out) as writer:
        writer.add_interface(name="x")
    assert not out.closed


def test_open_writer_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown capture format 'erf'"):
        open_writer(tmp_path / "x", "erf")  # type: ignore[call-overload]


def test_bad_arguments_raise_value_error() -> None:
    pcap, pcapng = PcapWriter(io.BytesIO()), PcapngWriter(io.BytesIO())
    pcapng.add_interface(name="only")
    with pytest.raises(ValueError, match="outside the pcap range"):
        pcap.write(b"x", ts_ns=-1)
    with pytest.raises(ValueError, match="outside the pcap range"):
        pcap.write(b"x", ts_ns=2**32 * 10**9)
    with pytest.raises(ValueError, match="origlen 1 is smaller"):
        pcap.write(b"xy", ts_ns=0, origlen=1)
    with pytest.raises(ValueError, match="interface 1 was not added"):
        pcapng.write(b"x", ts_ns=0, iface=1)
    with pytest.raises(ValueError, match="not added"):
        pcapng.write_batch(sample(), iface=3)
    with pytest.raises(ValueError, match="2 comments for 5 frames"):
        pcapng.write_batch(sample(), iface=0, comments=["a", "b"])
    late = FrameBatch.from_frames([b"x"], ts_ns=[2**32 * 10**9])
    with pytest.raises(ValueError, match="outside the pcap range"):
        pcap.write_batch(late)
    lying = FrameBatch.from_frames([b"x"], origlen=[0])
    with pytest.raises(ValueError, match="origlen smaller"):
        pcap.write_batch(lying)
