"""Tests of the tunnel codec (vspan.wire.tunnel) and its stream/builder (vspan.wire.tunnel_stream).

Expectations come from spec/tunnel.md only: its two test vectors drive both the encode and
the decode tests, and every rule of its "Rules" section has a rejection case below.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.batch import LinkType
from vspan.errors import TunnelError
from vspan.wire.tunnel import (
    AUTH_LEN,
    DEFAULT_PORT,
    FLAG_AUTH,
    HEADER,
    HEADER_LEN,
    MAGIC,
    MAX_UDP_MESSAGE,
    REASONS,
    RECORD_LEN,
    VERSION,
    Message,
    decode_message,
    encode_message,
    parse_header,
)
from vspan.wire.tunnel_stream import NEED_DATA, MessageBuilder, NeedData, StreamDecoder
from vspan.wire.vntag import decode_vntag

# --- the spec's test vectors ------------------------------------------------------------

SPEC = Path(__file__).resolve().parents[4] / "shared" / "spec" / "tunnel.md"
"""``../shared/spec/tunnel.md``: the vectors below are its bytes (checked when it is there)."""

VECTOR_SEQ5 = bytes.fromhex(
    "565301000000007a0000000701020304000000050002000017979cfe362a00010032003217979cfe3631a120"
    "0018004602000000000902000000000589260009000508004500001e00014000401100000a0000050a000009"
    "9c400035000a0000686902000000000502aabbccddee892680050000810000640800"
)
VECTOR_SEQ6 = bytes.fromhex(
    "565301010000008a0000000701020304000000060002000017979cfe362a00010032003217979cfe3631a120"
    "0018004602000000000902000000000589260009000508004500001e00014000401100000a0000050a000009"
    "9c400035000a0000686902000000000502aabbccddee8926800500008100006408005db68337cc20fc32c312"
    "39753d78d60e"
)
KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
COLLECTOR = 7
BOOT_ID = 0x01020304
TS = (1700000000000000001, 1700000000000500000)


def _mac(last: int, prefix: bytes = b"\x02\x00\x00\x00\x00") -> bytes:
    return prefix + bytes([last])


def _vntag(*, d: int, dvif: int, svif: int) -> int:
    # spec/vntag.md masks: d 0x80000000, dvif 0x3FFF0000, svif 0x00000FFF.
    return (d << 31) | (dvif << 16) | svif


# The MAC addresses, IP identification (1), DF flag and TTL (64) are not in the spec's
# prose; they are the values the vector carries. The IPv4 total length is 20 (IP) + 8 (UDP)
# + 2 ("hi") = 30, as the spec says since its correction of 2026-12-07 (it said 32).
VECTOR_IP_TOTAL_LEN = 30
FRAME1 = (
    _mac(9)
    + _mac(5)
    + struct.pack("!HIH", 0x8926, _vntag(d=0, dvif=9, svif=5), 0x0800)
    + struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        VECTOR_IP_TOTAL_LEN,
        1,
        0x4000,
        64,
        17,
        0,  # IP checksum left 0
        socket.inet_aton("10.0.0.5"),
        socket.inet_aton("10.0.0.9"),
    )
    + struct.pack("!HHHH", 40000, 53, 8 + 2, 0)
    + b"hi"
)
FRAME2_WIRE = (
    _mac(5)
    + _mac(0xEE, b"\x02\xaa\xbb\xcc\xdd")
    + struct.pack("!HIHHH", 0x8926, _vntag(d=1, dvif=5, svif=0), 0x8100, 100, 0x0800)
).ljust(70, b"\x45")
FRAME2 = FRAME2_WIRE[:24]


@dataclass(frozen=True)
class Vector:
    name: str
    data: bytes
    seq: int
    key: bytes | None


VECTORS = [Vector("seq5", VECTOR_SEQ5, 5, None), Vector("seq6-auth", VECTOR_SEQ6, 6, KEY)]


def fields(m: Message) -> tuple[object, ...]:
    """Every field of a message as plain Python values, for equality."""
    return (
        m.flags,
        m.length,
        m.collector_id,
        m.boot_id,
        m.seq,
        m.count,
        m.ts_ns.tolist(),
        m.cap_len.tolist(),
        m.orig_len.tolist(),
        bytes(m.frames),
        m.offset.tolist(),
        m.authenticated,
    )


def test_constants_match_the_spec() -> None:
    assert (MAGIC, VERSION, FLAG_AUTH, HEADER_LEN, RECORD_LEN, AUTH_LEN) == (
        0x5653,
        1,
        1,
        24,
        12,
        16,
    )
    assert (DEFAULT_PORT, MAX_UDP_MESSAGE) == (47470, 65507)


def test_frames_built_from_the_spec_are_those_of_the_vector() -> None:
    assert len(FRAME1) == 50
    assert len(FRAME2_WIRE) == 70
    table_end = HEADER_LEN + 2 * RECORD_LEN
    assert VECTOR_SEQ5[table_end:] == FRAME1 + FRAME2
    assert VECTOR_SEQ6[table_end:-AUTH_LEN] == FRAME1 + FRAME2


def test_vector_ip_total_length_matches_its_content() -> None:
    ip = FRAME1[20:]
    assert struct.unpack("!H", ip[2:4])[0] == len(ip)


@pytest.mark.skipif(not SPEC.is_file(), reason="../shared/spec is not beside the repo")
def test_the_vectors_are_the_specs_bytes() -> None:
    blocks = re.findall(r"```\n([0-9a-f]+)\n```", SPEC.read_text(encoding="utf-8"))
    assert [bytes.fromhex(b) for b in blocks] == [VECTOR_SEQ5, VECTOR_SEQ6]


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v.name)
def test_encode_vector(vec: Vector) -> None:
    out = encode_message(
        collector_id=COLLECTOR,
        boot_id=BOOT_ID,
        seq=vec.seq,
        frames=[FRAME1, FRAME2],
        ts_ns=list(TS),
        orig_len=[50, 70],
        key=vec.key,
    )
    assert out.hex() == vec.data.hex()


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v.name)
def test_decode_vector(vec: Vector) -> None:
    keys = {COLLECTOR: vec.key} if vec.key else None
    m = decode_message(vec.data, keys=keys)
    assert (m.flags, m.length, m.authenticated) == ((1, 138, True) if vec.key else (0, 122, False))
    assert (m.collector_id, m.boot_id, m.seq, m.count) == (7, 0x01020304, vec.seq, 2)
    assert m.ts_ns.tolist() == [1700000000000000001, 1700000000000500000]
    assert m.cap_len.tolist() == [50, 24]
    assert m.orig_len.tolist() == [50, 70]
    assert m.offset.tolist() == [0, 50]
    assert [a.dtype.name for a in (m.ts_ns, m.cap_len, m.orig_len, m.offset)] == [
        "int64",
        "int32",
        "int32",
        "int64",
    ]
    f1, f2 = m.frame(0), m.frame(1)
    assert (f1, f2) == (FRAME1, FRAME2)
    tag1, tag2 = decode_vntag(f1, 14), decode_vntag(f2, 14)
    assert (tag1.d, tag1.svif, tag1.dvif, tag1.ethertype) == (0, 5, 9, 0x0800)
    assert (tag2.d, tag2.svif, tag2.dvif, tag2.ethertype) == (1, 0, 5, 0x8100)
    assert struct.unpack("!HH", f2[20:24]) == (100, 0x0800)  # VLAN 100, then IPv4
    ip = f1[20:40]
    assert ip[9] == 17  # UDP
    assert socket.inet_ntoa(ip[12:16]) == "10.0.0.5"
    assert socket.inet_ntoa(ip[16:20]) == "10.0.0.9"
    assert struct.unpack("!HH", f1[40:44]) == (40000, 53)
    assert f1[48:] == b"hi"


def test_auth_vector_without_a_key_is_accepted_unverified() -> None:
    m = decode_message(VECTOR_SEQ6)
    assert (m.flags, m.authenticated, m.count) == (FLAG_AUTH, False, 2)
    assert bytes(m.frames) == FRAME1 + FRAME2


def test_to_batch() -> None:
    batch = decode_message(VECTOR_SEQ5).to_batch()
    assert len(batch) == 2
    assert [batch.frame(0), batch.frame(1)] == [FRAME1, FRAME2]
    assert batch.host_column().tolist() == [7, 7]
    assert batch.linktype.tolist() == [LinkType.ETHERNET] * 2
    assert batch.origlen.tolist() == [50, 70]
    assert batch.ts_ns.tolist() == list(TS)


def test_decode_copies_a_mutable_buffer() -> None:
    buf = bytearray(VECTOR_SEQ5)
    m = decode_message(buf)
    buf[48:] = bytes(len(buf) - 48)
    assert m.frame(0) == FRAME1


# --- rejections -------------------------------------------------------------------------


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def raw(
    records: list[tuple[int, int, int]], area: bytes, *, flags: int = 0, collector: int = 7
) -> bytes:
    """A message built by hand, whatever its validity (no tag appended)."""
    length = HEADER_LEN + RECORD_LEN * len(records) + len(area)
    length += AUTH_LEN if flags & FLAG_AUTH else 0
    head = HEADER.pack(MAGIC, VERSION, flags, length, collector, 0, 0, len(records), 0)
    table = b"".join(struct.pack("!QHH", *r) for r in records)
    return head + table + area + (bytes(AUTH_LEN) if flags & FLAG_AUTH else b"")


@dataclass(frozen=True)
class Reject:
    name: str
    data: bytes
    message: str
    keys: Mapping[int, bytes] | None = None
    require_known: bool = False

    @property
    def reason(self) -> str:
        return self.message.split(":", 1)[0]


REJECTS = [
    Reject("short", VECTOR_SEQ5[:10], "bad_length: 10 bytes, a header needs 24"),
    Reject(
        "magic",
        patch(VECTOR_SEQ5, 0, "!H", 0x5654),
        "bad_magic: magic 0x5654 at offset 0, expected 0x5653",
    ),
    Reject(
        "version", patch(VECTOR_SEQ5, 2, "B", 2), "bad_version: version 2 at offset 2, expected 1"
    ),
    Reject(
        "flag",
        patch(VECTOR_SEQ5, 3, "B", 0x02),
        "bad_flags: flags 0x02 at offset 3 set unknown bits 0x02, expected only 0x01",
    ),
    Reject(
        "flag-with-auth",
        patch(VECTOR_SEQ6, 3, "B", 0x81),
        "bad_flags: flags 0x81 at offset 3 set unknown bits 0x80, expected only 0x01",
        keys={7: KEY},
    ),
    Reject(
        "collector-0",
        patch(VECTOR_SEQ5, 8, "!I", 0),
        "bad_collector: collector_id 0 at offset 8, expected non-zero",
    ),
    Reject(
        "length-long",
        patch(VECTOR_SEQ5, 4, "!I", 130),
        "bad_length: header says 130 bytes, datagram has 122",
    ),
    Reject("datagram-cut", VECTOR_SEQ5[:-1], "bad_length: header says 122 bytes, datagram has 121"),
    Reject(
        "datagram-extra",
        VECTOR_SEQ5 + b"\x00",
        "bad_length: header says 122 bytes, datagram has 123",
    ),
    Reject(
        "count-vs-length",
        patch(VECTOR_SEQ5, 20, "!H", 9),
        "bad_length: header says 122 bytes, 9 records need at least 132",
    ),
    Reject(
        "no-room-for-tag",
        HEADER.pack(MAGIC, VERSION, FLAG_AUTH, 24, 7, 0, 0, 0, 0),
        "bad_length: header says 24 bytes, 0 records and the tag need at least 40",
    ),
    Reject(
        "frames-short-of-area",
        patch(VECTOR_SEQ5, 44, "!H", 23),
        "bad_length: records' cap_len sum to 73 bytes, frames area at offset 48 has 74",
    ),
    Reject(
        "frames-beyond-area",
        patch(VECTOR_SEQ5, 32, "!H", 51),
        "bad_length: records' cap_len sum to 75 bytes, frames area at offset 48 has 74",
    ),
    Reject(
        "cap-over-orig",
        patch(VECTOR_SEQ5, 34, "!H", 49),
        "bad_record: frame 0 at offset 48: cap_len 50 exceeds orig_len 49",
    ),
    Reject(
        "frame-17-bytes",
        raw([(0, 50, 50), (0, 17, 17)], FRAME1 + FRAME2[:17]),
        "bad_record: frame 1 at offset 98: 17 bytes, a VN-tagged frame has at least 18",
    ),
    Reject(
        "frame-empty",
        raw([(0, 0, 0)], b""),
        "bad_record: frame 0 at offset 36: 0 bytes, a VN-tagged frame has at least 18",
    ),
    Reject(
        "not-vn-tagged",
        patch(VECTOR_SEQ5, 98 + 12, "!H", 0x8100),
        "bad_record: frame 1 at offset 98: EtherType 0x8100 at frame offset 12, expected 0x8926",
    ),
    Reject(
        "first-bad-frame-is-named",
        raw([(0, 18, 18), (0, 20, 19)], FRAME2[:12] + b"\x08\x00" + bytes(4) + FRAME1[:20]),
        "bad_record: frame 0 at offset 48: EtherType 0x0800 at frame offset 12, expected 0x8926",
    ),
    Reject(
        "auth-missing",
        VECTOR_SEQ5,
        "bad_auth: collector_id 7 has a key configured, AUTH flag not set",
        keys={7: KEY},
    ),
    Reject(
        "wrong-key",
        VECTOR_SEQ6,
        "bad_auth: tag at offset 122 does not verify with the key of collector_id 7",
        keys={7: bytes(16)},
    ),
    Reject(
        "auth-before-records",
        patch(patch(VECTOR_SEQ6, 34, "!H", 49), 110, "!H", 0),
        "bad_auth: tag at offset 122 does not verify with the key of collector_id 7",
        keys={7: KEY},
    ),
    Reject(
        "require-known-no-keys",
        VECTOR_SEQ5,
        "unknown_collector: collector_id 7 has no configured key and only known collectors "
        "are accepted",
        require_known=True,
    ),
    Reject(
        "require-known-other-key",
        VECTOR_SEQ6,
        "unknown_collector: collector_id 7 has no configured key and only known collectors "
        "are accepted",
        keys={8: KEY},
        require_known=True,
    ),
]


@pytest.mark.parametrize("case", REJECTS, ids=lambda c: c.name)
def test_reject(case: Reject) -> None:
    with pytest.raises(TunnelError) as info:
        decode_message(case.data, keys=case.keys, require_known=case.require_known)
    assert str(info.value) == case.message
    assert info.value.reason == case.reason


def test_every_reason_has_a_rejection_case() -> None:
    assert {case.reason for case in REJECTS} == set(REASONS)


def test_known_collector_is_accepted_with_require_known() -> None:
    m = decode_message(VECTOR_SEQ6, keys={7: KEY}, require_known=True)
    assert m.authenticated


def _flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("byte", range(len(VECTOR_SEQ6)))
def test_bit_flips_in_the_auth_vector(byte: int) -> None:
    for bit in range(byte * 8, byte * 8 + 8):
        data = _flipped(VECTOR_SEQ6, bit)
        if 8 <= byte < 12:
            # Another collector_id, which has no key: accepted but not authenticated,
            # and refused when only known collectors are accepted.
            assert not decode_message(data, keys={7: KEY}).authenticated
            with pytest.raises(TunnelError, match=r"^unknown_collector: "):
                decode_message(data, keys={7: KEY}, require_known=True)
            continue
        with pytest.raises(TunnelError) as info:
            decode_message(data, keys={7: KEY})
        if 12 <= byte < 20 or byte >= 22:  # boot_id, seq, reserved, table, frames, tag
            assert str(info.value) == (
                "bad_auth: tag at offset 122 does not verify with the key of collector_id 7"
            )


# --- encode's validation ----------------------------------------------------------------

ENCODE_ERRORS: list[tuple[str, dict[str, object], str]] = [
    ("collector-0", {"collector_id": 0}, "collector_id 0 out of range 1..4294967295"),
    ("seq-2^32", {"seq": 1 << 32}, "seq 4294967296 out of range"),
    ("boot-negative", {"boot_id": -1}, "boot_id -1 out of range"),
    ("frame-17", {"frames": [FRAME1, FRAME2[:17]]}, "frame 1 at offset 98: 17 bytes"),
    (
        "not-tagged",
        {"frames": [FRAME1[:12] + b"\x08\x00" + FRAME1[14:], FRAME2]},
        "frame 0 at offset 48: EtherType 0x0800 at frame offset 12, expected 0x8926",
    ),
    ("cap-over-orig", {"orig_len": [50, 23]}, "frame 1 at offset 98: cap_len 24 exceeds"),
    ("orig-65536", {"orig_len": [50, 65536]}, "frame 1: orig_len 65536 out of range 0..65535"),
    (
        "frame-65536",
        {"frames": [FRAME1, FRAME2.ljust(65536, b"x")], "orig_len": None},
        "frame 1: cap_len 65536 out of range 0..65535",
    ),
    ("count-65536", {"frames": [FRAME2] * 65536}, "65536 frames, a message holds at most 65535"),
    ("ts-count", {"ts_ns": [1]}, "2 frames but 1 ts_ns and 2 orig_len"),
    ("ts-2^63", {"ts_ns": [1 << 63, 0]}, "ts_ns or orig_len out of range"),
]


@pytest.mark.parametrize(
    ("name", "change", "message"), ENCODE_ERRORS, ids=[case[0] for case in ENCODE_ERRORS]
)
def test_encode_rejects(name: str, change: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "collector_id": 7,
        "boot_id": 1,
        "seq": 0,
        "frames": [FRAME1, FRAME2],
        "ts_ns": list(TS),
        "orig_len": [50, 70],
    }
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        encode_message(**args)  # type: ignore[arg-type]


def test_encode_negative_ts_is_the_u64_bit_pattern() -> None:
    data = encode_message(collector_id=1, boot_id=0, seq=0, frames=[FRAME2], ts_ns=[-1])
    assert data[24:32] == b"\xff" * 8
    assert decode_message(data).ts_ns.tolist() == [-1]


def test_empty_message_round_trips() -> None:
    data = encode_message(collector_id=3, boot_id=4, seq=5, frames=[], ts_ns=[])
    assert data == HEADER.pack(MAGIC, VERSION, 0, 24, 3, 4, 5, 0, 0)
    m = decode_message(data)
    assert (m.count, bytes(m.frames), len(m.to_batch())) == (0, b"", 0)


def test_parse_header_needs_only_24_bytes() -> None:
    header = parse_header(VECTOR_SEQ6[:24], keys={7: KEY})
    assert (header.length, header.collector_id, header.count, header.tag_len) == (138, 7, 2, 16)


# --- stream decoder ---------------------------------------------------------------------

KEY9 = hashlib.blake2b(b"collector 9").digest()[:32]
STREAM_KEYS = {9: KEY9}
STREAM_MESSAGES = [
    VECTOR_SEQ5,
    VECTOR_SEQ6,
    encode_message(collector_id=9, boot_id=1, seq=0, frames=[], ts_ns=[], key=KEY9),
    encode_message(
        collector_id=9, boot_id=1, seq=1, frames=[FRAME1, FRAME2, FRAME1], ts_ns=[1, 2, 3], key=KEY9
    ),
    encode_message(collector_id=8, boot_id=2, seq=0, frames=[FRAME2], ts_ns=[5], orig_len=[70]),
]
STREAM = b"".join(STREAM_MESSAGES)
EXPECTED = [fields(decode_message(m, keys=STREAM_KEYS)) for m in STREAM_MESSAGES]


def drain(decoder: StreamDecoder) -> list[tuple[object, ...]]:
    out = []
    while (m := decoder.next_message()) is not NEED_DATA:
        assert isinstance(m, Message)
        out.append(fields(m))
    return out


def feed_chunks(
    chunks: list[bytes], keys: Mapping[int, bytes] | None = STREAM_KEYS
) -> list[tuple[object, ...]]:
    decoder = StreamDecoder(keys=keys)
    out: list[tuple[object, ...]] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out += drain(decoder)
    decoder.end_of_stream()
    assert decoder.buffered == 0
    return out


def test_stream_in_one_feed() -> None:
    assert feed_chunks([STREAM]) == EXPECTED


def test_stream_split_at_every_point() -> None:
    for i in range(1, len(STREAM)):
        assert feed_chunks([STREAM[:i], STREAM[i:]]) == EXPECTED, f"split at {i}"


def test_stream_byte_by_byte() -> None:
    assert feed_chunks([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_stream_empty_feeds_change_nothing() -> None:
    assert feed_chunks([b"", STREAM[:30], b"", STREAM[30:], b""]) == EXPECTED


def test_need_data_is_an_enum_member() -> None:
    assert isinstance(NEED_DATA, NeedData)
    assert StreamDecoder().next_message() is NEED_DATA


def _broken(decoder: StreamDecoder, message: str) -> None:
    with pytest.raises(TunnelError) as first:
        decoder.next_message()
    assert str(first.value) == message
    for call in (decoder.next_message, decoder.end_of_stream, lambda: decoder.feed(STREAM)):
        with pytest.raises(TunnelError) as again:
            call()
        assert again.value is first.value


def test_stream_garbage_is_rejected_and_stays_broken() -> None:
    decoder = StreamDecoder()
    decoder.feed(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    _broken(decoder, "bad_magic: magic 0x4745 at offset 0, expected 0x5653")


def test_stream_rejects_a_header_before_its_body_arrives() -> None:
    decoder = StreamDecoder(max_message=1000)
    decoder.feed(HEADER.pack(MAGIC, VERSION, 0, 1001, 7, 0, 0, 0, 0))
    _broken(
        decoder, "bad_length: header says 1001 bytes, more than the stream's max_message of 1000"
    )
    decoder = StreamDecoder(keys={7: KEY})
    decoder.feed(VECTOR_SEQ5[:24])
    _broken(decoder, "bad_auth: collector_id 7 has a key configured, AUTH flag not set")


def test_stream_valid_message_then_garbage() -> None:
    decoder = StreamDecoder()
    decoder.feed(VECTOR_SEQ5 + patch(VECTOR_SEQ5, 2, "B", 9))
    assert isinstance(decoder.next_message(), Message)
    _broken(decoder, "bad_version: version 9 at offset 2, expected 1")


def test_stream_validates_whole_messages() -> None:
    decoder = StreamDecoder(keys={7: KEY})
    decoder.feed(_flipped(VECTOR_SEQ6, 8 * 130))
    _broken(decoder, "bad_auth: tag at offset 122 does not verify with the key of collector_id 7")


def test_current_collector_names_the_sender_of_a_whole_message_that_failed() -> None:
    decoder = StreamDecoder(keys={7: KEY})
    decoder.feed(VECTOR_SEQ6 + _flipped(VECTOR_SEQ6, 8 * 130))
    assert isinstance(decoder.next_message(), Message)
    with pytest.raises(TunnelError, match="bad_auth"):
        decoder.next_message()
    assert decoder.current_collector == 7


@pytest.mark.parametrize(
    ("partial", "message"),
    [
        (VECTOR_SEQ5[:10], "10 bytes buffered, message needs at least 24"),
        (VECTOR_SEQ5[:50], "50 bytes buffered, message needs 122"),
        (VECTOR_SEQ5 + VECTOR_SEQ6[:137], "137 bytes buffered, message needs 138"),
    ],
)
def test_end_of_stream_inside_a_message(partial: bytes, message: str) -> None:
    decoder = StreamDecoder()
    decoder.feed(partial)
    drain(decoder)
    with pytest.raises(TunnelError) as info:
        decoder.end_of_stream()
    assert str(info.value) == f"bad_length: stream ended inside a message: {message}"
    with pytest.raises(TunnelError):
        decoder.next_message()


def test_feed_after_end_of_stream_is_a_caller_bug() -> None:
    decoder = StreamDecoder()
    decoder.end_of_stream()
    with pytest.raises(RuntimeError):
        decoder.feed(VECTOR_SEQ5)


def test_stream_buffer_does_not_grow_with_the_stream() -> None:
    decoder = StreamDecoder(keys=STREAM_KEYS)
    for _ in range(200):
        decoder.feed(STREAM)
        assert len(drain(decoder)) == len(STREAM_MESSAGES)
        assert decoder.buffered == 0
    assert len(decoder._buf) <= len(STREAM)


def test_stream_holds_at_most_a_datagram_by_default() -> None:
    # What a UDP datagram can carry is the default bound: a header announcing more is
    # rejected at its 24th byte, before anything is buffered or any tag checked.
    at_bound = StreamDecoder()
    at_bound.feed(HEADER.pack(MAGIC, VERSION, 0, 65535, 7, 0, 0, 0, 0))
    assert at_bound.next_message() is NEED_DATA
    beyond = StreamDecoder()
    beyond.feed(HEADER.pack(MAGIC, VERSION, 0, 65536, 7, 0, 0, 0, 0))
    _broken(
        beyond, "bad_length: header says 65536 bytes, more than the stream's max_message of 65535"
    )
    assert beyond.current_collector == 7


def test_next_raw_gives_the_bytes_of_each_validated_message() -> None:
    decoder = StreamDecoder(keys=STREAM_KEYS)
    decoder.feed(STREAM[:100])
    got = []
    while (raw := decoder.next_raw()) is not NEED_DATA:
        got.append(raw)
    decoder.feed(STREAM[100:])
    while (raw := decoder.next_raw()) is not NEED_DATA:
        got.append(raw)
    assert got == STREAM_MESSAGES
    bad = StreamDecoder(keys={7: KEY})
    bad.feed(_flipped(VECTOR_SEQ6, 8 * 130))
    with pytest.raises(TunnelError, match="bad_auth"):
        bad.next_raw()


def test_registered_collectors_pass_require_known_without_a_key() -> None:
    registered: set[int] = set()
    decoder = StreamDecoder(require_known=True, registered=registered)
    registered.add(7)  # registered while the stream lasts
    decoder.feed(VECTOR_SEQ5)
    assert isinstance(decoder.next_message(), Message)
    other = StreamDecoder(require_known=True, registered={8})
    other.feed(VECTOR_SEQ5)
    _broken(other, "unknown_collector: collector_id 7 has no configured key and only known "
            "collectors are accepted")  # fmt: skip
    assert other.current_collector == 7


def test_current_collector_is_0_without_a_readable_header() -> None:
    decoder = StreamDecoder()
    decoder.feed(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    with pytest.raises(TunnelError):
        decoder.next_message()
    assert decoder.current_collector == 0


# --- message builder --------------------------------------------------------------------


def test_builder_reproduces_the_vectors() -> None:
    for vec in VECTORS:
        builder = MessageBuilder(collector_id=7, boot_id=BOOT_ID, first_seq=vec.seq, key=vec.key)
        assert builder.add(FRAME1, TS[0]) is None
        assert builder.add(FRAME2, TS[1], orig_len=70) is None
        assert (builder.pending_frames, builder.pending_bytes) == (2, len(vec.data))
        assert builder.flush() == vec.data
        assert (builder.pending_frames, builder.pending_bytes, builder.next_seq) == (
            0,
            0,
            vec.seq + 1,
        )
        assert builder.flush() is None


def test_builder_returns_the_full_message_when_the_next_frame_does_not_fit() -> None:
    builder = MessageBuilder(collector_id=7, boot_id=1, max_message=24 + 2 * (12 + 50))
    assert builder.add(FRAME1, 1) is None
    assert builder.add(FRAME1, 2) is None
    assert builder.pending_bytes == 148
    done = builder.add(FRAME2, 3)
    assert done is not None
    assert len(done) == 148
    assert decode_message(done).ts_ns.tolist() == [1, 2]
    assert builder.pending_frames == 1


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("max_message", [70, 71, 100, 1400, 8900, MAX_UDP_MESSAGE])
def test_builder_keeps_messages_within_max_message(max_message: int, key: bytes | None) -> None:
    rng = np.random.default_rng(max_message)
    sizes = rng.integers(18, 9000, size=300)
    frames = [FRAME1[:14] + bytes(rng.integers(0, 256, size=s - 14, dtype=np.uint8)) for s in sizes]
    builder = MessageBuilder(collector_id=7, boot_id=9, max_message=max_message, key=key)
    messages = [m for i, f in enumerate(frames) if (m := builder.add(f, i)) is not None]
    last = builder.flush()
    assert last is not None
    messages.append(last)
    assert all(len(m) <= max_message for m in messages)
    decoded = [decode_message(m, keys={7: key} if key else None) for m in messages]
    assert [m.seq for m in decoded] == list(range(len(messages)))
    room = max_message - HEADER_LEN - RECORD_LEN - (AUTH_LEN if key else 0)
    got = [m.frame(i) for m in decoded for i in range(m.count)]
    assert got == [f[:room] for f in frames]
    assert [int(x) for m in decoded for x in m.orig_len] == sizes.tolist()
    assert [int(x) for m in decoded for x in m.ts_ns] == list(range(len(frames)))
    assert builder.truncated == sum(len(f) > room for f in frames)
    assert builder.messages == len(messages)


def test_builder_truncates_a_frame_too_large_for_one_message() -> None:
    builder = MessageBuilder(collector_id=7, boot_id=1, max_message=100, key=KEY)
    assert builder.add(FRAME2_WIRE, 1) is None
    data = builder.flush()
    assert data is not None
    assert len(data) == 100
    m = decode_message(data, keys={7: KEY})
    assert (m.cap_len.tolist(), m.orig_len.tolist()) == ([48], [70])
    assert m.frame(0) == FRAME2_WIRE[:48]
    assert builder.truncated == 1


def test_builder_seq_wraps_at_2_to_the_32() -> None:
    builder = MessageBuilder(collector_id=7, boot_id=1, first_seq=(1 << 32) - 2)
    seqs = []
    for i in range(4):
        builder.add(FRAME1, i)
        data = builder.flush()
        assert data is not None
        seqs.append(decode_message(data).seq)
    assert seqs == [(1 << 32) - 2, (1 << 32) - 1, 0, 1]
    assert builder.next_seq == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_message": 69}, "max_message 69 below 70, the smallest message"),
        ({"max_message": 53, "key": None}, "max_message 53 below 54"),
        ({"collector_id": 0}, "collector_id 0 out of range 1..4294967295"),
        ({"first_seq": 1 << 32}, "first_seq 4294967296 out of range"),
        ({"key": bytes(65)}, "key of 65 bytes, BLAKE2b takes at most 64"),
    ],
)
def test_builder_rejects_bad_settings(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"collector_id": 7, "boot_id": 1, "key": KEY}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MessageBuilder(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("frame", "orig_len", "message"),
    [
        (FRAME1[:17], None, "frame of 17 bytes is not VN-tagged"),
        (FRAME1[:12] + b"\x81\x00" + FRAME1[14:], None, "is not VN-tagged"),
        (FRAME1, 49, "orig_len 49 out of range 50..65535"),
        (FRAME1, 65536, "orig_len 65536 out of range"),
    ],
)
def test_builder_rejects_bad_frames(frame: bytes, orig_len: int | None, message: str) -> None:
    builder = MessageBuilder(collector_id=7, boot_id=1)
    with pytest.raises(ValueError, match=message):
        builder.add(frame, 0, orig_len)
    assert builder.pending_frames == 0


# --- properties -------------------------------------------------------------------------

U32 = st.integers(0, (1 << 32) - 1)
I64 = st.integers(-(1 << 63), (1 << 63) - 1)
vn_frames = st.builds(
    lambda head, tail: head + b"\x89\x26" + tail,
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=4, max_size=120),
)


@dataclass(frozen=True)
class Args:
    """The arguments of one ``encode_message`` call."""

    collector_id: int
    boot_id: int
    seq: int
    frames: list[bytes]
    ts_ns: list[int]
    orig_len: list[int]
    key: bytes | None

    def encode(self, key: bytes | None) -> bytes:
        return encode_message(
            collector_id=self.collector_id,
            boot_id=self.boot_id,
            seq=self.seq,
            frames=self.frames,
            ts_ns=self.ts_ns,
            orig_len=self.orig_len,
            key=key,
        )


@st.composite
def message_args(draw: st.DrawFn) -> Args:
    frames = draw(st.lists(vn_frames, max_size=6))
    n = len(frames)
    extra = draw(st.lists(st.integers(0, 2000), min_size=n, max_size=n))
    return Args(
        collector_id=draw(st.integers(1, (1 << 32) - 1)),
        boot_id=draw(U32),
        seq=draw(U32),
        frames=frames,
        ts_ns=draw(st.lists(I64, min_size=n, max_size=n)),
        orig_len=[len(f) + e for f, e in zip(frames, extra, strict=True)],
        key=draw(st.none() | st.binary(max_size=64)),
    )


@settings(deadline=None)
@given(message_args())
def test_property_decode_inverts_encode(args: Args) -> None:
    data = args.encode(args.key)
    keys = None if args.key is None else {args.collector_id: args.key}
    m = decode_message(data, keys=keys)
    assert (m.collector_id, m.boot_id, m.seq, m.count, m.length) == (
        args.collector_id,
        args.boot_id,
        args.seq,
        len(args.frames),
        len(data),
    )
    assert m.flags == (0 if args.key is None else FLAG_AUTH)
    assert [m.frame(i) for i in range(m.count)] == args.frames
    assert m.ts_ns.tolist() == args.ts_ns
    assert m.orig_len.tolist() == args.orig_len
    assert m.authenticated == (args.key is not None)
    again = encode_message(
        collector_id=m.collector_id,
        boot_id=m.boot_id,
        seq=m.seq,
        frames=[m.frame(i) for i in range(m.count)],
        ts_ns=m.ts_ns,
        orig_len=m.orig_len.tolist(),
        key=args.key,
    )
    assert again == data


def _decode_or_tunnel_error(
    data: bytes, *, keys: Mapping[int, bytes] | None = None, stream: bool = False
) -> None:
    for require_known in (False, True):
        reason = None
        try:
            decode_message(data, keys=keys, require_known=require_known, stream=stream)
        except TunnelError as exc:
            reason = exc.reason
        assert reason is None or reason in REASONS


@settings(deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_property_arbitrary_bytes_raise_only_tunnel_error(
    data: bytes, keyed: bool, stream: bool
) -> None:
    _decode_or_tunnel_error(data, keys={7: KEY} if keyed else None, stream=stream)


@settings(deadline=None)
@given(
    flags=st.sampled_from([0, FLAG_AUTH]),
    collector=st.sampled_from([0, 7, 8]),
    records=st.lists(
        st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, 40), st.integers(0, 40)),
        max_size=4,
    ),
    body=st.binary(max_size=200),
    fill=st.booleans(),
    keyed=st.booleans(),
)
def test_property_arbitrary_bytes_behind_a_valid_header_raise_only_tunnel_error(
    *,
    flags: int,
    collector: int,
    records: list[tuple[int, int, int]],
    body: bytes,
    fill: bool,
    keyed: bool,
) -> None:
    if fill:  # make the frames area exactly the table's sum, to reach the record checks
        total = sum(r[1] for r in records)
        body = (body * total)[:total].ljust(total, b"\x89")
    data = raw(records, body, flags=flags, collector=collector)
    _decode_or_tunnel_error(data, keys={7: KEY} if keyed else None)
    for extra in (b"", b"\x00"):
        _decode_or_tunnel_error(data + extra, stream=True)


@settings(deadline=None)
@given(st.lists(message_args(), min_size=1, max_size=4), st.data())
def test_property_stream_over_random_chunkings(many: list[Args], data: st.DataObject) -> None:
    keys: dict[int, bytes] = {}
    for args in many:  # the first key drawn for a collector is its key for the whole stream
        if args.key is not None:
            keys.setdefault(args.collector_id, args.key)
    messages = [args.encode(keys.get(args.collector_id)) for args in many]
    stream = b"".join(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    expected = [fields(decode_message(m, keys=keys)) for m in messages]
    assert feed_chunks(chunks, keys=keys) == expected
