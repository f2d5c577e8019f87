"""Flow records: finished flows (A/B oriented state) → user-facing rows with names.

Orients each flow so that ``src`` is the side that sent its first counted packet, resolves
endpoints to VMs and hosts, and decides the scope. Vectorized over flows; only the final
rendering of addresses and names to strings touches Python objects, once per distinct value.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.endpoints import KIND_MAC, KIND_NIC, endpoint_host_vif
from vspan.analysis.flowkeys import ICMP_TYPE_CODE
from vspan.analysis.hostnames import HostNames
from vspan.inventory import InventoryView, format_mac

__all__ = ["RECORD_COLUMNS", "HostNames", "flow_records"]

RECORD_COLUMNS = (
    "flow_id",
    "src_vm",
    "dst_vm",
    "src_vif",
    "dst_vif",
    "host",
    "src_host",
    "dst_host",
    "scope",
    "vlan",
    "ethertype",
    "proto",
    "src_ip",
    "dst_ip",
    "src_port",
    "dst_port",
    "icmp_type",
    "icmp_code",
    "icmp_id",
    "packets",
    "bytes",
    "packets_rev",
    "bytes_rev",
    "first",
    "last",
    "first_ns",
    "last_ns",
    "duration_s",
    "tcp_flags",
    "tcp_flags_rev",
    "src_mac",
    "dst_mac",
    "copies",
    "observed_at",
    "delay_us",
)
"""The columns of a flow record, in output order (documented in the README)."""

_KIND_MASK = ~((np.uint64(1) << np.uint64(62)) - np.uint64(1))
_PAYLOAD = (np.uint64(1) << np.uint64(62)) - np.uint64(1)
_NO_VLAN = 0xFFFF


def _swap(
    a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], rev: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    return np.where(rev, b, a), np.where(rev, a, b)


Objects = npt.NDArray[np.object_]


def _factorize(*columns: npt.NDArray[Any]) -> tuple[npt.NDArray[np.intp], list[tuple[int, ...]]]:
    """Codes per row and the distinct value tuples of one or more integer columns (hash-based:
    records are formatted once per distinct value, not once per row)."""
    codes = np.zeros(len(columns[0]), dtype=np.int64)
    levels: list[npt.NDArray[Any]] = []
    for column in columns:  # mixed-radix codes of the columns' own codes
        col_codes, uniq = pd.factorize(column)
        levels.append(np.asarray(uniq))
        codes = codes * len(uniq) + col_codes
    codes, combined = pd.factorize(codes)
    parts = []
    rest = np.asarray(combined, dtype=np.int64)
    for level in reversed(levels):
        parts.append(level[rest % len(level)] if len(level) else rest)
        rest = rest // max(len(level), 1)
    rows = zip(*(p.tolist() for p in reversed(parts)), strict=True)
    return codes, [tuple(int(x) for x in row) for row in rows]


def _spread(codes: npt.NDArray[np.intp], values: list[Any]) -> Objects:
    """``values[code]`` per row, as an object array (one shared object per distinct value)."""
    table = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        table[i] = value
    out: Objects = table[codes]
    return out


def _ip_strings(hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]) -> Objects:
    """Text of each address; IPv4-mapped addresses print as IPv4; 0 (non-IP) as None."""
    codes, uniq = _factorize(hi, lo)
    text: list[str | None] = []
    for h, low in uniq:
        if h == 0 and low == 0:
            text.append(None)
            continue
        addr = ipaddress.IPv6Address((h << 64) | low)
        text.append(str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr))
    return _spread(codes, text)


def _names(values: npt.NDArray[np.int64], table: Mapping[int, str | None]) -> Objects:
    codes, uniq = _factorize(values)
    return _spread(codes, [table.get(v) for (v,) in uniq])


def _nullable(values: npt.ArrayLike, valid: npt.NDArray[np.bool_]) -> pd.Series:
    return pd.Series(pd.array(np.where(valid, values, 0), dtype="Int64")).mask(~valid)


def flow_records(
    flows: pd.DataFrame, *, inventory: InventoryView | None, hosts: HostNames, first_id: int = 1
) -> pd.DataFrame:
    """User-facing flow records (``RECORD_COLUMNS``) of finished flows."""
    n = len(flows)
    col = {c: flows[c].to_numpy() for c in flows.columns}
    rev = col["first_rev"].astype(np.bool_)
    ep_src, ep_dst = (x.view(np.uint64) for x in _swap(col["ep_a"], col["ep_b"], rev))
    ip_src_hi, ip_dst_hi = _swap(col["ip_a_hi"], col["ip_b_hi"], rev)
    ip_src_lo, ip_dst_lo = _swap(col["ip_a_lo"], col["ip_b_lo"], rev)
    port_src, port_dst = _swap(col["port_a"], col["port_b"], rev)
    pk, pk_rev = _swap(col["packets"], col["packets_rev"], rev)
    by, by_rev = _swap(col["bytes"], col["bytes_rev"], rev)
    fl, fl_rev = _swap(col["tcp_flags"], col["tcp_flags_rev"], rev)

    nic_host = nic_vif = None
    vm_of_nic: npt.NDArray[np.int32] | None = None
    if inventory is not None:
        nic_host, nic_vif = inventory.nic_host_vif()
        vm_of_nic = inventory.nic_vm()
    src_host, src_vif = endpoint_host_vif(ep_src, nic_host, nic_vif)
    dst_host, dst_vif = endpoint_host_vif(ep_dst, nic_host, nic_vif)
    src_kind, dst_kind = ep_src & _KIND_MASK, ep_dst & _KIND_MASK
    # vNICs of the inventory and vifs learned from tags are local to a host; MACs are not.
    src_local = src_kind != KIND_MAC
    dst_local = dst_kind != KIND_MAC
    observer = col["observer"]
    scope = np.where(
        src_local & dst_local,
        np.where(src_host == dst_host, "intra-host", "cross-host"),
        "external",
    )

    def vm_names(ep: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint64]) -> Objects:
        index = np.full(n, -1, dtype=np.int64)
        is_nic = kind == KIND_NIC
        if vm_of_nic is not None and is_nic.any():
            index[is_nic] = vm_of_nic[(ep[is_nic] & _PAYLOAD).astype(np.int64)]
        names: dict[int, str | None] = {-1: None}
        if inventory is not None:
            names.update({i: v.name for i, v in enumerate(inventory.vms)})
        return _names(index, names)

    def macs(ep: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint64]) -> Objects:
        value = np.where(kind == KIND_MAC, ep, np.uint64(1) << np.uint64(48)).astype(np.int64)
        table: dict[int, str | None] = {int(v): format_mac(int(v)) for v in np.unique(value)}
        table[1 << 48] = None
        return _names(value, table)

    tagged = col["tagged"].astype(np.bool_)
    same_src = src_local & (src_host == observer)
    same_dst = dst_local & (dst_host == observer)
    host_table: dict[int, str | None] = {
        int(h): hosts.name(int(h))
        for h in np.unique(
            np.concatenate([observer, src_host, dst_host, col["observer_other"].clip(0)])
        )
    }
    is_icmp = (col["proto"] == 1) | (col["proto"] == 58)
    tc = ((port_src & int(ICMP_TYPE_CODE)) != 0) & is_icmp
    echo = is_icmp & ~tc
    has_ports = ~is_icmp & np.isin(col["proto"], [6, 17, 132])
    is_ip = col["ethertype"] != 0
    is_ip &= (col["ip_a_hi"] != 0) | (col["ip_a_lo"] != 0) | (col["ip_b_lo"] != 0)
    other = col["observer_other"]
    pair_codes, pairs = _factorize(observer, other)
    observed = _spread(
        pair_codes,
        [
            [n for n in (host_table.get(a), host_table.get(b) if b >= 0 else None) if n is not None]
            for a, b in pairs
        ],
    )
    first_ns, last_ns = col["start_ns"], col["last_ns"]
    out = pd.DataFrame(
        {
            "flow_id": np.arange(first_id, first_id + n, dtype=np.int64),
            "src_vm": vm_names(ep_src, src_kind),
            "dst_vm": vm_names(ep_dst, dst_kind),
            "src_vif": _nullable(np.where(same_src, src_vif, 0), tagged),
            "dst_vif": _nullable(np.where(same_dst, dst_vif, 0), tagged),
            "host": _names(observer, host_table),
            "src_host": _names(np.where(src_local, src_host, -1), host_table),
            "dst_host": _names(np.where(dst_local, dst_host, -1), host_table),
            "scope": scope,
            "vlan": _nullable(col["vlan"], col["vlan"] != _NO_VLAN),
            "ethertype": col["ethertype"],
            "proto": _nullable(col["proto"], is_ip),
            "src_ip": _ip_strings(ip_src_hi.view(np.uint64), ip_src_lo.view(np.uint64)),
            "dst_ip": _ip_strings(ip_dst_hi.view(np.uint64), ip_dst_lo.view(np.uint64)),
            "src_port": _nullable(port_src, has_ports),
            "dst_port": _nullable(port_dst, has_ports),
            "icmp_type": _nullable((port_src >> 8) & 0xFF, tc),
            "icmp_code": _nullable(port_src & 0xFF, tc),
            "icmp_id": _nullable(port_src & 0xFFFF, echo),
            "packets": pk,
            "bytes": by,
            "packets_rev": pk_rev,
            "bytes_rev": by_rev,
            "first": pd.to_datetime(first_ns, unit="ns", utc=True),
            "last": pd.to_datetime(last_ns, unit="ns", utc=True),
            "first_ns": first_ns,
            "last_ns": last_ns,
            "duration_s": (last_ns - first_ns) / 1e9,
            "tcp_flags": _nullable(fl, col["proto"] == 6),
            "tcp_flags_rev": _nullable(fl_rev, col["proto"] == 6),
            "src_mac": macs(ep_src, src_kind),
            "dst_mac": macs(ep_dst, dst_kind),
            "copies": col["copies"],
            "observed_at": observed,
            "delay_us": (col["delay_ns"] / 1e3) if "delay_ns" in col else np.full(n, np.nan),
        }
    )
    return out[list(RECORD_COLUMNS)]
