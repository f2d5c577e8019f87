"""Packets and observed copies of planned flows, as columns (see ``synth.plan``).

A flow's packets get their direction, TCP flags, payload size, sequence numbers, IP ids and
times from their position in the flow; each packet then becomes one or two frames, with the
VN-Tag of the collector that observed it (ARCHITECTURE.md, "Mirroring semantics").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.synth.frames import FrameColumns
from vspan.synth.plan import CROSS, INTRA, KIND_ICMP, KIND_TCP, KIND_UDP_BULK, FlowPlan, VmTable
from vspan.wire.vntag import encode_vntag_array

__all__ = ["ACK", "COPY_DELAY_NS", "GATEWAY_MAC", "PSH", "FramePlan", "excl_cumsum", "plan_frames"]

I64 = npt.NDArray[np.int64]
Rng = np.random.Generator

GATEWAY_MAC: Final = 0x020000000001
"""MAC of the datacenter gateway, the L2 peer of every external endpoint."""
FULL_SHARE: Final = 0.67
"""Share of data segments that are a full MSS."""
MAX_GAP_NS: Final = 29 * 10**9
"""Longest gap inside a flow (analyzers' idle timeout is 60 s)."""
MAX_FLOW_NS: Final = 200 * 10**9
"""Longest flow (analyzers' active timeout is 300 s)."""
RTT_NS: Final = {INTRA: (20_000, 80_000), CROSS: (250_000, 600_000), 2: (2_000_000, 40_000_000)}
"""Range of the round-trip time by scope; cross-host RTTs exceed the copy delay."""
COPY_DELAY_NS: Final = (20_000, 200_001)
"""Delay of the receiving host's copy of a cross-host packet."""
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10


@dataclass(frozen=True, slots=True, eq=False)
class FramePlan:
    """One row per frame, sorted by time."""

    cols: FrameColumns
    ts_ns: I64
    """Nanoseconds from the capture's start."""
    host: I64
    """Index of the observing host."""
    flow: I64
    direction: I64
    """0 client → server, 1 server → client."""
    copy: I64
    """0, or 1 for the receiving host's copy of a cross-host packet."""


def excl_cumsum(values: I64, first: I64) -> I64:
    """Per-flow sum of ``values`` over the earlier packets of the flow."""
    cs = np.cumsum(values) - values
    return cs - cs[first]


def plan_frames(rng: Rng, vms: VmTable, fl: FlowPlan, *, duration_ns: int) -> FramePlan:
    """Expand flows into packets, then into observed frames sorted by time."""
    n = fl.packets
    starts = np.concatenate(([0], np.cumsum(n)[:-1])).astype(np.int64)
    flow = np.repeat(np.arange(n.size, dtype=np.int64), n)
    first = starts[flow]
    k = np.arange(flow.size, dtype=np.int64) - first
    size, kind, v6 = n[flow], fl.kind[flow], fl.ipver[flow] == 6
    m = flow.size

    tcp = kind == KIND_TCP
    tcp_dir, flags, tcp_payload = _tcp(
        rng, k=k, size=size, rst=fl.rst[flow], v6=v6, flow=flow, flows=n.size
    )
    mss = np.where(v6, 1440, 1460)

    # UDP: small ones alternate query/answer, bulk ones mostly one way. ICMP: request/reply.
    # Every flow's first packet goes client → server, so the ground truth's src initiated it.
    alternate = k % 2
    bulk_size = rng.integers(200, 1400, n.size)[flow]
    jitter = rng.integers(-120, 121, m)
    small_payload = np.where(alternate == 0, rng.integers(20, 60, m), rng.integers(40, 400, m))
    small_payload = np.where(fl.dport[flow] == 123, 48, small_payload)  # NTP's fixed size
    is_bulk, icmp = kind == KIND_UDP_BULK, kind == KIND_ICMP
    direction = np.select(
        [tcp, is_bulk], [tcp_dir, (k > 0) & (rng.random(m) < 0.05)], default=alternate
    ).astype(np.int64)
    payload = np.select(
        [tcp, is_bulk, icmp],
        [tcp_payload, np.clip(bulk_size + jitter, 16, 1400), 56],
        default=small_payload,
    ).astype(np.int64)
    flags = np.where(tcp, flags, 0).astype(np.int64)

    # Sequence numbers, acknowledgements and IP ids follow each direction's history.
    isn = rng.integers(0, 1 << 32, (n.size, 2))
    ip_base = rng.integers(0, 1 << 16, (n.size, 2))
    window = rng.integers(500, 65535, (n.size, 2))
    consume = payload + ((flags & (SYN | FIN)) > 0)
    sent = [excl_cumsum(consume * (direction == d), first) for d in (0, 1)]
    count = [excl_cumsum((direction == d).astype(np.int64), first) for d in (0, 1)]
    own = np.where(direction == 0, sent[0], sent[1])
    other = np.where(direction == 0, sent[1], sent[0])
    seq = (isn[flow, direction] + own) & 0xFFFFFFFF
    ack = np.where((flags & ACK) > 0, (isn[flow, 1 - direction] + other) & 0xFFFFFFFF, 0)
    ip_id = (ip_base[flow, direction] + np.where(direction == 0, count[0], count[1])) & 0xFFFF

    ts = _times(rng, fl, flow=flow, first=first, k=k, direction=direction, duration_ns=duration_ns)
    syn = tcp & (k < 2)
    c_port, s_port = fl.sport[flow], fl.dport[flow]
    packets = FrameColumns(
        dst_mac=np.zeros(m, np.int64),
        src_mac=np.zeros(m, np.int64),
        tag=np.zeros(m, np.int64),
        vlan=fl.vlan[flow],
        ipver=fl.ipver[flow],
        src_hi=np.where(direction == 0, fl.client_hi[flow], fl.server_hi[flow]),
        src_lo=np.where(direction == 0, fl.client_lo[flow], fl.server_lo[flow]),
        dst_hi=np.where(direction == 0, fl.server_hi[flow], fl.client_hi[flow]),
        dst_lo=np.where(direction == 0, fl.server_lo[flow], fl.client_lo[flow]),
        proto=fl.proto[flow],
        ttl=np.zeros(m, np.int64),
        ip_id=ip_id.astype(np.int64),
        sport=np.where(icmp, fl.icmp_id[flow], np.where(direction == 0, c_port, s_port)),
        dport=np.where(icmp, k // 2 + 1, np.where(direction == 0, s_port, c_port)),
        seq=seq.astype(np.int64),
        ack=ack.astype(np.int64),
        flags=flags,
        window=window[flow, direction].astype(np.int64),
        icmp_type=np.where(direction == 0, np.where(v6, 128, 8), np.where(v6, 129, 0)),
        mss=np.where(syn, mss, 0).astype(np.int64),
        payload=payload,
    )
    return _observe(rng, vms, fl, packets, flow=flow, direction=direction, ts=ts)


def _tcp(
    rng: Rng,
    *,
    k: I64,
    size: I64,
    rst: npt.NDArray[np.bool_],
    v6: npt.NDArray[np.bool_],
    flow: I64,
    flows: int,
) -> tuple[I64, I64, I64]:
    """Direction, flags and payload of TCP packets by position: handshake, a request, a body
    of data segments and ACKs (one every second segment), then a FIN exchange or a RST."""
    m = k.size
    tail = size - k
    body_end = np.where(rst, size - 1, size - 3)
    in_body = (k >= 3) & (k < body_end)
    bulk = (rng.random(flows) < 0.8).astype(np.int64)[flow]  # mostly server → client
    data = (k - 3) % 3 != 0
    mss = np.where(v6, 1440, 1460)
    full = rng.random(m) < FULL_SHARE
    seg = np.where(full, mss, (rng.random(m) * (mss - 1)).astype(np.int64) + 1)
    req = in_body & (k == 3)
    cases = [k == 0, k == 1, k == 2, req, in_body & data, in_body, rst & (tail == 1), tail == 3,
             tail == 2]  # fmt: skip
    direction = np.select(cases, [0, 1, 0, 0, bulk, 1 - bulk, 1, 0, 1], default=0)
    flags = np.select(
        cases,
        [SYN, SYN | ACK, ACK, PSH | ACK, np.where(full, ACK, PSH | ACK), ACK, RST | ACK,
         FIN | ACK, FIN | ACK],
        default=ACK,
    )  # fmt: skip
    payload = np.select([req, in_body & data], [rng.integers(40, 700, m), seg], default=0)
    return direction.astype(np.int64), flags.astype(np.int64), payload.astype(np.int64)


def _times(
    rng: Rng, fl: FlowPlan, *, flow: I64, first: I64, k: I64, direction: I64, duration_ns: int
) -> I64:
    """Packet times from the capture start: exponential gaps, RTT at each turn, bounded."""
    n = fl.packets
    mean_gap = np.exp(rng.normal(np.log(5e6), 1.5, n.size))
    length = np.minimum(n * mean_gap, min(0.9 * duration_ns, MAX_FLOW_NS))
    raw = rng.exponential(1.0, flow.size) * (k > 0)
    raw_sum = np.bincount(flow, weights=raw, minlength=n.size)
    gap = raw * (length / np.maximum(raw_sum, 1e-9))[flow]
    gap = np.clip(gap, 1000.0, MAX_GAP_NS)
    lo, hi = (
        np.array([RTT_NS[s][0] for s in (0, 1, 2)]),
        np.array([RTT_NS[s][1] for s in (0, 1, 2)]),
    )
    rtt = rng.uniform(lo[fl.scope], hi[fl.scope])
    turn = np.zeros(flow.size, dtype=np.bool_)
    turn[1:] = direction[1:] != direction[:-1]
    gap = np.where(turn, np.maximum(gap, rtt[flow]), gap) * (k > 0)
    total = np.bincount(flow, weights=gap, minlength=n.size)
    cap = min(0.9 * duration_ns, MAX_FLOW_NS)
    gap *= np.minimum(1.0, cap / np.maximum(total, 1.0))[flow]  # may squeeze RTTs of elephants
    gap_ns = np.where(k > 0, np.maximum(gap.astype(np.int64), 1), 0)
    span = np.minimum(total, cap).astype(np.int64)
    begin = (rng.random(n.size) * np.maximum(duration_ns - span, 1)).astype(np.int64)
    return begin[flow] + excl_cumsum(gap_ns, first) + gap_ns


def _observe(
    rng: Rng, vms: VmTable, fl: FlowPlan, p: FrameColumns, *, flow: I64, direction: I64, ts: I64
) -> FramePlan:
    """One frame per packet and observing host, with that host's VN-Tag, sorted by time."""
    mult = fl.mult[flow]
    src = np.repeat(np.arange(flow.size), mult)
    copy = np.zeros(src.size, dtype=np.int64)
    copy[1:] = src[1:] == src[:-1]
    f, d = flow[src], direction[src]
    sender = np.where(d == 0, fl.client[f], fl.server[f])
    receiver = np.where(d == 0, fl.server[f], fl.client[f])
    s, r = np.maximum(sender, 0), np.maximum(receiver, 0)
    scope = fl.scope[f]
    at_sender = (sender >= 0) & (copy == 0)
    host = np.where(at_sender, vms.host[s], vms.host[r])
    svif = np.where(at_sender, vms.vif[s], 0)
    dvif = np.where(at_sender, np.where(scope == INTRA, vms.vif[r], 0), vms.vif[r])
    tag = encode_vntag_array(d=(~at_sender).astype(np.int64), svif=svif, dvif=dvif)
    delay = rng.integers(*COPY_DELAY_NS, src.size) * copy
    when = ts[src] + delay
    order = np.argsort(when, kind="stable")
    pick = src[order]
    so, ro = sender[order], receiver[order]
    cols = FrameColumns(**{c.name: getattr(p, c.name)[pick] for c in fields(FrameColumns)})
    cols = replace(
        cols,
        dst_mac=np.where(ro >= 0, vms.mac[np.maximum(ro, 0)], GATEWAY_MAC),
        src_mac=np.where(so >= 0, vms.mac[np.maximum(so, 0)], GATEWAY_MAC),
        tag=tag[order].astype(np.int64),
        ttl=np.where(so >= 0, 64, fl.ext_ttl[f[order]]),
    )
    return FramePlan(
        cols=cols,
        ts_ns=when[order],
        host=host[order],
        flow=f[order],
        direction=d[order],
        copy=copy[order],
    )
