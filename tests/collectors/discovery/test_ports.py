"""Tests of inventory discovery: static YAML, libvirt XML, Open vSwitch JSON, Linux bridge
(fake sysfs and recorded ``ip`` outputs, plus one real bridge when root), and the
``Discovery`` component that numbers ports and reports changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.collectors.discovery.ports import (
    Discovery,
    StaticSource,
    source_from_config,
)
from vspan.collectors.discovery.sources import (
    BridgeSource,
    CommandRunner,
    LibvirtSource,
    OvsSource,
    parse_domain_xml,
    parse_ovs_interfaces,
    run_command,
)
from vspan.collectors.discovery.vifs import VifTable
from vspan.collectors.model import PortBatch
from vspan.errors import ConfigError
from vspan.inventory import Port
from vspan.yamlconf import load

UUID1 = "6f1c2d9e-0000-4000-8000-000000000001"
UUID2 = "6f1c2d9e-0000-4000-8000-000000000002"

# --- static ----------------------------------------------------------------------------

STATIC = f"""\
vms:
  - name: web-01
    uuid: {UUID1}
    profile: web
    nics:
      - port: vnet0
        mac: "52:54:00:00:00:01"
        vif: 7
        bridge: br0
      - port: vnet1
        mac: "52:54:00:00:00:02"
  - name: db-01
    nics:
      - {{port: vnet2, mac: "52:54:00:00:00:03"}}
"""


def test_static_source() -> None:
    assert StaticSource(text=STATIC).ports() == [
        Port("vnet0", 0, 7, 0x525400000001, "web-01", UUID1, "web", "br0"),
        Port("vnet1", 0, 0, 0x525400000002, "web-01", UUID1, "web"),
        Port("vnet2", 0, 0, 0x525400000003, "db-01"),
    ]


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("port: vnet1", "port: vnet0", 10, "port 'vnet0' already belongs to a VM"),
        ('"52:54:00:00:00:02"', '"52:54:00:00:00:01"', 11, "MAC already belongs to another NIC"),
        ("vif: 7", "vif: 4096", 8, "4096 out of range 1..4095"),
        ("bridge: br0", "bridg: br0", 9, "unknown field"),
        (f"uuid: {UUID1}", "uuid: nope", 3, "expected a UUID, got 'nope'"),
        ("name: db-01", "name: web-01", 12, "duplicate VM name 'web-01'"),
    ],
)
def test_static_errors_have_lines(old: str, new: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        StaticSource(text=STATIC.replace(old, new)).ports()
    assert info.value.line == line


def test_static_file_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "vms.yaml"
    path.write_text(STATIC)
    source = StaticSource(str(path))
    assert len(source.ports()) == 3
    path.write_text(STATIC.split("  - name: db-01", maxsplit=1)[0])
    assert len(source.ports()) == 2


# --- libvirt ---------------------------------------------------------------------------

DOMAIN = f"""<domain type='kvm' id='3'>
  <name>web-01</name>
  <uuid>{UUID1.upper()}</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:01'/>
      <source bridge='br0'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:02'/>
      <source bridge='br1'/>
      <virtualport type='802.1Qbh'><parameters profileid='finance'/></virtualport>
      <target dev='vnet1'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:00:00:03'/>
      <source network='default' portgroup='web'/>
      <target dev='vnet2'/>
    </interface>
  </devices>
</domain>
"""
SHUT_OFF = f"""<domain type='kvm'>
  <name>db-01</name>
  <uuid>{UUID2}</uuid>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:09'/>
      <source bridge='br0'/>
    </interface>
  </devices>
