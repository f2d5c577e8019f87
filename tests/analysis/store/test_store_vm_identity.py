"""A VM's identity in the store (``vm_key``): with and without a UUID, through renames and a
UUID that comes later, and the upgrade of a version 4 file that had only UUIDs.

Regression (issue 17, point 1): ``inventory_history``, ``migrations`` and ``policy_hits``
required a UUID; the rows of a VM found behind a Linux bridge were left out before they
reached the store, and nothing counted them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from vspan.analysis.store.schema import SCHEMA_VERSION
from vspan.analysis.store.store import Store, StoreError
from vspan_testing.old_stores import as_written_by

WEB = "6f1c2d9e-0000-4000-8000-000000000001"
DB = "6f1c2d9e-0000-4000-8000-0000000000db"
T = pd.Timestamp("2024-05-01T12:00:00Z")


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path, retention_days=None) as opened:
        yield opened


def _events(*rows: tuple[int, str, str | None, str | None, str]) -> pd.DataFrame:
    """(second, host, vm_uuid, vm_name, event) per row."""
    return pd.DataFrame({
        "time": [T + pd.Timedelta(seconds=r[0]) for r in rows],
        "host": [r[1] for r in rows], "vm_uuid": pd.Series([r[2] for r in rows], dtype=object),
        "vm_name": pd.Series([r[3] for r in rows], dtype=object), "event": [r[4] for r in rows],
    })  # fmt: skip


def _moves(*rows: tuple[int, str | None, str, str, str]) -> pd.DataFrame:
    """(second, vm_uuid, vm_name, from_host, to_host) per row."""
    return pd.DataFrame({
        "time": [T + pd.Timedelta(seconds=r[0]) for r in rows],
        "vm_uuid": pd.Series([r[1] for r in rows], dtype=object),
        "vm_name": [r[2] for r in rows], "from_host": [r[3] for r in rows],
        "to_host": [r[4] for r in rows], "source": "inventory",
    })  # fmt: skip


def _hits(*rows: tuple[str, str | None, str, int, int]) -> pd.DataFrame:
    """(rule, vm_uuid, vm_name, flows, last_hit second) per row; packets 10 and bytes 100
    per flow."""
    return pd.DataFrame({
        "rule": [r[0] for r in rows], "vm_uuid": pd.Series([r[1] for r in rows], dtype=object),
        "vm_name": [r[2] for r in rows], "verdict": "deny", "flows": [r[3] for r in rows],
        "packets": [10 * r[3] for r in rows], "bytes": [100 * r[3] for r in rows],
        "last_hit": [T + pd.Timedelta(seconds=r[4]) for r in rows],
    })  # fmt: skip


def _plain(frame: pd.DataFrame) -> list[list[Any]]:
    """The rows as lists, None for every missing value."""
    values = frame.astype(object)
    return values.where(values.notna(), None).values.tolist()


def _counts(frame: pd.DataFrame) -> dict[tuple[str, str], tuple[int, ...]]:
    return {
        (r.rule, r.vm_key): (r.flows, r.packets, r.bytes, r.vm_name) for r in frame.itertuples()
    }


def test_rows_of_a_vm_without_a_uuid_are_stored_under_its_name(store: Store) -> None:
    assert store.append_inventory_events(_events((0, "h1", None, "web", "added"))).written == 1
    assert store.append_migrations(_moves((5, None, "web", "h1", "h2"))).written == 1
    assert store.add_policy_hits(_hits(("lab#1", None, "web", 2, 5))).written == 1
    assert store.add_policy_hits(_hits(("lab#1", None, "web", 3, 6))).written == 1
    for rows in (
        store.query_inventory_history(vm="web"),
        store.query_migrations(vm="web"),
        store.query_policy_hits(vm="web"),
    ):
        assert rows["vm_key"].tolist() == ["name:web"]
        assert rows["vm_uuid"].isna().all()
    assert _counts(store.query_policy_hits()) == {("lab#1", "name:web"): (5, 50, 500, "web")}
    assert not any(store.counters()["rejected"].values())


def test_a_row_with_neither_uuid_nor_name_is_counted_and_logged(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vspan.store")
    done = store.append_migrations(_moves((1, None, "web", "h1", "h2"), (2, "", None, "h1", "h2")))  # type: ignore[arg-type]
    assert (done.written, done.rejected) == (1, {"null_vm_key": 1})
    assert store.counters()["rejected"] == {"migrations": {"null_vm_key": 1}}
    assert "store migrations: 1 of 2 rows not stored (null_vm_key 1)" in caplog.text


def test_a_malformed_uuid_is_stored_as_null_and_counted_the_vm_kept_by_name(store: Store) -> None:
    done = store.append_inventory_events(_events((0, "h1", "not-a-uuid", "web", "added")))
    assert (done.written, done.coerced) == (1, {"vm_uuid": 1})
    assert _plain(store.query_inventory_history()[["vm_key", "vm_uuid"]]) == [["name:web", None]]


def test_a_vm_that_gets_a_uuid_takes_its_rows_along(store: Store) -> None:
    store.append_inventory_events(_events((0, "h1", None, "web", "added")))
    store.append_migrations(_moves((5, None, "web", "h1", "h2")))
    store.add_policy_hits(_hits(("lab#1", None, "web", 2, 5), ("lab#default", None, "web", 1, 4)))
    # After the UUID came, one more hit under it, before the rows were moved (in flight).
    store.add_policy_hits(_hits(("lab#1", WEB, "web", 4, 9)))
    store.append_inventory_events(_events((10, "h2", WEB, "web", "changed")))
    assert store.rekey_vm("name:web", WEB, WEB) == {
        "inventory_history": 1, "migrations": 1, "policy_hits": 2,
    }  # fmt: skip
    history = store.query_inventory_history(vm=WEB)
    assert history["event"].tolist() == ["added", "changed"]
    assert history["vm_uuid"].astype(str).tolist() == [WEB, WEB]
    assert store.query_migrations(vm=WEB.upper())["from_host"].tolist() == ["h1"]
    assert _counts(store.query_policy_hits(vm=WEB)) == {
        ("lab#1", WEB): (6, 60, 600, "web"), ("lab#default", WEB): (1, 10, 100, "web"),
    }  # fmt: skip
    last = store.query_policy_hits(vm_key=WEB, rule="lab#1")["last_hit"]
    assert last.tolist() == [T + pd.Timedelta(seconds=9)]
    assert store.count("policy_hits") == 2  # nothing left under the old key
    assert store.rekey_vm("name:web", WEB, WEB) == {}  # nothing more to move


def test_a_renamed_vm_without_a_uuid_is_found_by_either_name(store: Store) -> None:
    store.append_inventory_events(_events((0, "h1", None, "web", "added")))
    store.add_policy_hits(_hits(("lab#1", None, "web", 2, 5)))
    store.append_migrations(_moves((3, None, "web", "h1", "h2")))
    store.rekey_vm("name:web", "name:www", None)
    store.append_inventory_events(_events((9, "h2", None, "www", "changed")))
    for name in ("web", "www"):
        assert store.query_inventory_history(vm=name)["vm_name"].tolist() == ["web", "www"]
        assert store.query_migrations(vm=name)["vm_name"].tolist() == ["web"]  # at the time
        assert _counts(store.query_policy_hits(vm=name)) == {
            ("lab#1", "name:www"): (2, 20, 200, "web")
        }
    # A new VM called web is another VM, found by that name too, not under the old one's key.
    store.append_inventory_events(_events((20, "h3", None, "web", "added")))
    web = store.query_inventory_history(vm="web")
    assert _plain(web[["vm_key", "host"]]) == [
        ["name:www", "h1"], ["name:www", "h2"], ["name:web", "h3"]
    ]  # fmt: skip
    assert store.query_inventory_history(vm_key="name:web")["host"].tolist() == ["h3"]
    assert store.query_migrations(vm="nobody").empty
    assert store.query_migrations(vm=DB).empty


def _layout(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    columns = con.execute(
        "SELECT table_name, column_index, column_name, data_type, is_nullable "
        "FROM duckdb_columns() WHERE table_name IN ('inventory_history', 'migrations', "
        "'policy_hits') ORDER BY ALL"
    ).fetchall()
    constraints = con.execute(
        "SELECT table_name, constraint_type, constraint_column_names FROM duckdb_constraints() "
        "WHERE table_name IN ('inventory_history', 'migrations', 'policy_hits') ORDER BY ALL"
    ).fetchall()
    return {"columns": columns, "constraints": constraints}


def test_a_version_4_store_with_rows_is_upgraded(tmp_path: Path) -> None:
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    for folder in (fresh, old):
        with Store(folder):
            pass
    as_written_by(old, 4)
    con = duckdb.connect(str(old / "vspan.duckdb"))
    ingested = pd.Timestamp("2024-06-01T00:00:00Z")
    con.execute(
        "INSERT INTO inventory_history VALUES (?, 'h1', ?, 'web', 3, '52:54:00:00:00:01', "
        "'lab', 'added', ?), (?, 'h1', ?, 'db', NULL, NULL, NULL, 'added', ?)",
        [T, WEB, ingested, T, DB, ingested],
    )
    con.execute(
        "INSERT INTO migrations VALUES (?, ?, 'web', 'h1', 'h2', 'dataplane', ?)",
        [T + pd.Timedelta(seconds=5), WEB, ingested],
    )
    con.execute(
        "INSERT INTO policy_hits VALUES ('lab#1', ?, 'web', 'permit', 2, 20, 200, ?, ?), "
        "('lab#default', ?, 'db', 'deny', 1, 10, 100, ?, ?)",
        [WEB, T, ingested, DB, T, ingested],
    )
    con.close()
    with pytest.raises(StoreError, match=r"schema version 4 was written by an older vspan; "
                       r"open it for writing once \(vspan analyze\) to upgrade it"):  # fmt: skip
        Store(old, read_only=True).start()

    with Store(old, retention_days=None) as store:
        version = store.query("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version["value"].tolist() == [str(SCHEMA_VERSION)] == ["6"]
        history = store.query_inventory_history(order="vm_name")
        assert _plain(history[["vm_key", "vm_name", "vif", "mac", "profile"]]) == [
            [DB, "db", None, None, None], [WEB, "web", 3, "52:54:00:00:00:01", "lab"],
        ]  # fmt: skip
        assert history["vm_uuid"].astype(str).tolist() == [DB, WEB]
        assert set(history["ingest_time"]) == {ingested}
        moves = store.query_migrations(vm="web")
        assert _plain(moves[["vm_key", "from_host", "to_host", "source"]]) == [
            [WEB, "h1", "h2", "dataplane"]
        ]
        assert _counts(store.query_policy_hits()) == {
            ("lab#1", WEB): (2, 20, 200, "web"), ("lab#default", DB): (1, 10, 100, "db"),
        }  # fmt: skip
        # Keyed by vm_key now: a hit of the same VM adds up, a VM without a UUID has its own.
        store.add_policy_hits(_hits(("lab#1", WEB, "web", 1, 9), ("lab#1", None, "cache", 1, 9)))
        assert _counts(store.query_policy_hits(rule="lab#1")) == {
            ("lab#1", WEB): (3, 30, 300, "web"), ("lab#1", "name:cache"): (1, 10, 100, "cache"),
        }  # fmt: skip
        assert store.append_migrations(_moves((9, None, "cache", "h1", "h2"))).written == 1
    with duckdb.connect(str(old / "vspan.duckdb"), read_only=True) as upgraded:
        got = _layout(upgraded)
    with duckdb.connect(str(fresh / "vspan.duckdb"), read_only=True) as made:
        want = _layout(made)
    assert got == want  # the tables as version 5 makes them, column for column
    assert ("policy_hits", "PRIMARY KEY", ["rule", "vm_key"]) in want["constraints"]
