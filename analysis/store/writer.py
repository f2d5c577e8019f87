"""``StoreWriter``: the one thread that writes to the store, so no other thread waits on it.

Everything the analyzer stores goes through here: finished flows (records, port-profile
verdicts and policy hits are built on this thread too, not on the engine's), the open-flow
view, the packet ring's index, inventory history, migrations, collector counters and
retention. Each kind of write is a *lane* with its own writer function::

    flows = writer.lane("flows", write_flows)       # write_flows(items) -> rows written
    flows.submit(item)                              # never blocks; False when dropped

Items of every lane wait in one queue in the order they were submitted, and the thread
writes them in that order; consecutive items of one lane are handed to its writer function
together (one records build and one insert for many engine batches). A lane made with
``latest_only`` writes only the newest of its consecutive items (a new snapshot of the open
flows replaces one still queued). The queue is bounded by the rows it holds
(``max_rows``): an item that would go over is dropped, counted under
``dropped{lane}`` and logged (at most every 10 s) — the engine never waits on the database.
A writer function returns the rows it wrote, or the store's ``AppendResult``: then rows the
store could not keep are counted by the store's reason (``rejected{flows,bad_scope}``,
``rejected{flows,refused_ConversionException}``, …) and values it stored as NULL by column
(``coerced{flows,src_vm_uuid}``). A write that fails as a whole is counted under
``errors{lane,exception}`` with its rows and logged; the thread goes on. Nothing is lost
silently: ``rows_written`` counts only what the store committed.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from vspan.analysis.store.append import AppendResult

__all__ = ["Lane", "StoreWriter", "Written"]

log = logging.getLogger("vspan.store")

T = TypeVar("T")
_LOG_EVERY_S: Final = 10.0


Written = int | AppendResult
"""What a lane's writer function returns: rows written, or what one append did."""


@dataclass
class _Counters:
    written: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    coerced: dict[str, int] = field(default_factory=dict)


class Lane(Generic[T]):
    """One kind of write: ``submit`` items, the writer thread hands them to ``write``."""

    def __init__(
        self,
        writer: StoreWriter,
        name: str,
        write: Callable[[Sequence[T]], Written],
        size: Callable[[T], int],
        latest_only: bool,
    ) -> None:
        self.writer, self.name, self.write = writer, name, write
        self.size, self.latest_only = size, latest_only

    def submit(self, item: T) -> bool:
        """Queue ``item``; False (and counted as dropped) when the queue is full."""
        return self.writer._submit(self, item)


class StoreWriter:
    """The store's one writer thread; ``lane`` declares a kind of write."""

    def __init__(self, *, max_rows: int = 1_000_000, batch_rows: int = 200_000) -> None:
        self.max_rows, self.batch_rows = max_rows, batch_rows
        self._queue: collections.deque[tuple[Lane[Any], Any, int]] = collections.deque()
        self._rows = 0
        self._busy = 0
        """Items taken by the thread and not yet written."""
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counters = _Counters()
        self._last_log: dict[str, float] = {}

    def lane(
        self,
        name: str,
        write: Callable[[Sequence[T]], Written],
        *,
        size: Callable[[T], int] = lambda item: 1,
        latest_only: bool = False,
    ) -> Lane[T]:
        """A lane called ``name`` whose items ``write`` stores (returning the rows written);
        ``size`` is an item's rows, what the queue's bound counts."""
        return Lane(self, name, write, size, latest_only)

    # --- the component ------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vspan-store", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Write what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("store writer: %d rows still queued after %g s", self._rows, timeout)
            self._thread = None

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is written (or failed)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def metrics(self) -> dict[str, int]:
        """``rows_written{lane}``, ``writes{lane}``, rows not stored: ``dropped{lane}``,
        ``errors{lane,exception}``, ``rejected{lane,reason}``; values stored as NULL:
        ``coerced{lane,column}``; and ``queue_rows``, ``queue_items``."""
        c = self._counters
        with self._cond:
            out = {"queue_rows": self._rows, "queue_items": len(self._queue)}
            for kind in ("rows_written", "writes", "dropped", "errors", "rejected", "coerced"):
                counts = getattr(c, "written" if kind == "rows_written" else kind)
                out |= {f"{kind}{{{k}}}": v for k, v in counts.items()}
        return out

    def written(self, lane: str) -> int:
        """Rows ``lane`` has written so far."""
        with self._cond:
            return self._counters.written.get(lane, 0)

    # --- internals ----------------------------------------------------------------------

    def _submit(self, lane: Lane[Any], item: Any) -> bool:
        rows = lane.size(item)
        with self._cond:
            if self._rows + rows > self.max_rows and self._rows > 0:
                self._count(self._counters.dropped, lane.name, rows)
                self._warn(lane.name, f"queue full ({self._rows:,} rows): dropped {rows:,}")
                return False
            self._queue.append((lane, item, rows))
            self._rows += rows
            self._cond.notify_all()
        return True

    def _count(self, counts: dict[str, int], key: str, n: int) -> None:
        counts[key] = counts.get(key, 0) + n

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(key, -math.inf) >= _LOG_EVERY_S:
            self._last_log[key] = now
            log.warning("store %s: %s", key, message)

    def _record(self, lane: str, done: Written) -> None:
        """Count what one write did (the store has logged what it could not keep)."""
        c = self._counters
        if isinstance(done, AppendResult):
            for reason, n in done.rejected.items():
                self._count(c.rejected, f"{lane},{reason}", n)
            for column, n in done.coerced.items():
                self._count(c.coerced, f"{lane},{column}", n)
            done = done.written
        self._count(c.written, lane, done)
        self._count(c.writes, lane, 1)

    def _take(self) -> list[tuple[Lane[Any], Any, int]] | None:
        """The items to write next (a run of one lane), or None to end the thread."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._stopping)
            if not self._queue:
                return None
            lane = self._queue[0][0]
            run, rows = [], 0
            while self._queue and self._queue[0][0] is lane and rows < self.batch_rows:
                item = self._queue.popleft()
                run.append(item)
                rows += item[2]
            self._busy += len(run)
            return run

    def _run(self) -> None:
        while (run := self._take()) is not None:
            lane = run[0][0]
            items = [run[-1][1]] if lane.latest_only else [item for _, item, _ in run]
            rows = sum(r for _, _, r in run)
            try:
                done = lane.write(items)
            except Exception as exc:  # counted and logged; the thread goes on
                with self._cond:
                    self._count(self._counters.errors, f"{lane.name},{type(exc).__name__}", rows)
                log.exception("store %s: writing %d rows failed", lane.name, rows)
            else:
                with self._cond:
                    self._record(lane.name, done)
            with self._cond:
                self._rows -= rows
                self._busy -= len(run)
                self._cond.notify_all()
