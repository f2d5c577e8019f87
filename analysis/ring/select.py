"""What an export selects: filters resolved once (``resolve``), then applied to each
decoded chunk as numpy masks (``select``); and the VM names of each frame's two ends for
the frame comments (``VmNames``, ``comments``).

A VM is found through the inventory (its ports and MACs now) and through the interface
tables of the ring's segments (its ports then: a VM that migrated is still found in the
segments written before the move).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeGuard

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.decode.columns import NO_MAC, Decoded, TagKind
from vspan.analysis.ring.index import Interface, SegmentInfo, SegmentQuery, ip_key
from vspan.analysis.store.sql import time_param
from vspan.errors import VspanError
from vspan.inventory import InventoryView

__all__ = [
    "ExportError",
    "VmNames",
    "Want",
    "add_flow",
    "comments",
    "fallback_interface",
    "resolve",
    "select",
    "vm_macs",
]

_PORT_PROTOS: Final = (6, 17, 132)
_GROUP_BIT: Final = np.uint64(1 << 40)
"""The I/G bit of a MAC as a 48-bit integer: a group (multicast, broadcast) address."""
U64 = npt.NDArray[np.uint64]


class ExportError(VspanError):
    """An export that cannot be done as asked: an unknown VM or host, a flow not found."""


@dataclass
class Want:
    """The filters, resolved to numbers once."""

    since: int | None = None
    until: int | None = None
    host_ids: set[int] | None = None
    host_names: set[str] = field(default_factory=set)
    vm_keys: set[str] | None = None
    """The VM's names and UUIDs (None: no VM filter)."""
    vm_ports: set[int] = field(default_factory=set)
    """``collector_id << 32 | vif`` of the VM's ports: the inventory's and the ring's."""
    vm_macs: set[int] = field(default_factory=set)
    ips: list[tuple[int, int]] | None = None
    """Addresses as (hi, lo); a frame matches one of them (``ip``) or, for a flow, the pair."""
    proto: int | None = None
    ports: list[int] | None = None
    flow: bool = False

    def query(self) -> SegmentQuery:
        vm = self.vm_keys is not None
        return SegmentQuery(
            since_ns=self.since,
            until_ns=self.until,
            hosts=None if self.host_ids is None else frozenset(self.host_ids),
            vm_uuids=frozenset(self.vm_keys or ()) if vm else None,
            vm_vifs=frozenset((k >> 32, k & 0xFFFFFFFF) for k in self.vm_ports) if vm else None,
            vm_macs=frozenset(self.vm_macs) if vm else None,
            ips=None if self.ips is None else frozenset((h << 64) | lo for h, lo in self.ips),
        )

    def ports_query(self) -> SegmentQuery:
        """The segments that may hold frames at the VM's own ports, in the time range (any
        host and address: the VM's MACs are learned there for all its frames)."""
        return replace(self.query(), hosts=None, ips=None, vm_macs=None)

    def is_vm(self, iface: Interface) -> bool:
        return self.vm_keys is not None and not self.vm_keys.isdisjoint(
            (iface.vm_name, iface.vm_uuid)
        )

    def ports_in(self, ifaces: list[Interface]) -> npt.NDArray[np.uint64]:
        """The VM's ports in one segment: those its interface table gives the VM, and the
        others known, unless the table gives them to another VM (a vif reused after a
        migration belongs to whoever had it when the segment was written)."""
        mine = {i.host << 32 | i.vif for i in ifaces if i.vif and self.is_vm(i)}
        taken = {i.host << 32 | i.vif for i in ifaces if i.vif and i.vm_uuid and not self.is_vm(i)}
        return np.array(sorted(mine | (self.vm_ports - taken)), np.uint64)


def fallback_interface(name: str, inventory: InventoryView | None) -> Interface:
    """An interface known only by its ``host/vm`` name (a segment without its index)."""
    host_name, _, rest = name.partition("/")
    host = inventory.host(host_name) if inventory is not None else None
    vif = int(rest[4:]) if rest.startswith("vif ") and rest[4:].isdigit() else 0
    vm = None if rest.startswith("vif ") or not rest else rest
    return Interface(host.collector_id if host else 0, host_name, vif, vm)


