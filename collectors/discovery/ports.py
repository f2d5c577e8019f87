"""Inventory discovery: which vswitch ports of this host belong to which VM, with their vifs.

Every source answers one narrow question through ``PortDirectory.ports()`` (``model.py``):
the VM ports that exist now. A source that has no vif numbers returns ``vif=0``;
``Discovery`` gives every port its persistent vif from a ``VifTable`` and reports what
changed since the last ``refresh()``. Sources, chosen by ``kind`` in the collector config
(``SOURCE_KINDS``):

- ``static``: a YAML file listing this host's VMs (``StaticSource``, format below);
- ``libvirt``: domain XML, from a folder or from ``virsh`` (``discovery.sources``);
- ``ovs``: Open vSwitch ``Interface`` rows and their ``external_ids`` (``discovery.sources``);
- ``bridge``: Linux bridge ports from sysfs, VMs from network namespaces (``discovery.sources``).

Static file::

    vms:
      - name: web-01
        uuid: 6f1c2d9e-0000-4000-8000-000000000001   # optional
        profile: web                                 # optional port-profile
        nics:
          - port: vnet0             # the host-side interface
            mac: "52:54:00:00:00:01"
            vif: 7                  # optional: wins over the vif table
            bridge: br0             # optional

Collector config section (``source_from_config``)::

    discovery:
      kind: bridge          # static | libvirt | ovs | bridge
      bridges: [br0]        # bridge: the bridges to list
      uplinks: ["eth*"]     # bridge, ovs: port names (fnmatch) that are never VMs
      path: /etc/vspan/vms.yaml   # static: the file; libvirt: a folder of XML (else virsh)
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final

from vspan.collectors.discovery.macs import MacLearner, MacLearningConfig
from vspan.collectors.discovery.sources import (
    DEFAULT_UPLINKS,
    BridgeSource,
    CommandRunner,
    LibvirtSource,
    OvsSource,
    run_command,
)
from vspan.collectors.discovery.vifs import VifTable, port_identity
from vspan.collectors.model import PortBatch, PortDirectory
from vspan.inventory import MAX_VIF, Port
from vspan.yamlconf import Node, load, load_file

__all__ = [
    "SOURCE_KINDS",
    "CommandRunner",
    "Discovery",
    "MacLearningConfig",
    "StaticSource",
    "parse_static",
    "run_command",
    "source_from_config",
]

# --- static file ----------------------------------------------------------------------


def parse_static(root: Node) -> list[Port]:
    """Ports of a static inventory document; errors name the file, line and field."""
    root.check_keys({"vms"})
    ports: list[Port] = []
    names: set[str] = set()
    port_names: set[str] = set()
    macs: set[int] = set()
    vifs: set[int] = set()
    for node in root.get("vms").items():
        node.check_keys({"name", "uuid", "profile", "nics"})
        name = node.get("name").as_str()
        if name in names:
            raise node.get("name").error(f"duplicate VM name {name!r}")
        names.add(name)
        vm_uuid = None
        if node.has("uuid"):
            uuid_node = node.get("uuid")
            try:
                vm_uuid = str(uuidlib.UUID(str(uuid_node.value)))
            except ValueError:
                raise uuid_node.error(f"expected a UUID, got {uuid_node.value!r}") from None
        profile = node.get("profile").as_str() if node.has("profile") else None
        nics = list(node.get("nics").items())
        if not nics:
            raise node.get("nics").error("a VM needs at least one NIC")
        for nic in nics:
            nic.check_keys({"port", "mac", "vif", "bridge"})
            port_name = nic.get("port").as_str()
            if port_name in port_names:
                raise nic.get("port").error(f"port {port_name!r} already belongs to a VM")
            mac = nic.get("mac").as_mac()
            if mac in macs:
                raise nic.get("mac").error("MAC already belongs to another NIC")
            vif = nic.get("vif").as_int(1, MAX_VIF) if nic.has("vif") else 0
            if vif and vif in vifs:
                raise nic.get("vif").error(f"vif {vif} already used")
            port_names.add(port_name)
            macs.add(mac)
            vifs.add(vif)
            bridge = nic.get("bridge").as_str() if nic.has("bridge") else None
            ports.append(Port(port_name, 0, vif, mac, name, vm_uuid, profile, bridge))
    return ports


class StaticSource:
    """This host's VMs from a YAML file, re-read on every ``ports()`` (edits take effect)."""

    def __init__(self, path: str | None = None, *, text: str | None = None) -> None:
        if (path is None) == (text is None):
            raise ValueError("StaticSource needs exactly one of path or text")
        self.path = path
        self.text = text

    def ports(self) -> list[Port]:
        """The ports the file lists, ``vif`` 0 where it gives none."""
        if self.path is not None:
            return parse_static(load_file(self.path))
        assert self.text is not None
        return parse_static(load(self.text, "<static inventory>"))


