"""One window of simulated time of the datacenter simulator: flows, segments, port frames.

Sans-I/O and clock-free, driven by the traffic model (``simulator.model``). ``make_pools``
opens the long-lived connections (connection pools) once. For one window, ``plan_new_flows``
draws new flows (turned into packets by ``synth.packets.plan_frames``), ``pool_packets`` the
segments of the long-lived connections, and ``port_frames`` builds the bytes with
``synth.frames.build_frames``, strips the VN-Tag and places each frame on its VM port: what a
vswitch port shows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch, LinkType
from vspan.collectors.simulator.model import (
    EXT,
    SERVICES,
    TCP_SIGMA,
    SimVms,
    mean_packets,
    members,
    pick_pair,
    pick_server,
    usable,
)
from vspan.synth.frames import FrameColumns, build_frames
from vspan.synth.packets import ACK, COPY_DELAY_NS, PSH, FramePlan, excl_cumsum
from vspan.synth.plan import (
    CROSS,
    EPHEMERAL,
    EXT_CLIENT_V4,
    EXT_SERVER_V4,
    EXT_V6_HI,
    EXTERNAL,
    INTRA,
    KIND_ICMP,
    KIND_TCP,
    FlowPlan,
    VmTable,
)

__all__ = [
    "PoolPackets",
    "Pools",
    "WindowFrames",
    "make_pools",
    "plan_new_flows",
    "pool_packets",
    "port_frames",
]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]

SERVICE_PORTS: Final = np.array([s.port for s in SERVICES], dtype=np.int64)

PSH_ACK: Final = PSH | ACK


@dataclass(frozen=True, slots=True, eq=False)
class Pools:
    """Long-lived connections (client VM → server VM), by index; ``sent`` and ``packets``
    carry each connection's history from window to window."""

    service: I64
    client: I64
    server: I64
    sport: I64
    ipver: I64
    isn: I64
    """(connections, 2): initial sequence number each way."""
    sent: I64
    """(connections, 2): bytes sent each way so far."""
    packets: I64
    """(connections, 2): the IP id counter each way (starts random, +1 a packet)."""


def make_pools(rng: np.random.Generator, vms: SimVms, ipv6_share: float) -> Pools:
    """``pool`` connections from every client VM of each pooled service."""
    tiers = members(vms)
    svc_of, client, server = [], [], []
    for s, svc in enumerate(SERVICES):
        if svc.pool and usable(tiers, svc):
            c = np.repeat(tiers[svc.client], svc.pool).astype(np.int64)
            v = pick_server(rng, tiers, svc, c)
            svc_of.append(np.full(c.size, s, dtype=np.int64))
            client.append(c)
            server.append(v)
    n = sum(c.size for c in client)

    def cat(parts: list[I64]) -> I64:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    return Pools(
        service=cat(svc_of),
        client=cat(client),
        server=cat(server),
        sport=rng.integers(*EPHEMERAL, n).astype(np.int64),
        ipver=np.where(rng.random(n) < ipv6_share, 6, 4).astype(np.int64),
        isn=rng.integers(0, 1 << 32, (n, 2)).astype(np.int64),
        sent=np.zeros((n, 2), dtype=np.int64),
        packets=rng.integers(0, 1 << 16, (n, 2)).astype(np.int64),
    )


@dataclass(frozen=True, slots=True, eq=False)
class WindowFrames:
    """The frames of one window on every VM port, sorted by (host, time), and its truth."""

    frames: FrameBatch
    """Untagged Ethernet frames as the VM ports show them; ``host`` = host index + 1."""
    vif: npt.NDArray[np.uint16]
    from_vm: npt.NDArray[np.bool_]
    bounds: I64
    """Frames of host ``h`` are rows ``bounds[h]:bounds[h + 1]``."""
    truth: I64
    """One row per packet (counted once): src VM, dst VM (-1 outside), src host, dst host
    (-1 outside), time (ns), bytes (untagged frame)."""
    flows: int
    """New flows started in the window."""


