"""Bidirectional flows, built batch by batch in one compiled pass per batch.

A flow is a run of frames with one key (``flowkeys``) in which no gap exceeds the idle
timeout (default 60 s) and whose first and last frame are less than the active timeout
(default 300 s) apart; both are measured in capture time, so a replay gives the same flows
as the live traffic did.

Frames go through the table in the order they arrive (``update`` after ``update``, each
batch in its own order: collectors' messages interleave, so a live batch is not in time
order, and ``vspan report`` merges its files in time order before).

**Clocks, one per observing host.** Each host (a frame's ``host``: the collector live, the
capture's host from files, 0 when none) has a clock: the newest capture time seen from it
(``_hostclocks``). A frame is judged by its host's clock, and a flow follows the clock of
the host whose frame started it (the first of its frames to reach the table; the two hosts
of a cross-host flow normally agree to milliseconds). A flow is *open* while its clock is at
most the idle timeout past its last frame; once past, it has ended, whether or not it has
been handed out yet, and nothing joins it any more. So a source whose times lag the
others' — a replay of an old capture beside live traffic, a collector whose clock is behind —
has flows as whole as it would alone. A key has one flow per clock at most (usually one):
the same conversation seen on two clocks far apart (a flow replayed while it is live; a
cross-host flow between hosts whose clocks differ by more than the timeouts) makes a flow
on each. Each frame, by the compiled kernel (``_flowtable``):

0. if it is more than the idle timeout behind its host's clock, the host's time went back
   (a replay or sender started again, a clock set back, a record that far out of order):
   the host gets a new clock from this frame on (``clock_resets``); flows on its old clock
   keep it, and an old clock never runs behind the host's current one;
1. it joins its key's flow on its clock if that flow is open and the frame fits it: with the
   frame, the flow still spans less than the active timeout and has no gap over the idle
   timeout. A frame older than the flow's first one becomes its first: the flow's direction
   and observing host (``observer``) are then the frame's;
2. else it joins an open flow of its key on another clock that it fits (the one seen most
   recently; on a tie, the one on the older clock): the other copy of a cross-host packet;
3. else, if its key's flow on its clock is open and newer than the frame, the frame is a
   **late** flow of its own, finished at once (the open flow goes on);
4. else that flow (if any) is finished and the frame starts a new one, on its clock.

No frame is dropped and none stretches a flow past its timeouts. Rule 3 only applies to a
frame judged by a clock not its own: when the clock table is full (``max_host_clocks``),
hosts without a clock share one (as all hosts once did) and a host's time going back keeps
its clock; those frames are counted (``clocks_full_frames``), and the late ones as
``late_frames``. Flows their clocks have passed are handed out at the end of each
``update``, or by ``advance``, which moves clocks on without frames — to a capture time, or
(live) each by the caller's time passed since its host's newest frame arrived, so that
flows end on a quiet network, each by its own host's time. Since the rules never let a frame
into a flow that has ended, and clocks only go forward, the flows do not depend on how the
frames are cut into batches — only on their order.

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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vspan.analysis.decode.columns import Decoded, TagKind
from vspan.analysis.flows import _clocks as hc
from vspan.analysis.flows import _copypairs as cp
from vspan.analysis.flows import _kernel as kt
from vspan.analysis.flows.endpoints import KIND_VIF, Endpoints
from vspan.analysis.flows.finished import FLOW_COLUMNS, Finished, Rows
from vspan.analysis.flows.keys import FragmentPorts, frame_ports

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FLOW_COLUMNS", "Finished", "FlowConfig", "FlowTable"]

NS = 1_000_000_000

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
_FIRST_SLOTS = 1024
"""Slots of the pending map at first (it doubles as needed, up to ``max_pending_copies``)."""
_MAX_CLOCKS = 0xFFFF
"""Clock slots at most (a flow keeps its clock's slot in 16 bits)."""
_U32, _U16 = np.uint64(32), np.uint64(16)


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """Flow-table settings."""

    idle_timeout_s: float = 60.0
    """A flow ends after this much capture time without a packet."""
    active_timeout_s: float = 300.0
    """A flow is cut after lasting this long; the next packet starts a new one."""
    pair_window_s: float = 1.0
    """The two copies of a packet pair only within this much capture time of each other; a
    copy waits this long (by the clock of the host that observed it) for its partner."""
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


class FlowTable:
    """Open flows and the rules that finish them."""

    def __init__(self, config: FlowConfig | None = None, *, initial_rows: int = 1024) -> None:
        self.config = config or FlowConfig()
        self._idle = int(self.config.idle_timeout_s * NS)
        self._active = int(self.config.active_timeout_s * NS)
        self._window = int(self.config.pair_window_s * NS)
        rows = 1 << max(1, initial_rows - 1).bit_length()  # a power of two
        self._rows = Rows(rows)
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
        fin = Rows(max(64, n // 16))
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
            return Rows(0).finished(0)
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
        fin = Rows(rows.size)
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
            return Rows(0).finished(0)
        clk = self._clocks()
        # Old clocks exist only once a host's time went back (``effective`` is ``now`` else).
        clocks = hc.effective_all(clk) if self._stats[cp.RESETS] else clk[:, hc.NOW]
        if int((clocks - clk[:, hc.OLDEST]).max()) <= self._idle:  # NO_ROWS: far below
            return Rows(0).finished(0)
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
