"""Open vSwitch ports created the way libvirt, OpenStack and OVN create them, discovered from
``ovs-vsctl --format=json list Interface``: recorded output (``data/README.md``), and a
real Open vSwitch (userspace datapath, private database) where it can run.

Regression (issue 17, point 1): libvirt writes the domain UUID as ``external_ids:vm-id``,
not ``vm-uuid``; its ports were discovered as UUID-less VMs named after the port, and
``iface-id`` (the interface's own id) was never used.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vspan.collectors.discovery.ports import Discovery, source_from_config
from vspan.collectors.discovery.sources import OvsSource, parse_ovs_interfaces
from vspan.collectors.discovery.vifs import VifTable, port_identity
from vspan.inventory import Port
from vspan.yamlconf import load
from vspan_testing.ovs import OvsSwitch, ovs_unavailable

RECORDED = (Path(__file__).parent.parent / "data" / "ovs-list-interface-libvirt.json").read_text()
DOMAIN = "c7a5fdbd-edaf-9455-926a-d65c16db1809"  # vm-id of vnet0 and vnet1
INSTANCE = "8e2f1a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"  # vm-uuid (OpenStack) of the tap

EXPECTED = {  # port: (VM name, VM UUID, MAC, iface-id, profile); from data/README.md
    "vnet0": (DOMAIN, DOMAIN, 0x5254006B3C01, "1f0e8a6c-4b5d-4e2f-9a3b-7c6d5e4f3a21", "web"),
    "vnet1": (DOMAIN, DOMAIN, 0x5254006B3C02, "2a7d4c1e-8f3b-4a6d-b5c9-0e1f2a3b4c5d", None),
    "vnet3": ("vnet3", None, 0x0A580AF40005, "default_web-7d4f9", None),
    "tapd2b1c3e4-0f": (
        INSTANCE, INSTANCE, 0xFA163E5A6B7C, "d2b1c3e4-0f5a-4b6c-8d7e-9f0a1b2c3d4e", None,
    ),
}  # fmt: skip


def summary(ports: list[Port]) -> dict[str, tuple[object, ...]]:
    return {p.name: (p.vm_name, p.vm_uuid, p.mac, p.iface_id, p.profile) for p in ports}


def test_libvirt_openstack_and_ovn_ports_keep_their_identities() -> None:
    ports = parse_ovs_interfaces(RECORDED, uplinks=["eth*"])
    # vnet2 is iface-status=inactive, vnet9 has no device (ofport -1), eth1 the uplink,
    # br0 and mgmt0 are internal ports without external_ids.
    assert summary(ports) == EXPECTED
    assert all(p.ifindex > 0 and p.vif == 0 for p in ports)


def test_a_vm_id_that_is_not_a_uuid_names_the_vm_but_is_no_uuid() -> None:
    text = RECORDED.replace(DOMAIN, "instance-0000002a")
    ports = {p.name: p for p in parse_ovs_interfaces(text, uplinks=["eth*"])}
    assert (ports["vnet0"].vm_name, ports["vnet0"].vm_uuid) == ("instance-0000002a", None)
    upper = RECORDED.replace(DOMAIN, DOMAIN.upper())
    assert parse_ovs_interfaces(upper, uplinks=["eth*"])[0].vm_uuid == DOMAIN


def test_the_vif_of_a_port_follows_its_vm_and_interface_not_its_name(tmp_path: Path) -> None:
    ports = {p.name: p for p in parse_ovs_interfaces(RECORDED, uplinks=["eth*"])}
    assert port_identity(ports["vnet0"]) == f"vm:{DOMAIN}/5254006b3c01"
    assert port_identity(ports["vnet3"]) == "iface:default_web-7d4f9"
    # The OVN port comes back under another name (recreated after a restart of the pod):
    # it keeps its vif.
    first = Discovery(OvsSource(runner=lambda argv: RECORDED, uplinks=["eth*"]), VifTable(tmp_path))
    first.refresh()
    vif = {p.name: p.vif for p in first.ports()}
    renamed = RECORDED.replace('"vnet3"', '"vnet7"')
    again = Discovery(OvsSource(runner=lambda argv: renamed, uplinks=["eth*"]), VifTable(tmp_path))
    again.refresh()
    assert {p.name: p.vif for p in again.ports()}["vnet7"] == vif["vnet3"]


# --- a real Open vSwitch ------------------------------------------------------------------


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[OvsSwitch]:
    reason = ovs_unavailable()
    if reason is not None:
        pytest.skip(f"Open vSwitch cannot run here: {reason}")
    with OvsSwitch(tmp_path / "ovs") as opened:
        yield opened


@pytest.mark.root
def test_a_real_open_vswitch_with_ports_added_like_libvirt(switch: OvsSwitch) -> None:
    vm = str(uuid.uuid4())
    ifaces = [str(uuid.uuid4()) for _ in range(2)]
    macs = ["52:54:00:7a:00:01", "52:54:00:7a:00:02"]
    for k in range(2):
        switch.add_veth_port(
            f"vnet{k}", attached_mac=macs[k], iface_id=ifaces[k], vm_id=vm,
            profile="db" if k == 0 else None,
        )  # fmt: skip
    switch.add_veth_port("eth9")  # an uplink: no external_ids
    source = source_from_config(load("kind: ovs\nuplinks: [eth*]\n", "c"), runner=switch.runner)
    ports = sorted(source.ports(), key=lambda p: p.name)
    assert [(p.name, p.vm_name, p.vm_uuid, p.mac, p.iface_id, p.profile) for p in ports] == [
        ("vnet0", vm, vm, 0x5254007A0001, ifaces[0], "db"),
        ("vnet1", vm, vm, 0x5254007A0002, ifaces[1], None),
    ]
    assert all(p.ifindex == switch.ifindex(p.name) for p in ports)
