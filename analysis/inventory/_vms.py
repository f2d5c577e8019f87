"""The VM side of ``InventoryState``: which known VM a registered group of ports is, its
vNICs, the MACs it owns, and the events and migrations its changes record.

``VmBook`` holds the VMs (``_VmRec``: identity, host, host history, vNIC indexes), the vNIC
rows and the lookups by UUID, name and MAC; its methods match a group to a VM (UUID, else
one of its MACs, else the name of a UUID-less VM on the same host), place it, bind its vNICs
and record each change as an ``InventoryEvent`` (and each move as a ``Migration``) in the
bounded rings and in the pending list ``InventoryState`` hands to its sinks. Callers hold
``InventoryState``'s lock. Import ``InventoryConfig`` from ``analysis.inventory_state``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from vspan.analysis.inventory.snapshot import (
    EventKind,
    InventoryEvent,
    Migration,
    MigrationSource,
    NicRow,
    VmPorts,
)
from vspan.inventory import Host, Vm, format_mac

__all__ = ["InventoryConfig", "VmBook"]

_log = logging.getLogger("vspan.analysis.inventory.state")


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
    static: bool = False
    """Declared in the analyzer's inventory file: its name and profile are the file's, and
    no registration changes them."""


_COUNTERS = (
    "registrations", "heartbeats", "events", "migrations", "dataplane_held", "sink_errors",
    "hosts_renamed", "hosts_removed", "static_overrides_refused",
)  # fmt: skip
"""``static_overrides_refused``: registrations that gave a VM of the inventory file another
name or port-profile than the file's (kept)."""


class VmBook:
    """VMs and vNICs by identity, and the events and migrations of their changes."""

    def __init__(self, config: InventoryConfig) -> None:
        self.config = config
        self._vms: list[_VmRec] = []
        self._by_uuid: dict[str, int] = {}
        self._by_name: dict[str, list[int]] = {}
        self._nics: list[NicRow] = []
        self._mac_owner: dict[int, int] = {}
        self._history: deque[InventoryEvent] = deque(maxlen=self.config.history_size)
        self._migrations: deque[Migration] = deque(maxlen=self.config.migrations_size)
        self._out: list[InventoryEvent | Migration] = []
        """Events and migrations not yet handed to the sinks, in order."""
        self._seq = 0
        self._dirty = False
        """Something a snapshot shows changed since the last one."""
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        """What happened, for metrics (see ``_COUNTERS``)."""
        self._refused_logged_at = -float("inf")
        self._refused_held = 0

    # --- internals (``InventoryState``'s lock held) -----------------------------------

    def _find(self, name_or_uuid: str) -> _VmRec | None:
        index = self._by_uuid.get(name_or_uuid)
        if index is not None:
            return self._vms[index]
        named = [self._vms[i] for i in self._by_name.get(name_or_uuid, ())]
        return max(named, key=lambda v: (v.present, v.since), default=None)

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
        before = (vm.uuid, vm.name)
        if group.uuid is not None and vm.uuid is None:
            vm.uuid = group.uuid
            self._by_uuid[group.uuid] = vm.index
            changes.append(f"uuid {group.uuid}")
        if vm.static:
            self._keep_static(vm, group, host.name, now)
        elif group.name != vm.name:
            changes.append(f"name {vm.name}→{group.name}")
            self._by_name[vm.name].remove(vm.index)
            self._by_name.setdefault(group.name, []).append(vm.index)
            vm.name = group.name
        if not vm.static and group.profile is not None and group.profile != vm.profile:
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
            renamed = before if before != (vm.uuid, vm.name) else None  # a UUID or a name
            self._event(
                now, EventKind.VM_CHANGED, host.name, vm, "; ".join(changes), before=renamed
            )
        return vm.index

    def _keep_static(self, vm: _VmRec, group: VmPorts, host: str, now: float) -> None:
        """A registration naming a VM of the inventory file otherwise: counted, logged (at
        most once a minute, with the count held back), and not applied."""
        wrong = []
        if group.name != vm.name:
            wrong.append(f"name {group.name!r}")
        if group.profile is not None and group.profile != vm.profile:
            wrong.append(f"port-profile {group.profile!r}")
        if not wrong:
            return
        self.counters["static_overrides_refused"] += 1
        if now < self._refused_logged_at + 60.0:
            self._refused_held += 1
            return
        held, self._refused_held, self._refused_logged_at = self._refused_held, 0, now
        _log.warning(
            "host %s reported %s for VM %s, which the inventory file declares with port-profile "
            "%r: the file's are kept%s", host, " and ".join(wrong), vm.name, vm.profile,
            f" ({held} more like it not logged)" if held else "",
        )  # fmt: skip

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
            if mac and not nic.mac:  # a MAC its collector learned from the traffic since
                nic.mac = mac
                changes.append(f"nic vif {vif} MAC {format_mac(mac)}")
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
        """The VM's vNIC with ``mac``; else its vNIC bound at (host, vif) when either MAC is
        unknown (0): a vNIC registered before its collector learned the MAC from traffic
        (a Linux bridge port), or one reported without it by a collector that has not
        learned it again yet (restarted). Its vNIC index, and so its flows, stay the same."""
        at_port = None
        for i in vm.nics:
            nic = self._nics[i]
            if nic.mac == mac and (mac or (nic.host, nic.vif) == (collector_id, vif)):
                return i
            here = nic.bound and (nic.host, nic.vif) == (collector_id, vif)
            if here and not (nic.mac and mac):
                at_port = i
        return at_port

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
        self, now: float, kind: EventKind, host: str, vm: _VmRec | None = None, detail: str = "",
        *, before: tuple[str | None, str] | None = None,
    ) -> None:  # fmt: skip
        name, uuid = (None, None) if vm is None else (vm.name, vm.uuid)
        if vm is not None:
            vm.view = None
        event = InventoryEvent(now, kind, host, name, uuid, detail, before)
        self._history.append(event)
        self._out.append(event)
        self.counters["events"] += 1
        self._dirty = True
