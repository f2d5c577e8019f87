"""What the inventory state takes in and hands out: registered ports, events, migrations,
heartbeats and the immutable ``InventorySnapshot`` readers resolve through.

A snapshot keeps the lookups of ``vspan.inventory.Inventory`` (by name, UUID, collector_id,
(collector_id, vif) and MAC, one at a time and vectorized) over **permanent vNIC indexes**:
a vNIC keeps its index for the life of the analyzer, through migrations and after its VM is
gone, so flows keyed by vNIC index (``analysis.endpoints``) stay named.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vspan.errors import VspanError
from vspan.inventory import MAX_VIF, Host, NicIndex, Vm, format_mac

__all__ = [
    "EventKind",
    "Heartbeat",
    "InventoryEvent",
    "InventorySnapshot",
    "Migration",
    "MigrationSource",
    "NicRow",
    "PortInfo",
    "RegistrationError",
    "VmPorts",
    "group_ports",
]


class RegistrationError(VspanError):
    """A registration that contradicts itself or the inventory (host name ↔ collector_id)."""


class EventKind(enum.StrEnum):
    """What an ``InventoryEvent`` records."""

    HOST_ADDED = "host_added"
    HOST_RENAMED = "host_renamed"
    HOST_REMOVED = "host_removed"
    VM_ADDED = "vm_added"
    VM_REMOVED = "vm_removed"
    VM_CHANGED = "vm_changed"
    VM_MIGRATED = "vm_migrated"
    MAC_CONFLICT = "mac_conflict"


class MigrationSource(enum.StrEnum):
    """Who saw a VM move."""

    INVENTORY = "inventory"
    """A collector registered the VM behind its host."""
    DATAPLANE = "dataplane"
    """The data plane saw the VM's MAC behind another host's vif."""


@dataclass(frozen=True, slots=True)
class InventoryEvent:
    """One change of the inventory."""

    time: float
    kind: EventKind
    host: str
    """The host concerned (for a migration: the new host)."""
    vm_name: str | None = None
    vm_uuid: str | None = None
    detail: str = ""
    """What changed, for people: ``vif 52:54:00:00:00:01 3→5; profile web→db``."""
    before: tuple[str | None, str] | None = None
    """For a change of the VM's UUID or name: its (UUID, name) before it, which what was
    recorded of the VM until then knows it by."""


@dataclass(frozen=True, slots=True)
class Migration:
    """A VM that appeared behind a different host."""

    time: float
    vm_uuid: str | None
    vm_name: str
    from_host: str
    to_host: str
    source: MigrationSource


@dataclass(frozen=True, slots=True)
class PortInfo:
    """One VM port (vNIC) a collector registers."""

    vm_name: str
    vif: int
    """1..4095 on the registering host."""
    mac: int = 0
    """48-bit MAC; 0 when unknown."""
    vm_uuid: str | None = None
    profile: str | None = None
    port: str = ""
    """Interface name on the host, for messages."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Capture counters a collector reported (monotonic since the collector started, but for
    ``waiting``). ``frames = exported + sum(not_mirrored) + drops["runts"]``, less what
    sampling left out before capture."""

    time: float
    """The collector's clock."""
    received: float
    """The analyzer's clock."""
    frames: int = 0
    bytes: int = 0
    truncated: int = 0
    """Frames sent cut to the snap length."""
    exported: int | None = None
    """Frames mirrored (tagged for an analyzer); None from collectors that do not say."""
    waiting: int = 0
    """Frames exported and not yet sent (a TCP sender that cannot connect holds them)."""
    drops: Mapping[str, int] = field(default_factory=dict)
    """Frames the collector lost, by cause: ``kernel`` (capture ring full), ``runts``, and
    its senders' ``queue_full``, ``send_error``, ``stopped``, ``unsent``."""
    not_mirrored: Mapping[str, int] = field(default_factory=dict)
    """Frames captured and left out on purpose, by reason: ``duplicates`` (intra-host
    delivery copies of frames exported at their sender), ``unselected``, ``filtered``,
    ``sampled_out``. Not a loss."""
    per_port: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class VmPorts:
    """A registration's ports of one VM."""

    name: str
    uuid: str | None
    profile: str | None
    nics: list[tuple[int, int, tuple[str, ...]]]
    """(mac, vif, ips) per vNIC."""


@dataclass(slots=True)
class NicRow:
    """A vNIC ever known; its index in the state's list is its permanent vNIC index."""

    vm: int
    mac: int
    host: int
    """collector_id (the last one when released)."""
    vif: int
    bound: bool = True
    """Still one of its VM's vNICs (resolvable while the VM is present)."""
    seq: int = 0
    """Order of binding: on a duplicate (host, vif) or MAC, the newest wins."""
    ips: tuple[str, ...] = ()


