"""What-if: the traffic change a planned migration (VM → host moves) causes.

Pure functions over a VM-pair traffic matrix (``analysis/records/matrix.py``: ``src``, ``dst`` and
counters, typically the recent mean per bin from ``mean_matrix`` or a forecast) and a
placement (VM → host). VM-pair traffic follows its VMs: after the moves each pair's
counters are counted against its ends' new hosts, so the predicted change of every
directed host pair and every host uplink is the difference of two relabellings.

Port-profiles follow their VMs too, so no rule changes; what changes is where a rule's
traffic comes from. ``rules_with_new_peers`` evaluates the flows of the VM pairs a move
touches with the VMs' profiles and reports each rule (egress at the source VM, ingress at
the destination VM) whose (source host, destination host) context changes: rules that will
see the same peers arrive from, or leave towards, a different host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd

from vspan.analysis.policy.evaluate import CompiledPolicy, evaluate
from vspan.analysis.records.matrix import (
    EXTERNAL,
    endpoint_labels,
    host_pairs_of,
    pair_class,
    uplink_load,
)

__all__ = [
    "Move",
    "WhatIf",
    "apply_moves",
    "mean_matrix",
    "parse_move",
    "rules_with_new_peers",
    "what_if",
]

_VALUES: Final = ("bytes", "packets")
RULE_COLUMNS: Final = (
    "rule", "side", "vm", "peer", "hosts_before", "hosts_after", "flows", "bytes",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Move:
    """Run ``vm`` on ``host``."""

    vm: str
    host: str


def parse_move(text: str) -> Move:
    """``VM=HOST`` → ``Move``."""
    vm, sep, host = text.partition("=")
    if not sep or not vm or not host:
        raise ValueError(f"move {text!r}: expected VM=HOST")
    return Move(vm, host)


def apply_moves(placement: Mapping[str, str], moves: Iterable[Move]) -> dict[str, str]:
    """The placement after ``moves`` (applied in order); every moved VM must be placed."""
    after = dict(placement)
    for move in moves:
        if move.vm not in after:
            raise ValueError(f"move {move.vm}={move.host}: VM {move.vm!r} has no known host")
        after[move.vm] = move.host
    return after


def mean_matrix(
    matrix: pd.DataFrame, *, last_bins: int | None = None, bin_s: float | None = None
) -> pd.DataFrame:
    """Mean counters per bin of a binned matrix over the last ``last_bins`` bins of time up
    to its last bin (all its span when None); bins where a pair is silent count as 0.
    ``bin_s`` is the bin width (default: the largest step dividing every gap)."""
    bins = np.sort(matrix["bin_ns"].unique()).astype(np.int64)
    if len(bins) == 0:
        return pd.DataFrame({c: [] for c in ("src", "dst", *_VALUES)})
    if bin_s:
        step = int(bin_s * 1e9)
    else:
        step = int(np.gcd.reduce(np.diff(bins))) if len(bins) > 1 else 1
    span = int((bins[-1] - bins[0]) // step) + 1
    if last_bins is not None:
        span = min(span, last_bins)
    recent = matrix[matrix["bin_ns"] > bins[-1] - span * step]
    values = [c for c in recent.columns if c not in ("bin_ns", "src", "dst")]
    out: pd.DataFrame = recent.groupby(["src", "dst"], sort=True, as_index=False)[values].sum()
    out[values] = out[values].astype(np.float64) / span
    return out


@dataclass(frozen=True, slots=True)
class WhatIf:
    """The predicted effect of a set of moves."""

    host_pairs: pd.DataFrame
    """Every directed host pair with traffic before or after: ``src``, ``dst``, ``class``
    (after), and ``bytes_before``, ``bytes_after``, ``bytes_delta`` (same for packets)."""
    uplinks: pd.DataFrame
    """Every host: ``host``, ``out_before``, ``out_after``, ``out_delta``, ``in_before``,
    ``in_after``, ``in_delta`` (bytes)."""
    vm_pairs: pd.DataFrame
    """The VM pairs with a moved end: ``src``, ``dst``, ``bytes``, ``packets``, hosts and
    classes before/after, and ``change``: ``to-intra-host`` (leaves the wire),
    ``to-wire`` (was intra-host), ``rerouted`` (other hosts, still on the wire),
    ``unchanged``."""


def _delta(before: pd.DataFrame, after: pd.DataFrame, keys: list[str],
           values: list[str], names: tuple[str, str]) -> pd.DataFrame:  # fmt: skip
    merged = before.merge(after, on=keys, how="outer", suffixes=names).fillna(
        dict.fromkeys([v + s for v in values for s in names], 0.0)
    )
    for v in values:
        merged[v + "_delta"] = merged[v + names[1]] - merged[v + names[0]]
    return merged.sort_values(keys, kind="stable").reset_index(drop=True)


def what_if(vm_pairs: pd.DataFrame, placement: Mapping[str, str], moves: Iterable[Move]) -> WhatIf:
    """The change every host pair, every uplink and every touched VM pair sees when
    ``moves`` are applied to ``placement``."""
    moves = list(moves)
    after = apply_moves(placement, moves)
    values = list(_VALUES)
    pairs = vm_pairs.reindex(columns=["src", "dst", *values], fill_value=0.0)
    hp_before = host_pairs_of(pairs, placement)
    hp_after = host_pairs_of(pairs, after)
    host_pairs = _delta(hp_before, hp_after, ["src", "dst"], values, ("_before", "_after"))
    host_pairs.insert(2, "class", pair_class(host_pairs["src"], host_pairs["dst"]))
    names = {"bytes_out": "out", "bytes_in": "in"}
    up = [
        uplink_load(h).rename(columns=names)[["host", "out", "in"]] for h in (hp_before, hp_after)
    ]
    uplinks = _delta(up[0], up[1], ["host"], ["out", "in"], ("_before", "_after"))
    moved = {m.vm for m in moves}
    touched = pairs[pairs["src"].isin(moved) | pairs["dst"].isin(moved)].reset_index(drop=True)
    table_b, table_a = {**placement, EXTERNAL: EXTERNAL}, {**after, EXTERNAL: EXTERNAL}
    detail = touched.assign(
        src_host_before=touched["src"].map(table_b).fillna(EXTERNAL),
        dst_host_before=touched["dst"].map(table_b).fillna(EXTERNAL),
        src_host_after=touched["src"].map(table_a).fillna(EXTERNAL),
        dst_host_after=touched["dst"].map(table_a).fillna(EXTERNAL),
    )
    was = pair_class(detail["src_host_before"], detail["dst_host_before"])
    now = pair_class(detail["src_host_after"], detail["dst_host_after"])
    same_hosts = (detail["src_host_before"] == detail["src_host_after"]) & (
        detail["dst_host_before"] == detail["dst_host_after"]
    )
    change = np.select(
        [same_hosts.to_numpy(), now == "intra-host", was == "intra-host"],
        ["unchanged", "to-intra-host", "to-wire"],
        "rerouted",
    )
    detail = detail.assign(class_before=was, class_after=now, change=change)
    return WhatIf(host_pairs, uplinks, detail)


def rules_with_new_peers(
    flows: pd.DataFrame,
    compiled: CompiledPolicy,
    placement: Mapping[str, str],
    moves: Iterable[Move],
) -> pd.DataFrame:
    """Port-profile rules whose traffic changes host context after ``moves``: one row per
    (rule, side, VM holding it, peer, hosts before, hosts after) with ``flows`` and
    ``bytes`` (both directions) of the evaluated flow records (``RULE_COLUMNS``)."""
    moves = list(moves)
    after = apply_moves(placement, moves)
    src = endpoint_labels(flows["src_vm"], flows["src_host"])
    dst = endpoint_labels(flows["dst_vm"], flows["dst_host"])
    moved = np.isin(src, [m.vm for m in moves]) | np.isin(dst, [m.vm for m in moves])
    records = flows.loc[moved].reset_index(drop=True)
    if records.empty:
        return pd.DataFrame({c: [] for c in RULE_COLUMNS})
    src, dst = src[moved], dst[moved]
    result = evaluate(records, compiled).flows

    def hosts(table: Mapping[str, str]) -> pd.Series:
        full = {**table, EXTERNAL: EXTERNAL}
        s = pd.Series(src).map(full).fillna(EXTERNAL)
        d = pd.Series(dst).map(full).fillna(EXTERNAL)
        return s + "->" + d

    before, later = hosts(placement), hosts(after)
    octets = records["bytes"].to_numpy(np.float64) + records["bytes_rev"].to_numpy(np.float64)
    sides = []
    for side, column, owner, peer in (("egress", "egress_rule", src, dst),
                                      ("ingress", "ingress_rule", dst, src)):  # fmt: skip
        sides.append(
            pd.DataFrame(
                {
                    "rule": result[column].astype(object).to_numpy(),
                    "side": side,
                    "vm": owner,
                    "peer": peer,
                    "hosts_before": before.to_numpy(),
                    "hosts_after": later.to_numpy(),
                    "bytes": octets,
                }
            )
        )
    long = pd.concat(sides, ignore_index=True)
    long = long[long["rule"].notna() & (long["hosts_before"] != long["hosts_after"])]
    keys = ["rule", "side", "vm", "peer", "hosts_before", "hosts_after"]
    out = long.groupby(keys, sort=True, as_index=False).agg(
        flows=("bytes", "size"), bytes=("bytes", "sum")
    )
    return out[list(RULE_COLUMNS)]
