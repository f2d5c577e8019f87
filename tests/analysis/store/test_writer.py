"""Tests of the store's one writer thread (vspan.analysis.store.writer)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from vspan.analysis.report import analyze_captures
from vspan.analysis.store.store import Store
from vspan.analysis.store.writer import StoreWriter
from vspan.synth import generate_small, write_capture


class Gate:
    """A lane's writer that waits for ``open`` and records what it was given."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.calls: list[list[int]] = []

    def write(self, items: Sequence[int]) -> int:
        self.open.wait(10)
        if any(i < 0 for i in items):
            raise ValueError("a negative item")
        self.calls.append(list(items))
        return sum(items)


def test_submit_never_blocks_and_counts_what_it_drops() -> None:
    gate = Gate()
    writer = StoreWriter(max_rows=40)
    lane = writer.lane("flows", gate.write, size=lambda n: n)
    writer.start()
    try:
        accepted = [lane.submit(10) for _ in range(20)]  # the gate holds the thread
        assert 3 <= accepted.count(True) <= 5  # 40 rows queued, one batch maybe taken
        assert writer.metrics()["dropped{flows}"] == 10 * accepted.count(False)
        gate.open.set()
        assert writer.flush(10)
        assert writer.written("flows") == 10 * accepted.count(True)
        assert sum(len(c) for c in gate.calls) == accepted.count(True)
        assert len(gate.calls) < accepted.count(True)  # what queued up went in one write
    finally:
        writer.stop()
    assert writer.metrics()["queue_rows"] == 0


def test_a_failed_write_is_counted_with_its_rows_and_the_thread_goes_on() -> None:
    gate = Gate()
    gate.open.set()
    writer = StoreWriter()
    lane = writer.lane("flows", gate.write, size=abs)
    writer.start()
    lane.submit(-5)
    assert writer.flush(10)
    lane.submit(7)
    writer.stop()
    metrics = writer.metrics()
    assert metrics["errors{flows,ValueError}"] == 5
    assert metrics["rows_written{flows}"] == 7


def test_lanes_are_written_in_submission_order_and_latest_only_keeps_the_newest() -> None:
    order: list[tuple[str, list[int]]] = []
    hold = threading.Event()

    def make(name: str) -> object:
        def write(items: Sequence[int]) -> int:
            hold.wait(10)
            order.append((name, list(items)))
            return len(items)

        return write

    writer = StoreWriter()
    a = writer.lane("a", make("a"))  # type: ignore[arg-type]
    snap = writer.lane("snap", make("snap"), latest_only=True)  # type: ignore[arg-type]
    writer.start()
    for item in (1, 2):
        a.submit(item)
    for item in (10, 11, 12):
        snap.submit(item)
    a.submit(3)
    hold.set()
    writer.stop()
    # The thread may have taken [1] alone before the rest was queued.
    flat = [(name, items) for name, items in order]
    assert [n for n, _ in flat][-2:] == ["snap", "a"]
    assert flat[-2] == ("snap", [12])
    assert flat[-1] == ("a", [3])
    assert [i for name, items in flat if name == "a" for i in items] == [1, 2, 3]


def test_the_writer_appends_to_the_real_store(tmp_path: Path) -> None:
    capture = generate_small(seed=2)
    write_capture(capture, tmp_path / "dc.pcapng")
    records = analyze_captures([tmp_path / "dc.pcapng"], inventory=capture.inventory()).flows
    with Store(tmp_path / "store", retention_days=None) as store:
        writer = StoreWriter()
        lane = writer.lane("flows", lambda parts: store.append("flows", pd.concat(parts)), size=len)
        writer.start()
        for part in (records.iloc[:20], records.iloc[20:]):
            assert lane.submit(part)
        writer.stop()
        assert store.count("flows") == len(records) == writer.written("flows")
