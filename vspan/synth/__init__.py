"""Deterministic generator of realistic VN-tagged remote-SPAN captures, with ground truth.

``generate`` draws a datacenter (hosts ``hv01``…, VMs in tiers web/app/db/cache/backup),
heavy-tailed flows between them and to external peers, and the frames the collectors would
export for them, following ARCHITECTURE.md "Mirroring semantics": one copy of an intra-host
packet (``d=0``, both vifs), two of a cross-host packet (``d=0, svif`` at the sender's host,
then ``d=1, dvif`` at the receiver's host 20–200 µs later), one of an external packet. The
ground truth counts each packet once. Everything derives from ``seed``; no clock is read.

Layers: ``synth.plan`` (flows), ``synth.packets`` (packets and copies), ``synth.frames``
(bytes); files are written with ``vspan.pcap.write``.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.batch import FrameBatch, LinkType
from vspan.inventory import Host, Inventory, Nic, Vm
from vspan.pcap.write import PcapngWriter, PcapWriter
from vspan.synth.frames import build_frames
from vspan.synth.packets import GATEWAY_MAC, FramePlan, plan_frames
from vspan.synth.plan import FlowPlan, VmTable, plan_flows

__all__ = [
    "GATEWAY_MAC",
    "SCOPES",
    "TIERS",
    "SynthCapture",
    "SynthHost",
    "SynthVm",
    "generate",
    "generate_small",
    "write_capture",
    "write_inventory_yaml",
]

TIERS: Final = ("web", "app", "db", "cache", "backup")
"""VM tiers; each is also the VM's port-profile."""
TIER_SHARES: Final = (0.35, 0.30, 0.15, 0.12, 0.08)
SCOPES: Final = ("intra-host", "cross-host", "external")
DEFAULT_START_NS: Final = 1_700_000_000 * 10**9
UUID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_DNS, "synth.vspan.invalid")


@dataclass(frozen=True, slots=True)
class SynthHost:
    """A hypervisor; its collector_id is its number."""

    name: str
    collector_id: int


@dataclass(frozen=True, slots=True)
class SynthVm:
    """A VM with one vNIC."""

    name: str
    uuid: str
    """uuid5 of the name: the same name always gets the same UUID."""
    host: str
    profile: str
    """Port-profile: the tier."""
    mac: str
    vif: int
    """1..4095, unique per host."""
    ipv4: str
    ipv6: str
    vlan: int
    """The VLAN of the VM's tagged flows."""


@dataclass(frozen=True, slots=True, eq=False)
class SynthCapture:
    """Frames, the inventory that explains them and the ground truth."""

    frames: FrameBatch
    """Sorted by time; ``host`` = observing collector_id, ``iface`` = its host index."""
    hosts: tuple[SynthHost, ...]
    vms: tuple[SynthVm, ...]
    truth: pd.DataFrame
    """One row per flow (index = flow id); see ``generate``."""
    flow: npt.NDArray[np.int32]
    """Flow id of each frame."""
    direction: npt.NDArray[np.uint8]
    """0 when a frame goes client → server (the ground truth's ``src`` → ``dst``), else 1."""

    def inventory(self) -> Inventory:
        """The inventory as vspan's model (what ``write_inventory_yaml`` writes)."""
        hosts = [Host(name=h.name, collector_id=h.collector_id) for h in self.hosts]
        vms = [
            Vm(
                name=v.name,
                uuid=v.uuid,
                host=v.host,
                profile=v.profile,
                nics=(Nic(mac=int(v.mac.replace(":", ""), 16), vif=v.vif, ips=(v.ipv4, v.ipv6)),),
            )
            for v in self.vms
        ]
        return Inventory(hosts, vms)


