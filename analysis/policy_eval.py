"""Port-profiles on flow records: compiled once into predicates, evaluated over columns.

The convention (``docs/policy.md`` tells it with examples): a rule is written in absolute
terms — its source is the flow's ``src`` side (the initiator), its destination the ``dst``
side. A flow is checked against the profile of each end that has one: the source VM's
profile as its **egress** ACL, the destination VM's as its **ingress** ACL. In each, the
first matching rule decides, else the profile's default. The flow is denied when either
side denies, permitted when a side was checked and none denies, and ``none`` when no side
was (no end has a profile, or the flow is not IP).

Each rule compiles into a total predicate over the columns of ``analysis/records.py``; the
address strings are parsed once per evaluation (once per distinct value) into integer
columns, prefixes become masked integer compares, and nothing raises at evaluation time:
a missing, null or garbled value just matches no test that needs it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.policy import Bindings, PolicySet, bind
from vspan.analysis.policy_acl import (
    AnyAddress,
    PortMatch,
    PortOp,
    Prefix,
    ProfileRef,
    Rule,
    VmRef,
    format_rule,
)
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

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]
SRC, DST = 0, 1
SIDES: Final = ("egress", "ingress")
"""What the profile of the source (index 0) and of the destination (1) act as."""
VERDICTS: Final = ("permit", "deny", "none")
_M64: Final = (1 << 64) - 1
HIT_COLUMNS: Final = ("profile", "index", "rule", "action", "vm", "vm_name", "host")
HIT_COLUMNS_COUNTS: Final = ("flows", "packets", "bytes", "last_ns")
VIOLATION_COLUMNS: Final = (
    "flow_id", "src_vm", "dst_vm", "src_host", "dst_host", "scope", "proto", "src_ip",
    "src_port", "dst_ip", "dst_port", "icmp_type", "icmp_code", "policy_rule", "policy_side",
    "egress_rule", "ingress_rule", "packets", "bytes", "packets_rev", "bytes_rev", "first_ns",
    "last_ns",
)  # fmt: skip


class _VmNames:
    """The distinct VM names of one evaluation; pattern matches computed once per pattern."""

    def __init__(self, names: list[str], bindings: Bindings) -> None:
        self.names = names
        self._bindings = bindings
        self._cache: dict[str, Mask] = {}

    def matching(self, pattern: str) -> Mask:
        """Per name code, whether ``pattern`` names it; one more (False) entry for code -1."""
        if pattern not in self._cache:
            hit = [self._bindings.matches(pattern, name) for name in self.names]
            self._cache[pattern] = np.array([*hit, False], dtype=np.bool_)
        return self._cache[pattern]


@dataclass(frozen=True, slots=True, eq=False)
class _Flows:
    """The columns rules test, one row per flow; in each pair, index 0 is the source side."""

    proto: I64
    """IP protocol, -1 for a non-IP flow."""
    icmp_type: I64
    """ICMP type, echo flows as echo requests; -1 when none."""
    icmp_code: I64
    """ICMP code; -1 when none."""
    port: tuple[I64, I64]
    """Ports, -1 when none."""
    ver: tuple[I64, I64]
    """IP version of the address (4, 6), 0 when none."""
    hi: tuple[U64, U64]
    """High 64 bits of an IPv6 address (0 for IPv4)."""
    lo: tuple[U64, U64]
    """Low 64 bits of the address."""
    vm: tuple[I64, I64]
    """Code of the VM name in ``names``, -1 when the end is no VM."""
    profile: tuple[I64, I64]
    """Index of the end's profile, -1 when none."""
    names: _VmNames
    """The VM names the codes refer to."""

    def take(self, rows: I64) -> _Flows:
        """The flows at ``rows``."""
        changes: dict[str, Any] = {k: getattr(self, k)[rows] for k in _COLUMNS}
        changes |= {k: (getattr(self, k)[0][rows], getattr(self, k)[1][rows]) for k in _PAIRS}
        return replace(self, **changes)


_COLUMNS: Final = ("proto", "icmp_type", "icmp_code")
_PAIRS: Final = ("port", "ver", "hi", "lo", "vm", "profile")
Test = Callable[[_Flows], Mask]

_PORT_TESTS: Final[dict[PortOp, Callable[[I64, PortMatch], Mask]]] = {
    PortOp.EQ: lambda p, m: p == m.port,
    PortOp.NEQ: lambda p, m: (p >= 0) & (p != m.port),
    PortOp.LT: lambda p, m: (p >= 0) & (p < m.port),
    PortOp.GT: lambda p, m: p > m.port,
    PortOp.RANGE: lambda p, m: (p >= m.port) & (p <= (m.high or 0)),
}


def _address_test(addr: AnyAddress | Prefix | VmRef | ProfileRef, side: int,
                  profiles: dict[str, int]) -> Test | None:  # fmt: skip
    match addr:
        case AnyAddress():
            return None
        case Prefix(network=net):
            base, mask, ver = int(net.network_address), int(net.netmask), net.version
            nhi, nlo = np.uint64(base >> 64), np.uint64(base & _M64)
            mhi, mlo = np.uint64(mask >> 64), np.uint64(mask & _M64)
            return lambda f: (
                (f.ver[side] == ver) & ((f.hi[side] & mhi) == nhi) & ((f.lo[side] & mlo) == nlo)
            )
        case VmRef(pattern=pattern):
            return lambda f: f.names.matching(pattern)[f.vm[side]]
        case ProfileRef(name=name):
            index = profiles[name]
            return lambda f: f.profile[side] == index


