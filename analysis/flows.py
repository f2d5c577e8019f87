"""Bidirectional flows, built batch by batch in one compiled pass per batch.

A flow is a run of frames with one key (``flowkeys``) in which no gap exceeds the idle
timeout (default 60 s) and which lasts less than the active timeout (default 300 s); both
are measured in capture time, so a replay gives the same flows as the live traffic did.

Each ``update`` takes a decoded batch; frames go through the table in capture-time order
(a batch out of order is sorted first), each by the per-packet rule, in a compiled kernel
(``_flowtable``) over a hash table of open flows: no Python work per frame, and no work
for open flows that the batch does not touch. So any cut of a capture into batches gives
the same flows. A frame older than its open flow's start joins it (the start moves back):
the two collectors of a cross-host flow send independently, so copies arrive late.

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

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vspan.analysis import _flowtable as kt
from vspan.analysis.columns import Decoded, TagKind
from vspan.analysis.endpoints import Endpoints
from vspan.analysis.flowkeys import KEY_COLUMNS, FragmentPorts, frame_ports

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FLOW_COLUMNS", "Finished", "FlowConfig", "FlowTable"]

NS = 1_000_000_000

_UNPACKED = ("tcp_flags", "tcp_flags_rev", "first_rev", "tagged")
_STATE = (
    *KEY_COLUMNS,
    *(c for c in kt.STATE if c != "bits"),
    *kt.TIME_SUMS,
    *_UNPACKED,
)
_TOTALS = ("packets", "bytes", "packets_rev", "bytes_rev", "delay_ns")
FLOW_COLUMNS = (*_STATE, *_TOTALS)
"""Columns of the finished-flow frames the table returns (A/B oriented: ``_rev`` counters
are B → A; ``first_rev`` says the first packet went B → A). ``packets``/``bytes`` are
``max(sender copies, receiver copies) + other copies`` per direction; ``delay_ns`` the mean
time from a packet's sender copy to its receiver copy (NaN without both), the two
observation points of cross-host traffic. ``tsum*`` are per direction the sums of the
sender and receiver copies' capture-time offsets from ``anchor_ns``."""

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
_U32, _U16 = np.uint64(32), np.uint64(16)
_LOW16, _LOW32 = np.uint64(0xFFFF), np.uint64(0xFFFFFFFF)


Columns = dict[str, npt.NDArray[np.int64] | npt.NDArray[np.float64]]


def _add_totals(cols: Columns) -> None:
    """Add the packet and byte totals and the delay (see ``FLOW_COLUMNS``) to ``cols``."""
    for what in ("packets", "bytes"):
        for d in kt.DIRECTIONS:
            s, r, o = (cols[f"{what}{d}_{role}"] for role in kt.ROLES)
            cols[f"{what}{d}"] = np.maximum(s, r) + o
    # Mean receiver-copy time minus mean sender-copy time, per direction, weighted by the
    # packets seen at both points (exact when both saw every packet).
    weight = np.zeros(len(cols["hash"]))
    total = np.zeros(len(cols["hash"]))
    for d in kt.DIRECTIONS:
        ns, nr = cols[f"packets{d}_s"], cols[f"packets{d}_r"]
        both = np.minimum(ns, nr).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            delay = cols[f"tsum{d}_r"] / nr - cols[f"tsum{d}_s"] / ns
        total += np.where(both > 0, delay * both, 0.0)
        weight += both
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["delay_ns"] = np.where(weight > 0, total / weight, np.nan)


def _frame(keys: U64, state: I64, times: F64) -> pd.DataFrame:
    """Rows of the table's arrays as a flow frame (``FLOW_COLUMNS``)."""
    import pandas as pd  # here: ``vspan report`` runs without it

    return pd.DataFrame(_columns(keys, state, times), columns=list(FLOW_COLUMNS), copy=True)


def _columns(keys: U64, state: I64, times: F64) -> Columns:
    """Rows of the table's arrays as named columns (``FLOW_COLUMNS``)."""
    cols: Columns = {}
    for w, name in enumerate(kt.KEY_WORDS[:6]):
        cols[name] = keys[:, w].view(np.int64)
    ports, misc = keys[:, 6], keys[:, 7]
    cols["port_a"] = (ports >> _U32).astype(np.int64)
    cols["port_b"] = (ports & _LOW32).astype(np.int64)
    cols["proto"] = (misc >> _U32).astype(np.int64)
    cols["vlan"] = ((misc >> _U16) & _LOW16).astype(np.int64)
    cols["ethertype"] = (misc & _LOW16).astype(np.int64)
    for c, name in enumerate(kt.STATE):
        if name != "bits":
            cols[name] = state[:, c]
    for c, name in enumerate(kt.TIME_SUMS):
        cols[name] = times[:, c]
    bits = state[:, kt.STATE.index("bits")]
    cols["tcp_flags"] = bits & 0xFFFF
    cols["tcp_flags_rev"] = (bits >> 16) & 0xFFFF
    cols["first_rev"] = (bits >> kt.FIRST_REV_BIT) & 1
    cols["tagged"] = (bits >> kt.TAGGED_BIT) & 1
    _add_totals(cols)
    return cols


