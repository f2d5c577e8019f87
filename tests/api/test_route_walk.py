"""Every route of the real app, found by walking its OpenAPI document, called over real HTTP
with no token and with each role's token: a real ``Analyzer`` in a temporary data directory,
``create_app`` with a tokens map, uvicorn on a free loopback port. A route added later is
walked without touching this test. The policy expected here is written out independently of
``api.auth``: public routes answer anyone; a collector's control-plane routes answer its
own collector token or admin; every other route answers read tokens on GET and admin.

Then, from a client address that is not loopback (inside a network namespace of the test's
own, with a veth pair): without tokens every route is refused, public ones included;
``vspan analyze`` there with ``--insecure-listen`` serves it, with ``--tokens`` asks it for
a token."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan.api.server import HttpServer, create_app
from vspan_testing.netlab import in_netns, lab_unavailable

READ, ADMIN = "walk-read-0123456789", "walk-admin-0123456789"
MINE, OTHER = "walk-collector-1-abcdef", "walk-collector-2-abcdef"
TOKENS = {READ: "read", ADMIN: "admin", MINE: "collector:1", OTHER: "collector:2"}
ROLES: dict[str, str | None] = {
    "none": None, "read": READ, "collector 1": MINE, "collector 2": OTHER, "admin": ADMIN
}  # fmt: skip
PUBLIC = {"/healthz"}
"""Public routes in the OpenAPI document (the dashboard's page and files are not in it)."""
OWN_COLLECTOR = "/api/v1/control/collectors/{collector_id}"


@dataclass(frozen=True)
class Live:
    url: str
    operations: list[tuple[str, str]]
    """(method, path template) of every operation in the OpenAPI document."""


def call(
    url: str, method: str, path: str, token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    """(status, JSON or bytes) of a request; error answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload, kind = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, payload, kind = exc.code, exc.read(), exc.headers
    if "json" in (kind.get("content-type") or "") and payload:
        return status, json.loads(payload)
    return status, payload


def operations(url: str) -> list[tuple[str, str]]:
    status, doc = call(url, "GET", "/openapi.json")
    assert status == 200
    return sorted((m.upper(), p) for p, ops in doc["paths"].items() for m in ops)


def concrete(template: str) -> str:
    """The template with its path parameters filled: collector 1, other names made up."""
    path = template.replace("{collector_id}", "1")
    return re.sub(r"\{[^}]+\}", "walk-x", path)


def allowed(method: str, template: str, role: str) -> bool:
    """The policy, written out here: may ``role`` call ``method template``?"""
    if template in PUBLIC:
        return True
    if role == "none":
        return False
    if role == "admin":
        return True
    if template.startswith(OWN_COLLECTOR + "/"):  # the routes below a collector are its own;
        return role == "collector 1"  # the collector itself (DELETE) is the inventory's
    if role.startswith("collector"):
        return False
    return method in ("GET", "HEAD")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("walk")
    analyzer = Analyzer(AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(folder)))
    analyzer.start()
    server = HttpServer(create_app(analyzer, tokens=TOKENS), "127.0.0.1", 0)
    try:
        server.start()
        url = f"http://127.0.0.1:{server.port}"
        yield Live(url, operations(url))
    finally:
        server.stop()
        analyzer.stop()


def test_the_walk_sees_every_kind_of_route(live: Live) -> None:
    found = set(live.operations)
    for op in (("GET", "/api/v1/flows"), ("POST", "/api/v1/sessions"), ("GET", "/metrics"),
               ("POST", OWN_COLLECTOR + "/register"), ("GET", "/api/v1/control/inventory"),
               ("DELETE", "/api/v1/sessions/{name}"), ("GET", "/api/v1/status"),
               ("DELETE", OWN_COLLECTOR)):  # fmt: skip
        assert op in found
    assert len(found) >= 25


@pytest.mark.parametrize("role", list(ROLES))
def test_every_route_answers_each_role_as_the_policy_says(live: Live, role: str) -> None:
    wrong = []
    for method, template in live.operations:
        body = None if method in ("GET", "DELETE") else {}
        status, doc = call(live.url, method, concrete(template), ROLES[role], body)
        if allowed(method, template, role):
            ok = status not in (401, 403) and status < 500
        else:
            ok = status == (401 if role == "none" else 403) and isinstance(doc, dict)
            ok = ok and bool(doc.get("detail"))
        if not ok:
            wrong.append((method, template, status, doc if isinstance(doc, dict) else b"..."))
    assert not wrong, wrong


def test_routes_outside_the_document(live: Live) -> None:
    """The dashboard's page and files and the OpenAPI viewer need no token; the metrics'
    second address does."""
    for path in ("/", "/?poll=700&vm=web-01&bin=1&window=-1h", "/static/dashboard.js",
                 "/static/dashboard.js?v=2", "/docs", "/openapi.json"):  # fmt: skip
        assert call(live.url, "GET", path)[0] == 200, path
    assert call(live.url, "GET", "/?verdict=deny")[0] == 422
    assert call(live.url, "GET", "/api/v1/metrics")[0] == 401
    assert call(live.url, "GET", "/api/v1/metrics", READ)[0] == 200
    assert call(live.url, "GET", "/api/v1/no-such-route") == (
        401, {"detail": "missing bearer token"}
    )  # fmt: skip
    assert call(live.url, "GET", "/api/v1/no-such-route", READ)[0] == 404


def test_an_anonymous_register_moves_nothing(live: Live) -> None:
    """The issue's attack: an anonymous registration placing a VM on a made-up host."""
    body = {"host": "made-up", "ports": [{"vif": 1, "vm_name": "web-01", "mac": None}]}
    assert call(live.url, "POST", "/api/v1/control/collectors/9/register", None, body)[0] == 401
    assert call(live.url, "POST", "/api/v1/control/collectors/9/register", MINE, body)[0] == 403
    status, doc = call(live.url, "GET", "/api/v1/control/inventory", READ)
    assert (status, doc) == (200, {"hosts": [], "vms": []})


# --- from a client that is not on loopback --------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with ``lo`` and a veth pair, one end 10.250.0.1/24, all up."""
    if (reason := lab_unavailable()) is not None:
        pytest.skip(reason)
    ns = f"vswalk-{secrets.token_hex(3)}"
    steps = [["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"],
             ["ip", "-n", ns, "link", "add", "w0", "type", "veth", "peer", "name", "w1"],
             ["ip", "-n", ns, "addr", "add", "10.250.0.1/24", "dev", "w0"],
             ["ip", "-n", ns, "link", "set", "w0", "up"],
             ["ip", "-n", ns, "link", "set", "w1", "up"]]  # fmt: skip
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=30)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)


