"""Writes the analyzer queues on the store writer's thread (``store.writer``): a lane's
items are calls, run in order; the packet ring's index goes through its own lane."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import pandas as pd

from vspan.analysis.store.append import AppendResult
from vspan.analysis.store.store import Store
from vspan.analysis.store.writer import StoreWriter

__all__ = ["Call", "RingIndex", "run_calls"]

Call = Callable[[], object]
"""A write to run on the store writer's thread."""


def run_calls(calls: Sequence[Call]) -> AppendResult:
    """Run each queued write; the rows they wrote, and what the store could not keep (of
    the writes that say), for the writer's counters."""
    written, coerced, rejected = 0, Counter[str](), Counter[str]()
    for call in calls:
        done = call()
        if isinstance(done, AppendResult):
            written += done.written
            coerced.update(done.coerced)
            rejected.update(done.rejected)
        elif isinstance(done, int):
            written += done
    return AppendResult(written, dict(coerced), dict(rejected))


class RingIndex:
    """The packet ring's index, mirrored into the store through the writer's thread."""

    def __init__(self, store: Store, writer: StoreWriter) -> None:
        self._store = store
        self._lane = writer.lane("ring_index", run_calls)

    def replace_ring_segment(self, segment: Mapping[str, object], keys: pd.DataFrame) -> None:
        self._lane.submit(lambda: self._store.replace_ring_segment(segment, keys))

    def forget_ring_segments(self, names: Sequence[str]) -> None:
        self._lane.submit(lambda: self._store.forget_ring_segments(names))
