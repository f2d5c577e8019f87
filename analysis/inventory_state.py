"""The analyzer's one inventory of all hosts: a static file plus collector registrations.

A collector registers its host (``collector_id``, name) and the VM ports it has (VM name,
UUID, MAC, vif, port-profile); each registration replaces what that host had. A VM keeps
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
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vspan.analysis.inventory_snapshot import (
    EventKind,
    Heartbeat,
    InventoryEvent,
    InventorySnapshot,
    Migration,
    MigrationSource,
    NicRow,
    PortInfo,
    RegistrationError,
    VmPorts,
    group_ports,
)
from vspan.errors import VspanError
from vspan.inventory import Host, Inventory, Nic, Vm, format_mac

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


@dataclass(frozen=True, slots=True)
class InventoryConfig:
    """Bounds and timings of ``InventoryState``."""

    history_size: int = 10_000
    migrations_size: int = 10_000
    host_history_size: int = 256
    """Hosts remembered per VM for ``vm_host_history``."""
    heartbeats_per_collector: int = 120
    dataplane_hold_s: float = 10.0
    """After a registration places a VM, data-plane sightings elsewhere are ignored this
    long: the learned MAC table may still hold the VM's previous host."""


@dataclass(slots=True)
class _VmRec:
    index: int
    name: str
    uuid: str | None
    host: str
    """Current host, or the last one when not present."""
    present: bool
    profile: str | None
    since: float = 0.0
    """When it was last placed on a host (new, returned or moved)."""
    hosts: deque[tuple[float, str]] = field(default_factory=deque)
    nics: list[int] = field(default_factory=list)
    """Its vNIC indexes, bound or released."""
    view: Vm | None = None
    """The ``Vm`` snapshots show; None once anything about the VM changed."""


_COUNTERS = ("registrations", "heartbeats", "events", "migrations", "dataplane_held", "sink_errors")
Sink = Callable[[InventoryEvent], None]
MigrationSink = Callable[[Migration], None]


