"""A clock per observing host: a source whose capture times lag — a replay of an old capture
into a live analyzer, a collector whose clock is behind — forms whole flows, as it would
alone, instead of one late flow per frame; and the clock table stays bounded.

The truth each test checks against is the same frames put through a flow table alone, host
by host (what ``vspan report`` of that host's capture computes; ``test_flows`` checks that
pipeline against a per-packet reference and the generator's ground truth).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.decode import decode_batch
from vspan.analysis.decode.columns import Decoded
from vspan.analysis.flows.endpoints import EndpointResolver
from vspan.analysis.flows.keys import KEY_COLUMNS, usable
from vspan.analysis.flows.table import FlowConfig, FlowTable
from vspan.inventory import Inventory
from vspan.synth import SynthCapture, generate_small
from vspan_testing.decoded import decoded

S = 1_000_000_000
DAY = 86_400 * S
NOW = 1_750_000_000 * S
"""A "live" capture time (June 2025); ``generate_small`` captures are of November 2023."""
FLOW = [*KEY_COLUMNS, "start_ns", "last_ns", "packets", "bytes", "packets_rev", "bytes_rev",
        "copies", "observer"]  # fmt: skip


def frames_of(cap: SynthCapture, host: int | None = None, *, shift_ns: int = 0) -> Decoded:
    """The usable frames of ``cap`` (those ``host`` observed), ``shift_ns`` later."""
    dec = decode_batch(cap.frames)
    keep = usable(dec) & (True if host is None else dec.host == host)
    out = dec.take(np.flatnonzero(keep))
    cols = out.columns()
    cols["ts_ns"] = cols["ts_ns"] + shift_ns
    return Decoded(**cols)


def run(
    parts: list[Decoded], config: FlowConfig | None = None, inventory: Inventory | None = None
) -> pd.DataFrame:
    """Each batch of ``parts`` through one table in turn, then a flush; counters in attrs.
    (With the generator's inventory, endpoints do not depend on which frames came before.)"""
    table, resolver = FlowTable(config), EndpointResolver(inventory)
    flows = [table.update(part, resolver.resolve(part)) for part in parts]
    flows.append(table.flush())
    out = pd.concat(flows, ignore_index=True)
    out.attrs["counters"] = table.counters()
    return out


def rows(flows: pd.DataFrame) -> list[tuple[int, ...]]:
    return sorted(tuple(int(v) for v in r) for r in flows[FLOW].itertuples(index=False))


def interleaved(sources: list[Decoded], seed: int, most: int = 200) -> list[Decoded]:
    """The frames of ``sources`` as they reach an analyzer from senders that each send in
    their own order: runs of 1..``most`` frames from one source after another (drawn from
    ``seed``), cut into batches at random."""
    rng = np.random.default_rng(seed)
    base = np.cumsum([0] + [len(s) for s in sources])
    at = [0] * len(sources)
    order: list[int] = []  # frames of the sources concatenated
    while any(a < len(s) for a, s in zip(at, sources, strict=True)):
        k = int(rng.choice([i for i, s in enumerate(sources) if at[i] < len(s)]))
        run_of = min(int(rng.integers(1, most + 1)), len(sources[k]) - at[k])
        order += range(base[k] + at[k], base[k] + at[k] + run_of)
        at[k] += run_of
    merged = Decoded.concat(sources).take(np.array(order))
    cuts = sorted({int(c) for c in rng.integers(1, len(merged), size=8)})
    return [merged.take(np.arange(a, b)) for a, b in itertools.pairwise([0, *cuts, len(merged)])]


def test_a_replay_of_a_day_old_capture_beside_live_traffic_forms_the_flows_it_would_alone() -> None:
    # Regression: with one clock (the newest capture time seen from anyone), every frame of
    # the replay was more than the idle timeout behind it and became a finished flow of its
    # own (``late_frames``): the store flooded with one-frame flows.
    cap = generate_small(seed=3)
    inventory = cap.inventory()
    live = frames_of(cap, 1, shift_ns=NOW - 1_700_000_000 * S)  # host 1's frames, today
    replay = frames_of(cap, 2)  # host 2's frames, as they were in 2023
    assert int(live.ts_ns.min()) - int(replay.ts_ns.max()) > DAY
    together = run(interleaved([live, replay], seed=1), inventory=inventory)
    assert together.attrs["counters"]["late_frames"] == 0
    alone = run([replay], inventory=inventory)
    assert len(alone) > 10
    assert rows(together[together["observer"] == 2]) == rows(alone)
    assert rows(together[together["observer"] == 1]) == rows(run([live], inventory=inventory))


def test_a_flow_replayed_while_the_same_flow_is_live_is_whole_on_both_sides() -> None:
    # The same conversation (same addresses, ports, MACs: the same key) live from host 1 and
    # replayed from a day ago by host 2, frame by frame in turn: a flow on each host's clock.
    n = 40
    ts = np.repeat(np.arange(n // 2), 2) * S + np.tile([NOW, NOW - DAY], n // 2)
    host = np.tile([1, 2], n // 2)
    dec = decoded(n, ts_ns=ts, host=host, src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17,
                  src_port=5000, dst_port=53, wirelen=100)  # fmt: skip
    flows = run([dec.take(np.arange(lo, min(lo + 7, n))) for lo in range(0, n, 7)])
    got = sorted(zip(flows["observer"], flows["start_ns"], flows["packets"], strict=True))
    assert got == [(1, NOW, n // 2), (2, NOW - DAY, n // 2)]
    assert flows.attrs["counters"]["late_frames"] == 0


def test_a_collector_five_minutes_behind_has_whole_flows() -> None:
    # Host 3's collector stamps its frames 5 minutes early; the frames reach the analyzer in
    # real time. Its own flows (intra-host, external) are whole; a cross-host flow with it
    # becomes two whole flows, one per clock (each counts every packet once: its sender
    # copies one way, its receiver copies the other), as each host's frames alone give.
    cap = generate_small(seed=5)
    dec = frames_of(cap)
    behind = np.where(dec.host == 3, -300 * S, 0)
    cols = dec.columns()
    cols["ts_ns"] = cols["ts_ns"] + behind
    skewed = Decoded(**cols)
    parts = [skewed.take(np.arange(lo, min(lo + 256, len(skewed))))
             for lo in range(0, len(skewed), 256)]  # fmt: skip
    inventory = cap.inventory()
    flows = run(parts, inventory=inventory)
    assert flows.attrs["counters"]["late_frames"] == 0
    three = skewed.take(np.flatnonzero(skewed.host == 3))
    others = skewed.take(np.flatnonzero(skewed.host != 3))
    alone = rows(run([three], inventory=inventory)) + rows(run([others], inventory=inventory))
    assert rows(flows) == sorted(alone)
    # Nothing was cut: as many flows as the ground truth, plus one per cross-host flow of
    # host 3, and no flow of one frame more than the truth has.
    truth = cap.truth
    with_three = ((truth["src_host"] == "hv03") | (truth["dst_host"] == "hv03")) & (
        truth["scope"] == "cross-host"
    )
    assert len(flows) == len(truth) + int(with_three.sum())


# --- any number of hosts, any clock offsets ------------------------------------------------

OFFSETS = st.sampled_from([0, -1000 * S, -DAY, 7 * DAY])
"""Clock offsets of hosts: 0 (in step), or more than the frames' span (400 s) plus the idle
timeout away from each other (a frame of a host far off may otherwise happen to fit another
host's flow, which is no harm: the flow keeps within its timeouts)."""


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 400), st.integers(0, 2), st.integers(0, 2)),
        min_size=1,
        max_size=60,
    ),
    st.lists(OFFSETS, min_size=3, max_size=3),
    st.lists(st.integers(1, 59), max_size=6),
)
def test_hosts_with_any_clock_offsets_form_the_flows_they_form_alone(
    frames: list[tuple[int, int, int]], offsets: list[int], cuts: list[int]
) -> None:
    # Frames (true time in s, key, host) reach the table in true-time order, each stamped
    # with its host's clock (true time + the host's offset). Hosts whose clocks agree share
    # flows (a cross-host flow); a host whose clock is off by more than the timeouts forms
    # its own. Whatever the offsets and batch cuts: the flows of each group of hosts with
    # one clock are those its frames form alone, no frame is late, and every frame counts.
    frames = sorted(frames)
    n = len(frames)
    host = np.array([h for _, _, h in frames]) + 1
    ts = np.array([t * S + offsets[h - 1] for (t, _, _), h in zip(frames, host, strict=True)])
    dec = decoded(n, ts_ns=ts, host=host, src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17,
                  src_port=[k for _, k, _ in frames], dst_port=9,
                  wirelen=[1 << i for i in range(n)])  # fmt: skip
    config = FlowConfig(idle_timeout_s=60, active_timeout_s=150)
    bounds = [0, *sorted({c for c in cuts if c < n}), n]
    together = run([dec.take(np.arange(a, b)) for a, b in itertools.pairwise(bounds)], config)
    assert together.attrs["counters"]["late_frames"] == 0
    expected: list[tuple[int, int, int]] = []
    for offset in sorted(set(offsets)):
        group = np.flatnonzero(np.isin(host, [h + 1 for h in range(3) if offsets[h] == offset]))
        if group.size:
            alone = run([dec.take(group)], config)
            expected += members(alone)
    assert members(together) == sorted(expected)
    assert int(together["packets"].sum() + together["packets_rev"].sum()) == n


def members(flows: pd.DataFrame) -> list[tuple[int, int, int]]:
    """(key, start, frames as a bit mask) of each flow, sorted."""
    mask = flows["bytes"] + flows["bytes_rev"]
    return sorted(
        zip(flows["port_a"].tolist(), flows["start_ns"].tolist(), mask.tolist(), strict=True)
    )


# --- bounded -------------------------------------------------------------------------------


def test_the_clock_table_is_bounded_and_what_does_not_fit_is_counted() -> None:
    # Four clocks for ten hosts, each with one flow: six hosts' frames are judged by the
    # shared clock, counted; once the first hosts' flows have ended, their clocks are freed
    # and new hosts get clocks of their own again.
    config = FlowConfig(idle_timeout_s=60, max_host_clocks=4)
    table, resolver = FlowTable(config), EndpointResolver()

    def send(hosts: list[int], at_s: int) -> pd.DataFrame:
        dec = decoded(len(hosts), ts_ns=[at_s * S] * len(hosts), host=hosts, src_ip="10.0.0.1",
                      dst_ip="10.0.0.2", ip_proto=17, src_port=hosts, dst_port=9)  # fmt: skip
        return table.update(dec, resolver.resolve(dec))

    send(list(range(1, 11)), 0)
    counters = table.counters()
    assert counters["host_clocks"] == 4
    assert counters["clocks_full_frames"] == 6
    assert table.open_flows == 10
    # Later: the ten flows idle out by their clocks (the shared one included); hosts 11-14
    # find the slots of hosts 1-4 free once those flows are gone.
    table.advance(200 * S)
    assert table.open_flows == 0
    send([11, 12, 13, 14], 300)
    counters = table.counters()
    assert counters["host_clocks"] == 4
    assert counters["clocks_full_frames"] == 6  # no more
    assert table.memory_bytes < 1 << 20
