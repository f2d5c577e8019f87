"""Bidirectional flows, built batch by batch with vectorized operations.

A flow is a run of frames with one key (``flowkeys``) in which no gap exceeds the idle
timeout (default 60 s) and which lasts less than the active timeout (default 300 s); both
are measured in capture time, so a replay gives the same flows as the live traffic did.

Each ``update`` handles one decoded batch exactly as if all frames had been seen at once:
the open flows that the batch touches rejoin it as *pseudo-rows* (at their last-seen time,
carrying their start), the rows are sorted by (key, time), cut where the key changes, where
the idle gap is exceeded and where the active timeout is reached, and aggregated per segment
with ``bincount``. Segments that contain a pseudo-row continue that open flow; the last
segment of each key stays open; everything else is finished and returned.

Copies: a packet between VMs on two hosts is observed twice (sender copy d=0 at its host,
receiver copy d=1 at the other). The table counts each direction's copies per role —
sender (``_s``), receiver (``_r``) and other (``_o``: untagged, E-tagged) — and reports
``max(sender, receiver) + other``: each packet once when both hosts are observed, whatever
order their copies arrive in (collectors send independently), and the better count when
one collector lost some. The per-role counts stay in the record: the two observation
points of cross-host traffic. ``copies`` counts every frame, ``observer``/``observer_other``
the hosts that saw the flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.columns import Decoded
from vspan.analysis.endpoints import Endpoints
from vspan.analysis.flowkeys import KEY_COLUMNS, FragmentPorts, frame_keys, group_codes

U64 = npt.NDArray[np.uint64]

__all__ = ["FLOW_COLUMNS", "FlowConfig", "FlowTable"]

NS = 1_000_000_000

_ROLES = ("s", "r", "o")
"""Copy roles: sender copy (VN-Tag d=0 with svif), receiver copy (d=1), other."""
_DIRS = ("", "_rev")
_ROLE_COUNTERS = tuple(
    f"{what}{d}_{role}" for role in _ROLES for d in _DIRS for what in ("packets", "bytes")
)
_TIME_SUMS = ("tsum_s", "tsum_rev_s", "tsum_r", "tsum_rev_r")
"""Per direction, the sum of capture-time offsets from ``anchor_ns`` of the sender copies
and of the receiver copies (float64): their mean difference is the one-way delay between
the two observation points."""
_STATE = (
    *KEY_COLUMNS,
    "hash",
    "start_ns",
    "last_ns",
    "anchor_ns",
    *_TIME_SUMS,
    *_ROLE_COUNTERS,
    "copies",
    "tcp_flags",
    "tcp_flags_rev",
    "first_rev",
    "observer",
    "observer_other",
    "tagged",
)
_TOTALS = ("packets", "bytes", "packets_rev", "bytes_rev", "delay_ns")
FLOW_COLUMNS = (*_STATE, *_TOTALS)
"""Columns of the finished-flow frames the table returns (A/B oriented: ``_rev`` counters
are B → A; ``first_rev`` says the first packet went B → A). ``packets``/``bytes`` are
``max(sender copies, receiver copies) + other copies`` per direction; ``delay_ns`` the mean
time from a packet's sender copy to its receiver copy (NaN without both), the two
observation points of cross-host traffic."""


def _with_totals(flows: pd.DataFrame) -> pd.DataFrame:
    """Finished flows with their packet and byte totals (see ``FLOW_COLUMNS``)."""
    out = flows.reset_index(drop=True)
    if out.empty:
        return out.assign(**{c: pd.Series(dtype=np.int64) for c in _TOTALS})
    for what in ("packets", "bytes"):
        for d in _DIRS:
            s, r, o = (out[f"{what}{d}_{role}"].to_numpy() for role in _ROLES)
            out[f"{what}{d}"] = np.maximum(s, r) + o
    # Mean receiver-copy time minus mean sender-copy time, per direction, weighted by the
    # packets seen at both points (exact when both saw every packet).
    weight = np.zeros(len(out))
    total = np.zeros(len(out))
    for d in _DIRS:
        ns, nr = out[f"packets{d}_s"].to_numpy(), out[f"packets{d}_r"].to_numpy()
        both = np.minimum(ns, nr).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            delay = out[f"tsum{d}_r"].to_numpy() / nr - out[f"tsum{d}_s"].to_numpy() / ns
        total += np.where(both > 0, delay * both, 0.0)
        weight += both
    with np.errstate(invalid="ignore", divide="ignore"):
        out["delay_ns"] = np.where(weight > 0, total / weight, np.nan)
    return out


def _sort_by_code_and_time(
    codes: npt.NDArray[np.int64], ts: npt.NDArray[np.int64], npseudo: int
) -> npt.NDArray[np.intp]:
    """Order rows by (code, time), pseudo-rows first among equal times.

    Batches usually arrive in time order, so a stable sort by code alone is enough; when
    that leaves time going backwards inside a code, a full lexicographic sort is used.
    """
    order = np.argsort(codes, kind="stable")
    c, t = codes[order], ts[order]
    if not np.any((c[1:] == c[:-1]) & (t[1:] < t[:-1])):
        return order
    pseudo_last = np.arange(codes.size) >= npseudo
    return np.lexsort((pseudo_last, ts, codes))


def _or_by_segment(
    seg: npt.NDArray[np.int64], values: npt.NDArray[np.int64], nseg: int
) -> npt.NDArray[np.int64]:
    """Bitwise OR of ``values`` per segment (``seg`` sorted ascending)."""
    out = np.zeros(nseg, dtype=np.int64)
    if seg.size == 0:
        return out
    starts = np.flatnonzero(np.diff(seg, prepend=-1))
    out[seg[starts]] = np.bitwise_or.reduceat(values, starts)
    return out


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """Flow-table settings."""

    idle_timeout_s: float = 60.0
    """A flow ends after this much capture time without a packet."""
    active_timeout_s: float = 300.0
    """A flow is cut after lasting this long; the next packet starts a new one."""


class FlowTable:
    """Open flows and the rules that finish them."""

    def __init__(self, config: FlowConfig | None = None) -> None:
        self.config = config or FlowConfig()
        self._idle = int(self.config.idle_timeout_s * NS)
        self._active = int(self.config.active_timeout_s * NS)
        self._open = pd.DataFrame({
            c: pd.Series(dtype=np.float64 if c in _TIME_SUMS else np.int64) for c in _STATE
        })  # fmt: skip
        self._now = np.iinfo(np.int64).min
        self._fragments = FragmentPorts()

    @property
    def open_flows(self) -> int:
        """Flows currently open."""
        return len(self._open)

    def update(self, dec: Decoded, eps: Endpoints) -> pd.DataFrame:
        """Add a batch of usable frames; return the flows it finished."""
        if len(dec) == 0:
            return self._expire()
        fk = frame_keys(dec, eps, self._fragments)
        codes, ngroups = group_codes(fk.hash, fk.keys)
        first_row = np.full(ngroups, len(dec), dtype=np.int64)
        np.minimum.at(first_row, codes, np.arange(len(dec), dtype=np.int64))
        ts = dec.ts_ns.astype(np.int64)
        self._now = max(self._now, int(ts.max()))

        # Open flows this batch continues come back as pseudo-rows (at their last-seen
        # time, carrying their start). A hash match counts only if the whole key matches.
        touched, touched_code = self._touched(fk.keys, fk.hash[first_row], first_row)
        op = self._open.iloc[touched]
        npseudo = touched.size

        def both(
            pseudo: npt.NDArray[np.int64], real: npt.NDArray[np.int64]
        ) -> npt.NDArray[np.int64]:
            return np.concatenate([pseudo, real.astype(np.int64, copy=False)])

        all_codes = both(touched_code, codes)
        all_ts = both(op["last_ns"].to_numpy(), ts)
        order = _sort_by_code_and_time(all_codes, all_ts, npseudo)
        row = order - npseudo  # index into the batch; negative for pseudo-rows
        r = {
            "code": all_codes[order],
            "ts": all_ts[order],
            "start": both(op["start_ns"].to_numpy(), ts)[order],
            "slot": both(touched.astype(np.int64), np.full(len(dec), -1, np.int64))[order],
        }
        real = row >= 0
        take = np.where(real, row, 0)

        def real_col(values: npt.NDArray[np.generic]) -> npt.NDArray[np.int64]:
            return np.where(real, values.astype(np.int64)[take], 0)

        r["rev"] = real_col(fk.rev)
        r["sender"] = real_col(fk.sender_copy)
        r["receiver"] = real_col(fk.receiver_copy)
        r["bytes"] = real_col(dec.wirelen)
        r["flags"] = real_col(dec.tcp_flags)
        r["host"] = real_col(dec.host)
        r["tagged"] = real_col(fk.tagged)
        r["row"] = row
        seg = self._segments(r["code"], r["ts"], r["start"])
        return self._apply(r, seg, fk.keys, fk.hash)

    def advance(self, now_ns: int) -> pd.DataFrame:
        """Move capture time to ``now_ns`` without frames; return the flows that idled out.

        A live analyzer calls this when no traffic arrives, mapping its clock to capture
        time, so that idle flows end even on a quiet network.
        """
        self._now = max(self._now, int(now_ns))
        return self._expire()

    def flush(self) -> pd.DataFrame:
        """Finish every open flow (end of capture, shutdown)."""
        done, self._open = self._open, self._open.iloc[0:0]
        return _with_totals(done)

    def evict(self, n: int) -> pd.DataFrame:
        """Finish the ``n`` open flows seen longest ago (a bounded table sheds its oldest)."""
        n = min(n, len(self._open))
        if n <= 0:
            return self._open.iloc[0:0]
        last = self._open["last_ns"].to_numpy()
        gone = np.zeros(last.size, dtype=np.bool_)
        gone[np.argpartition(last, n - 1)[:n]] = True
        done: pd.DataFrame = self._open[gone]
        self._open = self._open[~gone].reset_index(drop=True)
        return _with_totals(done)

    # --- internals --------------------------------------------------------------------

    def _touched(
        self, keys: dict[str, U64], group_hash: U64, first_row: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Open-flow slots the batch continues, and the batch group code of each."""
        if not len(self._open):
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        open_hash = self._open["hash"].to_numpy().view(np.uint64)
        code = pd.Index(group_hash).get_indexer(pd.Index(open_hash)).astype(np.int64)
        slot = np.flatnonzero(code >= 0)
        code = code[slot]
        same = np.ones(slot.size, dtype=np.bool_)
        rows = first_row[code]
        for name in KEY_COLUMNS:
            same &= self._open[name].to_numpy()[slot].view(np.uint64) == keys[name][rows]
        return slot[same], code[same]

    def _segments(
        self, codes: npt.NDArray[np.int64], ts: npt.NDArray[np.int64], start: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """Segment id per sorted row: cut at key changes, idle gaps and active timeouts."""
        n = codes.size
        cut = np.ones(n, dtype=np.bool_)
        cut[1:] = (codes[1:] != codes[:-1]) | (ts[1:] - ts[:-1] > self._idle)
        while True:
            seg = np.cumsum(cut) - 1
            bounds = np.flatnonzero(cut)
            seg_start = np.minimum.reduceat(start, bounds)
            over = ts - seg_start[seg] >= self._active
            over &= ~cut
            if not over.any():
                return seg
            # Only the first row past the limit in each segment starts a new flow;
            # later rows are measured again against that new start.
            first_over = over.copy()
            first_over[1:] &= ~(over[:-1] & (seg[1:] == seg[:-1]))
            cut |= first_over

    def _apply(
        self,
        r: dict[str, npt.NDArray[np.int64]],
        seg: npt.NDArray[np.int64],
        keys: dict[str, U64],
        hashes: U64,
    ) -> pd.DataFrame:
        nseg = int(seg[-1]) + 1
        bounds = np.flatnonzero(np.diff(seg, prepend=-1))
        is_pseudo = r["slot"] >= 0
        real = ~is_pseudo
        slot = np.full(nseg, -1, dtype=np.int64)
        slot[seg[is_pseudo]] = r["slot"][is_pseudo]
        cont = slot >= 0
        prior = self._open.iloc[slot[cont]]

        def prior_col(name: str) -> npt.NDArray[np.int64]:
            out = np.zeros(nseg, dtype=np.int64)
            out[cont] = prior[name].to_numpy()
            return out

        def prior_float(name: str) -> npt.NDArray[np.float64]:
            out = np.zeros(nseg, dtype=np.float64)
            out[cont] = prior[name].to_numpy()
            return out

        rev = r["rev"]
        role = np.where(r["sender"] == 1, 0, np.where(r["receiver"] == 1, 1, 2))

        # Key columns come from the batch, through one real row of each segment.
        key_row = np.maximum.reduceat(r["row"], bounds)
        has_row = key_row >= 0
        pick = np.where(has_row, key_row, 0)
        out: dict[str, npt.NDArray[Any]] = {}  # int64 columns, float64 time sums
        for name in KEY_COLUMNS:
            out[name] = np.where(has_row, keys[name][pick].view(np.int64), prior_col(name))
        out["hash"] = np.where(has_row, hashes[pick].view(np.int64), prior_col("hash"))
        rseg, rrev, rrole = seg[real], rev[real], role[real]
        rbytes, rflags = r["bytes"][real], r["flags"][real]
        seg_start = np.minimum.reduceat(r["start"], bounds)
        anchor = np.where(cont, prior_col("anchor_ns"), seg_start)
        out["anchor_ns"] = anchor
        offset = (r["ts"][real] - anchor[rseg]).astype(np.float64)
        for d, suffix in enumerate(_DIRS):
            for k, name in ((0, "s"), (1, "r")):
                sel = (rrev == d) & (rrole == k)
                sums = np.bincount(rseg[sel], weights=offset[sel], minlength=nseg)
                column = f"tsum{suffix}_{name}"
                out[column] = sums + prior_float(column)
        for d, suffix in enumerate(_DIRS):
            mine = rrev == d
            flags = _or_by_segment(rseg[mine], rflags[mine], nseg)
            out["tcp_flags" + suffix] = flags | prior_col("tcp_flags" + suffix)
            for k, name in enumerate(_ROLES):
                sel = mine & (rrole == k)
                packets = np.bincount(rseg[sel], minlength=nseg)
                nbytes = np.bincount(rseg[sel], weights=rbytes[sel], minlength=nseg)
                out[f"packets{suffix}_{name}"] = packets + prior_col(f"packets{suffix}_{name}")
                out[f"bytes{suffix}_{name}"] = nbytes.astype(np.int64) + prior_col(
                    f"bytes{suffix}_{name}"
                )
        out["copies"] = np.bincount(rseg, minlength=nseg) + prior_col("copies")

        # The first frame of each new segment sets its direction and observer.
        first_counted = np.full(nseg, -1, dtype=np.int64)
        idx = np.flatnonzero(real)
        lead = np.ones(idx.size, dtype=np.bool_)
        lead[1:] = seg[idx[1:]] != seg[idx[:-1]]
        first_counted[seg[idx[lead]]] = idx[lead]
        new = ~cont & (first_counted >= 0)
        out["first_rev"] = prior_col("first_rev")
        out["first_rev"][new] = rev[first_counted[new]]
        out["observer"] = prior_col("observer")
        out["observer"][new] = r["host"][first_counted[new]]
        other = np.where(real & (r["host"] != out["observer"][seg]), r["host"], -1)
        other_any = np.maximum.reduceat(other, bounds)
        out["observer_other"] = np.maximum(prior_col("observer_other"), other_any)
        out["observer_other"][~cont] = other_any[~cont]
        out["start_ns"] = np.minimum.reduceat(r["start"], bounds)
        out["last_ns"] = np.maximum.reduceat(r["ts"], bounds)
        tagged = _or_by_segment(seg[real], r["tagged"][real], nseg)
        out["tagged"] = tagged | prior_col("tagged")

        segs = pd.DataFrame(out, columns=list(_STATE))
        # A pseudo-only segment is an open flow that this batch's rows did not continue.
        seg_code = r["code"][bounds]
        last_of_code = np.ones(nseg, dtype=np.bool_)
        last_of_code[:-1] = seg_code[1:] != seg_code[:-1]
        pseudo_only = cont & ~has_row
        keep_open = last_of_code & ~pseudo_only
        untouched = np.ones(len(self._open), dtype=np.bool_)
        untouched[slot[cont]] = False
        finished_prior: pd.DataFrame = self._open.iloc[slot[pseudo_only]]
        ended: pd.DataFrame = segs[~last_of_code & ~pseudo_only]
        still_open: pd.DataFrame = segs[keep_open]
        self._open = pd.concat([self._open[untouched], still_open], ignore_index=True)
        return _with_totals(pd.concat([finished_prior, ended, self._idled()], ignore_index=True))

    def _expire(self) -> pd.DataFrame:
        """Finished flows (with totals) idle for longer than the idle timeout."""
        return _with_totals(self._idled())

    def _idled(self) -> pd.DataFrame:
        """Take the open flows idle for longer than the idle timeout at the newest time."""
        if not len(self._open):
            return self._open.iloc[0:0]
        idle = self._now - self._open["last_ns"].to_numpy() > self._idle
        done: pd.DataFrame = self._open[idle]
        self._open = self._open[~idle].reset_index(drop=True)
        return done.reset_index(drop=True)
