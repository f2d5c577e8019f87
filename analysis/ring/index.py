"""The packet ring's index: per segment file, its time range, its interfaces and the keys
it holds, so that an export opens only the segments that can match.

Each segment ``ring-NNNNNNNN.pcapng`` has a sidecar ``ring-NNNNNNNN.json`` (written
atomically: a temporary file, then a rename) holding a ``SegmentInfo``: first/last
timestamp, frame and byte counts, the pcapng interfaces (one per (host, vif): collector_id,
host name, vif, VM name and UUID) and the sets of hosts, (host, vif) pairs, VM UUIDs, MACs
and IPs present. A set that would grow past ``MAX_KEYS`` is dropped and stands for "any"
(a scan of a /16 should not make the index as big as the segment). A segment whose sidecar
says it is still open is matched on its start time only.

Keys are gathered per batch with numpy (``np.unique``); only the distinct values reach
Python sets. The sidecar makes the ring self-describing: an export works from the data
directory alone, even while the analyzer holds the store open.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis._factorize import factorize
from vspan.analysis.decode import decode_batch
from vspan.analysis.decode.columns import Decoded, TagKind
from vspan.errors import CaptureFileError
from vspan.inventory import InventoryView, format_mac
from vspan.pcap.read import CaptureReader

__all__ = [
    "MAX_KEYS",
    "Interface",
    "SegmentInfo",
    "SegmentQuery",
    "frame_vifs",
    "host_name",
    "ip_key",
    "load_index",
    "read_sidecar",
    "reindex",
    "segment_files",
    "sidecar_path",
    "write_sidecar",
]

_SEGMENT: Final = re.compile(r"ring-(\d{8,})\.pcapng")
MAX_KEYS: Final = 65_536
"""Distinct values of one kind kept per segment; beyond, the kind matches anything."""
_U64 = np.uint64
_IPV4_MAPPED: Final = 0xFFFF << 32


def ip_key(text: str) -> int:
    """An address as one 128-bit integer, IPv4 as IPv4-mapped IPv6 (as ``Decoded`` has it)."""
    addr = ipaddress.ip_address(text)
    return _IPV4_MAPPED | int(addr) if addr.version == 4 else int(addr)


def _ip_text(key: int) -> str:
    addr = ipaddress.IPv6Address(key)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def frame_vifs(decoded: Decoded) -> npt.NDArray[np.uint32]:
    """The vif of the vswitch port each frame was captured at: the sender's (``svif``) for
    ``d=0``, the receiver's (``dvif``) for ``d=1``; 0 for frames without a tag."""
    vif = np.where(decoded.tag_d == 0, decoded.svif, decoded.dvif).astype(np.uint32)
    return np.where(decoded.tag_kind == TagKind.NONE, np.uint32(0), vif)


def host_name(collector_id: int, inventory: InventoryView | None) -> str:
    """The inventory's name for a collector, else ``collector-N`` (0: ``unknown``)."""
    host = inventory.host_by_id(collector_id) if inventory is not None else None
    if host is not None:
        return host.name
    return f"collector-{collector_id}" if collector_id else "unknown"


@dataclass(frozen=True, slots=True)
class Interface:
    """One pcapng interface of a segment: a vswitch port of one host."""

    host: int
    """collector_id."""
    host_name: str
    vif: int
    vm_name: str | None = None
    vm_uuid: str | None = None

    @property
    def name(self) -> str:
        """``host/vm`` or ``host/vif N``: what Wireshark shows as the interface name."""
        return f"{self.host_name}/{self.vm_name or f'vif {self.vif}'}"

    @property
    def description(self) -> str:
        return (
            f"host {self.host_name} (collector_id {self.host}), vif {self.vif}, "
            f"VM {self.vm_name or '-'} uuid {self.vm_uuid or '-'}"
        )


@dataclass(frozen=True, slots=True)
class SegmentQuery:
    """What an export wants; None means "no condition". The VM condition holds when any
    of ``vm_uuids``, ``vm_vifs`` ((host, vif) pairs) or ``vm_macs`` is present."""

    since_ns: int | None = None
    until_ns: int | None = None
    hosts: frozenset[int] | None = None
    vm_uuids: frozenset[str] | None = None
    vm_vifs: frozenset[tuple[int, int]] | None = None
    vm_macs: frozenset[int] | None = None
    ips: frozenset[int] | None = None


def _hits(wanted: frozenset[Any] | None, present: set[Any] | None) -> bool:
    return wanted is None or present is None or not wanted.isdisjoint(present)