def _inventory(
    rng: np.random.Generator, hosts: int, vms: int
) -> tuple[list[SynthHost], list[SynthVm], VmTable]:
    share = np.asarray(TIER_SHARES)
    if vms < len(TIERS):
        counts = (np.arange(len(TIERS)) < vms).astype(np.int64)
    else:
        counts = np.maximum(1, np.round(share * vms)).astype(np.int64)
        counts[0] += vms - counts.sum()
    tier = np.repeat(np.arange(len(TIERS)), counts)
    k = np.concatenate([np.arange(1, c + 1) for c in counts]).astype(np.int64)
    host = rng.permutation(vms) % hosts
    vif = np.zeros(vms, dtype=np.int64)
    for h in range(hosts):
        mine = np.flatnonzero(host == h)
        vif[mine] = rng.choice(4095, size=mine.size, replace=False) + 1
    t = tier + 1
    table = VmTable(
        host=host.astype(np.int64),
        vif=vif,
        mac=0x525400000000 + np.arange(1, vms + 1, dtype=np.int64),
        ip4=((10 << 24) | (t << 16) | k).astype(np.uint64),
        ip6_hi=np.full(vms, 0xFD00 << 48, dtype=np.uint64),
        ip6_lo=((t << 32) | ((k >> 8) << 16) | (k & 0xFF)).astype(np.uint64),
        tier=tier.astype(np.int64),
        vlan=(100 * t + (k - 1) % 4 + 1).astype(np.int64),
    )
    host_list = [SynthHost(name=f"hv{h + 1:02d}", collector_id=h + 1) for h in range(hosts)]
    vm_list = []
    for i in range(vms):
        name = f"{TIERS[tier[i]]}-{k[i]:02d}"
        mac = f"{int(table.mac[i]):012x}"
        vm_list.append(
            SynthVm(
                name=name,
                uuid=str(uuid.uuid5(UUID_NAMESPACE, name)),
                host=host_list[host[i]].name,
                profile=TIERS[tier[i]],
                mac=":".join(mac[j : j + 2] for j in range(0, 12, 2)),
                vif=int(vif[i]),
                ipv4=str(ipaddress.IPv4Address(int(table.ip4[i]))),
                ipv6=str(
                    ipaddress.IPv6Address((int(table.ip6_hi[i]) << 64) | int(table.ip6_lo[i]))
                ),
                vlan=int(table.vlan[i]),
            )
        )
    return host_list, vm_list, table


def generate(
    *,
    packets: int,
    flows: int,
    hosts: int,
    vms: int,
    seed: int,
    start_ns: int = DEFAULT_START_NS,
    duration_s: float = 50.0,
    ipv6_share: float = 0.10,
    vlan_share: float = 0.10,
    cross_host_share: float = 0.45,
    intra_host_share: float = 0.35,
) -> SynthCapture:
    """Generate a capture of exactly ``packets`` frames (copies included) in ``flows`` flows.

    ``ipv6_share`` and ``vlan_share`` are shares of frames; the scope shares are shares of
    flows (external takes the rest), bent where a host has too few VMs. Flows start within
    ``duration_s``; no flow pauses 30 s or lasts 250 s.

    Ground truth columns: ``src_vm, dst_vm`` (names, None for external), ``src_host,
    dst_host``, ``scope``, ``vlan`` (nullable), ``proto``, ``src_ip, dst_ip``, ``src_port,
    dst_port`` (0 for ICMP), ``icmp_id`` (nullable), ``packets, bytes`` (src → dst, each
    packet once, wire length of the tagged frame), ``packets_rev, bytes_rev``, ``first_ns,
    last_ns`` (over all copies), ``tcp_flags, tcp_flags_rev`` (OR), ``copies`` (frames).
    """
    if hosts < 1 or vms < 2 or flows < 1 or packets < 1:
        raise ValueError("need hosts >= 1, vms >= 2, flows >= 1 and packets >= 1")
    if vms > 4095 * hosts:
        raise ValueError(f"{vms} VMs do not fit {hosts} hosts of 4095 vifs")
    shares = (intra_host_share, cross_host_share, 1.0 - intra_host_share - cross_host_share)
    if min(shares) < 0 or not (0 <= ipv6_share <= 1 and 0 <= vlan_share <= 1):
        raise ValueError("shares must lie in 0..1 and scope shares add up to at most 1")
    inv_rng, flow_rng, packet_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    host_list, vm_list, table = _inventory(inv_rng, hosts, vms)
    plan = plan_flows(
        flow_rng,
        table,
        hosts=hosts,
        packets=packets,
        flows=flows,
        shares=shares,
        ipv6_share=ipv6_share,
        vlan_share=vlan_share,
    )
    fp = plan_frames(packet_rng, table, plan, duration_ns=int(duration_s * 1e9))
    data, offset, length = build_frames(fp.cols)
    ts = start_ns + fp.ts_ns
    batch = FrameBatch(
        data=data,
        offset=offset,
        caplen=length.astype(np.int32),
        origlen=length.astype(np.int32),
        ts_ns=ts,
        linktype=np.full(length.size, LinkType.ETHERNET, dtype=np.uint16),
        iface=fp.host.astype(np.int32),
        host=(fp.host + 1).astype(np.uint32),
        iface_names=tuple(h.name for h in host_list),
    )
    truth = _truth(
        plan=plan, fp=fp, length=length, ts=ts, host_list=host_list, vm_list=vm_list, table=table
    )
    return SynthCapture(
        frames=batch,
        hosts=tuple(host_list),
        vms=tuple(vm_list),
        truth=truth,
        flow=fp.flow.astype(np.int32),
        direction=fp.direction.astype(np.uint8),
    )


def generate_small(seed: int = 0) -> SynthCapture:
    """A few thousand frames, 3 hosts × 4 VMs, with every scope, IPv6, VLANs and ICMP."""
    return generate(packets=3000, flows=60, hosts=3, vms=12, seed=seed, duration_s=10.0)


