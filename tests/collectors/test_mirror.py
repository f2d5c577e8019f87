"""Tests of vspan.collectors.mirror: the mirroring rules of ARCHITECTURE.md, table-driven.

Each case is one frame on one port; the tag is read back with ``decode_vntag`` at offset 14
and the bytes around it are compared with the original. A per-frame Python reference of
the rules and of the sessions (per session: its VMs, direction and filter, evaluated in
Python) is held against the vectorized code on random batches with two routes, and nothing
is ever lost: per route exported + duplicates + unselected + filtered + sampled + runts
equals the input, and across routes each frame is counted once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.batch import FrameBatch
from vspan.collectors.mirror import LocalMacs, Mirror, MirrorResult
from vspan.collectors.model import PortBatch
from vspan.inventory import MAX_VIF, Port
from vspan.sessions import Destination, Direction, Selection, Session, SessionSet
from vspan.wire.vntag import decode_vntag

A, B, C = 0x020000000005, 0x020000000009, 0x02000000000C
VIF = {A: 5, B: 9, C: 12}
X = 0x02AA00000001  # a host outside
U = 0x02BB00000001  # unknown unicast (flooded)
BCAST = 0xFFFFFFFFFFFF
MCAST = 0x01005E000001
PORTS = [
    Port("vnet0", 10, 5, A, "web-01", profile="web"),
    Port("vnet1", 11, 9, B, "db-01", profile="db"),
    Port("vnet2", 12, 12, C, "app-01", profile="app"),
]


def frame(dst: int, src: int, size: int = 60, fill: int = 0) -> bytes:
    body = bytes((fill + i) % 256 for i in range(size - 14))
    return dst.to_bytes(6, "big") + src.to_bytes(6, "big") + b"\x08\x00" + body


def port_batch(rows: list[tuple[int, bool, bytes]]) -> PortBatch:
    frames = FrameBatch.from_frames([f for _, _, f in rows], ts_ns=np.arange(len(rows)) * 10)
    return PortBatch(
        frames,
        np.array([v for v, _, _ in rows], dtype=np.uint16),
        np.array([s for _, s, _ in rows], dtype=np.bool_),
    )


NOTHING = Selection(
    rx=np.zeros(MAX_VIF + 1, np.bool_),
    tx=np.zeros(MAX_VIF + 1, np.bool_),
    both=np.zeros(MAX_VIF + 1, np.bool_),
    snaplen=np.zeros(MAX_VIF + 1, np.int32),
    sample=np.ones(MAX_VIF + 1, np.int32),
)


def selection(*sessions: Session, ports: list[Port] = PORTS) -> Selection:
    """The one selection of filterless sessions (``NOTHING`` when they select no port)."""
    parts = SessionSet(sessions).selections(ports)
    assert len(parts) <= 1
    return parts[0] if parts else NOTHING


def run(rows: list[tuple[int, bool, bytes]], sel: Selection | None = None) -> MirrorResult:
    mirror = Mirror(selection=sel)
    mirror.set_ports(PORTS)
    return mirror.process(port_batch(rows))


def tags(result: MirrorResult) -> list[tuple[int, int, int]]:
    out = []
    for i in range(len(result.frames)):
        tag = decode_vntag(result.frames.frame(i), 14)
        out.append((tag.d, tag.svif, tag.dvif))
    return out


# (name, capture vif, from_vm, dst, src, expected tag or "dup") with every port mirrored
RULES = [
    ("sent to a local VM", 5, True, B, A, (0, 5, 9)),
    ("its delivery copy", 9, False, B, A, "dup"),
    ("sent outside", 5, True, X, A, (0, 5, 0)),
    ("delivered from outside", 5, False, A, X, (1, 0, 5)),
    ("broadcast sent", 5, True, BCAST, A, (0, 5, 0)),
    ("broadcast copy of a local sender", 9, False, BCAST, A, "dup"),
    ("broadcast from outside on A", 5, False, BCAST, X, (1, 0, 5)),
    ("broadcast from outside on B", 9, False, BCAST, X, (1, 0, 9)),
    ("multicast sent", 12, True, MCAST, C, (0, 12, 0)),
    ("multicast copy of a local sender", 5, False, MCAST, C, "dup"),
    ("multicast from outside", 12, False, MCAST, X, (1, 0, 12)),
    ("flooded unicast from a local VM", 9, False, U, A, "dup"),
    ("flooded unicast from outside", 9, False, U, X, (1, 0, 9)),
]


@pytest.mark.parametrize(
    ("vif", "sent", "dst", "src", "expected"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_rules_mirroring_everything(
    vif: int, sent: bool, dst: int, src: int, expected: tuple[int, int, int] | str
) -> None:
    original = frame(dst, src, 70, fill=vif)
    result = run([(vif, sent, original)])
    if expected == "dup":
        assert (result.exported, result.duplicates) == (0, 1)
        return
    assert (result.exported, result.duplicates, result.unselected) == (1, 0, 0)
    assert tags(result) == [expected]
    tagged = result.frames.frame(0)
    assert tagged[:12] == original[:12]
    assert tagged[12:14] == b"\x89\x26"
    assert tagged[18:] == original[12:]
    assert decode_vntag(tagged, 14).p == 0
    assert (int(result.frames.caplen[0]), int(result.frames.origlen[0])) == (76, 76)
    assert result.vif.tolist() == [vif]
    assert result.frames.ts_ns.tolist() == [0]


BOTH_ON_B = Session("b-both", vms=("db-01",), direction=Direction.BOTH)


@pytest.mark.parametrize(
    ("vif", "sent", "dst", "src", "expected"),
    [
        (9, False, B, A, (1, 5, 9)),  # intra-host delivery: exported with both directions
        (5, True, B, A, (0, 5, 9)),  # and still once at the sender (B's rx wants it)
        (9, False, U, A, "dup"),  # a flooded copy is not a delivery to B
        (9, False, BCAST, A, "dup"),  # group copies stay duplicates
        (5, False, A, B, "dup"),  # delivery to A: nobody asked both directions of A
    ],
)
def test_both_directions_export_the_intra_host_delivery(
    vif: int, sent: bool, dst: int, src: int, expected: tuple[int, int, int] | str
) -> None:
    result = run([(vif, sent, frame(dst, src))], selection(BOTH_ON_B))
    if expected == "dup":
        assert (result.exported, result.duplicates) == (0, 1)
    else:
        assert tags(result) == [expected]


def test_rx_and_tx_sessions_are_not_both() -> None:
    """Two sessions (rx and tx) select both directions but neither asks for 'both'."""
    sel = selection(
        Session("rx", vms=("db-01",), direction=Direction.RX),
        Session("tx", vms=("db-01",), direction=Direction.TX),
    )
    assert bool(sel.rx[9] and sel.tx[9])
    assert not sel.both[9]
    assert run([(9, False, frame(B, A))], sel).duplicates == 1


TX_A = Session("a-tx", vms=("web-01",), direction=Direction.TX)
RX_B = Session("b-rx", vms=("db-01",), direction=Direction.RX)


@pytest.mark.parametrize(
    ("session", "case", "exported"),
    [
        (TX_A, (5, True, X, A), True),
        (TX_A, (5, False, A, X), False),  # A's rx not selected
        (TX_A, (5, True, B, A), True),
        (TX_A, (12, True, A, C), False),  # sent by C to A: neither C's tx nor A's rx
        (RX_B, (5, True, B, A), True),  # sender copy wanted by the receiver's rx
        (RX_B, (5, True, X, A), False),
        (RX_B, (9, False, B, X), True),
        (RX_B, (5, True, BCAST, A), True),  # B receives A's broadcast
        (RX_B, (9, True, BCAST, B), False),  # B's own broadcast: only B has rx, B sent it
        (RX_B, (5, False, BCAST, X), False),  # delivery to A, not B
    ],
)
def test_session_direction_masks(
    session: Session, case: tuple[int, bool, int, int], exported: bool
) -> None:
    vif, sent, dst, src = case
    result = run([(vif, sent, frame(dst, src))], selection(session))
    assert result.exported == int(exported)
    assert result.unselected == int(not exported)


def test_snaplen_cuts_after_the_tag() -> None:
    sel = selection(Session("s", vms=("web-01",), snaplen=20))
    original = frame(X, A, 100)
    result = run([(5, True, original), (5, True, frame(X, A, 16))], sel)
    assert result.frames.caplen.tolist() == [26, 22]
    assert result.frames.origlen.tolist() == [106, 22]
    assert result.frames.frame(0) == original[:12] + result.frames.frame(0)[12:18] + original[12:20]
    assert result.truncated == 1


def test_snaplen_of_several_selections_is_the_largest() -> None:
    sel = selection(
        Session("a", vms=("web-01",), direction=Direction.TX, snaplen=20),
        Session("b", vms=("db-01",), direction=Direction.RX, snaplen=40),
    )
    result = run([(5, True, frame(B, A, 100)), (5, True, frame(X, A, 100))], sel)
    assert result.frames.caplen.tolist() == [46, 26]


def test_sampling_is_every_nth_per_port_across_batches() -> None:
    sel = selection(Session("s", vms=("web-01", "db-01"), sample=3))
    mirror = Mirror(selection=sel)
    mirror.set_ports(PORTS)
    kept: list[int] = []
    for start, stop in ((0, 4), (4, 10)):
        rows = [(5, True, frame(X, A, 60, fill=i)) for i in range(start, stop)]
        rows.insert(1, (9, True, frame(X, B, 60, fill=200 + start)))
        result = mirror.process(port_batch(rows))
        kept += [result.frames.frame(i)[20] for i in range(result.exported)]  # the fill
    # A: frames 0..9 -> 0, 3, 6, 9 kept; B: its two frames are its 0th and 1st -> first kept
    assert kept == [0, 200, 3, 6, 9]
    assert mirror.counters.exported == 5
    assert mirror.counters.dropped["sampled_out"] == 7


def test_a_batch_larger_than_one_gather_step() -> None:
    """Several MiB of frames: tagging runs in steps; every frame still comes out intact."""
    rows = [
        (vif, True, frame(X, src, 900 + (i * 131) % 600, fill=i))
        for i in range(6000)
        for vif, src in [((5, A), (9, B), (12, C))[i % 3]]
    ]
    sel = selection(Session("s", vms=("web-01", "app-01"), snaplen=(1000)))
    result = run(rows, sel)
    assert result.exported == 4000
    assert int(result.frames.caplen.sum()) > 3 * (1 << 20)
    for i, row in enumerate(result.rows.tolist()):
        original, tagged = rows[row][2], result.frames.frame(i)
        assert tagged[:12] + tagged[18:] == original[:1000]
        assert decode_vntag(tagged, 14).svif == rows[row][0]


def test_runts_and_bad_vifs() -> None:
    result = run([(5, True, frame(X, A)[:13]), (5, True, frame(X, A))])
    assert (result.runts, result.exported, result.rows.tolist()) == (1, 1, [1])
    with pytest.raises(ValueError, match=r"vifs must lie in 1\.\.4095"):
        run([(0, True, frame(X, A))])


def test_empty_batch() -> None:
    result = run([])
    assert (len(result.frames), result.exported) == (0, 0)


def test_local_macs_lookup() -> None:
    macs = LocalMacs.from_ports([*PORTS, Port("tap9", 0, 30, 0, "no-mac")])
    got = macs.lookup(np.array([B, X, A, C, 0], dtype=np.uint64))
    assert got.tolist() == [9, 0, 5, 12, 0]
    assert LocalMacs.from_ports([]).lookup(np.array([A], dtype=np.uint64)).tolist() == [0]


# --- filters and routes ------------------------------------------------------------------


def udp(dst: int, src: int, dport: int, sport: int = 40000) -> bytes:
    """An IPv4/UDP frame (checksums 0: the filter does not care)."""
    ip = bytes.fromhex("450000200000400040110000") + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    return frame(dst, src, 14)[:14] + ip + struct.pack("!HHHH", sport, dport, 12, 0) + b"abcd"


def test_a_filter_keeps_only_the_frames_it_accepts() -> None:
    sel = selection(Session("s", vms=("web-01",), direction=Direction.TX, filter="udp port 9999"))
    result = run([(5, True, udp(X, A, 9999)), (5, True, udp(X, A, 53)), (5, False, udp(A, X, 1))],
                 sel)  # fmt: skip
    assert (result.exported, result.filtered, result.unselected) == (1, 1, 1)
    assert result.rows.tolist() == [0]


def test_the_filter_of_the_receiver_applies_where_the_frame_is_exported() -> None:
    """A session on B (rx) with a filter: A's frames to B are exported at A's port, and
    filtered there, by B's session's filter."""
    sel = selection(Session("b", vms=("db-01",), direction=Direction.RX, filter="udp port 9999"))
    result = run([(5, True, udp(B, A, 9999)), (5, True, udp(B, A, 53))], sel)
    assert tags(result) == [(0, 5, 9)]
    assert (result.exported, result.filtered) == (1, 1)


def test_selections_with_different_filters_each_want_their_frames() -> None:
    parts = SessionSet(
        [
            Session("a", vms=("web-01",), direction=Direction.TX, filter="udp port 9999"),
            Session("b", vms=("db-01",), direction=Direction.RX, snaplen=50),
        ]
    ).selections(PORTS)
    mirror = Mirror(selection=parts)
    mirror.set_ports(PORTS)
    rows = [
        (5, True, udp(X, A, 9999)),  # a's filter accepts
        (5, True, udp(X, A, 53)),  # a's filter refuses; b does not want it
        (5, True, udp(B, A, 53) + bytes(40)),  # b wants it (no filter), cut to 50
        (9, False, udp(B, X, 7)),  # delivered to B from outside: b
    ]
    result = mirror.process(port_batch(rows))
    assert result.rows.tolist() == [0, 2, 3]
    assert result.frames.caplen.tolist() == [len(rows[0][2]) + 6, 56, len(rows[3][2]) + 6]
    assert (result.filtered, result.unselected) == (1, 0)


def test_routes_get_their_own_frames_and_counters_count_each_frame_once() -> None:
    """Route None wants web-01's frames, route "b" db-01's through a filter: a frame from
    web-01 to db-01 goes to both, others to one or none."""
    dest = Destination("10.9.9.9")
    routes = SessionSet(
        [
            Session("a", vms=("web-01",), direction=Direction.TX),
            Session("b", vms=("db-01",), filter="udp port 9999", destination=dest),
        ]
    ).routes(PORTS)
    mirror = Mirror()
    mirror.set_ports(PORTS)
    mirror.set_routes(routes)
    rows = [
        (5, True, udp(B, A, 9999)),  # both routes
        (5, True, udp(B, A, 53)),  # route None only (b's filter refuses)
        (9, True, udp(X, B, 9999)),  # route b only
        (12, True, udp(X, C, 9999)),  # nobody's
        (9, True, udp(X, B, 1)),  # selected by b, filtered
    ]
    results = mirror.process_routes(port_batch(rows))
    assert results[None].rows.tolist() == [0, 1]
    assert results[dest].rows.tolist() == [0, 2]
    assert tags(results[dest]) == [(0, 5, 9), (0, 9, 0)]
    assert (results[dest].filtered, results[dest].unselected) == (2, 1)
    c = mirror.counters
    assert (c.frames, c.exported, c.routes) == (5, 3, {None: 2, dest: 2})
    assert c.dropped == {
        "duplicates": 0,
        "unselected": 1,
        "filtered": 1,
        "sampled_out": 0,
        "runts": 0,
    }
    with pytest.raises(ValueError, match="several routes"):
        mirror.process(port_batch(rows))
    mirror.set_routes({None: ()})  # sessions exist, none selects this host's VMs
    assert mirror.process(port_batch(rows)).unselected == 5


# --- the reference, one frame at a time ------------------------------------------------


FILTERS = {
    None: lambda f: True,
    "ether[14] & 1 = 0": lambda f: len(f) > 14 and f[14] & 1 == 0,
    "ether[15] > 60": lambda f: len(f) > 15 and f[15] > 60,
}


@dataclass
class Ref:
    tags: list[tuple[int, int, int, int]]  # (row, d, svif, dvif)
    dup: int = 0
    unselected: int = 0
    filtered: int = 0


def reference(rows: list[tuple[int, bool, bytes]], sessions: list[Session]) -> Ref:
    """The module docstring's rules and each session's VMs, direction and filter, per frame
    (sample=1)."""
    local = {p.mac: p.vif for p in PORTS}
    port = {p.vif: p for p in PORTS}

    def wants(s: Session, vif: int, way: Direction) -> bool:
        return s.matches(port[vif]) and s.direction in (way, Direction.BOTH)

    out = Ref([])
    for i, (p, sent, data) in enumerate(rows):
        dst, src = int.from_bytes(data[:6], "big"), int.from_bytes(data[6:12], "big")
        group = bool(dst >> 40 & 1)
        dvif = 0 if group else local.get(dst, 0)
        svif = local.get(src, 0)
        if sent:
            tag = (0, p, dvif)
            want = [
                s
                for s in sessions
                if wants(s, p, Direction.TX)
                or (dvif != 0 and wants(s, dvif, Direction.RX))
                or (group and any(wants(s, q, Direction.RX) for q in port if q != p))
            ]
        elif svif == 0:
            tag, want = (1, 0, p), [s for s in sessions if wants(s, p, Direction.RX)]
        else:
            intra = not group and dvif == p
            want = [s for s in sessions if intra and wants(s, p, Direction.BOTH)]
            want = [s for s in want if s.direction is Direction.BOTH]  # the session asks both
            tag = (1, svif, p)
            if not want:
                out.dup += 1
                continue
        if not want:
            out.unselected += 1
        elif any(FILTERS[s.filter](data) for s in want):
            out.tags.append((i, *tag))
        else:
            out.filtered += 1
    return out


MACS = [A, B, C, X, U, BCAST, MCAST]
row_strategy = st.tuples(
    st.sampled_from([5, 9, 12]),
    st.booleans(),
    st.sampled_from(MACS),
    st.sampled_from(MACS[:4]),
    st.integers(8, 120),
)
session_strategy = st.builds(
    Session,
    name=st.just("s"),
    vms=st.lists(
        st.sampled_from(["web-01", "db-01", "app-01", "*-01"]), min_size=1, max_size=2
    ).map(tuple),
    direction=st.sampled_from(list(Direction)),
    filter=st.sampled_from(list(FILTERS)),
    snaplen=st.sampled_from([0, 14, 30]),
    sample=st.sampled_from([1, 1, 2, 3]),
    destination=st.sampled_from([None, Destination("b")]),
)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(row_strategy, max_size=40),
    sessions=st.lists(session_strategy, max_size=4),
)
def test_vectorized_equals_reference_and_loses_nothing(
    rows: list[tuple[int, bool, int, int, int]], sessions: list[Session]
) -> None:
    named = [Session(f"s{i}", **{k: getattr(s, k) for k in FIELDS}) for i, s in enumerate(sessions)]
    mirror = Mirror()
    mirror.set_ports(PORTS)
    if named:
        mirror.set_routes({None: (), **SessionSet(named).routes(PORTS)})
    frames = [
        (p, sent, frame(dst, src, size, fill=i)) for i, (p, sent, dst, src, size) in enumerate(rows)
    ]
    results = mirror.process_routes(port_batch(frames))
    n = len(frames)
    ok = [(p, s, f) for p, s, f in frames if len(f) >= 14]
    ok_rows = [i for i, (_, _, f) in enumerate(frames) if len(f) >= 14]
    exported: set[int] = set()
    for key, result in results.items():
        r = result
        assert r.exported + r.duplicates + r.unselected + r.filtered + r.sampled_out + r.runts == n
        assert r.exported == len(r.frames)
        route = [s for s in named if s.destination == key]
        ref = reference(ok, route if named else EVERYTHING)
        assert (r.duplicates, r.unselected, r.filtered) == (ref.dup, ref.unselected, ref.filtered)
        got = {int(row): t for row, t in zip(r.rows, tags(r), strict=True)}
        want = {ok_rows[i]: (d, s, v) for i, d, s, v in ref.tags}
        assert set(got) <= set(want)  # sampling only removes
        assert len(want) - len(got) == r.sampled_out
        for row, tag in got.items():
            assert tag == want[row]
        if all(s.sample == 1 for s in route):
            assert got == want
        for i, row in enumerate(r.rows.tolist()):
            original, tagged = frames[row][2], r.frames.frame(i)
            assert tagged[:12] == original[:12]
            assert original[12:].startswith(tagged[18:])
            assert int(r.frames.origlen[i]) == len(original) + 6
        exported |= set(got)
    c = mirror.counters
    assert c.frames == n
    assert c.exported == len(exported)
    assert c.exported + sum(c.dropped.values()) == n


FIELDS = ("vms", "direction", "filter", "snaplen", "sample", "destination")
EVERYTHING = [  # what a collector without sessions mirrors: rx and tx of every VM, not both
    Session("rx", vms=("*",), direction=Direction.RX),
    Session("tx", vms=("*",), direction=Direction.TX),
]
