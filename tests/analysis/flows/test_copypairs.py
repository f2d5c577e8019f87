"""Pairing the two copies of cross-host packets: the pending map, and delays against the
ground truth of generated traffic whose copy times the test knows."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.decode.columns import TagKind
from vspan.analysis.flows import _copypairs as cp
from vspan.analysis.flows.endpoints import EndpointResolver
from vspan.analysis.flows.table import FlowConfig, FlowTable
from vspan.inventory import Inventory
from vspan_testing.decoded import decoded

MS = 1_000_000
INVENTORY = Inventory.loads("""\
hosts: [{name: hv01, collector_id: 1}, {name: hv02, collector_id: 2}]
vms:
  - {name: a, uuid: 00000000-0000-4000-8000-000000000003, host: hv01,
     nics: [{mac: "52:54:00:00:00:03", vif: 3}]}
  - {name: b, uuid: 00000000-0000-4000-8000-000000000004, host: hv02,
     nics: [{mac: "52:54:00:00:00:04", vif: 4}]}
  - {name: c, uuid: 00000000-0000-4000-8000-000000000005, host: hv01,
     nics: [{mac: "52:54:00:00:00:05", vif: 5}]}
""")
MAC = {"a": 0x525400000003, "b": 0x525400000004, "c": 0x525400000005, "ext": 0x020000000001}
VIF = {"a": 3, "b": 4, "c": 5}
HOST = {"a": 1, "b": 2, "c": 1}
IP = {"a": "10.0.0.3", "b": "10.0.0.4", "c": "10.0.0.5", "ext": "192.0.2.1"}


def copies(src: str, dst: str, t: int, delay: int, fp: int) -> list[dict[str, object]]:
    """The frames the collectors export for one packet (ARCHITECTURE.md, mirroring); the
    side whose name sorts first uses port 40000, the other 53."""
    ports = (40000, 53) if src < dst else (53, 40000)
    base = {"src_mac": MAC[src], "dst_mac": MAC[dst], "src_ip": IP[src], "dst_ip": IP[dst],
            "src_port": ports[0], "dst_port": ports[1], "fingerprint": fp,
            "tag_kind": TagKind.VNTAG}  # fmt: skip
    if dst == "ext":  # to the outside: the sender's copy only
        return [{**base, "ts_ns": t, "host": HOST[src], "tag_d": 0, "svif": VIF[src], "dvif": 0}]
    if HOST[src] == HOST[dst]:  # intra-host: the sender's copy, and the receiver's (a session)
        return [
            {**base, "ts_ns": t, "host": HOST[src], "tag_d": 0, "svif": VIF[src], "dvif": VIF[dst]},
            {**base, "ts_ns": t + delay, "host": HOST[dst], "tag_d": 1, "dvif": VIF[dst]},
        ]
    return [
        {**base, "ts_ns": t, "host": HOST[src], "tag_d": 0, "svif": VIF[src], "dvif": 0},
        {**base, "ts_ns": t + delay, "host": HOST[dst], "tag_d": 1, "dvif": VIF[dst]},
    ]


def run(frames: list[dict[str, object]], cuts: list[int], config: FlowConfig) -> pd.DataFrame:
    table, resolver = FlowTable(config), EndpointResolver(INVENTORY)
    names = {name for f in frames for name in f}
    cols = {name: [f.get(name, 0) for f in frames] for name in sorted(names)}
    dec = decoded(len(frames), ip_proto=17, wirelen=100, **cols)
    parts = []
    for lo, hi in itertools.pairwise([0, *sorted(set(cuts)), len(frames)]):
        part = dec.take(np.arange(lo, hi))
        parts.append(table.update(part, resolver.resolve(part)))
    parts.append(table.flush())
    out = pd.concat(parts, ignore_index=True)
    out.attrs["counters"] = table.counters()
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.lists(st.integers(1, 399), max_size=8),
    st.floats(0.0, 0.6),
    st.integers(0, 30),
)
def test_delays_are_the_mean_over_the_packets_whose_two_copies_were_paired(
    seed: int, cuts: list[int], drop_share: float, lag_ms: int
) -> None:
    rng = np.random.default_rng(seed)
    packets = []  # (pair, t, true delay, both copies kept)
    frames: list[dict[str, object]] = []
    lag = {1: 0, 2: lag_ms * MS}  # hv02's collector ships its copies later
    for k in range(120):
        pair = ("a", "b") if k % 3 else ("b", "a")  # a <-> b cross-host, both ways
        if k % 10 == 9:
            pair = ("a", "c")  # intra-host, both copies at hv01
        if k % 10 == 4:
            pair = ("a", "ext")
        t, delay = k * 2 * MS, int(rng.integers(20_000, 200_000))
        fp = int(rng.integers(1, 2**63))
        made = copies(*pair, t, delay, fp)
        keep = not (pair[1] in ("b", "a") and HOST[pair[0]] != HOST[pair[1]]
                    and rng.random() < drop_share)  # fmt: skip
        if not keep:
            made = made[1:]  # the sender's copy was lost (its message never came)
        packets.append((pair, delay, keep and len(made) == 2))
        frames += made
    # Each collector's copies in its own order, the two streams interleaved by arrival.
    arrival = [int(str(f["ts_ns"])) + lag[int(str(f["host"]))] for f in frames]
    frames = [frames[i] for i in np.argsort(arrival, kind="stable")]
    flows = run(frames, [c for c in cuts if c < len(frames)], FlowConfig())
    cross = [d for (s, r), d, both in packets if both and HOST[s] != HOST[r] and r != "ext"]
    ab = flows[flows["pairs"] > 0]
    assert len(ab) == 1  # the a <-> b flow
    assert int(ab["pairs"].iloc[0]) == len(cross)
    assert ab["delay_ns"].iloc[0] == np.mean(cross)
    assert flows.attrs["counters"]["copies_paired"] == len(cross)
    # intra-host (a -> c, both copies at hv01) and external (one copy): no delay at all.
    assert flows.loc[flows["pairs"] == 0, "delay_ns"].isna().all()
    assert len(flows) == 3


def test_no_pair_from_copies_of_one_packet_seen_twice() -> None:
    # The same packet (one fingerprint) sent twice before either receiver copy came: which
    # receiver copy belongs to which sender copy cannot be told, so none is paired.
    frames = copies("a", "b", 0, 100_000, 77)[:1] + copies("a", "b", 5 * MS, 100_000, 77)
    frames.insert(2, copies("a", "b", 0, 100_000, 77)[1])
    flows = run(frames, [], FlowConfig())
    assert int(flows["pairs"].sum()) == 0
    assert flows["delay_ns"].isna().all()
    assert flows.attrs["counters"]["copies_ambiguous"] == 4


def test_a_question_and_its_answer_with_one_fingerprint_pair_each_with_its_own_copy() -> None:
    # A UDP checksum does not change when addresses and ports swap: a question and an
    # answer with equal ids and lengths share a fingerprint. The direction tells them apart,
    # whatever order the four copies come in.
    question = copies("a", "b", 0, 100_000, 42)
    answer = copies("b", "a", 1 * MS, 300_000, 42)
    frames = [answer[0], question[0], answer[1], question[1]]  # senders' copies first
    flows = run(frames, [1, 2, 3], FlowConfig())
    assert (int(flows["pairs"].iloc[0]), flows["delay_ns"].iloc[0]) == (2, 200_000)
    assert flows.attrs["counters"]["copies_ambiguous"] == 0


def test_copies_further_apart_than_the_window_do_not_pair() -> None:
    frames = copies("a", "b", 0, 3 * MS, 5) + copies("a", "b", 10 * MS, 1 * MS, 6)
    flows = run(frames, [], FlowConfig(pair_window_s=0.002))
    assert (int(flows["pairs"].sum()), flows["delay_ns"].iloc[0]) == (1, 1 * MS)
    assert flows.attrs["counters"]["copies_unpaired"] == 2


def test_a_full_pending_map_refuses_copies_and_counts_them() -> None:
    # Receiver copies only (their sender copies all lost), more than the map may hold.
    frames = [copies("a", "b", k * MS, 100, k + 1)[1] for k in range(50)]
    flows = run(frames, [], FlowConfig(max_pending_copies=8))
    counters = flows.attrs["counters"]
    assert counters["copies_paired"] == 0
    assert counters["pending_overflow"] + counters["copies_unpaired"] == 50
    assert counters["pending_overflow"] > 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=60, unique=True),
    st.lists(st.integers(0, 59), max_size=60),
    st.sampled_from([2, 8, 64]),
)
def test_the_pending_map_finds_every_entry_left_after_deletes(
    hashes: list[int], drops: list[int], spread: int
) -> None:
    # Identities with few distinct home slots make long probe chains that wrap around.
    slots = 1 << (2 * len(hashes) - 1).bit_length()
    pend = np.zeros((slots, len(cp.PENDING)), np.int64)
    stats = np.zeros(len(cp.COUNTERS), np.int64)
    entries = {}
    for h in hashes:
        ident = np.int64((h - h % 128 + h % spread) | 1)
        if cp.find(pend, ident, np.int64(h), np.int64(7)) >= 0:
            continue
        added, _, _ = cp.settle(pend, -1, (ident, np.int64(h), np.int64(7), np.int64(0),
                                           np.int64(1 << cp.HOST_SHIFT)),
                                (np.int64(0), np.int64(10), True), stats)  # fmt: skip
        assert added == 1
        entries[h] = ident
    for d in drops:
        if d >= len(hashes) or hashes[d] not in entries:
            continue
        h = hashes[d]
        slot = cp.find(pend, entries[h], np.int64(h), np.int64(7))
        # The receiver's copy from another host pairs with it and takes it out of the map.
        copy = (entries[h], np.int64(h), np.int64(7), np.int64(4), np.int64(2 << cp.HOST_SHIFT | 1))
        assert cp.settle(pend, slot, copy, (np.int64(4), np.int64(10), True), stats)[:2] == (-1, 1)
        del entries[h]
        for other, ident in entries.items():
            assert cp.find(pend, ident, np.int64(other), np.int64(7)) >= 0
        assert np.count_nonzero(pend[:, 0]) == len(entries)
