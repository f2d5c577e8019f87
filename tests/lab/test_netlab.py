"""The lab itself: topology, reachability across hosts, switching namespaces, teardown."""

from __future__ import annotations

import socket

import pytest

from vspan_testing.netlab import Lab, in_netns, lab_unavailable

pytestmark = pytest.mark.root


def test_topology_and_reachability(lab: Lab) -> None:
    assert sorted(lab.vms) == ["h1v1", "h1v2", "h1v3", "h2v1", "h2v2", "h2v3"]
    vm = lab.vm("h1v2")
    assert (vm.mac, vm.ip, vm.ip6, vm.port) == (
        "02:77:00:00:01:02",
        "10.77.1.2",
        "fd77::1:2",
        "vm-h1v2",
    )
    assert all(len(name) <= 15 for name in ("vm-h1v2", "up-h2", "br0", "eth0"))
    links = lab.run(vm.host_ns, "ip", "-o", "link", "show", "master", "br0").stdout
    assert f"{vm.ifindex}: vm-h1v2@" in links
    assert "up-h2@" in links
    mac = lab.run(vm.ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
    assert mac == vm.mac
    assert lab.ping("h1v1", lab.vm("h1v3").ip, 3) == 3  # same host
    assert lab.ping("h1v1", lab.vm("h2v2").ip, 3) == 3  # across the underlay


def test_in_netns_switches_only_the_block(lab: Lab) -> None:
    outside = {name for _, name in socket.if_nameindex()}
    with in_netns(lab.hosts["h1"]):
        inside = {name for _, name in socket.if_nameindex()}
    assert {"br0", "vm-h1v1", "up-h2"} <= inside
    assert {name for _, name in socket.if_nameindex()} == outside


def test_teardown_after_a_failure_deletes_everything() -> None:
    if (reason := lab_unavailable()) is not None:
        pytest.skip(reason)
    lab = Lab("vslab", hosts=2, vms_per_host=1)
    made: list[str] = []

    def fail() -> None:
        with lab:
            made.extend(lab.namespaces())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert len(made) == 4
    assert lab.namespaces() == []


def test_add_and_remove_vm(lab: Lab) -> None:
    vm = lab.add_vm("h2")
    assert vm.name == "h2v4"
    assert vm.ns in lab.namespaces()
    lab.remove_vm("h2v4")
    assert vm.ns not in lab.namespaces()
    links = lab.run(vm.host_ns, "ip", "-o", "link").stdout
    assert "vm-h2v4" not in links
