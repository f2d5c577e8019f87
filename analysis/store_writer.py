"""``StoreWriter``: appends to the store from a thread, so the receive loop never waits.

``submit`` puts a DataFrame on a bounded queue and returns at once; the thread takes
whatever is queued (up to ``batch_rows``), concatenates it and makes one append. When the
queue is full the rows are dropped and counted (``dropped{store_queue_full}``) and a line
is logged (at most every 10 s); rows the store could not keep are counted by the store's
reason (``rejected{bad_scope}``, ``rejected{refused_ConversionException}``, …), values it
stored as NULL by column (``coerced{src_vm_uuid}``), and an append that failed as a whole
by its exception (``errors{StoreError}``, rows). ``rows_written`` counts only what the
store committed. Nothing is lost silently.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Final, Protocol

import pandas as pd

from .store_append import AppendResult
from .store_sql import schema_of

__all__ = ["Appender", "StoreWriter"]

log = logging.getLogger("vspan.store")


class Appender(Protocol):
    """Where the rows go: ``store.Store``, or anything that appends the same way."""

    def append(self, table: str, df: pd.DataFrame) -> AppendResult: ...


_DROP_LOG_S: Final = 10.0


@dataclass
class _Counters:
    rows_written: int = 0
    appends: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    coerced: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


class StoreWriter:
    """Appends to one table from a thread; ``submit`` never blocks the caller."""

    def __init__(
        self,
        store: Appender,
        *,
        table: str = "flows",
        max_queue: int = 256,
        batch_rows: int = 100_000,
    ) -> None:
        self.store, self.table, self.batch_rows = store, schema_of(table).name, batch_rows
        self._queue: queue.Queue[pd.DataFrame | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._counters = _Counters()
        self._pending = 0
        self._idle = threading.Condition()
        self._last_log = -math.inf

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vspan-store", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, df: pd.DataFrame) -> bool:
        """Queue ``df`` for writing; False (rows counted as dropped) when the queue is full."""
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(df)
        except queue.Full:
            self._done(1)
            self._count("dropped", "store_queue_full", len(df))
            return False
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is written (or failed)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def metrics(self) -> dict[str, int]:
        """``rows_written``, ``appends``, ``queue_depth``, and by reason ``dropped{…}``,
        ``rejected{…}``, ``errors{…}`` (rows not stored) and ``coerced{…}`` (values)."""
        c = self._counters
        out = {"rows_written": c.rows_written, "appends": c.appends, "queue_depth": 0}
        out["queue_depth"] = self._queue.qsize()
        for kind in ("dropped", "rejected", "errors", "coerced"):
            out |= {f"{kind}{{{k}}}": v for k, v in getattr(c, kind).items()}
        return out

    def _count(self, kind: str, reason: str, rows: int) -> None:
        counts: dict[str, int] = getattr(self._counters, kind)
        counts[reason] = counts.get(reason, 0) + rows
        now = time.monotonic()
        if now - self._last_log >= _DROP_LOG_S:
            self._last_log = now
            log.warning(
                "store %s: %s{%s} = %d rows so far", self.table, kind, reason, counts[reason]
            )

    def _done(self, items: int) -> None:
        with self._idle:
            self._pending -= items
            self._idle.notify_all()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            parts = [self._queue.get()]
            rows = 0 if parts[0] is None else len(parts[0])
            while rows < self.batch_rows:
                try:
                    parts.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                rows += 0 if parts[-1] is None else len(parts[-1])
            frames = [p for p in parts if p is not None]
            stopping = len(frames) < len(parts)
            if frames:
                try:
                    result = self.store.append(self.table, pd.concat(frames, ignore_index=True))
                except Exception as exc:  # counted and logged; the thread keeps going
                    self._count("errors", type(exc).__name__, rows)
                    log.error("store %s: append of %d rows failed: %s", self.table, rows, exc)
                else:
                    self._counters.rows_written += result.written
                    self._counters.appends += 1
                    for kind, counts in (
                        ("rejected", result.rejected),
                        ("coerced", result.coerced),
                    ):
                        mine: dict[str, int] = getattr(self._counters, kind)
                        for key, n in counts.items():  # the store has logged them
                            mine[key] = mine.get(key, 0) + n
            self._done(len(frames))
