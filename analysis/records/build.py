"""Flow records: finished flows (A/B oriented state) → user-facing rows with names.

Orients each flow so that ``src`` is the side that sent its first counted packet, resolves
endpoints to VMs and hosts, and decides the scope. Vectorized over flows; addresses and
names become strings once per distinct value, in a ``RecordTable`` of dictionary-coded
columns (no pandas: ``vspan report`` writes JSON and Parquet from it directly).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vspan.analysis._factorize import factorize
from vspan.analysis.flows.endpoints import KIND_MAC, KIND_NIC, endpoint_host_vif
from vspan.analysis.flows.keys import ICMP_TYPE_CODE
from vspan.analysis.records.hostnames import HostNames
from vspan.analysis.records.table import (
    Column,
    Floats,
    Ints,
    Lists,
    RecordTable,
    Seconds,
    Texts,
    Times,
)
from vspan.inventory import InventoryView, format_mac

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RECORD_COLUMNS", "HostNames", "flow_records", "flow_table"]

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
_SCOPES = ("intra-host", "cross-host", "external")
_MASK64 = (1 << 64) - 1

I64 = npt.NDArray[np.int64]


def _swap(a: I64, b: I64, rev: npt.NDArray[np.bool_]) -> tuple[I64, I64]:
    return np.where(rev, b, a), np.where(rev, a, b)


def _factorize(*columns: npt.NDArray[Any]) -> tuple[I64, list[tuple[int, ...]]]:
    """Codes per row and the distinct value tuples of one or more 64-bit integer columns
    (hash-based: records are formatted once per distinct value, not once per row)."""
    ints = [np.ascontiguousarray(c).astype(np.int64, copy=False) for c in columns]
    codes = np.zeros(len(ints[0]), dtype=np.int64)
    for column in ints:  # mixed-radix codes of the columns' own codes
        col_codes, uniq, _ = factorize(column.view(np.uint64))
        codes = codes * len(uniq) + col_codes
    codes, _, first = factorize(codes.view(np.uint64))
    return codes, list(zip(*(c[first].tolist() for c in ints), strict=True))


def _ip_text(hi: int, lo: int) -> str | None:
    """An address as text: IPv4-mapped ones as IPv4, others as IPv6 (RFC 5952); None for
    0 (non-IP)."""
    hi, lo = hi & _MASK64, lo & _MASK64
    if hi == 0 and lo >> 32 == 0xFFFF:
        return f"{lo >> 24 & 0xFF}.{lo >> 16 & 0xFF}.{lo >> 8 & 0xFF}.{lo & 0xFF}"
    if hi == 0 and lo == 0:
        return None
    return str(ipaddress.IPv6Address(hi << 64 | lo))


def _ip_strings(src: tuple[I64, I64], dst: tuple[I64, I64]) -> tuple[Texts, Texts]:
    """Source and destination addresses as texts (``_ip_text``), each distinct address of
    either side formatted once."""
    n = len(src[0])
    codes, uniq = _factorize(np.concatenate([src[0], dst[0]]), np.concatenate([src[1], dst[1]]))
    text = tuple(_ip_text(h, lo) for h, lo in uniq)
    return Texts(codes[:n], text), Texts(codes[n:], text)


def _names(values: I64, table: Mapping[int, str | None]) -> Texts:
    codes, uniq = _factorize(values)
    return Texts(codes, tuple(table.get(v) for (v,) in uniq))


def _nullable(values: npt.ArrayLike, valid: npt.NDArray[np.bool_]) -> Ints:
    return Ints(np.asarray(values, dtype=np.int64), np.asarray(valid, dtype=np.bool_))


def flow_records(
    flows: pd.DataFrame, *, inventory: InventoryView | None, hosts: HostNames, first_id: int = 1
) -> pd.DataFrame:
    """User-facing flow records (``RECORD_COLUMNS``) of finished flows, as a frame."""
    columns = {c: flows[c].to_numpy() for c in flows.columns}
    return flow_table(columns, inventory=inventory, hosts=hosts, first_id=first_id).frame()


def flow_table(
    col: Mapping[str, npt.NDArray[Any]],
    *,
    inventory: InventoryView | None,
    hosts: HostNames,
    first_id: int = 1,
) -> RecordTable:
    """User-facing flow records (``RECORD_COLUMNS``) of finished flows (the columns of
    ``flows.FLOW_COLUMNS``)."""
    n = len(col["hash"])
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
    scope = np.where(src_local & dst_local, np.where(src_host == dst_host, 0, 1), 2)

    def vm_names(ep: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint64]) -> Texts:
        index = np.full(n, -1, dtype=np.int64)
        is_nic = kind == KIND_NIC
        if vm_of_nic is not None and is_nic.any():
            index[is_nic] = vm_of_nic[(ep[is_nic] & _PAYLOAD).astype(np.int64)]
        names: dict[int, str | None] = {-1: None}
        if inventory is not None:
            names.update({i: v.name for i, v in enumerate(inventory.vms)})
        return _names(index, names)

    def macs(ep: npt.NDArray[np.uint64], kind: npt.NDArray[np.uint64]) -> Texts:
        value = np.where(kind == KIND_MAC, ep, np.uint64(1) << np.uint64(48)).astype(np.int64)
        codes, uniq = _factorize(value)
        return Texts(codes, tuple(None if v == 1 << 48 else format_mac(v) for (v,) in uniq))

    tagged = col["tagged"].astype(np.bool_)
    same_src = src_local & (src_host == observer)
    same_dst = dst_local & (dst_host == observer)
    seen = np.concatenate([observer, src_host, dst_host, col["observer_other"].clip(0)])
    host_table: dict[int, str | None] = {
        h: hosts.name(h) for (h,) in _factorize(seen.astype(np.int64))[1]
    }
    is_icmp = (col["proto"] == 1) | (col["proto"] == 58)
    tc = ((port_src & int(ICMP_TYPE_CODE)) != 0) & is_icmp
    echo = is_icmp & ~tc
    has_ports = ~is_icmp & np.isin(col["proto"], [6, 17, 132])
    is_ip = col["ethertype"] != 0
    is_ip &= (col["ip_a_hi"] != 0) | (col["ip_a_lo"] != 0) | (col["ip_b_lo"] != 0)
    pair_codes, pairs = _factorize(observer, col["observer_other"])
    observed = Lists(
        pair_codes,
        tuple(
            tuple(
                n
                for n in (host_table.get(a), host_table.get(b) if b >= 0 else None)
                if n is not None
            )
            for a, b in pairs
        ),
    )
    src_ip, dst_ip = _ip_strings((ip_src_hi, ip_src_lo), (ip_dst_hi, ip_dst_lo))
    first_ns, last_ns = col["start_ns"], col["last_ns"]
    delay_us = col["delay_ns"] / 1e3 if "delay_ns" in col else np.full(n, np.nan)
    is_tcp = col["proto"] == 6
    columns: dict[str, Column] = {
        "flow_id": Ints(np.arange(first_id, first_id + n, dtype=np.int64)),
        "src_vm": vm_names(ep_src, src_kind),
        "dst_vm": vm_names(ep_dst, dst_kind),
        "src_vif": _nullable(np.where(same_src, src_vif, 0), tagged),
        "dst_vif": _nullable(np.where(same_dst, dst_vif, 0), tagged),
        "host": _names(observer, host_table),
        "src_host": _names(np.where(src_local, src_host.astype(np.int64), -1), host_table),
        "dst_host": _names(np.where(dst_local, dst_host.astype(np.int64), -1), host_table),
        "scope": Texts(scope.astype(np.int64), _SCOPES),
        "vlan": _nullable(col["vlan"], col["vlan"] != _NO_VLAN),
        "ethertype": Ints(col["ethertype"].astype(np.int64)),
        "proto": _nullable(col["proto"], is_ip),
        "src_ip": src_ip,
        "dst_ip": dst_ip,
        "src_port": _nullable(port_src, has_ports),
        "dst_port": _nullable(port_dst, has_ports),
        "icmp_type": _nullable((port_src >> 8) & 0xFF, tc),
        "icmp_code": _nullable(port_src & 0xFF, tc),
        "icmp_id": _nullable(port_src & 0xFFFF, echo),
        "packets": Ints(pk.astype(np.int64)),
        "bytes": Ints(by.astype(np.int64)),
        "packets_rev": Ints(pk_rev.astype(np.int64)),
        "bytes_rev": Ints(by_rev.astype(np.int64)),
        "first": Times(first_ns.astype(np.int64)),
        "last": Times(last_ns.astype(np.int64)),
        "first_ns": Ints(first_ns.astype(np.int64)),
        "last_ns": Ints(last_ns.astype(np.int64)),
        "duration_s": Seconds((last_ns - first_ns).astype(np.int64)),
        "tcp_flags": _nullable(fl, is_tcp),
        "tcp_flags_rev": _nullable(fl_rev, is_tcp),
        "src_mac": macs(ep_src, src_kind),
        "dst_mac": macs(ep_dst, dst_kind),
        "copies": Ints(col["copies"].astype(np.int64)),
        "observed_at": observed,
        "delay_us": Floats(delay_us.astype(np.float64)),
    }
    return RecordTable({name: columns[name] for name in RECORD_COLUMNS})
