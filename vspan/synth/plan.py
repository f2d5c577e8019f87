"""Flow planning for the synthetic capture generator: who talks to whom, how much, and when.

Everything is drawn per flow as numpy columns from one seeded generator per stage; no bytes
and no clock here. ``plan_flows`` picks scopes, endpoints, kinds, sizes, IP versions, VLANs
and 5-tuples (unique, so an analyzer never merges two generated flows);
``synth.packets.plan_packets`` then expands flows into packets and observed copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "CROSS",
    "EPHEMERAL",
    "EXTERNAL",
    "EXT_CLIENT_V4",
    "EXT_SERVER_V4",
    "EXT_V6_HI",
    "INTRA",
    "KIND_ICMP",
    "KIND_TCP",
    "KIND_UDP_BULK",
    "KIND_UDP_SMALL",
    "FlowPlan",
    "VmTable",
    "plan_flows",
]

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]
Rng = np.random.Generator

INTRA, CROSS, EXTERNAL = 0, 1, 2
KIND_TCP, KIND_UDP_SMALL, KIND_UDP_BULK, KIND_ICMP = 0, 1, 2, 3
KIND_SHARES: Final = (0.60, 0.20, 0.07, 0.13)
"""Share of flows of each kind: TCP, small UDP (DNS-like), bulk UDP, ICMP echo."""
PARETO_ALPHA: Final = 1.05
"""Tail of the flow-size distribution (TCP and bulk UDP): a few elephants, many mice."""
TCP_PORTS: Final = np.array([[443, 80], [8080, 8443], [5432, 3306], [6379, 11211], [873, 22]])
"""Server ports by tier (web, app, db, cache, backup): main, other."""
EXT_TCP_PORTS: Final = np.array([443, 80])
UDP_SMALL_PORTS: Final = np.array([53, 123, 161])
UDP_BULK_PORTS: Final = np.array([514, 4739, 5001])
EPHEMERAL: Final = (32768, 61000)
"""Linux's default ephemeral port range."""
EXT_CLIENT_V4: Final = 0xC6120000
"""198.18.0.0/15: remote clients (inbound)."""
EXT_SERVER_V4: Final = 0xC6336400
"""198.51.100.0/24: a few popular remote services (outbound)."""
EXT_V6_HI: Final = 0x20010DB800000000
"""2001:db8::/32 for remote IPv6 peers."""


@dataclass(frozen=True, slots=True, eq=False)
class VmTable:
    """The VMs as columns, by VM index."""

    host: I64
    """Host index (0-based; collector_id is index + 1)."""
    vif: I64
    mac: I64
    ip4: U64
    ip6_hi: U64
    ip6_lo: U64
    tier: I64
    vlan: I64


@dataclass(frozen=True, slots=True, eq=False)
class FlowPlan:
    """One row per flow; the client sends the first packet."""

    scope: I64
    kind: I64
    client: I64
    """VM index of the client, -1 for an external peer."""
    server: I64
    packets: I64
    """Packets of the flow, each counted once."""
    mult: I64
    """Copies of each packet in the capture (2 for cross-host)."""
    rst: npt.NDArray[np.bool_]
    """TCP flows closed by a RST instead of FINs."""
    ipver: I64
    vlan: I64
    """802.1Q VLAN id, -1 for untagged."""
    proto: I64
    sport: I64
    dport: I64
    icmp_id: I64
    """Echo identifier, -1 for non-ICMP flows."""
    client_hi: U64
    client_lo: U64
    server_hi: U64
    server_lo: U64
    ext_ttl: I64
    """TTL of packets from the external peer."""


