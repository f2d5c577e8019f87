"""The accounting's counters: one (``collector_id``, ``boot_id``) sequence
(``StreamStats``) and one collector over its boots (``CollectorStats``).

Part of ``analysis.accounting`` (import from there; its docstring describes the rules). The
state is the highest ``seq`` seen and a ring of the last ``WINDOW`` seqs received, indexed
by ``seq % WINDOW`` (``WINDOW`` divides 2^32, so wrap-around needs no care). ``observe``
applies the seqs of one batch and says, per message, whether it is accepted (new) or
dropped (a duplicate, or ``stale``: too far behind to tell). A stream brought back at the
analyzer's start (``resumed``) charges the gap before its next message to
``missed_while_down``, not to ``lost``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "COUNTS",
    "HALF",
    "MOD",
    "STREAM_COLUMNS",
    "WINDOW",
    "CollectorStats",
    "StreamStats",
    "newer_boot",
]

WINDOW: Final = 1024
"""Seqs behind the highest that are still told apart as duplicate or reordered."""
MOD: Final = 1 << 32
HALF: Final = 1 << 31
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


@dataclass(slots=True, eq=False)
class StreamStats:
    """Counters of one (``collector_id``, ``boot_id``) sequence."""

    collector_id: int
    boot_id: int
    highest: int
    """Highest seq seen (modulo 2^32)."""
    first_seen: float
    """``now`` when this analyzer began to track it (its start, for a restored one)."""
    last_seen: float
    received: int = 0
    """Valid messages, dropped ones included: expected = received - duplicates - stale +
    lost + kernel."""
    lost: int = 0
    """Seqs skipped over and not (yet) received, less those charged to ``kernel``: what
    the network lost."""
    kernel: int = 0
    """Seqs skipped over because the analyzer's socket dropped them (its buffer was full)."""
    duplicates: int = 0
    """Messages whose seq was already received (dropped, not ingested)."""
    reordered: int = 0
    """Messages that arrived after a higher seq (each one taken back from ``lost``)."""
    stale: int = 0
    """Messages ``WINDOW`` or more behind the highest seq (dropped, not ingested)."""
    missed_while_down: int = 0
    """Seqs skipped over by the first message after the analyzer restarted: sent while it was
    not receiving (or received after its last counters save, if it crashed)."""
    frames: int = 0
    """Frames of the accepted messages."""
    bytes: int = 0
    """Bytes of the accepted messages (whole datagrams)."""
    span: int = 0
    """Seqs from the stream's first message to ``highest``, capped at ``WINDOW``."""
    resumed: bool = False
    """Restored at the analyzer's start, and no message has moved it forward since: the next
    step forward is over the messages the analyzer missed while it was down."""
    missed_gap: tuple[int, int] | None = None
    """(``highest`` when restored, the first seq after it): the seqs counted as missed."""
    seen: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(WINDOW, np.bool_))

    @classmethod
    def resumed_from(cls, row: Mapping[Any, Any], now: float, seen: float) -> StreamStats:
        """A sequence as saved before a restart (``accounting.SAVED_COLUMNS``): its highest
        seq and counters, ``resumed`` (the next gap is ``missed_while_down``)."""
        stream = cls(int(row["collector_id"]), int(row["boot_id"]), highest=int(row["highest"]),
                     first_seen=now, last_seen=seen, resumed=True)  # fmt: skip
        for name in COUNTS:
            value = row[name]
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            setattr(stream, name, 0 if missing else int(value))
        return stream

    def observe(self, seqs: I64) -> Mask:
        """Apply the seqs of one batch, in arrival order; which messages are accepted."""
        k = seqs.size
        prev = np.empty(k, np.int64)
        prev[0] = self.highest
        prev[1:] = seqs[:-1]
        step = (seqs - prev) % MOD
        if (step > 0).all() and (step < HALF).all():  # only forward: one vectorized step
            advance = int(step.sum())
            self.lost += advance - k - self._resume(int(seqs[0]), int(step[0]))
            self._clear(advance)
            self.highest = int(seqs[-1])
            recent = seqs[(self.highest - seqs) % MOD < WINDOW]
            self.seen[recent % WINDOW] = True
            self.span = min(WINDOW, self.span + advance)
            self.received += k
            return np.ones(k, np.bool_)
        return np.fromiter((self.observe_one(s) for s in seqs.tolist()), np.bool_, count=k)

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

    def observe_one(self, s: int) -> bool:
        """Apply one seq; whether its message is accepted (``observe`` of one, cheaper)."""
        self.received += 1
        ahead = (s - self.highest) % MOD
        if 0 < ahead < HALF:
            self.lost += ahead - 1 - self._resume(s, ahead)
            self._clear(ahead)
            self.seen[s % WINDOW] = True
            self.highest = s
            self.span = min(WINDOW, self.span + ahead)
            return True
        back = (self.highest - s) % MOD
        if back >= WINDOW:
            self.stale += 1
            return False
        if self.seen[s % WINDOW]:
            self.duplicates += 1
            return False
        self.seen[s % WINDOW] = True
        self.reordered += 1
        if back < self.span:  # after the stream's first message: it was counted missing
            if self._was_missed(s):
                self.missed_while_down -= 1
            elif self.lost > 0:
                self.lost -= 1
            else:  # it was charged to the kernel, wrongly: it was only late
                self.kernel -= 1
        return True

    def _resume(self, s: int, ahead: int) -> int:
        """The first step forward of a restored stream, onto ``s``, ``ahead`` seqs on: its
        gap is counted as missed while down (returned, to be kept out of ``lost``)."""
        if not self.resumed:
            return 0
        self.resumed = False
        self.missed_while_down += ahead - 1
        self.missed_gap = (self.highest, s)
        return ahead - 1

    def _was_missed(self, s: int) -> bool:
        """Whether ``s`` is one of the seqs counted as missed while down."""
        if self.missed_gap is None or self.missed_while_down <= 0:
            return False
        low, high = self.missed_gap
        return 0 < (s - low) % MOD < (high - low) % MOD


