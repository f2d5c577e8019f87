"""The embedded store: schema, appends and queries against the simulator's ground truth,
durability across ``kill -9``, restarts, schema versions, retention, and the writer thread."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest

from vspan.analysis.records.build import RECORD_COLUMNS
from vspan.analysis.report import analyze_captures
from vspan.analysis.store.schema import SCHEMA_VERSION, TABLES, clickhouse_ddl
from vspan.analysis.store.store import Store, StoreError
from vspan.synth import SynthCapture, generate_small, write_capture
from vspan_testing.old_stores import as_written_by

DOCS = Path(__file__).resolve().parents[3] / "docs" / "store.md"
DAY = 86_400 * 10**9


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthCapture, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("dc")
    cap = generate_small(seed=2)
    write_capture(cap, folder / "dc.pcapng")
    flows = analyze_captures([folder / "dc.pcapng"], inventory=cap.inventory()).flows
    return cap, flows


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path, retention_days=None) as opened:
        yield opened


def _sides(frame: pd.DataFrame) -> list[tuple[object, ...]]:
    cols = ["src_ip", "dst_ip", "proto", "packets", "bytes", "packets_rev", "bytes_rev"]
    return sorted(
        tuple(int(v) if isinstance(v, np.integer) else v for v in r)
        for r in frame[cols].itertuples(index=False)
    )


def test_flows_table_has_every_record_column() -> None:
    names = TABLES["flows"].names
    assert set(RECORD_COLUMNS) <= set(names)
    assert {"flow_uid", "src_vm_uuid", "dst_vm_uuid", "policy_verdict", "policy_rule"} <= set(names)


def test_docs_show_every_table_and_its_clickhouse_ddl() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for table in TABLES.values():
        assert clickhouse_ddl(table) in text, table.name
        section = text[text.index(f"### `{table.name}`") :].split("\n### ", 1)[0]
        for col in table.columns:  # its row: name, types and whether it may be NULL
            duck = re.escape(col.duckdb) + (" ∈ \\{[^|]*\\}" if col.check else "")
            click = re.escape("Enum8" if col.check else col.clickhouse)
            row = rf"^\| `{col.name}` \| {duck} \| {click} \| {'yes' if col.null else 'no'} \|"
            assert re.search(row, section, re.MULTILINE), (table.name, col.name)
        if table.primary_key:
            keys = ", ".join(f"`{k}`" for k in table.primary_key)
            assert f"Primary key (DuckDB): {keys}." in section, table.name


def test_query_by_vm_matches_the_ground_truth(
    dc: tuple[SynthCapture, pd.DataFrame], store: Store
) -> None:
    cap, flows = dc
    assert store.append_flows(flows, inventory=cap.inventory()).written == len(flows)
    web = next(v for v in cap.vms if v.name == "web-01")
    truth = cap.truth[(cap.truth.src_vm == "web-01") | (cap.truth.dst_vm == "web-01")]
    by_name = store.query_flows(vm="web-01", limit=None)
    by_uuid = store.query_flows(vm=web.uuid, limit=None)
    assert _sides(by_name) == _sides(truth) == _sides(by_uuid)
    assert len(truth) > 3
    assert set(by_name["flow_uid"]) == set(by_uuid["flow_uid"])
    assert by_name["flow_uid"].is_unique


def test_filters_match_pandas_on_the_records(
    dc: tuple[SynthCapture, pd.DataFrame], store: Store
) -> None:
    cap, flows = dc
    store.append_flows(flows)
    t0 = int(flows["first_ns"].min())
    web = next(v for v in cap.vms if v.name == "web-01")
    cases: list[tuple[dict[str, Any], pd.Series]] = [
        ({"scope": "intra-host"}, flows.scope == "intra-host"),
        ({"proto": "tcp"}, flows.proto == 6),
        ({"proto": 17}, flows.proto == 17),
        ({"ip": web.ipv4}, (flows.src_ip == web.ipv4) | (flows.dst_ip == web.ipv4)),
        ({"ip": web.ipv6.upper()}, (flows.src_ip == web.ipv6) | (flows.dst_ip == web.ipv6)),
        ({"port": 443}, (flows.src_port == 443) | (flows.dst_port == 443)),
        (
            {"host": "hv02"},
            (flows.host == "hv02")
            | (flows.src_host == "hv02")
            | (flows.dst_host == "hv02")
            | flows.observed_at.map(lambda hosts: "hv02" in hosts),
        ),
        (
            {"since": t0 + 3 * 10**9, "until": t0 + 5 * 10**9},
            (flows.last_ns >= t0 + 3 * 10**9) & (flows.first_ns < t0 + 5 * 10**9),
        ),
    ]
    for filters, expected in cases:
        got = store.query_flows(**filters, limit=None)
        want = flows[expected.fillna(False).astype(bool)]
        assert sorted(got["flow_id"]) == sorted(want["flow_id"]), filters
        assert len(want) > 0, filters
    top = store.query_flows(order="-bytes", limit=3)
    assert list(top["bytes"]) == sorted(flows["bytes"], reverse=True)[:3]
    iso = pd.Timestamp(t0 + 3 * 10**9, unit="ns", tz="UTC").isoformat()
    assert len(store.query_flows(since=iso, limit=None)) == len(
        store.query_flows(since=t0 + 3 * 10**9 - (t0 + 3 * 10**9) % 1000, limit=None)
    )


def test_values_round_trip(dc: tuple[SynthCapture, pd.DataFrame], store: Store) -> None:
    _, flows = dc
    store.append_flows(flows)
    got = store.query_flows(limit=None, order="flow_id")
    for col in ("flow_id", "packets", "bytes", "first_ns", "last_ns", "src_port", "vlan"):
        assert [None if pd.isna(v) else int(v) for v in got[col]] == [
            None if pd.isna(v) else int(v) for v in flows[col]
        ], col
    assert [list(v) for v in got["observed_at"]] == [list(v) for v in flows["observed_at"]]
    assert list(got["src_vm"].fillna("-")) == list(flows["src_vm"].fillna("-"))
    assert got["flow_uid"].notna().all()


def test_a_query_reads_only_the_columns_asked_for(
    dc: tuple[SynthCapture, pd.DataFrame], store: Store
) -> None:
    store.append_flows(dc[1])
    wanted = ["bytes", "src_vm", "observed_at", "flow_id"]
    some = store.query_flows(limit=None, order="flow_id", columns=wanted)
    every = store.query_flows(limit=None, order="flow_id")
    assert list(some.columns) == wanted
    pd.testing.assert_frame_equal(some, every[wanted])
    with pytest.raises(StoreError, match="table flows has no column 'colour'"):
        store.query_flows(columns=["bytes", "colour"])


def test_queries_take_values_as_parameters(
    dc: tuple[SynthCapture, pd.DataFrame], store: Store
) -> None:
    store.append_flows(dc[1])
    assert store.query_flows(vm="x' OR 1=1 --", limit=None).empty
    assert store.query_flows(host='hv01" OR "1"="1', limit=None).empty
    assert store.count("flows") == len(dc[1])


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"scope": "galaxy"}, "unknown scope 'galaxy'"),
        ({"proto": "gre"}, "unknown protocol 'gre'"),
        ({"ip": "10.0.0.300"}, "expected an IPv4 or IPv6 address, got '10.0.0.300'"),
        ({"order": "bytes; DROP TABLE flows"}, "cannot order flows by 'bytes; DROP TABLE flows'"),
        ({"since": "yesterday-ish"}, "cannot read 'yesterday-ish' as a time"),
    ],
)
def test_bad_filters_say_what_was_expected(
    store: Store, filters: dict[str, Any], message: str
) -> None:
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.query_flows(**filters)


def test_append_with_an_unknown_column_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="table flows has no column 'colour'"):
        store.append("flows", pd.DataFrame({"colour": ["red"]}))


CHILD = """
import sys
import pandas as pd
from vspan.analysis.store.store import Store
store = Store(sys.argv[1])
store.start()
flows = pd.read_parquet(sys.argv[2])
for part in (flows, flows.iloc[:7]):
    print("stored", store.append_flows(part).written, flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_stored_rows_survive_kill_9(dc: tuple[SynthCapture, pd.DataFrame], tmp_path: Path) -> None:
    flows = dc[1]
    flows.to_parquet(tmp_path / "flows.parquet")
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "db"), str(tmp_path / "flows.parquet")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        lines = [child.stdout.readline(), child.stdout.readline()]
        child.kill()  # SIGKILL right after the second "stored": no stop(), no checkpoint
    assert lines == [f"stored {len(flows)}\n", "stored 7\n"]
    with Store(tmp_path / "db") as again:
        assert again.count("flows") == len(flows) + 7


