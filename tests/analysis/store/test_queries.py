"""The read queries on a store filled from the simulator: filters against pandas on the same
records, keyset pages (complete, in order, stable under appends), violations, policy hits,
migrations and collector counters; times in every accepted form; errors that name the
argument."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from vspan.analysis.store.persist import hit_rows
from vspan.analysis.store.queries import (
    COLLECTOR_COLUMNS,
    FLOW_COLUMNS,
    FLOW_SORTS,
    HIT_COLUMNS,
    MAX_LIMIT,
    MIGRATION_COLUMNS,
    collectors,
    flows,
    json_rows,
    migrations,
    parse_time,
    policy_hits,
    violations,
)
from vspan.analysis.store.store import Store
from vspan.errors import ConfigError
from vspan_testing.readstore import SECOND, ReadData, build

NOW = 1_700_000_000.25
NOW_NS = 1_700_000_000_250_000_000


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> ReadData:
    return build(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def store(data: ReadData) -> Iterator[Store]:
    with Store(data.data_dir, read_only=True) as opened:
        yield opened


def ids(frame: pd.DataFrame) -> list[int]:
    return [int(v) for v in frame["flow_id"]]


def plain(values: pd.Series) -> list[Any]:
    """Values with every kind of null as None."""
    return values.astype(object).where(values.notna(), None).tolist()


def all_flows(store: Store, now: float, **filters: Any) -> pd.DataFrame:
    page = flows(store, limit=MAX_LIMIT, now=now, **filters)
    assert page.next_cursor is None
    return page.flows


# --- times ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2023-11-14T22:13:20Z", 1_700_000_000 * SECOND),
        ("2023-11-14T23:13:20.5+01:00", 1_700_000_000_500_000_000),
        ("2023-11-14 22:13:20.000001", 1_700_000_000_000_001_000),  # no zone: UTC
        ("1700000000", 1_700_000_000 * SECOND),
        ("1700000000.123456789", 1_700_000_000_123_456_789),
        (1_700_000_000, 1_700_000_000 * SECOND),
        (1_700_000_000.5, 1_700_000_000_500_000_000),
        ("now", NOW_NS),
        ("-15m", NOW_NS - 900 * SECOND),
        ("15m", NOW_NS - 900 * SECOND),
        (" -2h ", NOW_NS - 7200 * SECOND),
        ("1.5d", NOW_NS - 129_600 * SECOND),
        ("-250ms", NOW_NS - 250_000_000),
        ("1w", NOW_NS - 604_800 * SECOND),
    ],
)
def test_parse_time_reads_iso_epoch_and_relative_forms(text: str | float, ns: int) -> None:
    assert parse_time(text, NOW) == ns


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("yesterday", "since: cannot read 'yesterday' as a time: expected ISO 8601 "
         "(2024-05-01T12:00:00Z), epoch seconds, or a time before now like -15m or 2h"),
        ("-15x", "since: cannot read '-15x' as a time"),
        ("2023-13-01", "since: cannot read '2023-13-01' as a time"),
        ("", "since: cannot read '' as a time"),
        ("99999999999", "since: '99999999999' is outside 1970..2262"),
        ("-100000w", "since: '-100000w' is outside 1970..2262"),
        ("1969-12-31T23:59:59Z", "since: '1969-12-31T23:59:59Z' is outside 1970..2262"),
    ],
)  # fmt: skip
def test_parse_time_names_the_field_and_the_forms_it_reads(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_time(text, NOW, field="since")
    assert str(info.value).startswith(message)


# --- flows ------------------------------------------------------------------------------------


def test_filters_match_pandas_on_the_stored_records(data: ReadData, store: Store) -> None:
    rec, now = data.records, data.now
    web = next(v for v in data.cap.vms if v.name == "web-01")
    t0 = int(rec["first_ns"].min())
    cases: list[tuple[dict[str, Any], pd.Series]] = [
        ({}, rec["flow_id"] > 0),
        ({"vm": "web-01"}, (rec.src_vm == "web-01") | (rec.dst_vm == "web-01")),
        ({"vm": web.uuid.upper()}, (rec.src_vm == "web-01") | (rec.dst_vm == "web-01")),
        ({"scope": "cross-host"}, rec.scope == "cross-host"),
        ({"proto": "udp"}, rec.proto == 17),
        ({"proto": "6"}, rec.proto == 6),
        ({"ip": web.ipv4}, (rec.src_ip == web.ipv4) | (rec.dst_ip == web.ipv4)),
        ({"port": 443}, (rec.src_port == 443) | (rec.dst_port == 443)),
        ({"host": "hv01", "proto": "tcp"},
         ((rec.host == "hv01") | (rec.src_host == "hv01") | (rec.dst_host == "hv01")
          | rec.observed_at.map(lambda h: "hv01" in h)) & (rec.proto == 6)),
        ({"since": str((t0 + 3 * SECOND) / SECOND), "until": "2023-11-14T22:13:25Z"},
         (rec.last_ns >= t0 + 3 * SECOND) & (rec.first_ns < 1_700_000_005 * SECOND)),
        ({"since": "-62s"}, rec.last_ns >= int((now - 62) * SECOND)),
    ]  # fmt: skip
    for filters, expected in cases:
        want = rec[expected.fillna(False).astype(bool)]
        got = all_flows(store, now, **filters)
        assert sorted(ids(got)) == sorted(ids(want)), filters
        assert len(want) > 0, filters
    assert 0 < len(all_flows(store, now, since="-62s")) < len(rec)  # the relative form bites


def test_rows_are_the_records_as_stored(data: ReadData, store: Store) -> None:
    got = all_flows(store, data.now, sort="first")
    assert tuple(got.columns) == FLOW_COLUMNS
    want = data.records.sort_values("first_ns", ignore_index=True)
    cols = ["flow_id", "src_vm", "src_ip", "dst_port", "packets", "bytes_rev", "policy_verdict"]
    for col in cols:
        assert plain(got[col]) == plain(want[col]), col
    web = {v.name: v.uuid for v in data.cap.vms}
    assert plain(got["src_vm_uuid"]) == [web.get(n) for n in got["src_vm"]]
    assert got["flow_uid"].is_unique


@pytest.mark.parametrize("sort", [*FLOW_SORTS, *(f"-{s}" for s in FLOW_SORTS)])
def test_pages_return_every_flow_once_in_sort_order(
    store: Store, data: ReadData, sort: str
) -> None:
    column = FLOW_SORTS[sort.removeprefix("-")]
    pages, cursor = [], None
    while True:
        page = flows(store, sort=sort, limit=7, cursor=cursor, now=data.now)
        pages.append(page.flows)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    walked = pd.concat(pages, ignore_index=True)
    assert len(pages) == -(-len(data.records) // 7)
    assert sorted(ids(walked)) == sorted(ids(data.records))  # each flow exactly once
    keys = walked[column].tolist()
    assert keys == sorted(data.records[column].tolist(), reverse=sort.startswith("-"))
    ties = walked.groupby(column, sort=False)["flow_uid"]
    assert all(u.is_monotonic_increasing or u.is_monotonic_decreasing for _, u in ties)


def test_pages_are_stable_while_flows_are_appended(data: ReadData, tmp_path: Path) -> None:
    rec = data.records
    hour = 3600 * SECOND
    with Store(tmp_path) as store:
        store.append_flows(rec)
        first = flows(store, sort="first", limit=10, now=data.now)
        assert first.next_cursor is not None
        cursor_row = first.flows.iloc[-1]
        earlier = rec.assign(flow_id=rec.flow_id + 1000, first_ns=rec.first_ns - hour)
        later = rec.assign(flow_id=rec.flow_id + 2000, first_ns=rec.first_ns + hour)
        same = rec[rec.flow_id == cursor_row["flow_id"]].assign(flow_id=3000)  # a tie
        store.append_flows(pd.concat([earlier, later, same], ignore_index=True))
        rest, cursor = [], first.next_cursor
        while cursor is not None:
            page = flows(store, sort="first", limit=10, cursor=cursor, now=data.now)
            rest.append(page.flows)
            cursor = page.next_cursor
        walked = pd.concat(rest, ignore_index=True)
        after = all_flows(store, data.now, sort="first")
    position = after.index[after.flow_uid == cursor_row["flow_uid"]][0]
    assert ids(walked) == ids(after.iloc[position + 1 :])  # exactly what sorts after it
    seen = ids(first.flows) + ids(walked)
    assert sorted(i for i in seen if i < 1000) == sorted(ids(rec))  # none skipped or repeated
    assert not any(1000 < i < 2000 for i in seen)  # appended before the cursor: not shown
    assert sum(2000 < i < 3000 for i in seen) == len(rec)  # appended after it: shown


def encoded(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


UID = "3b6b5af2-7c4b-429b-83cd-a3a1f02d5f90"


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        encoded(["x"]),
        encoded(["-last", 1, "not-a-uuid"]),
        encoded(["-last", "1", UID]),
        encoded(["-last", 10**30, UID]),  # a key no column holds
        encoded({"sort": "-last"}),
    ],
)
def test_a_bad_cursor_is_refused(store: Store, cursor: str) -> None:
    with pytest.raises(ConfigError) as info:
        flows(store, cursor=cursor, now=NOW)
    assert str(info.value) == f"cursor: {cursor!r} is not a cursor this API made"


def test_a_cursor_belongs_to_its_sort(store: Store) -> None:
    page = flows(store, sort="bytes", limit=3, now=NOW)
    assert page.next_cursor is not None
    with pytest.raises(ConfigError, match=r"^cursor: made for sort=bytes, not sort=-last$"):
        flows(store, cursor=page.next_cursor, now=NOW)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"scope": "local"}, "scope: unknown scope 'local'; expected one of "
         "['intra-host', 'cross-host', 'external']"),
        ({"proto": "xyz"}, "proto: unknown protocol 'xyz'; expected a number or one of "
         "['icmp', 'tcp', 'udp', 'icmpv6', 'sctp']"),
        ({"proto": "300"}, "proto: protocol 300 is outside 0..255"),
        ({"ip": "10.0.0.300"}, "ip: expected an IPv4 or IPv6 address, got '10.0.0.300'"),
        ({"port": 70000}, "port: 70000 is outside 0..65535"),
        ({"limit": 0}, "limit: expected 1..10000, got 0"),
        ({"limit": 10001}, "limit: expected 1..10000, got 10001"),
        ({"sort": "size"}, "sort: unknown sort 'size'; expected one of first, -first, last, "
         "-last, bytes, -bytes, packets, -packets"),
        ({"vm": " "}, "vm: must not be empty"),
        ({"until": "soon"}, "until: cannot read 'soon' as a time"),
    ],
)  # fmt: skip
def test_bad_filters_name_the_argument(store: Store, filters: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        flows(store, now=NOW, **filters)
    assert str(info.value).startswith(message)


def test_json_rows_are_the_report_json(store: Store, data: ReadData) -> None:
    rows = json_rows(flows(store, limit=5, now=data.now).flows)
    assert [list(r) for r in rows] == [list(FLOW_COLUMNS)] * 5
    assert all(r["first"].endswith("Z") and len(r["first"]) == 27 for r in rows)
    icmp = json_rows(all_flows(store, data.now, proto="icmp"))
    assert icmp
    assert all(r["src_port"] is None and r["icmp_id"] is not None for r in icmp)


# --- violations, hits, migrations -------------------------------------------------------------


def test_violations_are_the_denied_flows_most_recent_first(data: ReadData, store: Store) -> None:
    rec = data.records
    denied = rec[rec.policy_verdict == "deny"].sort_values("last_ns", ascending=False)
    got = violations(store, limit=MAX_LIMIT, now=data.now)
    assert ids(got) == ids(denied)
    assert set(got["policy_verdict"]) == {"deny"}
    web = denied[(denied.src_vm == "web-01") | (denied.dst_vm == "web-01")]
    assert ids(violations(store, vm="web-01", limit=MAX_LIMIT, now=data.now)) == ids(web)
    late = denied[denied.last_ns >= int((data.now - 65) * SECOND)]
    assert ids(violations(store, since="-65s", limit=MAX_LIMIT, now=data.now)) == ids(late)
    assert ids(violations(store, limit=3, now=data.now)) == ids(denied)[:3]
    assert 0 < len(late) < len(denied)


def test_policy_hits_are_the_evaluations_counters(data: ReadData, store: Store) -> None:
    want = hit_rows(data.hits)
    got = policy_hits(store)
    assert tuple(got.columns) == HIT_COLUMNS
    key = ["rule", "vm_uuid"]
    merged = got.merge(want, on=key, suffixes=("", "_want"), validate="one_to_one")
    assert len(merged) == len(want) == len(got) > 10
    for col in ("flows", "packets", "bytes", "vm_name", "verdict"):
        assert merged[col].tolist() == merged[f"{col}_want"].tolist(), col

    def rank(rule: str) -> int:  # a profile's default ("db#default") comes last
        index = rule.split("#")[1]
        return int(index) if index.isdigit() else 10**6

    order = [(p, rank(r)) for p, r in zip(got.profile, got.rule, strict=True)]
    assert order == sorted(order)  # profiles in order, each one's default last
    db = policy_hits(store, profile="db")
    assert set(db["profile"]) == {"db"}
    assert len(db) == want["rule"].str.startswith("db#").sum()
    web = next(v for v in data.cap.vms if v.name == "web-01")
    by_name, by_uuid = policy_hits(store, vm="web-01"), policy_hits(store, vm=web.uuid)
    assert set(by_name["vm_uuid"]) == {web.uuid}
    assert by_name.equals(by_uuid)
    assert policy_hits(store, profile="nonesuch").empty


def test_migrations_latest_first_shown_oldest_first(data: ReadData, store: Store) -> None:
    got = migrations(store, now=data.now)
    assert tuple(got.columns) == MIGRATION_COLUMNS
    t0 = int(data.records["first_ns"].min())
    seconds = [(t - pd.Timestamp(t0, unit="ns", tz="UTC")).total_seconds() for t in got["time"]]
    assert seconds == pytest.approx([1, 4, 6, 8], abs=1e-6)
    assert got["to_host"].tolist() == data.migrations["to_host"].tolist()
    assert migrations(store, vm="web-01", now=data.now)["to_host"].tolist() == [
        "hv02", "hv03", "hv01",
    ]  # fmt: skip
    latest = migrations(store, limit=2, now=data.now)
    assert latest["to_host"].tolist() == ["hv03", "hv01"]
    since = str((t0 + 5 * SECOND) / SECOND)
    assert len(migrations(store, since=since, now=data.now)) == 2


# --- collectors -------------------------------------------------------------------------------


def test_collectors_latest_counters_rates_loss_and_drops(data: ReadData, store: Store) -> None:
    got = collectors(store)
    assert tuple(got.columns) == COLLECTOR_COLUMNS
    rows = {r["collector_id"]: r for r in json_rows(got)}
    # collector 1: 4 messages sent while the analyzer was stopped, apart from the network's
    # 5: the loss is 5 of the 300 - 1 duplicate + 5 + 4 messages sent
    assert rows[1] | {"time": None} == {
        "collector_id": 1, "restarts": 0, "time": None, "received": 300, "lost": 5, "kernel": 0,
        "missed_while_down": 4, "duplicates": 1, "reordered": 2, "frames": 3000,
        "bytes": 270_000, "loss": pytest.approx(5 / 308), "messages_per_s": 100.0,
        "frames_per_s": 1000.0, "bytes_per_s": 90_000.0, "invalid": 2,
        "drops": {"bad_auth": 2, "lost": 5, "missed_while_down": 4},
    }  # fmt: skip
    # collector 2: the analyzer's socket dropped 6 of its messages; the network lost none
    assert (rows[2]["messages_per_s"], rows[2]["loss"], rows[2]["drops"]) == (
        50.0, 0.0, {"bad_magic": 1, "kernel": 6},
    )  # fmt: skip
    assert (rows[2]["lost"], rows[2]["kernel"]) == (0, 6)
    # collector 3 restarted: both boots are in its last sample, summed; its rejects once
    assert (rows[3]["restarts"], rows[3]["received"], rows[3]["messages_per_s"]) == (1, 510, 10.0)
    assert rows[3]["drops"] == {"lost": 3, "unknown_collector": 4}
    assert rows[3]["invalid"] == 4


def test_live_samples_give_what_the_store_gives(data: ReadData, store: Store) -> None:
    assert json_rows(collectors(data.counters)) == json_rows(collectors(store))
    gone = data.counters[~((data.counters.collector_id == 3) & (data.counters.boot_id == 1)
                           & (data.counters.time > data.counters.time.min()))]  # fmt: skip
    row = collectors(gone).set_index("collector_id").loc[3]
    assert row["received"] == 10  # the sums went down: no rate
    assert pd.isna(row["messages_per_s"])
    assert pd.isna(row["bytes_per_s"])
    single = collectors(data.counters[data.counters.time == data.counters.time.min()])
    assert single["messages_per_s"].isna().all()


def test_an_empty_store_answers_empty_frames(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        page = flows(store, now=NOW)
        assert (tuple(page.flows.columns), len(page.flows), page.next_cursor) == (
            FLOW_COLUMNS, 0, None,
        )  # fmt: skip
        assert tuple(policy_hits(store, profile="web").columns) == HIT_COLUMNS
        assert violations(store, now=NOW).empty
        assert tuple(migrations(store, now=NOW).columns) == MIGRATION_COLUMNS
        assert tuple(collectors(store).columns) == COLLECTOR_COLUMNS
    assert tuple(collectors(pd.DataFrame()).columns) == COLLECTOR_COLUMNS  # no sample yet
    assert json_rows(collectors(pd.DataFrame())) == []