@dataclass(frozen=True, slots=True)
class Finished:
    """Finished flows as rows of the table's arrays; ``frame()`` makes the flow frame."""

    keys: U64
    state: I64
    times: F64

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def frame(self) -> pd.DataFrame:
        """The flows as a frame with ``FLOW_COLUMNS``."""
        return _frame(self.keys, self.state, self.times) if len(self) else _none()

    def columns(self) -> Columns:
        """The flows as ``FLOW_COLUMNS`` arrays."""
        cols = _columns(self.keys, self.state, self.times)
        return {name: cols[name] for name in FLOW_COLUMNS}

    def rows(self, index: npt.NDArray[np.integer[Any]]) -> Finished:
        """The rows ``index``, in that order."""
        return Finished(self.keys[index], self.state[index], self.times[index])

    @staticmethod
    def concat(parts: list[Finished]) -> Finished:
        """The rows of ``parts``, in order."""
        if len(parts) <= 1:
            return parts[0] if parts else _Rows(0).finished(0)
        return Finished(
            np.concatenate([p.keys for p in parts]),
            np.concatenate([p.state for p in parts]),
            np.concatenate([p.times for p in parts]),
        )


@functools.cache
def _empty() -> pd.DataFrame:
    return _frame(*_Rows(0).arrays)


def _none() -> pd.DataFrame:
    """No finished flows (a new empty frame with ``FLOW_COLUMNS``)."""
    return _empty().copy(deep=False)


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """Flow-table settings."""

    idle_timeout_s: float = 60.0
    """A flow ends after this much capture time without a packet."""
    active_timeout_s: float = 300.0
    """A flow is cut after lasting this long; the next packet starts a new one."""


