"""``collector_counters`` in the store: what a restart needs to resume each collector's
sequence survives the round trip, and a version 5 file (without it) is upgraded with its rows.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from vspan.analysis.ingest.accounting import Accounting
from vspan.analysis.ingest.messages import ingest
from vspan.analysis.store.persist import collector_rows, saved_streams
from vspan.analysis.store.queries import collectors
from vspan.analysis.store.schema import SCHEMA_VERSION
from vspan.analysis.store.store import Store
from vspan.wire.tunnel import encode_message
from vspan_testing.old_stores import V6_COUNTER_COLUMNS, as_written_by

NEWEST = (
    "SELECT * FROM collector_counters QUALIFY rank() OVER "
    '(PARTITION BY "collector_id" ORDER BY "time" DESC) = 1'
)
"""Each collector's newest sample, as the analyzer reads it at its start."""
FRAME = bytes(12) + b"\x89\x26" + bytes(30)


def _accounting(seqs: dict[tuple[int, int], list[int]], now: float) -> Accounting:
    """An accounting that received ``seqs`` per (collector, boot) at ``now``."""
    acc = Accounting()
    for (cid, boot), sent in seqs.items():
        datagrams = [encode_message(collector_id=cid, boot_id=boot, seq=s, frames=[FRAME],
                                    ts_ns=[0]) for s in sent]  # fmt: skip
        buf = np.frombuffer(b"".join(datagrams), np.uint8).copy()
        sizes = np.array([len(d) for d in datagrams], np.int64)
        acc.update(ingest(buf, np.cumsum(sizes) - sizes, sizes), now)
    return acc


def test_what_a_restart_resumes_survives_the_store(tmp_path: Path) -> None:
    acc = _accounting({(1, 0xFFFF_FFFE): [0, 1, 2, 5], (2, 9): [0xFFFF_FFFF]}, now=1_700_000_000.25)
    with Store(tmp_path, retention_days=None) as store:
        store.append_collector_counters(collector_rows(acc.streams(), acc.invalid(), 1.7e9 + 1))
        saved = saved_streams(store.query(NEWEST))
    got = saved.set_index("collector_id")
    assert got.loc[1, ["boot_id", "highest", "received", "lost"]].tolist() == [
        0xFFFF_FFFE, 5, 4, 2,
    ]  # fmt: skip
    assert got.loc[2, ["boot_id", "highest"]].tolist() == [9, 0xFFFF_FFFF]  # UINTEGER's top
    assert (got["last_seen"] == 1_700_000_000.25).all()
    again = Accounting()
    assert again.restore(saved, 1.8e9) == 2
    stream = again.stream(2, 9)
    assert stream is not None
    assert (stream.highest, stream.received, stream.resumed) == (0xFFFF_FFFF, 1, True)


def test_a_version_5_store_with_counters_is_upgraded(tmp_path: Path) -> None:
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    for folder in (fresh, old):
        with Store(folder):
            pass
    as_written_by(old, 5)
    con = duckdb.connect(str(old / "vspan.duckdb"))
    sampled = pd.Timestamp("2024-06-01T00:00:00Z")
    con.execute(
        "INSERT INTO collector_counters (time, collector_id, boot_id, received, lost, kernel, "
        "duplicates, reordered, frames, bytes, invalid, ingest_time) VALUES "
        "(?, 4, 17, 120, 3, 1, 0, 2, 960, 86000, MAP {'bad_auth': 2}, ?)",
        [sampled, sampled],
    )
    con.close()

    with Store(old, retention_days=None) as store:
        version = store.query("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version["value"].tolist() == [str(SCHEMA_VERSION)] == ["6"]
        rows = store.query_collector_counters(collector_id=4)
        (row,) = rows.to_dict(orient="records")
        assert [row[c] for c in ("boot_id", "received", "lost", "kernel", "frames")] == [
            17, 120, 3, 1, 960,
        ]  # fmt: skip
        assert all(pd.isna(row[c]) for c in V6_COUNTER_COLUMNS)  # not known then
        shown = collectors(store).iloc[0]
        assert (shown["missed_while_down"], shown["lost"], shown["kernel"]) == (0, 3, 1)
        assert shown["drops"] == {"bad_auth": 2, "kernel": 1, "lost": 3}
        saved = saved_streams(store.query(NEWEST))
        assert Accounting().restore(saved, 1.8e9) == 0  # no seq saved: nothing to resume
        # the next sample has every column
        acc = _accounting({(4, 18): [0, 2]}, now=1.8e9)
        store.append_collector_counters(collector_rows(acc.streams(), acc.invalid(), 1.8e9))
        newest = saved_streams(store.query(NEWEST))
        assert newest[["collector_id", "boot_id", "highest"]].values.tolist() == [[4, 18, 2]]
    with duckdb.connect(str(old / "vspan.duckdb"), read_only=True) as upgraded:
        got = _columns(upgraded)
    with duckdb.connect(str(fresh / "vspan.duckdb"), read_only=True) as made:
        want = _columns(made)
    assert got == want  # every column of version 6, with its type and NULL-ability


def _columns(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str, bool]]:
    return set(
        con.execute(
            "SELECT column_name, data_type, is_nullable FROM duckdb_columns() "
            "WHERE table_name = 'collector_counters'"
        ).fetchall()
    )
