"""Bidirectional flows, built batch by batch in one compiled pass per batch.

A flow is a run of frames with one key (``flowkeys``) in which no gap exceeds the idle
timeout (default 60 s) and whose first and last frame are less than the active timeout
(default 300 s) apart; both are measured in capture time, so a replay gives the same flows
as the live traffic did.

Frames go through the table in the order they arrive (``update`` after ``update``, each
batch in its own order: collectors' messages interleave, so a live batch is not in time
order, and ``vspan report`` merges its files in time order before). The table's **clock**
is the newest capture time it has seen. A flow is *open* while the clock is at most the idle
timeout past its last frame; once past, it has ended, whether or not it has been handed out
yet, and nothing joins it any more. Each frame, by the compiled kernel (``_flowtable``):

1. joins its key's open flow if that flow is still open and the frame fits it: with the
   frame, the flow still spans less than the active timeout and has no gap over the idle
   timeout. A frame older than the flow's first one becomes its first: the flow's direction
   and observing host (``observer``) are then the frame's;
2. else, if that flow is still open and the frame is older than its first frame, the frame
   is a **late** flow of its own, finished at once (the open flow goes on);
3. else that flow (if any) is finished and the frame starts a new one.

A frame that arrives more than the idle timeout behind the clock can therefore only join a
flow that is still open; otherwise it is a flow of its own that has already ended. Such
frames, and those of rule 2, are counted as ``late_frames`` (``counters``): a collector whose
messages (or clock) lag that far shows there. No frame is dropped and none stretches a flow
past its timeouts. Flows the clock has passed are handed out at the end of each ``update``
(or by ``advance``); since the rules never let a frame into such a flow, the flows do not
depend on how the frames are cut into batches — only on their order.

Copies: a packet between VMs on two hosts is observed twice (sender copy d=0 at its host,
receiver copy d=1 at the other). The table counts each direction's copies per role —
sender (``_s``), receiver (``_r``) and other (``_o``: untagged, E-tagged) — and reports
``max(sender, receiver) + other``: each packet once when both hosts are observed, whatever
order their copies arrive in (collectors send independently), and the better count when
one collector lost some. The per-role counts stay in the record: the two observation
points of cross-host traffic. ``copies`` counts every frame, ``observer``/``observer_other``
the hosts that saw the flow. The two copies of one packet are paired by the packet's
identity (``_copypairs``: flow, direction and ``Decoded.fingerprint``) across batches, in
either order, within ``pair_window_s``; ``delay_ns`` is the mean of the paired copies'
delays — never an estimate from unpaired ones — and NaN when no copy paired (single
observer, intra-host, copies lost, identities ambiguous).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vspan.analysis import _copypairs as cp
from vspan.analysis import _flowtable as kt
from vspan.analysis import _hostclocks as hc
from vspan.analysis.columns import Decoded, TagKind
from vspan.analysis.endpoints import KIND_VIF, Endpoints
from vspan.analysis.flowkeys import KEY_COLUMNS, FragmentPorts, frame_ports

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FLOW_COLUMNS", "Finished", "FlowConfig", "FlowTable"]

NS = 1_000_000_000

_UNPACKED = ("tcp_flags", "tcp_flags_rev", "first_rev", "tagged")
_STATE = (*KEY_COLUMNS, *(c for c in kt.STATE if c != "bits"), *_UNPACKED)
_TOTALS = ("packets", "bytes", "packets_rev", "bytes_rev", "delay_ns")
FLOW_COLUMNS = (*_STATE, *_TOTALS)
"""Columns of the finished-flow frames the table returns (A/B oriented: ``_rev`` counters
are B → A; ``first_rev`` says the first packet went B → A). ``packets``/``bytes`` are
``max(sender copies, receiver copies) + other copies`` per direction; ``pairs`` the packets
whose two copies were paired, ``delay_sum_ns`` their delays added up, and ``delay_ns`` their
mean (NaN without a pair): the time from a packet's sender copy to its receiver copy, the
two observation points of cross-host traffic."""

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
_FIRST_SLOTS = 1024
_MAX_CLOCKS = 0xFFFF
"""Clock slots at most (a flow keeps its clock's slot in 16 bits)."""
"""Slots of the pending map at first (it doubles as needed, up to ``max_pending_copies``)."""
_U32, _U16 = np.uint64(32), np.uint64(16)
_LOW16, _LOW32 = np.uint64(0xFFFF), np.uint64(0xFFFFFFFF)


Columns = dict[str, npt.NDArray[np.int64] | npt.NDArray[np.float64]]


def _add_totals(cols: Columns) -> None:
    """Add the packet and byte totals and the delay (see ``FLOW_COLUMNS``) to ``cols``."""
    for what in ("packets", "bytes"):
        for d in kt.DIRECTIONS:
            s, r, o = (cols[f"{what}{d}_{role}"] for role in kt.ROLES)
            cols[f"{what}{d}"] = np.maximum(s, r) + o
    pairs = cols["pairs"]
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["delay_ns"] = np.where(pairs > 0, cols["delay_sum_ns"] / pairs, np.nan)


def _frame(keys: U64, state: I64) -> pd.DataFrame:
    """Rows of the table's arrays as a flow frame (``FLOW_COLUMNS``)."""
    import pandas as pd  # here: ``vspan report`` runs without it

    return pd.DataFrame(_columns(keys, state), columns=list(FLOW_COLUMNS), copy=True)


def _columns(keys: U64, state: I64) -> Columns:
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

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def frame(self) -> pd.DataFrame:
        """The flows as a frame with ``FLOW_COLUMNS``."""
        return _frame(self.keys, self.state) if len(self) else _none()

    def columns(self) -> Columns:
        """The flows as ``FLOW_COLUMNS`` arrays."""
        cols = _columns(self.keys, self.state)
        return {name: cols[name] for name in FLOW_COLUMNS}

    def rows(self, index: npt.NDArray[np.integer[Any]]) -> Finished:
        """The rows ``index``, in that order."""
        return Finished(self.keys[index], self.state[index])

    @staticmethod
    def concat(parts: list[Finished]) -> Finished:
        """The rows of ``parts``, in order."""
        if len(parts) <= 1:
            return parts[0] if parts else _Rows(0).finished(0)
        return Finished(
            np.concatenate([p.keys for p in parts]), np.concatenate([p.state for p in parts])
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
    pair_window_s: float = 1.0
    """The two copies of a packet pair only within this much capture time of each other; a
    copy waits this long (by the table's clock) for its partner."""
    max_pending_copies: int = 1 << 18
    """Copies kept waiting for their partner at most; beyond, a copy is not paired and is
    counted (``pending_overflow``)."""
    max_host_clocks: int = 4096
    """Clocks kept, one per observing host (and one more each time a host's time goes
    back, while flows follow its old one); beyond, the frames of hosts without one are
    judged by one shared clock and counted (``clocks_full_frames``)."""

    def __post_init__(self) -> None:
        if self.max_pending_copies < 1 or min(self.idle_timeout_s, self.pair_window_s) < 0:
            raise ValueError(
                f"need max_pending_copies >= 1 (got {self.max_pending_copies}) and "
                f"timeouts >= 0 (idle {self.idle_timeout_s}, pair window {self.pair_window_s})"
            )
        if not 1 <= self.max_host_clocks <= _MAX_CLOCKS:
            raise ValueError(
                f"max_host_clocks must be 1..{_MAX_CLOCKS}, got {self.max_host_clocks}"
            )


class _Rows:
    """Growable rows of ``KEY_WORDS`` uint64 and ``STATE`` int64."""

    def __init__(self, capacity: int) -> None:
        self.keys = np.zeros((capacity, len(kt.KEY_WORDS)), np.uint64)
        self.state = np.zeros((capacity, len(kt.STATE)), np.int64)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def arrays(self) -> tuple[U64, I64]:
        return self.keys, self.state

    def grown(self, n: int, capacity: int) -> _Rows:
        """A copy of the first ``n`` rows with room for ``capacity``."""
        out = _Rows(capacity)
        out.keys[:n], out.state[:n] = self.keys[:n], self.state[:n]
        return out

    def finished(self, n: int) -> Finished:
        """A copy of the first ``n`` rows, as finished flows."""
        return Finished(self.keys[:n].copy(), self.state[:n].copy())

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.state.nbytes


class FlowTable:
    """Open flows and the rules that finish them."""

    def __init__(self, config: FlowConfig | None = None, *, initial_rows: int = 1024) -> None:
        self.config = config or FlowConfig()
        self._idle = int(self.config.idle_timeout_s * NS)
        self._active = int(self.config.active_timeout_s * NS)
        self._window = int(self.config.pair_window_s * NS)
        rows = 1 << max(1, initial_rows - 1).bit_length()  # a power of two
        self._rows = _Rows(rows)
        self._index = np.zeros(2 * rows, np.int32)
        self._n = 0
        # One clock per observing host, and the shared one (slot 0): ``_hostclocks``.
        self._clk, self._hidx, self._ctl = hc.new_table(self.config.max_host_clocks + 1)
        self._freed_at = -1
        """Flows finished when no clock slot could be freed (-1: none failed): until more
        have finished, hosts without a clock take the shared one at once."""
        self._finished = 0
        self._fragments = FragmentPorts()
        self._max_slots = 2 << max(0, self.config.max_pending_copies - 1).bit_length()
        self._pend = np.zeros((min(_FIRST_SLOTS, self._max_slots), len(cp.PENDING)), np.int64)
        self._npend = 0
        self._purged = hc.NEVER
        """The newest clock at the last purge of stale pending copies."""
        self._stats = np.zeros(len(cp.COUNTERS), np.int64)

    @property
    def open_flows(self) -> int:
        """Flows currently open."""
        return self._n

    @property
    def memory_bytes(self) -> int:
        """Bytes the table holds (its arrays at their current capacity)."""
        clocks = self._clk.nbytes + self._hidx.nbytes
        return self._rows.nbytes + self._index.nbytes + self._pend.nbytes + clocks

    def counters(self) -> dict[str, int]:
        """``late_frames``, ``copies_paired`` (pairs), ``copies_unpaired``,
        ``copies_ambiguous``, ``pending_overflow`` (see ``_copypairs``), ``clock_resets``
        and ``clocks_full_frames`` (see ``_hostclocks``), and the gauges ``pending_copies``,
        copies waiting for their partner, and ``host_clocks``, clocks in use."""
        out = dict(zip(cp.COUNTERS, self._stats.tolist(), strict=True))
        out["pending_copies"] = self._npend
        out["host_clocks"] = int(np.count_nonzero(self._clocks()[1:, hc.HOST] != hc.FREE))
        return out

    def update(
        self, dec: Decoded, eps: Endpoints, *, received_ns: int | None = None
    ) -> pd.DataFrame:
        """Add a batch of usable frames; return the flows it finished. ``received_ns``:
        the caller's time (ns) when they arrived — the live analyzer's clock — from which
        ``advance(received_ns=...)`` moves each host's clock on."""
        return self.update_rows(dec, eps, received_ns=received_ns).frame()

    def update_rows(
        self, dec: Decoded, eps: Endpoints, *, received_ns: int | None = None
    ) -> Finished:
        """``update``, the finished flows as rows (``Finished.frame`` makes the frame)."""
        n = len(dec)
        if n == 0:
            return self._expire()
        sport, dport = self._fragments.apply(dec, *frame_ports(dec))
        has_ip = dec.ip_version != 0
        proto = np.where(has_ip, dec.ip_proto, 0).astype(np.uint64)
        vlan = (dec.vlan_inner & 0xFFFF).astype(np.uint64)
        misc: U64 = np.bitwise_or(np.left_shift(proto, _U32), np.left_shift(vlan, _U16))
        misc |= dec.ethertype.astype(np.uint64)
        facts = (
            misc,
            np.ascontiguousarray(dec.ts_ns, np.int64),
            dec.wirelen,
            dec.tcp_flags,
            dec.host,
            _roles(dec, eps),
            dec.tag_kind != TagKind.NONE,
            dec.fingerprint,
        )
        keycols = (eps.src, eps.dst, dec.src_ip_hi, dec.src_ip_lo, dec.dst_ip_hi, dec.dst_ip_lo,
                   sport, dport)  # fmt: skip
        fin = _Rows(max(64, n // 16))
        nfin = j = 0
        stop_when_full = True
        stop_for_clock = self._freed_at != self._finished
        arrived = np.int64(hc.NEVER if received_ns is None else received_ns)
        while True:
            j, self._n, nfin, need, self._npend = kt.run_frames(
                keycols,
                facts,
                (self._rows.arrays, self._index, self._n, fin.arrays, nfin),
                (j, self._idle, self._active,
                 (self._clk, self._hidx, self._ctl, stop_for_clock, arrived)),
                (self._pend, self._npend, self._pend.shape[0] // 2, stop_when_full,
                 self._window, self._stats),
            )  # fmt: skip
            if need == kt.Need.DONE:
                break
            if need == kt.Need.ROWS:
                self._grow(2 * self._rows.capacity)
            elif need == kt.Need.FINISHED:
                fin = fin.grown(nfin, 2 * fin.capacity)
            elif need == kt.Need.CLOCKS:
                stop_for_clock = self._free_clocks(nfin)
            else:
                stop_when_full = self._make_room()
        self._finished += nfin
        if self._npend and int(self._clocks()[:, hc.NOW].max()) - self._purged > 2 * self._window:
            self._repend(self._pend.shape[0])
        finished = fin.finished(nfin)
        idled = self._expire()
        return Finished.concat([finished, idled]) if len(idled) else finished

    def advance(self, now_ns: int | None = None, *, received_ns: int | None = None) -> pd.DataFrame:
        """Move the clocks on without frames; return the flows that idled out.

        ``now_ns`` moves every host's clock to that capture time at least. ``received_ns``
        (the caller's time, as given to ``update``) moves each host's clock on by the time
        passed since its newest frame arrived: a live analyzer calls this when no traffic
        arrives, so that idle flows end even on a quiet network, each by its host's time.
        """
        return self.advance_rows(now_ns, received_ns=received_ns).frame()

    def advance_rows(
        self, now_ns: int | None = None, *, received_ns: int | None = None
    ) -> Finished:
        """``advance``, the flows as rows."""
        clk = self._clocks()
        if now_ns is not None:
            clk[:, hc.NOW] = np.maximum(clk[:, hc.NOW], now_ns)
        if received_ns is not None:
            on = self._moved_on(clk, received_ns)
            clk[:, hc.NOW] = np.maximum(clk[:, hc.NOW], on)
        return self._expire()

    def capture_time(self, received_ns: int) -> int | None:
        """The newest capture time by any host's clock when moved on to the caller's time
        ``received_ns`` (``advance``); None before any frame came with a ``received_ns``."""
        clk = self._clocks()
        known = clk[:, hc.SEEN_AT] != hc.NEVER
        if not known.any():
            return None
        return int(np.maximum(clk[known, hc.NOW], self._moved_on(clk, received_ns)[known]).max())

    def open_rows(self) -> Finished:
        """A copy of every open flow, as rows (their counters so far)."""
        return self._rows.finished(self._n)

    def flush(self) -> pd.DataFrame:
        """Finish every open flow (end of capture, shutdown)."""
        return self.flush_rows().frame()

    def flush_rows(self) -> Finished:
        """``flush``, the flows as rows. Copies still waiting for their partner will not
        find it in these flows: they count as unpaired and are forgotten."""
        done = self._rows.finished(self._n)
        self._finished += self._n
        self._n = 0
        self._index.fill(0)
        self._clk[:, hc.OLDEST] = hc.NO_ROWS
        self._stats[cp.UNPAIRED] += cp.pending_copies(self._pend)
        self._pend.fill(0)
        self._npend = 0
        return done

    def evict(self, n: int) -> pd.DataFrame:
        """Finish the ``n`` open flows seen longest ago, each by its clock (a bounded table
        sheds its oldest)."""
        return self.evict_rows(n).frame()

    def evict_rows(self, n: int) -> Finished:
        """``evict``, the flows as rows."""
        n = min(n, self._n)
        if n <= 0:
            return _Rows(0).finished(0)
        state = self._rows.state[: self._n]
        clocks = hc.effective_all(self._clocks())
        idle_for = clocks[kt.row_clocks(state)] - state[:, kt.STATE.index("last_ns")]
        return self._remove(np.argpartition(-idle_for, n - 1)[:n])

    # --- internals --------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        self._rows = self._rows.grown(self._n, capacity)
        self._index = np.zeros(2 * capacity, np.int32)
        kt.rebuild_index(self._index, self._rows.state, self._n)

    def _remove(self, rows: npt.NDArray[np.integer[Any]]) -> Finished:
        fin = _Rows(rows.size)
        desc = np.sort(rows.astype(np.int64))[::-1].copy()
        self._n, nfin = kt.remove_rows(
            desc, (self._rows.arrays, self._index, self._n), (fin.arrays, 0)
        )
        self._finished += nfin
        return fin.finished(nfin)

    def _clocks(self) -> npt.NDArray[np.int64]:
        """The slots of the clock table in use so far (a view)."""
        return self._clk[: int(self._ctl[1])]

    @staticmethod
    def _moved_on(clk: npt.NDArray[np.int64], received_ns: int) -> npt.NDArray[np.int64]:
        """Each clock's newest frame time moved on by the caller's time passed since that
        frame arrived (``NEVER`` where it came without one)."""
        known = clk[:, hc.SEEN_AT] != hc.NEVER
        since = np.maximum(received_ns - clk[:, hc.SEEN_AT], 0)
        out: npt.NDArray[np.int64] = np.where(known, clk[:, hc.SEEN] + since, hc.NEVER)
        return out

    def _free_clocks(self, nfin: int) -> bool:
        """Free the clock slots that nothing refers to any more — no open flow follows them,
        no waiting copy, no old clock of the same host — after a host found no free slot;
        whether one was freed (else, until more flows finish, hosts without a clock take
        the shared one at once)."""
        clk = self._clocks()
        used = np.zeros(clk.shape[0], np.bool_)
        used[0] = True
        used[kt.row_clocks(self._rows.state[: self._n])] = True
        used[cp.entry_clocks(self._pend)] = True
        old = used & (clk[:, hc.CURRENT] == 0) & (clk[:, hc.HOST] != hc.FREE)
        used[clk[old, hc.CURRENT_OF]] = True
        free = ~used & (clk[:, hc.HOST] != hc.FREE)
        if not free.any():
            self._freed_at = self._finished + nfin
            return False
        hc.release(clk, free)
        in_use = np.flatnonzero(clk[:, hc.HOST] != hc.FREE)
        self._ctl[1] = int(in_use.max()) + 1
        hc.index_hosts(self._clocks(), self._hidx)
        return True

    def _repend(self, slots: int) -> None:
        """Rebuild the pending map with ``slots`` slots, without the copies stale by their
        clocks."""
        new = np.zeros((slots, len(cp.PENDING)), np.int64)
        window = np.int64(self._window)
        clocks = hc.effective_all(self._clocks())
        self._npend = cp.rebuild(self._pend, new, clocks, window, self._stats)
        self._pend, self._purged = new, int(clocks.max())

    def _make_room(self) -> bool:
        """Purge the full pending map, and double it if it is still over a quarter full (up
        to ``max_pending_copies``); whether a copy may wait now (else copies are refused,
        and counted, until the batch ends)."""
        slots = self._pend.shape[0]
        self._repend(slots)
        if self._npend >= slots // 4 and slots < self._max_slots:
            self._repend(2 * slots)
        return self._npend < self._pend.shape[0] // 2

    def _expire(self) -> Finished:
        """Finish the open flows whose clock is past their last frame by more than the idle
        timeout."""
        if self._n == 0:
            return _Rows(0).finished(0)
        clk = self._clocks()
        # Old clocks exist only once a host's time went back (``effective`` is ``now`` else).
        clocks = hc.effective_all(clk) if self._stats[cp.RESETS] else clk[:, hc.NOW]
        if int((clocks - clk[:, hc.OLDEST]).max()) <= self._idle:  # NO_ROWS: far below
            return _Rows(0).finished(0)
        drop = np.empty(self._n, np.int64)
        clk[:, hc.OLDEST] = hc.NO_ROWS
        k = kt.sweep((self._rows.state, self._n), (clocks, self._idle), clk, drop)
        return self._remove(drop[:k])


def _roles(dec: Decoded, eps: Endpoints) -> npt.NDArray[np.uint8]:
    """Each frame's copy role for ``_flowtable.run_frames``: 0 sender copy (VN-Tag d=0 with
    an svif), 1 receiver copy (d=1), 2 other; plus 4 when the copy may pair with another:
    a sender or receiver copy between two endpoints known by vif or vNIC (only then do both
    copies get the same key), and not a sender copy to a vif of its own host (intra-host)."""
    vntag = dec.tag_kind == TagKind.VNTAG
    role = np.full(len(dec), 2, np.uint8)
    receiver = vntag & (dec.tag_d == 1)
    sender = vntag & (dec.tag_d == 0) & (dec.svif != 0)
    role[receiver] = 1
    role[sender] = 0
    local = (eps.src >= KIND_VIF) & (eps.dst >= KIND_VIF)  # by vif or vNIC, not by MAC
    pairs = local & (receiver | (sender & (dec.dvif == 0)))
    role[pairs] |= 4
    return role
