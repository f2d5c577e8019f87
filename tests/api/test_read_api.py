"""The read API over real HTTP: uvicorn on 127.0.0.1 serving a store filled from the
simulator, every endpoint checked against pandas on the stored records (and against the
query functions it calls), its pages walked by cursor, and each bad parameter a 422 that
says why. The clock and the counter source are replaced through ``dependency_overrides``."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest
from fastapi import FastAPI

from vspan.analysis.store.persist import hit_rows
from vspan.analysis.store.queries import (
    COLLECTOR_COLUMNS,
    FLOW_COLUMNS,
    HIT_COLUMNS,
    MIGRATION_COLUMNS,
    json_rows,
    policy_hits,
)
from vspan.analysis.store.store import Store
from vspan.api.app import create_read_app
from vspan.api.deps import get_counter_samples, get_now
from vspan.api.models import CollectorRow, FlowRow, MigrationRow, PolicyHitRow
from vspan_testing.readstore import SECOND, ReadData, build, serve


@dataclass
class Served:
    url: str
    app: FastAPI
    data: ReadData
    store: Store

    def get(self, path: str, **params: Any) -> tuple[int, Any]:
        """(status, JSON) of a GET; error answers too."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = self.url + path + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ok(self, path: str, **params: Any) -> Any:
        status, doc = self.get(path, **params)
        assert status == 200, doc
        return doc


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = build(tmp_path_factory.mktemp("data"))
    with Store(data.data_dir, read_only=True) as store:
        app = create_read_app(store)
        app.dependency_overrides[get_now] = lambda: data.now
        with serve(app) as url:
            yield Served(url, app, data, store)


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return [r["flow_id"] for r in rows]


def test_healthz(served: Served) -> None:
    assert served.get("/healthz") == (200, {"status": "ok", "ready": True})


def test_models_have_the_columns_of_the_queries() -> None:
    assert tuple(FlowRow.model_fields) == FLOW_COLUMNS
    assert tuple(PolicyHitRow.model_fields) == HIT_COLUMNS
    assert tuple(MigrationRow.model_fields) == MIGRATION_COLUMNS
    assert tuple(CollectorRow.model_fields) == (*COLLECTOR_COLUMNS, "capture")


def test_flows_of_a_vm_are_its_records(served: Served) -> None:
    rec = served.data.records
    doc = served.ok("/api/v1/flows", vm="web-01", limit=10000)
    want = rec[(rec.src_vm == "web-01") | (rec.dst_vm == "web-01")]
    assert sorted(ids(doc["flows"])) == sorted(want["flow_id"].tolist())
    assert doc["next_cursor"] is None
    row = doc["flows"][0]
    assert list(row) == list(FLOW_COLUMNS)
    record = rec.set_index("flow_id").loc[row["flow_id"]]
    assert row["first"] == pd.Timestamp(record["first_ns"], unit="ns", tz="UTC").strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    assert (row["src_ip"], row["packets"], row["bytes_rev"], row["policy_verdict"]) == (
        record["src_ip"], record["packets"], record["bytes_rev"], record["policy_verdict"],
    )  # fmt: skip
    assert [r["last_ns"] for r in doc["flows"]] == sorted(
        (r["last_ns"] for r in doc["flows"]), reverse=True
    )  # -last by default


def test_filters_over_http_match_pandas(served: Served) -> None:
    rec, now = served.data.records, served.data.now
    cases: list[tuple[dict[str, Any], pd.Series]] = [
        ({"scope": "external", "proto": "tcp"}, (rec.scope == "external") & (rec.proto == 6)),
        ({"port": 53}, (rec.src_port == 53) | (rec.dst_port == 53)),
        ({"since": "-62s"}, rec.last_ns >= int((now - 62) * SECOND)),  # the overridden clock
        ({"host": "hv03", "until": "2023-11-14T22:13:24Z"},
         ((rec.host == "hv03") | (rec.src_host == "hv03") | (rec.dst_host == "hv03")
          | rec.observed_at.map(lambda h: "hv03" in h)) & (rec.first_ns < 1_700_000_004 * SECOND)),
    ]  # fmt: skip
    for params, expected in cases:
        want = rec[expected.fillna(False).astype(bool)]
        got = served.ok("/api/v1/flows", limit=10000, **params)["flows"]
        assert sorted(ids(got)) == sorted(want["flow_id"].tolist()), params
        assert 0 < len(want) < len(rec), params


