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
receiver copy d=1 at the other). A flow direction counts its sender copies when it has any,
else its receiver copies (the sender's host is not observed), so each packet counts once;
``copies`` counts every observation and ``observers`` the hosts that saw the flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.columns import Decoded
from vspan.analysis.endpoints import Endpoints
from vspan.analysis.flowkeys import KEY_COLUMNS, frame_keys, group_codes

__all__ = ["FLOW_COLUMNS", "FlowConfig", "FlowTable"]

NS = 1_000_000_000

_COUNTERS = ("packets", "bytes", "packets_rev", "bytes_rev", "copies")
_STATE = (
    *KEY_COLUMNS, "hash", "start_ns", "last_ns", *_COUNTERS, "tcp_flags", "tcp_flags_rev",
    "first_rev", "sender_fwd", "sender_rev", "observer", "observer_other", "tagged",
)  # fmt: skip
FLOW_COLUMNS = _STATE
"""Columns of the finished-flow frames ``update``/``flush`` return (A/B oriented: ``rev``
counters are B → A; ``first_rev`` says the first packet went B → A)."""


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
        self._open = pd.DataFrame({c: pd.Series(dtype=np.int64) for c in _STATE})
        self._now = np.iinfo(np.int64).min

    @property
    def open_flows(self) -> int:
        """Flows currently open."""
        return len(self._open)

    def update(self, dec: Decoded, eps: Endpoints) -> pd.DataFrame:
        """Add a batch of usable frames; return the flows it finished."""
        if len(dec) == 0:
            return self._expire()
        fk = frame_keys(dec, eps)
        n = len(dec)
        rows: dict[str, npt.NDArray[np.int64]] = {
            name: fk.keys[name].view(np.int64) for name in KEY_COLUMNS
        }
        rows["hash"] = fk.hash.view(np.int64)
        rows["ts"] = dec.ts_ns.astype(np.int64)
        rows["slot"] = np.full(n, -1, dtype=np.int64)
        rev = fk.rev.astype(np.int64)
        rows["rev"] = rev
        rows["sender"] = fk.sender_copy.astype(np.int64)
        rows["receiver"] = fk.receiver_copy.astype(np.int64)
        rows["bytes"] = dec.wirelen.astype(np.int64)
        rows["flags"] = dec.tcp_flags.astype(np.int64)
        rows["host"] = dec.host.astype(np.int64)
        rows["tagged"] = fk.tagged.astype(np.int64)
        self._now = max(self._now, int(rows["ts"].max()))

        # Open flows this batch touches come back as pseudo-rows.
        open_hash = self._open["hash"].to_numpy()
        touched = np.flatnonzero(np.isin(open_hash, rows["hash"]))
        op = self._open.iloc[touched]
        pseudo: dict[str, npt.NDArray[np.int64]] = {c: op[c].to_numpy() for c in KEY_COLUMNS}
        pseudo["hash"] = op["hash"].to_numpy()
        pseudo["ts"] = op["last_ns"].to_numpy()
        pseudo["slot"] = touched.astype(np.int64)
        for c in ("rev", "sender", "receiver", "bytes", "flags", "host", "tagged"):
            pseudo[c] = np.zeros(touched.size, dtype=np.int64)
        all_rows = {c: np.concatenate([pseudo[c], rows[c]]) for c in rows}
        start = np.concatenate([op["start_ns"].to_numpy(), rows["ts"]])
        is_pseudo = all_rows["slot"] >= 0

        codes, _ = group_codes(
            all_rows["hash"].view(np.uint64), {c: all_rows[c].view(np.uint64) for c in KEY_COLUMNS}
        )
        order = np.lexsort((~is_pseudo, all_rows["ts"], codes))
        r = {c: v[order] for c, v in all_rows.items()}
        start, is_pseudo, codes = start[order], is_pseudo[order], codes[order]
        seg = self._segments(codes, r["ts"], start)
        return self._apply(r, seg, start, is_pseudo, codes)

    def flush(self) -> pd.DataFrame:
        """Finish every open flow (end of capture, shutdown)."""
        done, self._open = self._open, self._open.iloc[0:0]
        return done.reset_index(drop=True)

    # --- internals --------------------------------------------------------------------

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
        start: npt.NDArray[np.int64],
        is_pseudo: npt.NDArray[np.bool_],
        codes: npt.NDArray[np.int64],
    ) -> pd.DataFrame:
        nseg = int(seg[-1]) + 1
        bounds = np.flatnonzero(np.diff(seg, prepend=-1))
        real = ~is_pseudo
        slot = np.full(nseg, -1, dtype=np.int64)
        slot[seg[is_pseudo]] = r["slot"][is_pseudo]
        cont = slot >= 0
        prior = self._open.iloc[slot[cont]]

        def prior_col(name: str) -> npt.NDArray[np.int64]:
            out = np.zeros(nseg, dtype=np.int64)
            out[cont] = prior[name].to_numpy()
            return out

        rev = r["rev"]
        sender_dir = np.zeros((2, nseg), dtype=np.bool_)
        for d in (0, 1):
            mine = real & (rev == d) & (r["sender"] == 1)
            sender_dir[d] = np.bincount(seg[mine], minlength=nseg) > 0
        sender_dir[0] |= prior_col("sender_fwd") > 0
        sender_dir[1] |= prior_col("sender_rev") > 0
        counted = real & ((r["receiver"] == 0) | ~sender_dir[rev, seg])

        out: dict[str, npt.NDArray[np.int64]] = {c: r[c][bounds] for c in KEY_COLUMNS}
        out["hash"] = r["hash"][bounds]
        cseg, crev = seg[counted], rev[counted]
        for d, suffix in ((0, ""), (1, "_rev")):
            sel = crev == d
            out["packets" + suffix] = np.bincount(cseg[sel], minlength=nseg)
            out["bytes" + suffix] = np.bincount(
                cseg[sel], weights=r["bytes"][counted][sel], minlength=nseg
            ).astype(np.int64)
            flags = np.zeros(nseg, dtype=np.int64)
            cflags = r["flags"][counted][sel]
            for bit in range(9):
                has = np.bincount(cseg[sel], weights=(cflags >> bit) & 1, minlength=nseg) > 0
                flags |= has.astype(np.int64) << bit
            out["tcp_flags" + suffix] = flags | prior_col("tcp_flags" + suffix)
        out["copies"] = np.bincount(seg[real], minlength=nseg)
        for c in _COUNTERS:
            out[c] = out[c] + prior_col(c)

        # First counted packet of each new segment sets its direction and observer.
        first_counted = np.full(nseg, -1, dtype=np.int64)
        idx = np.flatnonzero(counted)
        lead = np.ones(idx.size, dtype=np.bool_)
        lead[1:] = seg[idx[1:]] != seg[idx[:-1]]
        first_counted[seg[idx[lead]]] = idx[lead]
        new = ~cont & (first_counted >= 0)
        out["first_rev"] = prior_col("first_rev")
        out["first_rev"][new] = rev[first_counted[new]]
        out["observer"] = prior_col("observer")
        out["observer"][new] = r["host"][first_counted[new]]
        other = np.where(r["host"] != out["observer"][seg], r["host"], -1)
        other_any = np.full(nseg, -1, dtype=np.int64)
        np.maximum.at(other_any, seg[real], other[real])
        out["observer_other"] = np.where(cont, np.maximum(prior_col("observer_other"), other_any),
                                         other_any)  # fmt: skip
        out["start_ns"] = np.minimum.reduceat(start, bounds)
        out["last_ns"] = np.maximum.reduceat(r["ts"], bounds)
        out["sender_fwd"] = sender_dir[0].astype(np.int64)
        out["sender_rev"] = sender_dir[1].astype(np.int64)
        tagged = np.bincount(seg[real], weights=r["tagged"][real], minlength=nseg) > 0
        out["tagged"] = tagged.astype(np.int64) | prior_col("tagged")

        segs = pd.DataFrame(out, columns=list(_STATE))
        # A segment with no counted frame cannot occur (receivers count when no sender);
        # a pseudo-only segment is an open flow that this batch's rows did not continue.
        seg_code = codes[bounds]
        last_of_code = np.ones(nseg, dtype=np.bool_)
        last_of_code[:-1] = seg_code[1:] != seg_code[:-1]
        pseudo_only = cont & (out["copies"] == prior_col("copies"))
        keep_open = last_of_code & ~pseudo_only
        untouched = np.ones(len(self._open), dtype=np.bool_)
        untouched[slot[cont]] = False
        finished_prior: pd.DataFrame = self._open.iloc[slot[cont & pseudo_only]]
        ended: pd.DataFrame = segs[~last_of_code & ~pseudo_only]
        still_open: pd.DataFrame = segs[keep_open]
        self._open = pd.concat([self._open[untouched], still_open], ignore_index=True)
        return pd.concat([finished_prior, ended, self._expire()], ignore_index=True)

    def _expire(self) -> pd.DataFrame:
        """Finish open flows idle for longer than the idle timeout at the newest time."""
        if not len(self._open):
            return self._open.iloc[0:0]
        idle = self._now - self._open["last_ns"].to_numpy() > self._idle
        done: pd.DataFrame = self._open[idle]
        self._open = self._open[~idle].reset_index(drop=True)
        return done.reset_index(drop=True)
