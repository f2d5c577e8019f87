"""A private Open vSwitch for tests: its own database and daemons in a network namespace.

``OvsSwitch(folder, ns=...)`` runs ``ovsdb-server`` and ``ovs-vswitchd`` with every file
(database, sockets, pid files, logs) in ``folder`` and the daemons inside namespace ``ns``
(made, and deleted afterwards, when not given): nothing of the machine's own Open vSwitch,
if any, is touched. Bridges use the userspace datapath (``datapath_type=netdev``): no kernel
module needed. Processes that should see this switch get ``env()`` (``OVS_RUNDIR``: a plain
``ovs-vsctl`` then talks to it); ``runner`` is a ``CommandRunner`` that does the same.

The userspace datapath forwards frames as the kernel handed them to its packet sockets: a
VM namespace's TCP/UDP checksum offload must be off (``ethtool -K eth0 tx off``), else the
frames arrive with partial checksums and the receiver drops them. ``disable_offload`` does it.

``add_port`` adds a port the way libvirt does (``virNetDevOpenvswitchAddPort`` in
``src/util/virnetdevopenvswitch.c``): ``attached-mac``, ``iface-id``, ``vm-id``, optional
``port-profile``, then ``iface-status=active``, one ``set Interface`` each.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["OvsSwitch", "disable_offload", "ovs_unavailable"]

_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
_TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ip")


def ovs_unavailable() -> str | None:
    """Why a private Open vSwitch cannot be started here (before trying), or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in _TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install openvswitch-switch iproute2)"
    if not _SCHEMA.exists():
        return f"no {_SCHEMA}"
    return None


def disable_offload(ns: str, dev: str = "eth0") -> None:
    """Checksum and segmentation offload off on ``dev`` in ``ns`` (see the module doc)."""
    tool = shutil.which("ethtool") or "/usr/sbin/ethtool"
    if not Path(tool).exists():
        raise RuntimeError("ethtool is missing (apt-get install ethtool)")
    subprocess.run(
        ["ip", "netns", "exec", ns, tool, "-K", dev, "tx", "off"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


class OvsSwitch:
    """A private ``ovsdb-server`` + ``ovs-vswitchd``; a context manager (``start``/``stop``)."""

    def __init__(self, folder: Path, *, ns: str | None = None, name: str = "vsovs") -> None:
        self.folder = folder
        self.own_ns = ns is None
        self.ns = ns or f"{name}-{os.getpid()}-{secrets.token_hex(2)}"
        self._started = False

    def __enter__(self) -> OvsSwitch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- running ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment under which ``ovs-vsctl`` talks to this switch."""
        f = str(self.folder)
        return {**os.environ, "OVS_RUNDIR": f, "OVS_DBDIR": f, "OVS_LOGDIR": f,
                "OVS_SYSCONFDIR": f}  # fmt: skip

    def _run(self, *argv: str, timeout: float = 30) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv], env=self.env(), capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def vsctl(self, *args: str) -> str:
        return self._run("ovs-vsctl", "--timeout=10", *args)

    def runner(self, argv: Sequence[str]) -> str:
        """A ``CommandRunner`` for ``OvsSource``: the command against this switch."""
        return self._run(*argv)

    def start(self) -> None:
        """Create the database, start both daemons, wait until the switch answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.own_ns:
            subprocess.run(["ip", "netns", "add", self.ns], check=True, capture_output=True)
            subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)
        self._started = True
        db, sock = self.folder / "conf.db", self.folder / "db.sock"
        try:
            self._run("ovsdb-tool", "create", str(db), str(_SCHEMA))
            self._run(
                "ovsdb-server", str(db), f"--remote=punix:{sock}", "--detach",
                f"--pidfile={self.folder / 'ovsdb-server.pid'}",
                f"--log-file={self.folder / 'ovsdb-server.log'}",
            )  # fmt: skip
            self.vsctl("--no-wait", "init")
            self._run(
                "ovs-vswitchd", f"unix:{sock}", "--detach",
                f"--pidfile={self.folder / 'ovs-vswitchd.pid'}",
                f"--log-file={self.folder / 'ovs-vswitchd.log'}",
            )  # fmt: skip
            self.vsctl("show")
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        """The tail of ``ovs-vswitchd``'s log (for failure messages)."""
        path = self.folder / "ovs-vswitchd.log"
        return "\n".join(path.read_text().splitlines()[-20:]) if path.exists() else ""

    def stop(self) -> None:
        """Stop both daemons and, if it made it, delete its namespace; idempotent."""
        if not self._started:
            return
        self._started = False
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            pidfile = self.folder / f"{daemon}.pid"
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text())
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)
        if self.own_ns:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    # --- building -----------------------------------------------------------------------

    def add_bridge(self, bridge: str) -> None:
        """A bridge on the userspace datapath."""
        self.vsctl("add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev")

    def add_port(
        self,
        bridge: str,
        port: str,
        *,
        attached_mac: str | None = None,
        iface_id: str | None = None,
        vm_id: str | None = None,
        profile: str | None = None,
    ) -> None:
        """Add an existing interface of the namespace, with the external ids given as
        libvirt sets them (and ``iface-status=active``); none given: a plain port."""
        argv = ["--", "--may-exist", "add-port", bridge, port]
        given = {"attached-mac": attached_mac, "iface-id": iface_id, "vm-id": vm_id,
                 "port-profile": profile}  # fmt: skip
        ids = [f'{key}="{value}"' for key, value in given.items() if value is not None]
        for item in [*ids, "iface-status=active"] if ids else []:
            argv += ["--", "set", "Interface", port, f"external-ids:{item}"]
        self.vsctl(*argv)

    def add_veth_port(self, port: str, bridge: str = "br0", **ids: Any) -> None:
        """A veth pair (``port`` and ``x<port>``) in the namespace, ``port`` on ``bridge``
        (made on first use) with ``ids`` as in ``add_port``."""
        if not self._has_bridge(bridge):
            self.add_bridge(bridge)
        self._run("ip", "link", "add", port, "type", "veth", "peer", "name", f"x{port}")
        for dev in (port, f"x{port}"):
            self._run("ip", "link", "set", dev, "up")
        self.add_port(bridge, port, **ids)

    def _has_bridge(self, bridge: str) -> bool:
        return bridge in self.vsctl("list-br").split()

    def ifindex(self, dev: str) -> int:
        return int(self._run("cat", f"/sys/class/net/{dev}/ifindex").strip())
