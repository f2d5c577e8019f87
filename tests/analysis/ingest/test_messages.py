"""Tests of the vectorized multi-message ingest (vspan.analysis.ingest.messages).

The reference is ``vspan.wire.tunnel.decode_message``: for every datagram, valid or corrupted
by a table of mutations, ``ingest`` over all of them at once must accept exactly the ones
``decode_message`` accepts, reject the others with the same reason, and yield the same
frames.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.ingest.messages import OK, REASON_CODES, REASON_NAMES, ingest
from vspan.errors import TunnelError
from vspan.wire.tunnel import REASONS, Message, decode_message, encode_message

KEYS = {2: b"k2" * 8, 3: bytes(range(32))}
"""Collectors 2 and 3 have keys; 1 and 7 do not."""
COLLECTORS = (1, 2, 3, 7)


def pack(datagrams: list[bytes], gaps: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Datagrams back to back in one buffer (with ``gaps`` junk bytes before each)."""
    gaps = gaps or [0] * len(datagrams)
    parts, offsets, pos = [], [], 0
    for gap, d in zip(gaps, datagrams, strict=True):
        parts.append(b"\xee" * gap)
        pos += gap
        offsets.append(pos)
        parts.append(d)
        pos += len(d)
    return np.frombuffer(b"".join(parts), np.uint8).copy(), offsets


def reference(
    d: bytes, *, keys: Mapping[int, bytes] | None, require_known: bool
) -> Message | TunnelError:
    """What ``decode_message`` makes of one datagram: the message or its error."""
    try:
        return decode_message(d, keys=keys, require_known=require_known)
    except TunnelError as exc:
        return exc


def check_equivalent(
    datagrams: list[bytes],
    *,
    keys: Mapping[int, bytes] | None,
    require_known: bool,
    gaps: list[int] | None = None,
) -> list[str]:
    """Assert ``ingest`` agrees with ``decode_message`` on every datagram; return reasons."""
    buf, offsets = pack(datagrams, gaps)
    got = ingest(buf, offsets, [len(d) for d in datagrams], keys=keys, require_known=require_known)
    assert got.frames.data is buf  # zero copy
    frames = got.frames
    seen = []
    for i, d in enumerate(datagrams):
        rows = np.flatnonzero(got.message == i)
        m = reference(d, keys=keys, require_known=require_known)
        if isinstance(m, TunnelError):
            assert REASON_NAMES[got.reason[i]] == m.reason, (i, d.hex(), str(m))
            assert rows.size == 0
            seen.append(m.reason)
            continue
        assert got.reason[i] == OK, (i, d.hex(), REASON_NAMES[got.reason[i]])
        seen.append("ok")
        assert (got.collector_id[i], got.boot_id[i], got.seq[i], got.count[i]) == (
            m.collector_id,
            m.boot_id,
            m.seq,
            m.count,
        )
        assert got.authenticated[i] == m.authenticated
        assert [frames.frame(int(r)) for r in rows] == [m.frame(j) for j in range(m.count)]
        assert frames.ts_ns[rows].tolist() == m.ts_ns.tolist()
        assert frames.origlen[rows].tolist() == m.orig_len.tolist()
        assert set(frames.host[rows].tolist()) <= {m.collector_id}
    assert len(frames) == int(got.count[got.valid].sum())
    return seen


# --- building and corrupting messages ---------------------------------------------------


def vn_frame(r: random.Random) -> bytes:
    return r.randbytes(12) + b"\x89\x26" + r.randbytes(r.randint(4, 90))


def valid_message(r: random.Random) -> bytes:
    collector = r.choice(COLLECTORS)
    frames = [vn_frame(r) for _ in range(r.choice((0, 1, 2, 3, 5, 8)))]
    key = KEYS.get(collector) if r.random() < 0.85 else r.choice((None, b"wrong key"))
    return encode_message(
        collector_id=collector,
        boot_id=r.getrandbits(32),
        seq=r.getrandbits(32),
        frames=frames,
        ts_ns=[r.getrandbits(63) for _ in frames],
        orig_len=[len(f) + r.choice((0, 0, 1, 1000)) for f in frames],
        key=key,
    )


