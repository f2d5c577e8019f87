"""Per-collector accounting of tunnel messages: loss, duplicates, reordering, restarts.

Each (``collector_id``, ``boot_id``) is one sequence (``spec/tunnel.md``, "Loss"). Its
state is the highest ``seq`` seen and a ring of the last ``WINDOW`` seqs received, indexed
by ``seq % WINDOW`` (``WINDOW`` divides 2^32, so wrap-around needs no care). A message
``d = (seq - highest) mod 2^32`` ahead:

* ``0 < d < 2^31``: in order, or after a gap of ``d - 1`` messages counted as ``lost``;
* ``d == 0`` or a seq behind ``highest`` within the window already in the ring: ``duplicates``;
* behind ``highest`` within the window, not in the ring: ``reordered``; it had been counted
  as lost (unless it precedes the stream's first message) and is taken back;
* behind ``highest`` by ``WINDOW`` or more: ``stale`` (too old to tell a late message from
  a duplicate).

``update`` takes one ``Ingested`` batch. Messages are grouped per sequence with numpy, and
a sequence whose messages only move forward (the common case, gaps allowed) is applied in
one vectorized step; only a batch that goes backwards within a sequence is walked message
by message. A new ``boot_id`` for a known ``collector_id`` is a restart. Invalid messages
are counted by reason under their collector when the header was readable, else under
collector 0. Time is the caller's ``now`` (seconds); nothing here reads a clock.

Where a message went missing: a gap in a sequence is a message the analyzer never got, lost
on the network *or* dropped by the analyzer's own socket when its buffer was full. The UDP
receiver knows how many datagrams its kernel dropped before each chunk (``SO_RXQ_OVFL``), and
``update`` takes that count: the gaps that batch reveals are charged to it first
(``kernel``, per stream), and only the rest to the network (``lost``). A datagram dropped by
the kernel shows as a gap when its stream's next message arrives, which may be a later
chunk, so uncharged kernel drops are carried over (for ``KERNEL_CARRY_S`` seconds, after
which what is left was drops of invalid or unaccounted datagrams). The kernel does not say
whose datagrams it dropped; when several collectors have gaps in one batch, the drops go to
the streams in order of their first message in it — the total charged to the analyzer is
exact, its split among collectors a best assignment.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.ingest import REASON_CODES, REASON_NAMES, Ingested

__all__ = ["UNKNOWN_COLLECTOR", "WINDOW", "Accounting", "CollectorStats", "StreamStats"]

WINDOW: Final = 1024
"""Seqs behind the highest that are still told apart as duplicate or reordered."""
UNKNOWN_COLLECTOR: Final = 0
"""Where invalid messages without a readable header are counted."""
KERNEL_CARRY_S: Final = 10.0
"""How long kernel drops not yet matched by a sequence gap wait for one."""
_MOD: Final = 1 << 32
_HALF: Final = 1 << 31
I64 = npt.NDArray[np.int64]


@dataclass(slots=True, eq=False)
class StreamStats:
    """Counters of one (``collector_id``, ``boot_id``) sequence."""

    collector_id: int
    boot_id: int
    highest: int
    """Highest seq seen (modulo 2^32)."""
    first_seen: float
    last_seen: float
    received: int = 0
    """Valid messages, duplicates included: expected = received - duplicates + lost +
    kernel."""
    lost: int = 0
    """Seqs skipped over and not (yet) received, less those charged to ``kernel``: what
    the network lost."""
    kernel: int = 0
    """Seqs skipped over because the analyzer's socket dropped them (its buffer was full)."""
    duplicates: int = 0
    reordered: int = 0
    """Messages that arrived after a higher seq (each one taken back from ``lost``)."""
    stale: int = 0
    """Messages more than ``WINDOW`` behind the highest seq."""
    frames: int = 0
    bytes: int = 0
    """Bytes of valid messages (whole datagrams)."""
    span: int = 0
    """Seqs from the stream's first message to ``highest``, capped at ``WINDOW``."""
    seen: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(WINDOW, np.bool_))

    def observe(self, seqs: I64) -> None:
        """Apply the seqs of one batch, in arrival order."""
        k = seqs.size
        prev = np.empty(k, np.int64)
        prev[0] = self.highest
        prev[1:] = seqs[:-1]
        step = (seqs - prev) % _MOD
        if (step > 0).all() and (step < _HALF).all():  # only forward: one vectorized step
            advance = int(step.sum())
            self.lost += advance - k
            self._clear(advance)
            self.highest = int(seqs[-1])
            recent = seqs[(self.highest - seqs) % _MOD < WINDOW]
            self.seen[recent % WINDOW] = True
            self.span = min(WINDOW, self.span + advance)
            self.received += k
            return
        for s in seqs.tolist():
            self._one(s)

    def _clear(self, advance: int) -> None:
        """Forget the ring slots of the ``advance`` seqs after ``highest`` (they are new)."""
        if advance >= WINDOW:
            self.seen[:] = False
            return
        start = (self.highest + 1) % WINDOW
        end = start + advance
        self.seen[start : min(end, WINDOW)] = False
        if end > WINDOW:
            self.seen[: end - WINDOW] = False

    def _one(self, s: int) -> None:
        self.received += 1
        ahead = (s - self.highest) % _MOD
        if 0 < ahead < _HALF:
            self.lost += ahead - 1
            self._clear(ahead)
            self.seen[s % WINDOW] = True
            self.highest = s
            self.span = min(WINDOW, self.span + ahead)
            return
        back = (self.highest - s) % _MOD
        if back >= WINDOW:
            self.stale += 1
        elif self.seen[s % WINDOW]:
            self.duplicates += 1
        else:
            self.seen[s % WINDOW] = True
            self.reordered += 1
            if back < self.span:  # after the stream's first message: it was counted missing
                if self.lost > 0:
                    self.lost -= 1
                else:  # it was charged to the kernel, wrongly: it was only late
                    self.kernel -= 1


