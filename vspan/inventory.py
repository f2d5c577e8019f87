"""Inventory: hosts (hypervisors with a collector) and VMs with their vNICs.

A VM's identity is its UUID (name and MACs too); a vNIC is a vif on the VM's host, numbered
1..4095 (vif 0 means "not a local VM"). ``(collector_id, vif)`` resolves to a VM, and so
does a MAC for untagged captures. Lookups come in two forms: one key at a time, and
vectorized over numpy columns for the hot path.

File format (YAML)::

    hosts:
      - name: hv01
        collector_id: 1
    vms:
      - name: web-01
        uuid: 6f1c2d9e-...
        host: hv01
        profile: web            # port-profile, optional
        nics:
          - mac: "52:54:00:00:00:01"
            vif: 1
            ips: ["10.1.0.1"]   # optional
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vspan.yamlconf import Node, load, load_file

__all__ = [
    "MAX_VIF",
    "Host",
    "Inventory",
    "InventoryView",
    "Nic",
    "NicIndex",
    "Port",
    "Vm",
    "format_mac",
]

MAX_VIF = 4095
"""Largest vif: the VN-Tag's svif field has 12 bits."""


def format_mac(mac: int) -> str:
    """``0x525400000001`` → ``52:54:00:00:00:01``."""
    raw = f"{mac:012x}"
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


@dataclass(frozen=True, slots=True)
class Port:
    """A vswitch port that belongs to a VM's vNIC."""

    name: str
    """Interface name on the host (``vnet3``, ``veth-web1``, ``tap...``)."""
    ifindex: int
    """Kernel interface index (0 for sources without one, such as pcap replay)."""
    vif: int
    """Virtual interface id 1..4095, stable across collector restarts."""
    mac: int
    """The VM's MAC on this vNIC (48-bit), 0 when unknown."""
    vm_name: str
    vm_uuid: str | None = None
    profile: str | None = None
    """Port-profile of the VM."""
    bridge: str | None = None
    """The vswitch (Linux bridge or OVS bridge) the port is on."""
    iface_id: str | None = None
    """The interface's own id where the vswitch has one (Open vSwitch
    ``external_ids:iface-id``: libvirt's interface UUID, a Neutron port, an OVN logical
    port); it stays the same when the VM moves, so the vif is kept under it."""


@dataclass(frozen=True, slots=True)
class Host:
    """A hypervisor running one collector."""

    name: str
    collector_id: int
    """The id in tunnel headers (1..2^32-1)."""


@dataclass(frozen=True, slots=True)
class Nic:
    """A VM's vNIC: one vif on the VM's host."""

    mac: int
    """48-bit MAC."""
    vif: int
    """Virtual interface id on the host, 1..4095."""
    ips: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Vm:
    """A virtual machine."""

    name: str
    uuid: str | None
    """Canonical lower-case UUID; None when nothing told it (a VM found behind a Linux
    bridge port), never "" (stored as NULL, matched by name and MAC instead)."""
    host: str
    """Name of the host it runs on."""
    nics: tuple[Nic, ...]
    profile: str | None = None
    """Port-profile bound to the VM."""


class InventoryView(Protocol):
    """What readers of an inventory use: the static ``Inventory`` and the analyzer's live
    snapshot (``vspan.analysis.inventory.snapshot``) both provide it."""

    @property
    def hosts(self) -> tuple[Host, ...]: ...

    @property
    def vms(self) -> tuple[Vm, ...]: ...

    def host(self, name: str) -> Host | None: ...

    def host_by_id(self, collector_id: int) -> Host | None: ...

    def vm(self, name_or_uuid: str) -> Vm | None: ...

    def resolve_vifs(
        self, collector_id: npt.ArrayLike, vif: npt.ArrayLike
    ) -> npt.NDArray[np.int32]: ...

    def resolve_macs(self, mac: npt.ArrayLike) -> npt.NDArray[np.int32]: ...

    def nic_vm(self) -> npt.NDArray[np.int32]: ...

    def nic_host_vif(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]: ...


