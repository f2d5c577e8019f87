"""Mirroring: from frames seen on VM ports to VN-tagged frames, once per frame, vectorized.

Rules (``ARCHITECTURE.md``, "Mirroring semantics"). A frame was captured on the port of
vif ``P``, sent by that VM (``from_vm``) or delivered to it; ``local(m)`` is the vif of MAC
``m`` when it is a VM port of this host (``LocalMacs``), else 0; *group* means the I/G bit
of the destination MAC is set (broadcast or multicast).

- sent by P, unicast: ``d=0, svif=P, dvif=local(dst)``;
- sent by P, group: ``d=0, svif=P, dvif=0, p=0``;
- delivered to P from outside (``local(src) = 0``), unicast or group: ``d=1, svif=0,
  dvif=P`` — a group frame from outside is thus exported once per receiving VM;
- delivered to P from a local VM, unicast with ``local(dst) = P``, and a session asks for
  both directions of P's VM (``Selection.both``): ``d=1, svif=local(src), dvif=P``;
- delivered to P from a local VM otherwise (unicast without ``both``, a flooded unicast
  whose destination is not P, any group frame, even with ``both``): dropped as a
  *duplicate* of the copy exported at the sender.

So a frame between two local VMs is exported once at the sender (``svif≠0, dvif≠0``:
intra-host), a broadcast or multicast a local VM sends is exported once (its copies to
the other local VMs are duplicates, even with ``both``), and a broadcast from the uplink
is exported once per local VM that received it (the analyzer learns who received it;
the copies share the sender and timestamp, so it can count the wire once). A frame
shorter than 14 bytes (no Ethernet header) is dropped as a *runt*. A local VM is only
recognised by a known MAC: a port whose MAC is 0 looks like the outside until discovery
learns it.

Selection (``sessions.Selection``, per vif): a frame P sent is wanted if P's ``tx`` is
selected, or — unicast to a local VM — the receiver's ``rx``, or — group — the ``rx`` of
any other local port; a delivery from outside if P's ``rx`` is; an intra-host delivery
copy only exists with ``both``. A selection with a filter (``bpf.PacketFilter``) wants
only the frames its filter accepts, run on the untagged frame as captured. Its snaplen
is the largest (0 = whole frame) and its sampling the densest of the selections that
wanted it (for a group frame wanted through receivers: of every ``rx`` port). Sampling is
1:N per capture port, deterministic: of the wanted frames of a port, counted across
batches, the 0th, Nth, 2Nth... are kept.

Routes: each destination (the collector's analyzer, key None, and every session
destination) has its selections, its own sampling counters and its own tagged frames
(``process_routes``). Per route every input frame ends in exactly one of ``exported``,
``duplicates``, ``unselected``, ``filtered`` (selected, but no filter of the selections
that wanted it accepted it), ``sampled_out``, ``runts``; ``MirrorCounters`` counts each
frame once across routes, by the furthest it got (exported to any route, else sampled
out, else filtered, else unselected, else a duplicate).

Tagged frame: dst MAC, src MAC, ``0x8926``, the 4-byte tag, then the original frame from
offset 12 (cut to the snaplen); ``caplen`` and ``origlen`` grow by 6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch, LinkType
from vspan.collectors.model import PortBatch
from vspan.inventory import MAX_VIF, Port
from vspan.sessions import Destination, Selection
from vspan.wire.tunnel_batch import GATHER_STEP, gather_runs
from vspan.wire.vntag import VNTAG_LEN, EtherType, encode_vntag_array

__all__ = [
    "DROP_REASONS",
    "MIN_FRAME",
    "TAG_OVERHEAD",
    "LocalMacs",
    "Mirror",
    "MirrorCounters",
    "MirrorResult",
    "read_macs",
    "tag_frames",
]

I64 = npt.NDArray[np.int64]
U16 = npt.NDArray[np.uint16]
U64 = npt.NDArray[np.uint64]

MIN_FRAME: Final = 14
"""Shortest frame mirrored: destination MAC, source MAC, EtherType."""
TAG_OVERHEAD: Final = 2 + VNTAG_LEN
"""Bytes the tag adds: EtherType 0x8926 and the 4-byte VN-Tag."""
_MACS: Final = 12
_UNLIMITED: Final = 1 << 30
_SHIFTS: Final = np.arange(40, -8, -8, dtype=np.uint64)

Route = Destination | None
"""Where a route's frames go: a session destination, or None, the collector's analyzer."""


@dataclass(frozen=True, slots=True, eq=False)
class LocalMacs:
    """MAC → vif of this host's VM ports, as a sorted table for ``searchsorted``."""

    mac: U64
    """MACs, ascending."""
    vif: U16
    """vif of each MAC."""

    @classmethod
    def from_ports(cls, ports: Sequence[Port]) -> LocalMacs:
        """The table of the ports with a known MAC and a vif (later ports win a clash)."""
        pairs = {p.mac: p.vif for p in ports if p.mac and 1 <= p.vif <= MAX_VIF}
        mac = np.array(sorted(pairs), dtype=np.uint64)
        return cls(mac, np.array([pairs[int(m)] for m in mac], dtype=np.uint16))

    def lookup(self, macs: U64) -> U16:
        """vif of each MAC; 0 where it is not a local VM."""
        out = np.zeros(macs.shape, dtype=np.uint16)
        if self.mac.size == 0 or macs.size == 0:
            return out
        pos = np.minimum(np.searchsorted(self.mac, macs), self.mac.size - 1)
        hit = self.mac[pos] == macs
        out[hit] = self.vif[pos[hit]]
        return out


