"""Tests of vspan.pcap.read: capture files built here byte by byte, real captures, tshark.

Expected values come from how each test built its bytes (with ``struct``, independently
of vspan's layout tables), from tshark run in the test, or from dpkt.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path

import dpkt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.batch import FrameBatch
from vspan.errors import CaptureFileError
from vspan.pcap.read import CaptureReader, read_capture

SHARED_PCAPS = Path(__file__).resolve().parents[4] / "shared" / "pcaps"
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
L, B = "<", ">"

# --- byte builders (draft-ietf-opsawg-pcap / -pcapng, written out by hand) -------------


def pcap_header(
    order: str = L, *, nano: bool = False, linktype: int = 1, snaplen: int = 65535
) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)


def pcap_record(order: str, sec: int, frac: int, data: bytes, orig: int | None = None) -> bytes:
    return struct.pack(order + "IIII", sec, frac, len(data), orig or len(data)) + data


def pad(body: bytes) -> bytes:
    return body + bytes(-len(body) % 4)


def block(order: str, btype: int, body: bytes) -> bytes:
    body = pad(body)
    total = len(body) + 12
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def opt(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + pad(value)


def shb(order: str) -> bytes:
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(order: str, linktype: int, snaplen: int = 0, *options: bytes) -> bytes:
    end = opt(order, 0, b"") if options else b""
    return block(
        order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + b"".join(options) + end
    )


def epb(order: str, iface: int, ticks: int, data: bytes, orig: int | None = None) -> bytes:
    head = struct.pack(
        order + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), orig or len(data)
    )
    return block(order, 6, head + data)


def pb(order: str, iface: int, ticks: int, data: bytes) -> bytes:
    head = struct.pack(
        order + "HHIIII", iface, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)
    )
    return block(order, 2, head + data)


def spb(order: str, data: bytes, orig: int | None = None) -> bytes:
    return block(order, 3, struct.pack(order + "I", orig or len(data)) + data)


def nrb(order: str) -> bytes:  # one IPv4 record "10.0.0.1 gw", then the end record
    record = struct.pack(order + "HH", 1, 7) + bytes([10, 0, 0, 1]) + b"gw\0"
    return block(order, 4, pad(record) + struct.pack(order + "HH", 0, 0))


def isb(order: str) -> bytes:
    return block(order, 5, struct.pack(order + "III", 0, 1, 2))


def custom(order: str) -> bytes:
    return block(order, 0x00000BAD, struct.pack(order + "I", 32473) + b"vendor data")


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def frames_of(batch: FrameBatch) -> list[bytes]:
    return [batch.frame(i) for i in range(len(batch))]


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-r", str(path), "-T", "fields"]
    for name in fields:
        args += ["-e", name]
    run = subprocess.run(args, capture_output=True, text=True, check=True)
    return [line.split("\t") for line in run.stdout.splitlines()]


def epoch_ns(text: str) -> int:
    return int(Decimal(text) * 10**9)


def assert_matches_tshark(path: Path, batch: FrameBatch) -> None:
    rows = tshark_fields(path, "frame.len", "frame.cap_len", "frame.time_epoch")
    assert len(batch) == len(rows)
    assert batch.origlen.tolist() == [int(r[0]) for r in rows]
    assert batch.caplen.tolist() == [int(r[1]) for r in rows]
    timed = [i for i, r in enumerate(rows) if r[2]]  # tshark gives SPBs no time
    assert batch.ts_ns[timed].tolist() == [epoch_ns(rows[i][2]) for i in timed]


# --- real captures ----------------------------------------------------------------------

SHARED = sorted(SHARED_PCAPS.glob("*.pcap")) if SHARED_PCAPS.is_dir() else []
SHARED_PARAMS = [pytest.param(p, id=p.name) for p in SHARED] or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"no shared captures in {SHARED_PCAPS}"))
]


@pytest.mark.tshark
@needs_tshark
@pytest.mark.parametrize("path", SHARED_PARAMS)
def test_shared_capture_matches_tshark(path: Path) -> None:
    reader = CaptureReader(path)
    batch = read_capture(path, strict=True)
    list(reader)
    assert (reader.format, reader.partial, reader.bytes_read) == (
        "pcap",
        False,
        path.stat().st_size,
    )
    assert_matches_tshark(path, batch)


@pytest.mark.parametrize("path", SHARED_PARAMS)
def test_shared_capture_bytes_match_dpkt(path: Path) -> None:
    with path.open("rb") as f:
        reader = dpkt.pcap.Reader(f)
        expected = [bytes(buf) for _, buf in reader]
        linktype = reader.datalink()
    batch = read_capture(path, strict=True)
    assert frames_of(batch) == expected
    assert batch.linktype.tolist() == [linktype] * len(expected)
    assert batch.iface.tolist() == [0] * len(expected)
    assert batch.iface_names == ()


# --- classic pcap built here ------------------------------------------------------------

PCAP_RECORDS = [
    (1_600_000_000, 1, b"\x01" * 60, 60),
    (1_600_000_000, 999_999, b"\x02" * 14, 1514),
    (4_294_967_295, 5, b"", 0),  # the last second a pcap can hold, an empty frame
    (1_700_000_000, 123_456, bytes(range(256)) * 3, 768),
]


@pytest.mark.parametrize("order", [L, B])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path: Path, order: str, nano: bool) -> None:
    content = pcap_header(order, nano=nano, linktype=113) + b"".join(
        pcap_record(order, sec, frac, data, orig) for sec, frac, data, orig in PCAP_RECORDS
    )
    path = write(tmp_path, "built.pcap", content)
    batch = read_capture(path, strict=True)
    unit = 1 if nano else 1000
    assert batch.ts_ns.tolist() == [s * 10**9 + f * unit for s, f, _, _ in PCAP_RECORDS]
    assert frames_of(batch) == [d for _, _, d, _ in PCAP_RECORDS]
    assert batch.origlen.tolist() == [o for _, _, _, o in PCAP_RECORDS]
    assert batch.linktype.tolist() == [113] * 4
    assert batch.ts_ns.dtype == np.int64
    assert batch.caplen.dtype == np.int32


@pytest.mark.tshark
@needs_tshark
@pytest.mark.parametrize("order", [L, B])
@pytest.mark.parametrize("nano", [False, True])
def test_built_pcap_matches_tshark(tmp_path: Path, order: str, nano: bool) -> None:
    content = pcap_header(order, nano=nano) + b"".join(pcap_record(order, *r) for r in PCAP_RECORDS)
    path = write(tmp_path, "built.pcap", content)
    assert_matches_tshark(path, read_capture(path, strict=True))


# --- pcapng built here ------------------------------------------------------------------

US_TICKS = 1_600_000_000_123_456  # µs, interface 0
NS_TICKS = 1_600_000_001_000_000_007  # ns, interface 1, plus if_tsoffset 1000 s
NS_TICKS_PB = 1_600_000_003_000_000_009
POW2_TICKS = (1_600_000_002 << 20) + (1 << 19) + 1  # 2^-20 s units: x.5 s + 1 unit


def multi_section(
    *, custom_block: bool = True
) -> tuple[bytes, list[tuple[int, int, bytes, int, int]]]:
    """Two sections (LE then BE), 3 interfaces; frames as (iface, linktype, data, orig, ts)."""
    first = shb(L) + idb(L, 1, 0, opt(L, 2, b"eth0"), opt(L, 9, b"\x06"))
    first += idb(
        L, 113, 65535, opt(L, 2, b"any"), opt(L, 9, b"\x09"), opt(L, 14, struct.pack("<q", 1000))
    )
    first += epb(L, 0, US_TICKS, b"A" * 60, 100) + nrb(L) + epb(L, 1, NS_TICKS, b"B" * 61)
    first += spb(L, b"C" * 70) + isb(L) + pb(L, 1, NS_TICKS_PB, b"D" * 62)
    first += custom(L) if custom_block else b""
    second = shb(B) + idb(B, 101, 64, opt(B, 9, b"\x94")) + epb(B, 0, POW2_TICKS, b"E" * 40)
    second += spb(B, b"F" * 64, 100)  # an SPB stores min(orig, snaplen) bytes
    frames = [
        (0, 1, b"A" * 60, 100, US_TICKS * 1000),
        (1, 113, b"B" * 61, 61, NS_TICKS + 1000 * 10**9),
        (0, 1, b"C" * 70, 70, 0),  # SPB: no timestamp
        (1, 113, b"D" * 62, 62, NS_TICKS_PB + 1000 * 10**9),
        (2, 101, b"E" * 40, 40, 1_600_000_002 * 10**9 + 500_000_000 + 10**9 // 2**20),
        (2, 101, b"F" * 64, 100, 0),
    ]
    return first + second, frames


def test_pcapng_sections_interfaces_and_block_kinds(tmp_path: Path) -> None:
    content, expected = multi_section()
    path = write(tmp_path, "multi.pcapng", content)
    reader = CaptureReader(path, strict=True)
    batch = read_capture(path, strict=True)
    list(reader)
    assert reader.format == "pcapng"
    assert reader.frames_read == 6
    assert batch.iface.tolist() == [e[0] for e in expected]
    assert batch.linktype.tolist() == [e[1] for e in expected]
    assert frames_of(batch) == [e[2] for e in expected]
    assert batch.origlen.tolist() == [e[3] for e in expected]
    assert batch.ts_ns.tolist() == [e[4] for e in expected]
    assert batch.iface_names == ("eth0", "any", "")


@pytest.mark.tshark
@needs_tshark
def test_pcapng_matches_tshark(tmp_path: Path) -> None:
    # tshark 4.0 lists a custom block as a 12-byte record: leave it out here.
    path = write(tmp_path, "multi.pcapng", multi_section(custom_block=False)[0])
    batch = read_capture(path, strict=True)
    assert_matches_tshark(path, batch)
    # tshark 4.0 numbers interfaces per section: compare names in the first one only.
    names = [r[0] for r in tshark_fields(path, "frame.interface_name")]
    assert [batch.iface_names[i] for i in batch.iface[:4]] == names[:4]


@pytest.mark.parametrize(
    ("resol", "ticks", "ns"),
    [
        (b"\x00", 3, 3 * 10**9),  # seconds
        (b"\x03", 1_234, 1_234_000_000),  # ms
        (b"\x0c", 1_000_000_000_001_999, 1_000_000_000_001),  # ps, floored
        (b"\x80", 7, 7 * 10**9),  # 2^0
        (b"\x8a", 1024 + 1, 10**9 + 976_562),  # 2^-10: 1/1024 s = 976562.5 ns, floored
        (b"\xa8", (5 << 40) + (1 << 39), 5_500_000_000),  # 2^-40, exact half
        (b"\xbf", (1 << 63) + 1, 10**9),  # 2^-63
    ],
)
def test_pcapng_if_tsresol(tmp_path: Path, resol: bytes, ticks: int, ns: int) -> None:
    content = shb(L) + idb(L, 1, 0, opt(L, 9, resol)) + epb(L, 0, ticks, b"x")
    assert read_capture(write(tmp_path, "r.pcapng", content), strict=True).ts_ns.tolist() == [ns]


# --- streaming --------------------------------------------------------------------------


def many_records(rng: np.random.Generator, n: int) -> tuple[bytes, bytes, list[bytes]]:
    """A pcap and a pcapng (two sections, interfaces added midway) holding the same frames."""
    frames = [
        rng.integers(0, 256, int(size), dtype=np.uint8).tobytes()
        for size in rng.integers(0, 1600, n)
    ]
    pcap = pcap_header(L, nano=True) + b"".join(
        pcap_record(L, 1, i, f) for i, f in enumerate(frames)
    )
    half = n // 2
    ng = shb(L) + idb(L, 1, 0, opt(L, 2, b"a" * 37))
    ng += b"".join(epb(L, 0, i, f) for i, f in enumerate(frames[:half]))
    ng += shb(B) + idb(B, 1) + idb(B, 1, 0, opt(B, 2, b"b"))
    ng += b"".join(epb(B, i % 2, i, f) for i, f in enumerate(frames[half:], half))
    return pcap, ng, frames


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_tiny_chunks_give_the_same_frames(tmp_path: Path, fmt: str) -> None:
    pcap, ng, frames = many_records(np.random.default_rng(7), 400)
    path = write(tmp_path, "many." + fmt, pcap if fmt == "pcap" else ng)
    reader = CaptureReader(path, chunk_bytes=1000, strict=True)
    batches = list(reader)  # kept: each must stay valid after the reader moved on
    assert len(batches) > 100, "records must straddle chunk ends"
    assert [f for b in batches for f in frames_of(b)] == frames
    whole, small = read_capture(path), read_capture(path, chunk_bytes=1000)
    assert frames_of(whole) == frames_of(small) == frames
    for column in ("caplen", "origlen", "ts_ns", "linktype", "iface"):
        assert getattr(whole, column).tolist() == getattr(small, column).tolist(), column
    if fmt == "pcap":
        assert whole.ts_ns.tolist() == [10**9 + i for i in range(400)]  # ns pcap: 1 s + i ns
    else:
        assert whole.ts_ns.tolist() == [1000 * i for i in range(400)]  # default 10^-6 s units
        assert whole.iface.tolist() == [0] * 200 + [1 + i % 2 for i in range(200, 400)]
        assert whole.iface_names == ("a" * 37, "", "b")
    assert (reader.frames_read, reader.bytes_read) == (400, path.stat().st_size)


# --- corruption -------------------------------------------------------------------------


def pcap_cases() -> Iterable[tuple[str, bytes, int, int, str]]:
    """(name, content, frames kept, offset of the bad record, message fragment)."""
    head, r1, r2 = pcap_header(), pcap_record(L, 1, 0, b"a" * 50), pcap_record(L, 2, 0, b"b" * 90)
    r3 = pcap_record(L, 3, 0, b"c" * 40)
    yield "truncated last record", head + r1 + r2 + r3[:30], 2, len(head + r1 + r2), "truncated"
    yield "truncated record header", head + r1 + r3[:9], 1, len(head + r1), "truncated"
    garbage = struct.pack("<IIII", 3, 0, 0x7FFF0000, 60) + b"x" * 60
    yield "garbage caplen", head + r1 + garbage + r2, 1, len(head + r1), "captured length"
    yield "truncated file header", head[:20], 0, 0, "truncated"
    yield "truncated section header", shb(L)[:20], 0, 0, "truncated"
    ng_head = shb(L) + idb(L, 1, 0)
    e1, e2 = epb(L, 0, 1, b"a" * 50), epb(L, 0, 2, b"b" * 30)
    bad_trailer = e2[:-4] + struct.pack("<I", len(e2) + 4)
    yield "bad trailing length", ng_head + e1 + bad_trailer + e1, 1, len(ng_head + e1), "trailing"
    odd = struct.pack("<II", 6, 13) + b"x" * 20
    yield "length not a multiple of 4", ng_head + e1 + odd, 1, len(ng_head + e1), "multiple of 4"
    yield (
        "length under 12",
        ng_head + e1 + struct.pack("<II", 6, 8) + b"x" * 8,
        1,
        len(ng_head + e1),
        "12",
    )
    past = e2[:4] + struct.pack("<I", 4096) + e2[8:]
    yield "block past the end", ng_head + e1 + past, 1, len(ng_head + e1), "truncated"
    yield (
        "unknown interface",
        ng_head + e1 + epb(L, 1, 3, b"z"),
        1,
        len(ng_head + e1),
        "interface 1",
    )
    yield "truncated block", ng_head + e1 + e2[:-5], 1, len(ng_head + e1), "truncated"
    lying = block(L, 6, struct.pack("<IIIII", 0, 0, 0, 200, 200) + b"y" * 8)
    yield "caplen past its block", ng_head + e1 + lying, 1, len(ng_head + e1), "does not fit"
    bad_bom = shb(L)[:8] + b"\x00\x00\x00\x00" + shb(L)[12:]
    yield "bad byte-order magic", ng_head + e1 + bad_bom, 1, len(ng_head + e1), "byte-order"
    bad_resol = idb(L, 1, 0, opt(L, 9, b"\x7f"))
    yield "bad if_tsresol", ng_head + e1 + bad_resol + e1, 1, len(ng_head + e1), "if_tsresol"
    bad_option = block(L, 1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 2, 400) + b"abcd")
    yield "option past its block", ng_head + e1 + bad_option, 1, len(ng_head + e1), "option 2"


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 20])
@pytest.mark.parametrize("case", list(pcap_cases()), ids=lambda case: case[0])
def test_corrupt_record_stops_reading(
    tmp_path: Path, chunk_bytes: int, case: tuple[str, bytes, int, int, str]
) -> None:
    name, content, kept, offset, fragment = case
    path = write(tmp_path, "bad.cap", content)
    reader = CaptureReader(path, chunk_bytes=chunk_bytes)
    frames = [f for batch in reader for f in frames_of(batch)]
    assert len(frames) == kept == reader.frames_read, name
    assert reader.partial
    assert reader.error is not None
    assert reader.error.offset == offset == reader.bytes_read
    assert str(path) in str(reader.error)
    assert fragment in str(reader.error)
    strict = CaptureReader(path, chunk_bytes=chunk_bytes, strict=True)
    seen: list[bytes] = []
    with pytest.raises(CaptureFileError) as raised:
        seen.extend(f for batch in strict for f in frames_of(batch))
    assert (len(seen), raised.value.offset) == (kept, offset)


def test_corruption_message_names_file_offset_and_values(tmp_path: Path) -> None:
    head, r1 = pcap_header(), pcap_record(L, 1, 0, b"a" * 50)
    garbage = struct.pack("<IIII", 3, 0, 300_000, 60)
    path = write(tmp_path, "bad.pcap", head + r1 + garbage)
    with pytest.raises(CaptureFileError) as raised:
        read_capture(path, strict=True)
    assert str(raised.value) == (
        f"{path}: at byte offset 90: captured length 300000 is over the limit 262144 "
        "(max of snaplen, 262144)"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "too short"),
        (b"\xd4\xc3", "too short"),
        (b"GET / HTTP/1.1\r\n", "not a pcap or pcapng file: magic 47455420"),
    ],
)
def test_not_a_capture_raises_at_offset_0(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = write(tmp_path, "not.cap", content)
    reader = CaptureReader(path)  # nothing is read before iterating
    with pytest.raises(CaptureFileError) as raised:
        list(reader)
    assert raised.value.offset == 0
    assert raised.value.path == str(path)
    assert str(path) in str(raised.value)
    assert fragment in str(raised.value)


@pytest.mark.parametrize("name", ["missing.pcap", "."])
def test_unreadable_file_raises_capture_file_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name  # a missing file, a directory
    with pytest.raises(CaptureFileError, match="cannot open") as raised:
        list(CaptureReader(path))
    assert raised.value.offset == 0
    assert str(path) in str(raised.value)


def test_reads_from_a_pipe(tmp_path: Path) -> None:
    pcap, _, frames = many_records(np.random.default_rng(3), 50)
    path = tmp_path / "fifo"
    os.mkfifo(path)
    feeder = threading.Thread(target=path.write_bytes, args=(pcap,))
    feeder.start()
    try:
        batch = read_capture(path, chunk_bytes=500, strict=True)
    finally:
        feeder.join()
    assert frames_of(batch) == frames


def test_empty_capture_gives_empty_batch(tmp_path: Path) -> None:
    batch = read_capture(
        write(tmp_path, "empty.pcapng", shb(L) + idb(L, 1, 0, opt(L, 2, b"x"))), strict=True
    )
    assert len(batch) == 0
    assert batch.iface_names == ("x",)


# --- arbitrary bytes --------------------------------------------------------------------

VALID = [
    pcap_header(L) + pcap_record(L, 1, 2, b"abc"),
    pcap_header(B, nano=True) + pcap_record(B, 1, 2, b"abc"),
    multi_section()[0],
]


@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(
        st.tuples(
            st.sampled_from([v[:4] for v in VALID] + [v[:40] for v in VALID]),
            st.binary(max_size=300),
        ).map(lambda t: t[0] + t[1]),
        st.tuples(
            st.sampled_from(VALID),
            st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
        ).map(lambda t: bytes(_mutate(t[0], t[1]))),
    ),
    chunk_bytes=st.sampled_from([5, 64, 1 << 20]),
)
def test_arbitrary_bytes_raise_only_capture_file_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk_bytes: int
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.cap"
    path.write_bytes(data)
    reader = CaptureReader(path, chunk_bytes=chunk_bytes, strict=True)
    error: CaptureFileError | None = None
    try:
        for batch in reader:
            assert (batch.offset + batch.caplen <= len(batch.data)).all()
            assert (batch.origlen >= batch.caplen).all()
            assert (batch.caplen >= 0).all()
    except CaptureFileError as exc:
        error = exc
    if error is not None:
        assert error.path == str(path)
        assert 0 <= error.offset <= len(data)


def _mutate(content: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(content)
    for where, value in edits:
        out[where % len(out)] = value
    return out
