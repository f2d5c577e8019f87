"""Flow table: timeouts, directions, copies, and batch-split invariance against a reference."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.decode.columns import Decoded, TagKind
from vspan.analysis.flows.endpoints import EndpointResolver
from vspan.analysis.flows.table import FlowConfig, FlowTable
from vspan.inventory import Inventory
from vspan_testing.decoded import decoded

S = 1_000_000_000
SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08


def run(
    table: FlowTable,
    dec: Decoded,
    cuts: list[int] | None = None,
    inventory: Inventory | None = None,
) -> pd.DataFrame:
    resolver = EndpointResolver(inventory)
    parts = []
    bounds = [0, *(cuts or []), len(dec)]
    for lo, hi in itertools.pairwise(bounds):
        part = dec.take(np.arange(lo, hi))
        parts.append(table.update(part, resolver.resolve(part)))
    parts.append(table.flush())
    return pd.concat(parts, ignore_index=True).sort_values("start_ns", ignore_index=True)


def tcp_conversation() -> Decoded:
    # client 10.0.0.1:40000 -> server 10.0.0.2:443, handshake, data, close.
    c2s = [True, False, True, True, False, True, False]
    flags = [SYN, SYN | ACK, ACK, PSH | ACK, PSH | ACK, FIN | ACK, FIN | ACK]
    size = [74, 74, 66, 500, 1514, 66, 66]
    n = len(c2s)
    src = np.where(c2s, "10.0.0.1", "10.0.0.2")
    dst = np.where(c2s, "10.0.0.2", "10.0.0.1")
    return decoded(
        n,
        ts_ns=np.arange(n) * S // 100,
        src_ip=src,
        dst_ip=dst,
        ip_proto=6,
        src_port=np.where(c2s, 40000, 443),
        dst_port=np.where(c2s, 443, 40000),
        tcp_flags=flags,
        wirelen=size,
        src_mac=np.where(c2s, 1, 2),
        dst_mac=np.where(c2s, 2, 1),
    )


def test_one_tcp_conversation_is_one_flow_with_both_directions() -> None:
    flows = run(FlowTable(), tcp_conversation())
    assert len(flows) == 1
    f = flows.iloc[0]
    # Side A is the canonical smaller address (10.0.0.1), which also sent first.
    assert f["first_rev"] == 0
    assert (f["packets"], f["packets_rev"]) == (4, 3)
    assert (f["bytes"], f["bytes_rev"]) == (74 + 66 + 500 + 66, 74 + 1514 + 66)
    assert f["tcp_flags"] == SYN | ACK | PSH | FIN
    assert f["tcp_flags_rev"] == SYN | ACK | PSH | FIN
    assert (f["start_ns"], f["last_ns"]) == (0, 6 * S // 100)


def test_server_speaking_first_is_marked_reverse() -> None:
    dec = decoded(
        2,
        ts_ns=[0, 1],
        src_ip=["10.0.0.9", "10.0.0.1"],
        dst_ip=["10.0.0.1", "10.0.0.9"],
        ip_proto=17,
        src_port=[53, 5000],
        dst_port=[5000, 53],
    )
    f = run(FlowTable(), dec).iloc[0]
    assert f["first_rev"] == 1


def test_idle_gap_over_timeout_splits_and_under_does_not() -> None:
    ts = np.array([0, 59, 59 + 61]) * S  # gaps of 59 s and 61 s with a 60 s idle timeout
    dec = decoded(
        3, ts_ns=ts, src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17, src_port=1, dst_port=2
    )
    flows = run(FlowTable(), dec)
    assert flows["packets"].tolist() == [2, 1]


def test_active_timeout_restarts_at_the_first_packet_past_the_limit() -> None:
    ts = np.arange(0, 701, 10) * S  # a packet every 10 s for 700 s; active timeout 300 s
    dec = decoded(
        ts.size, ts_ns=ts, src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17, src_port=1, dst_port=2
    )
    flows = run(FlowTable(), dec)
    assert (flows["start_ns"] // S).tolist() == [0, 300, 600]
    assert flows["packets"].tolist() == [30, 30, 11]


def test_icmp_echo_request_and_reply_form_one_flow_per_identifier() -> None:
    dec = decoded(
        4,
        ts_ns=[0, 1, 2, 3],
        ip_proto=1,
        src_ip=["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"],
        dst_ip=["10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.1"],
        icmp_type=[8, 0, 8, 0],
        icmp_id=[7, 7, 8, 8],
    )
    flows = run(FlowTable(), dec)
    assert sorted(zip(flows["packets"], flows["packets_rev"], strict=True)) == [(1, 1), (1, 1)]
    assert sorted(flows["port_a"].tolist()) == [7, 8]


def test_cross_host_packet_seen_twice_counts_once() -> None:
    # VM a (vif 3 on host 1) -> VM b (vif 4 on host 2): sender copy d=0 at host 1,
    # receiver copy d=1 at host 2, 100 us later; then b answers the same way back.
    mac_a, mac_b = 0x525400000003, 0x525400000004
    dec = decoded(
        4,
        ts_ns=[0, 100_000, 1_000_000, 1_100_000],
        tag_kind=TagKind.VNTAG,
        host=[1, 2, 2, 1],
        tag_d=[0, 1, 0, 1],
        svif=[3, 0, 4, 0],
        dvif=[0, 4, 0, 3],
        src_mac=[mac_a, mac_a, mac_b, mac_b],
        dst_mac=[mac_b, mac_b, mac_a, mac_a],
        src_ip=["10.0.0.3", "10.0.0.3", "10.0.0.4", "10.0.0.4"],
        dst_ip=["10.0.0.4", "10.0.0.4", "10.0.0.3", "10.0.0.3"],
        ip_proto=17,
        src_port=[1000, 1000, 53, 53],
        dst_port=[53, 53, 1000, 1000],
        wirelen=100,
    )
    flows = run(FlowTable(), dec)
    assert len(flows) == 1
    f = flows.iloc[0]
    assert (f["packets"], f["packets_rev"], f["copies"]) == (1, 1, 4)
    assert (f["bytes"], f["bytes_rev"]) == (100, 100)
    assert {f["observer"], f["observer_other"]} == {1, 2}


def test_receiver_copies_count_when_the_sender_is_not_observed() -> None:
    # From outside the host (uplink) to VM vif 5: only d=1 copies exist.
    dec = decoded(
        3,
        ts_ns=[0, 1, 2],
        tag_kind=TagKind.VNTAG,
        host=1,
        tag_d=1,
        svif=0,
        dvif=5,
        src_ip="192.0.2.1",
        dst_ip="10.0.0.5",
        ip_proto=6,
        src_port=443,
        dst_port=50000,
        dst_mac=5,
        src_mac=9,
    )
    f = run(FlowTable(), dec).iloc[0]
    assert f["packets"] + f["packets_rev"] == 3


# --- split invariance against a per-packet reference ------------------------------------


def reference(ts: list[int], key: list[int], idle: int, active: int) -> list[tuple[int, int, int]]:
    """(key, start, packets) per flow, by the textbook per-packet rule."""
    done, live = [], {}
    for t, k in sorted(zip(ts, key, strict=True)):
        if k in live:
            start, last, n = live[k]
            if t - last <= idle and t - start < active:
                live[k] = (start, t, n + 1)
                continue
            done.append((k, start, n))
        live[k] = (t, t, 1)
    done.extend((k, s, n) for k, (s, _, n) in live.items())
    return sorted(done)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 3)), min_size=1, max_size=80),
    st.lists(st.integers(1, 79), max_size=5),
)
def test_flows_do_not_depend_on_how_the_capture_is_cut(
    pkts: list[tuple[int, int]], cuts: list[int]
) -> None:
    pkts.sort()
    ts = [t * S for t, _ in pkts]
    key = [k for _, k in pkts]
    dec = decoded(
        len(pkts),
        ts_ns=ts,
        src_ip="10.0.0.1",
        dst_ip="10.0.0.2",
        ip_proto=17,
        src_port=key,
        dst_port=9,
    )
    cfg = FlowConfig(idle_timeout_s=60, active_timeout_s=300)
    cut_points = sorted({c for c in cuts if c < len(pkts)})
    flows = run(FlowTable(cfg), dec, cut_points)
    got = sorted(zip(flows["port_a"], flows["start_ns"], flows["packets"], strict=True))
    assert [tuple(int(x) for x in g) for g in got] == reference(ts, key, 60 * S, 300 * S)


def test_later_fragments_join_their_first_fragment_even_across_batches() -> None:
    # One UDP datagram in three IPv4 fragments (id 77) and another datagram's first fragment
    # (id 78); the batch is cut between the first and the later fragments of id 77.
    dec = decoded(
        4,
        ts_ns=[0, 1, 2, 3],
        src_ip="10.0.0.1",
        dst_ip="10.0.0.2",
        ip_proto=17,
        is_fragment=1,
        frag_id=[77, 78, 77, 77],
        frag_offset=[0, 0, 1480, 2960],
        frag_mf=[1, 1, 1, 0],
        src_port=[5000, 6000, 0, 0],
        dst_port=[53, 53, 0, 0],
        l4_offset=[34, 34, -1, -1],
    )
    flows = run(FlowTable(), dec, cuts=[2])
    assert sorted(zip(flows["port_a"], flows["packets"], strict=True)) == [(5000, 3), (6000, 1)]


def test_advancing_time_ends_idle_flows_without_traffic() -> None:
    table = FlowTable()
    dec = decoded(1, ts_ns=[0], src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17)
    assert table.update(dec, EndpointResolver().resolve(dec)).empty
    assert table.advance(60 * S).empty  # exactly the idle timeout: still open
    ended = table.advance(60 * S + 1)
    assert ended["packets"].tolist() == [1]
    assert table.open_flows == 0


TWO_HOSTS = """\
hosts: [{name: hv01, collector_id: 1}, {name: hv02, collector_id: 2}]
vms:
  - {name: a, uuid: 00000000-0000-4000-8000-000000000003, host: hv01,
     nics: [{mac: "52:54:00:00:00:03", vif: 3}]}
  - {name: b, uuid: 00000000-0000-4000-8000-000000000004, host: hv02,
     nics: [{mac: "52:54:00:00:00:04", vif: 4}]}
