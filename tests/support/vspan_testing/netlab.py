"""A lab of hypervisors and VMs made of network namespaces, veth pairs and Linux bridges.

::

    host h1 (netns, bridge br0)                 host h2 (netns, bridge br0)
      vm-h1v1 ─ veth ─ eth0 of VM h1v1 (netns)    vm-h2v1 ─ veth ─ eth0 of VM h2v1
      vm-h1v2 ─ ...                               ...
      up-h2 ══════════ underlay veth ═════════════ up-h1

Every interface lives inside a namespace the lab made (pairs are created with their peer
already in the other namespace), so two labs never collide and nothing is left in the
root namespace. Namespace names are ``<prefix>-<pid>-<token>-<host or VM>``; interface
names are short (IFNAMSIZ is 16 with the NUL). Deleting the namespaces removes their
veths and bridges: ``teardown`` does it, ``Lab`` is a context manager, an ``atexit`` hook
catches what a crash left, and ``sweep_stale`` removes the namespaces of lab processes
that no longer exist (a run killed with SIGKILL).

VM ``hNvM`` has MAC ``02:77:00:00:0N:0M``, IPv4 ``10.77.N.M/16`` and IPv6 ``fd77::N:M/64``
on ``eth0``; its host-side port is ``vm-hNvM`` on ``br0``. Hosts have IPv6 off, so the
only chatter on the segment is the VMs' own (ARP, neighbour discovery, MLD), and in the
first seconds the bridges' own IGMP reports (multicast snooping joins 224.0.0.106; source
0.0.0.0, the bridge's MAC). New links only carry frames once the kernel has brought them
up, up to a second after ``build``: ``wait_links_up`` waits for that.

``add_mgmt`` adds a management network apart from ``br0`` and the underlay: namespace
``mgmt`` with bridge ``brm`` (``10.99.0.254/24`` by default) and, in every host, interface
``mgmt0`` (``10.99.0.N``), so that a collector in a host reaches an analyzer there.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Lab", "Mgmt", "Vm", "in_netns", "lab_unavailable", "make_lab", "sweep_stale"]

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_LIVE: weakref.WeakSet[Lab] = weakref.WeakSet()
_NAME = re.compile(r"^(?P<prefix>[a-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{4}-")


def lab_unavailable() -> str | None:
    """Why a lab cannot be built here (not root, no ``ip``), or None."""
    if os.geteuid() != 0:
        return "the network-namespace lab needs root"
    if shutil.which("ip") is None:
        return "the network-namespace lab needs iproute2 (ip)"
    return None


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the calling thread (only it) in network namespace ``ns``, then switch back.

    Sockets keep the namespace they were created in after the switch back.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as here, open(NETNS_DIR / ns, "rb") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(here.fileno(), CLONE_NEWNET) != 0:  # pragma: no cover
                err = ctypes.get_errno()
                raise OSError(err, f"setns back from {ns}: {os.strerror(err)}")


def sweep_stale(prefix: str) -> list[str]:
    """Delete the namespaces of labs named ``prefix`` whose process is gone; their names."""
    gone = []
    for path in NETNS_DIR.glob(f"{prefix}-*") if NETNS_DIR.is_dir() else ():
        match = _NAME.match(path.name)
        if match and match["prefix"] == prefix and not Path(f"/proc/{match['pid']}").exists():
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, check=False)
            gone.append(path.name)
    return gone


@dataclass(frozen=True, slots=True)
class Vm:
    """A VM of the lab and its port on the host's bridge."""

    name: str
    """``h1v2``: VM 2 of host 1."""
    ns: str
    """The VM's network namespace."""
    host: str
    host_ns: str
    mac: str
    ip: str
    ip6: str
    port: str
    """The host-side port on ``br0`` (``vm-h1v2``)."""
    ifindex: int
    """``port``'s interface index inside ``host_ns``."""
    vif: int
    """A vif number unique in the lab (host * 100 + VM)."""

    @property
    def mac_bytes(self) -> bytes:
        return bytes.fromhex(self.mac.replace(":", ""))


