"""The flow table's clocks, one per observing host (private to ``flows``; compiled).

Each host (a frame's ``host``: the collector live, the capture's host from files) has a
**clock**: the newest capture time seen from it. Its frames are judged by it (``flows``
states the rule), so a host whose time is behind the others' — a replay of an old capture, a
collector whose clock is off — has flows as whole as anyone's.

When a host's frame is more than the idle timeout behind that host's own clock, the host's
time went back (a replay or a sender started again, a clock set back, a record that far out
of order): the host gets a new clock from that frame on (``reset``, counted), and its old
clock stays with the flows that follow it. An old clock never runs behind its host's current
one (``effective``): a record far out of order leaves the flows it interrupted to end on time.

The table: rows of ``CLOCK`` int64 columns (``clk``), one per clock. Slot 0 is the **shared**
clock, for hosts that find no free slot (``max_host_clocks`` of them are in use: counted, and
judged together as if by one clock). ``hidx`` is an open-addressing hash (linear probing,
power-of-two size at least twice the slots) from a host to its current slot (``slot + 1``, 0
empty); ``ctl`` holds the next serial number and the number of slots in use at the bottom of
the table (``top``). Slots are freed only by ``FlowTable`` when no flow, no waiting copy and
no old clock refers to them, which changes no decision (a freed clock has nothing to judge).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.kernels import kernel

__all__ = [
    "CLOCK",
    "FREE",
    "NEVER",
    "NO_ROWS",
    "SHARED",
    "effective",
    "effective_all",
    "host_slot",
    "index_hosts",
    "new_table",
    "release",
    "reset",
    "take_slot",
]

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

CLOCK: Final = ("host", "now", "current", "current_of", "oldest", "seen", "seen_at", "serial")
"""int64 columns of a clock: its host (``FREE``, ``SHARED``); ``now``, the clock itself (the
newest capture time of its frames, moved on by ``FlowTable.advance``); whether it is its
host's current clock, and that current clock's slot; ``oldest``, no open flow following it
was last seen before this (a bound: exact after a sweep; ``NO_ROWS`` for none); ``seen``, the
time of the last frame that moved the clock on, and ``seen_at``, the caller's time when it
came (``NEVER``: not given), which let the live analyzer move the clock on with its own;
and a serial number (the order clocks were made in: ties between flows go by it)."""
HOST, NOW, CURRENT, CURRENT_OF, OLDEST, SEEN, SEEN_AT, SERIAL = range(len(CLOCK))

FREE: Final = -1
"""``host`` of a free slot."""
SHARED: Final = -2
"""``host`` of slot 0, the clock of the hosts that found no slot."""
NEVER: Final = -(1 << 62)
"""A clock before any frame: far below any capture time, with no overflow in differences."""
NO_ROWS: Final = 1 << 62
"""``oldest`` of a clock that no open flow follows."""
_CTL_SERIAL, _CTL_TOP = 0, 1
_MIX: Final = np.uint64(0x9E3779B97F4A7C15)
_HIGH: Final = np.uint64(32)


def new_table(slots: int) -> tuple[I64, I32, I64]:
    """An empty clock table of ``slots`` slots (the shared one included): (clk, hidx, ctl)."""
    clk = np.zeros((slots, len(CLOCK)), np.int64)
    release(clk, np.ones(slots, np.bool_))
    clk[0, HOST], clk[0, CURRENT] = SHARED, 1
    hidx = np.zeros(2 << max(0, slots - 1).bit_length(), np.int32)
    ctl = np.array([1, 1], np.int64)  # serial 0 is the shared clock's; one slot in use
    return clk, hidx, ctl


@kernel
def _home(host: np.int64, mask: int) -> np.int64:
    """``host``'s first probe position in an index of ``mask + 1`` entries (``_home_py``
    is the same in Python)."""
    return np.int64(((np.uint64(host) * _MIX) >> _HIGH) & np.uint64(mask))


def _home_py(host: int, mask: int) -> int:
    return (((host * int(_MIX)) & 0xFFFF_FFFF_FFFF_FFFF) >> 32) & mask


@kernel
def host_slot(hidx: I32, clk: I64, host: np.int64) -> int:
    """The slot of ``host``'s current clock, or -1."""
    mask = hidx.size - 1
    pos = _home(host, mask)
    while True:
        e = hidx[pos]
        if e == 0:
            return -1
        if clk[e - 1, HOST] == host:
            return e - 1  # type: ignore[no-any-return]
        pos = (pos + 1) & mask


