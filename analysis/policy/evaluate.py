"""Port-profiles on flow records: compiled once into predicates, evaluated over columns.

The convention (``docs/policy.md`` tells it with examples): a rule is written in absolute
terms — its source is the flow's ``src`` side (the initiator), its destination the ``dst``
side. A flow is checked against the profile of each end that has one: the source VM's
profile as its **egress** ACL, the destination VM's as its **ingress** ACL. In each, the
first matching rule decides, else the profile's default. The flow is denied when either
side denies, permitted when a side was checked and none denies, and ``none`` when no side
was (no end has a profile, or the flow is not IP).

Rules compile into total predicates over the columns of ``analysis/records/build.py`` (see
``policy/_match.py``: parsed once per evaluation, nothing raises at evaluation time); this
module keeps, per profile, the first rule that matches each flow, and turns the decisions into
verdicts, hit counters and violations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.policy._match import (
    DST,
    I64,
    SRC,
    Flows,
    Test,
    flow_columns,
    ints,
    pair,
    rule_test,
)
from vspan.analysis.policy.acl import format_rule
from vspan.analysis.policy.profiles import Bindings, PolicySet, bind
from vspan.inventory import InventoryView

__all__ = [
    "HIT_COLUMNS",
    "VIOLATION_COLUMNS",
    "CompiledPolicy",
    "PolicyCounters",
    "PolicyResult",
    "compile_policy",
    "evaluate",
    "never_hit",
]

SIDES: Final = ("egress", "ingress")
"""What the profile of the source (index 0) and of the destination (1) act as."""
VERDICTS: Final = ("permit", "deny", "none")
HIT_COLUMNS: Final = ("profile", "index", "rule", "action", "vm", "vm_name", "host")
HIT_COLUMNS_COUNTS: Final = ("flows", "packets", "bytes", "last_ns")
VIOLATION_COLUMNS: Final = (
    "flow_id", "src_vm", "dst_vm", "src_host", "dst_host", "scope", "proto", "src_ip",
    "src_port", "dst_ip", "dst_port", "icmp_type", "icmp_code", "policy_rule", "policy_side",
    "egress_rule", "ingress_rule", "packets", "bytes", "packets_rev", "bytes_rev", "first_ns",
    "last_ns",
)  # fmt: skip


@dataclass(frozen=True, slots=True, eq=False)
class CompiledPolicy:
    """Profiles compiled into predicates, with the catalog of what a flow can hit."""

    bindings: Bindings
    """VM → profile, VM → identity, and the warnings of binding."""
    tests: tuple[tuple[Test, ...], ...]
    """Per profile, a predicate per rule."""
    catalog: pd.DataFrame
    """One row per hit code: each profile's rules then its default. Columns ``profile``,
    ``index`` (1-based; 0 = the default), ``rule`` (``db#2``, ``db#default``), ``action``,
    ``name``, ``text``."""
    first_code: tuple[int, ...]
    """Per profile, the code of its first rule (its default is ``first + len(rules)``)."""
    profiles: tuple[str, ...]
    """Profile names, in file order (a profile's index is its place here)."""

    @property
    def warnings(self) -> tuple[str, ...]:
        """What binding found suspicious (see ``policy.bind``)."""
        return self.bindings.warnings


def compile_policy(policy: PolicySet, inventory: InventoryView | None = None) -> CompiledPolicy:
    """Compile every rule once; bind the inventory's VMs."""
    index = {p.name: i for i, p in enumerate(policy.profiles)}
    rows: list[tuple[str, int, str, str, str | None, str]] = []
    first: list[int] = []
    for p in policy.profiles:
        first.append(len(rows))
        for i, rule in enumerate(p.rules, 1):
            rows.append(
                (p.name, i, f"{p.name}#{i}", rule.action.value, rule.name, format_rule(rule))
            )
        rows.append((p.name, 0, f"{p.name}#default", p.default.value, None, f"default {p.default}"))
    catalog = pd.DataFrame(rows, columns=["profile", "index", "rule", "action", "name", "text"])
    return CompiledPolicy(
        bindings=bind(policy, inventory),
        tests=tuple(tuple(rule_test(r, index) for r in p.rules) for p in policy.profiles),
        catalog=catalog.astype({"index": np.int64}),
        first_code=tuple(first),
        profiles=tuple(index),
    )


def _side_codes(flows: Flows, compiled: CompiledPolicy) -> tuple[I64, I64]:
    """Per side, the catalog code of the rule (or default) that decided; -1 where none."""
    n = flows.proto.size
    codes = (np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64))
    is_ip = flows.proto >= 0
    for p, tests in enumerate(compiled.tests):
        rows = np.flatnonzero(is_ip & ((flows.profile[SRC] == p) | (flows.profile[DST] == p)))
        if rows.size == 0:
            continue
        sub = flows.take(rows)
        open_ = [sub.profile[SRC] == p, sub.profile[DST] == p]
        for code, test in enumerate(tests, compiled.first_code[p]):
            if not (open_[SRC].any() or open_[DST].any()):
                break
            hit = test(sub)
            for side in (SRC, DST):
                codes[side][rows[open_[side] & hit]] = code
                open_[side] &= ~hit
        default = compiled.first_code[p] + len(tests)
        for side in (SRC, DST):
            codes[side][rows[open_[side]]] = default
    return codes


@dataclass(frozen=True, slots=True, eq=False)
class PolicyResult:
    """The outcome of evaluating one batch of flow records."""

    flows: pd.DataFrame
    """The records plus ``policy_verdict`` (permit/deny/none), ``policy_rule`` (``db#2``),
    ``policy_side`` (egress/ingress: whose profile decided), ``egress_rule``, ``ingress_rule``."""
    hits: pd.DataFrame
    """Per (profile, rule, VM): ``HIT_COLUMNS`` + ``flows, packets, bytes`` (both
    directions) and ``last_ns``; ``vm`` is the VM's UUID when known, else its name."""
    violations: pd.DataFrame
    """The denied flows that were observed anyway: ``VIOLATION_COLUMNS`` present in the
    records."""


def _hits(records: pd.DataFrame, flows: Flows, codes: tuple[I64, I64],
          compiled: CompiledPolicy) -> pd.DataFrame:  # fmt: skip
    keys = [compiled.bindings.key_of(v) for v in flows.names.names]
    key_codes = pd.factorize(pd.Series(keys, dtype=object))[0]
    hosts, host_names = pair(records, "host")
    packets = ints(records, "packets", 0) + ints(records, "packets_rev", 0)
    octets = ints(records, "bytes", 0) + ints(records, "bytes_rev", 0)
    last_ns = ints(records, "last_ns", 0)
    rows = [np.flatnonzero(c >= 0) for c in codes]

    def both(src: npt.NDArray[Any], dst: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.concatenate([src[rows[SRC]], dst[rows[DST]]])

    long = pd.DataFrame(
        {
            "code": both(*codes),
            "key": key_codes[both(*flows.vm)],
            "vm": both(*flows.vm),
            "host": both(*hosts),
            "packets": both(packets, packets),
            "bytes": both(octets, octets),
            "last_ns": both(last_ns, last_ns),
        }
    )
    g = long.groupby(["code", "key"], sort=True).agg(
        flows=("vm", "size"),
        packets=("packets", "sum"),
        bytes=("bytes", "sum"),
        last_ns=("last_ns", "max"),
        latest=("last_ns", "idxmax"),
    )
    latest = long.loc[g["latest"].to_numpy(dtype=np.int64)]
    code = g.index.get_level_values("code").to_numpy()
    out = compiled.catalog.iloc[code][["profile", "index", "rule", "action"]].reset_index(drop=True)
    out["vm"] = np.asarray(keys, dtype=object)[latest["vm"].to_numpy()]
    out["vm_name"] = np.asarray(flows.names.names, dtype=object)[latest["vm"].to_numpy()]
    host_table = np.array([*host_names, None], dtype=object)  # code -1 takes the last
    out["host"] = host_table[latest["host"].to_numpy()]
    for column in HIT_COLUMNS_COUNTS:
        out[column] = g[column].to_numpy(dtype=np.int64)
    return out


def _labelled(codes: npt.NDArray[np.integer[Any]], labels: Sequence[str]) -> pd.Categorical[str]:
    """The label of each code (-1: null), without a Python string per flow."""
    return pd.Categorical.from_codes(codes.astype(np.int64), pd.Index(labels))


def evaluate(records: pd.DataFrame, compiled: CompiledPolicy) -> PolicyResult:
    """Verdicts, hit counters and violations of a batch of flow records (``RECORD_COLUMNS``;
    missing columns count as null)."""
    flows = flow_columns(records, compiled.profiles, compiled.bindings)
    codes = _side_codes(flows, compiled)
    deny_of = np.array([*(compiled.catalog["action"] == "deny"), False])
    labels = compiled.catalog["rule"].tolist()
    deny = [deny_of[c] for c in codes]
    seen = [c >= 0 for c in codes]
    side = np.select([deny[SRC], deny[DST], seen[SRC], seen[DST]], [SRC, DST, SRC, DST], -1)
    verdict = np.select([deny[SRC] | deny[DST], seen[SRC] | seen[DST]], [1, 0], 2)
    decided = np.where(side == SRC, codes[SRC], np.where(side == DST, codes[DST], -1))
    annotations = {
        "policy_verdict": _labelled(verdict, VERDICTS),
        "policy_rule": _labelled(decided, labels),
        "policy_side": _labelled(side, SIDES),
        "egress_rule": _labelled(codes[SRC], labels),
        "ingress_rule": _labelled(codes[DST], labels),
    }
    out = records.assign(**annotations)
    denied = out.loc[verdict == 1, [c for c in VIOLATION_COLUMNS if c in out.columns]]
    return PolicyResult(
        flows=out,
        hits=_hits(records, flows, codes, compiled),
        violations=denied.reset_index(drop=True),
    )


def never_hit(compiled: CompiledPolicy, hits: pd.DataFrame) -> pd.DataFrame:
    """The rules (not defaults) of each profile without a row in ``hits`` (an evaluation's, or
    a ``PolicyCounters.snapshot()``): catalog columns, in file order."""
    rules = compiled.catalog[compiled.catalog["index"] > 0]
    hit = pd.MultiIndex.from_frame(hits[["profile", "index"]].astype({"index": np.int64}))
    keep = ~pd.MultiIndex.from_frame(rules[["profile", "index"]]).isin(hit)
    return rules[keep].reset_index(drop=True)


class PolicyCounters:
    """Hit counters over many evaluations, keyed by (profile, rule index, VM identity).

    The VM identity is its UUID when the inventory knows it, so a VM's counters continue when
    it migrates to another host; ``host`` and ``vm_name`` show the latest seen. Each batch
    must hold flows not counted before (finished flows, as the flow table emits them).
    """

    def __init__(self) -> None:
        self._table: pd.DataFrame | None = None

    def add(self, hits: pd.DataFrame) -> None:
        """Merge the hits of one evaluation (``PolicyResult.hits``)."""
        if hits.empty:
            return
        both = hits if self._table is None else pd.concat([self._table, hits], ignore_index=True)
        both = both.sort_values("last_ns", kind="stable")
        self._table = both.groupby(["profile", "index", "vm"], sort=True, as_index=False).agg(
            rule=("rule", "last"),
            action=("action", "last"),
            vm_name=("vm_name", "last"),
            host=("host", "last"),
            flows=("flows", "sum"),
            packets=("packets", "sum"),
            bytes=("bytes", "sum"),
            last_ns=("last_ns", "max"),
        )[[*HIT_COLUMNS, *HIT_COLUMNS_COUNTS]]

    def snapshot(self) -> pd.DataFrame:
        """The counters so far (a copy), with the columns of ``PolicyResult.hits``."""
        if self._table is None:
            columns = [*HIT_COLUMNS, *HIT_COLUMNS_COUNTS]
            return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        return self._table.copy()
