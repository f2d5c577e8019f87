"""What-if: moving one VM changes host pairs and uplinks exactly as computed by hand from the
VM-pair matrix; touched VM pairs are classified; rules that see peers from new hosts."""

from __future__ import annotations

import pandas as pd
import pytest

from vspan.analysis.policy.evaluate import compile_policy
from vspan.analysis.policy.profiles import loads_policy
from vspan.analysis.predict.whatif import (
    Move,
    apply_moves,
    mean_matrix,
    parse_move,
    rules_with_new_peers,
    what_if,
)
from vspan.analysis.records.matrix import EXTERNAL
from vspan.inventory import Host, Inventory, Nic, Vm

PLACEMENT = {"a": "hv1", "b": "hv1", "c": "hv2", "d": "hv3"}
PAIRS = pd.DataFrame(
    [
        ("a", "b", 100.0, 1.0), ("b", "a", 10.0, 1.0),  # intra hv1
        ("a", "c", 200.0, 2.0), ("c", "a", 20.0, 1.0),  # hv1 <-> hv2
        ("b", "d", 50.0, 1.0),  # hv1 -> hv3
        ("c", EXTERNAL, 30.0, 1.0),  # hv2 -> outside
    ],
    columns=["src", "dst", "bytes", "packets"],
)  # fmt: skip


def test_moving_one_vm_host_pair_deltas_by_hand() -> None:
    result = what_if(PAIRS, PLACEMENT, [Move("a", "hv2")])
    got = {(s, d): v for s, d, v in result.host_pairs[["src", "dst", "bytes_delta"]].values}
    assert got == pytest.approx(
        {
            ("hv1", "hv1"): -110.0,  # a-b leaves hv1's inside...
            ("hv2", "hv1"): +100.0 - 20.0,  # ...a->b now on the wire, c->a no longer
            ("hv1", "hv2"): +10.0 - 200.0,  # b->a on the wire, a->c no longer
            ("hv2", "hv2"): +220.0,  # a-c inside hv2
            ("hv1", "hv3"): 0.0,
            ("hv2", EXTERNAL): 0.0,
        }
    )
    before = result.host_pairs.set_index(["src", "dst"])
    assert before.loc[("hv1", "hv2"), "bytes_before"] == 200.0
    assert before.loc[("hv1", "hv2"), "class"] == "cross-host"


def test_moving_one_vm_uplinks_by_hand() -> None:
    up = what_if(PAIRS, PLACEMENT, [Move("a", "hv2")]).uplinks.set_index("host")
    assert up.loc["hv1", ["out_before", "out_after", "in_before", "in_after"]].tolist() == [
        250.0, 60.0, 20.0, 100.0,
    ]  # fmt: skip
    assert up.loc["hv2", ["out_before", "out_after", "in_before", "in_after"]].tolist() == [
        50.0, 130.0, 200.0, 10.0,
    ]  # fmt: skip
    assert up.loc["hv3", ["in_delta", "out_delta"]].tolist() == [0.0, 0.0]


def test_touched_vm_pairs_are_classified() -> None:
    vm_pairs = what_if(PAIRS, PLACEMENT, [Move("a", "hv2")]).vm_pairs
    change = dict(zip(zip(vm_pairs["src"], vm_pairs["dst"], strict=True), vm_pairs["change"],
                      strict=True))  # fmt: skip
    assert change == {
        ("a", "b"): "to-wire",
        ("b", "a"): "to-wire",
        ("a", "c"): "to-intra-host",
        ("c", "a"): "to-intra-host",
    }
    rerouted = what_if(PAIRS, PLACEMENT, [Move("d", "hv2")]).vm_pairs
    assert rerouted["change"].tolist() == ["rerouted"]


def test_a_move_to_the_same_host_changes_nothing() -> None:
    result = what_if(PAIRS, PLACEMENT, [Move("a", "hv1")])
    assert (result.host_pairs["bytes_delta"] == 0).all()
    assert set(result.vm_pairs["change"]) == {"unchanged"}


def test_moves_and_their_errors() -> None:
    assert apply_moves(PLACEMENT, [Move("a", "hv3"), Move("a", "hv2")])["a"] == "hv2"
    assert parse_move("web-01=hv02") == Move("web-01", "hv02")
    with pytest.raises(ValueError, match="expected VM=HOST"):
        parse_move("web-01")
    with pytest.raises(ValueError, match="VM 'zz' has no known host"):
        apply_moves(PLACEMENT, [Move("zz", "hv1")])


def test_mean_matrix_counts_silent_bins_as_zero() -> None:
    binned = pd.DataFrame(
        {"bin_ns": [0, 0, 2, 3], "src": ["a", "b", "a", "a"], "dst": ["b", "a", "b", "b"],
         "bytes": [10.0, 4.0, 20.0, 30.0], "packets": [1.0, 1.0, 1.0, 1.0]}
    )  # fmt: skip
    mean = mean_matrix(binned).set_index(["src", "dst"])["bytes"]
    assert mean[("a", "b")] == pytest.approx(60.0 / 4)
    assert mean[("b", "a")] == pytest.approx(1.0)
    assert mean_matrix(binned, last_bins=2).set_index(["src", "dst"])["bytes"].tolist() == [25.0]
    # the window is time: the last 3 bins are 1, 2, 3 (bin 1 silent), not the last 3 seen
    assert mean_matrix(binned, last_bins=3, bin_s=1e-9)["bytes"].tolist() == [50.0 / 3]


PROFILES = """\
profiles:
  - name: web
    default: permit
    rules:
      - permit tcp any any eq 443
  - name: db
    default: deny
    rules:
      - permit tcp profile:web any eq 5432
"""


def test_rules_that_see_peers_from_a_new_host() -> None:
    inventory = Inventory(
        [Host("hv1", 1), Host("hv2", 2)],
        [
            Vm("w", "u-w", "hv1", (Nic(0x525400000001, 1, ("10.0.0.1",)),), "web"),
            Vm("d", "u-d", "hv2", (Nic(0x525400000002, 1, ("10.0.0.2",)),), "db"),
        ],
    )
    flows = pd.DataFrame(
        {
            "src_vm": ["w"], "dst_vm": ["d"], "src_host": ["hv1"], "dst_host": ["hv2"],
            "proto": pd.array([6], dtype="Int64"), "src_ip": ["10.0.0.1"],
            "dst_ip": ["10.0.0.2"], "src_port": pd.array([40000], dtype="Int64"),
            "dst_port": pd.array([5432], dtype="Int64"), "packets": [3], "bytes": [300],
            "packets_rev": [2], "bytes_rev": [200], "first_ns": [0], "last_ns": [10],
        }
    )  # fmt: skip
    compiled = compile_policy(loads_policy(PROFILES, "p.yaml"), inventory)
    placement = {"w": "hv1", "d": "hv2"}
    rules = rules_with_new_peers(flows, compiled, placement, [Move("w", "hv2")])
    assert rules[["rule", "side", "vm", "peer", "hosts_before", "hosts_after"]].values.tolist() == [
        ["db#1", "ingress", "d", "w", "hv1->hv2", "hv2->hv2"],
        ["web#default", "egress", "w", "d", "hv1->hv2", "hv2->hv2"],
    ]
    assert rules["bytes"].tolist() == [500.0, 500.0]
    assert rules_with_new_peers(flows, compiled, placement, [Move("w", "hv1")]).empty