def test_restart_keeps_rows_and_schema_version(
    dc: tuple[SynthCapture, pd.DataFrame], tmp_path: Path
) -> None:
    with Store(tmp_path) as first:
        first.append_flows(dc[1])
    with Store(tmp_path) as second:
        assert second.count("flows") == len(dc[1])
        meta = second.query("SELECT value FROM meta WHERE key = 'schema_version'")
        assert meta["value"].tolist() == [str(SCHEMA_VERSION)]
    with Store(tmp_path, read_only=True) as reader:
        assert reader.count("flows") == len(dc[1])


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path):
        pass
    con = duckdb.connect(str(tmp_path / "vspan.duckdb"))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(
        StoreError,
        match=f"schema version 99 was written by a newer vspan; this one reads versions up to {SCHEMA_VERSION}",
    ):
        Store(tmp_path).start()


def test_retention_by_capture_time_in_every_table(
    dc: tuple[SynthCapture, pd.DataFrame], store: Store
) -> None:
    _, flows = dc
    store.retention_basis = "capture"
    now = int(flows["last_ns"].max()) + 10 * DAY
    old = flows.assign(first_ns=flows.first_ns - 20 * DAY, last_ns=flows.last_ns - 20 * DAY)
    store.append_flows(pd.concat([old, flows], ignore_index=True))
    uuid = "ba8b358e-b45b-5409-ac45-513288159c85"
    events = pd.DataFrame(
        {"time": [now - 40 * DAY, now - DAY], "host": "hv01", "vm_uuid": uuid, "event": "added"}
    )
    store.append_inventory_events(events)
    store.append_migrations(
        events.drop(columns="event").rename(columns={"host": "to_host"}).assign(source="dataplane")
    )
    store.retention_days = 15
    result = store.apply_retention(now)
    assert result.deleted == {"flows": len(flows), "inventory_history": 1, "migrations": 1}
    assert store.counters()["deleted"] == {
        "flows": {"age": len(flows)}, "inventory_history": {"age": 1}, "migrations": {"age": 1}
    }  # fmt: skip
    assert store.count("flows") == len(flows)
    left = store.query_inventory_history(vm=uuid)["time"]
    assert left.tolist() == [pd.Timestamp(now - DAY, unit="ns", tz="UTC").floor("us")]


