"""Discovery sources that ask the hypervisor: libvirt domain XML, Open vSwitch, Linux bridge.

Each is a ``PortDirectory`` returning ``Port``s with ``vif=0`` (``Discovery`` numbers them).
Commands go through a ``CommandRunner`` and files through a root path given to the
constructor, so tests replay recorded outputs and fake sysfs trees.

- ``LibvirtSource``: ``<name>``, ``<uuid>``, and per ``<interface>`` its ``<target dev>``
  (the port; interfaces without one, as in a shut-off domain, are skipped), ``<mac
  address>`` and ``<source bridge>``. The port-profile is the 802.1Qbh ``<virtualport>``
  ``profileid``, else the ``<source portgroup>``; an Open vSwitch ``<virtualport>``'s
  ``interfaceid`` is the interface's id (what libvirt writes as ``iface-id``).
- ``OvsSource``: ``ovs-vsctl --format=json list Interface``; a row is a VM port when its
  ``ofport`` is at least 1 and its ``external_ids`` say whose it is, as libvirt writes them
  (``virNetDevOpenvswitchAddPort``: ``attached-mac``, ``iface-id``, ``vm-id``,
  ``iface-status=active``, ``port-profile`` from the ``<virtualport>`` profileid) or
  OpenStack's os-vif (``vm-uuid`` for the instance) and OVN (``iface-id`` alone): the VM's
  UUID is ``vm-id`` or ``vm-uuid`` (canonical; a value that is not a UUID names the VM but
  is no UUID), the MAC ``attached-mac``, the interface's id ``iface-id``, the port-profile
  ``port-profile``. A row marked ``iface-status=inactive`` is skipped: Open vSwitch's
  convention for a second interface of the same ``iface-id`` that is not the one in use.
  The VM name is ``external_ids:vm-name`` if set, else the VM's id, else the port name.
- ``BridgeSource``: ports from ``<sysfs>/class/net/<bridge>/brif/``, ifindex from
  ``<sysfs>/class/net/<port>/ifindex``. A veth whose peer lives in a named network
  namespace is that namespace's VM (``ip -j link show`` → ``link_netnsid``, named by ``ip
  -j netns list-id`` or ``ip netns list``) and its MAC is the peer's (``ip -n NS -j
  link``); any other port is named after itself with MAC 0 (``Discovery`` learns it).
  Ports matching an uplink pattern are skipped.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

from vspan.errors import ConfigError
from vspan.inventory import Port

__all__ = [
    "DEFAULT_UPLINKS",
    "BridgeSource",
    "CommandRunner",
    "LibvirtSource",
    "OvsSource",
    "parse_domain_xml",
    "parse_ovs_interfaces",
    "run_command",
]

CommandRunner = Callable[[Sequence[str]], str]
"""Runs a command (argv) and returns its standard output; raises ``ConfigError`` on failure."""

COMMAND_TIMEOUT_S: Final = 10.0
DEFAULT_UPLINKS: Final = ("eth*", "en*", "bond*", "vxlan*", "geneve*", "gre*", "team*")
"""Bridge ports that are never VMs unless the config says otherwise."""
OVS_COMMAND: Final = ("ovs-vsctl", "--format=json", "list", "Interface")


def run_command(argv: Sequence[str]) -> str:
    """The default ``CommandRunner``: ``subprocess.run`` with a timeout."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT_S
        )
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip() or f"exit status {exc.returncode}"
        raise ConfigError(f"`{' '.join(argv)}` failed: {detail}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"`{' '.join(argv)}` failed: {exc}") from exc
    return done.stdout


def _mac(text: str) -> int | None:
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        return None
    try:
        return int("".join(parts), 16)
    except ValueError:
        return None


# --- libvirt --------------------------------------------------------------------------


def parse_domain_xml(text: str, origin: str) -> list[Port]:
    """The ports of one libvirt domain; errors name ``origin`` and the element."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConfigError(f"XML syntax: {exc}", path=origin, line=exc.position[0]) from exc
    if root.tag != "domain":
        raise ConfigError(f"root element <{root.tag}>, expected <domain>", path=origin)

    def text_of(tag: str) -> str:
        value = (root.findtext(tag) or "").strip()
        if not value:
            raise ConfigError(f"missing <{tag}>", path=origin, field=f"domain/{tag}")
        return value

    name = text_of("name")
    try:
        vm_uuid = str(uuidlib.UUID(text_of("uuid")))
    except ValueError:
        raise ConfigError(
            f"<uuid> {root.findtext('uuid')!r} is not a UUID", path=origin, field="domain/uuid"
        ) from None
    ports: list[Port] = []
    for i, iface in enumerate(root.findall("devices/interface"), start=1):
        where = f"domain/devices/interface[{i}]"
        dev = iface.find("target")
        if dev is None or not dev.get("dev"):
            continue  # not running: no host-side port exists
        mac_el = iface.find("mac")
        mac = _mac(mac_el.get("address", "")) if mac_el is not None else None
        if mac is None:
            got = None if mac_el is None else mac_el.get("address")
            raise ConfigError(
                f"expected <mac address='52:54:00:..'/>, got {got!r}", path=origin, field=where
            )
        source = iface.find("source")
        params = iface.find("virtualport/parameters")
        profile = params.get("profileid") if params is not None else None
        if profile is None and source is not None:
            profile = source.get("portgroup")
        bridge = source.get("bridge") if source is not None else None
        iface_id = params.get("interfaceid") if params is not None else None
        ports.append(Port(str(dev.get("dev")), 0, 0, mac, name, vm_uuid, profile, bridge, iface_id))
    return ports


class LibvirtSource:
    """Domains from ``*.xml`` files in ``folder``, or from ``virsh`` through ``runner``."""

    def __init__(self, *, folder: str | None = None, runner: CommandRunner | None = None) -> None:
        if (folder is None) == (runner is None):
            raise ValueError("LibvirtSource needs exactly one of folder or runner")
        self.folder = folder
        self.runner = runner

    def documents(self) -> list[tuple[str, str]]:
        """(origin, XML text) of every domain."""
        if self.folder is not None:
            try:
                files = sorted(Path(self.folder).glob("*.xml"))
                return [(str(f), f.read_text(encoding="utf-8")) for f in files]
            except OSError as exc:
                raise ConfigError(f"cannot read: {exc}", path=self.folder) from exc
        assert self.runner is not None
        names = self.runner(["virsh", "list", "--name"]).split()
        return [(f"virsh dumpxml {n}", self.runner(["virsh", "dumpxml", n])) for n in names]

    def ports(self) -> list[Port]:
        """Ports of every running domain; a port name seen twice is an error."""
        ports: list[Port] = []
        seen: dict[str, str] = {}
        for origin, text in self.documents():
            for port in parse_domain_xml(text, origin):
                if port.name in seen:
                    raise ConfigError(
                        f"port {port.name!r} also belongs to VM {seen[port.name]!r}", path=origin
                    )
                seen[port.name] = port.vm_name
                ports.append(port)
        return ports


# --- Open vSwitch ---------------------------------------------------------------------


def _ovs_value(value: Any) -> Any:
    """An OVSDB JSON atom or ``["uuid"|"set"|"map", …]`` as a Python value."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        kind, body = value
        if kind in ("uuid", "named-uuid"):
            return str(body)
        if kind == "set":
            return [_ovs_value(v) for v in body]
        if kind == "map":
            return {_ovs_value(k): _ovs_value(v) for k, v in body}
    return value


def parse_ovs_interfaces(
    text: str, origin: str = "ovs-vsctl", *, uplinks: Sequence[str] = ()
) -> list[Port]:
    """VM ports of an ``ovs-vsctl --format=json list Interface`` table."""
    try:
        doc = json.loads(text)
        headings = list(doc["headings"])
        rows = [dict(zip(headings, row, strict=True)) for row in doc["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"not an ovs-vsctl JSON table: {exc}", path=origin) from exc
    ports: list[Port] = []
    for i, raw in enumerate(rows):
        row = {key: _ovs_value(value) for key, value in raw.items()}
        name = row.get("name")
        ids = row.get("external_ids") or {}
        if not isinstance(name, str) or not isinstance(ids, dict):
            raise ConfigError(
                "row without a name or external_ids map", path=origin, field=f"data[{i}]"
            )
        ofport = row.get("ofport")
        if not isinstance(ofport, int) or ofport < 1:
            continue  # not attached to a bridge (empty set) or failed (-1)
        if any(fnmatchcase(name, pattern) for pattern in uplinks):
            continue
        vm_id = _text(ids.get("vm-id")) or _text(ids.get("vm-uuid"))
        iface_id, mac_text = _text(ids.get("iface-id")), _text(ids.get("attached-mac"))
        if vm_id is None and iface_id is None and mac_text is None:
            continue  # an internal, patch or tunnel port
        if ids.get("iface-status") == "inactive":
            continue  # not the interface in use for this iface-id (a migration under way)
        mac = _mac(mac_text) if mac_text is not None else 0
        if mac is None:
            raise ConfigError(
                f"attached-mac {mac_text!r} is not a MAC", path=origin, field=f"{name}.external_ids"
            )
        ifindex = row.get("ifindex")
        ports.append(
            Port(
                name=name,
                ifindex=ifindex if isinstance(ifindex, int) else 0,
                vif=0,
                mac=mac,
                vm_name=_text(ids.get("vm-name")) or vm_id or name,
                vm_uuid=_uuid(vm_id),
                profile=_text(ids.get("port-profile")),
                iface_id=iface_id,
            )
        )
    return ports


def _text(value: object) -> str | None:
    """An ``external_ids`` value: a non-empty string, else None."""
    return (value.strip() or None) if isinstance(value, str) else None


def _uuid(text: str | None) -> str | None:
    """``text`` as a canonical UUID; None when it is none."""
    try:
        return None if text is None else str(uuidlib.UUID(text))
    except ValueError:
        return None


class OvsSource:
    """VM ports of the local Open vSwitch."""

    def __init__(self, *, runner: CommandRunner = run_command, uplinks: Sequence[str] = ()) -> None:
        self.runner = runner
        self.uplinks = tuple(uplinks)

    def ports(self) -> list[Port]:
        """Rows of the ``Interface`` table that are VM ports."""
        text = self.runner(list(OVS_COMMAND))
        return parse_ovs_interfaces(text, " ".join(OVS_COMMAND), uplinks=self.uplinks)


# --- Linux bridge ---------------------------------------------------------------------

_NETNS_LINE: Final = re.compile(r"^(\S+)\s+\(id:\s*(\d+)\)")


class BridgeSource:
    """VM ports of Linux bridges: sysfs for the ports, ``ip`` for the VM side."""

    def __init__(
        self,
        bridges: Sequence[str],
        *,
        sysfs_root: str = "/sys",
        runner: CommandRunner = run_command,
        uplinks: Sequence[str] = DEFAULT_UPLINKS,
    ) -> None:
        self.bridges = tuple(bridges)
        self.sysfs_root = Path(sysfs_root)
        self.runner = runner
        self.uplinks = tuple(uplinks)

    def ports(self) -> list[Port]:
        """Every non-uplink port of the bridges, with its VM when one is found."""
        ports: list[Port] = []
        netns: dict[int, str] | None = None
        for bridge in self.bridges:
            brif = self.sysfs_root / "class" / "net" / bridge / "brif"
            try:
                names = sorted(entry.name for entry in brif.iterdir())
            except OSError as exc:
                raise ConfigError(f"bridge {bridge!r} not found: {exc}", path=str(brif)) from exc
            for name in names:
                if any(fnmatchcase(name, pattern) for pattern in self.uplinks):
                    continue
                ifindex = self._ifindex(name)
                if ifindex is None:
                    continue  # the port went away while we listed the bridge
                if netns is None:
                    netns = self._netns_names()
                vm_name, mac = self._vm_side(name, netns)
                ports.append(Port(name, ifindex, 0, mac, vm_name, bridge=bridge))
        return ports

    def _ifindex(self, name: str) -> int | None:
        try:
            return int((self.sysfs_root / "class" / "net" / name / "ifindex").read_text())
        except (OSError, ValueError):
            return None

    def _json(self, argv: Sequence[str]) -> Any:
        try:
            return json.loads(self.runner(argv) or "[]")
        except ValueError as exc:
            raise ConfigError(f"`{' '.join(argv)}` printed no JSON: {exc}") from exc

    def _netns_names(self) -> dict[int, str]:
        """netnsid → namespace name, from ``list-id`` and else ``ip netns list``."""
        names: dict[int, str] = {}
        for entry in self._json(["ip", "-j", "netns", "list-id"]) or []:
            if isinstance(entry, dict) and entry.get("name") and "nsid" in entry:
                names[int(entry["nsid"])] = str(entry["name"])
        for line in self.runner(["ip", "netns", "list"]).splitlines():
            if match := _NETNS_LINE.match(line.strip()):
                names.setdefault(int(match.group(2)), match.group(1))
        return names

    def _vm_side(self, port: str, netns: dict[int, str]) -> tuple[str, int]:
        """(VM name, VM MAC): the peer's namespace and MAC, else (port name, 0)."""
        try:
            links = self._json(["ip", "-j", "link", "show", port])
        except ConfigError:
            return port, 0  # gone meanwhile, or ip refused: learn later
        link = links[0] if isinstance(links, list) and links else {}
        nsid, peer = link.get("link_netnsid"), link.get("link_index")
        if not isinstance(nsid, int) or nsid not in netns:
            return port, 0
        namespace = netns[nsid]
        try:
            inside = self._json(["ip", "-n", namespace, "-j", "link"])
        except ConfigError:
            return namespace, 0
        for other in inside if isinstance(inside, list) else []:
            if isinstance(other, dict) and other.get("ifindex") == peer:
                return namespace, _mac(str(other.get("address", ""))) or 0
        return namespace, 0