@kernel
def _point(hidx: I32, clk: I64, host: np.int64, slot: int) -> None:
    """Make ``slot`` ``host``'s entry in ``hidx`` (replacing the entry of its old clock)."""
    mask = hidx.size - 1
    pos = _home(host, mask)
    while hidx[pos] != 0 and clk[hidx[pos] - 1, HOST] != host:
        pos = (pos + 1) & mask
    hidx[pos] = slot + 1


@kernel
def take_slot(clk: I64, hidx: I32, ctl: I64, host: np.int64) -> int:
    """A new current clock for ``host`` in the lowest free slot (its entry in ``hidx``
    points there); -1 when every slot is in use."""
    slot = -1
    for s in range(1, clk.shape[0]):
        if clk[s, HOST] == FREE:
            slot = s
            break
    if slot < 0:
        return -1
    clk[slot, HOST], clk[slot, CURRENT], clk[slot, CURRENT_OF] = host, 1, slot
    clk[slot, NOW] = clk[slot, SEEN] = clk[slot, SEEN_AT] = NEVER
    clk[slot, OLDEST] = NO_ROWS
    clk[slot, SERIAL] = ctl[_CTL_SERIAL]
    ctl[_CTL_SERIAL] += 1
    ctl[_CTL_TOP] = max(ctl[_CTL_TOP], slot + 1)
    _point(hidx, clk, host, slot)
    return slot


@kernel
def reset(clk: I64, hidx: I32, ctl: I64, slot: int) -> int:
    """The host of ``slot`` (its current clock) went back in time: a new current clock for
    it, or -1 when no slot is free. Its old clocks keep what they had (``effective``) and
    follow the new one from now on."""
    host = clk[slot, HOST]
    new = take_slot(clk, hidx, ctl, host)
    if new < 0:
        return -1
    for o in range(1, ctl[_CTL_TOP]):
        if clk[o, HOST] == host and clk[o, CURRENT] == 0:
            clk[o, NOW] = max(clk[o, NOW], clk[slot, NOW])
            clk[o, CURRENT_OF] = new
    clk[slot, CURRENT], clk[slot, CURRENT_OF] = 0, new
    return new


@kernel
def effective(clk: I64, slot: int) -> np.int64:
    """The time by ``slot``'s clock: its own, or its host's current clock's when that is
    later (an old clock never runs behind)."""
    now = clk[slot, NOW]
    if clk[slot, CURRENT] == 0:
        now = max(now, clk[clk[slot, CURRENT_OF], NOW])
    return now  # type: ignore[no-any-return]


def effective_all(clk: I64) -> I64:
    """``effective`` of every slot of ``clk`` (free ones: their ``now``)."""
    now = clk[:, NOW]
    old = (clk[:, CURRENT] == 0) & (clk[:, HOST] != FREE)
    out: I64 = now.copy()
    out[old] = np.maximum(now[old], now[clk[old, CURRENT_OF]])
    return out


def release(clk: I64, which: npt.NDArray[np.bool_]) -> None:
    """Make the slots ``which`` of ``clk`` free (``index_hosts`` then forgets their hosts)."""
    clk[which] = 0
    clk[which, HOST] = FREE
    for col in (NOW, SEEN, SEEN_AT):
        clk[which, col] = NEVER
    clk[which, OLDEST] = NO_ROWS


def index_hosts(clk: I64, hidx: I32) -> None:
    """Refill ``hidx`` with the current clock of every host in ``clk``."""
    hidx.fill(0)
    mask = hidx.size - 1
    current = np.flatnonzero((clk[:, CURRENT] == 1) & (clk[:, HOST] >= 0))
    for slot in current.tolist():
        pos = _home_py(int(clk[slot, HOST]), mask)
        while hidx[pos] != 0:
            pos = (pos + 1) & mask
        hidx[pos] = slot + 1