@dataclass
class SegmentInfo:
    """What one segment file holds (its sidecar, in memory)."""

    name: str
    first_ns: int = 2**63 - 1
    last_ns: int = -(2**63)
    frames: int = 0
    bytes: int = 0
    closed: bool = False
    interfaces: list[Interface] = field(default_factory=list)
    hosts: set[int] | None = field(default_factory=set)
    host_vifs: set[tuple[int, int]] | None = field(default_factory=set)
    vms: set[str] | None = field(default_factory=set)
    macs: set[int] | None = field(default_factory=set)
    ips: set[int] | None = field(default_factory=set)

    def matches(self, q: SegmentQuery) -> bool:
        """Whether the segment may hold a frame ``q`` wants (open segments: by start only)."""
        if q.until_ns is not None and self.frames and self.first_ns >= q.until_ns:
            return False
        if not self.closed:
            return True
        if q.since_ns is not None and self.last_ns < q.since_ns:
            return False
        if not (_hits(q.hosts, self.hosts) and _hits(q.ips, self.ips)):
            return False
        if q.vm_uuids is None and q.vm_vifs is None and q.vm_macs is None:
            return True
        return (
            (q.vm_uuids is not None and _hits(q.vm_uuids, self.vms))
            or (q.vm_vifs is not None and _hits(q.vm_vifs, self.host_vifs))
            or (q.vm_macs is not None and _hits(q.vm_macs, self.macs))
        )

    def add(self, decoded: Decoded, host: npt.NDArray[np.uint32], uuids: Iterable[str]) -> None:
        """Widen the time range and the key sets by a batch of frames (hash-based
        ``factorize``: a sort per batch would cost more than writing the frames)."""
        if not len(decoded):
            return
        self.first_ns = min(self.first_ns, int(decoded.ts_ns.min()))
        self.last_ns = max(self.last_ns, int(decoded.ts_ns.max()))
        h = host.astype(_U64) << _U64(32)
        svif, dvif = decoded.svif.astype(_U64), decoded.dvif.astype(_U64)
        vifs = np.concatenate([(h | svif)[svif > 0], (h | dvif)[dvif > 0]])
        self.hosts = _merge(self.hosts, _distinct(host))
        self.host_vifs = _merge(
            self.host_vifs, [(k >> 32, k & 0xFFFFFFFF) for k in _distinct(vifs)]
        )
        self.vms = _merge(self.vms, uuids)
        macs = _distinct(np.concatenate([decoded.src_mac, decoded.dst_mac]))
        self.macs = _merge(self.macs, (m for m in macs if m))
        ip = decoded.ip_version != 0
        hi = np.concatenate([decoded.src_ip_hi[ip], decoded.dst_ip_hi[ip]])
        lo = np.concatenate([decoded.src_ip_lo[ip], decoded.dst_ip_lo[ip]])
        v6 = hi != 0  # IPv4 (mapped) has hi == 0: one 64-bit key is enough
        found = _distinct(lo[~v6])
        if v6.any():
            found += [(a << 64) | b for a, b in _distinct_pairs(hi[v6], lo[v6])]
        self.ips = _merge(self.ips, found)

    def to_json(self, *, keys: bool = True) -> dict[str, Any]:
        """The sidecar document; without ``keys`` the key sets are left out (null: any)."""

        def listed(values: set[Any] | None, fmt: Any = None) -> list[Any] | None:
            if values is None or not keys:
                return None
            return sorted(fmt(v) if fmt else v for v in values)

        return {
            "name": self.name,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "frames": self.frames,
            "bytes": self.bytes,
            "closed": self.closed,
            "interfaces": [
                [i.host, i.host_name, i.vif, i.vm_name, i.vm_uuid] for i in self.interfaces
            ],
            "hosts": listed(self.hosts),
            "host_vifs": listed(self.host_vifs, list),
            "vms": listed(self.vms),
            "macs": listed(self.macs, format_mac),
            "ips": listed(self.ips, _ip_text),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SegmentInfo:
        def setof(key: str, parse: Any) -> set[Any] | None:
            values = doc.get(key)
            return None if values is None else {parse(v) for v in values}

        return cls(
            name=str(doc["name"]),
            first_ns=int(doc["first_ns"]),
            last_ns=int(doc["last_ns"]),
            frames=int(doc["frames"]),
            bytes=int(doc["bytes"]),
            closed=bool(doc["closed"]),
            interfaces=[Interface(*i) for i in doc["interfaces"]],
            hosts=setof("hosts", int),
            host_vifs=setof("host_vifs", tuple),
            vms=setof("vms", str),
            macs=setof("macs", lambda m: int(m.replace(":", ""), 16)),
            ips=setof("ips", ip_key),
        )

    def store_rows(self) -> tuple[dict[str, object], pd.DataFrame]:
        """The segment's ``ring_segments`` row and ``ring_segment_keys`` rows."""
        row = {k: getattr(self, k) for k in ("name", "first_ns", "last_ns", "frames", "bytes")}
        doc = self.to_json()
        kinds = {"host": "hosts", "host_vif": "host_vifs", "vm": "vms", "mac": "macs", "ip": "ips"}
        keys = [
            (kind, "/".join(map(str, v)) if isinstance(v, list) else str(v))
            for kind, attr in kinds.items()
            for v in doc[attr] or ()
        ]
        return row, pd.DataFrame(keys, columns=["kind", "value"], dtype=object)


def _distinct(values: npt.NDArray[Any]) -> list[int]:
    """The distinct values (of an unsigned integer column), in one compiled hash pass."""
    keys = np.ascontiguousarray(values, dtype=np.uint64)
    return list(factorize(keys)[1].tolist()) if keys.size else []


def _distinct_pairs(
    hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]
) -> list[tuple[int, int]]:
    """The distinct ``(hi, lo)`` pairs (128-bit addresses), exactly: each half factorized,
    then the pair of codes (which fits 64 bits) factorized."""
    hi_codes, _, _ = factorize(np.ascontiguousarray(hi, np.uint64))
    lo_codes, lo_uniq, _ = factorize(np.ascontiguousarray(lo, np.uint64))
    pair = hi_codes.astype(np.uint64) * np.uint64(lo_uniq.size) + lo_codes.astype(np.uint64)
    _, _, first = factorize(pair)
    return list(zip(hi[first].tolist(), lo[first].tolist(), strict=True))


