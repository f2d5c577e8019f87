"""Per-collector accounting of tunnel messages: loss, duplicates, replays, restarts — and
the decision, per message, to ingest it or drop it.

Each (``collector_id``, ``boot_id``) is one sequence (``spec/tunnel.md``, "Loss"), a
``StreamStats``. A message ``d = (seq - highest) mod 2^32`` ahead is:

* ``0 < d < 2^31``: in order, or after a gap of ``d - 1`` messages counted as ``lost``;
* a seq behind ``highest`` within ``WINDOW`` already received: a ``duplicate`` — dropped;
* behind ``highest`` within the window, not received yet: ``reordered``; it had been counted
  as lost (unless it precedes the stream's first message) and is taken back;
* behind ``highest`` by ``WINDOW`` or more: ``stale`` (too old to tell a late message from
  a replay) — dropped.

``update`` takes one ``Ingested`` batch and returns the mask of the messages to ingest:
valid, and neither duplicate, stale nor of a refused boot. Messages are grouped per
sequence with numpy, and a sequence whose messages only move forward (the common case,
gaps allowed) is applied in one vectorized step; only a batch that goes backwards within a
sequence is walked message by message.

**Boots and replays.** A new ``boot_id`` for a known ``collector_id`` is a restart. For a
collector with a key, whose messages are authenticated, ``boot_id`` must increase: vspan's
collectors take the time of their start (``collectors/forward/forwarder.py``), and a boot whose
sequence is not tracked and which is not newer (modulo 2^32, as seqs are) than the
collector's current boot is a replay of an old boot: its messages are dropped and counted as
``stale_boot``. Together with the duplicate window this means that, while the analyzer
runs, an authenticated message is ingested at most once, whatever is replayed and when.
Collectors without a key are not authenticated, so nothing stops anyone from sending in
their name; their boots are taken as they come.

**Across a restart of the analyzer** ``restore`` brings back what the store saved (the
counters, every 10 s and at stop): each collector's current sequence with its counters and
highest seq, and for a keyed collector its current boot, so older boots stay refused. The
first message of a restored sequence then reveals the messages the collector sent while the
analyzer was not receiving: that gap is counted as ``missed_while_down``, neither ``lost``
(the network) nor ``kernel``. After a crash the last save is up to its interval old, so the
messages received between it and the crash count as missed too. A collector that comes
back with a new boot has nothing missed (its new sequence starts at its first message), one
that does not come back nothing counted. The seq window is not saved, so up to ``WINDOW``
messages of the current boot sent before the restart could be taken once more as late ones
if replayed then.

**Where a message went missing**: a gap in a sequence is a message the analyzer never got,
lost on the network *or* dropped by the analyzer's own socket when its buffer was full. The
UDP receiver knows how many datagrams its kernel dropped before each chunk (``SO_RXQ_OVFL``),
and ``update`` takes that count: the gaps that batch reveals are charged to it first
(``kernel``, per stream), and only the rest to the network (``lost``). A datagram dropped by
the kernel shows as a gap when its stream's next message arrives, which may be a later
chunk, so uncharged kernel drops are carried over (for ``KERNEL_CARRY_S`` seconds, after
which what is left was drops of invalid or unaccounted datagrams). The kernel does not say
whose datagrams it dropped; when several collectors have gaps in one batch, the drops go to
the streams in order of their first message in it — the total charged to the analyzer is
exact, its split among collectors a best assignment.

**Bounded state** (``AccountingConfig``, every eviction counted in ``counters()``): a
collector gets its own counters once it is *accepted* — it has a key, is registered (the
``known`` mask of ``Ingested``), or sent a valid message; invalid messages of any other
collector id are counted under collector 0 (``UNKNOWN_COLLECTOR``, as those without a
readable header), so hostile ids make no new series. At most ``max_collectors`` collectors
without a key are tracked (the least recently seen are forgotten), at most ``max_streams``
sequences (the least recently seen are forgotten, but never a keyed collector's current
one: forgetting it would let its recent messages be replayed), and a collector's older
boots are forgotten once its current boot has been active for ``boot_grace_s``. The
counters of a forgotten sequence stay in its collector's sums, those of a forgotten
collector in ``totals()``. Time is the caller's ``now`` (seconds); nothing here reads a
clock.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.ingest._stream import (
    COUNTS,
    MOD,
    STREAM_COLUMNS,
    WINDOW,
    CollectorStats,
    StreamStats,
    newer_boot,
)
from vspan.analysis.ingest.messages import REASON_CODES, REASON_NAMES, Ingested

__all__ = [
    "SAVED_COLUMNS",
    "UNKNOWN_COLLECTOR",
    "WINDOW",
    "Accounting",
    "AccountingConfig",
    "CollectorStats",
    "StreamStats",
]

UNKNOWN_COLLECTOR: Final = 0
"""Where invalid messages of collectors not accepted (or without a readable header) count."""
KERNEL_CARRY_S: Final = 10.0
"""How long kernel drops not yet matched by a sequence gap wait for one."""
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    """Bounds of the accounting's state."""

    max_collectors: int = 4096
    """Collectors without a key tracked with their own counters; beyond, the least
    recently seen is forgotten (``collectors_evicted``)."""
    max_streams: int = 4096
    """(collector, boot) sequences tracked (about 1.3 KB each); beyond, the least recently
    seen is forgotten (``streams_evicted``), never a keyed collector's current boot."""
    boot_grace_s: float = 60.0
    """A collector's older boots are forgotten once its current boot is this old
    (seconds): late messages of the old boot are still told from replays until then."""

    def __post_init__(self) -> None:
        for name in ("max_collectors", "max_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: need at least 1")
        if self.boot_grace_s < 0:
            raise ValueError(f"boot_grace_s {self.boot_grace_s}: must not be negative")