def _ports_test(side: int, matches: tuple[PortMatch, ...]) -> Test:
    def test(f: _Flows) -> Mask:
        port = f.port[side]
        mask = np.zeros(port.shape, dtype=np.bool_)
        for m in matches:
            mask |= _PORT_TESTS[m.op](port, m)
        return mask

    return test


def _equals_test(column: Callable[[_Flows], I64], value: int) -> Test:
    return lambda f: column(f) == value


def _rule_test(rule: Rule, profiles: dict[str, int]) -> Test:
    """The rule as one total predicate: the AND of a test per field it constrains."""
    proto = rule.protocol
    tests = [_is_ip if proto is None else _equals_test(lambda f: f.proto, proto)]
    for side, addr in ((SRC, rule.source), (DST, rule.destination)):
        if (address := _address_test(addr, side, profiles)) is not None:
            tests.append(address)
    tests += [_ports_test(s, m) for s, m in ((SRC, rule.source_ports), (DST, rule.ports)) if m]
    if rule.icmp_type is not None:
        tests.append(_equals_test(lambda f: f.icmp_type, rule.icmp_type))
    if rule.icmp_code is not None:
        tests.append(_equals_test(lambda f: f.icmp_code, rule.icmp_code))

    def test(flows: _Flows) -> Mask:
        mask = tests[0](flows)
        for more in tests[1:]:
            mask &= more(flows)
        return mask

    return test


def _is_ip(flows: _Flows) -> Mask:
    return flows.proto >= 0


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
        tests=tuple(tuple(_rule_test(r, index) for r in p.rules) for p in policy.profiles),
        catalog=catalog.astype({"index": np.int64}),
        first_code=tuple(first),
        profiles=tuple(index),
    )


def _ints(records: pd.DataFrame, column: str, missing: int = -1) -> I64:
    if column not in records.columns:
        return np.full(len(records), missing, dtype=np.int64)
    values = pd.to_numeric(records[column], errors="coerce")
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy(dtype=np.int64, na_value=missing)
    floats = values.to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(floats) & (floats >= 0) & (floats < 2.0**62)
    return np.where(ok, floats, missing).astype(np.int64)


def _strings(records: pd.DataFrame, column: str) -> pd.Series:
    if column in records.columns:
        return records[column].reset_index(drop=True)
    return pd.Series([None] * len(records), dtype=object)


def _parse_ip(value: object) -> tuple[int, int, int]:
    """(version, high 64 bits, low 64 bits); (0, 0, 0) for anything that is no address."""
    try:
        addr = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None:
        return 0, 0, 0
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.version, int(addr) >> 64, int(addr) & _M64


def _pair(records: pd.DataFrame, column: str) -> tuple[tuple[I64, I64], list[Any]]:
    """Codes of ``src_<column>`` and ``dst_<column>`` into their distinct values (-1: null)."""
    both = [_strings(records, f"{side}_{column}") for side in ("src", "dst")]
    codes, uniques = pd.factorize(pd.concat(both, ignore_index=True))
    n = len(records)
    return (codes[:n].astype(np.int64), codes[n:].astype(np.int64)), uniques.tolist()


def _flows(records: pd.DataFrame, compiled: CompiledPolicy) -> _Flows:
    ips, addresses = _pair(records, "ip")
    parsed = [*(_parse_ip(a) for a in addresses), (0, 0, 0)]  # code -1 takes the last
    ver = np.array([a[0] for a in parsed], dtype=np.int64)
    hi = np.array([a[1] for a in parsed], dtype=np.uint64)
    lo = np.array([a[2] for a in parsed], dtype=np.uint64)
    vms, names = _pair(records, "vm")
    index = {p: i for i, p in enumerate(compiled.profiles)}
    bound = np.array([*(index.get(compiled.bindings.profile_of(v) or "", -1) for v in names), -1])
    proto = _ints(records, "proto")
    icmp_type, icmp_code = _ints(records, "icmp_type"), _ints(records, "icmp_code")
    echo = (icmp_type < 0) & (_ints(records, "icmp_id") >= 0) & np.isin(proto, [1, 58])
    return _Flows(
        proto=proto,
        icmp_type=np.where(echo, np.where(proto == 1, 8, 128), icmp_type),
        icmp_code=np.where(echo, 0, icmp_code),
        port=(_ints(records, "src_port"), _ints(records, "dst_port")),
        ver=(ver[ips[SRC]], ver[ips[DST]]),
        hi=(hi[ips[SRC]], hi[ips[DST]]),
        lo=(lo[ips[SRC]], lo[ips[DST]]),
        vm=vms,
        profile=(bound[vms[SRC]], bound[vms[DST]]),
        names=_VmNames([str(v) for v in names], compiled.bindings),
    )


def _side_codes(flows: _Flows, compiled: CompiledPolicy) -> tuple[I64, I64]:
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


def _hits(records: pd.DataFrame, flows: _Flows, codes: tuple[I64, I64],
          compiled: CompiledPolicy) -> pd.DataFrame:  # fmt: skip
    keys = [compiled.bindings.key_of(v) for v in flows.names.names]
    key_codes = pd.factorize(pd.Series(keys, dtype=object))[0]
    hosts, host_names = _pair(records, "host")
    packets = _ints(records, "packets", 0) + _ints(records, "packets_rev", 0)
    octets = _ints(records, "bytes", 0) + _ints(records, "bytes_rev", 0)
    last_ns = _ints(records, "last_ns", 0)
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
    flows = _flows(records, compiled)
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