@dataclass(slots=True, eq=False)
class CollectorStats:
    """Counters of one collector over all its boots."""

    collector_id: int
    boot_id: int | None = None
    """The boot of its latest valid message."""
    boots: set[int] = field(default_factory=set)
    restarts: int = 0
    """New ``boot_id`` values after the first."""
    invalid: dict[str, int] = field(default_factory=dict)
    """Invalid messages by reason."""
    last_seen: float | None = None
    """``now`` of its latest valid message."""


_SUMMED: Final = (
    "received", "lost", "kernel", "duplicates", "reordered", "stale", "frames", "bytes",
)  # fmt: skip
"""The stream counters summed per collector."""
_STREAM_COLUMNS: Final = tuple(
    f.name for f in fields(StreamStats) if f.name not in {"seen", "span"}
)


class Accounting:
    """Accounting of every message the receivers hand over (thread-safe snapshots)."""

    def __init__(self) -> None:
        self._streams: dict[tuple[int, int], StreamStats] = {}
        self._collectors: dict[int, CollectorStats] = {}
        self._lock = threading.Lock()
        self._kernel_pending = 0
        """Kernel drops not yet matched by a sequence gap."""
        self._kernel_since = 0.0
        """``now`` of the oldest of them."""
        self.kernel_unmatched = 0
        """Kernel drops no sequence gap matched within ``KERNEL_CARRY_S`` (drops of invalid
        datagrams, or of streams that sent nothing since)."""

    def update(self, ing: Ingested, now: float, *, kernel_drops: int = 0) -> None:
        """Count one batch of messages received at ``now`` (seconds); ``kernel_drops``:
        datagrams the analyzer's socket dropped before the batch's last one."""
        with self._lock:
            if kernel_drops > 0:
                if self._kernel_pending == 0:
                    self._kernel_since = now
                self._kernel_pending += kernel_drops
            self._invalid(ing.collector_id[~ing.valid], ing.reason[~ing.valid])
            v = np.flatnonzero(ing.valid)
            if v.size:
                self._valid(ing, v, now)
            if self._kernel_pending and now - self._kernel_since > KERNEL_CARRY_S:
                self.kernel_unmatched += self._kernel_pending
                self._kernel_pending = 0

    def _charge_kernel(self, stream: StreamStats, gaps: int) -> None:
        """Charge up to ``gaps`` new gaps of ``stream`` to pending kernel drops."""
        take = min(gaps, self._kernel_pending)
        if take > 0:
            stream.lost -= take
            stream.kernel += take
            self._kernel_pending -= take

    def add_rejected(self, collector_id: int, reason: str, *, messages: int = 1) -> None:
        """Count messages rejected before ingest (a TCP stream's decoder) under ``reason``."""
        if reason not in REASON_CODES:
            raise ValueError(f"unknown reason {reason!r}; expected one of {REASON_NAMES[1:]}")
        with self._lock:
            stats = self._collector(collector_id)
            stats.invalid[reason] = stats.invalid.get(reason, 0) + messages

    def _collector(self, cid: int) -> CollectorStats:
        stats = self._collectors.get(cid)
        if stats is None:
            stats = self._collectors[cid] = CollectorStats(cid)
        return stats

    def _invalid(self, collector: npt.NDArray[np.uint32], reason: npt.NDArray[np.uint8]) -> None:
        if collector.size == 0:
            return
        key = (collector.astype(np.int64) << 8) | reason
        uniq, counts = np.unique(key, return_counts=True)
        for k, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            stats = self._collector(k >> 8)
            name = REASON_NAMES[k & 0xFF]
            stats.invalid[name] = stats.invalid.get(name, 0) + c

    def _valid(self, ing: Ingested, v: I64, now: float) -> None:
        cid = ing.collector_id[v].astype(np.int64)
        boot = ing.boot_id[v].astype(np.int64)
        uniq, first, inverse = np.unique((cid << 32) | boot, return_index=True, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # messages grouped, arrival order kept
        bounds = np.zeros(uniq.size + 1, np.int64)
        np.cumsum(np.bincount(inverse, minlength=uniq.size), out=bounds[1:])
        frames = np.bincount(inverse, weights=ing.count[v], minlength=uniq.size)
        size = np.bincount(inverse, weights=ing.size[v], minlength=uniq.size)
        last = np.zeros(uniq.size, np.int64)
        np.maximum.at(last, inverse, np.arange(v.size))
        seqs = ing.seq[v].astype(np.int64)[order]
        for g in np.argsort(first).tolist():  # sequences in order of first appearance
            key = int(uniq[g])
            group = seqs[bounds[g] : bounds[g + 1]]
            stream = self._stream(key >> 32, key & 0xFFFF_FFFF, int(group[0]), now)
            lost_before = stream.lost
            stream.observe(group)
            self._charge_kernel(stream, stream.lost - lost_before)
            stream.frames += int(frames[g])
            stream.bytes += int(size[g])
            stream.last_seen = now
        latest: dict[int, tuple[int, int]] = {}
        for g in range(uniq.size):
            key, at = int(uniq[g]), int(last[g])
            if at >= latest.get(key >> 32, (-1, 0))[0]:
                latest[key >> 32] = (at, key & 0xFFFF_FFFF)
        for c, (_, b) in latest.items():
            stats = self._collector(c)
            stats.boot_id, stats.last_seen = b, now

    def _stream(self, cid: int, boot: int, first_seq: int, now: float) -> StreamStats:
        """The sequence's state; a new one starts just before ``first_seq``."""
        stream = self._streams.get((cid, boot))
        if stream is not None:
            return stream
        col = self._collector(cid)
        if col.boots:
            col.restarts += 1
        col.boots.add(boot)
        stream = StreamStats(
            cid, boot, highest=(first_seq - 1) % _MOD, first_seen=now, last_seen=now
        )
        stream.span = -1  # the step onto the first seq makes it 0
        self._streams[(cid, boot)] = stream
        return stream

    # --- snapshots ----------------------------------------------------------------------

    def stream(self, collector_id: int, boot_id: int) -> StreamStats | None:
        """The live state of one sequence (read-only by convention)."""
        return self._streams.get((collector_id, boot_id))

    def collector(self, collector_id: int) -> CollectorStats | None:
        """The live state of one collector (read-only by convention)."""
        return self._collectors.get(collector_id)

    def streams(self) -> pd.DataFrame:
        """One row per (``collector_id``, ``boot_id``)."""
        with self._lock:
            rows = [[getattr(s, c) for c in _STREAM_COLUMNS] for s in self._streams.values()]
        return pd.DataFrame(rows, columns=list(_STREAM_COLUMNS))

    def invalid(self) -> pd.DataFrame:
        """Invalid messages: ``collector_id`` (0: header unreadable), ``reason``, ``messages``."""
        with self._lock:
            rows = [
                (c.collector_id, reason, n)
                for c in self._collectors.values()
                for reason, n in sorted(c.invalid.items())
            ]
        return pd.DataFrame(rows, columns=["collector_id", "reason", "messages"])

    def collectors(self) -> pd.DataFrame:
        """One row per collector: its current boot, restarts and the sums of its streams."""
        streams = self.streams()
        with self._lock:
            head = pd.DataFrame(
                [
                    (c.collector_id, c.boot_id, c.restarts, sum(c.invalid.values()), c.last_seen)
                    for c in self._collectors.values()
                ],
                columns=["collector_id", "boot_id", "restarts", "invalid", "last_seen"],
            )
        sums = streams.groupby("collector_id", as_index=False)[list(_SUMMED)].sum()
        out = head.merge(sums, on="collector_id", how="left")
        return out.fillna(dict.fromkeys(sums.columns, 0)).sort_values(
            "collector_id", ignore_index=True
        )

    def totals(self) -> dict[str, int]:
        """Sums over every collector (for metrics)."""
        streams = self.streams()
        out = {c: int(streams[c].sum()) for c in _SUMMED}
        with self._lock:
            out["restarts"] = sum(c.restarts for c in self._collectors.values())
            out["invalid"] = sum(sum(c.invalid.values()) for c in self._collectors.values())
        return out