def _ip_strings(
    hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], v6: npt.NDArray[np.bool_]
) -> list[str]:
    return [
        str(
            ipaddress.IPv6Address((int(h) << 64) | int(low))
            if six
            else ipaddress.IPv4Address(int(low))
        )
        for h, low, six in zip(hi, lo, v6, strict=True)
    ]


def _truth(
    *,
    plan: FlowPlan,
    fp: FramePlan,
    length: npt.NDArray[np.int64],
    ts: npt.NDArray[np.int64],
    host_list: list[SynthHost],
    vm_list: list[SynthVm],
    table: VmTable,
) -> pd.DataFrame:
    f = plan.packets.size
    once = fp.copy == 0
    key = fp.flow * 2 + fp.direction
    pk = np.bincount(key[once], minlength=2 * f).reshape(f, 2)
    by = np.bincount(key[once], weights=length[once], minlength=2 * f).reshape(f, 2)
    flags = np.zeros((f, 2), dtype=np.int64)
    for bit in range(8):
        seen = np.bincount(key, weights=(fp.cols.flags >> bit) & 1, minlength=2 * f) > 0
        flags |= seen.reshape(f, 2).astype(np.int64) << bit
    _, first = np.unique(fp.flow, return_index=True)  # frames are sorted by time
    _, last = np.unique(fp.flow[::-1], return_index=True)
    names = np.array([v.name for v in vm_list] + [None], dtype=object)
    vm_host = np.array([host_list[h].name for h in table.host] + [None], dtype=object)
    v6 = plan.ipver == 6
    return pd.DataFrame(
        {
            "src_vm": pd.Series(names[plan.client], dtype=object),
            "dst_vm": pd.Series(names[plan.server], dtype=object),
            "src_host": pd.Series(vm_host[plan.client], dtype=object),
            "dst_host": pd.Series(vm_host[plan.server], dtype=object),
            "scope": pd.Series(np.array(SCOPES, dtype=object)[plan.scope], dtype=object),
            "vlan": pd.Series(plan.vlan).where(plan.vlan >= 0).astype("Int64"),
            "proto": plan.proto,
            "src_ip": _ip_strings(plan.client_hi, plan.client_lo, v6),
            "dst_ip": _ip_strings(plan.server_hi, plan.server_lo, v6),
            "src_port": plan.sport,
            "dst_port": plan.dport,
            "icmp_id": pd.Series(plan.icmp_id).where(plan.icmp_id >= 0).astype("Int64"),
            "packets": pk[:, 0],
            "bytes": by[:, 0].astype(np.int64),
            "packets_rev": pk[:, 1],
            "bytes_rev": by[:, 1].astype(np.int64),
            "first_ns": ts[first],
            "last_ns": ts[::-1][last],
            "tcp_flags": flags[:, 0],
            "tcp_flags_rev": flags[:, 1],
            "copies": np.bincount(fp.flow, minlength=f),
        }
    )


def write_inventory_yaml(capture: SynthCapture, path: str | Path) -> None:
    """Write the inventory in vspan's YAML format (``vspan.inventory.Inventory.load``)."""
    q = json.dumps  # a JSON string is a YAML double-quoted scalar
    lines = ["hosts:"]
    for h in capture.hosts:
        lines += [f"  - name: {h.name}", f"    collector_id: {h.collector_id}"]
    lines.append("vms:")
    for v in capture.vms:
        lines += [
            f"  - name: {v.name}",
            f"    uuid: {q(v.uuid)}",
            f"    host: {v.host}",
            f"    profile: {v.profile}",
            "    nics:",
            f"      - mac: {q(v.mac)}",
            f"        vif: {v.vif}",
            f"        ips: [{q(v.ipv4)}, {q(v.ipv6)}]",
        ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


_SLICE_FRAMES: Final = 100_000
"""Frames written per call, so that a large capture never needs a second copy in memory."""


def write_capture(
    capture: SynthCapture, path: str | Path, fmt: Literal["pcapng", "pcap"] = "pcapng"
) -> None:
    """Write the frames as pcapng (one interface per host, named after it) or classic pcap."""
    if fmt not in ("pcapng", "pcap"):
        raise ValueError(f"unknown capture format {fmt!r}; expected 'pcapng' or 'pcap'")
    frames = capture.frames
    slices = [
        np.arange(lo, min(lo + _SLICE_FRAMES, len(frames)))
        for lo in range(0, len(frames), _SLICE_FRAMES)
    ]
    with open(path, "wb") as fh:
        if fmt == "pcap":
            pcap = PcapWriter(fh)
            for rows in slices:
                pcap.write_batch(frames, rows)
            return
        pcapng = PcapngWriter(fh, application="vspan synth")
        for host in capture.hosts:
            pcapng.add_interface(name=host.name)
        iface = frames.iface_column()
        for rows in slices:
            pcapng.write_batch(frames, iface=iface, index=rows)
