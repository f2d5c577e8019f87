"""The accounting across a restart of the analyzer: what the store saved (``collector_rows``),
read back (``saved_streams``) and restored (``Accounting.restore``).

Regression (issue 17): the highest seq was not saved, so a restarted analyzer began each
stream at the first seq it saw, and the messages sent meanwhile were counted nowhere. Each
expectation is derived here from the seqs the test sends.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.ingest.accounting import Accounting, AccountingConfig, StreamStats
from vspan.analysis.ingest.messages import Ingested, ingest
from vspan.analysis.store.persist import collector_rows, saved_streams
from vspan.wire.tunnel import encode_message

FRAME = bytes(12) + b"\x89\x26" + bytes(30)
KEY = bytes(range(32))


def ingested(cid: int, boot: int, seqs: list[int], *, key: bytes | None = None) -> Ingested:
    datagrams = [
        encode_message(collector_id=cid, boot_id=boot, seq=s, frames=[FRAME], ts_ns=[0], key=key)
        for s in seqs
    ]
    buf = np.frombuffer(b"".join(datagrams), np.uint8).copy()
    sizes = np.array([len(d) for d in datagrams], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return ingest(buf, offsets, sizes, keys={cid: key} if key else None)


def feed(acc: Accounting, cid: int, boot: int, seqs: list[int], now: float, *,
         one_by_one: bool = False, kernel_drops: int = 0) -> None:  # fmt: skip
    batches = [[s] for s in seqs] if one_by_one else [seqs]
    for i, batch in enumerate(batches):
        acc.update(ingested(cid, boot, batch), now, kernel_drops=kernel_drops if i == 0 else 0)


def restarted(acc: Accounting, now: float, *, keyed: set[int] | None = None,
              config: AccountingConfig | None = None) -> Accounting:  # fmt: skip
    """A new accounting given what ``acc`` would have saved at ``now`` (one sample)."""
    rows = collector_rows(acc.streams(), acc.invalid(), now)
    # as the store gives them back: each collector's newest sample (here: the only one)
    again = Accounting(config)
    again.restore(saved_streams(rows, keyed or set()), now + 60, keyed=keyed or set())
    return again


def stream_of(acc: Accounting, cid: int, boot: int) -> StreamStats:
    stream = acc.stream(cid, boot)
    assert stream is not None
    return stream


@pytest.mark.parametrize("one_by_one", [False, True])
def test_the_gap_a_restart_finds_is_missed_while_down_and_later_gaps_are_lost(
    one_by_one: bool,
) -> None:
    before = Accounting()
    feed(before, 3, 77, list(range(5)), now=1.0)
    after = restarted(before, now=2.0)
    # 5..9 were sent while the analyzer was down; 12 is lost on the network afterwards
    feed(after, 3, 77, [10, 11, 13], now=100.0, one_by_one=one_by_one)
    s = stream_of(after, 3, 77)
    assert (s.received, s.missed_while_down, s.lost, s.kernel) == (5 + 3, 5, 1, 0)
    row = after.collectors().iloc[0]
    assert (row["received"], row["missed_while_down"], row["lost"]) == (8, 5, 1)
    assert after.totals()["missed_while_down"] == 5


def test_the_counters_go_on_from_what_was_saved() -> None:
    before = Accounting()
    feed(before, 3, 77, [0, 1, 1, 3], now=1.0)  # a duplicate, a loss
    saved = stream_of(before, 3, 77)
    after = restarted(before, now=2.0)
    s = stream_of(after, 3, 77)
    assert (s.highest, s.received, s.lost, s.duplicates, s.frames, s.bytes) == (
        3, 4, 1, 1, 3, saved.bytes,
    )  # fmt: skip
    assert s.last_seen == 1.0  # as saved: the least recently seen is forgotten first
    # saved again by the restarted analyzer, and restored once more: nothing counted twice
    feed(after, 3, 77, [6], now=100.0)
    third = restarted(after, now=101.0)
    feed(third, 3, 77, [9], now=200.0)
    s = stream_of(third, 3, 77)
    assert (s.received, s.missed_while_down, s.lost) == (6, 2 + 2, 1)


def test_a_late_message_of_the_missed_gap_is_taken_back_from_it() -> None:
    before = Accounting()
    feed(before, 3, 77, [0, 1], now=1.0)
    after = restarted(before, now=2.0)
    feed(after, 3, 77, [6, 4], now=100.0, one_by_one=True)  # 4 arrives after 6
    s = stream_of(after, 3, 77)
    assert (s.missed_while_down, s.reordered, s.lost, s.kernel) == (3, 1, 0, 0)  # 2, 3, 5


def test_drops_of_the_restarted_analyzers_socket_are_charged_to_the_gap_first() -> None:
    before = Accounting()
    feed(before, 3, 77, [0], now=1.0)
    after = restarted(before, now=2.0)
    feed(after, 3, 77, [8], now=100.0, kernel_drops=2)  # 1..7: 2 of them reached the socket
    s = stream_of(after, 3, 77)
    assert (s.missed_while_down, s.kernel, s.lost) == (5, 2, 0)


def test_a_collector_restarted_meanwhile_or_gone_gets_nothing_invented() -> None:
    before = Accounting()
    feed(before, 3, 77, list(range(4)), now=1.0)
    feed(before, 4, 5, list(range(4)), now=1.0)
    after = restarted(before, now=2.0)
    feed(after, 3, 78, [0, 1], now=100.0)  # a new boot starts its own sequence
    assert after.totals()["missed_while_down"] == 0
    rows = after.collectors().set_index("collector_id")
    assert rows.loc[3, "restarts"] == 1
    assert rows.loc[3, "received"] == 4 + 2
    assert rows.loc[4, "received"] == 4  # collector 4 never came back: as saved
    assert (rows["lost"].sum(), rows["missed_while_down"].sum()) == (0, 0)


def test_at_most_max_streams_are_restored_the_most_recently_seen_first() -> None:
    before = Accounting()
    for cid, seen in ((1, 5.0), (2, 9.0), (3, 7.0)):
        feed(before, cid, 1, [0, 1], now=seen)
    after = restarted(before, now=10.0, config=AccountingConfig(max_streams=2))
    assert sorted(after.streams()["collector_id"]) == [2, 3]
    assert after.counters()["streams_evicted"] == 0


def test_a_collector_forgotten_before_the_last_save_is_not_restored() -> None:
    # collector 1's newest sample is older than the last one: it had been forgotten (evicted)
    before = Accounting()
    feed(before, 1, 1, [0, 1], now=1.0)
    feed(before, 2, 1, [0, 1], now=1.0)
    old = collector_rows(before.streams(), before.invalid(), 1.0)
    last = collector_rows(before.streams(), before.invalid(), 2.0)
    newest = pd.concat([old[old.collector_id == 1], last[last.collector_id == 2]])
    saved = saved_streams(newest.reset_index(drop=True), set())
    assert saved["collector_id"].tolist() == [2]
    keyed = saved_streams(newest.reset_index(drop=True), {1})  # a keyed one: its boot only
    assert keyed.set_index("collector_id")["highest"].isna().to_dict() == {1: True, 2: False}


def test_the_newest_boot_is_restored_in_serial_order() -> None:
    before = Accounting(AccountingConfig(boot_grace_s=1e9))
    feed(before, 6, 0xFFFF_FFF0, [0, 1], now=1.0)
    feed(before, 6, 0x10, [0], now=2.0)  # wrapped around: newer
    saved = saved_streams(collector_rows(before.streams(), before.invalid(), 3.0), set())
    assert saved[["collector_id", "boot_id", "highest"]].values.tolist() == [[6, 0x10, 0]]


def test_a_keyed_collectors_boot_without_a_saved_seq_still_refuses_older_boots() -> None:
    # Rows of a version 5 store have no highest seq: the boot of a keyed collector is
    # restored (replays of older boots refused), nothing of the others, no stream.
    saved = pd.DataFrame({
        "collector_id": [5, 6], "boot_id": [1000, 1000], "highest": [None, None],
        "last_seen": [None, None], "received": [3, 3], "lost": [0, 0], "kernel": [None, None],
        "missed_while_down": [None, None], "duplicates": [0, 0], "reordered": [0, 0],
        "stale": [None, None], "frames": [3, 3], "bytes": [9, 9],
    })  # fmt: skip
    acc = Accounting()
    assert acc.restore(saved, 10.0, keyed={5}) == 0
    assert acc.streams().empty
    acc.update(ingested(5, 999, [0], key=KEY), 11.0)
    col = acc.collector(5)
    assert col is not None
    assert col.stale_boot == 1
    assert acc.collector(6) is None