@dataclass(frozen=True, slots=True, eq=False)
class MirrorResult:
    """The tagged frames of one ``PortBatch`` for one route, and where every other went."""

    frames: FrameBatch
    """VN-tagged frames, in input order."""
    vif: U16
    """vif of the port each exported frame was captured on."""
    rows: I64
    """Row of the input batch each exported frame came from."""
    exported: int = 0
    """Frames tagged (``len(frames)``)."""
    duplicates: int = 0
    """Delivery copies of frames already exported at a local sender."""
    unselected: int = 0
    """Frames no session wanted."""
    filtered: int = 0
    """Frames selected, but not accepted by the filter of any selection that wanted them."""
    sampled_out: int = 0
    """Frames skipped by 1:N sampling."""
    runts: int = 0
    """Frames shorter than an Ethernet header."""
    truncated: int = 0
    """Exported frames cut by a snaplen."""


DROP_REASONS: Final = ("duplicates", "unselected", "filtered", "sampled_out", "runts")
"""Why a frame was not exported, in the order ``MirrorCounters`` ranks them (last wins)."""


@dataclass
class MirrorCounters:
    """Totals over every batch (monotonic); each input frame counted once across routes."""

    frames: int = 0
    """Frames handed to ``process``."""
    exported: int = 0
    """Frames tagged for at least one route."""
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    """Frames exported to no route, by the furthest they got (``DROP_REASONS``)."""
    truncated: int = 0
    """Tagged frames cut by a snaplen (each route's copy counts)."""
    routes: dict[Route, int] = field(default_factory=dict)
    """Frames tagged for each route."""


def read_macs(frames: FrameBatch, rows: I64) -> tuple[U64, U64]:
    """(destination, source) MAC of each frame in ``rows`` (each at least 12 bytes)."""
    raw = frames.data[frames.offset[rows][:, None] + np.arange(_MACS)].astype(np.uint64)
    return (raw[:, :6] << _SHIFTS).sum(axis=1), (raw[:, 6:] << _SHIFTS).sum(axis=1)


def tag_frames(
    frames: FrameBatch, rows: I64, words: npt.NDArray[np.uint32], keep: I64
) -> FrameBatch:
    """New batch: frame ``rows[i]`` cut to ``keep[i]`` bytes, tagged with ``words[i]``.

    Per step of about ``GATHER_STEP`` bytes: one gather of the kept bytes, then one
    ``np.insert`` of the 6 tag bytes of every frame at its offset 12.
    """
    m = rows.size
    out_len = keep + TAG_OVERHEAD
    ends = np.cumsum(out_len)
    out = np.empty(int(ends[-1]) if m else 0, dtype=np.uint8)
    tag = np.empty((m, TAG_OVERHEAD), dtype=np.uint8)
    tag[:, :2] = np.frombuffer(int(EtherType.VNTAG).to_bytes(2, "big"), np.uint8)
    tag[:, 2:] = words.astype(">u4").view(np.uint8).reshape(m, VNTAG_LEN)
    first = 0
    while first < m:
        lo = int(ends[first] - out_len[first])
        last = max(int(np.searchsorted(ends, lo + GATHER_STEP, side="right")), first + 1)
        part = slice(first, last)
        body = gather_runs(frames.data, frames.offset[rows[part]], keep[part])
        at = np.cumsum(keep[part]) - keep[part] + _MACS  # where each tag goes in ``body``
        out[lo : int(ends[last - 1])] = np.insert(
            body, np.repeat(at, TAG_OVERHEAD), tag[part].ravel()
        )
        first = last
    return FrameBatch(
        data=out,
        offset=ends - out_len,
        caplen=out_len.astype(np.int32),
        origlen=frames.origlen[rows] + TAG_OVERHEAD,
        ts_ns=frames.ts_ns[rows],
        linktype=np.full(m, LinkType.ETHERNET, dtype=np.uint16),
    )


