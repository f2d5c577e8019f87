"""One host of the simulated datacenter as a live capture source, paced by a clock.

``SimulatedHostSource`` is a ``CaptureSource`` and ``PortDirectory`` for one host of a
``SimulatedDatacenter`` (``simulator``): ``poll`` hands out window ``k`` once ``k + 1`` ticks
of the ``now`` clock have passed since the first poll of any host, sleeping (``sleep``) up to
its timeout for it; ``ports`` are the host's VM ports as of the last window it handed out.
Between ``start`` and ``stop`` the source holds the windows it has not taken yet, so the
datacenter keeps them for it; a late start skips windows already dropped. The content never
depends on the clock; the clock only paces it. Per-port frame counts go to ``counters``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vspan.batch import FrameBatch, LinkType
from vspan.collectors.model import CaptureCounters, PortBatch
from vspan.inventory import Port

if TYPE_CHECKING:
    from vspan.collectors.simulator.datacenter import SimulatedDatacenter

__all__ = ["SimulatedHostSource"]


class SimulatedHostSource:
    """One simulated host's VM ports: a ``CaptureSource`` and a ``PortDirectory``."""

    def __init__(
        self,
        datacenter: SimulatedDatacenter,
        host: int,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.datacenter = datacenter
        self.host = host
        self.name = datacenter.host_names[host]
        self.collector_id = host + 1
        self.now = now
        self.sleep = sleep
        self.counters = CaptureCounters()
        self.next_window = 0
        """The next window ``poll`` hands out."""
        self._started = False

    def ports(self) -> list[Port]:
        """This host's VM ports as of the last window handed out."""
        return self.datacenter.ports(self.host, max(self.next_window - 1, 0))

    def start(self) -> None:
        """Hold the windows this host has not taken yet (a late start skips those dropped)."""
        self._started = True
        self.next_window = self.datacenter._hold(self.host, self.next_window)

    def stop(self) -> None:
        """Stop holding windows; idempotent."""
        self._started = False
        self.datacenter._hold(self.host, None)

    def poll(self, timeout_s: float) -> PortBatch | None:
        """The next window once its end is due, sleeping up to ``timeout_s`` for it."""
        if not self._started:
            raise RuntimeError("SimulatedHostSource.poll before start()")
        tick = self.datacenter.config.tick_s
        now = self.now()
        start = self.datacenter._start_clock(now)
        wait = start + (self.next_window + 1) * tick - now
        if wait > 0:
            self.sleep(min(wait, max(timeout_s, 0.0)))
            if wait > timeout_s:
                return None
        k = self.next_window
        self.next_window += 1
        win, rows = self.datacenter._take(self.host, k)
        if rows.start == rows.stop:
            return None
        f = win.frames
        frames = FrameBatch(
            data=f.data, offset=f.offset[rows], caplen=f.caplen[rows], origlen=f.origlen[rows],
            ts_ns=f.ts_ns[rows], linktype=np.full(rows.stop - rows.start, LinkType.ETHERNET,
                                                  dtype=np.uint16),
        )  # fmt: skip
        vif = win.vif[rows]
        c = self.counters
        c.frames += len(frames)
        c.bytes += int(frames.caplen.sum(dtype=np.int64))
        names = {p.vif: p.name for p in self.ports()}
        seen, count = np.unique(vif, return_counts=True)
        for v, n in zip(seen.tolist(), count.tolist(), strict=True):
            name = names.get(v, f"vif{v}")
            c.per_port[name] = c.per_port.get(name, 0) + n
        return PortBatch(frames, vif, win.from_vm[rows])
