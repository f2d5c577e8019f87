"""The two copies of a cross-host packet, paired (private to ``flows``; compiled).

A packet from a VM on one host to a VM on another is observed twice: its sender copy (VN-Tag
``d=0``) at the sender's host and its receiver copy (``d=1``) at the receiver's. Each
collector sends its copies independently, so the two reach the analyzer in either order,
often in different batches. The first to arrive waits in the **pending map** until its
partner comes; the pair's delay (receiver copy's capture time minus the sender copy's: the
network between the two observation points, plus the hosts' clock offset) goes to the flow.
A waiting copy is judged by the clock of the host that observed it (``_hostclocks``: the
clock its frame followed, kept in the entry): it waits until that clock has passed it by
more than the window.

The pending map is an open-addressing hash table: rows of ``PENDING`` int64 columns in a
power-of-two number of slots, linear probing, deletion by shifting the probe chain back (no
tombstones). A copy's **identity** is its flow's key hash, its direction and its packet
fingerprint (``columns.Decoded.fingerprint``), all three compared on a match. The rules for
a copy with an identity (``settle``), ``now`` being the clock of the entry it finds, after
the copy:

* No entry: the copy waits (``insert``), if the map has room; else it is counted
  (``overflow``) and never paired.
* An entry older than ``window`` at ``now`` is stale: the copy takes its slot; the entry's
  copy counts as ``unpaired`` (``rebuild`` purges stale entries the same way).
* An entry with the other role, from another host, within ``window`` of the copy: a pair.
  The entry leaves the map; ``paired`` counts pairs.
* An entry the copy cannot pair with (the same role: the packet was sent twice, or two
  packets share a fingerprint; the same host): the entry becomes ambiguous — no copy of that
  identity pairs while it waits — and both copies count as ``ambiguous``, as does every later
  copy that finds it. A copy more than ``window`` older than the entry counts as ``unpaired``.

Whether an entry is stale depends only on the capture times seen (its clock only goes
forward), never on when a purge ran, so the pairs do not depend on how frames are cut into
batches.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from vspan.kernels import kernel

__all__ = [
    "AMBIGUOUS",
    "COUNTERS",
    "HOST_SHIFT",
    "LATE",
    "OVERFLOW",
    "PAIRED",
    "PENDING",
    "SLOT_SHIFT",
    "UNPAIRED",
    "entry_clock",
    "entry_clocks",
    "find",
    "identity",
    "pending_copies",
    "rebuild",
    "settle",
]

I64 = npt.NDArray[np.int64]

PENDING: Final = ("ident", "hash", "fingerprint", "time", "meta")
"""int64 columns of a waiting copy: its identity hash (0: an empty slot), its flow's key
hash, its fingerprint, its capture time, and ``meta``: role (bit 0: 0 sender, 1 receiver),
ambiguous (bit 1), the observing host (bits 8-39) and the slot of its clock (bits 40-55)."""
_IDENT, _HASH, _FP, _TIME, _META = range(len(PENDING))
_ROLE, _AMBIGUOUS, HOST_SHIFT, SLOT_SHIFT = 1, 2, 8, 40
_HOST_BITS, _SLOT_BITS = 0xFFFF_FFFF, 0xFFFF

COUNTERS: Final = ("late_frames", "copies_paired", "copies_unpaired", "copies_ambiguous",
                   "pending_overflow", "clock_resets", "clocks_full_frames")  # fmt: skip
"""The flow table's counters (an int64 array, by index): frames that arrived too late for
their flow (``flows``), pairs of copies, copies that found no partner in time, copies of an
ambiguous identity, copies the full pending map could not take; times a host's time went
back and it got a new clock, frames judged without a clock of their own because the table
of clocks was full (``_hostclocks``)."""
LATE, PAIRED, UNPAIRED, AMBIGUOUS, OVERFLOW, RESETS, CLOCKS_FULL = range(len(COUNTERS))

_SPREAD: Final = np.uint64(0x9E3779B97F4A7C15)
_TOP: Final = np.uint64(63)
"""The direction's bit in an identity (bit 0 is always set)."""


@kernel
def identity(h: np.int64, fingerprint: np.uint64, rev: int) -> np.int64:
    """The identity hash of a copy (never 0): its flow's key hash, fingerprint, direction."""
    key = np.uint64(h) ^ (fingerprint * _SPREAD) ^ (np.uint64(rev) << _TOP)
    return np.int64(key | np.uint64(1))


@kernel
def find(pend: I64, ident: np.int64, h: np.int64, fingerprint: np.int64) -> int:
    """The slot of the entry with this identity, or -1."""
    mask = pend.shape[0] - 1
    pos = ident & mask
    while True:
        e = pend[pos, _IDENT]
        if e == 0:
            return -1
        if e == ident and pend[pos, _HASH] == h and pend[pos, _FP] == fingerprint:
            return pos  # type: ignore[no-any-return]
        pos = (pos + 1) & mask