class _Rows:
    """Growable rows of ``KEY_WORDS`` uint64, ``STATE`` int64 and ``TIME_SUMS`` float64."""

    def __init__(self, capacity: int) -> None:
        self.keys = np.zeros((capacity, len(kt.KEY_WORDS)), np.uint64)
        self.state = np.zeros((capacity, len(kt.STATE)), np.int64)
        self.times = np.zeros((capacity, len(kt.TIME_SUMS)), np.float64)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def arrays(
        self,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        return self.keys, self.state, self.times

    def grown(self, n: int, capacity: int) -> _Rows:
        """A copy of the first ``n`` rows with room for ``capacity``."""
        out = _Rows(capacity)
        out.keys[:n], out.state[:n], out.times[:n] = self.keys[:n], self.state[:n], self.times[:n]
        return out

    def finished(self, n: int) -> Finished:
        """A copy of the first ``n`` rows, as finished flows."""
        return Finished(self.keys[:n].copy(), self.state[:n].copy(), self.times[:n].copy())

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.state.nbytes + self.times.nbytes


class FlowTable:
    """Open flows and the rules that finish them."""

    def __init__(self, config: FlowConfig | None = None, *, initial_rows: int = 1024) -> None:
        self.config = config or FlowConfig()
        self._idle = int(self.config.idle_timeout_s * NS)
        self._active = int(self.config.active_timeout_s * NS)
        rows = 1 << max(1, initial_rows - 1).bit_length()  # a power of two
        self._rows = _Rows(rows)
        self._index = np.zeros(2 * rows, np.int32)
        self._n = 0
        self._now = np.iinfo(np.int64).min
        self._oldest = np.iinfo(np.int64).max
        """No open flow was last seen before this (a bound: exact after a sweep)."""
        self._fragments = FragmentPorts()

    @property
    def open_flows(self) -> int:
        """Flows currently open."""
        return self._n

    @property
    def memory_bytes(self) -> int:
        """Bytes the table holds (its arrays at their current capacity)."""
        return self._rows.nbytes + self._index.nbytes

    def update(self, dec: Decoded, eps: Endpoints) -> pd.DataFrame:
        """Add a batch of usable frames; return the flows it finished."""
        return self.update_rows(dec, eps).frame()

    def update_rows(self, dec: Decoded, eps: Endpoints) -> Finished:
        """``update``, the finished flows as rows (``Finished.frame`` makes the frame)."""
        n = len(dec)
        if n == 0:
            return self._expire()
        sport, dport = self._fragments.apply(dec, *frame_ports(dec))
        ts = np.ascontiguousarray(dec.ts_ns, np.int64)
        order = (
            np.arange(n, dtype=np.int64)
            if n < 2 or bool(np.all(ts[1:] >= ts[:-1]))
            else np.argsort(ts, kind="stable").astype(np.int64)
        )
        has_ip = dec.ip_version != 0
        proto = np.where(has_ip, dec.ip_proto, 0).astype(np.uint64)
        vlan = (dec.vlan_inner & 0xFFFF).astype(np.uint64)
        misc: U64 = np.bitwise_or(np.left_shift(proto, _U32), np.left_shift(vlan, _U16))
        misc |= dec.ethertype.astype(np.uint64)
        vntag = dec.tag_kind == TagKind.VNTAG
        role = np.full(n, 2, np.uint8)
        role[vntag & (dec.tag_d == 1)] = 1
        role[vntag & (dec.tag_d == 0) & (dec.svif != 0)] = 0
        tagged: npt.NDArray[np.bool_] = dec.tag_kind != TagKind.NONE
        facts = (misc, ts, dec.wirelen, dec.tcp_flags, dec.host, role, tagged)
        fin = _Rows(max(64, n // 16))
        nfin = j = 0
        while True:
            j, self._n, nfin, need = kt.run_frames(
                (
                    eps.src,
                    eps.dst,
                    dec.src_ip_hi,
                    dec.src_ip_lo,
                    dec.dst_ip_hi,
                    dec.dst_ip_lo,
                    sport,
                    dport,
                ),
                facts,
                (self._rows.arrays, self._index, self._n),
                (fin.arrays, nfin),
                (order, j, self._idle, self._active),
            )
            if need == kt.Need.DONE:
                break
            if need == kt.Need.ROWS:
                self._grow(2 * self._rows.capacity)
            else:
                fin = fin.grown(nfin, 2 * fin.capacity)
        self._now = max(self._now, int(ts.max()))
        self._oldest = min(self._oldest, int(ts.min()))
        finished = fin.finished(nfin)
        idled = self._expire()
        return Finished.concat([finished, idled]) if len(idled) else finished

    def advance(self, now_ns: int) -> pd.DataFrame:
        """Move capture time to ``now_ns`` without frames; return the flows that idled out.

        A live analyzer calls this when no traffic arrives, mapping its clock to capture
        time, so that idle flows end even on a quiet network.
        """
        return self.advance_rows(now_ns).frame()

    def advance_rows(self, now_ns: int) -> Finished:
        """``advance``, the flows as rows."""
        self._now = max(self._now, int(now_ns))
        return self._expire()

    def open_rows(self) -> Finished:
        """A copy of every open flow, as rows (their counters so far)."""
        return self._rows.finished(self._n)

    def flush(self) -> pd.DataFrame:
        """Finish every open flow (end of capture, shutdown)."""
        return self.flush_rows().frame()

    def flush_rows(self) -> Finished:
        """``flush``, the flows as rows."""
        done = self._rows.finished(self._n)
        self._n = 0
        self._index.fill(0)
        self._oldest = np.iinfo(np.int64).max
        return done

    def evict(self, n: int) -> pd.DataFrame:
        """Finish the ``n`` open flows seen longest ago (a bounded table sheds its oldest)."""
        return self.evict_rows(n).frame()

    def evict_rows(self, n: int) -> Finished:
        """``evict``, the flows as rows."""
        n = min(n, self._n)
        if n <= 0:
            return _Rows(0).finished(0)
        last = self._rows.state[: self._n, kt.STATE.index("last_ns")]
        return self._remove(np.argpartition(last, n - 1)[:n])

    # --- internals --------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        self._rows = self._rows.grown(self._n, capacity)
        self._index = np.zeros(2 * capacity, np.int32)
        kt.rebuild_index(self._index, self._rows.state, self._n)

    def _remove(self, rows: npt.NDArray[np.intp]) -> Finished:
        fin = _Rows(rows.size)
        desc = np.sort(rows.astype(np.int64))[::-1].copy()
        self._n, nfin = kt.remove_rows(
            desc, (self._rows.arrays, self._index, self._n), (fin.arrays, 0)
        )
        return fin.finished(nfin)

    def _expire(self) -> Finished:
        """Finish the open flows idle for longer than the idle timeout at the newest time."""
        if self._n == 0 or self._now - self._oldest <= self._idle:
            return _Rows(0).finished(0)
        last = self._rows.state[: self._n, kt.STATE.index("last_ns")]
        done = self._remove(np.flatnonzero(self._now - last > self._idle))
        self._oldest = int(last[: self._n].min()) if self._n else np.iinfo(np.int64).max
        return done
