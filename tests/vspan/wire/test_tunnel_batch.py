"""Tests of vspan.wire.tunnel_batch: the vectorized encoder, held to MessageBuilder byte for byte.

The spec's two test vectors come back from ``encode_batch`` exactly; for random batches the
messages equal what the sans-I/O ``MessageBuilder`` (the reference) produces for the same
frames, and every message decodes with ``decode_message``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.batch import FrameBatch
from vspan.wire.tunnel import AUTH_LEN, HEADER_LEN, RECORD_LEN, decode_message
from vspan.wire.tunnel_batch import (
    GATHER_STEP,
    concat_batches,
    encode_batch,
    gather_runs,
    plan_messages,
    slice_batch,
)
from vspan.wire.tunnel_stream import MessageBuilder

# spec/tunnel.md's vectors (IPv4 total length 30 since its correction of 2026-12-07).
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
KEY = bytes(range(16))


def tagged(size: int, fill: int = 0) -> bytes:
    """A VN-tagged frame of ``size`` bytes (at least 18)."""
    body = bytes((fill + i) % 251 for i in range(size))
    return body[:12] + b"\x89\x26" + body[14:]


def batch_of(frames: list[bytes], origlen: list[int] | None = None) -> FrameBatch:
    ts = [1_700_000_000_000_000_000 + 1000 * i for i in range(len(frames))]
    return FrameBatch.from_frames(frames, ts_ns=ts, origlen=origlen)


def builder_messages(
    frames: FrameBatch, *, first_seq: int, max_message: int, key: bytes | None
) -> tuple[list[bytes], int]:
    builder = MessageBuilder(
        collector_id=7, boot_id=0x01020304, max_message=max_message, key=key, first_seq=first_seq
    )
    out: list[bytes] = []
    for i in range(len(frames)):
        done = builder.add(frames.frame(i), int(frames.ts_ns[i]), int(frames.origlen[i]))
        if done is not None:
            out.append(done)
    last = builder.flush()
    if last is not None:
        out.append(last)
    return out, builder.next_seq


@pytest.mark.parametrize(("seq", "key", "vector"), [(5, None, VECTOR_SEQ5), (6, KEY, VECTOR_SEQ6)])
def test_spec_vectors(seq: int, key: bytes | None, vector: bytes) -> None:
    msg = decode_message(vector)
    frames = [msg.frame(i) for i in range(msg.count)]
    batch = FrameBatch.from_frames(frames, ts_ns=msg.ts_ns, origlen=msg.orig_len)
    messages, next_seq = encode_batch(
        batch, collector_id=7, boot_id=0x01020304, first_seq=seq, max_message=1400, key=key
    )
    assert messages == [vector]
    assert next_seq == seq + 1


def test_empty_batch_gives_no_message() -> None:
    messages, next_seq = encode_batch(
        batch_of([]), collector_id=1, boot_id=2, first_seq=9, max_message=1400
    )
    assert (messages, next_seq) == ([], 9)


def test_seq_wraps_modulo_2_32() -> None:
    frames = batch_of([tagged(600, i) for i in range(4)])
    messages, next_seq = encode_batch(
        frames, collector_id=1, boot_id=2, first_seq=2**32 - 1, max_message=1400
    )
    seqs = [decode_message(m).seq for m in messages]
    assert seqs == [2**32 - 1, 0]
    assert next_seq == 1


def test_too_large_frame_is_cut_alone_and_keeps_orig_len() -> None:
    frames = batch_of([tagged(100), tagged(5000, 3), tagged(100, 5)])
    messages, _ = encode_batch(frames, collector_id=1, boot_id=2, first_seq=0, max_message=1400)
    assert len(messages) == 3
    big = decode_message(messages[1])
    room = 1400 - HEADER_LEN - RECORD_LEN
    assert (big.count, int(big.cap_len[0]), int(big.orig_len[0])) == (1, room, 5000)
    assert len(messages[1]) == 1400
    assert bytes(big.frames) == tagged(5000, 3)[:room]
    plan = plan_messages(frames.caplen, max_message=1400)
    assert plan.truncated == 1
    assert plan.bounds.tolist() == [0, 1, 2, 3]


def test_a_message_holds_at_most_65535_frames() -> None:
    frames = batch_of([tagged(18)] * 70_000)
    messages, next_seq = encode_batch(
        frames, collector_id=1, boot_id=2, first_seq=0, max_message=4 << 20
    )
    assert [decode_message(m, stream=True).count for m in messages] == [65535, 4465]
    assert next_seq == 2


def test_orig_len_above_65535_saturates() -> None:
    frames = batch_of([tagged(64)], origlen=[70_000])
    (message,), _ = encode_batch(frames, collector_id=1, boot_id=2, first_seq=0, max_message=1400)
    assert int(decode_message(message).orig_len[0]) == 65535


@pytest.mark.parametrize(
    ("frame", "index"),
    [(b"\x00" * 17, 1), (b"\x00" * 20, 1), (tagged(40)[:12] + b"\x81\x00" + bytes(26), 1)],
)
def test_untagged_frame_is_rejected(frame: bytes, index: int) -> None:
    frames = batch_of([tagged(40), frame])
    with pytest.raises(ValueError, match=rf"^frame {index} of {len(frame)} bytes is not VN-tagged"):
        encode_batch(frames, collector_id=1, boot_id=2, first_seq=0, max_message=1400)


def test_errors_match_the_builder() -> None:
    frames = batch_of([tagged(40)])
    for key, size in ((None, 53), (KEY, 69)):
        message = f"^max_message {size} below {size + 1}, the smallest message$"
        with pytest.raises(ValueError, match=message):
            encode_batch(frames, collector_id=1, boot_id=2, first_seq=0, max_message=size, key=key)
        with pytest.raises(ValueError, match=message):
            MessageBuilder(collector_id=1, boot_id=2, max_message=size, key=key)
    with pytest.raises(ValueError, match=r"^collector_id 0 out of range"):
        encode_batch(frames, collector_id=0, boot_id=2, first_seq=0, max_message=1400)
    with pytest.raises(ValueError, match=r"^first_seq 4294967296 out of range"):
        encode_batch(frames, collector_id=1, boot_id=2, first_seq=2**32, max_message=1400)
    with pytest.raises(ValueError, match="key of 65 bytes"):
        encode_batch(
            frames, collector_id=1, boot_id=2, first_seq=0, max_message=1400, key=bytes(65)
        )


def test_frames_may_sit_anywhere_in_the_buffer() -> None:
    """Offsets need not be packed: a reader's batch has record headers between frames."""
    a, b = tagged(30, 1), tagged(50, 2)
    data = np.frombuffer(b"xxxx" + a + b"yy" + b, dtype=np.uint8).copy()
    batch = FrameBatch(
        data=data,
        offset=np.array([4, 4 + 30 + 2], np.int64),
        caplen=np.array([30, 50], np.int32),
        origlen=np.array([30, 60], np.int32),
        ts_ns=np.array([1, 2], np.int64),
        linktype=np.ones(2, np.uint16),
    )
    (message,), _ = encode_batch(batch, collector_id=3, boot_id=4, first_seq=0, max_message=1400)
    decoded = decode_message(message)
    assert bytes(decoded.frames) == a + b
    assert decoded.orig_len.tolist() == [30, 60]


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(18, 3000), max_size=40),
    max_message=st.integers(70, 9000),
    with_key=st.booleans(),
    first_seq=st.sampled_from([0, 1, 2**32 - 3]),
    extra=st.lists(st.integers(0, 300), max_size=40),
)
def test_matches_message_builder(
    sizes: list[int], max_message: int, with_key: bool, first_seq: int, extra: list[int]
) -> None:
    key = KEY if with_key else None
    frames_bytes = [tagged(size, i) for i, size in enumerate(sizes)]
    origlen = [size + (extra[i] if i < len(extra) else 0) for i, size in enumerate(sizes)]
    frames = batch_of(frames_bytes, origlen)
    got, next_seq = encode_batch(
        frames,
        collector_id=7,
        boot_id=0x01020304,
        first_seq=first_seq,
        max_message=max_message,
        key=key,
    )
    want, want_seq = builder_messages(frames, first_seq=first_seq, max_message=max_message, key=key)
    assert got == want
    assert next_seq == want_seq
    keys = {7: key} if key is not None else None
    sent = b""
    for message in got:
        assert len(message) <= max_message
        decoded = decode_message(message, keys=keys)
        assert decoded.authenticated == with_key
        assert len(decoded.frames) == int(decoded.cap_len.sum())
        sent += bytes(decoded.frames)
        if key is not None:
            assert len(message) >= HEADER_LEN + AUTH_LEN
    room = max_message - HEADER_LEN - RECORD_LEN - (AUTH_LEN if with_key else 0)
    assert sent == b"".join(f[:room] for f in frames_bytes)


