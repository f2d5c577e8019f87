"""The flow table's compiled kernels and its memory layout (private to ``flows``).

An open flow is one row of two arrays: ``keys`` (``KEY_WORDS`` uint64 words: the key
columns of ``flowkeys.KEY_COLUMNS`` packed) and ``state`` (``STATE`` int64 columns), dense
and found through a hash index (``_flowrows``); a key has one row per clock at most
(``_hostclocks``), usually one.

``run_frames`` walks a batch in arrival order and applies the per-packet rule of ``flows``
to each frame (join a flow of its key, or be a late flow of its own, or finish its flow and
start a new one), then pairs the frame with its other copy (``_copypairs``). It stops early
and says why when an output is full (``Need``); the caller makes room and calls again from
where it stopped: a frame is looked at before anything is changed for it (but its host's
clock, which a second look finds as the first left it). ``sweep`` finds the flows that have
ended by their clocks.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.analysis.flows._clocks import (
    NOW,
    OLDEST,
    SEEN,
    SEEN_AT,
    SERIAL,
    effective,
    host_slot,
    take_slot,
)
from vspan.analysis.flows._clocks import reset as reset_clock
from vspan.analysis.flows._copypairs import (
    CLOCKS_FULL,
    HOST_SHIFT,
    LATE,
    RESETS,
    SLOT_SHIFT,
    entry_clock,
    find,
    identity,
    settle,
)
from vspan.analysis.flows._rows import (
    ICMP_TYPE_CODE,
    KEY_WORDS,
    Index,
    Rows,
    copy_out,
    find_row,
    flow_ports,
    insert,
    mix,
    rebuild_index,
    remove_rows,
)
from vspan.kernels import kernel

__all__ = [
    "CLOCK_SHIFT",
    "DIRECTIONS",
    "FIRST_REV_BIT",
    "ICMP_TYPE_CODE",
    "KEY_WORDS",
    "ROLES",
    "STATE",
    "TAGGED_BIT",
    "Index",
    "Need",
    "Rows",
    "find_row",
    "flow_ports",
    "mix",
    "rebuild_index",
    "remove_rows",
    "row_clocks",
    "run_frames",
    "sweep",
]

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

ROLES: Final = ("s", "r", "o")
"""Copy roles: sender copy (VN-Tag d=0 with svif), receiver copy (d=1), other."""
DIRECTIONS: Final = ("", "_rev")
"""Column suffixes of the A → B and B → A directions."""
ROLE_COUNTERS: Final = tuple(
    f"{what}{d}_{role}" for role in ROLES for d in DIRECTIONS for what in ("packets", "bytes")
)
"""Packets and bytes per copy role (sender, receiver, other) and direction."""
STATE: Final = ("hash", "start_ns", "last_ns", *ROLE_COUNTERS, "copies", "bits", "observer",
                "observer_other", "delay_sum_ns", "pairs", "born_ns")  # fmt: skip
"""int64 columns of an open flow; ``bits`` packs ``tcp_flags`` (bits 0-15),
``tcp_flags_rev`` (16-31), ``first_rev`` (32), ``tagged`` (33), ``_TWIN`` (34) and the slot
of the clock the flow follows (``_hostclocks``, bits 40-55); ``observer`` is the host of the
first packet (by capture time), ``observer_other`` the largest other host that saw the flow
(-1: none); ``delay_sum_ns`` and ``pairs`` sum the delays of the paired copies;
``born_ns`` is the time of the frame that started the flow, which never changes (``start_ns``
moves back when an older frame joins): what tells a flow apart for its whole life."""

_HASH, _START, _LAST = 0, 1, 2
_COUNTERS = 3
"""First role counter: ``_COUNTERS + role * 4 + rev * 2`` packets, ``+ 1`` bytes."""
_COPIES, _BITS, _OBSERVER, _OTHER, _DELAY, _PAIRS, _BORN = 15, 16, 17, 18, 19, 20, 21
if STATE[_BORN] != "born_ns" or len(ROLE_COUNTERS) != _COPIES - _COUNTERS:
    raise AssertionError("the state offsets do not match STATE")  # pragma: no cover
FIRST_REV_BIT, TAGGED_BIT, CLOCK_SHIFT = 32, 33, 40
_CLOCK_BITS = 0xFFFF
_TWIN = np.int64(1 << 34)
"""In ``bits``: the flow's key may have other rows (flows on other clocks); without it, the
key's first row found is its only one (no need to look further)."""

_U32, _U16 = np.uint64(32), np.uint64(16)
_LOW16 = np.uint64(0xFFFF)