def plan_flows(
    rng: Rng,
    vms: VmTable,
    *,
    hosts: int,
    packets: int,
    flows: int,
    shares: tuple[float, float, float],
    ipv6_share: float,
    vlan_share: float,
) -> FlowPlan:
    """Draw ``flows`` flows whose copies add up to exactly ``packets`` frames."""
    f = flows
    scope = rng.choice(3, size=f, p=np.asarray(shares) / sum(shares))
    kind = rng.choice(4, size=f, p=KIND_SHARES)
    cover = np.arange(min(f, 12))  # every (scope, kind) pair at least once
    scope[cover], kind[cover] = cover % 3, (cover // 3) % 4
    scope, client, server = _endpoints(rng, vms, hosts, scope)
    mult = np.where(scope == CROSS, 2, 1)
    n, rst = _sizes(rng, kind, mult, packets)
    frames = n * mult
    forced_v6 = cover[(kind[cover] == KIND_ICMP) & (scope[cover] != EXTERNAL)]
    forced_vlan = cover[(kind[cover] == KIND_UDP_SMALL) & (scope[cover] != EXTERNAL)]
    v6 = _pick_share(rng, frames, ipv6_share, forced_v6)
    tagged = _pick_share(rng, frames, vlan_share, forced_vlan)
    ipver = np.where(v6, 6, 4)
    owner = np.where(server >= 0, server, client)
    vlan = np.where(tagged, vms.vlan[owner], -1)
    proto = np.select(
        [kind == KIND_TCP, kind == KIND_ICMP], [6, np.where(v6, 58, 1)], default=17
    ).astype(np.int64)
    sport, dport, icmp_id = _ports(rng, vms, kind, server)
    ch, cl = _addresses(rng, vms, client, v6, inbound=True)
    sh, sl = _addresses(rng, vms, server, v6, inbound=False)
    sport, icmp_id = _dedupe(rng, cl, sl, proto=proto, dport=dport, sport=sport, icmp_id=icmp_id)
    return FlowPlan(
        scope=scope.astype(np.int64),
        kind=kind.astype(np.int64),
        client=client,
        server=server,
        packets=n,
        mult=mult.astype(np.int64),
        rst=rst,
        ipver=ipver.astype(np.int64),
        vlan=vlan.astype(np.int64),
        proto=proto,
        sport=sport,
        dport=dport,
        icmp_id=icmp_id,
        client_hi=ch,
        client_lo=cl,
        server_hi=sh,
        server_lo=sl,
        ext_ttl=(64 - rng.integers(3, 20, f)).astype(np.int64),
    )


def _endpoints(rng: Rng, vms: VmTable, hosts: int, scope: I64) -> tuple[I64, I64, I64]:
    """A VM per flow and its peer: another VM on its host, one elsewhere, or external."""
    f, v = scope.size, vms.host.size
    order = np.argsort(vms.host, kind="stable")
    count = np.bincount(vms.host, minlength=hosts)
    start = np.concatenate(([0], np.cumsum(count)[:-1]))
    rank = np.empty(v, dtype=np.int64)
    rank[order] = np.arange(v) - start[vms.host[order]]
    vm = rng.integers(0, v, f)
    h = vms.host[vm]
    local, remote = count[h], v - count[h]
    scope = np.where((scope == INTRA) & (local < 2), np.where(remote > 0, CROSS, EXTERNAL), scope)
    scope = np.where((scope == CROSS) & (remote == 0), np.where(local > 1, INTRA, EXTERNAL), scope)
    u = rng.random(f)
    j = (u * np.maximum(local - 1, 1)).astype(np.int64)
    intra_peer = order[np.minimum(start[h] + j + (j >= rank[vm]), v - 1)]
    k = (u * np.maximum(remote, 1)).astype(np.int64)
    cross_peer = order[np.minimum(k + np.where(k >= start[h], local, 0), v - 1)]
    peer = np.select([scope == INTRA, scope == CROSS], [intra_peer, cross_peer], default=-1)
    inbound = (scope == EXTERNAL) & (rng.random(f) < 0.5)
    client = np.where(inbound, -1, vm).astype(np.int64)
    server = np.where(inbound, vm, peer).astype(np.int64)
    return scope.astype(np.int64), client, server


def _sizes(rng: Rng, kind: I64, mult: I64, packets: int) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Packets per flow: fixed small kinds, heavy-tailed TCP and bulk UDP, exact total."""
    f = kind.size
    rst = (kind == KIND_TCP) & (rng.random(f) < 0.08)
    udp_small = rng.choice(np.array([1, 2, 2, 2, 4]), f)
    pings = 2 * rng.integers(1, 9, f)
    minimum = np.select(
        [kind == KIND_TCP, kind == KIND_UDP_SMALL, kind == KIND_UDP_BULK],
        [np.where(rst, 4, 6), udp_small, 1],
        default=pings,
    ).astype(np.int64)
    elastic = (kind == KIND_TCP) | (kind == KIND_UDP_BULK)
    weight = np.where(elastic, rng.pareto(PARETO_ALPHA, f), 0.0)
    need = int((minimum * mult).sum())
    budget = packets - need
    if budget < 0:
        raise ValueError(
            f"packets={packets} is too few for {f} flows: their minimum sizes need {need} frames"
        )
    if weight.sum() <= 0:
        weight = np.ones(f)
    extra = np.floor(budget * weight / weight.sum() / mult).astype(np.int64)
    left = budget - int((extra * mult).sum())
    single = np.flatnonzero(mult == 1)
    if single.size:
        extra[single[np.argmax(weight[single])]] += left
    elif left % 2 == 0:
        extra[np.argmax(weight)] += left // 2
    else:
        raise ValueError(f"packets={packets} is odd but every flow is cross-host (2 copies)")
    return minimum + extra, rst


def _pick_share(rng: Rng, frames: I64, share: float, forced: I64) -> npt.NDArray[np.bool_]:
    """Flows holding about ``share`` of all frames: forced ones, then random small ones."""
    target = share * float(frames.sum())
    chosen = np.zeros(frames.size, dtype=np.bool_)
    chosen[forced] = share > 0
    candidates = np.flatnonzero(~chosen & (frames <= max(target / 4, 1)))
    perm = rng.permutation(candidates)
    cum = float(frames[chosen].sum()) + np.cumsum(frames[perm])
    chosen[perm[cum <= target]] = True
    return chosen


def _ports(rng: Rng, vms: VmTable, kind: I64, server: I64) -> tuple[I64, I64, I64]:
    f = kind.size
    other = (rng.random(f) < 0.25).astype(np.int64)
    tier = vms.tier[np.maximum(server, 0)]
    tcp = np.where(server >= 0, TCP_PORTS[tier, other], EXT_TCP_PORTS[other])
    small = rng.choice(UDP_SMALL_PORTS, f, p=[0.7, 0.2, 0.1])
    bulk = rng.choice(UDP_BULK_PORTS, f)
    icmp = kind == KIND_ICMP
    dport = np.select(
        [kind == KIND_TCP, kind == KIND_UDP_SMALL, kind == KIND_UDP_BULK],
        [tcp, small, bulk],
        default=0,
    ).astype(np.int64)
    sport = np.where(icmp, 0, rng.integers(*EPHEMERAL, f)).astype(np.int64)
    icmp_id = np.where(icmp, rng.integers(1, 65536, f), -1).astype(np.int64)
    return sport, dport, icmp_id


def _addresses(
    rng: Rng, vms: VmTable, vm: I64, v6: npt.NDArray[np.bool_], *, inbound: bool
) -> tuple[U64, U64]:
    """(high, low) address words of each flow end; IPv4 in the low word."""
    f = vm.size
    if inbound:  # external clients come from anywhere
        ext4 = EXT_CLIENT_V4 + rng.integers(0, 1 << 17, f)
        ext6_lo = rng.integers(0, 1 << 62, f)
    else:  # external servers are a few popular services
        pick = rng.integers(1, 17, f)
        ext4, ext6_lo = EXT_SERVER_V4 + pick, (0x53 << 32) + pick
    ext6_hi = EXT_V6_HI + rng.integers(0, 1 << 16, f) * inbound
    idx = np.maximum(vm, 0)
    is_vm = vm >= 0
    lo4 = np.where(is_vm, vms.ip4[idx], ext4.astype(np.uint64))
    hi6 = np.where(is_vm, vms.ip6_hi[idx], np.asarray(ext6_hi, dtype=np.uint64))
    lo6 = np.where(is_vm, vms.ip6_lo[idx], ext6_lo.astype(np.uint64))
    hi = np.where(v6, hi6, np.uint64(0)).astype(np.uint64)
    lo = np.where(v6, lo6, lo4).astype(np.uint64)
    return hi, lo


def _dedupe(
    rng: Rng, client: U64, server: U64, *, proto: I64, dport: I64, sport: I64, icmp_id: I64
) -> tuple[I64, I64]:
    """Redraw client ports / echo ids until no two flows share a 5-tuple, either way round."""
    icmp = icmp_id >= 0
    a = np.minimum(client, server).astype(np.int64)
    b = np.maximum(client, server).astype(np.int64)
    for _ in range(100):
        lo, hi = np.minimum(sport, dport), np.maximum(sport, dport)
        table = np.stack([a, b, proto, lo, hi, icmp_id], axis=1)
        _, first = np.unique(table, axis=0, return_index=True)
        dup = np.ones(sport.size, dtype=np.bool_)
        dup[first] = False
        if not dup.any():
            return sport, icmp_id
        sport = np.where(dup & ~icmp, rng.integers(*EPHEMERAL, sport.size), sport)
        icmp_id = np.where(dup & icmp, rng.integers(1, 65536, sport.size), icmp_id)
    raise ValueError("could not give every flow a distinct 5-tuple; use fewer flows")
