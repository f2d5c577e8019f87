"""The vectorized matching of port-profiles (private; see ``policy/evaluate.py``).

Flow records become integer columns, and ACL rules total predicates over them.
``flow_columns`` reads the columns rules test from a batch of records
(``records/build.py``): the address strings are parsed once per evaluation (once per
distinct value) into integer columns, VM names become codes, each end gets the index of its
profile. ``rule_test`` compiles a rule into one predicate over those columns: prefixes
become masked integer compares, ``vm:`` patterns a lookup per distinct name. Nothing raises
at evaluation time: a missing, null or garbled value just matches no test that needs it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.policy.profiles import Bindings
from vspan.analysis.policy.rule import (
    AnyAddress,
    PortMatch,
    PortOp,
    Prefix,
    ProfileRef,
    Rule,
    VmRef,
)

__all__ = [
    "DST",
    "I64",
    "SRC",
    "Flows",
    "Test",
    "flow_columns",
    "ints",
    "pair",
    "rule_test",
]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]
SRC, DST = 0, 1
_M64: Final = (1 << 64) - 1


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
class Flows:
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

    def take(self, rows: I64) -> Flows:
        """The flows at ``rows``."""
        changes: dict[str, Any] = {k: getattr(self, k)[rows] for k in _COLUMNS}
        changes |= {k: (getattr(self, k)[0][rows], getattr(self, k)[1][rows]) for k in _PAIRS}
        return replace(self, **changes)


_COLUMNS: Final = ("proto", "icmp_type", "icmp_code")
_PAIRS: Final = ("port", "ver", "hi", "lo", "vm", "profile")
Test = Callable[[Flows], Mask]

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
    def test(f: Flows) -> Mask:
        port = f.port[side]
        mask = np.zeros(port.shape, dtype=np.bool_)
        for m in matches:
            mask |= _PORT_TESTS[m.op](port, m)
        return mask

    return test


def _equals_test(column: Callable[[Flows], I64], value: int) -> Test:
    return lambda f: column(f) == value


def rule_test(rule: Rule, profiles: dict[str, int]) -> Test:
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

    def test(flows: Flows) -> Mask:
        mask = tests[0](flows)
        for more in tests[1:]:
            mask &= more(flows)
        return mask

    return test


def _is_ip(flows: Flows) -> Mask:
    return flows.proto >= 0


def ints(records: pd.DataFrame, column: str, missing: int = -1) -> I64:
    """``column`` as integers; ``missing`` where it is absent, null or no count."""
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


def pair(records: pd.DataFrame, column: str) -> tuple[tuple[I64, I64], list[Any]]:
    """Codes of ``src_<column>`` and ``dst_<column>`` into their distinct values (-1: null)."""
    both = [_strings(records, f"{side}_{column}") for side in ("src", "dst")]
    codes, uniques = pd.factorize(pd.concat(both, ignore_index=True))
    n = len(records)
    return (codes[:n].astype(np.int64), codes[n:].astype(np.int64)), uniques.tolist()


def flow_columns(records: pd.DataFrame, profiles: Sequence[str], bindings: Bindings) -> Flows:
    """The columns of ``records`` that rules test; ``profiles`` gives each profile's index."""
    ips, addresses = pair(records, "ip")
    parsed = [*(_parse_ip(a) for a in addresses), (0, 0, 0)]  # code -1 takes the last
    ver = np.array([a[0] for a in parsed], dtype=np.int64)
    hi = np.array([a[1] for a in parsed], dtype=np.uint64)
    lo = np.array([a[2] for a in parsed], dtype=np.uint64)
    vms, names = pair(records, "vm")
    index = {p: i for i, p in enumerate(profiles)}
    bound = np.array([*(index.get(bindings.profile_of(v) or "", -1) for v in names), -1])
    proto = ints(records, "proto")
    icmp_type, icmp_code = ints(records, "icmp_type"), ints(records, "icmp_code")
    echo = (icmp_type < 0) & (ints(records, "icmp_id") >= 0) & np.isin(proto, [1, 58])
    return Flows(
        proto=proto,
        icmp_type=np.where(echo, np.where(proto == 1, 8, 128), icmp_type),
        icmp_code=np.where(echo, 0, icmp_code),
        port=(ints(records, "src_port"), ints(records, "dst_port")),
        ver=(ver[ips[SRC]], ver[ips[DST]]),
        hi=(hi[ips[SRC]], hi[ips[DST]]),
        lo=(lo[ips[SRC]], lo[ips[DST]]),
        vm=vms,
        profile=(bound[vms[SRC]], bound[vms[DST]]),
        names=_VmNames([str(v) for v in names], bindings),
    )
