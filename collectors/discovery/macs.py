"""The VM MAC of a port whose discovery source does not know it, learned from the traffic.

A Linux bridge port (a QEMU tap, a veth whose peer is in a container's unnamed namespace)
carries no VM MAC: the collector learns it from the frames the VM sends (``from_vm``), and
``Discovery`` hands it on (to the mirror, and to the control plane at the next refresh).
One MAC per port — the VM's own — by this rule:

- the VM's MAC is the first unicast source MAC it sends from on the port (after the port
  appears or the collector starts);
- it stays the VM's MAC as long as the VM keeps sending from it; other source MACs on the
  same port (a macvlan or a second address in the VM, VMs nested behind a bridge in it) do
  not replace it and are not reported to the control plane: the analyzer attributes their
  frames to the port by the tags, like the VM's own (``analysis.endpoints``);
- only once the VM has sent nothing from it for ``hold_s`` (60 s) does the next other MAC
  it sends from become its MAC (a VM whose MAC was changed). So a port's MAC changes at most
  once per ``hold_s`` however its source MACs flap, and so do the registrations it causes.

Counted (``counters``): ``learned`` (ports that got a MAC), ``changed`` (a learned MAC
replaced), ``other_mac_frames`` (frames a VM sent from a MAC other than its port's). Logged:
each MAC learned or changed, and once per port that its VM sends from several MACs. The
work per batch is numpy over the frames and a loop over the ports that sent; time is an
argument.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numpy as np

from vspan.collectors.mirror import read_macs
from vspan.collectors.model import PortBatch
from vspan.inventory import MAX_VIF, format_mac

__all__ = ["MacLearner", "MacLearningConfig"]

log = logging.getLogger("vspan.collectors.discovery")

_GROUP: Final = np.uint64(1 << 40)
"""The I/G bit of a MAC as a 48-bit integer: a group (multicast, broadcast) address."""


@dataclass(frozen=True, slots=True)
class MacLearningConfig:
    """How long a learned MAC is kept while its VM sends from other MACs only."""

    hold_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.hold_s > 0:
            raise ValueError(f"hold_s {self.hold_s}: must be positive")


@dataclass(slots=True)
class _PortMac:
    mac: int
    """The VM's MAC on the port."""
    seen: float
    """When the VM last sent from it."""
    other: int = 0
    """The last other MAC the VM sent from since, 0 if none."""
    several_logged: bool = False


class MacLearner:
    """Learned MACs by port name (see the module's docstring)."""

    def __init__(self, config: MacLearningConfig | None = None) -> None:
        self.config = config or MacLearningConfig()
        self._ports: dict[str, _PortMac] = {}
        self.counters: dict[str, int] = {"learned": 0, "changed": 0, "other_mac_frames": 0}

    def mac(self, name: str) -> int:
        """The MAC learned for port ``name``, 0 if none."""
        state = self._ports.get(name)
        return 0 if state is None else state.mac

    def keep(self, names: set[str]) -> None:
        """Forget the ports not in ``names`` (gone, or whose source now knows the MAC)."""
        self._ports = {n: s for n, s in self._ports.items() if n in names}

    def observe(self, batch: PortBatch, now: float, learning: dict[int, str]) -> dict[str, int]:
        """Learn from a batch; ``learning`` maps the vif of each port that learns its MAC to
        the port's name. Returns the ports whose MAC is new or changed, with it."""
        if not learning or len(batch.frames) == 0:
            return {}
        frames = batch.frames
        vif = batch.vif.astype(np.int64)
        wanted = np.fromiter(learning, np.int64, len(learning))
        rows = np.flatnonzero(batch.from_vm & (frames.caplen >= 12) & np.isin(vif, wanted))
        _, src = read_macs(frames, rows)
        usable = (src != 0) & ((src & _GROUP) == 0)  # a unicast source MAC
        rows, src = rows[usable], src[usable]
        if rows.size == 0:
            return {}
        port_vif = vif[rows]
        current = np.zeros(MAX_VIF + 1, np.uint64)
        for v, name in learning.items():
            current[v] = self.mac(name)
        out: dict[str, int] = {}
        # A port without a MAC takes the first its VM sent from.
        fresh = current[port_vif] == 0
        vifs, first = np.unique(port_vif[fresh], return_index=True)
        for v, mac in zip(vifs.tolist(), src[fresh][first].tolist(), strict=True):
            name = learning[v]
            self._ports[name] = _PortMac(int(mac), now)
            current[v] = mac
            out[name] = int(mac)
            self.counters["learned"] += 1
            log.info("port %s: VM MAC %s learned from its traffic", name, format_mac(int(mac)))
        own = src == current[port_vif]
        self.counters["other_mac_frames"] += int(rows.size - np.count_nonzero(own))
        for v in np.unique(port_vif[own]).tolist():
            self._ports[learning[v]].seen = now
        if own.all():
            return out
        other_vif, other_src = port_vif[~own][::-1], src[~own][::-1]
        vifs, last = np.unique(other_vif, return_index=True)  # the last other MAC of each
        for v, mac in zip(vifs.tolist(), other_src[last].tolist(), strict=True):
            name = learning[v]
            state = self._ports[name]
            state.other = int(mac)
            if now - state.seen >= self.config.hold_s:
                self._change(name, state, now)
                out[name] = state.mac
            elif not state.several_logged:
                state.several_logged = True
                log.warning(
                    "port %s: its VM sends from several MACs (%s besides %s); %s stays its MAC "
                    "(the first it sent from) while it is in use",
                    name, format_mac(state.other), format_mac(state.mac), format_mac(state.mac),
                )  # fmt: skip
        return out

    def _change(self, name: str, state: _PortMac, now: float) -> None:
        old, state.mac, state.seen, state.other = state.mac, state.other, now, 0
        self.counters["changed"] += 1
        log.warning(
            "port %s: VM MAC %s not seen for %.0f s; its MAC is now %s",
            name, format_mac(old), self.config.hold_s, format_mac(state.mac),
        )  # fmt: skip