def _patch(
    fmt: str, at: Callable[[bytes, random.Random], int], value: Callable[[random.Random], int]
):
    def mutate(d: bytes, r: random.Random) -> bytes:
        pos = at(d, r)
        if pos + struct.calcsize(fmt) > len(d):
            return d
        out = bytearray(d)
        struct.pack_into(fmt, out, pos, value(r))
        return bytes(out)

    return mutate


def _record(field: int) -> Callable[[bytes, random.Random], int]:
    """Offset of a field (8: cap_len, 10: orig_len) of a random record of the message."""

    def at(d: bytes, r: random.Random) -> int:
        count = struct.unpack_from("!H", d, 20)[0] if len(d) >= 24 else 0
        return 24 + 12 * r.randrange(max(count, 1)) + field

    return at


def _flip(d: bytes, r: random.Random) -> bytes:
    if not d:
        return d
    out = bytearray(d)
    for _ in range(r.randint(1, 3)):
        bit = r.randrange(len(d) * 8)
        out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def _frame_byte(d: bytes, r: random.Random) -> bytes:
    """Change a byte at offset 12 or 13 of some frame (its EtherType)."""
    if len(d) < 24:
        return d
    count = struct.unpack_from("!H", d, 20)[0]
    start = 24 + 12 * count
    caps = [struct.unpack_from("!H", d, 24 + 12 * i + 8)[0] for i in range(count)]
    if not caps or start + sum(caps) > len(d):
        return d
    i = r.randrange(count)
    pos = start + sum(caps[:i]) + r.choice((12, 13))
    out = bytearray(d)
    out[pos] = r.choice((0x00, 0x81, 0x88, 0x27))
    return bytes(out)


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "none": lambda d, r: d,
    "truncate": lambda d, r: d[: r.randrange(len(d) + 1)],
    "extend": lambda d, r: d + r.randbytes(r.randint(1, 20)),
    "magic": _patch("!H", lambda d, r: 0, lambda r: r.choice((0x5654, 0, 0x5356))),
    "version": _patch("B", lambda d, r: 2, lambda r: r.choice((0, 2, 255))),
    "flags": _patch("B", lambda d, r: 3, lambda r: r.choice((0, 1, 2, 0x81, 0xFF))),
    "length": _patch("!I", lambda d, r: 4, lambda r: r.choice((0, 24, 40, 130, 2**32 - 1))),
    "length-off-by-one": lambda d, r: _patch(
        "!I", lambda _d, _r: 4, lambda _r: len(d) + r.choice((-1, 1))
    )(d, r),
    "collector": _patch("!I", lambda d, r: 8, lambda r: r.choice((0, 1, 2, 3, 9))),
    "count": _patch("!H", lambda d, r: 20, lambda r: r.choice((0, 1, 2, 7, 0xFFFF))),
    "cap_len": _patch("!H", _record(8), lambda r: r.choice((0, 17, 18, 60, 0xFFFF))),
    "orig_len": _patch("!H", _record(10), lambda r: r.choice((0, 17, 18, 60))),
    "ethertype": _frame_byte,
    "bit-flips": _flip,
    "tag": _patch("B", lambda d, r: len(d) - 1, lambda r: r.randrange(256)),
    "garbage": lambda d, r: r.randbytes(r.randint(0, 80)),
    "header-only": lambda d, r: d[:24],
}


def random_datagrams(r: random.Random, n: int) -> list[bytes]:
    names = list(MUTATIONS)
    weights = [8 if name == "none" else 1 for name in names]
    return [MUTATIONS[r.choices(names, weights)[0]](valid_message(r), r) for _ in range(n)]


# --- equivalence with decode_message ----------------------------------------------------