"""


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [1, 3, 0, 2], [3, 2, 1, 0]])
def test_the_delay_between_the_two_observation_points_is_kept(order: list[int]) -> None:
    # a -> b: sender copy at host 1, receiver copy at host 2 120 us later; b -> a: 80 us.
    # Collectors send independently, so the copies may reach the analyzer in any order; the
    # analyzer knows the VMs from the collectors' registrations (here: an inventory). The two
    # copies of a packet share its fingerprint.
    mac_a, mac_b = 0x525400000003, 0x525400000004
    dec = decoded(
        4, ts_ns=[0, 120_000, 1_000_000, 1_080_000], tag_kind=TagKind.VNTAG,
        host=[1, 2, 2, 1], tag_d=[0, 1, 0, 1], svif=[3, 0, 4, 0], dvif=[0, 4, 0, 3],
        src_mac=[mac_a, mac_a, mac_b, mac_b], dst_mac=[mac_b, mac_b, mac_a, mac_a],
        src_ip=["10.0.0.3", "10.0.0.3", "10.0.0.4", "10.0.0.4"],
        dst_ip=["10.0.0.4", "10.0.0.4", "10.0.0.3", "10.0.0.3"], ip_proto=17,
        src_port=[1000, 1000, 53, 53], dst_port=[53, 53, 1000, 1000],
        fingerprint=[11, 11, 22, 22],
    )  # fmt: skip
    inventory = Inventory.loads(TWO_HOSTS)
    shuffled = dec.take(np.array(order))
    flows = run(FlowTable(), shuffled, cuts=[1, 2, 3], inventory=inventory)  # a frame a batch
    assert len(flows) == 1
    assert flows["delay_ns"].iloc[0] == pytest.approx((120_000 + 80_000) / 2)
    assert (flows["packets"].iloc[0], flows["packets_rev"].iloc[0]) == (1, 1)


def test_no_delay_without_both_observation_points() -> None:
    dec = decoded(2, ts_ns=[0, 1], src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17)
    assert np.isnan(run(FlowTable(), dec)["delay_ns"].iloc[0])


# --- the hash table under churn: growth, expiry and eviction against a model ------------


def model_with_evictions(
    batches: list[list[tuple[int, int]]], evicts: list[int], idle: int, active: int
) -> list[tuple[int, int, int, int]]:
    """(key, start, last, packets) per flow: the per-packet rule, idle expiry at the end
    of each batch, then the ``evicts[b]`` flows seen longest ago finished."""
    done, live = [], {}
    now = -(1 << 62)
    for batch, evict in zip(batches, evicts, strict=True):
        for t, k in batch:
            if k in live:
                start, last, n = live[k]
                if t - last <= idle and t - start < active:
                    live[k] = (start, t, n + 1)
                    continue
                done.append((k, start, last, n))
            live[k] = (t, t, 1)
            now = max(now, t)
        for k in [k for k, (_, last, _) in live.items() if now - last > idle]:
            done.append((k, *live.pop(k)))
        for k in sorted(live, key=lambda k: live[k][1])[:evict]:
            done.append((k, *live.pop(k)))
    done.extend((k, s, last, n) for k, (s, last, n) in live.items())
    return sorted((k, s, last, n) for k, s, last, n in done)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3_000), st.integers(0, 300)), min_size=1, max_size=600),
    st.lists(st.tuples(st.integers(1, 599), st.integers(0, 40)), max_size=8),
    st.integers(1, 64),
)
def test_many_flows_with_expiry_and_eviction_match_the_model(
    steps: list[tuple[int, int]], cuts: list[tuple[int, int]], initial_rows: int
) -> None:
    # Distinct, increasing times (gaps in ms) over up to 300 keys; short timeouts so that
    # flows idle out, restart and get evicted while the table grows from a few rows.
    ts = np.cumsum([gap for gap, _ in steps]) * 1_000_000
    key = [k for _, k in steps]
    bounds = sorted({c for c, _ in cuts if c < len(steps)})
    evict_at = dict(cuts)
    edges = [0, *bounds, len(steps)]
    batches = [
        list(zip(ts[lo:hi].tolist(), key[lo:hi], strict=True))
        for lo, hi in itertools.pairwise(edges)
    ]
    evicts = [evict_at.get(hi, 0) if hi < len(steps) else 0 for hi in edges[1:]]
    dec = decoded(len(steps), ts_ns=ts, src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17,
                  src_port=np.array(key) + 1000, dst_port=9)  # fmt: skip
    idle, active = 2 * S, 20 * S
    table = FlowTable(FlowConfig(idle_timeout_s=2, active_timeout_s=20), initial_rows=initial_rows)
    resolver = EndpointResolver()
    parts = []
    for (lo, hi), evict in zip(itertools.pairwise(edges), evicts, strict=True):
        part = dec.take(np.arange(lo, hi))
        parts.append(table.update(part, resolver.resolve(part)))
        parts.append(table.evict(evict))
    parts.append(table.flush())
    assert table.open_flows == 0
    flows = pd.concat(parts, ignore_index=True)
    got = sorted(
        (int(p) - 1000, int(s), int(last), int(n))
        for p, s, last, n in zip(
            flows["port_a"], flows["start_ns"], flows["last_ns"], flows["packets"], strict=True
        )
    )
    assert got == model_with_evictions(batches, evicts, idle, active)