SAVED_COLUMNS: Final = ("collector_id", "boot_id", "highest", "last_seen", *COUNTS)
"""What ``restore`` reads of a saved sequence (``highest`` null: its boot only)."""


class Accounting:
    """Accounting of every message the receivers hand over (thread-safe snapshots)."""

    def __init__(self, config: AccountingConfig | None = None) -> None:
        self.config = config or AccountingConfig()
        self._streams: dict[tuple[int, int], StreamStats] = {}
        self._collectors: dict[int, CollectorStats] = {}
        self._retired = dict.fromkeys((*COUNTS, "restarts", "invalid", "stale_boot"), 0)
        self._several_boots: set[int] = set()
        """Collectors with more than one tracked boot."""
        self._now = 0.0
        """The latest ``now`` given."""
        self._lock = threading.Lock()
        self._kernel_pending = 0
        """Kernel drops not yet matched by a sequence gap."""
        self._kernel_since = 0.0
        """``now`` of the oldest of them."""
        self.kernel_unmatched = 0
        """Kernel drops no sequence gap matched within ``KERNEL_CARRY_S`` (drops of invalid
        datagrams, or of streams that sent nothing since)."""
        self.streams_evicted = 0
        """Sequences forgotten (cap, older boot, or their collector forgotten)."""
        self.collectors_evicted = 0
        """Collectors without a key forgotten because ``max_collectors`` were tracked."""

    def update(self, ing: Ingested, now: float, *, kernel_drops: int = 0) -> Mask:
        """Count one batch of messages received at ``now`` (seconds); the messages to ingest.
        ``kernel_drops``: datagrams the analyzer's socket dropped before the batch's last one."""
        accepted = np.zeros(len(ing), np.bool_)
        with self._lock:
            self._now = max(self._now, now)
            if kernel_drops > 0:
                if self._kernel_pending == 0:
                    self._kernel_since = now
                self._kernel_pending += kernel_drops
            self._expire_boots()
            v = np.flatnonzero(ing.valid)
            if v.size:
                self._valid(ing, v, now, accepted)
            bad = ~ing.valid
            if bad.any():
                self._invalid(ing.collector_id[bad], ing.reason[bad], ing.known[bad], now)
            if self._kernel_pending and now - self._kernel_since > KERNEL_CARRY_S:
                self.kernel_unmatched += self._kernel_pending
                self._kernel_pending = 0
            self._bound()
        return accepted

    def _charge_kernel(self, stream: StreamStats, lost: int, missed: int) -> None:
        """Charge new gaps of ``stream`` to pending kernel drops: first the ``missed`` ones
        found at the analyzer's restart (what its socket dropped since its start was among
        them), then the ``lost`` ones."""
        for name, gaps in (("missed_while_down", missed), ("lost", lost)):
            take = min(gaps, self._kernel_pending)
            if take > 0:
                setattr(stream, name, getattr(stream, name) - take)
                stream.kernel += take
                self._kernel_pending -= take

    def add_rejected(
        self,
        collector_id: int,
        reason: str,
        *,
        messages: int = 1,
        known: bool = True,
        now: float | None = None,
    ) -> None:
        """Count messages rejected before ingest (a TCP stream's decoder) under ``reason``.
        ``known``: the collector has a key or is registered; the engine says False for any
        other, which is then counted under collector 0 unless already tracked. ``now``:
        when (default: the latest update's)."""
        if reason not in REASON_CODES:
            raise ValueError(f"unknown reason {reason!r}; expected one of {REASON_NAMES[1:]}")
        with self._lock:
            if now is not None:
                self._now = max(self._now, now)
            tracked = known or collector_id in self._collectors
            cid = collector_id if tracked else UNKNOWN_COLLECTOR
            stats = self._collector(cid, self._now if now is None else now)
            stats.invalid[reason] = stats.invalid.get(reason, 0) + messages
            self._bound()

    def restore(self, saved: pd.DataFrame, now: float, *, keyed: Collection[int] = ()) -> int:
        """Bring back the sequences saved before a restart of the analyzer (``SAVED_COLUMNS``,
        one row per collector: its current boot). The newest (by ``last_seen``) first, at
        most ``max_streams``; a row without ``highest`` brings back only the boot of a keyed
        collector. Collectors in ``keyed`` have a key: their boot is restored in any case.
        Returns the sequences restored."""
        keyed = set(keyed)
        order = saved.sort_values("last_seen", ascending=False, na_position="last", kind="stable")
        restored = 0
        with self._lock:
            for row in order.to_dict(orient="records"):
                cid, boot, highest = int(row["collector_id"]), int(row["boot_id"]), row["highest"]
                seen = now if pd.isna(row["last_seen"]) else float(row["last_seen"])
                has_key = cid in keyed
                stream = not pd.isna(highest) and restored < self.config.max_streams
                if not (stream or has_key) or (cid, boot) in self._streams:
                    continue
                col = self._collector(cid, seen)
                col.keyed |= has_key
                if col.current is None:
                    col.current, col.current_since = boot, now
                if not stream:
                    continue
                self._streams[(cid, boot)] = StreamStats.resumed_from(row, now, seen)
                col.boots.add(boot)
                col.boot_id, col.last_seen = boot, seen
                restored += 1
            self._bound()
        return restored

    # --- counting (lock held) -----------------------------------------------------------

    def _collector(self, cid: int, now: float) -> CollectorStats:
        stats = self._collectors.get(cid)
        if stats is None:
            stats = self._collectors[cid] = CollectorStats(cid)
        stats.touched = max(stats.touched, now)
        return stats

    def _invalid(self, collector: npt.NDArray[np.uint32], reason: npt.NDArray[np.uint8],
                 known: Mask, now: float) -> None:  # fmt: skip
        tracked = np.fromiter(self._collectors, np.int64, count=len(self._collectors))
        own = known | np.isin(collector, tracked)
        key = (np.where(own, collector, UNKNOWN_COLLECTOR).astype(np.int64) << 8) | reason
        uniq, counts = np.unique(key, return_counts=True)
        for k, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            stats = self._collector(k >> 8, now)
            name = REASON_NAMES[k & 0xFF]
            stats.invalid[name] = stats.invalid.get(name, 0) + c

    def _valid(self, ing: Ingested, v: I64, now: float, accepted: Mask) -> None:
        cid = ing.collector_id[v].astype(np.int64)
        boot = ing.boot_id[v].astype(np.int64)
        uniq, first, inverse = np.unique((cid << 32) | boot, return_index=True, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # messages grouped, arrival order kept
        bounds = np.zeros(uniq.size + 1, np.int64)
        np.cumsum(np.bincount(inverse, minlength=uniq.size), out=bounds[1:])
        rows = v[order]  # message index of each grouped position
        seqs = ing.seq[rows].astype(np.int64)
        keyed = ing.authenticated[v][first].tolist()
        starts, keys = bounds.tolist(), uniq.tolist()
        one_seq, one_count, one_size = (  # single-message groups take a scalar path
            a.tolist() for a in (seqs, ing.count[rows], ing.size[rows])
        )
        for g in np.argsort(first).tolist():  # sequences in order of first appearance
            lo, hi, key = starts[g], starts[g + 1], keys[g]
            col = self._collector(key >> 32, now)
            col.keyed |= keyed[g]
            stream = self._stream(col, key & 0xFFFF_FFFF, one_seq[lo], now)
            if stream is None:  # an old boot of an authenticated collector: a replay
                col.stale_boot += hi - lo
                continue
            stream.last_seen = now
            lost_before, missed_before = stream.lost, stream.missed_while_down
            if hi - lo == 1:
                if stream.observe_one(one_seq[lo]):
                    accepted[rows[lo]] = True
                    stream.frames += one_count[lo]
                    stream.bytes += one_size[lo]
                self._charge_kernel(stream, stream.lost - lost_before,
                                    stream.missed_while_down - missed_before)  # fmt: skip
                continue
            at = rows[lo:hi]
            ok = stream.observe(seqs[lo:hi])
            self._charge_kernel(stream, stream.lost - lost_before,
                                stream.missed_while_down - missed_before)  # fmt: skip
            accepted[at] = ok
            stream.frames += int(ing.count[at[ok]].sum())
            stream.bytes += int(ing.size[at[ok]].sum())
        live = np.flatnonzero(accepted[v])  # each collector's latest accepted message
        _, latest = np.unique(cid[live][::-1], return_index=True)
        pick = live[live.size - 1 - latest]
        for c, b in zip(cid[pick].tolist(), boot[pick].tolist(), strict=True):
            col = self._collectors[c]
            col.boot_id, col.last_seen = b, now

    def _stream(self, col: CollectorStats, boot: int, first_seq: int, now: float
                ) -> StreamStats | None:  # fmt: skip
        """The sequence's state (a new one starts just before ``first_seq``); ``None`` for an
        old boot of an authenticated collector."""
        stream = self._streams.get((col.collector_id, boot))
        if stream is not None:
            return stream
        if col.current is not None and boot != col.current:
            if col.keyed and not newer_boot(boot, col.current):
                return None
            col.restarts += 1
        col.boots.add(boot)
        if len(col.boots) > 1:
            self._several_boots.add(col.collector_id)
        col.current, col.current_since = boot, now
        stream = StreamStats(
            col.collector_id, boot, highest=(first_seq - 1) % MOD, first_seen=now, last_seen=now
        )
        stream.span = -1  # the step onto the first seq makes it 0
        self._streams[(col.collector_id, boot)] = stream
        return stream

    # --- bounds (lock held) -------------------------------------------------------------

    def _expire_boots(self) -> None:
        """Forget collectors' older boots once their current one is ``boot_grace_s`` old."""
        for cid in list(self._several_boots):
            col = self._collectors[cid]
            if self._now - col.current_since >= self.config.boot_grace_s:
                for boot in [b for b in col.boots if b != col.current]:
                    self._forget_stream(col, boot)

    def _bound(self) -> None:
        cfg = self.config
        self._expire_boots()
        if len(self._collectors) > cfg.max_collectors:  # else no need to look closer
            others = [c for c in self._collectors.values() if not c.keyed and c.collector_id]
            others.sort(key=lambda c: c.touched)
            for col in others[: max(0, len(others) - cfg.max_collectors)]:
                self._forget_collector(col)
        if len(self._streams) > cfg.max_streams:
            spare = sorted(
                (s for s in self._streams.values() if not self._protected(s)),
                key=lambda s: s.last_seen,
            )
            for s in spare[: len(self._streams) - cfg.max_streams]:
                self._forget_stream(self._collectors[s.collector_id], s.boot_id)

    def _protected(self, stream: StreamStats) -> bool:
        """A keyed collector's current sequence: forgetting it would let it be replayed."""
        col = self._collectors[stream.collector_id]
        return col.keyed and col.current == stream.boot_id

    def _forget_stream(self, col: CollectorStats, boot: int) -> None:
        stream = self._streams.pop((col.collector_id, boot))
        col.boots.discard(boot)
        if len(col.boots) <= 1:
            self._several_boots.discard(col.collector_id)
        for name in COUNTS:
            col.retired[name] += getattr(stream, name)
        self.streams_evicted += 1

    def _forget_collector(self, col: CollectorStats) -> None:
        for boot in list(col.boots):
            self._forget_stream(col, boot)
        for name in COUNTS:
            self._retired[name] += col.retired[name]
        self._retired["restarts"] += col.restarts
        self._retired["invalid"] += sum(col.invalid.values())
        self._retired["stale_boot"] += col.stale_boot
        del self._collectors[col.collector_id]
        self.collectors_evicted += 1

    # --- snapshots ----------------------------------------------------------------------

    def stream(self, collector_id: int, boot_id: int) -> StreamStats | None:
        """The live state of one sequence (read-only by convention)."""
        return self._streams.get((collector_id, boot_id))

    def collector(self, collector_id: int) -> CollectorStats | None:
        """The live state of one collector (read-only by convention)."""
        return self._collectors.get(collector_id)

    def streams(self) -> pd.DataFrame:
        """One row per tracked (``collector_id``, ``boot_id``)."""
        with self._lock:
            rows = [[getattr(s, c) for c in STREAM_COLUMNS] for s in self._streams.values()]
        return pd.DataFrame(rows, columns=list(STREAM_COLUMNS))

    def invalid(self) -> pd.DataFrame:
        """Invalid messages: ``collector_id`` (0: not accepted, or header unreadable),
        ``reason``, ``messages``."""
        with self._lock:
            rows = [
                (c.collector_id, reason, n)
                for c in self._collectors.values()
                for reason, n in sorted(c.invalid.items())
            ]
        return pd.DataFrame(rows, columns=["collector_id", "reason", "messages"])

    def collectors(self) -> pd.DataFrame:
        """One row per tracked collector: its current boot, restarts, drops of old boots and
        the sums of its sequences (forgotten ones included)."""
        streams = self.streams()
        with self._lock:
            head = pd.DataFrame(
                [
                    (c.collector_id, c.boot_id, c.restarts, sum(c.invalid.values()),
                     c.stale_boot, c.last_seen, *(c.retired[n] for n in COUNTS))
                    for c in self._collectors.values()
                ],
                columns=["collector_id", "boot_id", "restarts", "invalid", "stale_boot",
                         "last_seen", *(f"_{n}" for n in COUNTS)],
            )  # fmt: skip
        sums = streams.groupby("collector_id", as_index=False)[list(COUNTS)].sum()
        out = head.merge(sums, on="collector_id", how="left")
        out = out.fillna(dict.fromkeys(COUNTS, 0))
        for name in COUNTS:
            out[name] = (out[name] + out.pop(f"_{name}")).astype(np.int64)
        return out.sort_values("collector_id", ignore_index=True)

    def totals(self) -> dict[str, int]:
        """Sums over every collector, forgotten ones included (for metrics)."""
        streams = self.streams()
        with self._lock:
            out = {c: int(streams[c].sum()) + self._retired[c] for c in COUNTS}
            cols = list(self._collectors.values())
            for name in COUNTS:
                out[name] += sum(c.retired[name] for c in cols)
            out["restarts"] = sum(c.restarts for c in cols) + self._retired["restarts"]
            out["invalid"] = sum(sum(c.invalid.values()) for c in cols) + self._retired["invalid"]
            out["stale_boot"] = sum(c.stale_boot for c in cols) + self._retired["stale_boot"]
        return out

    def counters(self) -> dict[str, int]:
        """What the bounds cost: sequences and collectors tracked and forgotten."""
        with self._lock:
            return {
                "streams": len(self._streams),
                "streams_evicted": self.streams_evicted,
                "collectors_tracked": len(self._collectors),
                "collectors_evicted": self.collectors_evicted,
            }