@pytest.mark.parametrize(("keys", "require_known"), [(None, False), (KEYS, False), (KEYS, True)])
def test_thousands_of_messages_in_one_call(
    keys: Mapping[int, bytes] | None, require_known: bool
) -> None:
    r = random.Random(len(keys or ()) * 2 + require_known)
    datagrams = random_datagrams(r, 3000)
    gaps = [r.choice((0, 0, 0, 1, 7)) for _ in datagrams]
    seen = check_equivalent(datagrams, keys=keys, require_known=require_known, gaps=gaps)
    assert seen.count("ok") > 400  # the test exercises both sides
    if keys is not None:
        assert {"ok", "bad_auth", "bad_length"} <= set(seen)
    # With require_known only keyed collectors pass, and a corrupted record breaks their tag.
    assert ("unknown_collector" in seen) == require_known
    assert ("bad_record" in seen) != require_known


@settings(deadline=None, max_examples=150)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 40),
    with_keys=st.booleans(),
    require_known=st.booleans(),
)
def test_property_ingest_equals_decode_message(
    seed: int, n: int, with_keys: bool, require_known: bool
) -> None:
    r = random.Random(seed)
    check_equivalent(
        random_datagrams(r, n),
        keys=KEYS if with_keys else None,
        require_known=require_known,
        gaps=[r.randint(0, 3) for _ in range(n)],
    )


@settings(deadline=None, max_examples=100)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_property_arbitrary_bytes(datagrams: list[bytes]) -> None:
    check_equivalent(datagrams, keys=KEYS, require_known=False)


def test_every_reason_is_produced_and_named_as_in_the_codec() -> None:
    assert ("ok", *REASONS) == REASON_NAMES
    r = random.Random(5)
    seen: set[str] = set()
    for require_known in (False, True):
        seen |= set(
            check_equivalent(random_datagrams(r, 1500), keys=KEYS, require_known=require_known)
        )
    assert seen == set(REASON_NAMES)


# --- the buffer contract ----------------------------------------------------------------


def test_empty_input() -> None:
    got = ingest(np.zeros(0, np.uint8), [], [])
    assert len(got) == 0
    assert len(got.frames) == 0


def test_buffer_smaller_than_a_header() -> None:
    got = ingest(np.zeros(10, np.uint8), [0, 4], [4, 6])
    assert got.reason.tolist() == [REASON_CODES["bad_length"]] * 2
    assert got.collector_id.tolist() == [0, 0]


def test_unreadable_header_has_collector_0_readable_keeps_it() -> None:
    msg = encode_message(collector_id=9, boot_id=1, seq=2, frames=[], ts_ns=[])
    bad_flags = msg[:3] + b"\x04" + msg[4:]
    bad_magic = b"XX" + msg[2:]
    buf, offsets = pack([bad_flags, bad_magic, msg])
    got = ingest(buf, offsets, [24, 24, 24])
    assert [REASON_NAMES[c] for c in got.reason] == ["bad_flags", "bad_magic", "ok"]
    assert got.collector_id.tolist() == [9, 0, 9]


def test_frames_are_views_of_the_buffer() -> None:
    frame = bytes(12) + b"\x89\x26" + bytes(10)
    msg = encode_message(collector_id=4, boot_id=1, seq=2, frames=[frame, frame], ts_ns=[1, 2])
    buf, offsets = pack([msg], [5])
    got = ingest(buf, offsets, [len(msg)])
    assert got.frames.offset.tolist() == [5 + 24 + 24, 5 + 24 + 24 + 24]
    assert got.frames.data is buf


@pytest.mark.parametrize(
    ("offsets", "sizes", "message"),
    [
        ([0], [11], "a datagram lies outside the 10-byte buffer"),
        ([-1], [1], "a datagram lies outside"),
        ([0, 1], [1], "2 offsets but 1 sizes"),
    ],
)
def test_bad_layout_is_a_caller_bug(offsets: list[int], sizes: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ingest(np.zeros(10, np.uint8), offsets, sizes)