def _merge(known: set[Any] | None, new: Iterable[Any]) -> set[Any] | None:
    if known is None:
        return None
    known.update(new)
    return known if len(known) <= MAX_KEYS else None


def sidecar_path(segment: Path) -> Path:
    return segment.with_suffix(".json")


def write_sidecar(directory: Path, info: SegmentInfo, *, keys: bool = True) -> None:
    """Write the sidecar of ``info`` atomically (may raise ``OSError``); an open segment's
    is written without its keys (they are rebuilt from the file if it is never closed)."""
    path = sidecar_path(directory / info.name)
    tmp = path.with_suffix(".json.tmp")
    try:
        doc = json.dumps(info.to_json(keys=keys), separators=(",", ":"))
        tmp.write_text(doc, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_sidecar(segment: Path) -> SegmentInfo | None:
    """The sidecar of ``segment``; None when it is missing or unreadable."""
    try:
        doc = json.loads(sidecar_path(segment).read_text(encoding="utf-8"))
        return SegmentInfo.from_json(doc)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reindex(path: Path, info: SegmentInfo | None) -> tuple[SegmentInfo, int | None]:
    """The index of a segment rebuilt from its frames (for one that was never closed), and
    the size to cut the file to when its last frame is torn (else None). Without a sidecar
    the hosts, vifs and VMs are unknown: those keys then match any query."""
    interfaces = info.interfaces if info is not None else []
    new = SegmentInfo(path.name, closed=True, interfaces=interfaces)
    if not interfaces:
        new.hosts = new.host_vifs = new.vms = None
    hosts = np.array([i.host for i in interfaces] or [0], np.uint32)
    uuids = {i.vm_uuid for i in interfaces if i.vm_uuid}
    reader = CaptureReader(path)
    try:
        for batch in reader:
            iface = np.clip(batch.iface_column(), 0, hosts.size - 1)
            new.add(decode_batch(batch), hosts[iface], uuids)
            new.frames += len(batch)
    except CaptureFileError:
        return new, 0  # not even a file header: nothing to keep
    return new, None if reader.error is None else reader.bytes_read


def segment_files(directory: Path) -> list[Path]:
    """The segment files of a ring directory, oldest first (other files are ignored)."""
    return sorted(p for p in directory.glob("ring-*.pcapng") if _SEGMENT.fullmatch(p.name))


def load_index(directory: Path) -> list[SegmentInfo]:
    """Every segment of a ring directory, oldest first; a segment without a readable
    sidecar is listed as open (it will be scanned, never skipped)."""
    out = []
    for segment in segment_files(directory):
        info = read_sidecar(segment)
        out.append(info if info is not None else SegmentInfo(segment.name))
    return out
