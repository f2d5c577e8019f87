"""The dashboard's views over stored flows and the inventory: hosts, VMs, top talkers and the
traffic matrix.

Every function takes the ``Store`` and/or an ``InventoryView`` and the filters as the API
gets them, and returns plain rows (lists of dicts of JSON values). The store sums the flow
records of ``[since, until)`` per (VMs, hosts, scope) in SQL — a flow counts in full where
it overlaps the window — so a view reads a few thousand rows however many flows are
stored; pandas shapes those. A flow's traffic is both directions: ``bytes + bytes_rev`` and
``packets + packets_rev``. ``intra`` is the traffic of ``intra-host`` flows, ``cross`` of
``cross-host`` flows; ``external`` flows have one side outside the inventory, shown as
``EXTERNAL``.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from typing import Any, Final, Literal

import pandas as pd

from vspan.analysis.store.queries import json_rows, parse_time
from vspan.analysis.store.schema import quote, vm_key
from vspan.analysis.store.sql import FLOWS_SQL, flows_where
from vspan.analysis.store.store import Store
from vspan.errors import ConfigError
from vspan.inventory import InventoryView, Vm, format_mac

__all__ = [
    "EXTERNAL",
    "TOP_BY",
    "TOP_METRICS",
    "UnknownVmError",
    "hosts",
    "matrix",
    "top",
    "vm_detail",
    "vms",
    "window",
]

EXTERNAL: Final = "(external)"
"""The name of the side of a flow that is no VM (host) of the inventory."""
TOP_BY: Final = ("vm", "vm-pair", "host-pair")
TOP_METRICS: Final = ("bytes", "packets")
_DIMS: Final = ("src_vm", "dst_vm", "src_host", "dst_host", "scope")
"""What the store groups flows by for the views."""
_SUMS: Final = ("bytes", "bytes_rev", "packets", "packets_rev")


class UnknownVmError(LookupError):
    """No VM of the inventory has this name or UUID."""


def window(
    since: str | float | None, until: str | float | None, now: float
) -> tuple[int | None, int | None]:
    """``since``/``until`` as the API takes them (``queries.parse_time``) → ns or None."""
    lo = None if since is None else parse_time(since, now, field="since")
    hi = None if until is None else parse_time(until, now, field="until")
    if lo is not None and hi is not None and hi <= lo:
        raise ConfigError(f"until ({until}) must be after since ({since})", field="until")
    return lo, hi


def _totals(
    store: Store, since: int | None, until: int | None, *, vm: str | None = None,
    bin_s: int | None = None,
) -> pd.DataFrame:  # fmt: skip
    """The window's flows summed per ``_DIMS`` (and per ``time`` bin: epoch seconds of the
    bin of each flow's first packet): ``flows`` and the ``_SUMS``, with ``total_bytes`` and
    ``total_packets`` (both directions); a side outside the inventory is ``EXTERNAL``."""
    where = flows_where(
        vm=vm, host=None, scope=None, proto=None, ip=None, port=None, since=since, until=until
    )
    dims = [quote(d) for d in _DIMS]
    if bin_s is not None:
        first, time = quote("first_ns"), quote("time")
        dims.append(f"({first} // {int(bin_s) * 10**9}) * {int(bin_s)} AS {time}")
    sums = [f"CAST(SUM({quote(c)}) AS BIGINT) AS {quote(c)}" for c in _SUMS]
    sql = f"SELECT {', '.join(dims)}, COUNT(*) AS flows, {', '.join(sums)} FROM {FLOWS_SQL}"
    rows = store.query(f"{sql}{where.sql()} GROUP BY ALL", where.params)
    for side in ("src", "dst"):
        for level in ("vm", "host"):
            rows[f"{side}_{level}"] = rows[f"{side}_{level}"].astype(object).fillna(EXTERNAL)
    counts = ["flows", *_SUMS]
    rows[counts] = rows[counts].fillna(0).astype("int64")
    rows["total_bytes"] = rows["bytes"] + rows["bytes_rev"]
    rows["total_packets"] = rows["packets"] + rows["packets_rev"]
    return rows


def _split(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``intra_<metric>`` and ``cross_<metric>`` columns: the total where the scope is so."""
    total = rows[f"total_{metric}"]
    return rows.assign(
        **{
            f"intra_{metric}": total.where(rows["scope"] == "intra-host", 0),
            f"cross_{metric}": total.where(rows["scope"] == "cross-host", 0),
        }
    )