class NicIndex:
    """The vNIC lookups of an inventory, over tables sorted by key.

    Shared by the static ``Inventory`` and the analyzer's live snapshot; each builds its
    tables and hands them to ``_set_index``. vNIC indexes number ``nic_vm``/``nic_host_vif``.
    """

    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...]

    def _set_index(
        self,
        hosts: tuple[Host, ...],
        *,
        nic_vm: npt.NDArray[np.int32],
        nic_host: npt.NDArray[np.uint32],
        nic_vif: npt.NDArray[np.uint32],
        vif_table: tuple[npt.NDArray[np.uint64], npt.NDArray[np.int32]],
        mac_table: tuple[npt.NDArray[np.uint64], npt.NDArray[np.int32]],
    ) -> None:
        self._host_by_name = {h.name: h for h in hosts}
        self._host_by_id = {h.collector_id: h for h in hosts}
        self._nic_vm, self._nic_host, self._nic_vif = nic_vm, nic_host, nic_vif
        self._vif_keys, self._vif_nic = vif_table
        self._mac_keys, self._mac_nic = mac_table

    def host(self, name: str) -> Host | None:
        """The host called ``name``."""
        return self._host_by_name.get(name)

    def host_by_id(self, collector_id: int) -> Host | None:
        """The host whose collector has ``collector_id``."""
        return self._host_by_id.get(collector_id)

    def resolve_vif(self, collector_id: int, vif: int) -> Vm | None:
        """The VM behind ``vif`` on the host with ``collector_id``."""
        nic = int(self.resolve_vifs(np.array([collector_id]), np.array([vif]))[0])
        return None if nic < 0 else self.vms[self._nic_vm[nic]]

    def resolve_mac(self, mac: int) -> Vm | None:
        """The VM owning ``mac``."""
        nic = int(self.resolve_macs(np.array([mac], dtype=np.uint64))[0])
        return None if nic < 0 else self.vms[self._nic_vm[nic]]

    def resolve_vifs(
        self, collector_id: npt.ArrayLike, vif: npt.ArrayLike
    ) -> npt.NDArray[np.int32]:
        """vNIC index per (collector_id, vif) pair; -1 where none (vif 0 is never a VM)."""
        keys = (np.asarray(collector_id, dtype=np.uint64) << np.uint64(20)) | np.asarray(
            vif, dtype=np.uint64
        )
        return _lookup(self._vif_keys, self._vif_nic, keys)

    def resolve_macs(self, mac: npt.ArrayLike) -> npt.NDArray[np.int32]:
        """vNIC index per MAC; -1 where none."""
        return _lookup(self._mac_keys, self._mac_nic, np.asarray(mac, dtype=np.uint64))

    def nic_vm(self) -> npt.NDArray[np.int32]:
        """VM index (into ``vms``) of each vNIC."""
        return self._nic_vm

    def nic_host_vif(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
        """collector_id and vif of each vNIC."""
        return self._nic_host, self._nic_vif


class Inventory(NicIndex):
    """Hosts and VMs, with lookups by name, collector_id, (collector_id, vif) and MAC."""

    def __init__(self, hosts: list[Host], vms: list[Vm]) -> None:
        self.hosts = tuple(hosts)
        self.vms = tuple(vms)
        self._vm_by_name = {v.name: i for i, v in enumerate(vms)}
        self._vm_by_uuid = {v.uuid: i for i, v in enumerate(vms) if v.uuid is not None}
        cid_of = {h.name: h.collector_id for h in hosts}
        vif_keys: list[int] = []
        mac_keys: list[int] = []
        nic_vm: list[int] = []
        nic_host: list[int] = []
        nic_vif: list[int] = []
        for index, vm in enumerate(vms):
            cid = cid_of[vm.host]
            for nic in vm.nics:
                vif_keys.append((cid << 20) | nic.vif)
                mac_keys.append(nic.mac)
                nic_vm.append(index)
                nic_host.append(cid)
                nic_vif.append(nic.vif)
        nic_ids = list(range(len(nic_vm)))
        self._set_index(
            self.hosts,
            nic_vm=np.array(nic_vm, dtype=np.int32),
            nic_host=np.array(nic_host, dtype=np.uint32),
            nic_vif=np.array(nic_vif, dtype=np.uint32),
            vif_table=_sorted_table(vif_keys, nic_ids),
            mac_table=_sorted_table(mac_keys, nic_ids),
        )

    def vm(self, name_or_uuid: str) -> Vm | None:
        """A VM by name or UUID."""
        index = self._vm_by_name.get(name_or_uuid, self._vm_by_uuid.get(name_or_uuid))
        return None if index is None else self.vms[index]

    # --- loading ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str) -> Inventory:
        """Load and validate an inventory file."""
        return cls.from_node(load_file(path))

    @classmethod
    def loads(cls, text: str, path: str = "<inventory>") -> Inventory:
        """Load and validate inventory YAML text."""
        return cls.from_node(load(text, path))

    @classmethod
    def from_node(cls, root: Node) -> Inventory:
        """Validate a parsed inventory; errors name the file, line and field."""
        root.check_keys({"hosts", "vms"})
        hosts = [_parse_host(n) for n in root.get("hosts").items()]
        seen_names: dict[str, int] = {}
        seen_ids: dict[int, int] = {}
        for node, host in zip(root.get("hosts").items(), hosts, strict=True):
            if host.name in seen_names:
                raise node.get("name").error(f"duplicate host name {host.name!r}")
            if host.collector_id in seen_ids:
                raise node.get("collector_id").error(f"duplicate collector_id {host.collector_id}")
            seen_names[host.name] = seen_ids[host.collector_id] = 1
        vms: list[Vm] = []
        if root.has("vms") and root.get("vms").value is not None:
            vms = _parse_vms(root.get("vms"), set(seen_names))
        return cls(hosts, vms)


def _sorted_table(
    keys: list[int], values: list[int]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int32]]:
    k = np.array(keys, dtype=np.uint64)
    v = np.array(values, dtype=np.int32)
    order = np.argsort(k, kind="stable")
    return k[order], v[order]