@dataclass(frozen=True, slots=True, eq=False)
class _Frames:
    """What the rules need of a batch's frames (rows: those at least ``MIN_FRAME`` long)."""

    rows: I64
    p: I64
    """vif of the capture port."""
    sent: npt.NDArray[np.bool_]
    group: npt.NDArray[np.bool_]
    dst_vif: I64
    src_vif: I64
    from_local: npt.NDArray[np.bool_]
    """Delivered to P by a local VM."""


Parts = Selection | Sequence[Selection]
"""A route's selections: one, or several (a frame is wanted when any of them wants it)."""


def _parts(selection: Parts) -> tuple[Selection, ...]:
    return (selection,) if isinstance(selection, Selection) else tuple(selection)


class Mirror:
    """Applies the mirroring rules and each route's selections to port batches.

    ``set_ports`` after every discovery change, ``set_routes`` after every session change
    (until then one route, None, with ``Selection.everything()`` or the ``selection``
    given); ``process_routes`` keeps each route's sampling counters across batches.
    """

    def __init__(self, *, selection: Parts | None = None) -> None:
        self.routes: dict[Route, tuple[Selection, ...]] = {
            None: _parts(Selection.everything() if selection is None else selection)
        }
        self.macs = LocalMacs.from_ports(())
        self.counters = MirrorCounters()
        self._port_vifs = np.zeros(0, dtype=np.int64)
        self._seen: dict[Route, I64] = {}  # wanted frames per capture port, per route

    @property
    def selection(self) -> tuple[Selection, ...]:
        """The selections of the collector's own analyzer (route None)."""
        return self.routes.get(None, ())

    def set_ports(self, ports: Sequence[Port]) -> None:
        """The local VM ports (their MACs and vifs)."""
        self.macs = LocalMacs.from_ports(ports)
        self._port_vifs = np.array(
            sorted({p.vif for p in ports if 1 <= p.vif <= MAX_VIF}), np.int64
        )

    def set_selection(self, selection: Parts) -> None:
        """What the sessions want, all sent to route None (sampling counters carry over)."""
        self.set_routes({None: selection})

    def set_routes(self, routes: Mapping[Route, Parts]) -> None:
        """Each route's selections (``()``: nothing); counters of routes kept carry over."""
        self.routes = {key: _parts(sel) for key, sel in routes.items()}
        self._seen = {k: v for k, v in self._seen.items() if k in self.routes}

    def process(self, batch: PortBatch) -> MirrorResult:
        """``process_routes``, for a mirror with the one route None."""
        if set(self.routes) != {None}:
            raise ValueError("this mirror has several routes: use process_routes")
        return self.process_routes(batch)[None]

    def process_routes(self, batch: PortBatch) -> dict[Route, MirrorResult]:
        """Per route, tag what the rules and its selections export; count the rest."""
        frames = batch.frames
        if batch.vif.size and not 1 <= int(batch.vif.min()) <= int(batch.vif.max()) <= MAX_VIF:
            raise ValueError(f"PortBatch vifs must lie in 1..{MAX_VIF}")
        rows = np.flatnonzero(frames.caplen >= MIN_FRAME).astype(np.int64)
        dst, src = read_macs(frames, rows)
        p = batch.vif[rows].astype(np.int64)
        sent = batch.from_vm[rows].astype(np.bool_)
        group = ((dst >> np.uint64(40)) & np.uint64(1)).astype(np.bool_)
        dst_vif = np.where(group, 0, self.macs.lookup(dst)).astype(np.int64)
        src_vif = self.macs.lookup(src).astype(np.int64)
        b = _Frames(rows, p, sent, group, dst_vif, src_vif, ~sent & (src_vif != 0))
        runts = len(frames) - rows.size
        rank = np.zeros(rows.size, np.int8)  # the furthest each frame got, over the routes
        results = {}
        for key, parts in self.routes.items():
            seen = self._seen.setdefault(key, np.zeros(MAX_VIF + 1, dtype=np.int64))
            results[key], got = self._route(frames, b, parts, seen, runts)
            np.maximum(rank, got, out=rank)
        self._count(len(frames), runts, rank, results)
        return results

    def _route(self, frames: FrameBatch, b: _Frames, parts: tuple[Selection, ...], seen: I64,
               runts: int) -> tuple[MirrorResult, npt.NDArray[np.int8]]:  # fmt: skip
        """One route's result, and each row's rank (its index in ``DROP_REASONS``; 4: exported)."""
        n = b.rows.size
        wanted, selected, intra_any = (np.zeros(n, np.bool_) for _ in range(3))
        snap = np.zeros(n, np.int64)
        every = np.full(n, _UNLIMITED, np.int64)
        for sel in parts:
            want, part_snap, part_every, intra = self._wants(b, sel)
            intra_any |= intra
            selected |= want
            if sel.filter is not None:
                at = np.flatnonzero(want)
                want[at] = sel.filter.match(frames, b.rows[at])
            np.maximum(snap, np.where(want, part_snap, 0), out=snap)
            np.minimum(every, np.where(want, part_every, _UNLIMITED), out=every)
            wanted |= want
        dup = b.from_local & ~intra_any
        kept = wanted & _sample(seen, b.p, wanted, every)
        out = np.flatnonzero(kept)
        cap = frames.caplen[b.rows[out]].astype(np.int64)
        keep = np.minimum(cap, snap[out])
        words = encode_vntag_array(
            d=(~b.sent[out]).astype(np.int64),
            svif=np.where(b.sent, b.p, np.where(b.from_local, b.src_vif, 0))[out],
            dvif=np.where(b.sent, b.dst_vif, b.p)[out],
        )
        result = MirrorResult(
            frames=tag_frames(frames, b.rows[out], words, keep),
            vif=b.p[out].astype(np.uint16),
            rows=b.rows[out],
            exported=int(out.size),
            duplicates=int(dup.sum()),
            unselected=int((~dup & ~selected).sum()),
            filtered=int((selected & ~wanted).sum()),
            sampled_out=int((wanted & ~kept).sum()),
            runts=runts,
            truncated=int((keep < cap).sum()),
        )
        rank = np.select([kept, wanted, selected, dup], [4, 3, 2, 0], default=1).astype(np.int8)
        return result, rank

    def _wants(self, b: _Frames, sel: Selection) -> tuple[npt.NDArray[np.bool_], I64, I64,
                                                           npt.NDArray[np.bool_]]:  # fmt: skip
        """Which rows ``sel`` wants (before its filter), their snaplen and sampling, and
        which rows are intra-host delivery copies it asks for."""
        p, dst_vif = b.p, b.dst_vif
        intra = b.from_local & ~b.group & (dst_vif == p) & sel.both[p]
        dup = b.from_local & ~intra
        own = (b.sent & sel.tx[p]) | (~b.sent & ~b.from_local & sel.rx[p]) | intra
        by_dst = b.sent & (dst_vif != 0) & sel.rx[dst_vif]
        rx_ports = self._port_vifs[sel.rx[self._port_vifs]]
        others_rx = rx_ports.size - sel.rx[p].astype(np.int64)
        by_group = b.sent & b.group & (others_rx > 0)
        snapv = np.where(sel.snaplen == 0, _UNLIMITED, sel.snaplen).astype(np.int64)
        group_snap = int(snapv[rx_ports].max()) if rx_ports.size else 0
        group_sample = int(sel.sample[rx_ports].min()) if rx_ports.size else _UNLIMITED
        snap = np.maximum.reduce(
            [
                np.where(own, snapv[p], 0),
                np.where(by_dst, snapv[dst_vif], 0),
                np.where(by_group, group_snap, 0),
            ]
        )
        every = np.minimum.reduce(
            [
                np.where(own, sel.sample[p], _UNLIMITED),
                np.where(by_dst, sel.sample[dst_vif], _UNLIMITED),
                np.where(by_group, group_sample, _UNLIMITED),
            ]
        )
        return (own | by_dst | by_group) & ~dup, snap, every, intra

    def _count(self, frames: int, runts: int, rank: npt.NDArray[np.int8],
               results: Mapping[Route, MirrorResult]) -> None:  # fmt: skip
        c = self.counters
        c.frames += frames
        by_rank = np.bincount(rank, minlength=5)
        c.exported += int(by_rank[4])
        for i, reason in enumerate(DROP_REASONS[:4]):  # rank i; runts have no row
            c.dropped[reason] += int(by_rank[i])
        c.dropped["runts"] += runts
        for key, result in results.items():
            c.truncated += result.truncated
            c.routes[key] = c.routes.get(key, 0) + result.exported


def _sample(seen: I64, port: I64, wanted: npt.NDArray[np.bool_], every: I64
            ) -> npt.NDArray[np.bool_]:  # fmt: skip
    """Keep the wanted frames whose running count on their port (``seen``, updated) is a
    multiple of N."""
    keep = np.zeros(port.size, dtype=np.bool_)
    cand = np.flatnonzero(wanted)
    if cand.size == 0:
        return keep
    cp = port[cand]
    order = np.argsort(cp, kind="stable")
    ports_sorted = cp[order]
    _, first, inverse = np.unique(ports_sorted, return_index=True, return_inverse=True)
    rank = np.arange(cand.size) - first[inverse]
    count = seen[ports_sorted] + rank
    keep[cand[order]] = count % every[cand[order]] == 0
    seen += np.bincount(cp, minlength=MAX_VIF + 1)
    return keep
