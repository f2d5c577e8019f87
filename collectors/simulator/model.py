"""Traffic model of the datacenter simulator: VMs in tiers, services between tiers, rhythm.

Sans-I/O and clock-free. ``make_vms`` draws the VMs; ``SERVICES`` says who talks to whom
(tiers, protocol, port, share of the traffic, daily shape, and whether the example
port-profiles deny it); ``rhythm`` gives a service's level at a simulated instant;
``pick_pair`` and ``pick_server`` draw the client and server VMs of a service's flows. The
flows, pooled segments and port frames of one window of simulated time are drawn from this
model by ``simulator.window``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from vspan.synth import TIER_SHARES, TIERS, UUID_NAMESPACE
from vspan.synth.plan import KIND_ICMP, KIND_TCP, KIND_UDP_SMALL, VmTable

__all__ = [
    "APP",
    "BACKUP",
    "CACHE",
    "DB",
    "EXT",
    "SERVICES",
    "TIERS",
    "WEB",
    "Rhythm",
    "Service",
    "SimVms",
    "make_vms",
    "mean_packets",
    "members",
    "rhythm",
    "usable",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Rhythm = Literal["day", "night", "flat"]

WEB, APP, DB, CACHE, BACKUP = range(5)
EXT: Final = -1
"""An endpoint outside the datacenter."""
TCP_SIGMA: Final = 1.0
"""Spread (log-normal sigma) of the data packets of a TCP flow around its median."""


@dataclass(frozen=True, slots=True)
class Service:
    """Traffic of one kind between two tiers (or a tier and the outside)."""

    name: str
    client: int
    """Tier that opens the flows (``EXT`` for the outside)."""
    server: int
    kind: int
    """``synth_plan.KIND_*``."""
    port: int
    """Server port (0 for ICMP)."""
    weight: float
    """Share of all frames at full rhythm."""
    rhythm: Rhythm
    packets: float
    """Median data packets of a TCP flow (other kinds have fixed sizes)."""
    pool: int = 0
    """Long-lived connections per client VM (connection pools); they carry ``POOL_SHARE``."""
    violation: bool = False
    """Denied by ``docs/examples/profiles.yaml``."""


POOL_SHARE: Final = 0.4
"""Share of a pooled service's frames carried by its long-lived connections."""

SERVICES: Final = (
    Service("https", EXT, WEB, KIND_TCP, 443, 30, "day", 12),
    Service("http", EXT, WEB, KIND_TCP, 80, 4, "day", 8),
    Service("web-app", WEB, APP, KIND_TCP, 8080, 18, "day", 10),
    Service("web-cache", WEB, CACHE, KIND_TCP, 6379, 8, "day", 4, pool=1),
    Service("app-db", APP, DB, KIND_TCP, 5432, 12, "day", 10, pool=2),
    Service("app-cache", APP, CACHE, KIND_TCP, 11211, 5, "day", 4, pool=1),
    Service("app-app", APP, APP, KIND_TCP, 8443, 3, "day", 6),
    Service("dns", WEB, EXT, KIND_UDP_SMALL, 53, 3, "day", 2),
    Service("ntp", APP, EXT, KIND_UDP_SMALL, 123, 1, "flat", 2),
    Service("rsync-backup", DB, BACKUP, KIND_TCP, 873, 10, "night", 60),
    Service("ping", APP, DB, KIND_ICMP, 0, 1, "flat", 4),
    # Denied by the example profiles: backup takes ssh from 10.0.0.0/8 only; the database
    # takes 5432 from the app tier only; app servers may not reach 198.51.100.0/24; the
    # cache tier opens nothing.
    Service("ssh-from-outside", EXT, BACKUP, KIND_TCP, 22, 0.6, "flat", 8, violation=True),
    Service("web-db-direct", WEB, DB, KIND_TCP, 5432, 0.8, "day", 8, violation=True),
    Service("app-internet", APP, EXT, KIND_TCP, 443, 0.8, "day", 8, violation=True),
    Service("cache-db", CACHE, DB, KIND_TCP, 5432, 0.4, "flat", 6, violation=True),
)


def mean_packets(service: Service) -> float:
    """Mean packets of one new flow of ``service`` (both directions)."""
    if service.kind == KIND_TCP:
        return 6.0 + service.packets * float(np.exp(TCP_SIGMA**2 / 2))
    if service.kind == KIND_ICMP:
        return 5.0  # 1..4 echo requests and their replies
    return 2.0  # a query and its answer


def _circular(hours: F64, centre: float) -> F64:
    return np.asarray((hours - centre + 12.0) % 24.0 - 12.0, dtype=np.float64)