def _addresses(
    rng: np.random.Generator, vms: SimVms, vm: I64, v6: npt.NDArray[np.bool_], *, inbound: bool
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(high, low) address words of each flow end; IPv4 in the low word."""
    n, idx, is_vm = vm.size, np.maximum(vm, 0), vm >= 0
    if inbound:  # remote clients come from anywhere
        ext4, ext6 = EXT_CLIENT_V4 + rng.integers(0, 1 << 17, n), rng.integers(0, 1 << 62, n)
    else:  # remote services are a few
        pick = rng.integers(1, 17, n)
        ext4, ext6 = EXT_SERVER_V4 + pick, (0x53 << 32) + pick
    lo4 = np.where(is_vm, vms.ip4[idx], ext4.astype(np.uint64))
    hi6 = np.where(is_vm, vms.ip6_hi[idx], np.uint64(EXT_V6_HI))
    lo6 = np.where(is_vm, vms.ip6_lo[idx], ext6.astype(np.uint64))
    return (
        np.where(v6, hi6, np.uint64(0)).astype(np.uint64),
        np.where(v6, lo6, lo4).astype(np.uint64),
    )


def plan_new_flows(
    rng: np.random.Generator,
    vms: SimVms,
    host: I64,
    budget: F64,
    *,
    first_port: int,
    ipv6_share: float,
) -> tuple[FlowPlan, I64]:
    """New flows of every service for a frame ``budget`` per service; (plan, service)."""
    tiers = members(vms)
    parts: list[tuple[int, I64, I64]] = []
    for s, svc in enumerate(SERVICES):
        if budget[s] <= 0 or not usable(tiers, svc):
            continue
        copies = 2 if EXT not in (svc.client, svc.server) else 1
        n = int(rng.poisson(budget[s] / (mean_packets(svc) * copies)))
        parts.append((s, *pick_pair(rng, tiers, svc, n)))
    none = [np.zeros(0, dtype=np.int64)]
    service = np.concatenate([np.full(c.size, s, np.int64) for s, c, _ in parts] + none)
    client = np.concatenate([c for _, c, _ in parts] + none).astype(np.int64)
    server = np.concatenate([v for _, _, v in parts] + none).astype(np.int64)
    f = service.size
    kind = np.array([s.kind for s in SERVICES], dtype=np.int64)[service]
    median = np.array([s.packets for s in SERVICES])[service]
    both = (client >= 0) & (server >= 0)
    same = host[np.maximum(client, 0)] == host[np.maximum(server, 0)]
    tcp, icmp = kind == KIND_TCP, kind == KIND_ICMP
    data = np.round(median * rng.lognormal(0.0, TCP_SIGMA, f)).astype(np.int64)
    packets = np.select([tcp, icmp], [6 + np.minimum(data, 20_000), 2 * rng.integers(1, 5, f)], 2)
    v6 = rng.random(f) < ipv6_share
    counter = first_port + np.arange(f, dtype=np.int64)
    ch, cl = _addresses(rng, vms, client, v6, inbound=True)
    sh, sl = _addresses(rng, vms, server, v6, inbound=False)
    plan = FlowPlan(
        scope=np.where(both, np.where(same, INTRA, CROSS), EXTERNAL).astype(np.int64),
        kind=kind,
        client=client,
        server=server,
        packets=packets.astype(np.int64),
        mult=np.where(both, 2, 1).astype(np.int64),
        rst=tcp & (rng.random(f) < 0.05),
        ipver=np.where(v6, 6, 4).astype(np.int64),
        vlan=np.full(f, -1, dtype=np.int64),
        proto=np.select([tcp, icmp], [6, np.where(v6, 58, 1)], 17).astype(np.int64),
        sport=np.where(icmp, 0, EPHEMERAL[0] + counter % (EPHEMERAL[1] - EPHEMERAL[0])),
        dport=SERVICE_PORTS[service],
        icmp_id=np.where(icmp, counter % 65535 + 1, -1).astype(np.int64),
        client_hi=ch,
        client_lo=cl,
        server_hi=sh,
        server_lo=sl,
        ext_ttl=(64 - rng.integers(3, 20, f)).astype(np.int64),
    )
    return plan, service


@dataclass(frozen=True, slots=True, eq=False)
class PoolPackets:
    """Packets of the long-lived connections in one window (one row per packet)."""

    cols: FrameColumns
    ts_ns: I64
    """From the window's start."""
    sender: I64
    receiver: I64


def _vm_address(vms: SimVms, vm: I64, v6: npt.NDArray[np.bool_]) -> tuple[U64, U64]:
    hi = np.where(v6, vms.ip6_hi[vm], np.uint64(0)).astype(np.uint64)
    return hi, np.where(v6, vms.ip6_lo[vm], vms.ip4[vm]).astype(np.uint64)


def pool_packets(
    rng: np.random.Generator, vms: SimVms, pools: Pools, budget: F64, duration_ns: int
) -> PoolPackets:
    """Request/response segments of every pooled connection for a frame ``budget`` per
    service (2 frames a packet); advances each connection's sequence numbers."""
    per_service = np.bincount(pools.service, minlength=budget.size)
    lam = budget[pools.service] / np.maximum(per_service[pools.service], 1) / 4
    pairs = rng.poisson(lam).astype(np.int64)
    conn = np.repeat(np.arange(pairs.size, dtype=np.int64), pairs * 2)
    m = conn.size
    d = np.tile(np.array([0, 1], dtype=np.int64), m // 2)  # a request, then its response
    asked = rng.integers(0, max(duration_ns - 5_000_000, 1), m // 2)
    ts = np.repeat(asked, 2) + d * rng.integers(100_000, 2_000_000, m)
    order = np.lexsort((ts, conn))
    conn, ts, d = conn[order], ts[order], d[order]
    first = np.concatenate(([0], np.cumsum(pairs * 2)[:-1])).astype(np.int64)[conn]
    payload = np.where(d == 0, rng.integers(40, 400, m), rng.integers(100, 1461, m))
    sent = [excl_cumsum(payload * (d == j), first) + pools.sent[conn, j] for j in (0, 1)]
    sent_n = [excl_cumsum((d == j).astype(np.int64), first) for j in (0, 1)]
    own, other = np.where(d == 0, sent[0], sent[1]), np.where(d == 0, sent[1], sent[0])
    ip_id = (pools.packets[conn, d] + np.where(d == 0, sent_n[0], sent_n[1])) & 0xFFFF
    for j in (0, 1):
        pools.sent[:, j] += np.bincount(conn, weights=payload * (d == j), minlength=pairs.size
                                        ).astype(np.int64)  # fmt: skip
        pools.packets[:, j] += pairs
    sender = np.where(d == 0, pools.client[conn], pools.server[conn])
    receiver = np.where(d == 0, pools.server[conn], pools.client[conn])
    v6 = pools.ipver[conn] == 6
    (sh, sl), (dh, dl) = _vm_address(vms, sender, v6), _vm_address(vms, receiver, v6)
    client_port, server_port = pools.sport[conn], SERVICE_PORTS[pools.service[conn]]
    zero = np.zeros(m, dtype=np.int64)
    cols = FrameColumns(
        dst_mac=vms.mac[receiver], src_mac=vms.mac[sender], tag=zero, vlan=zero - 1,
        ipver=pools.ipver[conn], src_hi=sh, src_lo=sl, dst_hi=dh, dst_lo=dl,
        proto=zero + 6, ttl=zero + 64,
        ip_id=ip_id,
        sport=np.where(d == 0, client_port, server_port),
        dport=np.where(d == 0, server_port, client_port),
        seq=(pools.isn[conn, d] + own) & 0xFFFFFFFF,
        ack=(pools.isn[conn, 1 - d] + other) & 0xFFFFFFFF,
        flags=zero + PSH_ACK, window=zero + 1024, icmp_type=zero, mss=zero, payload=payload,
    )  # fmt: skip
    return PoolPackets(cols=cols, ts_ns=ts, sender=sender, receiver=receiver)


def _strip_tags(data: U8, offset: I64, length: I64) -> tuple[U8, I64, I64]:
    """Remove the 6 bytes of EtherType 0x8926 and VN-Tag after the MACs of every frame."""
    keep = np.ones(data.size, dtype=np.bool_)
    keep[(offset[:, None] + 12 + np.arange(6)).ravel()] = False
    n = offset.size
    return data[keep], offset - 6 * np.arange(n, dtype=np.int64), length - 6


def port_frames(
    rng: np.random.Generator,
    vms: VmTable,
    plan: FlowPlan,
    fp: FramePlan | None,
    pool: PoolPackets,
    *,
    start_ns: int,
    hosts: int,
    flows: int,
) -> WindowFrames:
    """Frames on the VM ports of every host for the planned flows and pooled segments."""
    parts_cols: list[FrameColumns] = [pool.cols]
    m = pool.ts_ns.size
    copy = np.tile(np.array([0, 1], dtype=np.int64), m)
    idx = np.repeat(np.arange(m), 2)
    delay = rng.integers(*COPY_DELAY_NS, 2 * m) * copy
    ts = [pool.ts_ns[idx] + delay]
    sender, receiver, copies = [pool.sender[idx]], [pool.receiver[idx]], [copy]
    pick = [idx]
    if fp is not None:
        parts_cols.append(fp.cols)
        f, d = fp.flow, fp.direction
        sender.append(np.where(d == 0, plan.client[f], plan.server[f]))
        receiver.append(np.where(d == 0, plan.server[f], plan.client[f]))
        ts.append(fp.ts_ns)
        copies.append(fp.copy)
        pick.append(m + np.arange(fp.ts_ns.size))
    cols = FrameColumns(**{
        c.name: np.concatenate([getattr(p, c.name) for p in parts_cols])[np.concatenate(pick)]
        for c in fields(FrameColumns)
    })  # fmt: skip
    snd, rcv, cp = np.concatenate(sender), np.concatenate(receiver), np.concatenate(copies)
    when = start_ns + np.concatenate(ts)
    at_sender = (snd >= 0) & (cp == 0)
    port_vm = np.where(at_sender, snd, rcv)
    where = vms.host[port_vm]
    order = np.lexsort((when, where))
    cols = FrameColumns(**{c.name: getattr(cols, c.name)[order] for c in fields(FrameColumns)})
    data, offset, length = _strip_tags(*build_frames(cols))
    where, when = where[order], when[order]
    frames = FrameBatch(
        data=data, offset=offset, caplen=length.astype(np.int32),
        origlen=length.astype(np.int32), ts_ns=when,
        linktype=np.full(length.size, LinkType.ETHERNET, dtype=np.uint16),
        host=(where + 1).astype(np.uint32),
    )  # fmt: skip
    once = cp[order] == 0
    s, r = snd[order][once], rcv[order][once]
    truth = np.column_stack([
        s, r, np.where(s >= 0, vms.host[np.maximum(s, 0)], -1),
        np.where(r >= 0, vms.host[np.maximum(r, 0)], -1), when[once], length[once],
    ]).astype(np.int64)  # fmt: skip
    return WindowFrames(
        frames=frames, vif=vms.vif[port_vm[order]].astype(np.uint16),
        from_vm=at_sender[order], bounds=np.searchsorted(where, np.arange(hosts + 1)),
        truth=truth, flows=flows,
    )  # fmt: skip