class InventoryState:
    """Hosts, VMs and vNICs of all collectors; thread-safe; a ``NicDirectory``."""

    def __init__(
        self,
        config: InventoryConfig | None = None,
        *,
        history_sink: Sink | None = None,
        migration_sink: MigrationSink | None = None,
    ) -> None:
        self.config = config or InventoryConfig()
        self.history_sink = history_sink
        self.migration_sink = migration_sink
        self._lock = threading.RLock()
        self._hosts: dict[int, Host] = {}
        self._host_ids: dict[str, int] = {}
        self._registered: dict[int, float] = {}
        self._heartbeats: dict[int, deque[Heartbeat]] = {}
        self._vms: list[_VmRec] = []
        self._by_uuid: dict[str, int] = {}
        self._by_name: dict[str, list[int]] = {}
        self._nics: list[NicRow] = []
        self._mac_owner: dict[int, int] = {}
        self._history: deque[InventoryEvent] = deque(maxlen=self.config.history_size)
        self._migrations: deque[Migration] = deque(maxlen=self.config.migrations_size)
        self._out: list[InventoryEvent | Migration] = []
        self._seq = 0
        self._dirty = False
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        """What happened, for metrics (see ``_COUNTERS``)."""
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

    # --- writers ----------------------------------------------------------------------

    def add_static(self, inventory: Inventory, now: float) -> None:
        """Merge a static inventory (a file): its hosts and VMs, as if registered."""
        with self._lock:
            for host in inventory.hosts:
                self._check_host(host.collector_id, host.name)
            for host in inventory.hosts:
                self._ensure_host(host.collector_id, host.name, now, "static inventory")
            for vm in inventory.vms:
                nics = [(n.mac, n.vif, n.ips) for n in vm.nics]
                group = VmPorts(vm.name, vm.uuid, vm.profile, nics)
                self._place(group, self._hosts[self._host_ids[vm.host]], now, set())
            self._commit()

    def register(
        self, collector_id: int, host_name: str, ports: Sequence[PortInfo], now: float
    ) -> Host:
        """Replace what ``collector_id``'s host runs with ``ports``; VMs gone are removed."""
        groups = group_ports(collector_id, host_name, ports)
        with self._lock:
            self._check_host(collector_id, host_name)
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

    def _find(self, name_or_uuid: str) -> _VmRec | None:
        index = self._by_uuid.get(name_or_uuid)
        if index is not None:
            return self._vms[index]
        named = [self._vms[i] for i in self._by_name.get(name_or_uuid, ())]
        return max(named, key=lambda v: (v.present, v.since), default=None)

    def _check_host(self, collector_id: int, name: str) -> None:
        known, owner = self._hosts.get(collector_id), self._host_ids.get(name)
        problem = None
        if not 1 <= collector_id <= MAX_COLLECTOR_ID:
            problem = f"collector_id {collector_id} out of range 1..{MAX_COLLECTOR_ID}"
        elif not name:
            problem = f"collector {collector_id}: empty host name"
        elif known is not None and known.name != name:
            problem = f"collector {collector_id} is host {known.name!r}, not {name!r}"
        elif owner is not None and owner != collector_id:
            problem = f"host {name!r} belongs to collector {owner}, not {collector_id}"
        if problem is not None:
            raise RegistrationError(problem)

    def _ensure_host(self, collector_id: int, name: str, now: float, how: str) -> Host:
        host = self._hosts.get(collector_id)
        if host is None:
            host = self._hosts[collector_id] = Host(name=name, collector_id=collector_id)
            self._host_ids[name] = collector_id
            self._dirty = True
            self._event(now, EventKind.HOST_ADDED, name, detail=f"collector {collector_id} ({how})")
        return host

    def _match(self, group: VmPorts, host: str, taken: set[int]) -> _VmRec | None:
        """The known VM ``group`` is, if any (``taken``: VMs placed by this registration)."""
        if group.uuid is not None and group.uuid in self._by_uuid:
            return self._vms[self._by_uuid[group.uuid]]
        for mac, _, _ in group.nics:
            owner = self._mac_owner.get(mac) if mac else None
            if owner is None or owner in taken:
                continue
            if group.uuid is None or self._vms[owner].uuid is None:  # else: a duplicate MAC
                return self._vms[owner]
        for i in self._by_name.get(group.name, ()):  # nothing else to go by: the same name
            vm = self._vms[i]  # of a UUID-less VM on the same host (or gone)
            if vm.uuid is None and (vm.host == host or not vm.present) and i not in taken:
                return vm
        return None

    def _place(self, group: VmPorts, host: Host, now: float, taken: set[int]) -> int:
        vm = self._match(group, host.name, taken)
        if vm is None:
            hosts = deque([(now, host.name)], maxlen=self.config.host_history_size)
            vm = _VmRec(len(self._vms), group.name, group.uuid, host.name, True, group.profile)
            vm.since, vm.hosts = now, hosts
            self._vms.append(vm)
            self._by_name.setdefault(vm.name, []).append(vm.index)
            if group.uuid is not None:
                self._by_uuid[group.uuid] = vm.index
            nics = ", ".join(f"{format_mac(m)} vif {v}" for m, v, _ in group.nics)
            self._event(now, EventKind.VM_ADDED, host.name, vm, nics)
            self._bind(vm, host, group.nics, now)
            return vm.index
        changes: list[str] = []
        if group.uuid is not None and vm.uuid is None:
            vm.uuid = group.uuid
            self._by_uuid[group.uuid] = vm.index
            changes.append(f"uuid {group.uuid}")
        if group.name != vm.name:
            changes.append(f"name {vm.name}→{group.name}")
            self._by_name[vm.name].remove(vm.index)
            self._by_name.setdefault(group.name, []).append(vm.index)
            vm.name = group.name
        if group.profile is not None and group.profile != vm.profile:
            changes.append(f"profile {vm.profile}→{group.profile}")
            vm.profile = group.profile
        moved = vm.host != host.name
        if moved:
            self._migrate(vm, host.name, now, MigrationSource.INVENTORY)
        elif not vm.present:
            vm.hosts.append((now, host.name))
            vm.since = now
            self._event(now, EventKind.VM_ADDED, host.name, vm, "back")
        vm.present = True
        nic_changes = self._bind(vm, host, group.nics, now)
        changes += [] if moved else nic_changes
        if changes:
            self._event(now, EventKind.VM_CHANGED, host.name, vm, "; ".join(changes))
        return vm.index

    def _bind(
        self, vm: _VmRec, host: Host, nics: list[tuple[int, int, tuple[str, ...]]], now: float
    ) -> list[str]:
        """Bind the VM's vNICs to (host, vif); those it no longer has are released."""
        vm.view = None
        changes: list[str] = []
        cid = host.collector_id
        kept: set[int] = set()
        for mac, vif, ips in nics:
            index = self._nic_of(vm, mac, cid, vif)
            if index is None:
                index = len(self._nics)
                self._nics.append(NicRow(vm.index, mac, cid, vif))
                vm.nics.append(index)
                changes.append(f"nic {format_mac(mac)} vif {vif} added")
            nic = self._nics[index]
            if nic.bound and nic.host == cid and nic.vif != vif:
                changes.append(f"vif {format_mac(mac)} {nic.vif}→{vif}")
            self._seq += 1
            nic.host, nic.vif, nic.bound, nic.seq = cid, vif, True, self._seq
            nic.ips = ips or nic.ips
            kept.add(index)
            if mac:
                self._claim_mac(vm, mac, host.name, now)
        for i in vm.nics:
            if self._nics[i].bound and i not in kept:
                self._nics[i].bound = False
                changes.append(f"nic {format_mac(self._nics[i].mac)} removed")
        return changes

    def _nic_of(self, vm: _VmRec, mac: int, collector_id: int, vif: int) -> int | None:
        """The VM's vNIC with ``mac``; without a MAC, the MAC-less one at (host, vif)."""
        for i in vm.nics:
            nic = self._nics[i]
            if nic.mac == mac and (mac or (nic.host, nic.vif) == (collector_id, vif)):
                return i
        return None

    def _claim_mac(self, vm: _VmRec, mac: int, host: str, now: float) -> None:
        owner = self._mac_owner.get(mac)
        if owner is not None and owner != vm.index and self._vms[owner].present:
            other = self._vms[owner]
            detail = f"MAC {format_mac(mac)} also on {other.name} at {other.host}; {vm.name} wins"
            self._event(now, EventKind.MAC_CONFLICT, host, vm, detail)
        self._mac_owner[mac] = vm.index

    def _bind_seen(self, vm: _VmRec, mac: int, collector_id: int, vif: int) -> None:
        nic = next(self._nics[i] for i in vm.nics if self._nics[i].mac == mac)
        if nic.bound and nic.host == collector_id and (nic.vif or not vif):
            return
        taken = any(
            n.bound and self._vms[n.vm].present and (n.host, n.vif) == (collector_id, vif)
            for n in self._nics
        )
        self._seq += 1
        nic.host, nic.vif, nic.bound, nic.seq = collector_id, 0 if taken else vif, True, self._seq
        self._dirty, vm.view = True, None

    def _migrate(self, vm: _VmRec, to_host: str, now: float, source: MigrationSource) -> None:
        move = Migration(now, vm.uuid, vm.name, vm.host, to_host, source)
        self._migrations.append(move)
        self._out.append(move)
        self.counters["migrations"] += 1
        self._event(now, EventKind.VM_MIGRATED, to_host, vm, f"{vm.host}→{to_host} ({source})")
        vm.host, vm.since = to_host, now
        vm.hosts.append((now, to_host))

    def _event(
        self, now: float, kind: EventKind, host: str, vm: _VmRec | None = None, detail: str = ""
    ) -> None:
        name, uuid = (None, None) if vm is None else (vm.name, vm.uuid)
        if vm is not None:
            vm.view = None
        event = InventoryEvent(now, kind, host, name, uuid, detail)
        self._history.append(event)
        self._out.append(event)
        self.counters["events"] += 1
        self._dirty = True

    def _commit(self) -> None:
        """Swap in a new snapshot and hand the pending events to the sinks, in order."""
        if self._dirty:
            vms: list[Vm] = []
            for v in self._vms:  # a Vm is rebuilt only when it changed
                if v.view is None:
                    rows = [self._nics[i] for i in v.nics if self._nics[i].bound]
                    nics = tuple(Nic(r.mac, r.vif, r.ips) for r in rows)
                    v.view = Vm(v.name, v.uuid or "", v.host, nics, v.profile)
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