def rhythm(shape: Rhythm, t_ns: npt.ArrayLike) -> F64:
    """Level (0..1) of a service of ``shape`` at simulated UNIX times ``t_ns``.

    ``day``: business traffic, highest at 14:00 UTC, a tenth at night, 40 % on weekends;
    ``night``: backups, highest at 02:00 UTC, every day; ``flat``: always 1.
    """
    t_s = np.asarray(t_ns, dtype=np.float64) / 1e9
    hours = (t_s % 86_400.0) / 3600.0
    weekday = (np.floor(t_s / 86_400.0) + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    if shape == "day":
        level = 0.10 + 0.90 * np.exp(-0.5 * (_circular(hours, 14.0) / 3.5) ** 2)
        return np.asarray(level * np.where(weekday >= 5, 0.4, 1.0), dtype=np.float64)
    if shape == "night":
        return np.asarray(
            0.05 + 0.95 * np.exp(-0.5 * (_circular(hours, 2.0) / 1.5) ** 2), dtype=np.float64
        )
    return np.ones_like(t_s)


@dataclass(frozen=True, slots=True, eq=False)
class SimVms:
    """The VMs, by index; placement (host, vif) lives with the datacenter, it changes."""

    names: tuple[str, ...]
    uuids: tuple[str, ...]
    tier: I64
    mac: I64
    ip4: npt.NDArray[np.uint64]
    ip6_hi: npt.NDArray[np.uint64]
    ip6_lo: npt.NDArray[np.uint64]

    def table(self, host: I64, vif: I64) -> VmTable:
        """The synth generator's view of the VMs placed on ``host`` with ``vif``."""
        return VmTable(
            host=host,
            vif=vif,
            mac=self.mac,
            ip4=self.ip4,
            ip6_hi=self.ip6_hi,
            ip6_lo=self.ip6_lo,
            tier=self.tier,
            vlan=np.full(self.tier.size, -1, dtype=np.int64),
        )


def make_vms(rng: np.random.Generator, hosts: int, per_host: int) -> tuple[SimVms, I64, I64]:
    """``hosts × per_host`` VMs in tiers (every tier once, then by ``TIER_SHARES``), spread
    over the hosts so each runs a mix; returns the VMs, their host indices and vifs."""
    n = hosts * per_host
    counts = (np.arange(len(TIERS)) < n).astype(np.int64)
    rest = n - int(counts.sum())
    if rest > 0:
        counts += np.floor(np.asarray(TIER_SHARES) * rest).astype(np.int64)
        counts[0] += n - int(counts.sum())
    tier = np.repeat(np.arange(len(TIERS), dtype=np.int64), counts)
    k = np.concatenate([np.arange(1, c + 1) for c in counts if c]).astype(np.int64)
    names = tuple(f"{TIERS[t]}-{i:02d}" for t, i in zip(tier.tolist(), k.tolist(), strict=True))
    host = np.empty(n, dtype=np.int64)
    host[rng.permutation(n)] = np.arange(n) % hosts
    vif = np.zeros(n, dtype=np.int64)
    for h in range(hosts):
        mine = np.flatnonzero(host == h)
        vif[mine] = rng.choice(4095, size=mine.size, replace=False) + 1
    t = tier + 1
    vms = SimVms(
        names=names,
        uuids=tuple(str(uuid.uuid5(UUID_NAMESPACE, name)) for name in names),
        tier=tier,
        mac=0x525400000000 + np.arange(1, n + 1, dtype=np.int64),
        ip4=((10 << 24) | (t << 16) | k).astype(np.uint64),
        ip6_hi=np.full(n, 0xFD00 << 48, dtype=np.uint64),
        ip6_lo=((t << 32) | ((k >> 8) << 16) | (k & 0xFF)).astype(np.uint64),
    )
    return vms, host, vif


def members(vms: SimVms) -> list[I64]:
    """VM indices of each tier."""
    return [np.flatnonzero(vms.tier == t) for t in range(len(TIERS))]


def pick_pair(rng: np.random.Generator, tiers: list[I64], svc: Service, n: int) -> tuple[I64, I64]:
    """``n`` (client, server) VM indices of ``svc`` (-1 for the outside)."""
    client = np.full(n, EXT, dtype=np.int64)
    if svc.client != EXT:
        client = rng.choice(tiers[svc.client], n).astype(np.int64)
    return client, pick_server(rng, tiers, svc, client)


def pick_server(rng: np.random.Generator, tiers: list[I64], svc: Service, client: I64) -> I64:
    """A server VM of ``svc`` for each client (-1 for the outside), never a VM to itself."""
    n = client.size
    if svc.server == EXT:
        return np.full(n, EXT, dtype=np.int64)
    pool = tiers[svc.server]
    if svc.client != svc.server:
        return rng.choice(pool, n).astype(np.int64)
    j = rng.integers(0, pool.size - 1, n)
    own = np.searchsorted(pool, client)
    return pool[j + (j >= own)].astype(np.int64)


def usable(tiers: list[I64], svc: Service) -> bool:
    """Whether the VMs have both ends of ``svc``."""
    need = {t: 1 for t in (svc.client, svc.server) if t != EXT}
    if svc.client == svc.server != EXT:
        need[svc.client] = 2
    return all(tiers[t].size >= k for t, k in need.items())