def resolve(
    segments: list[SegmentInfo],
    inventory: InventoryView | None,
    *,
    vm: str | None,
    host: str | int | None,
    ip: str | None,
    port: int | None,
    since: object,
    until: object,
) -> Want:
    want = Want(
        since=None if since is None else int(time_param(since).value),
        until=None if until is None else int(time_param(until).value),
    )
    known = [i for s in segments for i in s.interfaces]
    if host is not None:
        text = str(host)
        want.host_ids = {int(text)} if text.isdigit() else set()
        want.host_names = set() if text.isdigit() else {text}
        if inventory is not None and (found := inventory.host(text)) is not None:
            want.host_ids.add(found.collector_id)
        want.host_ids |= {i.host for i in known if i.host_name == text}
        if not want.host_ids:
            raise ExportError(f"unknown host {text!r}: not in the inventory nor in the ring")
    if vm is not None:
        found_vm = inventory.vm(vm) if inventory is not None else None
        found_keys = (found_vm.name, found_vm.uuid) if found_vm else ()
        want.vm_keys = {vm} | {k for k in found_keys if k}
        mine = [i for i in known if want.is_vm(i)]
        if found_vm is None and not mine:
            raise ExportError(f"unknown VM {vm!r}: not in the inventory nor in the ring")
        want.vm_keys |= {k for i in mine for k in (i.vm_name, i.vm_uuid) if k}
        want.vm_ports = {i.host << 32 | i.vif for i in mine if i.vif}
        if found_vm is not None and inventory is not None:
            host_of = inventory.host(found_vm.host)
            cid = host_of.collector_id if host_of is not None else 0
            want.vm_ports |= {cid << 32 | nic.vif for nic in found_vm.nics}
            want.vm_macs = {nic.mac for nic in found_vm.nics}
    if ip is not None:
        try:
            key = ip_key(ip)
        except ValueError as exc:
            raise ExportError(f"expected an IPv4 or IPv6 address, got {ip!r}") from exc
        want.ips = [(key >> 64, key & (2**64 - 1))]
    if port is not None:
        if not 0 <= port <= 65535:
            raise ExportError(f"port {port} is outside 0..65535")
        want.ports = [port]
    return want


def _is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(value, int | np.integer)


def add_flow(want: Want, record: dict[str, Any]) -> None:
    """Narrow ``want`` to one flow record: its addresses, protocol, ports and times."""
    addrs = [record.get("src_ip"), record.get("dst_ip")]
    if not all(isinstance(a, str) for a in addrs):
        raise ExportError(f"flow {record.get('flow_uid')} is not an IP flow; export it by VM")
    keys = [ip_key(str(a)) for a in addrs]
    want.ips = [(k >> 64, k & (2**64 - 1)) for k in keys]
    want.flow = True
    want.proto = int(record["proto"])
    ports = [int(p) for p in (record.get("src_port"), record.get("dst_port")) if _is_int(p)]
    want.ports = ports if len(ports) == 2 else None
    first, last = int(record["first_ns"]), int(record["last_ns"]) + 1
    want.since = first if want.since is None else max(want.since, first)
    want.until = last if want.until is None else min(want.until, last)


def select(
    want: Want, dec: Decoded, ifaces: list[Interface], iface: npt.NDArray[np.intp]
) -> npt.NDArray[np.bool_]:
    """The frames of a chunk that ``want`` selects."""
    ok = np.ones(len(dec), np.bool_)
    if want.since is not None:
        ok &= dec.ts_ns >= want.since
    if want.until is not None:
        ok &= dec.ts_ns < want.until
    if want.host_ids is not None:
        hit = [i.host in want.host_ids or i.host_name in want.host_names for i in ifaces]
        ok &= np.array(hit, np.bool_)[iface]
    host = np.array([i.host for i in ifaces], np.uint64)[iface] << np.uint64(32)
    if want.vm_keys is not None:
        at_port = np.array([want.is_vm(i) for i in ifaces], np.bool_)[iface]
        ports = want.ports_in(ifaces)
        macs = np.array(sorted(want.vm_macs), np.uint64)
        ok &= (
            at_port
            | ((dec.svif > 0) & np.isin(host | dec.svif, ports))
            | ((dec.dvif > 0) & np.isin(host | dec.dvif, ports))
            | np.isin(dec.src_mac, macs)
            | np.isin(dec.dst_mac, macs)
        )
    if want.ips is not None:
        src = [(dec.src_ip_hi == h) & (dec.src_ip_lo == lo) for h, lo in want.ips]
        dst = [(dec.dst_ip_hi == h) & (dec.dst_ip_lo == lo) for h, lo in want.ips]
        if want.flow:  # the pair, either way
            ok &= (src[0] & dst[1]) | (src[1] & dst[0])
        else:
            ok &= np.logical_or.reduce(src + dst) & (dec.ip_version != 0)
    if want.proto is not None:
        ok &= dec.ip_proto == want.proto
    if want.ports is not None:
        l4 = (dec.l4_offset >= 0) & np.isin(dec.ip_proto, _PORT_PROTOS)
        if want.flow and len(want.ports) == 2:
            a, b = want.ports
            sp, dp = dec.src_port, dec.dst_port
            ok &= l4 & (((sp == a) & (dp == b)) | ((sp == b) & (dp == a)))
        else:
            ok &= l4 & (np.isin(dec.src_port, want.ports) | np.isin(dec.dst_port, want.ports))
    return ok


