"""Lab VMs whose network namespace has no name, like a container runtime's.

``ip netns`` names a namespace by a file in ``/run/netns``; Docker, Podman or LXC keep theirs
elsewhere (or only in their processes), so ``ip netns list-id`` on the host names none of
them. A Linux bridge collector then finds a veth port whose peer it cannot name: the VM is
known by its port and its MAC must be learned from its traffic — the case of a tap port of a
QEMU VM on a bridge, with a lab VM that has an IP stack.

``hide(lab, vm)`` turns a lab VM into such a VM: a process started in its namespace holds
it (``Lab.spawn``: ``teardown`` kills it, and the namespace with its veth pair goes with
it), then the namespace's name is deleted. The test reaches the VM through the holder's
``/proc/PID/ns/net``: ``HiddenVm.socket``, ``HiddenVm.run``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from vspan_testing.netlab import CLONE_NEWNET, NETNS_DIR, Lab, Vm

__all__ = ["HiddenVm", "hide"]

HOLD_S = 900
"""The holder's own end (a ``sleep``), should the test process die without tearing down."""


@dataclass(frozen=True, slots=True)
class HiddenVm:
    """A lab VM whose namespace has no name; ``path`` is its holder's namespace file."""

    vm: Vm
    pid: int

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread in the VM's namespace, then switch back."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net", "rb") as here, open(self.path, "rb") as there:
            if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.path}: {os.strerror(err)}")
            try:
                yield
            finally:
                if libc.setns(here.fileno(), CLONE_NEWNET) != 0:  # pragma: no cover
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns back from {self.path}: {os.strerror(err)}")

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket created inside the VM's namespace."""
        with self.entered():
            return socket.socket(family, kind, proto)

    def run(self, *cmd: str, timeout: float = 30) -> str:
        """Run ``cmd`` in the VM's namespace (``nsenter``); its standard output."""
        done = subprocess.run(
            ["nsenter", f"--net={self.path}", *cmd],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} in {self.vm.name}: {done.stderr.strip()}")
        return done.stdout

    def link_mac(self, name: str = "eth0") -> str:
        """The MAC of interface ``name`` as ``ip link`` shows it inside the VM."""
        links = json.loads(self.run("ip", "-j", "link", "show", name))
        return str(links[0]["address"]).lower()


def hide(lab: Lab, vm: Vm, timeout: float = 10.0) -> HiddenVm:
    """Hold ``vm``'s namespace by a process and delete its name (see the module)."""
    holder = lab.spawn(vm.ns, "sleep", str(HOLD_S), stdin=subprocess.DEVNULL)
    target = os.stat(NETNS_DIR / vm.ns)
    deadline = time.monotonic() + timeout
    while True:  # ip netns exec has entered the namespace and exec'd sleep
        try:
            here = os.stat(f"/proc/{holder.pid}/ns/net")
            if (here.st_dev, here.st_ino) == (target.st_dev, target.st_ino):
                break
        except FileNotFoundError:
            pass
        if holder.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cannot hold the namespace of {vm.name} ({holder.poll()})")
        time.sleep(0.01)
    done = subprocess.run(["ip", "netns", "del", vm.ns], capture_output=True, text=True,
                          check=False, timeout=30)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"ip netns del {vm.ns}: {done.stderr.strip()}")
    return HiddenVm(vm, holder.pid)