def _sides(rows: pd.DataFrame, level: str) -> pd.DataFrame:
    """Each row once per side: ``name`` is the VM (``level="vm"``) or host on that side; a
    flow within one host (or VM) counts once for it."""
    src = rows.rename(columns={f"src_{level}": "name"})
    dst = rows[rows[f"dst_{level}"] != rows[f"src_{level}"]]
    return pd.concat([src, dst.rename(columns={f"dst_{level}": "name"})], ignore_index=True)


def _present(inventory: InventoryView) -> tuple[Vm, ...]:
    """The VMs running now (an ``InventorySnapshot`` also keeps the VMs that are gone)."""
    present = getattr(inventory, "present_vms", None)
    return tuple(present()) if callable(present) else tuple(inventory.vms)


def hosts(store: Store, inventory: InventoryView, *, since: int | None = None,
          until: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every host of the inventory, by name: its VMs (running now), flows and traffic in the window
    (``bytes``/``packets`` of the flows it is on, and their intra-/cross-host split)."""
    rows = _split(_split(_totals(store, since, until), "bytes"), "packets")
    sums = _sides(rows, "host").groupby("name").agg(
        flows=("flows", "sum"), bytes=("total_bytes", "sum"),
        packets=("total_packets", "sum"), intra_bytes=("intra_bytes", "sum"),
        cross_bytes=("cross_bytes", "sum"), intra_packets=("intra_packets", "sum"),
        cross_packets=("cross_packets", "sum"),
    )  # fmt: skip
    vm_count = pd.Series([vm.host for vm in _present(inventory)], dtype=object).value_counts()
    table = pd.DataFrame(  # typed, so that no host at all still merges on "name"
        {
            "name": pd.Series([h.name for h in inventory.hosts], dtype=object),
            "collector_id": pd.Series([h.collector_id for h in inventory.hosts], dtype="int64"),
        }
    )
    table["vms"] = table["name"].map(vm_count).fillna(0).astype("int64")
    table = table.merge(sums, left_on="name", right_index=True, how="left")
    counts = list(sums.columns)
    table[counts] = table[counts].fillna(0).astype("int64")
    return json_rows(table.sort_values("name", ignore_index=True))


def _vm_row(vm: Vm) -> dict[str, Any]:
    return {
        "name": vm.name, "uuid": vm.uuid, "host": vm.host, "profile": vm.profile,
        "vifs": [{"vif": n.vif, "mac": format_mac(n.mac), "ips": list(n.ips)} for n in vm.nics],
    }  # fmt: skip


def vms(store: Store, inventory: InventoryView, *, since: int | None = None,
        until: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every VM running now, by name, with its flows and traffic in the window."""
    rows = _totals(store, since, until)
    sums = _sides(rows, "vm").groupby("name").agg(
        flows=("flows", "sum"), bytes=("total_bytes", "sum"), packets=("total_packets", "sum")
    )  # fmt: skip
    listed = sorted(_present(inventory), key=lambda v: v.name)
    table = sums.reindex([vm.name for vm in listed], fill_value=0).astype("int64")
    return [
        {**_vm_row(vm), **{c: int(n) for c, n in zip(table.columns, counts, strict=True)}}
        for vm, counts in zip(listed, table.to_numpy().tolist(), strict=True)
    ]


def vm_detail(store: Store, inventory: InventoryView, name_or_uuid: str, *,
              host_history: Callable[[str], list[tuple[float, str]]], since: int | None = None,
              until: int | None = None, recent: int = 20) -> dict[str, Any]:  # fmt: skip
    """One VM: its vifs, host history, profile, traffic summary (sent/received, intra/cross,
    top peers), its latest flows, policy hits and migrations. ``UnknownVmError`` if none."""
    vm = inventory.vm(name_or_uuid) or inventory.vm(_canonical_uuid(name_or_uuid))
    if vm is None:
        raise UnknownVmError(f"no VM named or with UUID {name_or_uuid!r} in the inventory")
    key = vm.uuid or vm.name  # a VM without a UUID (Linux bridge) is known by its name
    stored = vm_key(vm.uuid, vm.name)  # this VM's rows, whatever it was called before
    rows = _split(_totals(store, since, until, vm=key), "bytes")
    is_src = rows["src_vm"] == vm.name
    sent = rows["bytes"].where(is_src, rows["bytes_rev"]).astype("int64")
    received = rows["total_bytes"] - sent
    peers = rows["dst_vm"].where(is_src, rows["src_vm"])
    top = (
        rows.assign(peer=peers).groupby("peer")[["total_bytes", "flows"]].sum()
        .rename(columns={"total_bytes": "sum", "flows": "size"})
        .sort_values("sum", ascending=False).head(10)
    )  # fmt: skip
    summary = {
        "flows": int(rows["flows"].sum()), "bytes": int(rows["total_bytes"].sum()),
        "packets": int(rows["total_packets"].sum()), "bytes_sent": int(sent.sum()),
        "bytes_received": int(received.sum()), "intra_bytes": int(rows["intra_bytes"].sum()),
        "cross_bytes": int(rows["cross_bytes"].sum()),
        "peers": [{"vm": str(p), "bytes": int(s), "flows": int(n)}
                  for p, s, n in zip(top.index, top["sum"], top["size"], strict=True)],
    }  # fmt: skip
    flows = store.query_flows(vm=key, since=since, until=until, limit=recent, order="-last_ns")
    return {
        **_vm_row(vm),
        "host_history": [{"time": t, "host": h} for t, h in host_history(key)],
        "traffic": summary,
        "flows": json_rows(flows),
        "policy_hits": json_rows(store.query_policy_hits(vm_key=stored, limit=None)),
        "migrations": json_rows(store.query_migrations(vm_key=stored, limit=None)),
    }


def _canonical_uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return text


def top(store: Store, *, by: str = "vm", metric: str = "bytes", since: int | None = None,
        until: int | None = None, limit: int = 10) -> list[dict[str, Any]]:  # fmt: skip
    """The ``limit`` largest VMs (traffic they are on), VM pairs or host pairs (unordered:
    ``a`` < ``b``) by ``metric``, largest first, ties by name."""
    if by not in TOP_BY:
        raise ConfigError(f"unknown grouping {by!r}; expected one of {list(TOP_BY)}", field="by")
    if metric not in TOP_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {list(TOP_METRICS)}",
                          field="metric")  # fmt: skip
    rows = _totals(store, since, until)
    agg = {"flows": ("flows", "sum"), "bytes": ("total_bytes", "sum"),
           "packets": ("total_packets", "sum")}  # fmt: skip
    if by == "vm":
        table = _sides(rows, "vm").groupby("name", as_index=False).agg(**agg)
        keys = ["name"]
    else:
        level = "vm" if by == "vm-pair" else "host"
        lo = rows[[f"src_{level}", f"dst_{level}"]].min(axis=1)
        hi = rows[[f"src_{level}", f"dst_{level}"]].max(axis=1)
        table = rows.assign(a=lo, b=hi).groupby(["a", "b"], as_index=False).agg(**agg)
        keys = ["a", "b"]
    table = table.sort_values([metric, *keys], ascending=[False, *[True] * len(keys)])
    return json_rows(table.head(limit).reset_index(drop=True))


