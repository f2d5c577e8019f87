"""Endpoint identity of each frame's source and destination, vectorized.

An endpoint is encoded in one ``uint64`` so that flow keys are plain integer columns:

- ``NIC | index``: a vNIC of the inventory (so a VM, wherever it runs);
- ``VIF | collector_id << 20 | vif``: a vif seen in tags on a host the inventory does not
  describe (learned from the data plane);
- ``MAC | mac``: anything else, by its MAC (the uplink's peers, gateways, unknown hosts).

Resolution order per side: the tag's vif on the observing host (through the inventory, else
as a VIF id), then the MAC (inventory, else MACs learned from tagged frames: the vNIC of the
(host, vif) it was learned behind, else that VIF id), then the MAC itself. Learning MAC →
(host, vif) from tags is what puts the two copies of a cross-host packet — ``svif=a,
dvif=0`` at host A and ``svif=0, dvif=b`` at host B — into one flow even without an
inventory, or with one that lacks the MAC.

The learned table is bounded (``LearningConfig``), since a VM can send frames from as many
source MACs as it likes: at most ``max_macs_per_vif`` MACs behind one (host, vif) and
``max_macs`` in all; beyond, the least recently seen MACs are forgotten and counted
(``evicted``). "Seen" is in batches (a logical clock), so nothing reads a clock. A MAC
forgotten is only no longer resolved by MAC; it is learned again when its vif sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vspan.analysis._factorize import factorize
from vspan.analysis.decode.columns import NO_MAC, Decoded, TagKind

__all__ = [
    "KIND_MAC",
    "KIND_NIC",
    "KIND_VIF",
    "EndpointResolver",
    "Endpoints",
    "LearningConfig",
    "NicDirectory",
    "endpoint_host_vif",
]

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
I32 = npt.NDArray[np.int32]

KIND_SHIFT = np.uint64(62)
KIND_MAC = np.uint64(0)
KIND_VIF = np.uint64(1) << KIND_SHIFT
KIND_NIC = np.uint64(2) << KIND_SHIFT
_PAYLOAD = (np.uint64(1) << KIND_SHIFT) - np.uint64(1)
_VIF_BITS = np.uint64(20)
_VIF_MASK = (np.uint64(1) << _VIF_BITS) - np.uint64(1)
_BROADCAST_BIT = np.uint64(1 << 40)
"""The I/G bit of a MAC as a 48-bit integer: group (multicast/broadcast) addresses."""


@dataclass(frozen=True, slots=True)
class LearningConfig:
    """Bounds of the MAC table learned from tags (24 bytes per MAC)."""

    max_macs_per_vif: int = 1024
    """MACs kept behind one (collector_id, vif); beyond, the least recently seen go."""
    max_macs: int = 262_144
    """MACs kept in all; beyond, the least recently seen go."""

    def __post_init__(self) -> None:
        for name in ("max_macs_per_vif", "max_macs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: need at least 1")


class NicDirectory(Protocol):
    """What endpoint resolution needs from an inventory (a narrow getter interface)."""

    def resolve_vifs(self, collector_id: npt.ArrayLike, vif: npt.ArrayLike) -> I32: ...

    def resolve_macs(self, mac: npt.ArrayLike) -> I32: ...

    def nic_host_vif(self) -> tuple[U32, U32]:
        """collector_id and vif of each NIC, by NIC index."""
        ...


@dataclass(frozen=True, slots=True, eq=False)
class Endpoints:
    """Per-frame endpoint ids (see module docstring)."""

    src: U64
    dst: U64


def endpoint_host_vif(ep: U64, nic_host: U32 | None, nic_vif: U32 | None) -> tuple[U32, U32]:
    """collector_id and vif of each endpoint (0, 0 for MAC endpoints)."""
    kind = ep & ~_PAYLOAD
    payload = ep & _PAYLOAD
    host = np.zeros(ep.shape, dtype=np.uint32)
    vif = np.zeros(ep.shape, dtype=np.uint32)
    is_vif = kind == KIND_VIF
    host[is_vif] = (payload[is_vif] >> _VIF_BITS).astype(np.uint32)
    vif[is_vif] = (payload[is_vif] & _VIF_MASK).astype(np.uint32)
    is_nic = kind == KIND_NIC
    if nic_host is not None and nic_vif is not None and is_nic.any():
        index = payload[is_nic].astype(np.int64)
        host[is_nic] = nic_host[index]
        vif[is_nic] = nic_vif[index]
    return host, vif


class EndpointResolver:
    """Resolves frame endpoints; keeps the MAC → (host, vif) table learned from tags."""

    def __init__(
        self, directory: NicDirectory | None = None, *, learning: LearningConfig | None = None
    ) -> None:
        self.directory = directory
        self.learning = learning or LearningConfig()
        self._table: tuple[U64, U64] = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        """(sorted MACs, their VIF endpoints), replaced whole so other threads may read it."""
        self._stamp = np.zeros(0, np.int64)
        """When each MAC of the table was last seen (``_tick``); only the resolving thread."""
        self._tick = 0
        self.evicted = 0
        """Learned MACs forgotten because of ``learning``'s bounds."""

    @property
    def learned(self) -> int:
        """How many MACs the data plane has taught."""
        return int(self._table[0].size)

    def learned_table(self) -> tuple[U64, U32, U32]:
        """What the tags taught: each MAC with the collector_id and vif it was seen behind."""
        macs, eps = self._table
        payload = eps & _PAYLOAD
        return (
            macs,
            (payload >> _VIF_BITS).astype(np.uint32),
            (payload & _VIF_MASK).astype(np.uint32),
        )

    def resolve(self, dec: Decoded) -> Endpoints:
        """Endpoint ids of every frame of ``dec`` (learning from its tags first).

        Each side is factorized first — a frame's endpoint depends only on its (host, vif)
        when the tag names a local vif, else on its MAC — so the lookups run once per
        distinct value, not once per frame.
        """
        tagged = dec.tag_kind != TagKind.NONE
        src_local = tagged & (dec.svif != 0)
        # A dvif with the pointer bit names a vif *list* (multicast), not one interface.
        dst_local = tagged & (dec.dvif != 0) & (dec.tag_p == 0)
        src_codes, src_uniq = _factorize_side(dec.src_mac, src_local, dec.host, dec.svif)
        dst_codes, dst_uniq = _factorize_side(dec.dst_mac, dst_local, dec.host, dec.dvif)
        self._learn_pairs(dec.src_mac, src_local, src_codes, src_uniq)
        self._learn_pairs(dec.dst_mac, dst_local, dst_codes, dst_uniq)
        return Endpoints(
            src=self._resolve_keys(src_uniq)[src_codes], dst=self._resolve_keys(dst_uniq)[dst_codes]
        )

    def _resolve_keys(self, keys: U64) -> U64:
        """Endpoint id of each distinct side key (see ``_factorize_side``)."""
        local = (keys & _LOCAL_KEY) != 0
        hostvif = keys & ~_LOCAL_KEY
        host = (hostvif >> _VIF_BITS).astype(np.uint32)
        vif = (hostvif & _VIF_MASK).astype(np.uint32)
        mac = np.where(local, np.uint64(0), keys)
        ep = mac.copy()  # KIND_MAC is 0
        learned = self._lookup_learned(mac)
        known = (learned != 0) & ~local
        ep[known] = learned[known]
        ep[local] = KIND_VIF | hostvif[local]
        if self.directory is not None:
            by_mac = np.where(local, -1, self.directory.resolve_macs(mac))
            by_vif = np.where(local, self.directory.resolve_vifs(host, vif), -1)
            # A MAC learned behind a vif of the inventory is that vNIC's, as the tag makes
            # the copy at its own host: a MAC the inventory does not have (a bridge VM's
            # before its collector registers it, a macvlan or nested VM behind the port).
            taught = learned & _PAYLOAD
            by_learned = self.directory.resolve_vifs(
                (taught >> _VIF_BITS).astype(np.uint32), (taught & _VIF_MASK).astype(np.uint32)
            )
            by_mac = np.where((by_mac < 0) & known, by_learned, by_mac)
            nic = np.maximum(by_vif, by_mac)
            hit = nic >= 0
            ep[hit] = KIND_NIC | nic[hit].astype(np.uint64)
        return ep

    def _learn_pairs(
        self, mac: U64, local: npt.NDArray[np.bool_], codes: npt.NDArray[np.int64], uniq: U64
    ) -> None:
        """Learn MAC → (host, vif) from the frames whose tag names a local vif."""
        rows = np.flatnonzero(local)
        if rows.size == 0:
            return
        # The newest frame of each MAC wins: keep each MAC's last row (a hash pass).
        newest_first = rows[::-1]
        pick = newest_first[factorize(mac[newest_first])[2]]
        self._learn(mac[pick], KIND_VIF | (uniq[codes[pick]] & ~_LOCAL_KEY))

    def _learn(self, macs: U64, eps: U64) -> None:
        """Learn distinct MACs (newest pair each); refresh what is known, bound the table."""
        unicast = ((macs & _BROADCAST_BIT) == 0) & (macs != NO_MAC)  # a frame with no MAC
        macs, eps = macs[unicast], eps[unicast]
        if macs.size == 0:
            return
        self._tick += 1
        old_mac, old_ep = self._table
        if old_mac.size:
            pos = np.minimum(np.searchsorted(old_mac, macs), old_mac.size - 1)
            same = (old_mac[pos] == macs) & (old_ep[pos] == eps)
            self._stamp[pos[same]] = self._tick  # known and unmoved: only seen again
            if same.all():
                return
            macs, eps = macs[~same], eps[~same]
        # New pairs first, so that np.unique keeps them over a MAC's old pair.
        all_mac = np.concatenate([macs, old_mac])
        all_ep = np.concatenate([eps, old_ep])
        all_stamp = np.concatenate([np.full(macs.size, self._tick, np.int64), self._stamp])
        uniq, first = np.unique(all_mac, return_index=True)
        ep, stamp = all_ep[first], all_stamp[first]
        keep = _within_bounds(ep, stamp, self.learning)
        if keep is not None:
            self.evicted += int(keep.size - np.count_nonzero(keep))
            uniq, ep, stamp = uniq[keep], ep[keep], stamp[keep]
        self._stamp = stamp
        self._table = (uniq, ep)

    def _lookup_learned(self, mac: U64) -> U64:
        out = np.zeros(mac.shape, dtype=np.uint64)
        table, eps = self._table
        if table.size == 0:
            return out
        pos = np.minimum(np.searchsorted(table, mac), table.size - 1)
        hit = table[pos] == mac
        out[hit] = eps[pos[hit]]
        return out


