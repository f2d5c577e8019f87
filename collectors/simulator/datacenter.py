"""A virtual datacenter as live capture sources, one per host, with ground truth.

``SimulatedDatacenter`` holds hosts and VMs in tiers (``simulator.model``) and cuts the
simulated time into windows of ``tick_s × time_scale`` seconds. Window ``k`` is generated
once, in order, from ``(seed, k)`` alone: maybe a live migration (a VM moves to another host,
same MAC and IPs, a new vif there), then new flows and segments of long-lived connections at
the rates of the traffic model (daily and weekly rhythm of the *simulated* clock, bursts,
some traffic the example port-profiles deny). Frames are built by the synth generator
(``synth.packets.plan_frames``, ``synth.frames.build_frames``; see ``simulator.window``) and
stripped of the VN-Tag, so they are what the VM ports show: a packet between two VMs once on
the sender's port (``from_vm``) and once on the receiver's, on one host or two; a packet to
or from the outside on its VM's port only.

``SimulatedDatacenter.source`` gives one host's ``SimulatedHostSource``
(``simulator.source``), a ``CaptureSource`` and ``PortDirectory`` paced by a clock; the
content never depends on the clock.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from vspan.collectors.simulator.model import POOL_SHARE, SERVICES, TIERS, SimVms, make_vms, rhythm
from vspan.collectors.simulator.source import SimulatedHostSource
from vspan.collectors.simulator.window import (
    WindowFrames,
    make_pools,
    plan_new_flows,
    pool_packets,
    port_frames,
)
from vspan.errors import ConfigError
from vspan.inventory import Host, Inventory, Nic, Port, Vm
from vspan.synth.packets import plan_frames

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEFAULT_START_NS", "SimMigration", "SimulatedDatacenter", "SimulatedHostSource",
           "SimulatorConfig"]  # fmt: skip

I64 = npt.NDArray[np.int64]
DEFAULT_START_NS: Final = 1_795_392_000 * 10**9
"""Monday 2026-11-23 00:00 UTC."""
_WEIGHT: Final = np.array([s.weight for s in SERVICES]) / sum(s.weight for s in SERVICES)
"""Share of each service in the traffic at full rhythm."""
_KEEP_UNPOLLED: Final = 8
"""Windows kept for ``window()`` when no source holds a cursor."""


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """The datacenter and its clock."""

    hosts: int = 4
    vms_per_host: int = 8
    seed: int = 1
    rate: float = 3000.0
    """Frames per real second on all VM ports at the busiest hour (weekday 14:00 UTC)."""
    time_scale: float = 60.0
    """Simulated seconds per real second."""
    tick_s: float = 0.25
    """Real seconds per window."""
    start_ns: int = DEFAULT_START_NS
    """The simulated clock (UNIX ns) at the start of window 0."""
    migration_every_s: float | None = 600.0
    """Mean simulated seconds between live migrations; None: never."""
    burst_chance: float = 0.03
    """Chance that a window carries a burst (one service at 3–8 times its rate)."""
    ipv6_share: float = 0.1
    truth_bin_s: float = 60.0
    """Simulated seconds per bin of ``truth_matrix``."""

    def validate(self) -> None:
        """``ConfigError`` naming the first bad setting."""
        checks = [
            (1 <= self.hosts <= 64, f"hosts must be 1..64, got {self.hosts}"),
            (1 <= self.vms_per_host <= 500, f"vms_per_host must be 1..500: {self.vms_per_host}"),
            (self.hosts * self.vms_per_host >= 2, "the datacenter needs at least 2 VMs"),
            (self.rate > 0 and self.time_scale > 0 and self.tick_s > 0,
             "rate, time_scale and tick_s must be positive"),
            (self.migration_every_s is None or self.migration_every_s > 0,
             f"migration_every_s must be positive or None, got {self.migration_every_s}"),
            (0 <= self.burst_chance <= 1 and 0 <= self.ipv6_share <= 1,
             "burst_chance and ipv6_share must lie in 0..1"),
            (self.truth_bin_s > 0, "truth_bin_s must be positive"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"simulator: {message}")


@dataclass(frozen=True, slots=True)
class SimMigration:
    """A live migration, at the start of ``window``."""

    window: int
    time_ns: int
    vm: str
    from_host: str
    to_host: str
    from_vif: int
    to_vif: int


class SimulatedDatacenter:
    """Hosts, VMs, traffic and migrations; windows of frames generated on demand, in order."""

    def __init__(self, config: SimulatorConfig) -> None:
        config.validate()
        self.config = config
        seed = config.seed
        self.vms: SimVms
        self.vms, host, vif = make_vms(
            np.random.default_rng([seed, 0]), config.hosts, config.vms_per_host
        )
        self.pools = make_pools(np.random.default_rng([seed, 1]), self.vms, config.ipv6_share)
        self.host_names = tuple(f"hv{h + 1:02d}" for h in range(config.hosts))
        self.window_ns = round(config.tick_s * config.time_scale * 1e9)
        self.migrations: list[SimMigration] = []
        self.frames_generated = 0
        self.flows_started = 0
        self._placements: list[tuple[int, I64, I64]] = [(0, host, vif)]
        self._windows: dict[int, WindowFrames] = {}
        self._next = 0
        self._truth: list[I64] = []
        self._cursors: dict[int, int] = {}
        self._clock_start: float | None = None
        self._lock = threading.Lock()

    # --- windows ------------------------------------------------------------------------

    def window(self, k: int) -> WindowFrames:
        """Window ``k`` (generating every earlier one first); ``ValueError`` once dropped."""
        with self._lock:
            while self._next <= k:
                self._generate()
            if k not in self._windows:
                raise ValueError(f"window {k} was handed to every host and dropped")
            return self._windows[k]

    def budget(self, t_ns: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Frames per service (rows) the model aims at for windows centred at ``t_ns``
        (columns), before bursts."""
        levels = np.stack([rhythm(s.rhythm, np.atleast_1d(t_ns)) for s in SERVICES])
        scale = self.config.rate * self.config.tick_s
        return np.asarray(scale * _WEIGHT[:, None] * levels, dtype=np.float64)

    def expected_frames(self, t_ns: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Frames the model aims at for windows centred at simulated times ``t_ns``."""
        return np.asarray(self.budget(t_ns).sum(axis=0), dtype=np.float64)

    def placement(self, k: int) -> tuple[I64, I64]:
        """(host index, vif) of every VM during window ``k`` (generated windows only)."""
        with self._lock:
            return self._placement(k)

    def _placement(self, k: int) -> tuple[I64, I64]:
        for start, host, vif in reversed(self._placements):
            if start <= k:
                return host, vif
        return self._placements[0][1], self._placements[0][2]

    def _generate(self) -> None:
        cfg, k = self.config, self._next
        self._next += 1
        self._migrate(k, np.random.default_rng([cfg.seed, 2, k]))
        host, vif = self._placements[-1][1], self._placements[-1][2]
        rng = np.random.default_rng([cfg.seed, 3, k])
        t0 = cfg.start_ns + k * self.window_ns
        budget = self.budget(t0 + self.window_ns // 2)[:, 0]
        if rng.random() < cfg.burst_chance:
            budget[rng.choice(len(SERVICES), p=_WEIGHT)] *= rng.uniform(3.0, 8.0)
        pooled = np.bincount(self.pools.service, minlength=len(SERVICES)) > 0
        plan, _ = plan_new_flows(
            rng, self.vms, host, budget * np.where(pooled, 1.0 - POOL_SHARE, 1.0),
            first_port=self.flows_started, ipv6_share=cfg.ipv6_share,
        )  # fmt: skip
        self.flows_started += plan.packets.size
        table = self.vms.table(host, vif)
        fp = (
            plan_frames(rng, table, plan, duration_ns=self.window_ns) if plan.packets.size else None
        )
        pool = pool_packets(rng, self.vms, self.pools, budget * POOL_SHARE, self.window_ns)
        win = port_frames(
            rng, table, plan, fp, pool, start_ns=t0, hosts=cfg.hosts, flows=plan.packets.size
        )
        self.frames_generated += len(win.frames)
        self._windows[k] = win
        self._add_truth(win.truth)
        floor = min(self._cursors.values(), default=k - _KEEP_UNPOLLED + 1)
        for old in [w for w in self._windows if w < floor]:
            del self._windows[old]

    def _migrate(self, k: int, rng: np.random.Generator) -> None:
        cfg = self.config
        every = cfg.migration_every_s
        if k == 0 or every is None or cfg.hosts < 2:
            return
        if rng.random() >= -math.expm1(-self.window_ns / 1e9 / every):
            return
        host, vif = self._placements[-1][1].copy(), self._placements[-1][2].copy()
        vm = int(rng.integers(0, host.size))
        to = int((host[vm] + rng.integers(1, cfg.hosts)) % cfg.hosts)
        free = np.setdiff1d(np.arange(1, 4096), vif[host == to])
        new_vif = int(rng.choice(free))
        self.migrations.append(SimMigration(
            window=k, time_ns=cfg.start_ns + k * self.window_ns, vm=self.vms.names[vm],
            from_host=self.host_names[host[vm]], to_host=self.host_names[to],
            from_vif=int(vif[vm]), to_vif=new_vif,
        ))  # fmt: skip
        host[vm], vif[vm] = to, new_vif
        self._placements.append((k, host, vif))

    def _add_truth(self, rows: I64) -> None:
        if not rows.size:
            return
        cfg = self.config
        bins = (rows[:, 4] - cfg.start_ns) // round(cfg.truth_bin_s * 1e9)
        keys = np.column_stack([bins, rows[:, :4]])
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        packets = np.bincount(inverse, minlength=len(uniq))
        size = np.bincount(inverse, weights=rows[:, 5], minlength=len(uniq))
        self._truth.append(np.column_stack([uniq, packets, size.astype(np.int64)]))

    # --- sources ------------------------------------------------------------------------

    def source(
        self,
        host: int | str,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> SimulatedHostSource:
        """The capture source of one host (by index or name)."""
        index = self.host_names.index(host) if isinstance(host, str) else host
        if not 0 <= index < self.config.hosts:
            raise ValueError(f"no host {host!r}; the datacenter has {self.host_names}")
        return SimulatedHostSource(self, index, now=now, sleep=sleep)

    def ports(self, host: int, window: int) -> list[Port]:
        """The VM ports of ``host`` during ``window``."""
        with self._lock:
            where, vif = self._placement(window)
        return [
            Port(f"{self.vms.names[i]}-nic0", 0, int(vif[i]), int(self.vms.mac[i]),
                 self.vms.names[i], self.vms.uuids[i], TIERS[self.vms.tier[i]], "br-sim")
            for i in np.flatnonzero(where == host).tolist()
        ]  # fmt: skip

    def inventory(self, window: int = 0) -> Inventory:
        """Hosts and VMs as placed during ``window``, in vspan's inventory model."""
        with self._lock:
            where, vif = self._placement(window)
        hosts = [Host(name=n, collector_id=i + 1) for i, n in enumerate(self.host_names)]
        v = self.vms
        vms = [
            Vm(name=v.names[i], uuid=v.uuids[i], host=self.host_names[where[i]],
               profile=TIERS[v.tier[i]], nics=(Nic(mac=int(v.mac[i]), vif=int(vif[i]), ips=(
                   str(ipaddress.IPv4Address(int(v.ip4[i]))),
                   str(ipaddress.IPv6Address((int(v.ip6_hi[i]) << 64) | int(v.ip6_lo[i]))),
               )),))
            for i in range(len(v.names))
        ]  # fmt: skip
        return Inventory(hosts, vms)

    def _take(self, host: int, k: int) -> tuple[WindowFrames, slice]:
        win = self.window(k)
        with self._lock:
            self._cursors[host] = k + 1
        return win, slice(int(win.bounds[host]), int(win.bounds[host + 1]))

    def _start_clock(self, now: float) -> float:
        with self._lock:
            if self._clock_start is None:
                self._clock_start = now
            return self._clock_start

    def _hold(self, host: int, cursor: int | None) -> int:
        """Hold windows from ``cursor`` on for ``host`` (None: release); returns the cursor,
        moved up to the oldest window still kept when earlier ones were dropped."""
        with self._lock:
            if cursor is None:
                self._cursors.pop(host, None)
                return 0
            if self._next > 0:
                cursor = max(cursor, min(self._windows, default=self._next))
            self._cursors[host] = cursor
            return cursor

    # --- ground truth -------------------------------------------------------------------

    def truth_matrix(self) -> pd.DataFrame:
        """Bytes and packets per VM pair, host pair and time bin, each packet counted once.

        Columns: ``time`` (bin start, UTC), ``src_vm, dst_vm`` (None outside), ``src_host,
        dst_host`` (where the VM ran; None outside), ``scope`` (intra-host, cross-host,
        external), ``packets``, ``bytes`` (untagged frames, as the VM ports show them).
        """
        import pandas as pd

        with self._lock:
            rows = np.concatenate(self._truth) if self._truth else np.zeros((0, 7), np.int64)
        cols = ["bin", "src", "dst", "src_h", "dst_h"]
        df = pd.DataFrame(rows, columns=[*cols, "packets", "bytes"])
        df = df.groupby(cols, as_index=False, sort=True)[["packets", "bytes"]].sum()
        names = np.array([*self.vms.names, None], dtype=object)
        hosts = np.array([*self.host_names, None], dtype=object)
        both = (df["src"] >= 0) & (df["dst"] >= 0)
        scope = np.where(both, np.where(df["src_h"] == df["dst_h"], "intra-host", "cross-host"),
                         "external")  # fmt: skip
        bin_ns = round(self.config.truth_bin_s * 1e9)
        return pd.DataFrame({
            "time": pd.to_datetime(self.config.start_ns + df["bin"] * bin_ns, unit="ns", utc=True),
            "src_vm": names[df["src"].to_numpy()], "dst_vm": names[df["dst"].to_numpy()],
            "src_host": hosts[df["src_h"].to_numpy()], "dst_host": hosts[df["dst_h"].to_numpy()],
            "scope": scope, "packets": df["packets"].astype(np.int64),
            "bytes": df["bytes"].astype(np.int64),
        })  # fmt: skip