def matrix(store: Store, *, level: Literal["vm", "host"] = "host", since: int | None = None,
           until: int | None = None, bin_s: int = 60) -> list[dict[str, Any]]:  # fmt: skip
    """Traffic per (``src``, ``dst``) and time bin (``time``: the bin's start, epoch seconds;
    a flow falls in the bin of its first packet): ``flows``, ``bytes``, ``packets`` and their
    intra-/cross-host split; ordered by time, then pair."""
    if level not in ("vm", "host"):
        raise ConfigError(f"unknown level {level!r}; expected 'vm' or 'host'", field="level")
    if bin_s < 1:
        raise ConfigError(f"expected a bin of 1 s or more, got {bin_s}", field="bin")
    rows = _split(_split(_totals(store, since, until, bin_s=bin_s), "bytes"), "packets")
    table = (
        rows.rename(columns={f"src_{level}": "src", f"dst_{level}": "dst"})
        .groupby(["time", "src", "dst"], as_index=False)
        .agg(
            flows=("flows", "sum"), bytes=("total_bytes", "sum"),
            packets=("total_packets", "sum"), intra_bytes=("intra_bytes", "sum"),
            cross_bytes=("cross_bytes", "sum"), intra_packets=("intra_packets", "sum"),
            cross_packets=("cross_packets", "sum"),
        )
    )  # fmt: skip
    return json_rows(table.sort_values(["time", "src", "dst"], ignore_index=True))