# --- the component --------------------------------------------------------------------


class Discovery:
    """A source merged with the vif table; ``refresh()`` reports what changed.

    ``ports()`` (a ``PortDirectory`` itself) returns the ports of the last refresh with
    their vifs, and with the MACs learned from traffic (``learn_macs``, by the rule of
    ``discovery_macs``) where the source has none. A port whose vif, VM or MAC changed
    counts as removed and added.
    """

    def __init__(
        self, source: PortDirectory, vifs: VifTable, *, macs: MacLearningConfig | None = None
    ) -> None:
        self.source = source
        self.vifs = vifs
        self._ports: dict[str, Port] = {}
        self.macs = MacLearner(macs)
        """The MACs learned, for the ports whose source gives none."""
        self._learning: dict[int, str] = {}
        """vif → name of the ports whose source gives no MAC."""
        self.refreshes = 0
        """Completed ``refresh()`` calls."""

    def ports(self) -> list[Port]:
        """Current ports, by vif."""
        return sorted(self._ports.values(), key=lambda p: p.vif)

    def refresh(self) -> tuple[list[Port], list[Port]]:
        """Ask the source again; (added, removed) since the previous call."""
        found = self.source.ports()
        wanted = [(port_identity(p), p.vif or None) for p in found]
        assigned = self.vifs.assign(wanted)
        current: dict[str, Port] = {}
        for port, (identity, _) in zip(found, wanted, strict=True):
            learned = self.macs.mac(port.name) if port.mac == 0 else 0
            current[port.name] = replace(port, vif=assigned[identity], mac=port.mac or learned)
        self._learning = {current[p.name].vif: p.name for p in found if p.mac == 0}
        self.macs.keep(set(self._learning.values()))
        added = [p for n, p in current.items() if self._ports.get(n) != p]
        removed = [p for n, p in self._ports.items() if current.get(n) != p]
        self._ports = current
        self.refreshes += 1
        return (sorted(added, key=lambda p: p.vif), sorted(removed, key=lambda p: p.vif))

    def learn_macs(self, batch: PortBatch, now: float) -> list[Port]:
        """Learn the VM MAC of the ports whose source gives none from the frames their VMs
        sent (``discovery_macs``); the ports whose MAC is new or changed (hand ``ports()``
        to ``Mirror.set_ports`` again). The vif does not change: it is keyed by the port
        name, the MAC being unknown to the source."""
        updated: list[Port] = []
        for name, mac in self.macs.observe(batch, now, self._learning).items():
            port = replace(self._ports[name], mac=mac)
            self._ports[name] = port
            updated.append(port)
        return updated


# --- construction from the collector config -------------------------------------------


def _static(node: Node, runner: CommandRunner, sysfs_root: str) -> PortDirectory:
    node.check_keys({"kind", "path"})
    return StaticSource(node.get("path").as_str())


def _libvirt(node: Node, runner: CommandRunner, sysfs_root: str) -> PortDirectory:
    node.check_keys({"kind", "path"})
    folder = node.get("path").as_str() if node.has("path") else None
    return LibvirtSource(folder=folder, runner=None if folder else runner)


def _names(node: Node, key: str, default: Sequence[str]) -> tuple[str, ...]:
    if not node.has(key):
        return tuple(default)
    return tuple(item.as_str() for item in node.get(key).items())


def _ovs(node: Node, runner: CommandRunner, sysfs_root: str) -> PortDirectory:
    node.check_keys({"kind", "uplinks"})
    return OvsSource(runner=runner, uplinks=_names(node, "uplinks", ()))


def _bridge(node: Node, runner: CommandRunner, sysfs_root: str) -> PortDirectory:
    node.check_keys({"kind", "bridges", "uplinks"})
    bridges = _names(node, "bridges", ())
    if not bridges:
        raise node.get("bridges").error("list at least one bridge")
    uplinks = _names(node, "uplinks", DEFAULT_UPLINKS)
    return BridgeSource(bridges, sysfs_root=sysfs_root, runner=runner, uplinks=uplinks)


SOURCE_KINDS: Final[dict[str, Callable[[Node, CommandRunner, str], PortDirectory]]] = {
    "static": _static,
    "libvirt": _libvirt,
    "ovs": _ovs,
    "bridge": _bridge,
}
"""``discovery.kind`` → factory (config node, command runner, sysfs root)."""


def source_from_config(
    node: Node, *, runner: CommandRunner = run_command, sysfs_root: str = "/sys"
) -> PortDirectory:
    """The source a ``discovery:`` config section describes."""
    kind = node.get("kind").as_str()
    factory = SOURCE_KINDS.get(kind)
    if factory is None:
        raise node.get("kind").error(
            f"unknown discovery kind {kind!r}; expected one of {', '.join(sorted(SOURCE_KINDS))}"
        )
    return factory(node, runner, sysfs_root)
