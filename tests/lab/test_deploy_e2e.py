"""The README's deployment path in the namespace lab, checked in the store.

Two hosts (network namespaces), two VMs each (namespaces behind veth ports), a management
network (``vspan_testing.netlab``). No inventory file: the analyzer learns the hosts and VMs
from the collectors' registrations. In the management namespace, the real command::

    vspan analyze --udp 10.99.0.254:0 --tcp 10.99.0.254:0 --http 10.99.0.254:0 \\
        --data-dir DIR --idle-timeout 2 --tokens tokens.yaml

and in each host namespace (UDP, and again over TCP)::

    vspan collect --bridge br0 --uplink up-hX --uplink mgmt0 --analyzer 10.99.0.254:PORT \\
        --control http://10.99.0.254:HTTP --control-token TOKEN --collector-id N \\
        --host-name hX

The analyzer listens on a non-loopback address, so it needs tokens (it refuses to start
without): a read token for the test's own API calls, and one ``collector:N`` token per
collector for the control plane.

The same with Open vSwitch instead of Linux bridges, where Open vSwitch runs (its own
daemons per host, userspace datapath): the VM ports added the way libvirt adds them
(``attached-mac``, ``iface-id``, ``vm-id``, ``iface-status``), ``vspan collect --config``
with ``discovery: {kind: ovs}``.

Traffic from sockets in the VM namespaces, intra- and cross-host, UDP and TCP, each flow
both ways. The truth: for UDP what was sent (a datagram of L bytes is a frame of 14 + 20 +
8 + L bytes, 6 more with the VN-Tag); for TCP, whose segments the kernels decide,
``tcpdump -Q in`` on the sender's VM port (what its VM put on the wire, the frames the
collector captures there). Then the test waits past the idle timeout, kills the analyzer
with SIGKILL — nothing is flushed at shutdown — and opens the store read-only: each flow
once, exact packets and bytes both ways, scope, VM names (the namespaces' names behind a
bridge; the libvirt domain UUIDs behind Open vSwitch, which carries no VM name), the hosts
and vifs of the observing host, ``observed_at``, copies, and ``delay_us`` on cross-host
flows only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.store.store import Store
from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.netlab import CollectorProcess, Lab, Mgmt, Vm, in_netns, make_lab, vspan_command
from vspan_testing.ovs import OvsSwitch, disable_offload, ovs_unavailable

pytestmark = pytest.mark.root

CID = {"h1": 11, "h2": 22}
READ_TOKEN = "deploy-read-token-0123456789"
CONTROL_TOKEN = {host: f"deploy-collector-{cid}-0123456789" for host, cid in CID.items()}
UPLINK = {"h1": "up-h2", "h2": "up-h1"}
IDLE_S = 2.0
TAG = 6  # bytes the VN-Tag adds to a frame (EtherType 0x8926 and the 4-byte tag)
UDP_HEADERS = 14 + 20 + 8


# ---------------------------------------------------------------- what the test sends


@dataclass
class Sent:
    """One flow the test made: ``a`` sent first; packets and wire bytes (tag included) of
    each direction as the store must show them."""

    proto: int
    a: Vm
    b: Vm
    a_port: int
    b_port: int
    packets: int = 0
    bytes: int = 0
    packets_rev: int = 0
    bytes_rev: int = 0

    @property
    def scope(self) -> str:
        return "intra-host" if self.a.host == self.b.host else "cross-host"

    def key(self) -> tuple[str, int, str, int]:
        return (self.a.ip, self.a_port, self.b.ip, self.b_port)


def udp_exchange(
    lab: Lab, a: Vm, b: Vm, port: int, *, sizes: list[int], replies: list[int]
) -> Sent:
    """``a`` sends datagrams of ``sizes`` to ``b``:``port``, ``b`` answers with ``replies``."""
    flow = Sent(17, a, b, 0, port)
    with (
        lab.socket(b.ns, socket.AF_INET, socket.SOCK_DGRAM) as rx,
        lab.socket(a.ns, socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((b.ip, port))
        rx.settimeout(5)
        tx.bind((a.ip, 0))
        tx.settimeout(5)
        flow.a_port = tx.getsockname()[1]
        for n in sizes:
            tx.sendto(bytes(n), (b.ip, port))
            assert len(rx.recv(65536)) == n, "the lab lost a datagram"
        for n in replies:
            rx.sendto(bytes(n), (a.ip, flow.a_port))
            assert len(tx.recv(65536)) == n, "the lab lost a datagram"
    flow.packets, flow.bytes = len(sizes), sum(n + UDP_HEADERS + TAG for n in sizes)
    flow.packets_rev, flow.bytes_rev = len(replies), sum(n + UDP_HEADERS + TAG for n in replies)
    return flow


def tcp_exchange(lab: Lab, client: Vm, server: Vm, port: int, *, up: int, down: int) -> Sent:
    """``client`` connects, uploads ``up`` bytes, the server answers ``down``; both close.
    Packets and bytes are filled from the taps later (the kernels segment)."""
    flow = Sent(6, client, server, 0, port)
    listener = lab.socket(server.ns, socket.AF_INET, socket.SOCK_STREAM)
    conn_sock = lab.socket(client.ns, socket.AF_INET, socket.SOCK_STREAM)
    got: dict[str, Any] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                n = 0
                while chunk := conn.recv(65536):
                    n += len(chunk)
                got["up"] = n
                conn.sendall(bytes(down))
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
        except OSError as exc:
            got["error"] = exc

    with listener, conn_sock:
        listener.bind((server.ip, port))
        listener.listen(1)
        listener.settimeout(10)
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        conn_sock.settimeout(10)
        conn_sock.connect((server.ip, port))
        flow.a_port = conn_sock.getsockname()[1]
        conn_sock.sendall(bytes(up))
        conn_sock.shutdown(socket.SHUT_WR)
        n = 0
        while chunk := conn_sock.recv(65536):
            n += len(chunk)
        thread.join(10)
    assert (got.get("up"), n) == (up, down), f"the lab lost TCP data: {got}"
    return flow


# ---------------------------------------------------------------- tcpdump, the second truth


class Tap:
    """``tcpdump -Q in`` on a VM's port (in its host's namespace): the frames the VM sent."""

    def __init__(self, lab: Lab, vm: Vm, folder: Path) -> None:
        self.path = folder / f"tap-{vm.name}.pcap"
        self.errors = folder / f"tap-{vm.name}.stderr"
        self._err = self.errors.open("w")
        argv = ["tcpdump", "-i", vm.port, "-Q", "in", "-U", "--immediate-mode", "-n", "-s", "128", "-Z", "root",
                "-w", str(self.path), "ip and (tcp or udp)"]  # fmt: skip
        self.proc = lab.spawn(vm.host_ns, *argv, stderr=self._err, stdout=subprocess.DEVNULL)

    def wait_listening(self, deadline: float) -> None:
        while "listening on" not in self.errors.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tcpdump did not start: {self.errors.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: tcpdump writes what it has and exits
            self.proc.wait(10)
        self._err.close()

    def frames(self) -> list[tuple[tuple[str, int, str, int], int]]:
        """((src, sport, dst, dport), original length) of every IPv4 TCP/UDP frame."""
        data = self.path.read_bytes()
        magic = data[:4]
        order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        out, pos = [], 24
        while pos + 16 <= len(data):
            _, _, incl, orig = struct.unpack_from(order + "IIII", data, pos)
            frame = data[pos + 16 : pos + 16 + incl]
            pos += 16 + incl
            if frame[12:14] != b"\x08\x00":
                continue
            ihl = (frame[14] & 0x0F) * 4
            src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            out.append(((src, sport, dst, dport), orig))
        return out


def fill_from_taps(flow: Sent, taps: dict[str, Tap]) -> None:
    """Packets and wire bytes (+ the tag) of each direction, from the senders' taps."""
    forward = [n for k, n in taps[flow.a.name].frames() if k == flow.key()]
    back_key = (flow.b.ip, flow.b_port, flow.a.ip, flow.a_port)
    back = [n for k, n in taps[flow.b.name].frames() if k == back_key]
    assert forward, f"tcpdump saw nothing of {flow.key()}"
    assert back, f"tcpdump saw nothing of the answers to {flow.key()}"
    flow.packets, flow.bytes = len(forward), sum(forward) + TAG * len(forward)
    flow.packets_rev, flow.bytes_rev = len(back), sum(back) + TAG * len(back)