</domain>
"""


def test_domain_xml() -> None:
    assert parse_domain_xml(DOMAIN, "web.xml") == [
        Port("vnet0", 0, 0, 0x525400000001, "web-01", UUID1, None, "br0"),
        Port("vnet1", 0, 0, 0x525400000002, "web-01", UUID1, "finance", "br1"),
        Port("vnet2", 0, 0, 0x525400000003, "web-01", UUID1, "web", None),
    ]
    assert parse_domain_xml(SHUT_OFF, "db.xml") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            DOMAIN.replace("<mac address='52:54:00:00:00:02'/>", ""),
            "web.xml: domain/devices/interface[2]: expected <mac address='52:54:00:..'/>, got None",
        ),
        (
            DOMAIN.replace("52:54:00:00:00:03", "52:54:00:00:03"),
            "web.xml: domain/devices/interface[3]: expected <mac address='52:54:00:..'/>, got '52:54:00:00:03'",
        ),
        (
            DOMAIN.replace(f"<uuid>{UUID1.upper()}</uuid>", ""),
            "web.xml: domain/uuid: missing <uuid>",
        ),
        (DOMAIN.replace(UUID1.upper(), "xyz"), "web.xml: domain/uuid: <uuid> 'xyz' is not a UUID"),
        (
            DOMAIN.replace("<name>web-01</name>", "<name> </name>"),
            "web.xml: domain/name: missing <name>",
        ),
        ("<network><name>x</name></network>", "web.xml: root element <network>, expected <domain>"),
        (DOMAIN.replace("</devices>", ""), "web.xml:24: XML syntax: mismatched tag"),
    ],
)
def test_domain_xml_errors_name_file_and_element(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_domain_xml(text, "web.xml")
    assert str(info.value).startswith(message)


def test_libvirt_folder_and_virsh(tmp_path: Path) -> None:
    (tmp_path / "web.xml").write_text(DOMAIN)
    (tmp_path / "db.xml").write_text(SHUT_OFF)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in LibvirtSource(folder=str(tmp_path)).ports()] == [
        "vnet0",
        "vnet1",
        "vnet2",
    ]
    outputs = {
        ("virsh", "list", "--name"): "web-01\ncopy\n\n",
        ("virsh", "dumpxml", "web-01"): DOMAIN,
        ("virsh", "dumpxml", "copy"): DOMAIN.replace("web-01", "copy").replace(
            UUID1.upper(), UUID2
        ),
    }
    source = LibvirtSource(runner=recorded(outputs))
    with pytest.raises(
        ConfigError, match=r"^virsh dumpxml copy: port 'vnet0' also belongs to VM 'web-01'$"
    ):
        source.ports()


# --- Open vSwitch ----------------------------------------------------------------------

OVS_HEADINGS = ["_uuid", "external_ids", "ifindex", "mac_in_use", "name", "ofport", "type"]


def ovs_row(
    name: str, ofport: object, ids: dict[str, str], kind: str = "", ifindex: object = 9
) -> list[object]:
    return [
        ["uuid", str(uuid.uuid5(uuid.NAMESPACE_DNS, name))],
        ["map", [[k, v] for k, v in ids.items()]],
        ifindex,
        "fe:54:00:00:00:01",
        name,
        ofport,
        kind,
    ]


OVS = json.dumps(
    {
        "data": [
            ovs_row(
                "vnet0",
                1,
                {
                    "attached-mac": "52:54:00:00:00:01",
                    "iface-id": "p-1",
                    "iface-status": "active",
                    "vm-uuid": UUID1,
                },
                ifindex=12,
            ),
            ovs_row("br-int", 65534, {}, "internal"),
            ovs_row("vxlan0", 2, {}, "vxlan"),
            ovs_row("vnet9", -1, {"vm-uuid": UUID2}),
            ovs_row("vnet8", ["set", []], {"vm-uuid": UUID2}, ifindex=["set", []]),
            ovs_row("eth1", 3, {"attached-mac": "52:54:00:00:00:05"}),
            ovs_row("tap4", 4, {"vm-uuid": UUID2, "vm-name": "db-01"}, ifindex=["set", []]),
        ],
        "headings": OVS_HEADINGS,
    }
)


def test_ovs_interfaces() -> None:
    assert parse_ovs_interfaces(OVS, uplinks=["eth*"]) == [
        Port("vnet0", 12, 0, 0x525400000001, UUID1, UUID1, iface_id="p-1"),
        Port("tap4", 0, 0, 0, "db-01", UUID2),
    ]
    assert [p.name for p in parse_ovs_interfaces(OVS)] == ["vnet0", "eth1", "tap4"]
    source = OvsSource(runner=recorded({("ovs-vsctl", "--format=json", "list", "Interface"): OVS}))
    assert len(source.ports()) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "ovs-vsctl: not an ovs-vsctl JSON table"),
        ('{"data": [[1]], "headings": ["a", "b"]}', "ovs-vsctl: not an ovs-vsctl JSON table"),
        (
            OVS.replace("52:54:00:00:00:01", "zz"),
            "ovs-vsctl: vnet0.external_ids: attached-mac 'zz' is not a MAC",
        ),
    ],
)
def test_ovs_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_ovs_interfaces(text)
    assert str(info.value).startswith(message)


# --- Linux bridge, fake sysfs and recorded commands ------------------------------------


def recorded(outputs: dict[tuple[str, ...], str]) -> CommandRunner:
    def run(argv: Sequence[str]) -> str:
        key = tuple(argv)
        if key not in outputs:
            raise ConfigError(f"`{' '.join(argv)}` failed: not recorded")
        return outputs[key]

    return run


def sysfs(root: Path, bridge: str, ports: dict[str, int | None]) -> None:
    brif = root / "class" / "net" / bridge / "brif"
    brif.mkdir(parents=True)
    for name, ifindex in ports.items():
        (brif / name).mkdir()
        if ifindex is not None:
            (root / "class" / "net" / name).mkdir(parents=True)
            (root / "class" / "net" / name / "ifindex").write_text(f"{ifindex}\n")


IP_OUTPUTS = {
    ("ip", "-j", "netns", "list-id"): '[{"nsid":0,"name":"web-ns"},{"nsid":1}]',
    ("ip", "netns", "list"): "web-ns (id: 0)\nother-ns (id: 1)\nidle-ns\n",
    ("ip", "-j", "link", "show", "veth-web"): json.dumps(
        [{"ifindex": 21, "link_index": 2, "ifname": "veth-web", "link_netnsid": 0}]
    ),
    ("ip", "-n", "web-ns", "-j", "link"): json.dumps(
        [
            {"ifindex": 1, "ifname": "lo", "address": "00:00:00:00:00:00"},
            {"ifindex": 2, "ifname": "eth0", "address": "52:54:00:aa:bb:cc", "link_netnsid": 0},
        ]
    ),
    ("ip", "-j", "link", "show", "veth-other"): json.dumps(
        [{"ifindex": 23, "link_index": 5, "ifname": "veth-other", "link_netnsid": 1}]
    ),
    ("ip", "-j", "link", "show", "tap0"): json.dumps([{"ifindex": 22, "ifname": "tap0"}]),
}


def test_bridge_ports_from_sysfs_and_netns(tmp_path: Path) -> None:
    sysfs(tmp_path, "br0", {"veth-web": 21, "tap0": 22, "veth-other": 23, "eth0": 2, "gone0": None})
    source = BridgeSource(["br0"], sysfs_root=str(tmp_path), runner=recorded(IP_OUTPUTS))
    assert source.ports() == [
        Port("tap0", 22, 0, 0, "tap0", bridge="br0"),  # no peer namespace: learned later
        Port("veth-other", 23, 0, 0, "other-ns", bridge="br0"),  # netns unreachable
        Port("veth-web", 21, 0, 0x525400AABBCC, "web-ns", bridge="br0"),
    ]
    everything = BridgeSource(
        ["br0"], sysfs_root=str(tmp_path), runner=recorded(IP_OUTPUTS), uplinks=()
    )
    assert [p.name for p in everything.ports()] == ["eth0", "tap0", "veth-other", "veth-web"]


def test_missing_bridge(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bridge 'br9' not found"):
        BridgeSource(["br9"], sysfs_root=str(tmp_path), runner=recorded({})).ports()


# --- Discovery -------------------------------------------------------------------------


class FakeSource:
    def __init__(self, ports: list[Port]) -> None:
        self.current = ports

    def ports(self) -> list[Port]:
        return list(self.current)


def test_refresh_reports_added_and_removed(tmp_path: Path) -> None:
    a = Port("vnet0", 1, 0, 0x525400000001, "web", UUID1)
    b = Port("veth1", 2, 0, 0, "ns1")
    s = Port("vnet5", 3, 40, 0x525400000005, "static")
    source = FakeSource([a, b, s])
    disco = Discovery(source, VifTable(tmp_path))
    added, removed = disco.refresh()
    assert [(p.name, p.vif) for p in added] == [("vnet0", 1), ("veth1", 2), ("vnet5", 40)]
    assert removed == []
    assert disco.refresh() == ([], [])
    source.current = [b, s]
    assert disco.refresh() == ([], [Port("vnet0", 1, 1, 0x525400000001, "web", UUID1)])
    moved = Port("vnet7", 9, 0, 0x525400000001, "web", UUID1)  # the VM is back on a new port
    source.current = [b, s, moved]
    added, removed = disco.refresh()
    assert (added, removed) == ([Port("vnet7", 9, 1, 0x525400000001, "web", UUID1)], [])
    restarted = Discovery(source, VifTable(tmp_path))
    assert [(p.name, p.vif) for p in restarted.refresh()[0]] == [
        ("vnet7", 1),
        ("veth1", 2),
        ("vnet5", 40),
    ]
    assert [p.vif for p in restarted.ports()] == [1, 2, 40]


def test_learn_macs_from_frames_the_vm_sent(tmp_path: Path) -> None:
    source = FakeSource(
        [Port("veth1", 2, 0, 0, "ns1"), Port("vnet0", 1, 0, 0x525400000001, "web", UUID1)]
    )
    disco = Discovery(source, VifTable(tmp_path))
    disco.refresh()
    frame = bytes.fromhex("ffffffffffff02000000beef0806") + bytes(28)
    other = bytes.fromhex("ffffffffffff02000000dead0806") + bytes(28)
    bogus = bytes.fromhex("ffffffffffff0300000000010806") + bytes(28)  # a group source MAC
    batch = PortBatch(
        FrameBatch.from_frames([other, bogus, frame, other]),
        np.array([1, 1, 1, 1], np.uint16),
        np.array([False, True, True, True]),
    )
    (learned,) = disco.learn_macs(batch, 0.0)
    assert (learned.name, learned.vif, learned.mac) == ("veth1", 1, 0x02000000BEEF)
    assert disco.learn_macs(batch, 1.0) == []  # learned: the first MAC it sent from stays
    assert disco.refresh() == ([], [])  # the source still says 0; the learned MAC stays
    assert {p.name: p.mac for p in disco.ports()}["veth1"] == 0x02000000BEEF


def test_source_from_config(tmp_path: Path) -> None:
    (tmp_path / "vms.yaml").write_text(STATIC)
    static = source_from_config(load(f"kind: static\npath: {tmp_path / 'vms.yaml'}\n", "c"))
    assert len(static.ports()) == 3
    libvirt = source_from_config(load(f"kind: libvirt\npath: {tmp_path}\n", "c"))
    assert isinstance(libvirt, LibvirtSource)
    assert isinstance(source_from_config(load("kind: libvirt\n", "c")), LibvirtSource)
    assert isinstance(source_from_config(load("kind: ovs\nuplinks: [eth0]\n", "c")), OvsSource)
    bridge = source_from_config(load("kind: bridge\nbridges: [br0]\n", "c"), sysfs_root="/x")
    assert isinstance(bridge, BridgeSource)
    assert (bridge.bridges, bridge.sysfs_root, bridge.uplinks[0]) == (("br0",), Path("/x"), "eth*")
    with pytest.raises(
        ConfigError, match=r"^c:2: kind: unknown discovery kind 'xen'; expected one of"
    ):
        source_from_config(load("\nkind: xen\n", "c"))
    with pytest.raises(ConfigError, match=r"^c:1: bridges: list at least one bridge$"):
        source_from_config(load("bridges: []\nkind: bridge\n", "c"))


def test_run_command_wraps_failures() -> None:
    assert run_command(["echo", "hi"]) == "hi\n"
    with pytest.raises(ConfigError, match=r"^`false` failed: exit status 1$"):
        run_command(["false"])
    with pytest.raises(ConfigError, match=r"^`/nonexistent/vspan` failed: "):
        run_command(["/nonexistent/vspan"])


# --- a real bridge (root) ---------------------------------------------------------------


@pytest.fixture
def real_bridge() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    tag = uuid.uuid4().hex[:5]
    names = {
        "ns": f"vsp-vm-{tag}",
        "br": f"vspbr{tag}",
        "host": f"vsph{tag}",
        "guest": f"vspg{tag}",
        "up": f"vspu{tag}",
        "up_peer": f"vspv{tag}",
    }

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", names["ns"])
        ip("link", "add", names["br"], "type", "bridge")
        ip("link", "add", names["host"], "type", "veth", "peer", "name", names["guest"])
        ip("link", "set", names["guest"], "netns", names["ns"])
        ip("-n", names["ns"], "link", "set", names["guest"], "address", "02:00:00:12:34:56")
        ip("link", "set", names["host"], "master", names["br"])
        ip("link", "add", names["up"], "type", "veth", "peer", "name", names["up_peer"])
        ip("link", "set", names["up"], "master", names["br"])
        yield names
    finally:
        for args in (
            ("link", "del", names["host"]),
            ("link", "del", names["up"]),
            ("link", "del", names["br"]),
            ("netns", "del", names["ns"]),
        ):
            subprocess.run(["ip", *args], capture_output=True, timeout=10, check=False)


@pytest.mark.root
def test_real_bridge_with_a_veth_in_a_namespace(real_bridge: dict[str, str]) -> None:
    source = BridgeSource([real_bridge["br"]], uplinks=[real_bridge["up"]])
    ifindex = int(Path(f"/sys/class/net/{real_bridge['host']}/ifindex").read_text())
    assert source.ports() == [
        Port(
            real_bridge["host"],
            ifindex,
            0,
            0x020000123456,
            real_bridge["ns"],
            bridge=real_bridge["br"],
        )
    ]
