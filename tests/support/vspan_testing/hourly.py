"""Three weeks of hourly flows between a few VMs on four hosts, stored and served over real
HTTP with the view routers (and so ``/api/v1/predictions``), for the prediction API tests
and the dashboard's prediction panel.

Every flow lies inside one hour (from minute 1 to minute 30), so its bytes fall whole into
that hour's bin; expectations are sums over ``HourlyData.flows`` in plain Python.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vspan.analysis.inventory.state import InventoryState
from vspan.analysis.store.store import Store
from vspan.api.auth import AccessPolicy
from vspan.api.gate import install_gate
from vspan.api.views_app import install_views
from vspan.inventory import Host, Inventory, Nic, Vm
from vspan_testing.readstore import serve
from vspan_testing.served import Client, Source

HOUR = 3600 * 10**9
START = 1_767_571_200 * 10**9
"""2026-01-05 00:00 UTC, a Monday."""
WEEKS = 3
HOSTS = ("hv01", "hv02", "hv03", "hv04")
"""hv04 runs no VM: a candidate for moves."""
PLACEMENT = {
    "web-01": "hv01",
    "web-02": "hv02",
    "db-01": "hv02",
    "app-01": "hv01",
    "app-02": "hv03",
}
PAIRS = (
    ("web-01", "db-01", 2e6), ("web-02", "db-01", 1e6), ("app-01", "web-02", 5e5),
    ("app-02", "db-01", 8e5), ("web-01", "app-01", 3e5), ("web-02", None, 4e5),
)  # fmt: skip
"""(client, server, bytes at the daily peak); None: a host outside the datacenter."""


@dataclass(frozen=True, eq=False)
class HourlyData:
    flows: pd.DataFrame
    """The stored records (``src_vm``, ``dst_vm``, hosts, ``bytes``, ``bytes_rev``, …)."""
    inventory: Inventory
    now: float
    """Seconds: one hour after the last bin starts."""


def _flows(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hours = np.arange(24 * 7 * WEEKS)
    daily = 1.0 + 2.0 * np.exp(-0.5 * (((hours % 24) - 14.0) / 3.0) ** 2)
    weekly = np.where((hours // 24) % 7 >= 5, 0.5, 1.0)
    rows = []
    for src, dst, peak in PAIRS:
        b = (peak / 3.0 * daily * weekly * rng.lognormal(0.0, 0.1, hours.size)).astype(np.int64)
        same = dst is not None and PLACEMENT[src] == PLACEMENT[dst]
        rows.append(pd.DataFrame({
            "src_vm": src, "dst_vm": dst, "src_host": PLACEMENT[src],
            "dst_host": None if dst is None else PLACEMENT[dst],
            "scope": "external" if dst is None else "intra-host" if same else "cross-host",
            "packets": b // 1000, "bytes": b, "packets_rev": b // 4000, "bytes_rev": b // 4,
            "first_ns": START + hours * HOUR + 60 * 10**9,
            "last_ns": START + hours * HOUR + 1800 * 10**9,
        }))  # fmt: skip
    flows = pd.concat(rows, ignore_index=True).sort_values("first_ns", kind="stable")
    flows = flows.reset_index(drop=True)
    flows.insert(0, "flow_id", np.arange(1, len(flows) + 1))
    flows["ethertype"] = 0x0800
    flows["copies"] = flows["packets"] + flows["packets_rev"]
    flows["first"] = pd.to_datetime(flows["first_ns"], unit="ns", utc=True)
    flows["last"] = pd.to_datetime(flows["last_ns"], unit="ns", utc=True)
    flows["duration_s"] = (flows["last_ns"] - flows["first_ns"]) / 1e9
    return flows


def _inventory() -> Inventory:
    hosts = [Host(name, k + 1) for k, name in enumerate(HOSTS)]
    vms = [
        Vm(vm, str(uuid.uuid5(uuid.NAMESPACE_DNS, vm)), host, (Nic(0x5200_0000_0000 + k, k + 1),))
        for k, (vm, host) in enumerate(PLACEMENT.items())
    ]
    return Inventory(hosts, vms)


@dataclass
class HourlyServed(Client):
    data: HourlyData


@contextmanager
def serve_hourly(folder: Path, *, seed: int = 1) -> Iterator[HourlyServed]:
    """Store the flows in ``folder`` and serve the views on 127.0.0.1."""
    flows, inventory = _flows(seed), _inventory()
    with Store(folder, retention_days=None) as store:
        store.append_flows(flows)
    now = (START + 24 * 7 * WEEKS * HOUR) / 1e9
    state = InventoryState()
    state.add_static(inventory, now - 3600)
    data = HourlyData(flows, inventory, now)
    with Store(folder) as store:
        from fastapi import FastAPI

        app = FastAPI()
        install_gate(app, AccessPolicy())
        install_views(app, Source(store, state, folder, lambda: now))
        with serve(app) as url:
            yield HourlyServed(url, data)
