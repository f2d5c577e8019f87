"""Tests of the per-collector message accounting (vspan.analysis.accounting).

Expectations are derived here from the seqs each test sends, by a plain reference model
(``expected``), never from the implementation's own arithmetic.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.accounting import WINDOW, Accounting, StreamStats
from vspan.analysis.ingest import Ingested, ingest
from vspan.tunnel import encode_message

FRAME = bytes(12) + b"\x89\x26" + bytes(30)
MOD = 1 << 32


def message(cid: int, boot: int, seq: int, frames: int = 1) -> bytes:
    return encode_message(
        collector_id=cid, boot_id=boot, seq=seq % MOD, frames=[FRAME] * frames, ts_ns=[0] * frames
    )


def ingested(datagrams: list[bytes]) -> Ingested:
    buf = np.frombuffer(b"".join(datagrams), np.uint8).copy()
    sizes = np.array([len(d) for d in datagrams], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return ingest(buf, offsets, sizes)


def feed(acc: Accounting, cid: int, boot: int, seqs: list[int], *, cuts: int = 1) -> None:
    """Send ``seqs`` (unwrapped integers; sent modulo 2^32) in ``cuts`` batches."""
    bounds = np.linspace(0, len(seqs), cuts + 1).astype(int)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi > lo:
            acc.update(ingested([message(cid, boot, s) for s in seqs[lo:hi]]), now=float(i))


@dataclass
class Expected:
    received: int
    lost: int
    duplicates: int
    reordered: int


def expected(seqs: list[int]) -> Expected:
    """The reference model, on unwrapped seqs all within ``WINDOW`` of each other."""
    first, top = seqs[0], max(seqs)
    distinct = set(seqs)
    reordered, seen, running = 0, set(), -(1 << 62)
    for s in seqs:
        if s not in seen and s < running:
            reordered += 1
        seen.add(s)
        running = max(running, s)
    return Expected(
        received=len(seqs),
        lost=(top - first + 1) - len({s for s in distinct if s >= first}),
        duplicates=len(seqs) - len(distinct),
        reordered=reordered,
    )


def stream_of(acc: Accounting, cid: int, boot: int) -> StreamStats:
    stream = acc.stream(cid, boot)
    assert stream is not None
    return stream


def check(acc: Accounting, cid: int, boot: int, seqs: list[int]) -> None:
    stream = acc.stream(cid, boot)
    assert stream is not None
    want = expected(seqs)
    got = Expected(stream.received, stream.lost, stream.duplicates, stream.reordered)
    assert got == want
    assert stream.highest == max(seqs) % MOD
    assert stream.stale == 0
    assert stream.frames == len(seqs)


@pytest.mark.parametrize("cuts", [1, 3, 10])
def test_in_order_has_no_loss(cuts: int) -> None:
    acc = Accounting()
    seqs = list(range(100, 400))
    feed(acc, 7, 1, seqs, cuts=cuts)
    check(acc, 7, 1, seqs)
    assert stream_of(acc, 7, 1).lost == 0


@pytest.mark.parametrize("cuts", [1, 4])
def test_gaps_are_lost_messages(cuts: int) -> None:
    r = random.Random(1)
    seqs = sorted(r.sample(range(1000), 600))
    acc = Accounting()
    feed(acc, 7, 1, seqs, cuts=cuts)
    check(acc, 7, 1, seqs)


def test_duplicates() -> None:
    seqs = [0, 1, 1, 2, 3, 3, 3, 2, 4, 0]
    acc = Accounting()
    feed(acc, 7, 1, seqs)
    check(acc, 7, 1, seqs)
    assert stream_of(acc, 7, 1).duplicates == 5


def test_reordered_message_takes_back_its_loss() -> None:
    acc = Accounting()
    feed(acc, 7, 1, [10, 11, 13, 14])
    assert stream_of(acc, 7, 1).lost == 1
    feed(acc, 7, 1, [12, 15])
    check(acc, 7, 1, [10, 11, 13, 14, 12, 15])
    assert stream_of(acc, 7, 1).lost == 0
    assert stream_of(acc, 7, 1).reordered == 1


def test_message_before_the_first_is_reordered_without_taking_back_loss() -> None:
    seqs = [5, 3, 4, 6]
    acc = Accounting()
    feed(acc, 7, 1, seqs)
    check(acc, 7, 1, seqs)
    assert stream_of(acc, 7, 1).lost == 0


@pytest.mark.parametrize("cuts", [1, 2, 7])
def test_wraparound_at_2_to_the_32(cuts: int) -> None:
    base = MOD - 40
    r = random.Random(cuts)
    seqs = [base + i for i in range(80) if r.random() < 0.8]
    seqs += [base + 39, base + 41, base + 20]  # duplicates and late ones across the wrap
    r.shuffle(seqs[30:50])
    acc = Accounting()
    feed(acc, 3, 9, seqs, cuts=cuts)
    check(acc, 3, 9, seqs)


def test_old_message_beyond_the_window_is_stale() -> None:
    acc = Accounting()
    feed(acc, 7, 1, [0, WINDOW + 10, 5])
    stream = acc.stream(7, 1)
    assert stream is not None
    assert (stream.stale, stream.lost, stream.reordered) == (1, WINDOW + 9, 0)


def test_a_new_boot_id_is_a_restart_with_its_own_sequence() -> None:
    acc = Accounting()
    feed(acc, 5, 0xAAAA, list(range(50)))
    feed(acc, 5, 0xBBBB, list(range(20)))
    feed(acc, 5, 0xAAAA, [50])  # a late message of the old boot is no new restart
    feed(acc, 6, 1, [7])  # a collector's first boot is no restart
    col = acc.collector(5)
    assert col is not None
    assert (col.restarts, col.boot_id, col.boots) == (1, 0xAAAA, {0xAAAA, 0xBBBB})
    check(acc, 5, 0xBBBB, list(range(20)))
    check(acc, 5, 0xAAAA, [*range(50), 50])
    assert acc.collector(6) is not None
    assert acc.collector(6).restarts == 0
    table = acc.collectors().set_index("collector_id")
    assert table.loc[5, "received"] == 71
    assert table.loc[5, "restarts"] == 1


def test_restart_inside_one_batch() -> None:
    acc = Accounting()
    datagrams = [message(5, 1, s) for s in range(10)] + [message(5, 2, s) for s in range(3)]
    acc.update(ingested(datagrams), now=1.0)
    col = acc.collector(5)
    assert col is not None
    assert (col.restarts, col.boot_id, col.last_seen) == (1, 2, 1.0)


def test_interleaved_collectors_in_one_batch() -> None:
    r = random.Random(3)
    sent: dict[int, list[int]] = {1: [], 2: [], 3: []}
    datagrams = []
    nxt = {1: 0, 2: 1000, 3: MOD - 5}
    for _ in range(300):
        cid = r.choice((1, 2, 3))
        nxt[cid] += r.choice((1, 1, 1, 2))
        sent[cid].append(nxt[cid])
        datagrams.append(message(cid, 1, nxt[cid], frames=2))
    acc = Accounting()
    acc.update(ingested(datagrams), now=2.5)
    for cid, seqs in sent.items():
        check_frames = acc.stream(cid, 1)
        assert check_frames is not None
        assert check_frames.frames == 2 * len(seqs)
        assert check_frames.last_seen == 2.5
        assert (check_frames.received, check_frames.lost) == (
            expected(seqs).received,
            expected(seqs).lost,
        )
    totals = acc.totals()
    assert totals["received"] == 300
    assert totals["frames"] == 600
    assert totals["bytes"] == sum(len(d) for d in datagrams)


def test_invalid_messages_are_counted_by_collector_and_reason() -> None:
    good = message(9, 1, 0)
    bad_flags = good[:3] + b"\x02" + good[4:]
    bad_record = good[: 24 + 8] + b"\x00\x05" + good[24 + 10 :]  # cap_len 5 < orig_len
    acc = Accounting()
    acc.update(ingested([good, bad_flags, b"garbage", bad_record, b"VS" + bytes(30)]), now=0.0)
    acc.add_rejected(9, "bad_auth")
    table = acc.invalid().set_index(["collector_id", "reason"])["messages"].to_dict()
    assert table == {
        (0, "bad_length"): 1,
        (0, "bad_version"): 1,
        (9, "bad_flags"): 1,
        (9, "bad_length"): 1,
        (9, "bad_auth"): 1,
    }
    assert stream_of(acc, 9, 1).received == 1
    assert acc.totals()["invalid"] == 5
    with pytest.raises(ValueError, match="unknown reason 'oops'"):
        acc.add_rejected(9, "oops")


@settings(deadline=None, max_examples=200)
@given(
    base=st.sampled_from([0, 1000, MOD - 300, MOD - 1]),
    offsets=st.lists(st.integers(0, 700), min_size=1, max_size=150),
    cuts=st.integers(1, 6),
)
def test_property_matches_the_reference_model(base: int, offsets: list[int], cuts: int) -> None:
    seqs = [base + o for o in offsets]
    acc = Accounting()
    feed(acc, 4, 2, seqs, cuts=min(cuts, len(seqs)))
    check(acc, 4, 2, seqs)