def test_pages_walked_by_cursor_hold_every_flow_once(served: Served) -> None:
    rows, cursor, pages = [], None, 0
    while True:
        doc = served.ok("/api/v1/flows", sort="bytes", limit=9, cursor=cursor)
        rows += doc["flows"]
        pages += 1
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    rec = served.data.records
    assert pages == -(-len(rec) // 9)
    assert sorted(ids(rows)) == sorted(rec["flow_id"].tolist())
    assert [r["bytes"] for r in rows] == sorted(rec["bytes"].tolist())


def test_violations_are_the_denied_flows(served: Served) -> None:
    rec = served.data.records
    denied = rec[rec.policy_verdict == "deny"].sort_values("last_ns", ascending=False)
    doc = served.ok("/api/v1/violations", limit=10000)
    assert ids(doc["violations"]) == denied["flow_id"].tolist()
    web = denied[(denied.src_vm == "web-02") | (denied.dst_vm == "web-02")]
    got = served.ok("/api/v1/violations", vm="web-02", limit=5)["violations"]
    assert ids(got) == web["flow_id"].tolist()[:5]
    assert {r["policy_verdict"] for r in got} == {"deny"}


def test_policy_hits_add_up_the_evaluation(served: Served) -> None:
    doc = served.ok("/api/v1/policies/hits", profile="db")
    assert doc["hits"] == json_rows(policy_hits(served.store, profile="db"))
    want = hit_rows(served.data.hits)
    want = want[want["rule"].str.startswith("db#")]
    assert sorted((h["rule"], h["vm_uuid"], h["flows"], h["bytes"]) for h in doc["hits"]) == sorted(
        zip(want["rule"], want["vm_uuid"], want["flows"], want["bytes"], strict=True)
    )
    assert len(served.ok("/api/v1/policies/hits")["hits"]) == len(hit_rows(served.data.hits))
    db01 = served.ok("/api/v1/policies/hits", vm="db-01")["hits"]
    assert db01
    assert {h["vm_name"] for h in db01} == {"db-01"}


def test_migrations_of_a_vm(served: Served) -> None:
    doc = served.ok("/api/v1/migrations", vm="web-01")
    assert [(m["from_host"], m["to_host"], m["source"]) for m in doc["migrations"]] == [
        (None, "hv02", "inventory"),
        ("hv02", "hv03", "inventory"),
        ("hv03", "hv01", "dataplane"),
    ]
    assert list(doc["migrations"][0]) == list(MIGRATION_COLUMNS)
    assert len(served.ok("/api/v1/migrations", since="-63s")["migrations"]) == 1


def test_collectors_from_the_store_and_from_a_live_source(served: Served) -> None:
    rows = served.ok("/api/v1/collectors")["collectors"]
    assert [r["collector_id"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert (first["messages_per_s"], first["bytes_per_s"], first["drops"]) == (
        100.0, 90_000.0, {"bad_auth": 2, "lost": 5, "missed_while_down": 4},
    )  # fmt: skip
    # sent 300 - 1 duplicate + 5 lost + 4 missed: the network lost 5 of 308, not 9
    assert (first["missed_while_down"], first["lost"]) == (4, 5)
    assert first["loss"] == pytest.approx(5 / 308)
    live = served.data.counters[served.data.counters.collector_id == 2]
    served.app.dependency_overrides[get_counter_samples] = lambda: live
    try:
        rows = served.ok("/api/v1/collectors")["collectors"]
    finally:
        del served.app.dependency_overrides[get_counter_samples]
    assert [(r["collector_id"], r["frames_per_s"]) for r in rows] == [(2, 500.0)]


@pytest.mark.parametrize(
    ("path", "params", "detail"),
    [
        ("/api/v1/flows", {"since": "soon"}, "since: cannot read 'soon' as a time: expected "
         "ISO 8601 (2024-05-01T12:00:00Z), epoch seconds, or a time before now like -15m or 2h"),
        ("/api/v1/flows", {"scope": "local"}, "scope: unknown scope 'local'"),
        ("/api/v1/flows", {"proto": "xyz"}, "proto: unknown protocol 'xyz'"),
        ("/api/v1/flows", {"ip": "1.2.3"}, "ip: expected an IPv4 or IPv6 address, got '1.2.3'"),
        ("/api/v1/flows", {"port": 70000}, "port: 70000 is outside 0..65535"),
        ("/api/v1/flows", {"limit": 0}, "limit: expected 1..10000, got 0"),
        ("/api/v1/flows", {"sort": "size"}, "sort: unknown sort 'size'"),
        ("/api/v1/flows", {"cursor": "zzz"}, "cursor: 'zzz' is not a cursor this API made"),
        ("/api/v1/violations", {"until": "tomorrow"}, "until: cannot read 'tomorrow'"),
        ("/api/v1/violations", {"limit": 20000}, "limit: expected 1..10000, got 20000"),
        ("/api/v1/migrations", {"since": "-15x"}, "since: cannot read '-15x'"),
        ("/api/v1/policies/hits", {"vm": ""}, "vm: must not be empty"),
    ],
)  # fmt: skip
def test_bad_parameters_are_422_with_the_reason(
    served: Served, path: str, params: dict[str, Any], detail: str
) -> None:
    status, doc = served.get(path, **params)
    assert status == 422
    assert doc["detail"].startswith(detail)


def test_a_parameter_of_the_wrong_type_is_fastapis_422(served: Served) -> None:
    status, doc = served.get("/api/v1/flows", port="https")
    assert status == 422
    assert [d["loc"] for d in doc["detail"]] == [["query", "port"]]


def test_openapi_documents_every_route(served: Served) -> None:
    paths = served.ok("/openapi.json")["paths"]
    assert set(paths) >= {
        "/healthz", "/api/v1/flows", "/api/v1/violations", "/api/v1/policies/hits",
        "/api/v1/migrations", "/api/v1/collectors",
    }  # fmt: skip
    assert "422" in paths["/api/v1/flows"]["get"]["responses"]
