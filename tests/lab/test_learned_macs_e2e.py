"""VMs a collector finds behind a Linux bridge without their MAC reach the analyzer with it.

The lab: 2 hosts × 2 VMs and a management network (``vspan_testing.netlab``), every VM's
namespace without a name (``vspan_testing.hidden_netns``: like a container's, or a QEMU tap),
so the bridge collector names each VM after its port and must learn its MAC from the
traffic. The README's deployment, no inventory file, tokens on::

    vspan analyze --udp 10.99.0.254:0 --tcp off --http 10.99.0.254:0 --tokens T \\
        --data-dir D --idle-timeout 2
    vspan collect --bridge br0 --uplink up-hX --uplink mgmt0 --analyzer 10.99.0.254:PORT \\
        --control http://10.99.0.254:HTTP --control-token TOKEN --collector-id N --host-name hX

The truth the test has on its own: each VM's MAC as ``ip link`` shows it inside the VM's
namespace, which VM is on which host, and the datagrams it sends. Checked: after the VMs
talk, ``/api/v1/vms`` shows exactly those MACs for those VM names — also for a VM that then
sends from a second MAC (a macvlan: the first MAC it sent from stays its MAC); and the flows,
read from the store after ``kill -9``, are each there once with the VM names on both sides,
exact packets and bytes both ways, the scope and the observing host — also the macvlan's
cross-host flow, which no registration names (on main, a cross-host flow of such VMs was
two flows, one per observing host, each naming one VM).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.store.store import Store
from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.hidden_netns import HiddenVm, hide
from vspan_testing.netlab import CollectorProcess, Lab, Mgmt, in_netns, make_lab

pytestmark = pytest.mark.root

CID = {"h1": 11, "h2": 22}
UPLINK = {"h1": "up-h2", "h2": "up-h1"}
READ = "learned-macs-read-0123456789"
TOKEN = {host: f"learned-macs-collector-{cid}-0123" for host, cid in CID.items()}
IDLE_S = 2.0
FRAME = 14 + 20 + 8 + 6  # Ethernet, IPv4 and UDP headers, and the VN-Tag
MACVLAN = ("mv0", "02:77:00:00:01:65", "10.77.1.101")
"""A second interface of VM h1v1 (name, MAC, address), a macvlan on its eth0."""


@dataclass
class Site:
    lab: Lab
    mgmt: Mgmt
    vms: dict[str, HiddenVm]
    analyzer: AnalyzerProcess
    data: Path
    collectors: dict[str, CollectorProcess]

    def api(self, path: str) -> Any:
        ask = urllib.request.Request(
            self.analyzer.api + path, headers={"Authorization": f"Bearer {READ}"}
        )
        with in_netns(self.mgmt.ns), urllib.request.urlopen(ask, timeout=10) as answer:
            return json.loads(answer.read())

    def vm_macs(self) -> dict[str, list[str]]:
        """VM name → its vifs' MACs, as ``GET /api/v1/vms`` shows them."""
        return {vm["name"]: [v["mac"] for v in vm["vifs"]] for vm in self.api("/api/v1/vms")["vms"]}

    def logs(self) -> str:
        parts = [f"----- {h}:\n{c.stderr()}" for h, c in self.collectors.items()]
        return "\n".join([*parts, f"----- analyze:\n{self.analyzer.stderr()}"])