@dataclass(frozen=True, slots=True)
class Mgmt:
    """A management network: the hosts' path to an analyzer, apart from br0 and the underlay.

    Namespace ``ns`` holds bridge ``brm`` with address ``ip``; every host has interface
    ``port`` (not on ``br0``) with address ``host_ips[host]``, in ``<subnet>.0/24``.
    """

    ns: str
    ip: str
    """The management namespace's address: where a receiver listens."""
    port: str
    """The host-side interface in every host namespace."""
    host_ips: dict[str, str]
    """Host name (``h1``) → its address on the management network."""
    links: dict[str, str]
    """Host name → the other end of its ``port``, inside ``ns`` on ``brm`` (``mg-h1``)."""


class Lab:
    """Hosts and VMs in namespaces; build with ``with Lab(...) as lab:`` or ``build()``."""

    def __init__(self, name_prefix: str = "vsl", *, hosts: int = 2, vms_per_host: int = 3) -> None:
        if not re.fullmatch(r"[a-z0-9]{1,8}", name_prefix):
            raise ValueError(f"name_prefix {name_prefix!r}: 1-8 lowercase letters or digits")
        self.prefix = name_prefix
        self.tag = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.n_hosts = hosts
        self.n_vms = vms_per_host
        self.hosts: dict[str, str] = {}
        """Host name (``h1``) → its namespace."""
        self.vms: dict[str, Vm] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # Building

    def build(self) -> None:
        """Create the hosts, their VMs and the underlay; tear down what was made on error."""
        _LIVE.add(self)
        try:
            for h in range(1, self.n_hosts + 1):
                self._add_host(f"h{h}")
            for h in range(2, self.n_hosts + 1):  # a star through h1: no loops, no STP
                self._link_hosts("h1", f"h{h}")
            for h in range(1, self.n_hosts + 1):
                for _ in range(self.n_vms):
                    self.add_vm(f"h{h}")
        except BaseException:
            self.teardown()
            raise

    def _new_ns(self, suffix: str) -> str:
        ns = f"{self.tag}-{suffix}"
        self._namespaces.append(ns)  # before creating: teardown tolerates a missing one
        self._ip("netns", "add", ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _add_host(self, host: str) -> None:
        ns = self._new_ns(host)
        self.hosts[host] = ns
        for conf in ("all", "default"):
            self.sysctl(ns, f"net/ipv6/conf/{conf}/disable_ipv6", "1")
        self._ip("-n", ns, "link", "add", "br0", "type", "bridge", "stp_state", "0")
        self._ip("-n", ns, "link", "set", "br0", "up")

    def _link_hosts(self, a: str, b: str) -> None:
        ns_a, ns_b = self.hosts[a], self.hosts[b]
        pair = [f"up-{b}", "type", "veth", "peer", "name", f"up-{a}", "netns", ns_b]
        self._ip("-n", ns_a, "link", "add", *pair)
        for ns, name in ((ns_a, f"up-{b}"), (ns_b, f"up-{a}")):
            self._ip("-n", ns, "link", "set", name, "master", "br0", "up")

    def add_vm(self, host: str) -> Vm:
        """A new VM on ``host`` (the next free number), with its port up on ``br0``."""
        h = int(host[1:])
        v = 1 + sum(1 for vm in self.vms.values() if vm.host == host)
        while f"{host}v{v}" in self.vms:
            v += 1
        if v > 99:
            raise ValueError(f"{host} has no room for another VM (99 at most)")
        name = f"{host}v{v}"
        ns, host_ns, port = self._new_ns(name), self.hosts[host], f"vm-{name}"
        for key, value in (("accept_dad", "0"), ("router_solicitations", "0"), ("accept_ra", "0")):
            for conf in ("all", "default"):
                self.sysctl(ns, f"net/ipv6/conf/{conf}/{key}", value)
        mac, ip, ip6 = f"02:77:00:00:{h:02x}:{v:02x}", f"10.77.{h}.{v}", f"fd77::{h}:{v}"
        self._ip(
            "-n", host_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns
        )
        self._ip("-n", ns, "link", "set", "eth0", "address", mac)
        self._ip("-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0")
        self._ip("-n", ns, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        self._ip("-n", host_ns, "link", "set", port, "master", "br0", "up")
        with in_netns(host_ns):
            ifindex = socket.if_nametoindex(port)
        vm = Vm(name, ns, host, host_ns, mac, ip, ip6, port, ifindex, h * 100 + v)
        self.vms[name] = vm
        return vm

    def add_mgmt(self, subnet: str = "10.99.0", *, port: str = "mgmt0") -> Mgmt:
        """A management namespace (``<subnet>.254``) wired to every host (``<subnet>.N``).

        Each host gets ``port`` with an address, outside ``br0``: a process in a host
        namespace (a collector) reaches ``Mgmt.ip`` through it. Deleted with the lab.
        """
        if not re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", subnet):
            raise ValueError(f"subnet {subnet!r}: three octets, like 10.99.0")
        if self.n_hosts > 250:
            raise ValueError("a management /24 has room for 250 hosts")
        ns = self._new_ns("mgmt")
        for conf in ("all", "default"):
            self.sysctl(ns, f"net/ipv6/conf/{conf}/disable_ipv6", "1")
        self._ip("-n", ns, "link", "add", "brm", "type", "bridge", "stp_state", "0")
        self._ip("-n", ns, "addr", "add", f"{subnet}.254/24", "dev", "brm")
        self._ip("-n", ns, "link", "set", "brm", "up")
        host_ips, links = {}, {}
        for host, host_ns in sorted(self.hosts.items(), key=lambda item: int(item[0][1:])):
            ip = f"{subnet}.{int(host[1:])}"
            pair = [f"mg-{host}", "type", "veth", "peer", "name", port, "netns", host_ns]
            self._ip("-n", ns, "link", "add", *pair)
            self._ip("-n", ns, "link", "set", f"mg-{host}", "master", "brm", "up")
            self._ip("-n", host_ns, "addr", "add", f"{ip}/24", "dev", port)
            self._ip("-n", host_ns, "link", "set", port, "up")
            host_ips[host], links[host] = ip, f"mg-{host}"
        return Mgmt(ns, f"{subnet}.254", port, host_ips, links)

    def wait_links_up(self, timeout: float = 10) -> None:
        """Wait until the kernel has brought every link of the lab up.

        A new link's carrier takes effect asynchronously (the kernel's link watcher, up to
        a second later, also under load from other labs): until then the bridge treats the
        port as down and frames sent through it are dropped. Operational state ``UP`` (or
        ``UNKNOWN`` for ``lo``-like links) on every link means it is done.
        """
        deadline = time.monotonic() + timeout
        for ns in list(self._namespaces):
            while True:
                links = json.loads(self._ip_out("-n", ns, "-j", "link", "show", "up") or "[]")
                down = [
                    link["ifname"]
                    for link in links
                    if link.get("operstate") not in ("UP", "UNKNOWN")
                ]
                if not down:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"links still down in {ns} after {timeout} s: {down}")
                time.sleep(0.02)

    def remove_vm(self, name: str) -> None:
        """Delete VM ``name``'s namespace, and wait until its veth pair and port are gone."""
        vm = self.vms.pop(name)
        self._ip("netns", "del", vm.ns)
        self._namespaces.remove(vm.ns)
        # The kernel dismantles a namespace asynchronously, once nothing holds it (a socket
        # created in it does): wait for the port to go.
        deadline = time.monotonic() + 10
        while self._has_link(vm.host_ns, vm.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{vm.port} still exists 10 s after deleting {vm.ns}")
            time.sleep(0.02)

    def _has_link(self, ns: str, name: str) -> bool:
        with in_netns(ns):
            try:
                socket.if_nametoindex(name)
            except OSError:
                return False
            return True

    # Using

    def vm(self, name: str) -> Vm:
        return self.vms[name]

    def run(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in namespace ``ns`` (``ip netns exec``) and wait for it."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
        )

    def spawn(self, ns: str, *cmd: str, **popen: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in ``ns`` without waiting; ``teardown`` kills it if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **popen)
        self._procs.append(proc)
        return proc

    def python(
        self, ns: str, code: str, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python script (this interpreter) in ``ns``; its output."""
        return self.run(ns, sys.executable, "-c", code, *args, timeout=timeout)

    def socket(self, ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket created inside ``ns`` (it stays there)."""
        with in_netns(ns):
            return socket.socket(family, kind, proto)

    def sysctl(self, ns: str, path: str, value: str) -> None:
        """Write ``/proc/sys/<path>`` of namespace ``ns``."""
        with in_netns(ns):
            Path("/proc/sys", path).write_text(value)

    def ping(self, src: str, dst_ip: str, count: int = 10, *, timeout: float = 2.0) -> int:
        """ICMP echo from VM ``src`` to ``dst_ip``, one at a time; how many were answered."""
        ident = os.getpid() & 0xFFFF
        answered = 0
        with self.socket(
            self.vms[src].ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP
        ) as s:
            for seq in range(count):
                s.sendto(_echo_request(ident, seq, b"vspan-lab-ping"), (dst_ip, 0))
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    s.settimeout(left)
                    try:
                        reply = s.recv(2048)
                    except TimeoutError:
                        break
                    ihl = (reply[0] & 0x0F) * 4
                    kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", reply, ihl)
                    if kind == 0 and rid == ident and rseq == seq:
                        answered += 1
                        break
        return answered

    # Tearing down

    def teardown(self) -> None:
        """Kill the processes the lab started and delete every namespace it made."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=10)
        self._procs.clear()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._namespaces.clear()
        self.hosts.clear()
        self.vms.clear()
        _LIVE.discard(self)

    def namespaces(self) -> list[str]:
        """The namespaces of this lab that exist now."""
        return sorted(p.name for p in NETNS_DIR.glob(f"{self.tag}-*")) if NETNS_DIR.is_dir() else []

    def _ip(self, *args: str) -> None:
        self._ip_out(*args)

    def _ip_out(self, *args: str) -> str:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, check=False, timeout=30
        )
        if done.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout


def vspan_command() -> list[str]:
    """The installed ``vspan`` script next to this interpreter, else the module's entry point."""
    script = Path(sys.executable).with_name("vspan")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from vspan.cli import main; sys.exit(main())"]


class CollectorProcess:
    """``vspan collect --bridge br0`` in a host namespace, sending to the management network;
    its stderr (start line, stats lines) goes to a file."""

    def __init__(
        self,
        lab: Lab,
        mgmt: Mgmt,
        host: str,
        *,
        cid: int,
        uplink: str,
        port: int,
        workdir: Path,
        stats_interval: str = "1",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.host, self.cid = host, cid
        self.state_dir = workdir / f"state-{host}"
        self.log_path = workdir / f"collect-{host}.stderr"
        self._log = self.log_path.open("w")
        argv = [
            *vspan_command(),
            "collect",
            "--bridge",
            "br0",
            "--uplink",
            uplink,
            "--uplink",
            mgmt.port,
            "--analyzer",
            f"{mgmt.ip}:{port}",
            "--collector-id",
            str(cid),
            "--host-name",
            host,
            "--state-dir",
            str(self.state_dir),
            "--stats-interval",
            stats_interval,
            *extra,
        ]
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
        self.proc = lab.spawn(lab.hosts[host], *argv, stderr=self._log, **quiet)

    def stderr(self) -> str:
        return self.log_path.read_text()

    def vifs(self) -> dict[str, int]:
        """Port name → vif, from the collector's state file (bridge ports: ``port:`` ids)."""
        doc = json.loads((self.state_dir / "vifs.json").read_text())
        out = {}
        for row in doc["vifs"]:
            kind, _, port = row["identity"].partition(":")
            assert kind == "port", f"{self.host}: unexpected identity {row['identity']!r}"
            out[port] = int(row["vif"])
        return out

    def terminate(self) -> None:
        """SIGTERM: the collector flushes what is queued and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Its exit status; an ``AssertionError`` if it ignored SIGTERM (then killed)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise AssertionError(f"vspan collect on {self.host} ignored SIGTERM") from None
        finally:
            self._log.close()

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate, and kill it if it does not exit in time (for clean-up paths)."""
        self.terminate()
        with contextlib.suppress(AssertionError):
            self.wait(timeout)


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(head + payload), ident, seq) + payload


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def make_lab(request: Any, name_prefix: str = "vsl", **sizes: int) -> Lab:
    """A built lab torn down by ``request``'s finalizer; skips the test where impossible."""
    import pytest

    if (reason := lab_unavailable()) is not None:
        pytest.skip(reason)
    sweep_stale(name_prefix)
    lab = Lab(name_prefix, **sizes)
    request.addfinalizer(lab.teardown)
    lab.build()
    return lab


@atexit.register
def _teardown_all() -> None:  # the safety net: labs a crash or a missed finalizer left
    for lab in list(_LIVE):
        lab.teardown()
