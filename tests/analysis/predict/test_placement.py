"""Placement advice: every move saves what it says, and no constraint is ever broken —
checked by replaying the moves on random small instances (Hypothesis)."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.predict.placement import Constraints, advise, cross_host_bytes
from vspan.analysis.records.matrix import EXTERNAL


def _pairs(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["src", "dst", "bytes"])


def test_chatty_pair_is_brought_together() -> None:
    pairs = _pairs([("a", "b", 100.0), ("b", "a", 50.0), ("a", "c", 10.0), ("c", EXTERNAL, 99.0)])
    placement = {"a": "hv1", "b": "hv2", "c": "hv1"}
    moves = advise(pairs, placement)
    assert moves[["vm", "from_host", "to_host", "saving"]].values.tolist() == [
        ["b", "hv2", "hv1", 150.0]
    ]
    assert moves["cross_before"].tolist() == [150.0]
    assert moves["cross_after"].tolist() == [0.0]


def test_pins_capacity_and_anti_affinity_block_moves() -> None:
    pairs = _pairs([("a", "b", 100.0)])
    placement = {"a": "hv1", "b": "hv2"}
    assert advise(pairs, placement, Constraints(pinned=frozenset({"a", "b"}))).empty
    assert advise(pairs, placement, Constraints(max_vms_per_host=1)).empty
    apart = Constraints(anti_affinity=(frozenset({"a", "b"}),))
    assert advise(pairs, placement, apart).empty
    only_b = advise(pairs, placement, Constraints(pinned=frozenset({"b"})))
    assert only_b[["vm", "to_host"]].values.tolist() == [["a", "hv2"]]
    cpu = Constraints(vm_cpu={"a": 4, "b": 4}, host_cpu={"hv1": 6, "hv2": 8})
    assert advise(pairs, placement, cpu)[["vm", "to_host"]].values.tolist() == [["a", "hv2"]]


def test_deterministic_tie_break() -> None:
    pairs = _pairs([("a", "b", 10.0)])
    placement = {"b": "hv2", "a": "hv1"}
    first = advise(pairs, placement)
    assert first[["vm", "to_host"]].values.tolist() == [["a", "hv2"]]
    assert advise(pairs, dict(reversed(placement.items()))).equals(first)


VMS = [f"vm{i}" for i in range(7)]
HOSTS = ["h1", "h2", "h3", "h4"]


@st.composite
def instances(draw: st.DrawFn) -> tuple[pd.DataFrame, dict[str, str], Constraints]:
    n = draw(st.integers(2, len(VMS)))
    vms = VMS[:n]
    placement = {v: draw(st.sampled_from(HOSTS)) for v in vms}
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from([*vms, EXTERNAL]), st.sampled_from(vms),
                      st.integers(1, 1000).map(float)),
            max_size=15,
        )
    )  # fmt: skip
    pinned = frozenset(draw(st.lists(st.sampled_from(vms), max_size=2)))
    groups = tuple(
        frozenset(g) for g in draw(st.lists(st.lists(st.sampled_from(vms), min_size=2,
                                                     max_size=3), max_size=2))
    )  # fmt: skip
    cap = draw(st.none() | st.integers(1, n))
    cpu = {v: float(draw(st.integers(1, 4))) for v in vms}
    host_cpu = {h: float(draw(st.integers(2, 12))) for h in HOSTS}
    use_cpu = draw(st.booleans())
    constraints = Constraints(
        max_vms_per_host=cap, pinned=pinned, anti_affinity=groups,
        vm_cpu=cpu if use_cpu else {}, host_cpu=host_cpu if use_cpu else {},
    )  # fmt: skip
    return _pairs(pairs), placement, constraints


def _broken(placement: dict[str, str], c: Constraints, host: str) -> list[str]:
    """The constraints the VMs on ``host`` break."""
    on = [v for v, h in placement.items() if h == host]
    broken = []
    if c.max_vms_per_host is not None and len(on) > c.max_vms_per_host:
        broken.append("count")
    if c.host_cpu and sum(c.vm_cpu[v] for v in on) > c.host_cpu[host]:
        broken.append("cpu")
    for group in c.anti_affinity:
        if any(a in group and b in group for a, b in itertools.combinations(on, 2)):
            broken.append("anti-affinity")
    return broken


@settings(max_examples=150, deadline=None)
@given(instances())
def test_moves_save_and_never_break_constraints(
    instance: tuple[pd.DataFrame, dict[str, str], Constraints],
) -> None:
    pairs, placement, c = instance
    moves = advise(pairs, placement, c, hosts=HOSTS, max_moves=20)
    current = dict(placement)
    for move in moves.itertuples():
        assert move.vm not in c.pinned
        assert current[move.vm] == move.from_host != move.to_host
        before = cross_host_bytes(pairs, current)
        current[move.vm] = move.to_host
        after = cross_host_bytes(pairs, current)
        assert move.saving > 0
        assert before - after == pytest.approx(move.saving)
        assert move.cross_before == pytest.approx(before)
        assert move.cross_after == pytest.approx(after)
        # the target host is within its capacity after the move, whatever it was before
        assert not {"count", "cpu"} & set(_broken(current, c, move.to_host))
        # a VM never joins a host where a member of its anti-affinity group runs
        others = {v for v, h in current.items() if h == move.to_host and v != move.vm}
        assert not any(move.vm in g and others & g for g in c.anti_affinity)
    assert cross_host_bytes(pairs, current) <= cross_host_bytes(pairs, placement)