@kernel
def _put(pend: I64, copy: tuple[np.int64, np.int64, np.int64, np.int64, np.int64]) -> None:
    """Insert ``copy`` (``PENDING`` values; its identity is absent) in the first free slot."""
    mask = pend.shape[0] - 1
    pos = copy[0] & mask
    while pend[pos, _IDENT] != 0:
        pos = (pos + 1) & mask
    for c in range(len(PENDING)):
        pend[pos, c] = copy[c]


@kernel
def _delete(pend: I64, slot: int) -> None:
    """Empty ``slot``, shifting its probe chain back (no tombstones)."""
    mask = pend.shape[0] - 1
    p = slot
    pend[p, :] = 0
    q = p
    while True:
        q = (q + 1) & mask
        e = pend[q, _IDENT]
        if e == 0:
            return
        home = e & mask
        # The entry at q may fill the hole at p unless its home lies cyclically in (p, q].
        stays = (p < home <= q) if p <= q else (home > p or home <= q)
        if not stays:
            pend[p, :] = pend[q, :]
            pend[q, :] = 0
            p = q


@kernel
def settle(
    pend: I64,
    slot: int,
    copy: tuple[np.int64, np.int64, np.int64, np.int64, np.int64],
    clock: tuple[np.int64, int, bool],
    stats: I64,
) -> tuple[int, int, np.int64]:
    """Apply the rules (module docstring) to ``copy`` (its ``PENDING`` values; ``slot`` as
    ``find`` gave it); ``clock``: the time by the clock of the entry found, after the copy
    (any value without one), the window, and whether the map has room for one more.
    Returns (entries added, pairs made, the pair's delay)."""
    now, window, room = clock
    ts, meta = copy[_TIME], copy[_META]
    if slot < 0:
        if not room:
            stats[OVERFLOW] += 1
            return 0, 0, np.int64(0)
        _put(pend, copy)
        return 1, 0, np.int64(0)
    other_time, other = pend[slot, _TIME], pend[slot, _META]
    if now - other_time > window:  # stale: its copy never found a partner
        if not other & _AMBIGUOUS:
            stats[UNPAIRED] += 1
        for c in range(len(PENDING)):
            pend[slot, c] = copy[c]
        return 0, 0, np.int64(0)
    if other & _AMBIGUOUS:
        stats[AMBIGUOUS] += 1
        return 0, 0, np.int64(0)
    if abs(ts - other_time) > window:
        stats[UNPAIRED] += 1
        return 0, 0, np.int64(0)
    same_host = ((other >> HOST_SHIFT) & _HOST_BITS) == ((meta >> HOST_SHIFT) & _HOST_BITS)
    if (other & _ROLE) == (meta & _ROLE) or same_host:
        pend[slot, _META] = other | _AMBIGUOUS
        stats[AMBIGUOUS] += 2
        return 0, 0, np.int64(0)
    delay = ts - other_time if meta & _ROLE else other_time - ts
    _delete(pend, slot)
    stats[PAIRED] += 1
    return -1, 1, np.int64(delay)


@kernel
def entry_clock(pend: I64, slot: int) -> int:
    """The clock slot (``_hostclocks``) of the entry in ``slot``."""
    return int((pend[slot, _META] >> SLOT_SHIFT) & _SLOT_BITS)


@kernel
def rebuild(old: I64, new: I64, clocks: I64, window: np.int64, stats: I64) -> int:
    """Copy the entries of ``old`` that are not stale by their clocks (``clocks``: the time
    by each clock slot) into the empty ``new`` (stale ones count as ``unpaired`` unless
    ambiguous); return how many were copied."""
    n = 0
    for pos in range(old.shape[0]):
        if old[pos, _IDENT] == 0:
            continue
        if clocks[entry_clock(old, pos)] - old[pos, _TIME] > window:
            if not old[pos, _META] & _AMBIGUOUS:
                stats[UNPAIRED] += 1
            continue
        _put(new, (old[pos, 0], old[pos, 1], old[pos, 2], old[pos, 3], old[pos, 4]))
        n += 1
    return n


def entry_clocks(pend: I64) -> npt.NDArray[np.int64]:
    """The clock slots of the entries of the map (its empty slots left out)."""
    used = pend[pend[:, _IDENT] != 0, _META]
    out: npt.NDArray[np.int64] = (used >> SLOT_SHIFT) & _SLOT_BITS
    return out


def pending_copies(pend: I64) -> int:
    """Copies waiting that are not ambiguous (those count as ``unpaired`` at a flush)."""
    waiting = (pend[:, _IDENT] != 0) & ((pend[:, _META] & _AMBIGUOUS) == 0)
    return int(np.count_nonzero(waiting))