def _within_bounds(
    ep: U64, stamp: npt.NDArray[np.int64], cfg: LearningConfig
) -> npt.NDArray[np.bool_] | None:
    """Which MACs stay: the ``max_macs_per_vif`` most recently seen of each endpoint, then
    the ``max_macs`` most recently seen of those; ``None`` when every one stays."""
    keep = np.ones(ep.size, np.bool_)
    _, counts = np.unique(ep, return_counts=True)
    if counts.size and counts.max() > cfg.max_macs_per_vif:
        order = np.lexsort((-stamp, ep))  # by endpoint, most recent first
        sorted_ep = ep[order]
        start = np.flatnonzero(np.r_[True, sorted_ep[1:] != sorted_ep[:-1]])
        rank = np.arange(ep.size) - np.repeat(start, np.diff(np.r_[start, ep.size]))
        keep[order[rank >= cfg.max_macs_per_vif]] = False
    if np.count_nonzero(keep) > cfg.max_macs:
        live = np.flatnonzero(keep)
        oldest = live[np.argsort(-stamp[live], kind="stable")[cfg.max_macs :]]
        keep[oldest] = False
    return None if keep.all() else keep


_LOCAL_KEY = np.uint64(1) << np.uint64(63)
"""Marks a side key that is (host << 20 | vif) rather than a MAC."""


def _factorize_side(
    mac: U64, local: npt.NDArray[np.bool_], host: U32, vif: U32
) -> tuple[npt.NDArray[np.int64], U64]:
    """Codes and distinct keys of one side: (host, vif) for local vifs, else the MAC."""
    hostvif = (host.astype(np.uint64) << _VIF_BITS) | vif.astype(np.uint64)
    key = np.where(local, _LOCAL_KEY | hostvif, mac)
    codes, uniq, _ = factorize(np.ascontiguousarray(key, np.uint64))
    return codes, uniq