def test_retention_ages_rows_by_ingest_time_by_default(
    dc: tuple[SynthCapture, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression (issue 17, point 6): flows replayed from a capture a year old were deleted
    # by the first retention run after they were stored, without a log line or a counter.
    _, flows = dc
    stored_at = 1_900_000_000.0  # the store's clock (seconds)
    now = int(stored_at * 1e9)
    old = flows.assign(first_ns=flows.first_ns - 400 * DAY, last_ns=flows.last_ns - 400 * DAY)
    uuid = "ba8b358e-b45b-5409-ac45-513288159c85"
    event = pd.DataFrame({"time": [now - 400 * DAY], "host": "hv01", "vm_uuid": uuid,
                          "event": "added"})  # fmt: skip
    clock = [stored_at]
    with Store(tmp_path, retention_days=30, clock=lambda: clock[0]) as store:
        assert store.retention_basis == "ingest"
        store.append_flows(old)
        store.append_inventory_events(event)
        with caplog.at_level(logging.INFO, logger="vspan.store"):
            assert store.apply_retention(now + 29 * DAY).deleted == {}
            assert store.count("flows") == len(flows)
            assert not caplog.records
            result = store.apply_retention(now + 31 * DAY)
        assert result.deleted == {"flows": len(flows), "inventory_history": 1}
        assert store.counters()["deleted"] == {
            "flows": {"age": len(flows)}, "inventory_history": {"age": 1}
        }  # fmt: skip
    cutoff = pd.Timestamp(now + DAY, unit="ns", tz="UTC").isoformat()
    assert [r.getMessage() for r in caplog.records] == [
        f"store flows: deleted {len(flows)} rows (retention_days, basis ingest): "
        f"ingest_time before {cutoff}",
        f"store inventory_history: deleted 1 rows (retention_days, basis ingest): "
        f"ingest_time before {cutoff}",
    ]


def test_retention_by_size_deletes_the_oldest_flows(
    dc: tuple[SynthCapture, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, flows = dc
    big = pd.concat([flows] * 6200, ignore_index=True)  # 372k rows: 3 row groups and more
    stamps = 10**18 + np.arange(len(big), dtype=np.int64) * 1000
    big = big.assign(first_ns=stamps, last_ns=stamps)
    with Store(tmp_path, retention_days=None, max_bytes=8 << 20) as store:
        for chunk in np.array_split(np.arange(len(big)), 4):
            store.append_flows(big.iloc[chunk])
        before = store.size()
        with caplog.at_level(logging.INFO, logger="vspan.store"):
            result = store.apply_retention(2 * 10**18)
        kept = store.count("flows")
        assert result.deleted["flows"] == len(big) - kept
        assert store.counters()["deleted"] == {"flows": {"size": len(big) - kept}}
        (record,) = caplog.records
        assert record.levelno == logging.WARNING
        assert re.fullmatch(
            rf"store flows: deleted {len(big) - kept} rows \(max_store_bytes, basis ingest\): "
            rf"store [\d,]+ bytes over max_store_bytes {8 << 20:,}: the oldest by ingest_time, "
            rf"last_ns, up to \S+ \S+, {stamps[-kept - 1]}",
            record.getMessage(),
        ), record.getMessage()
        # as many rows as fit in 90 % of max_bytes at the bytes per row before
        assert 0 < kept <= len(big) * (8 << 20) * 0.9 / before.used_bytes + 1
        oldest = store.query_flows(order="last_ns", limit=1)["last_ns"].iloc[0]
        assert oldest == stamps[-kept]  # exactly the newest rows are left
        row_group = before.used_bytes / len(big) * 122_880
        assert result.size.used_bytes <= (8 << 20) + row_group
        assert result.size.used_bytes < before.used_bytes


def test_policy_hits_add_up(store: Store) -> None:
    uuid = "ba8b358e-b45b-5409-ac45-513288159c85"
    hits = pd.DataFrame(
        {"rule": ["web/allow-https", "web/allow-https", "web/deny"], "vm_uuid": uuid,
         "vm_name": "web-01", "verdict": ["allow", "allow", "deny"], "flows": [1, 2, 4],
         "packets": [10, 20, 40], "bytes": [100, 200, 400], "last_hit": [3, 1, 2]}
    )  # fmt: skip
    store.add_policy_hits(hits)
    store.add_policy_hits(hits.iloc[:1].assign(last_hit=0))
    got = store.query_policy_hits(vm="web-01", order="rule").set_index("rule")
    assert got.loc["web/allow-https", ["flows", "packets", "bytes"]].tolist() == [4, 40, 400]
    assert got.loc["web/deny", "flows"] == 4
    assert got.loc["web/allow-https", "last_hit"] == pd.Timestamp(3, unit="ns", tz="UTC").floor(
        "us"
    )


def test_collector_counters_keep_invalid_reasons(store: Store) -> None:
    sample = {"time": [10**18], "collector_id": [7], "boot_id": [0x01020304], "received": [9],
              "lost": [1], "duplicates": [0], "reordered": [2], "frames": [90], "bytes": [9000],
              "invalid": [{"bad_magic": 3, "bad_auth": 1}]}  # fmt: skip
    store.append_collector_counters(pd.DataFrame(sample))
    got = store.query_collector_counters(collector_id=7)
    assert dict(got["invalid"].iloc[0]) == {"bad_magic": 3, "bad_auth": 1}
    assert got["lost"].iloc[0] == 1
    bad = store.query("SELECT invalid['bad_magic'] AS n FROM collector_counters")
    assert bad["n"].tolist() == [3]


def test_a_store_reopened_for_writing_accepts_appends(tmp_path: Path) -> None:
    # Regression: reading the schema version with fetchone() left a result open, and the
    # first append after reopening failed ("connection has an unfinished result").
    rows = pd.DataFrame({
        "time": pd.to_datetime([1_700_000_000], unit="s", utc=True),
        "vm_uuid": ["6f1c2d9e-0000-4000-8000-000000000001"], "vm_name": ["web-01"],
        "from_host": ["hv01"], "to_host": ["hv02"], "source": ["inventory"],
    })  # fmt: skip
    with Store(tmp_path) as store:
        store.append_migrations(rows)
    with Store(tmp_path) as store:
        store.append_migrations(rows)
        assert len(store.query_migrations()) == 2


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    with Store(tmp_path):
        pass
    as_written_by(tmp_path, 1)
    with Store(tmp_path) as store:
        columns = store.query("SELECT * FROM flows LIMIT 0").columns
        version = store.query("SELECT value FROM meta WHERE key = 'schema_version'")
        counters = store.query("SELECT * FROM collector_counters LIMIT 0").columns
    assert {"delay_us", "ingest_time"} <= set(columns)
    assert "kernel" in counters
    assert str(version.iloc[0, 0]) == str(SCHEMA_VERSION) == "6"


def test_rows_of_a_version_2_store_count_as_ingested_at_the_upgrade(
    dc: tuple[SynthCapture, pd.DataFrame], tmp_path: Path
) -> None:
    # Version 2 had no ingest time; its rows, whatever their capture time, are kept
    # retention_days from the upgrade (an age by capture time would delete them at once).
    flows = dc[1]
    with Store(tmp_path) as store:
        store.append_flows(flows.assign(last_ns=flows.last_ns - 400 * DAY))
    as_written_by(tmp_path, 2)
    upgraded_at = pd.Timestamp.now(tz="UTC")
    with Store(tmp_path, retention_days=30) as store:
        stamps = store.query("SELECT DISTINCT ingest_time FROM flows")["ingest_time"]
        assert len(stamps) == 1
        assert abs(stamps.iloc[0] - upgraded_at) < pd.Timedelta(minutes=5)
        assert store.apply_retention(int(upgraded_at.value) + 29 * DAY).deleted == {}
        assert store.apply_retention(int(upgraded_at.value) + 31 * DAY).deleted == {
            "flows": len(flows)
        }