def test_concat_and_slice_batches() -> None:
    a = batch_of([tagged(20, 1), tagged(30, 2)])
    gappy = FrameBatch(
        data=np.frombuffer(b"zz" + tagged(40, 3) + b"zz", np.uint8).copy(),
        offset=np.array([2], np.int64),
        caplen=np.array([40], np.int32),
        origlen=np.array([90], np.int32),
        ts_ns=np.array([7], np.int64),
        linktype=np.ones(1, np.uint16),
    )
    both = concat_batches(a, batch_of([]), gappy)
    assert [both.frame(i) for i in range(3)] == [tagged(20, 1), tagged(30, 2), tagged(40, 3)]
    assert (both.offset.tolist(), both.data.size) == ([0, 20, 50], 90)
    assert both.origlen.tolist() == [20, 30, 90]
    tail = slice_batch(both, 1, 3)
    assert [tail.frame(i) for i in range(2)] == [tagged(30, 2), tagged(40, 3)]
    assert tail.ts_ns.tolist() == both.ts_ns.tolist()[1:]


def test_gather_runs_in_several_steps() -> None:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 6 << 20, dtype=np.uint8)
    length = rng.integers(0, 3000, 3000).astype(np.int64)
    start = rng.integers(0, data.size - 3000, 3000).astype(np.int64)
    assert int(length.sum()) > 3 * GATHER_STEP
    got = gather_runs(data, start, length)
    want = b"".join(data[s : s + n].tobytes() for s, n in zip(start, length, strict=True))
    assert got.tobytes() == want
    back_to_back = np.concatenate([[0], np.cumsum(length[:-1])])
    assert (
        gather_runs(data, back_to_back + 7, length).tobytes() == data[7 : 7 + len(want)].tobytes()
    )
    assert gather_runs(data, start[:0], length[:0]).size == 0


def test_gather_runs_of_wider_items_in_several_steps() -> None:
    rng = np.random.default_rng(6)
    data = rng.integers(-(2**62), 2**62, 1 << 20)  # int64: a step holds 1/8 of the items
    length = rng.integers(0, 1000, 1000).astype(np.int64)
    start = rng.integers(0, data.size - 1000, 1000).astype(np.int64)
    assert int(length.sum()) * data.itemsize > 3 * GATHER_STEP
    got = gather_runs(data, start, length)
    assert got.dtype == data.dtype
    want = [v for s, n in zip(start, length, strict=True) for v in data[s : s + n].tolist()]
    assert got.tolist() == want
