"""Frames out of time order: flows never outlive their timeouts, nothing is lost, and the
result does not depend on how the frames are cut into batches."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.flows.endpoints import EndpointResolver
from vspan.analysis.flows.table import FlowConfig, FlowTable
from vspan_testing.decoded import decoded

S = 1_000_000_000
IDLE, ACTIVE = 60, 150
CONFIG = FlowConfig(idle_timeout_s=IDLE, active_timeout_s=ACTIVE)


def run(ts_s: list[int], key: list[int], cuts: list[int], **cols: object) -> pd.DataFrame:
    """Frames in the order given, frame ``i`` of ``1 << i`` bytes (so a flow's bytes name
    its frames), in batches cut before each index of ``cuts``; every flow, flushed."""
    n = len(ts_s)
    given = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "ip_proto": 17, "dst_port": 9, **cols}
    dec = decoded(n, ts_ns=np.array(ts_s, np.int64) * S, src_port=key,
                  wirelen=[1 << i for i in range(n)], **given)  # fmt: skip
    table, resolver = FlowTable(CONFIG), EndpointResolver()
    parts = []
    for lo, hi in itertools.pairwise([0, *sorted(set(cuts)), n]):
        part = dec.take(np.arange(lo, hi))
        parts.append(table.update(part, resolver.resolve(part)))
    parts.append(table.flush())
    out = pd.concat(parts, ignore_index=True)
    out.attrs["counters"] = table.counters()
    return out


def members(flows: pd.DataFrame) -> list[tuple[int, int]]:
    """(key, frames as a bit mask) of each flow, sorted."""
    mask = flows["bytes"] + flows["bytes_rev"]
    return sorted(zip(flows["port_a"].tolist(), mask.tolist(), strict=True))


FRAMES = st.lists(st.tuples(st.integers(0, 600), st.integers(0, 2)), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(FRAMES, st.lists(st.integers(1, 29), max_size=6))
def test_any_order_any_cut_flows_stay_within_their_timeouts(
    frames: list[tuple[int, int]], cuts: list[int]
) -> None:
    ts = [t for t, _ in frames]
    key = [k for _, k in frames]
    cuts = [c for c in cuts if c < len(frames)]
    flows = run(ts, key, cuts)
    seen = 0
    for row, (port, mask) in zip(flows.itertuples(), members(flows), strict=True):
        del row
        frames_in = [i for i in range(len(frames)) if mask >> i & 1]
        assert {key[i] for i in frames_in} == {port}
        times = sorted(ts[i] for i in frames_in)
        assert times[-1] - times[0] < ACTIVE, (port, times)
        assert all(b - a <= IDLE for a, b in itertools.pairwise(times)), (port, times)
        assert seen & mask == 0  # no frame in two flows
        seen |= mask
    assert seen == (1 << len(frames)) - 1  # every frame in a flow
    assert int(flows["packets"].sum() + flows["packets_rev"].sum()) == len(frames)
    for got in flows.itertuples():
        frames_in = [i for i in range(len(frames)) if (got.bytes + got.bytes_rev) >> i & 1]
        assert got.start_ns == min(ts[i] for i in frames_in) * S
        assert got.last_ns == max(ts[i] for i in frames_in) * S
    # The same frames in one batch, or one frame a batch: the same flows.
    assert members(run(ts, key, [])) == members(flows)
    assert members(run(ts, key, list(range(1, len(frames))))) == members(flows)


def test_a_frame_a_day_older_than_its_flow_does_not_join_it() -> None:
    # `vspan report B A` where A is B shifted by a day used to give a flow of 86,401 s: the
    # frames of day 0 joined the open flow of day 1, whose start moved back a day. They
    # arrive a day behind their host's clock: the host's time went back, it gets a new
    # clock, and the day-0 frames make their own flow, as they would alone. (Before clocks
    # per host, each was a late flow of its own.)
    day = 86_400
    flows = run([day, day + 1, 0, 1], [0, 0, 0, 0], cuts=[2])
    spans = sorted(zip(flows["start_ns"] // S, flows["last_ns"] // S, strict=True))
    assert spans == [(0, 1), (day, day + 1)]
    assert (flows.attrs["counters"]["clock_resets"], flows.attrs["counters"]["late_frames"]) == (
        1,
        0,
    )


def test_a_late_frame_that_fits_joins_and_becomes_the_first() -> None:
    # The receiver's collector (host 2) is heard first; the sender's copy (host 1) of the
    # packet before, and older, comes in the next batch: it is the flow's first packet.
    flows = run([10, 11, 9], [53, 53, 4000], cuts=[2], host=[2, 2, 1], dst_port=[4000, 4000, 53],
                src_ip=["10.0.0.2", "10.0.0.2", "10.0.0.1"],
                dst_ip=["10.0.0.1", "10.0.0.1", "10.0.0.2"])  # fmt: skip
    assert len(flows) == 1
    f = flows.iloc[0]
    assert (f["start_ns"], f["last_ns"], f["packets"] + f["packets_rev"]) == (9 * S, 11 * S, 3)
    assert f["observer"] == 1
    assert f["observer_other"] == 2
    assert f["first_rev"] == 0  # 10.0.0.1 (side A) sent the first packet


def test_frames_behind_their_hosts_clock_give_it_a_new_clock_and_flows_of_their_own() -> None:
    # A flow open from 100 s to 140 s; then frames from 10 s and 20 s arrive (more than the
    # idle timeout before the flow, and behind the host's clock): the host's time went back
    # (a replay started again, a clock set back). They form their flow by the host's new
    # clock; the first flow keeps the old one. (Before clocks per host, each such frame was
    # a late flow of its own.)
    table, resolver = FlowTable(CONFIG), EndpointResolver()
    dec = decoded(4, ts_ns=np.array([100, 140, 10, 20]) * S, src_ip="10.0.0.1",
                  dst_ip="10.0.0.2", ip_proto=17, src_port=7, dst_port=9)  # fmt: skip
    assert table.update(dec, resolver.resolve(dec)).empty
    counters = table.counters()
    assert (counters["clock_resets"], counters["late_frames"], counters["host_clocks"]) == (1, 0, 2)
    assert table.open_flows == 2
    rest = table.flush()
    assert sorted(zip(rest["start_ns"] // S, rest["packets"], strict=True)) == [(10, 2), (100, 2)]


def test_without_a_free_clock_frames_behind_their_hosts_clock_are_late_flows_counted() -> None:
    # The same with a table of one clock, kept by the first flow: the host cannot get a new
    # clock; its frames are judged by the one it has, behind it: each is a late flow of its
    # own, finished at once, and counted as such and as judged without a clock of its own.
    config = FlowConfig(idle_timeout_s=IDLE, active_timeout_s=ACTIVE, max_host_clocks=1)
    table, resolver = FlowTable(config), EndpointResolver()
    dec = decoded(4, ts_ns=np.array([100, 140, 10, 20]) * S, src_ip="10.0.0.1",
                  dst_ip="10.0.0.2", ip_proto=17, src_port=7, dst_port=9)  # fmt: skip
    done = table.update(dec, resolver.resolve(dec))
    assert sorted(zip(done["start_ns"] // S, done["packets"], strict=True)) == [(10, 1), (20, 1)]
    counters = table.counters()
    assert (counters["late_frames"], counters["clocks_full_frames"]) == (2, 2)
    assert table.open_flows == 1
    rest = table.flush()
    assert (rest["start_ns"].tolist(), rest["packets"].tolist()) == ([100 * S], [2])