COUNTS: Final = (
    "received", "lost", "kernel", "missed_while_down", "duplicates", "reordered", "stale",
    "frames", "bytes",
)  # fmt: skip
"""The summable counters of a stream (kept per collector when the stream is forgotten)."""
if not set(COUNTS) <= {f.name for f in fields(StreamStats)}:  # pragma: no cover - a typo
    raise AssertionError("COUNTS names a field StreamStats does not have")


@dataclass(slots=True, eq=False)
class CollectorStats:
    """Counters of one collector over all its boots."""

    collector_id: int
    boot_id: int | None = None
    """The boot of its latest accepted message."""
    boots: set[int] = field(default_factory=set)
    """The boots whose sequences are tracked now."""
    restarts: int = 0
    """New ``boot_id`` values after the first."""
    invalid: dict[str, int] = field(default_factory=dict)
    """Invalid messages by reason."""
    last_seen: float | None = None
    """``now`` of its latest accepted message."""
    keyed: bool = False
    """It has a key: its valid messages are authenticated (never forgotten)."""
    current: int | None = None
    """Its newest boot: the one whose sequence started last."""
    current_since: float = 0.0
    """``now`` when ``current`` started."""
    stale_boot: int = 0
    """Authenticated messages of an old boot (not tracked, not newer): replays, dropped."""
    touched: float = 0.0
    """``now`` of its latest message, valid or not (what eviction goes by)."""
    retired: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    """The counters of its forgotten sequences."""


def newer_boot(boot: int, than: int) -> bool:
    """Whether ``boot`` comes after ``than`` in modular (serial number) order."""
    return 0 < (boot - than) % MOD < HALF


STREAM_COLUMNS: Final = tuple(
    f.name for f in fields(StreamStats) if f.name not in {"seen", "span", "resumed", "missed_gap"}
)
"""The columns of a sequence in ``Accounting.streams()``."""
