"""The API answers bad requests with a 4xx that says why, and never a 5xx on an empty
analyzer: a real ``Analyzer`` with no inventory and no traffic, ``create_app`` served on a
free loopback port, every route found by walking its OpenAPI document."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan.api.server import HttpServer, create_app
from vspan.collectors.control.client import ControlClient
from vspan_testing.served import Client

READ, ADMIN = "strict-read-0123456789", "strict-admin-0123456789"


@pytest.fixture(scope="module")
def empty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    folder = tmp_path_factory.mktemp("empty")
    analyzer = Analyzer(AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(folder)))
    analyzer.start()
    server = HttpServer(create_app(analyzer, tokens={READ: "read", ADMIN: "admin"}), "127.0.0.1", 0)
    try:
        server.start()
        yield Client(f"http://127.0.0.1:{server.port}")
    finally:
        server.stop()
        analyzer.stop()


def routes(client: Client) -> list[tuple[str, str]]:
    doc = client.get("/openapi.json")
    return sorted((m.upper(), p) for p, ops in doc["paths"].items() for m in ops)


def concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", template.replace("{collector_id}", "1"))


def test_every_get_route_of_an_empty_analyzer_answers_without_a_server_error(
    empty: Client,
) -> None:
    answers = {p: empty.call("GET", concrete(p), token=READ)[:2] for m, p in routes(empty)
               if m == "GET"}  # fmt: skip
    assert len(answers) >= 20
    assert {p: a for p, a in answers.items() if not 200 <= a[0] < 500} == {}
    refused = {p: a for p, a in answers.items() if a[0] >= 400}
    assert all(isinstance(doc, dict) and doc.get("detail") for _, doc in refused.values())
    assert answers["/api/v1/hosts"] == (200, {"hosts": []})  # was a 500 with no inventory


def test_hosts_of_a_registered_collector_without_traffic(empty: Client) -> None:
    ControlClient(empty.url, 4, token=ADMIN).register("hv04", [])
    hosts = empty.get("/api/v1/hosts", token=READ)["hosts"]
    assert [(h["name"], h["collector_id"], h["vms"], h["flows"]) for h in hosts] == [
        ("hv04", 4, 0, 0)
    ]


def test_every_route_refuses_an_unknown_query_parameter(empty: Client) -> None:
    wrong = {}
    for method, template in routes(empty):
        body = None if method in ("GET", "DELETE") else {}
        status, doc, _ = empty.call(method, concrete(template) + "?walk_unknown=1", body,
                                    token=ADMIN)  # fmt: skip
        if status != 422 or "unknown query parameter 'walk_unknown'" not in str(doc):
            wrong[(method, template)] = (status, doc)
    assert wrong == {}


def test_the_issues_verdict_filter_is_refused_not_ignored(empty: Client) -> None:
    status, doc, _ = empty.call("GET", "/api/v1/flows?verdict=deny", token=READ)
    assert status == 422
    assert doc["detail"].startswith("unknown query parameter 'verdict'; this route takes: cursor,")


@pytest.mark.parametrize(
    ("query", "status", "detail"),
    [
        ("vm=" + "a" * 5000, 422, "vm: 5000 characters, at most 1024"),
        ("vm=" + "a" * 1000, 404, "unknown VM 'aaaa"),
        ("vm=%00", 422, "vm: control characters (NUL, ...) are not allowed"),
        ("vm=web%0d%0a01", 422, "vm: control characters (NUL, ...) are not allowed"),
        ("vm=%ff", 422, "the query string is not UTF-8 (after %-decoding)"),
        ("vm=%", 404, "unknown VM '%'"),
        ("vm=%zz", 404, "unknown VM '%zz'"),
        ("vm=" + quote("wéb/../..") , 404, "unknown VM 'wéb/../..'"),
        ("flow=" + "9" * 40, 422, "flow: 999999999999999999999999… is no flow_id (too large)"),
        ("format=pcap&format=pcapng", 422, "format: given more than once"),
        ("%00=1", 422, "a query parameter name holds control characters"),
        ("x" * 3000 + "=1", 422, "unknown query parameter 'xxxx"),
    ],
)  # fmt: skip
def test_odd_and_long_values_get_a_reason(
    empty: Client, query: str, status: int, detail: str
) -> None:
    got, doc, _ = empty.call("GET", f"/api/v1/pcap?{query}", token=READ)
    assert got == status
    assert doc["detail"].startswith(detail)
    assert len(doc["detail"]) < 2000


def test_list_parameters_may_repeat(empty: Client) -> None:
    status, doc, _ = empty.call(
        "GET", "/api/v1/predictions/placement?pin=a&pin=b&anti_affinity=a,b", token=READ
    )
    assert status != 422 or "more than once" not in str(doc)
    assert status < 500


def test_a_heartbeat_cannot_grow_the_metrics_without_bound(empty: Client) -> None:
    """Drop reasons become label values of /metrics: at most 32, short plain names."""
    client = ControlClient(empty.url, 5, token=ADMIN)
    client.register("hv05", [])
    many = {f"reason_{i}": 1 for i in range(33)}
    for dropped, why in ((many, "at most 32 items"), ({"Bad Reason": 1}, "should match pattern")):
        status, doc, _ = empty.call(
            "POST", "/api/v1/control/collectors/5/heartbeat", {"time": 1.0, "dropped": dropped},
            token=ADMIN,
        )  # fmt: skip
        assert status == 422
        assert why in str(doc)
    client.heartbeat({"time": 1.0, "dropped": {"oversize": 1}})