# ---------------------------------------------------------------- the deployment


@dataclass
class Deployment:
    """A lab with its analyzer and collectors running."""

    lab: Lab
    mgmt: Mgmt
    analyzer: AnalyzerProcess
    data: Path
    collectors: dict[str, Any] = field(default_factory=dict)
    ovs: dict[str, OvsSwitch] = field(default_factory=dict)
    vm_ids: dict[str, str] = field(default_factory=dict)
    """VM name → libvirt domain UUID (the Open vSwitch lab)."""

    def api(self, path: str) -> Any:
        """GET on the analyzer's API, from the management namespace."""
        ask = urllib.request.Request(
            self.analyzer.api + path, headers={"Authorization": f"Bearer {READ_TOKEN}"}
        )
        with in_netns(self.mgmt.ns), urllib.request.urlopen(ask, timeout=10) as answer:
            return json.loads(answer.read())

    def vifs(self) -> dict[str, int]:
        """VM name → the vif its host's collector gave its port (vifs.json)."""
        out = {}
        for host, proc in self.collectors.items():
            doc = json.loads((proc.state_dir / "vifs.json").read_text())
            by_identity = {row["identity"]: int(row["vif"]) for row in doc["vifs"]}
            for vm in self.lab.vms.values():
                if vm.host == host:
                    out[vm.name] = by_identity[self.identity(vm)]
        return out

    def identity(self, vm: Vm) -> str:
        if self.ovs:
            return f"vm:{self.vm_ids[vm.name]}/{vm.mac.replace(':', '')}"
        return f"port:{vm.port}"

    def vm_name(self, vm: Vm) -> str:
        """The name the analyzer must give the VM: its namespace (found behind a bridge
        port), or its domain UUID (libvirt's Open vSwitch ports name no VM)."""
        return self.vm_ids[vm.name] if self.ovs else vm.ns


