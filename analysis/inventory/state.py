"""The analyzer's one inventory of all hosts: a static file plus collector registrations.

A collector registers its host (``collector_id``, name) and the VM ports it has (VM name,
UUID, MAC, vif, port-profile); each registration replaces what that host had. A collector
may register under a new host name when no other collector has it (a rename: its VMs move
with it, an event says so), unless the inventory file names its host; ``remove_collector``
forgets a collector and its host (an administrator's decision: its VMs are gone from it).

What the analyzer's own inventory file says is not a collector's to change: a VM the file
declares keeps the file's name and port-profile whatever a registration reports (such a
registration is counted as ``static_overrides_refused`` and logged); a registration can still
place it on another host (that is how a live migration is seen). A VM keeps
its identity — found by UUID, else by one of its MACs, else (UUID- and MAC-less) by name on
the same host — so when it appears behind another host it is a **migration**: its name,
profile and vNIC indexes continue, its old (host, vif) is released. The data plane reports
moves too (``observe_dataplane``: a VM's MAC seen behind another host's vif).

Every change is an ``InventoryEvent`` (kept in a bounded ring, handed to ``history_sink``);
every move is also a ``Migration`` (ring and ``migration_sink``). Sinks run under the lock
so that they see changes in order: they should be quick (enqueue, not write a database).

Readers never lock: each change builds a new immutable ``InventorySnapshot`` and swaps it
in. vNIC indexes are allocated once and never reused, so a flow keyed by a vNIC index
(``analysis.endpoints``) names the same VM in every later snapshot, across migrations and
after the VM is gone. Time is always passed in as ``now``.

``analysis._inventory_vms`` holds the VM side (``VmBook``: matching a registration to a
known VM, its vNICs and MACs, the events and migrations it records); this module the hosts,
registrations, heartbeats, the lock, the snapshots and the sinks.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from vspan.analysis.inventory._vms import InventoryConfig, VmBook
from vspan.analysis.inventory.snapshot import (
    EventKind,
    Heartbeat,
    InventoryEvent,
    InventorySnapshot,
    Migration,
    MigrationSource,
    PortInfo,
    RegistrationError,
    VmPorts,
    group_ports,
)
from vspan.errors import VspanError
from vspan.inventory import Host, Inventory, Nic, Vm

__all__ = [
    "MAX_COLLECTOR_ID",
    "EventKind",
    "Heartbeat",
    "InventoryConfig",
    "InventoryEvent",
    "InventorySnapshot",
    "InventoryState",
    "Migration",
    "MigrationSource",
    "PortInfo",
    "RegistrationError",
    "UnknownCollectorError",
]

_log = logging.getLogger(__name__)
MAX_COLLECTOR_ID = 2**32 - 1


class UnknownCollectorError(VspanError):
    """A collector_id that no host of the inventory has."""

    def __init__(self, collector_id: int) -> None:
        super().__init__(f"collector {collector_id} is not registered; register it first")
        self.collector_id = collector_id


Sink = Callable[[InventoryEvent], None]
MigrationSink = Callable[[Migration], None]


class InventoryState(VmBook):
    """Hosts, VMs and vNICs of all collectors; thread-safe; a ``NicDirectory``."""

    def __init__(
        self,
        config: InventoryConfig | None = None,
        *,
        history_sink: Sink | None = None,
        migration_sink: MigrationSink | None = None,
    ) -> None:
        super().__init__(config or InventoryConfig())
        self.history_sink = history_sink
        self.migration_sink = migration_sink
        self._lock = threading.RLock()
        self._hosts: dict[int, Host] = {}
        self._host_ids: dict[str, int] = {}
        self._registered: dict[int, float] = {}
        self._static_hosts: set[int] = set()
        """collector_ids of the hosts the inventory file names."""
        self._heartbeats: dict[int, deque[Heartbeat]] = {}
        self._snap = InventorySnapshot([], [], [], [])

    # --- readers (no lock: the snapshot is immutable) ---------------------------------

    def snapshot(self) -> InventorySnapshot:
        """The current inventory (immutable; vNIC indexes stable across snapshots)."""
        return self._snap

    def resolve_vifs(
        self, collector_id: npt.ArrayLike, vif: npt.ArrayLike
    ) -> npt.NDArray[np.int32]:
        """vNIC index per (collector_id, vif); -1 where none (``NicDirectory``)."""
        return self._snap.resolve_vifs(collector_id, vif)

    def resolve_macs(self, mac: npt.ArrayLike) -> npt.NDArray[np.int32]:
        """vNIC index per MAC; -1 where none (``NicDirectory``)."""
        return self._snap.resolve_macs(mac)

    def nic_host_vif(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
        """collector_id and vif of each vNIC (``NicDirectory``)."""
        return self._snap.nic_host_vif()

    def history(self, since: float | None = None) -> list[InventoryEvent]:
        """Events kept in memory, oldest first (at or after ``since``)."""
        with self._lock:
            return [e for e in self._history if since is None or e.time >= since]

    def migrations(self, since: float | None = None) -> list[Migration]:
        """Migrations kept in memory, oldest first (at or after ``since``)."""
        with self._lock:
            return [m for m in self._migrations if since is None or m.time >= since]

    def vm_host_history(self, vm: str) -> list[tuple[float, str]]:
        """(time, host) each time the VM (name or UUID) was placed on a host."""
        with self._lock:
            rec = self._find(vm)
            return [] if rec is None else list(rec.hosts)

    def registrations(self) -> dict[int, float]:
        """Time of the last registration of each collector."""
        with self._lock:
            return dict(self._registered)

    def collector_view(self, collector_id: int) -> tuple[Host, tuple[Vm, ...]]:
        """A collector's host and the VMs on it now; ``UnknownCollectorError`` if none."""
        snap = self._snap
        host = snap.host_by_id(collector_id)
        if host is None:
            raise UnknownCollectorError(collector_id)
        return host, snap.vms_on(host.name)

    def heartbeats(self, collector_id: int) -> list[Heartbeat]:
        """The last heartbeats of a collector, oldest first."""
        with self._lock:
            return list(self._heartbeats.get(collector_id, ()))

    def latest_heartbeats(self) -> dict[int, Heartbeat]:
        """The latest heartbeat of each collector that sent one."""
        with self._lock:
            return {cid: ring[-1] for cid, ring in self._heartbeats.items() if ring}

    # --- writers ----------------------------------------------------------------------

    def add_static(self, inventory: Inventory, now: float) -> None:
        """Merge a static inventory (a file): its hosts and VMs, as if registered."""
        with self._lock:
            for host in inventory.hosts:
                self._check_host(host.collector_id, host.name)
            for host in inventory.hosts:
                self._ensure_host(host.collector_id, host.name, now, "static inventory")
                self._static_hosts.add(host.collector_id)
            for vm in inventory.vms:
                nics = [(n.mac, n.vif, n.ips) for n in vm.nics]
                group = VmPorts(vm.name, vm.uuid, vm.profile, nics)
                host = self._hosts[self._host_ids[vm.host]]
                rec = self._vms[self._place(group, host, now, set())]
                rec.static, rec.profile, rec.view = True, vm.profile, None
            self._commit()

    def register(
        self, collector_id: int, host_name: str, ports: Sequence[PortInfo], now: float
    ) -> Host:
        """Replace what ``collector_id``'s host runs with ``ports``; VMs gone are removed."""
        groups = group_ports(collector_id, host_name, ports)
        with self._lock:
            self._check_host(collector_id, host_name, rename=True)
            if (known := self._hosts.get(collector_id)) is not None and known.name != host_name:
                self._rename_host(known, host_name, now)
            host = self._ensure_host(collector_id, host_name, now, "registration")
            placed: set[int] = set()
            for group in groups:
                placed.add(self._place(group, host, now, placed))
            for vm in self._vms:
                if vm.present and vm.host == host.name and vm.index not in placed:
                    vm.present = False
                    self._event(now, EventKind.VM_REMOVED, host.name, vm)
            self._registered[collector_id] = now
            self.counters["registrations"] += 1
            self._commit()
            return host

    def remove_collector(self, collector_id: int, now: float) -> Host:
        """Forget a collector and its host: the VMs on it are gone (they stay known, and come
        back wherever they are registered next), its registration and heartbeats are dropped.
        ``UnknownCollectorError`` if no host has ``collector_id``."""
        with self._lock:
            host = self._hosts.get(collector_id)
            if host is None:
                raise UnknownCollectorError(collector_id)
            for vm in self._vms:
                if vm.present and vm.host == host.name:
                    vm.present = False
                    self._event(now, EventKind.VM_REMOVED, host.name, vm, "host removed")
            del self._hosts[collector_id], self._host_ids[host.name]
            self._registered.pop(collector_id, None)
            self._heartbeats.pop(collector_id, None)
            self._static_hosts.discard(collector_id)
            self._dirty = True
            self.counters["hosts_removed"] += 1
            self._event(now, EventKind.HOST_REMOVED, host.name, detail=f"collector {collector_id}")
            _log.warning("inventory: collector %d (host %r) removed", collector_id, host.name)
            self._commit()
            return host

    def record_heartbeat(self, collector_id: int, heartbeat: Heartbeat) -> None:
        """Keep a heartbeat in the collector's ring; ``UnknownCollectorError`` if none."""
        with self._lock:
            if collector_id not in self._hosts:
                raise UnknownCollectorError(collector_id)
            ring = self._heartbeats.setdefault(
                collector_id, deque(maxlen=self.config.heartbeats_per_collector)
            )
            ring.append(heartbeat)
            self.counters["heartbeats"] += 1

    def observe_dataplane(
        self,
        host_of_mac: Mapping[int, int],
        now: float,
        *,
        vif_of_mac: Mapping[int, int] | None = None,
    ) -> list[Migration]:
        """VM MACs the data plane saw behind a host's vif (MAC → collector_id, and the vif
        when known). Pass what was newly learned, not a whole stale table. A known VM seen
        behind another known host migrates there; returns the migrations."""
        with self._lock:
            first = len(self._out)
            for mac, collector_id in host_of_mac.items():
                owner, host = self._mac_owner.get(mac), self._hosts.get(collector_id)
                if owner is None or host is None:
                    continue
                vm = self._vms[owner]
                if vm.host != host.name:
                    if vm.present and now - vm.since < self.config.dataplane_hold_s:
                        self.counters["dataplane_held"] += 1
                        continue
                    self._migrate(vm, host.name, now, MigrationSource.DATAPLANE)
                    for i in vm.nics:  # released: where they are on the new host is unknown
                        self._nics[i].bound = False
                    vm.present = True
                self._bind_seen(vm, mac, collector_id, (vif_of_mac or {}).get(mac, 0))
            moved = [m for m in self._out[first:] if isinstance(m, Migration)]
            self._commit()
            return moved

    # --- internals (lock held) --------------------------------------------------------

    def _check_host(self, collector_id: int, name: str, *, rename: bool = False) -> None:
        """``RegistrationError`` unless ``collector_id`` may be host ``name`` (``rename``: a
        registration, which may rename its host to a free name)."""
        known, owner = self._hosts.get(collector_id), self._host_ids.get(name)
        problem = None
        if not 1 <= collector_id <= MAX_COLLECTOR_ID:
            problem = f"collector_id {collector_id} out of range 1..{MAX_COLLECTOR_ID}"
        elif not name:
            problem = f"collector {collector_id}: empty host name"
        elif owner is not None and owner != collector_id:
            problem = (
                f"host {name!r} belongs to collector {owner}, not {collector_id} (give each "
                f"collector its own host name; an administrator removes a collector that is "
                f"gone with DELETE /api/v1/control/collectors/{owner})"
            )
        elif known is not None and known.name != name:
            if not rename:
                problem = f"collector {collector_id} is host {known.name!r}, not {name!r}"
            elif collector_id in self._static_hosts:
                problem = (
                    f"collector {collector_id} is host {known.name!r} in the inventory file, "
                    f"not {name!r}: a registration does not rename a host the file names"
                )
        if problem is not None:
            raise RegistrationError(problem)

    def _rename_host(self, host: Host, name: str, now: float) -> None:
        """The collector's host takes the free name ``name``; its VMs go with it."""
        old, cid = host.name, host.collector_id
        self._hosts[cid] = Host(name=name, collector_id=cid)
        del self._host_ids[old]
        self._host_ids[name] = cid
        for vm in self._vms:
            if vm.host == old:
                vm.host, vm.view = name, None
        self._dirty = True
        self.counters["hosts_renamed"] += 1
        self._event(now, EventKind.HOST_RENAMED, name, detail=f"collector {cid}: {old}→{name}")
        _log.warning("inventory: collector %d renamed its host %r to %r", cid, old, name)

    def _ensure_host(self, collector_id: int, name: str, now: float, how: str) -> Host:
        host = self._hosts.get(collector_id)
        if host is None:
            host = self._hosts[collector_id] = Host(name=name, collector_id=collector_id)
            self._host_ids[name] = collector_id
            self._dirty = True
            self._event(now, EventKind.HOST_ADDED, name, detail=f"collector {collector_id} ({how})")
        return host

    def _commit(self) -> None:
        """Swap in a new snapshot and hand the pending events to the sinks, in order."""
        if self._dirty:
            vms: list[Vm] = []
            for v in self._vms:  # a Vm is rebuilt only when it changed
                if v.view is None:
                    rows = [self._nics[i] for i in v.nics if self._nics[i].bound]
                    nics = tuple(Nic(r.mac, r.vif, r.ips) for r in rows)
                    v.view = Vm(v.name, v.uuid, v.host, nics, v.profile)
                vms.append(v.view)
            present = [v.present for v in self._vms]
            self._snap = InventorySnapshot(list(self._hosts.values()), vms, present, self._nics)
            self._dirty = False
        out, self._out = self._out, []
        for item in out:
            try:
                if isinstance(item, InventoryEvent):
                    if self.history_sink is not None:
                        self.history_sink(item)
                elif self.migration_sink is not None:
                    self.migration_sink(item)
            except Exception:
                self.counters["sink_errors"] += 1
                _log.exception("inventory sink failed on %s", item)