class InventorySnapshot(NicIndex):
    """An immutable inventory with the lookups of ``vspan.inventory.Inventory``.

    ``vms`` holds every VM ever known, so that each vNIC index names its VM (``nic_vm``);
    ``present`` tells which run now. Only vNICs of present VMs resolve by vif or MAC;
    ``nic_host_vif`` gives the current (or, once released, the last) place of each vNIC.
    """

    def __init__(
        self,
        hosts: Sequence[Host],
        vms: Sequence[Vm],
        present: Sequence[bool],
        rows: Sequence[NicRow],
    ) -> None:
        """``vms[i]`` is VM index i (with its bound vNICs), ``rows[n]`` vNIC index n."""
        self.hosts = tuple(hosts)
        self.vms = tuple(vms)
        self.present: tuple[bool, ...] = tuple(present)
        order = sorted(range(len(vms)), key=lambda i: self.present[i])  # present ones win
        self._vm_by_key = {vms[i].name: i for i in order}
        self._vm_by_key |= {u: i for i in order if (u := vms[i].uuid) is not None}
        nic_vm = np.array([r.vm for r in rows], dtype=np.int32)
        nic_host = np.array([r.host for r in rows], dtype=np.uint32)
        nic_vif = np.array([r.vif for r in rows], dtype=np.uint32)
        mac = np.array([r.mac for r in rows], dtype=np.uint64)
        seq = np.array([r.seq for r in rows], dtype=np.int64)
        live = np.array([r.bound and present[r.vm] for r in rows], dtype=np.bool_)
        keys = (nic_host.astype(np.uint64) << np.uint64(20)) | nic_vif
        for array in (nic_vm, nic_host, nic_vif):
            array.flags.writeable = False  # handed out as is: nobody may change a snapshot
        self._set_index(
            self.hosts,
            nic_vm=nic_vm,
            nic_host=nic_host,
            nic_vif=nic_vif,
            vif_table=_table(keys, seq, live & (nic_vif != 0)),
            mac_table=_table(mac, seq, live & (mac != 0)),
        )

    def vm(self, name_or_uuid: str) -> Vm | None:
        """A VM by name or UUID (a present one before one that is gone)."""
        index = self._vm_by_key.get(name_or_uuid)
        return None if index is None else self.vms[index]

    def present_vms(self) -> tuple[Vm, ...]:
        """The VMs running now."""
        return tuple(v for v, here in zip(self.vms, self.present, strict=True) if here)

    def vms_on(self, host: str) -> tuple[Vm, ...]:
        """The VMs running on ``host`` now."""
        return tuple(v for v in self.present_vms() if v.host == host)


def _table(
    keys: npt.NDArray[np.uint64], seq: npt.NDArray[np.int64], keep: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int32]]:
    """Sorted unique keys → vNIC index; on a duplicate key the highest ``seq`` wins."""
    index = np.flatnonzero(keep).astype(np.int32)
    order = np.lexsort((seq[index], keys[index]))
    k, v = keys[index][order], index[order]
    last = np.append(k[1:] != k[:-1], True) if k.size else np.zeros(0, dtype=np.bool_)
    return k[last], v[last]


def group_ports(collector_id: int, host: str, ports: Sequence[PortInfo]) -> list[VmPorts]:
    """Ports grouped by VM (UUID, else name), checked: vifs and MACs unique, vifs in range."""
    where = f"collector {collector_id} ({host})"
    groups: dict[str, VmPorts] = {}
    vifs: dict[int, str] = {}
    macs: dict[int, str] = {}
    for p in ports:
        label = p.port or p.vm_name
        if not 1 <= p.vif <= MAX_VIF:
            raise RegistrationError(f"{where}: port {label}: vif {p.vif} out of range 1..{MAX_VIF}")
        if p.vif in vifs:
            raise RegistrationError(f"{where}: vif {p.vif} used by {vifs[p.vif]} and {label}")
        if p.mac and p.mac in macs:
            raise RegistrationError(
                f"{where}: MAC {format_mac(p.mac)} used by {macs[p.mac]} and {label}"
            )
        if not 0 <= p.mac < 1 << 48:
            raise RegistrationError(f"{where}: port {label}: MAC {p.mac:#x} is not 48-bit")
        if not p.vm_name:
            raise RegistrationError(f"{where}: port {label}: empty VM name")
        vifs[p.vif] = label
        if p.mac:
            macs[p.mac] = label
        uuid = p.vm_uuid or None  # "" is no UUID: the inventory never carries an empty one
        group = groups.setdefault(uuid or f"name:{p.vm_name}", VmPorts(p.vm_name, uuid, None, []))
        group.profile = group.profile or p.profile
        group.nics.append((p.mac, p.vif, ()))
    return list(groups.values())
