"""Tests of the per-collector message accounting (vspan.analysis.ingest.accounting).

Expectations are derived here from the seqs each test sends, by a plain reference model
(``expected``), never from the implementation's own arithmetic.
"""

from __future__ import annotations

import gc
import itertools
import random
import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.ingest.accounting import WINDOW, Accounting, AccountingConfig, StreamStats
from vspan.analysis.ingest.messages import Ingested, ingest
from vspan.wire.tunnel import encode_message

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
    assert stream.frames == want.received - want.duplicates  # duplicates are not ingested


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


# --- what is ingested: duplicates, stale messages and replayed boots are dropped ---------

KEY = bytes(range(16))


def keyed(cid: int, boot: int, seq: int, frames: int = 1) -> bytes:
    return encode_message(
        collector_id=cid, boot_id=boot, seq=seq, frames=[FRAME] * frames, ts_ns=[0] * frames,
        key=KEY,
    )  # fmt: skip


def ingested_with(datagrams: list[bytes], **kw: object) -> Ingested:
    buf = np.frombuffer(b"".join(datagrams), np.uint8).copy()
    sizes = np.array([len(d) for d in datagrams], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return ingest(buf, offsets, sizes, **kw)  # type: ignore[arg-type]


def test_update_accepts_each_seq_once_and_drops_duplicates_and_stale_ones() -> None:
    acc = Accounting()
    seqs = [0, 1, 1, 2, WINDOW + 5, 3, 2, WINDOW + 5, WINDOW + 6]
    got = acc.update(ingested([message(7, 1, s) for s in seqs]), now=0.0)
    # 1 and WINDOW+5 come twice (duplicates); 3 and 2, after WINDOW+5, are WINDOW or more
    # behind it (stale).
    assert got.tolist() == [True, True, False, True, True, False, False, False, True]
    stream = stream_of(acc, 7, 1)
    assert (stream.duplicates, stream.stale, stream.frames) == (2, 2, 5)


def test_update_never_accepts_an_invalid_message() -> None:
    good = message(9, 1, 0)
    got = Accounting().update(ingested([b"garbage", good, good[:-1]]), now=0.0)
    assert got.tolist() == [False, True, False]


def test_a_replay_of_an_authenticated_old_boot_is_dropped_once_the_new_boot_runs() -> None:
    acc = Accounting(AccountingConfig(boot_grace_s=10.0))
    keys = {5: KEY}
    old = [keyed(5, 1000, s) for s in range(5)]
    new = [keyed(5, 2000, s) for s in range(3)]
    assert acc.update(ingested_with(old, keys=keys), now=0.0).all()
    assert acc.update(ingested_with(new, keys=keys), now=1.0).all()
    # Within the grace period the old boot is still tracked: a replay is a duplicate.
    assert not acc.update(ingested_with(old[:2], keys=keys), now=2.0).any()
    assert stream_of(acc, 5, 1000).duplicates == 2
    # After it, the old boot is forgotten; a replay of it is refused as an old boot.
    assert not acc.update(ingested_with(old, keys=keys), now=20.0).any()
    assert acc.stream(5, 1000) is None
    col = acc.collector(5)
    assert col is not None
    assert (col.stale_boot, col.restarts, col.boot_id) == (5, 1, 2000)
    # A boot older still, never seen, is refused too; a newer one is a restart.
    assert not acc.update(ingested_with([keyed(5, 999, 0)], keys=keys), now=21.0).any()
    assert acc.update(ingested_with([keyed(5, 2001, 0)], keys=keys), now=22.0).all()
    assert (col.stale_boot, col.restarts) == (6, 2)
    totals = acc.totals()
    assert (totals["stale_boot"], totals["duplicates"], totals["received"]) == (6, 2, 11)
    assert acc.counters()["streams_evicted"] == 1


def test_boots_of_a_collector_without_key_are_taken_as_they_come() -> None:
    acc = Accounting(AccountingConfig(boot_grace_s=0.0))
    assert acc.update(ingested([message(6, 2000, 0)]), now=0.0).all()
    assert acc.update(ingested([message(6, 1000, 0)]), now=1.0).all()  # no key: no order
    col = acc.collector(6)
    assert col is not None
    assert (col.restarts, col.stale_boot, col.boot_id) == (1, 0, 1000)


def test_boot_order_wraps_like_seqs() -> None:
    acc = Accounting(AccountingConfig(boot_grace_s=0.0))
    keys = {5: KEY}
    assert acc.update(ingested_with([keyed(5, MOD - 2, 0)], keys=keys), now=0.0).all()
    assert acc.update(ingested_with([keyed(5, 3, 0)], keys=keys), now=1.0).all()  # after wrap
    assert not acc.update(ingested_with([keyed(5, MOD - 1, 0)], keys=keys), now=2.0).any()


# --- bounded state -------------------------------------------------------------------------


def test_invalid_messages_of_collectors_never_accepted_count_under_collector_0() -> None:
    acc = Accounting()
    keys = {5: KEY}
    good6 = message(6, 1, 0)
    bad = [
        message(77, 1, 0)[:-3],  # an unknown collector's cut message
        message(5, 1, 0),  # the keyed collector without AUTH (bad_auth): its own entry
        good6[:-1],  # collector 6 sent a valid message in this batch: its own entry
        good6,
    ]
    acc.update(ingested_with(bad, keys=keys), now=0.0)
    acc.add_rejected(88, "bad_record", known=False)  # a TCP stream's, unknown collector
    acc.add_rejected(6, "bad_record", known=False)  # not known, but tracked
    table = acc.invalid().set_index(["collector_id", "reason"])["messages"].to_dict()
    assert table == {
        (0, "bad_length"): 1,
        (0, "bad_record"): 1,
        (5, "bad_auth"): 1,
        (6, "bad_length"): 1,
        (6, "bad_record"): 1,
    }
    assert acc.collector(77) is None
    assert acc.collector(88) is None


def test_collectors_without_key_beyond_the_bound_are_forgotten_and_their_counts_kept() -> None:
    acc = Accounting(AccountingConfig(max_collectors=10))
    keys = {5: KEY}
    acc.update(ingested_with([keyed(5, 1, 0)], keys=keys), now=0.0)  # keyed: never forgotten
    for cid in range(100, 150):
        acc.update(ingested([message(cid, 1, 0, frames=2)]), now=float(cid))
    tracked = sorted(acc.collectors()["collector_id"].tolist())
    assert tracked == [5, *range(140, 150)]  # the 10 most recently seen, and the keyed one
    assert acc.counters()["collectors_evicted"] == 40
    totals = acc.totals()
    assert (totals["received"], totals["frames"]) == (51, 101)  # counters never go back


def test_sequences_beyond_the_bound_are_forgotten_but_not_a_keyed_current_one() -> None:
    acc = Accounting(AccountingConfig(max_streams=8, boot_grace_s=1e9))
    keys = {5: KEY}
    acc.update(ingested_with([keyed(5, 1, 0)], keys=keys), now=0.0)
    for boot in range(1, 31):
        acc.update(ingested([message(6, boot, 0)]), now=float(boot))
    streams = acc.streams()
    assert len(streams) == 8
    assert acc.stream(5, 1) is not None  # the keyed collector's current boot stays
    assert sorted(streams.loc[streams["collector_id"] == 6, "boot_id"]) == list(range(24, 31))
    assert acc.counters()["streams_evicted"] == 23
    col = acc.collector(6)
    assert col is not None
    assert col.boots == set(range(24, 31))
    row = acc.collectors().set_index("collector_id").loc[6]
    assert (row["received"], row["restarts"]) == (30, 29)


def stamped(template: bytes, field_at: int, values: range) -> Ingested:
    """Copies of ``template`` with the 4-byte header field at ``field_at`` set to each of
    ``values`` (collector_id at 8, boot_id at 12), ingested as one batch."""
    n, size = len(values), len(template)
    data = np.tile(np.frombuffer(template, np.uint8), n)
    data.reshape(n, size)[:, field_at : field_at + 4] = (
        np.array(values, dtype=">u4").view(np.uint8).reshape(n, 4)
    )
    return ingest(data, np.arange(n, dtype=np.int64) * size, np.full(n, size, np.int64))


def test_flood_of_hostile_collector_ids_and_boots_keeps_the_accounting_small() -> None:
    """200,000 invalid datagrams with distinct collector ids, then 5,000 valid messages from
    distinct collectors and 5,000 boots of one collector: the accounting stays under 2 MB
    (before the bounds it kept one entry per id and per boot: some 100 MB)."""
    acc = Accounting(AccountingConfig(max_collectors=100, max_streams=200, boot_grace_s=1e9))
    good = message(1, 1, 0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for part in range(0, 200_000, 20_000):  # cut messages of collectors 1000...
            acc.update(stamped(good[:-1], 8, range(1000 + part, 21_000 + part)), now=1.0)
        for part in range(0, 5000, 1000):
            acc.update(stamped(good, 8, range(300_000 + part, 301_000 + part)), now=2.0)
        for part in range(0, 5000, 1000):
            acc.update(stamped(message(2, 1, 0), 12, range(1 + part, 1001 + part)), now=3.0)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert acc.invalid()["messages"].sum() == 200_000
    assert acc.invalid()["collector_id"].tolist() == [0]  # one series, not 200,000
    assert acc.counters()["collectors_tracked"] <= 102  # 100, collector 0, and a new one
    assert acc.counters()["streams"] <= 200
    assert acc.totals()["received"] == 10_000
    assert grown < 2 << 20, f"the accounting grew by {grown / 1e6:.1f} MB"