class Need(IntEnum):
    """Why ``run_frames`` returned."""

    DONE = 0
    ROWS = 1
    """The state arrays are full."""
    FINISHED = 2
    """The finished-flow arrays are full."""
    PENDING = 3
    """The pending map of unpaired copies is full (``_copypairs``)."""
    CLOCKS = 4
    """A host needs a clock and every slot of the clock table is in use (``_hostclocks``)."""


Frame = tuple[np.int64, int, np.int64, int]
"""A frame as ``_start`` and ``_first`` take it: time, rev, host, clock slot."""


@kernel
def _start(state: I64, row: int, h: np.int64, frame: Frame) -> None:
    """Make ``row`` a new flow with hash ``h`` at ``frame``, following its clock."""
    ts, rev, host, clock = frame
    state[row, :] = 0
    state[row, _HASH] = h
    state[row, _START] = ts
    state[row, _LAST] = ts
    state[row, _BORN] = ts
    state[row, _BITS] = (np.int64(rev) << FIRST_REV_BIT) | (np.int64(clock) << CLOCK_SHIFT)
    state[row, _OBSERVER] = host
    state[row, _OTHER] = -1


@kernel
def _first(state: I64, row: int, frame: Frame) -> None:
    """Make ``frame``, older than the flow's start, its first packet: the flow's direction
    and observing host are then the frame's (the host that saw the first packet, whichever
    collector's message came first). The flow keeps its clock."""
    ts, rev, host, _ = frame
    state[row, _START] = ts
    first_rev = np.int64(1) << FIRST_REV_BIT
    state[row, _BITS] = (state[row, _BITS] & ~first_rev) | (np.int64(rev) << FIRST_REV_BIT)
    observer, other = state[row, _OBSERVER], state[row, _OTHER]
    if host != observer:  # the other hosts: exact for two, the largest others beyond
        state[row, _OTHER] = observer if other == host else max(other, observer)
        state[row, _OBSERVER] = host


_HOST_CACHE = 64
"""Hosts whose clock slot ``run_frames`` keeps at hand (a power of two)."""
_JOIN, _LATE, _RESTART, _NEW = 0, 1, 2, 3
"""What a frame does (``run_frames``): join its key's open flow, be a late flow of its own,
finish the open flow and start a new one in its row, start a flow in a new row."""


@kernel
def _fits(start: np.int64, last: np.int64, ts: np.int64, idle: int, active: int) -> bool:
    """Whether a flow from ``start`` to ``last`` stays within the timeouts with ``ts``."""
    span = max(last, ts) - min(start, ts)
    return bool(span < active and ts - last <= idle and start - ts <= idle)


def row_clocks(state: I64) -> I64:
    """The clock slot each row of ``state`` follows."""
    out: I64 = (state[:, _BITS] >> CLOCK_SHIFT) & _CLOCK_BITS
    return out


@kernel
def _same_key(keys: U64, row: int, k: U64) -> bool:
    """Whether ``row`` holds the key ``k``."""
    same = True
    for w in range(k.size):
        if keys[row, w] != k[w]:
            same = False
            break
    return same


@kernel
def _clock_of(state: I64, row: int) -> int:
    return int((state[row, _BITS] >> CLOCK_SHIFT) & _CLOCK_BITS)