def _lookup(
    table: npt.NDArray[np.uint64], values: npt.NDArray[np.int32], keys: npt.NDArray[np.uint64]
) -> npt.NDArray[np.int32]:
    out = np.full(keys.shape, -1, dtype=np.int32)
    if table.size == 0 or keys.size == 0:
        return out
    pos = np.searchsorted(table, keys)
    pos = np.minimum(pos, table.size - 1)
    hit = table[pos] == keys
    out[hit] = values[pos[hit]]
    return out


def _parse_host(node: Node) -> Host:
    node.check_keys({"name", "collector_id"})
    return Host(
        name=node.get("name").as_str(),
        collector_id=node.get("collector_id").as_int(1, 2**32 - 1),
    )


def _parse_vms(vms_node: Node, host_names: set[str]) -> list[Vm]:
    vms: list[Vm] = []
    names: set[str] = set()
    uuids: set[str] = set()
    macs: set[int] = set()
    vifs: set[tuple[str, int]] = set()
    for node in vms_node.items():
        node.check_keys({"name", "uuid", "host", "profile", "nics"})
        name = node.get("name").as_str()
        if name in names:
            raise node.get("name").error(f"duplicate VM name {name!r}")
        uuid_node = node.get("uuid")
        try:
            vm_uuid = str(uuidlib.UUID(str(uuid_node.value)))
        except ValueError:
            raise uuid_node.error(f"expected a UUID, got {uuid_node.value!r}") from None
        if vm_uuid in uuids:
            raise uuid_node.error(f"duplicate VM uuid {vm_uuid}")
        host = node.get("host").as_str()
        if host not in host_names:
            raise node.get("host").error(f"unknown host {host!r}; hosts are listed under 'hosts'")
        profile = node.get("profile").as_str() if node.has("profile") else None
        nics: list[Nic] = []
        for nic_node in node.get("nics").items():
            nic_node.check_keys({"mac", "vif", "ips"})
            mac = nic_node.get("mac").as_mac()
            if mac in macs:
                raise nic_node.get("mac").error(f"MAC {format_mac(mac)} already belongs to a VM")
            vif = nic_node.get("vif").as_int(1, MAX_VIF)
            if (host, vif) in vifs:
                raise nic_node.get("vif").error(f"vif {vif} already used on host {host!r}")
            ips: tuple[str, ...] = ()
            if nic_node.has("ips"):
                ips = tuple(str(n.as_ip()) for n in nic_node.get("ips").items())
            macs.add(mac)
            vifs.add((host, vif))
            nics.append(Nic(mac=mac, vif=vif, ips=ips))
        if not nics:
            raise node.get("nics").error("a VM needs at least one NIC")
        names.add(name)
        uuids.add(vm_uuid)
        vms.append(Vm(name=name, uuid=vm_uuid, host=host, nics=tuple(nics), profile=profile))
    return vms