class OvsCollector:
    """``vspan collect --config`` with Open vSwitch discovery, in a host namespace."""

    def __init__(self, dep: Deployment, host: str, folder: Path, transport: str) -> None:
        port = dep.analyzer.udp if transport == "udp" else dep.analyzer.tcp
        assert port is not None
        self.state_dir = folder / f"state-{host}"
        config = folder / f"collect-{host}.yaml"
        config.write_text(
            f"collector_id: {CID[host]}\nhost: {host}\n"
            f"analyzer: {dep.mgmt.ip}:{port[1]}\ntransport: {transport}\n"
            f"control: {dep.analyzer.api}\ncontrol_token: {CONTROL_TOKEN[host]}\n"
            f"state_dir: {self.state_dir}\nstats_interval: 1\n"
            f"discovery:\n  kind: ovs\n  uplinks: [up-*, {dep.mgmt.port}]\n"
        )
        self.log_path = folder / f"collect-{host}.stderr"
        self._log = self.log_path.open("w")
        self.proc = dep.lab.spawn(
            dep.lab.hosts[host], *vspan_command(), "collect", "--config", str(config),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            env=dep.ovs[host].env(),
        )  # fmt: skip

    def stderr(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self._log.close()


def start_collectors(dep: Deployment, folder: Path, transport: str) -> None:
    """A collector per host with the control plane; wait until each has its 2 VM ports."""
    port = dep.analyzer.udp if transport == "udp" else dep.analyzer.tcp
    assert port is not None
    for host, cid in CID.items():
        if dep.ovs:
            dep.collectors[host] = OvsCollector(dep, host, folder, transport)
        else:
            extra = ("--control", dep.analyzer.api, "--control-token", CONTROL_TOKEN[host],
                     "--transport", transport)  # fmt: skip
            dep.collectors[host] = CollectorProcess(
                dep.lab, dep.mgmt, host, cid=cid, uplink=UPLINK[host], port=port[1],
                workdir=folder, extra=extra,
            )  # fmt: skip
    deadline = time.monotonic() + 30
    for host, proc in dep.collectors.items():
        while f"(collector {CID[host]}) -> " not in proc.stderr() or ", 2 VM ports" not in (
            proc.stderr()
        ):
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vspan collect on {host} did not start:\n{proc.stderr()}")
            time.sleep(0.05)
    # Registered: the analyzer knows both hosts and their 4 VMs (no inventory file).
    while len(dep.api("/api/v1/control/inventory")["vms"]) < 4:
        assert time.monotonic() < deadline, dep.api("/api/v1/control/inventory")
        time.sleep(0.1)


def ovs_hosts(lab: Lab, folder: Path) -> tuple[dict[str, OvsSwitch], dict[str, str]]:
    """Replace each host's Linux bridge by Open vSwitch (its own daemons in the host's
    namespace): the VM ports added as libvirt adds them, the underlay as a plain port."""
    switches, vm_ids = {}, {}
    for host, ns in lab.hosts.items():
        switch = OvsSwitch(folder / f"ovs-{host}", ns=ns)
        switches[host] = switch
        switch.start()
        switch.add_bridge("ovs0")
        for vm in (v for v in lab.vms.values() if v.host == host):
            vm_ids[vm.name] = str(uuid.uuid4())
            lab.run(ns, "ip", "link", "set", vm.port, "nomaster")
            switch.add_port("ovs0", vm.port, attached_mac=vm.mac, iface_id=str(uuid.uuid4()),
                            vm_id=vm_ids[vm.name])  # fmt: skip
            disable_offload(vm.ns)
        lab.run(ns, "ip", "link", "set", UPLINK[host], "nomaster")
        switch.add_port("ovs0", UPLINK[host])
    return switches, vm_ids


@contextlib.contextmanager
def deployment(
    lab: Lab, mgmt: Mgmt, folder: Path, transport: str, *, ovs: bool
) -> Iterator[Deployment]:
    data = folder / "data"
    addr = f"{mgmt.ip}:0"
    tokens = folder / "tokens.yaml"
    tokens.write_text(
        f"{READ_TOKEN}: read\n"
        + "".join(f"{CONTROL_TOKEN[h]}: collector:{cid}\n" for h, cid in CID.items())
    )
    args = ["--udp", addr, "--tcp", addr, "--http", addr, "--data-dir", str(data),
            "--idle-timeout", str(IDLE_S), "--tokens", str(tokens)]  # fmt: skip
    analyzer = AnalyzerProcess(
        args, stderr_path=folder / "analyze.stderr",
        spawn=lambda argv, **popen: lab.spawn(mgmt.ns, *argv, **popen),
    )  # fmt: skip
    dep = Deployment(lab, mgmt, analyzer, data)
    try:
        analyzer.wait_started()
        if ovs:
            dep.ovs, dep.vm_ids = ovs_hosts(lab, folder)
        start_collectors(dep, folder, transport)
        yield dep
    finally:
        analyzer.kill()
        for host, proc in dep.collectors.items():
            proc.stop()
            print(f"----- vspan collect on {host}:\n{proc.stderr()}")
        for switch in dep.ovs.values():
            switch.stop()
        print(f"----- vspan analyze:\n{analyzer.stderr()}")


# ---------------------------------------------------------------- the run and the checks


def run_and_check(dep: Deployment, folder: Path) -> None:
    lab = dep.lab
    h1v1, h1v2, h2v1, h2v2 = (lab.vms[n] for n in ("h1v1", "h1v2", "h2v1", "h2v2"))
    taps = {vm.name: Tap(lab, vm, folder) for vm in lab.vms.values()}
    deadline = time.monotonic() + 10
    for tap in taps.values():
        tap.wait_listening(deadline)
    try:
        flows = [
            udp_exchange(
                lab, h1v1, h1v2, 7001, sizes=[100, 200, 300, 1000, 18], replies=[50, 1400, 60]
            ),
            udp_exchange(lab, h1v2, h2v1, 7002, sizes=[400, 20, 1200, 33], replies=[77, 500]),
            tcp_exchange(lab, h2v1, h2v2, 7003, up=3000, down=20_000),
            tcp_exchange(lab, h2v2, h1v1, 7004, up=150_000, down=2_000),
        ]
        time.sleep(0.5)  # the taps write what they saw
    finally:
        for tap in taps.values():
            tap.stop()
    for flow in flows:
        if flow.proto == 6:
            fill_from_taps(flow, taps)
        else:  # the UDP truth, checked against tcpdump as well
            tapped = [n for k, n in taps[flow.a.name].frames() if k == flow.key()]
            assert sum(tapped) + TAG * len(tapped) == flow.bytes, (flow.key(), tapped)
    vifs = dep.vifs()
    # Past the idle timeout the flows are finished (the analyzer's clock) and written.
    wanted = {flow.key() for flow in flows}
    deadline = time.monotonic() + IDLE_S + 8
    while time.monotonic() < deadline:
        stored = dep.api("/api/v1/flows?limit=1000")["flows"]
        done = {(f["src_ip"], f["src_port"], f["dst_ip"], f["dst_port"]) for f in stored
                if f.get("state", "closed") != "open"}  # fmt: skip
        if wanted <= done:
            break
        time.sleep(0.25)
    dep.analyzer.kill()  # SIGKILL: what is not in the store now never will be
    with Store(dep.data, read_only=True) as store:
        rows = store.query_flows(limit=None)
    check_flows(dep, rows, flows, vifs)


def check_flows(
    dep: Deployment, rows: pd.DataFrame, flows: list[Sent], vifs: dict[str, int]
) -> None:
    hosts_of = {vm.name: vm.host for vm in dep.lab.vms.values()}
    problems = []
    for flow in flows:
        a, b = flow.a, flow.b
        mine = rows[
            (rows["proto"] == flow.proto)
            & (
                ((rows["src_ip"] == a.ip) & (rows["src_port"] == flow.a_port)
                 & (rows["dst_ip"] == b.ip) & (rows["dst_port"] == flow.b_port))
                | ((rows["src_ip"] == b.ip) & (rows["src_port"] == flow.b_port)
                   & (rows["dst_ip"] == a.ip) & (rows["dst_port"] == flow.a_port))
            )
        ]  # fmt: skip
        name = f"{flow.scope} {'udp' if flow.proto == 17 else 'tcp'} {a.name}->{b.name}"
        if len(mine) != 1:
            problems.append(f"{name}: {len(mine)} rows in the store, expected 1")
            continue
        row = mine.iloc[0]
        cross = flow.scope == "cross-host"
        want = {
            "src_ip": a.ip, "dst_ip": b.ip, "scope": flow.scope,
            "packets": flow.packets, "bytes": flow.bytes,
            "packets_rev": flow.packets_rev, "bytes_rev": flow.bytes_rev,
            "src_vm": dep.vm_name(a), "dst_vm": dep.vm_name(b),
            "src_host": a.host, "dst_host": b.host,
            "host": a.host,  # the first packet was a's, seen first at a's host
            "src_vif": vifs[a.name], "dst_vif": 0 if cross else vifs[b.name],
            "observed_at": sorted({a.host, b.host}),
            "copies": (flow.packets + flow.packets_rev) * (2 if cross else 1),
        }  # fmt: skip
        got = {k: _plain(row[k]) for k in want}
        got["observed_at"] = sorted(got["observed_at"] or [])
        if got != want:
            diff = {k: (got[k], v) for k, v in want.items() if got[k] != v}
            problems.append(f"{name}: (stored, expected) {diff}")
        delay = row["delay_us"]
        if cross and not (pd.notna(delay) and 0 <= float(delay) < 1e6):
            problems.append(f"{name}: delay_us {delay}, expected one from paired copies")
        if not cross and pd.notna(delay):
            problems.append(f"{name}: delay_us {delay} on an intra-host flow")
        if dep.ovs:
            uuids = (_plain(row["src_vm_uuid"]), _plain(row["dst_vm_uuid"]))
            if uuids != (dep.vm_ids[a.name], dep.vm_ids[b.name]):
                problems.append(f"{name}: VM UUIDs {uuids}")
    assert not problems, "\n".join(problems) + f"\nhosts: {hosts_of}"


def _plain(value: Any) -> Any:
    """A stored value as plain Python: lists, ints, strings, None."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(v) for v in value]
    if value is None or pd.isna(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return str(value) if isinstance(value, uuid.UUID) else value


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def bridge_lab(request: pytest.FixtureRequest) -> tuple[Lab, Mgmt]:
    lab = make_lab(request, "vsde", hosts=2, vms_per_host=2)
    mgmt = lab.add_mgmt()
    lab.wait_links_up()
    return lab, mgmt


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_linux_bridges_without_inventory(
    bridge_lab: tuple[Lab, Mgmt], transport: str, tmp_path: Path
) -> None:
    lab, mgmt = bridge_lab
    with deployment(lab, mgmt, tmp_path, transport, ovs=False) as dep:
        run_and_check(dep, tmp_path)


def test_open_vswitch_ports_like_libvirts(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if (reason := ovs_unavailable()) is not None:
        pytest.skip(f"Open vSwitch cannot run here: {reason}")
    lab = make_lab(request, "vsdo", hosts=2, vms_per_host=2)
    mgmt = lab.add_mgmt()
    lab.wait_links_up()
    with deployment(lab, mgmt, tmp_path, "udp", ovs=True) as dep:
        run_and_check(dep, tmp_path)