def vm_macs(
    want: Want, dec: Decoded, ifaces: list[Interface], iface: npt.NDArray[np.intp]
) -> set[int]:
    """The VM's MACs as the frames of a chunk show them at its ports: the source of a frame
    it sent (its port in the tag's svif, or a sender copy captured at its port) and the
    destination of one it received (dvif, or a receiver copy there); unicast only."""
    host = np.array([i.host for i in ifaces], np.uint64)[iface] << np.uint64(32)
    at_port = np.array([want.is_vm(i) for i in ifaces], np.bool_)[iface]
    ports = want.ports_in(ifaces)
    tagged = dec.tag_kind != TagKind.NONE
    sent = tagged & (
        ((dec.svif > 0) & np.isin(host | dec.svif, ports)) | (at_port & (dec.tag_d == 0))
    )
    single = dec.tag_p == 0  # a dvif with the pointer bit names a list of vifs
    got = tagged & (
        ((dec.dvif > 0) & single & np.isin(host | dec.dvif, ports)) | (at_port & (dec.tag_d == 1))
    )
    macs = np.unique(np.concatenate([dec.src_mac[sent], dec.dst_mac[got]]))
    macs = macs[((macs & _GROUP_BIT) == 0) & (macs != NO_MAC)]
    return set(macs.tolist())


class VmNames:
    """VM names by (host, vif) port and by MAC, looked up for whole columns."""

    def __init__(self, segments: list[SegmentInfo], inventory: InventoryView | None) -> None:
        names: dict[str, int] = {}
        ports: dict[int, int] = {}
        macs: dict[int, int] = {}
        if inventory is not None:
            for vm in inventory.vms:
                code = names.setdefault(vm.name, len(names))
                host = inventory.host(vm.host)
                for nic in vm.nics:
                    ports[(host.collector_id if host else 0) << 32 | nic.vif] = code
                    macs[nic.mac] = code
        for seg in segments:
            for i in seg.interfaces:
                if i.vm_name and i.vif:
                    ports.setdefault(i.host << 32 | i.vif, names.setdefault(i.vm_name, len(names)))
        self.text = [*names, "-"]
        self._ports = (
            np.array(sorted(ports), np.uint64),
            np.array([ports[k] for k in sorted(ports)], np.int64),
        )
        self._macs = (
            np.array(sorted(macs), np.uint64),
            np.array([macs[k] for k in sorted(macs)], np.int64),
        )

    @staticmethod
    def _find(table: tuple[U64, npt.NDArray[np.int64]], keys: U64) -> npt.NDArray[np.int64]:
        known, codes = table
        out = np.full(keys.shape, -1, np.int64)
        if known.size:
            pos = np.minimum(np.searchsorted(known, keys), known.size - 1)
            hit = known[pos] == keys
            out[hit] = codes[pos[hit]]
        return out

    def of(self, host: U64, vif: npt.NDArray[np.uint32], mac: U64) -> npt.NDArray[np.int64]:
        """Name code per frame (``len(text) - 1``, i.e. "-", when unknown)."""
        code = np.where(vif > 0, self._find(self._ports, host << np.uint64(32) | vif), -1)
        code = np.where(code < 0, self._find(self._macs, mac), code)
        return np.where(code < 0, len(self.text) - 1, code)


def comments(
    names: VmNames,
    src: npt.NDArray[np.int64],
    dst: npt.NDArray[np.int64],
    verdicts: list[str | None],
) -> list[str | None]:
    """``"web-01 → db-01"`` plus ``"; verdict: …"`` per frame, each distinct text made once."""
    vcode, table = pd.factorize(pd.Series(verdicts, dtype=object))  # None: -1
    width, kinds = len(names.text), len(table) + 1
    combo = (src * width + dst) * kinds + (vcode + 1)
    codes, uniq = pd.factorize(combo)
    text = np.empty(len(uniq), dtype=object)
    for k, c in enumerate(np.asarray(uniq).tolist()):
        pair, v = divmod(c, kinds)
        s, d = divmod(pair, width)
        text[k] = f"{names.text[s]} → {names.text[d]}" + (f"; verdict: {table[v - 1]}" if v else "")
    out: list[str | None] = text[codes].tolist()
    return out