@kernel
def run_frames(
    keycols: tuple[U64, U64, U64, U64, U64, U64, U64, U64],
    facts: tuple[U64, I64, I32, U16, npt.NDArray[np.uint32], U8, npt.NDArray[np.bool_], U64],
    table: tuple[Rows, Index, int, Rows, int],
    walk: tuple[int, int, int, tuple[I64, I32, I64, bool, np.int64]],
    pending: tuple[I64, int, int, bool, int, I64],
) -> tuple[int, int, int, int, int]:
    """Add frames to the table, in arrival order; return (next frame, open rows, finished
    rows, ``Need``, pending copies).

    ``keycols``: source and destination endpoint, address (hi, lo) and "port" per frame;
    ``facts``: packed proto/vlan/ethertype (``misc``), time, wire length, TCP flags, host,
    copy role (0 sender, 1 receiver, 2 other; | 4 when the copy may pair), tagged and
    fingerprint; ``table``: the open rows, their index and count, the finished rows and
    their count; ``walk``: where to start, the idle and active timeouts in ns, and the
    clocks: the clock table, its host index and ``ctl`` (``_hostclocks``), whether to stop
    (``Need.CLOCKS``) rather than use the shared clock when a host finds no free slot, and
    the caller's time of arrival (``_hostclocks.NEVER``: none); ``pending``: the pending
    map, its entries, how many it may hold, whether to stop (``Need.PENDING``) rather than
    refuse a copy when it is full, the pairing window in ns, and the counters
    (``_copypairs.COUNTERS``).

    The rule (``flows``), with ``now`` the frame's host's clock before the frame and each
    open flow judged by its own clock (open while ``clock - last <= idle``): the frame
    joins the flow of its key on its own clock if that flow is open and the frame fits it
    (with the frame, the flow spans less than ``active`` and has no gap over ``idle``), else
    an open flow of its key on another clock that it fits (the most recently seen; then
    the oldest clock's); else, if its flow on its own clock is open and newer than the
    frame, the frame is a late flow of its own (finished at once); else that flow, if any,
    is finished and the frame starts a new one on its clock. A frame more than ``idle``
    behind its host's clock first gives the host a new clock (``_hostclocks.reset``).
    """
    s_ep, d_ep, s_hi, s_lo, d_hi, d_lo, sport, dport = keycols
    misc, ts_ns, wirelen, flags, host, role, tagged, fingerprint = facts
    rows, index, n, fin_rows, nfin = table
    keys, state = rows
    fin_keys, fin_state = fin_rows
    j0, idle, active, clocks = walk
    pend, npend, limit, stop_when_full, window, stats = pending
    clk, hidx, ctl, stop_for_clock, arrived = clocks
    k = np.empty(len(KEY_WORDS), np.uint64)
    mask = index.size - 1
    cached = np.full(_HOST_CACHE, -1, np.int64)  # host → slot, direct-mapped, this call
    cached_slot = np.zeros(_HOST_CACHE, np.int64)
    full = False  # no free clock slot left in this call
    for i in range(j0, ts_ns.size):
        gt = s_hi[i] > d_hi[i] or (
            s_hi[i] == d_hi[i]
            and (
                s_lo[i] > d_lo[i]
                or (
                    s_lo[i] == d_lo[i]
                    and (sport[i] > dport[i] or (sport[i] == dport[i] and s_ep[i] > d_ep[i]))
                )
            )
        )
        if gt:
            k[0], k[1], k[2], k[3], k[4], k[5] = (
                d_ep[i], s_ep[i], d_hi[i], d_lo[i], s_hi[i], s_lo[i],
            )  # fmt: skip
            pa, pb = dport[i], sport[i]
        else:
            k[0], k[1], k[2], k[3], k[4], k[5] = (
                s_ep[i], d_ep[i], s_hi[i], s_lo[i], d_hi[i], d_lo[i],
            )  # fmt: skip
            pa, pb = sport[i], dport[i]
        k[6] = (pa << _U32) | pb
        k[7] = m = misc[i]
        hu = np.uint64(0)
        for w in range(6):
            hu = mix(hu, k[w])
        for v in (pa, pb, m >> _U32, (m >> _U16) & _LOW16, m & _LOW16):
            hu = mix(hu, v)
        h = np.int64(hu)
        ts = ts_ns[i]
        rev = 1 if gt else 0
        # The frame's clock: its host's (a new one if the host's time went back).
        hst = np.int64(host[i])
        line = hst & (_HOST_CACHE - 1)
        if cached[line] == hst:
            c = cached_slot[line]
        else:
            c = host_slot(hidx, clk, hst)
            if c < 0:
                c = -1 if full else take_slot(clk, hidx, ctl, hst)
                if c < 0:
                    if stop_for_clock:
                        return i, n, nfin, Need.CLOCKS, npend
                    full, c = True, 0
            cached[line], cached_slot[line] = hst, c
        own = True  # the frame is judged by a clock of its host's own
        if c != 0 and ts < clk[c, NOW] - idle:
            fresh = -1 if full else reset_clock(clk, hidx, ctl, c)
            if fresh >= 0:
                stats[RESETS] += 1
                c = cached_slot[line] = fresh
            elif stop_for_clock:
                return i, n, nfin, Need.CLOCKS, npend
            else:
                full, own = True, False
        now = clk[c, NOW]
        # The flows of the frame's key: the one on its clock (``mine``), and the best open
        # one on another clock that it fits (``other``). A key's first row without the
        # twin bit is its only one.
        what, row = _NEW, -1
        mine, other, seen = -1, -1, -1
        other_last, other_serial = np.int64(0), np.int64(0)
        pos = h & mask
        while True:
            e = index[pos]
            if e == 0:
                break
            pos = (pos + 1) & mask
            if state[e - 1, _HASH] != h or not _same_key(keys, e - 1, k):
                continue
            seen = e - 1
            start, last, bits = state[seen, _START], state[seen, _LAST], state[seen, _BITS]
            s = (bits >> CLOCK_SHIFT) & _CLOCK_BITS
            if s == c:
                mine = seen
                if now - last <= idle and _fits(start, last, ts, idle, active):
                    what, row = _JOIN, mine  # the best there is
                    break
            elif effective(clk, s) - last <= idle and _fits(start, last, ts, idle, active):
                if not bits & _TWIN:  # the key's only flow
                    what, row = _JOIN, seen
                    break
                serial = clk[s, SERIAL]
                if other < 0 or last > other_last or (last == other_last and serial < other_serial):
                    other, other_last, other_serial = seen, last, serial
            if not bits & _TWIN:
                break
        if what == _NEW:
            if other >= 0:
                what, row = _JOIN, other
            elif mine >= 0:
                late = now - state[mine, _LAST] <= idle and ts < state[mine, _START]
                what, row = (_LATE if late else _RESTART), mine
        fp = fingerprint[i]
        r = role[i] & 3
        pairs = role[i] >= 4 and fp != 0
        slot, ident = -1, np.int64(0)
        if pairs:
            ident = identity(h, fp, rev)
            slot = find(pend, ident, h, np.int64(fp))
            if slot < 0 and npend >= limit and stop_when_full:
                return i, n, nfin, Need.PENDING, npend
        if what in (_LATE, _RESTART) and nfin == fin_keys.shape[0]:
            return i, n, nfin, Need.FINISHED, npend
        if what == _NEW and n == keys.shape[0]:
            return i, n, nfin, Need.ROWS, npend
        # From here on the frame is taken: nothing returns before the next one.
        frame = (ts, rev, hst, c)
        if not own or c == 0:
            stats[CLOCKS_FULL] += 1
        if what == _LATE or (what != _JOIN and now - ts > idle):
            stats[LATE] += 1  # a flow of its own, ended already
        if what == _LATE:  # a flow of its own, finished at once: a row of the finished
            at, counted = nfin, fin_state
            fin_keys[at, :] = k
            _start(fin_state, at, h, frame)
            nfin += 1
        else:
            at, counted = row, state
            if what == _RESTART:
                copy_out(row, rows, fin_rows, nfin)
                nfin += 1
                twin = state[row, _BITS] & _TWIN
                _start(state, row, h, frame)
                state[row, _BITS] |= twin
            elif what == _NEW:
                at = n
                n += 1
                keys[at, :] = k
                _start(state, at, h, frame)
                insert(index, h, at)
                if seen >= 0:  # the key's second row (or more): mark them
                    state[seen, _BITS] |= _TWIN
                    state[at, _BITS] |= _TWIN
            elif ts < state[row, _START]:
                _first(state, row, frame)
            if what != _JOIN:
                clk[c, OLDEST] = min(clk[c, OLDEST], ts)
        # Count the frame in its flow (``counted[at]``).
        if hst != counted[at, _OBSERVER]:
            counted[at, _OTHER] = max(counted[at, _OTHER], hst)
        counted[at, _LAST] = max(counted[at, _LAST], ts)
        cc = _COUNTERS + r * 4 + rev * 2
        counted[at, cc] += 1
        counted[at, cc + 1] += wirelen[i]
        counted[at, _COPIES] += 1
        counted[at, _BITS] |= np.int64(flags[i]) << (16 * rev)
        if tagged[i]:
            counted[at, _BITS] |= 1 << TAGGED_BIT
        if ts > now:  # the frame's clock moves on, now
            clk[c, NOW] = clk[c, SEEN] = ts
            clk[c, SEEN_AT] = arrived
        if pairs:
            meta = (hst << HOST_SHIFT) | r | (np.int64(c) << SLOT_SHIFT)
            copy = (ident, h, np.int64(fp), ts, meta)
            waited = clk[c, NOW] if slot < 0 else effective(clk, entry_clock(pend, slot))
            added, paired, delay = settle(pend, slot, copy, (waited, window, npend < limit), stats)
            npend += added
            counted[at, _DELAY] += delay
            counted[at, _PAIRS] += paired
    return ts_ns.size, n, nfin, Need.DONE, npend


@kernel
def sweep(flows: tuple[I64, int], ended: tuple[I64, int], clk: I64, drop: I64) -> int:
    """The rows of the open flows (``flows``: their state and count) that have ended —
    their clock (``ended``: the time by each clock slot, and the idle timeout) is past their
    last frame by more than the idle timeout — into ``drop``, in ascending order; the
    ``oldest`` bound of each clock in ``clk`` (reset by the caller) made exact over the rows
    left. Returns how many ended."""
    state, n = flows
    clocks, idle = ended
    k = 0
    for row in range(n):
        s = _clock_of(state, row)
        last = state[row, _LAST]
        if clocks[s] - last > idle:
            drop[k] = row
            k += 1
        else:
            clk[s, OLDEST] = min(clk[s, OLDEST], last)
    return k