def wait_for(done: Callable[[], Any], timeout: float) -> Any:
    """``done()``'s first true value, or its last false one after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := done()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    lab = make_lab(request, "vslm", hosts=2, vms_per_host=2)
    mgmt = lab.add_mgmt()
    lab.wait_links_up()
    vms = {name: hide(lab, vm) for name, vm in lab.vms.items()}
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        f"{READ}: read\n" + "".join(f"{TOKEN[h]}: collector:{c}\n" for h, c in CID.items())
    )
    addr = f"{mgmt.ip}:0"
    args = ["--udp", addr, "--tcp", "off", "--http", addr, "--tokens", str(tokens),
            "--data-dir", str(tmp_path / "data"), "--idle-timeout", str(IDLE_S)]  # fmt: skip
    analyzer = AnalyzerProcess(
        args, stderr_path=tmp_path / "analyze.stderr",
        spawn=lambda argv, **popen: lab.spawn(mgmt.ns, *argv, **popen),
    )  # fmt: skip
    site = Site(lab, mgmt, vms, analyzer, tmp_path / "data", {})
    try:
        analyzer.wait_started(120)
        assert analyzer.udp is not None
        for host, cid in CID.items():
            extra = ("--control", analyzer.api, "--control-token", TOKEN[host])
            site.collectors[host] = CollectorProcess(
                lab, mgmt, host, cid=cid, uplink=UPLINK[host], port=analyzer.udp[1],
                workdir=tmp_path, extra=extra,
            )  # fmt: skip
        registered = wait_for(lambda: len(site.api("/api/v1/control/inventory")["vms"]) == 4, 60)
        assert registered, site.logs()
        yield site
    finally:
        analyzer.kill()
        for proc in site.collectors.values():
            proc.stop()
        print(site.logs())


@dataclass
class Sent:
    """A UDP flow the test made: ``a`` sent first; packets and bytes each way."""

    a: HiddenVm
    b: HiddenVm
    a_ip: str
    a_port: int
    b_port: int
    packets: int
    bytes: int
    packets_rev: int
    bytes_rev: int


def udp_exchange(a: HiddenVm, b: HiddenVm, port: int, sizes: list[int], replies: list[int],
                 *, device: str | None = None, a_ip: str | None = None) -> Sent:  # fmt: skip
    """``a`` sends datagrams of ``sizes`` to ``b``:``port`` (from ``device`` and ``a_ip``
    when given), ``b`` answers with ``replies``."""
    src_ip = a_ip or a.vm.ip
    with (
        b.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        a.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        if device is not None:
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        rx.bind((b.vm.ip, port))
        tx.bind((src_ip, 0))
        rx.settimeout(5)
        tx.settimeout(5)
        a_port = tx.getsockname()[1]
        for n in sizes:
            tx.sendto(bytes(n), (b.vm.ip, port))
            assert len(rx.recv(65536)) == n, "the lab lost a datagram"
        for n in replies:
            rx.sendto(bytes(n), (src_ip, a_port))
            assert len(tx.recv(65536)) == n, "the lab lost a datagram"
    return Sent(a, b, src_ip, a_port, port, len(sizes), sum(n + FRAME for n in sizes),
                len(replies), sum(n + FRAME for n in replies))  # fmt: skip


def test_bridge_vms_get_their_learned_macs_and_flows_name_both_sides(site: Site) -> None:
    vms = site.vms
    truth = {vm.vm.port: [vm.link_mac()] for vm in vms.values()}  # what `ip link` says
    problems: list[str] = []
    # Every VM talks (one host's pair, then across): the collectors learn their MACs.
    for a, b, port in (("h1v1", "h1v2", 7001), ("h2v1", "h2v2", 7002), ("h1v2", "h2v1", 7003),
                       ("h2v2", "h1v1", 7004)):  # fmt: skip
        udp_exchange(vms[a], vms[b], port, [30], [30])
    shown = wait_for(lambda: (got := site.vm_macs()) == truth and got, 20) or site.vm_macs()
    if shown != truth:
        problems.append(f"/api/v1/vms MACs {shown}, expected {truth} (ip link)")
    # VM h1v1 gets a second MAC, a macvlan, and sends from it: its MAC stays eth0's.
    h1v1 = vms["h1v1"]
    name, mac, ip = MACVLAN
    h1v1.run("ip", "link", "add", name, "link", "eth0", "address", mac, "type", "macvlan",
             "mode", "bridge")  # fmt: skip
    h1v1.run("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")  # mv0 answers for its address
    h1v1.run("ip", "addr", "add", f"{ip}/16", "dev", name)
    h1v1.run("ip", "link", "set", name, "up")
    udp_exchange(h1v1, vms["h2v2"], 7005, [30], [30], device=name, a_ip=ip)  # warm: ARP
    # The flows checked: every MAC is known by now, the macvlan's only from the tags.
    flows = [
        udp_exchange(vms["h1v1"], vms["h1v2"], 7101, [100, 200, 300], [50, 1400]),
        udp_exchange(vms["h1v2"], vms["h2v1"], 7102, [400, 20, 1200, 33], [77, 500]),
        udp_exchange(vms["h2v2"], vms["h1v1"], 7103, [60, 70], [80, 90, 1000]),
        udp_exchange(h1v1, vms["h2v2"], 7104, [222, 333, 44], [555, 66], device=name, a_ip=ip),
    ]
    time.sleep(2 * IDLE_S)  # a refresh (2 s): a MAC that would replace eth0's is registered
    shown = site.vm_macs()
    if shown != truth:
        problems.append(f"after the macvlan: /api/v1/vms MACs {shown}, expected {truth}")
    several = site.collectors["h1"].stderr().count("port vm-h1v1: its VM sends from several")
    if several != 1:
        problems.append(f"h1's collector said {several} times that vm-h1v1 has several MACs")
    wanted = {(f.a_ip, f.a_port, f.b.vm.ip, f.b_port) for f in flows}

    def closed() -> bool:
        stored = site.api("/api/v1/flows?limit=1000")["flows"]
        done = {(f["src_ip"], f["src_port"], f["dst_ip"], f["dst_port"]) for f in stored
                if f.get("state") == "closed"}  # fmt: skip
        return wanted <= done

    wait_for(closed, IDLE_S + 10)
    site.analyzer.kill()  # SIGKILL: what is not stored now never will be
    with Store(site.data, read_only=True) as store:
        rows = store.query_flows(limit=None)
    problems += check_flows(rows, flows)
    assert not problems, "\n".join(problems)


def check_flows(rows: pd.DataFrame, flows: list[Sent]) -> list[str]:
    problems = []
    for flow in flows:
        a, b = flow.a.vm, flow.b.vm
        mine = rows[
            (rows["proto"] == 17)
            & (((rows["src_port"] == flow.a_port) & (rows["dst_port"] == flow.b_port))
               | ((rows["src_port"] == flow.b_port) & (rows["dst_port"] == flow.a_port)))
        ]  # fmt: skip
        what = f"udp {a.name}({flow.a_ip}):{flow.a_port} -> {b.name}:{flow.b_port}"
        if len(mine) != 1:
            shown = mine[["src_vm", "dst_vm", "host", "packets", "packets_rev", "scope"]]
            problems.append(f"{what}: {len(mine)} flows in the store, expected 1:\n{shown}")
            continue
        row = mine.iloc[0]
        cross = a.host != b.host
        want = {
            "src_ip": flow.a_ip, "dst_ip": b.ip, "src_vm": a.port, "dst_vm": b.port,
            "src_host": a.host, "dst_host": b.host, "host": a.host,
            "scope": "cross-host" if cross else "intra-host",
            "packets": flow.packets, "bytes": flow.bytes,
            "packets_rev": flow.packets_rev, "bytes_rev": flow.bytes_rev,
            "copies": (flow.packets + flow.packets_rev) * (2 if cross else 1),
        }  # fmt: skip
        got = {k: _plain(row[k]) for k in want}
        if got != want:
            problems.append(f"{what}: (stored, expected) "
                            f"{ {k: (got[k], v) for k, v in want.items() if got[k] != v} }")  # fmt: skip
    return problems


def _plain(value: Any) -> Any:
    if value is None or (not isinstance(value, list | np.ndarray) and pd.isna(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return str(value) if isinstance(value, uuid.UUID) else value