def call_in(ns: str, url: str, method: str, path: str, token: str | None = None) -> int:
    """A request from inside ``ns`` (the socket is made there); its status."""
    with in_netns(ns):
        return call(url, method, path, token, None if method in ("GET", "DELETE") else {})[0]


@pytest.mark.root
def test_without_tokens_a_non_loopback_client_is_refused_everywhere(
    live: Live, netns: str, tmp_path: Path
) -> None:
    analyzer = Analyzer(AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path)))
    analyzer.start()
    server = HttpServer(create_app(analyzer), "0.0.0.0", 0)
    try:
        with in_netns(netns):  # the server's thread is born in the namespace
            server.start()
        far, near = f"http://10.250.0.1:{server.port}", f"http://127.0.0.1:{server.port}"
        paths = [*live.operations, ("GET", "/"), ("GET", "/static/dashboard.js")]
        refused = [call_in(netns, far, m, concrete(p)) for m, p in paths]
        assert refused == [403] * len(paths)
        served = {p: call_in(netns, near, "GET", concrete(p)) for m, p in paths if m == "GET"}
        assert not {p: s for p, s in served.items() if s in (401, 403) or s >= 500}, served
    finally:
        server.stop()
        analyzer.stop()


def analyze_in(ns: str, folder: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """``vspan analyze --http 0.0.0.0:0`` inside ``ns``; the process and its API URL on the
    namespace's non-loopback address."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "vspan.cli", "analyze",
            "--http", "0.0.0.0:0", "--udp", "127.0.0.1:0", "--tcp", "off",
            "--data-dir", str(folder), *flags]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline, seen = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if (found := re.search(r"API on http://0\.0\.0\.0:(\d+)/", line)) is not None:
            return proc, seen + f"\nhttp://10.250.0.1:{found.group(1)}"
        if not line and proc.poll() is not None:
            break
    stop(proc)
    raise AssertionError(f"vspan analyze did not start:\n{seen}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.root
@pytest.mark.slow
def test_vspan_analyze_on_a_non_loopback_address(netns: str, tmp_path: Path) -> None:
    proc, out = analyze_in(netns, tmp_path / "open", "--insecure-listen")
    try:
        url = out.rsplit("\n", 1)[1]
        assert "WARNING: insecure listen: serving the API" in out
        assert call_in(netns, url, "GET", "/api/v1/flows") == 200
        assert call_in(netns, url, "POST", "/api/v1/sessions") == 422  # reached the handler
    finally:
        stop(proc)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"{READ}: read\n")
    proc, out = analyze_in(netns, tmp_path / "tokens", "--tokens", str(tokens))
    try:
        url = out.rsplit("\n", 1)[1]
        assert "WARNING" not in out
        assert call_in(netns, url, "GET", "/api/v1/flows") == 401
        assert call_in(netns, url, "GET", "/api/v1/flows", READ) == 200
        assert call_in(netns, url, "POST", "/api/v1/sessions", READ) == 403
    finally:
        stop(proc)
