"""The authorization policy (``api.auth``): ``check_access`` decided case by case from a
table written here, grants parsed, the tokens file checked; and the view routers behind the
gate over real HTTP. The walk of every route of the real app is ``test_route_walk.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vspan.api.auth import (
    AccessPolicy,
    AccessRequest,
    Grant,
    Role,
    check_access,
    is_loopback_host,
    load_tokens,
)
from vspan.errors import ConfigError
from vspan_testing.served import Served, serve_views

READ, ADMIN = "r-token-123456789", "a-token-456789012"
C7, ANY_C = "c7-token-12345678", "call-token-123456"
TOKENS = {READ: "read", ADMIN: "admin", C7: "collector:7", ANY_C: "collector"}
POLICY = AccessPolicy.of(TOKENS)
SESSION = {"name": "s1", "vms": ["web-01"]}
REGISTER = "/api/v1/control/collectors/7/register"
REGISTER_8 = "/api/v1/control/collectors/8/register"
ONLY_CONTROL = (403, "a collector token is only for /api/v1/control/collectors/{collector_id}/...")


def decide(
    policy: AccessPolicy, method: str, path: str, token: str | None = None, *,
    client: str | None = "10.0.0.5",
) -> tuple[int, str] | None:  # fmt: skip
    auth = None if token is None else f"Bearer {token}"
    refusal = check_access(policy, AccessRequest(method, path, auth, client))
    return None if refusal is None else (refusal.status, refusal.detail)


MISSING = (401, "missing bearer token")


@pytest.mark.parametrize(
    ("method", "path", "token", "want"),
    [
        ("GET", "/api/v1/flows", None, MISSING),
        ("GET", "/api/v1/flows", "not-a-known-token", (401, "unknown bearer token")),
        ("GET", "/api/v1/flows", READ, None),
        ("GET", "/metrics", READ, None),
        ("GET", "/metrics", None, MISSING),
        ("GET", "/api/v1/flows", C7, ONLY_CONTROL),
        ("POST", "/api/v1/sessions", READ, (403, "POST needs the admin role, token has read")),
        ("DELETE", "/api/v1/sessions/s1", ADMIN, None),
        ("POST", REGISTER, None, MISSING),
        ("POST", REGISTER, READ, (403, "the control plane needs a collector token, token has read")),
        ("POST", REGISTER, C7, None),
        ("POST", REGISTER_8, C7, (403, "the token is collector 7's, not 8's")),
        ("POST", "/api/v1/control/collectors/007/register", C7,
         (403, "the token is collector 7's, not 007's")),
        ("POST", REGISTER_8, ANY_C, None),
        ("POST", REGISTER_8, ADMIN, None),
        ("GET", "/api/v1/control/collectors/7/sessions", C7, None),
        # the collector itself is the inventory's, not the collector's: removing it is admin's
        ("GET", "/api/v1/control/collectors/7", C7, ONLY_CONTROL),
        ("DELETE", "/api/v1/control/collectors/7", C7, ONLY_CONTROL),
        ("DELETE", "/api/v1/control/collectors/7/", C7, ONLY_CONTROL),
        ("DELETE", "/api/v1/control/collectors/7", ANY_C, ONLY_CONTROL),
        ("DELETE", "/api/v1/control/collectors/7", READ,
         (403, "DELETE needs the admin role, token has read")),
        ("DELETE", "/api/v1/control/collectors/7", ADMIN, None),
        ("GET", "/api/v1/control/collectors", C7, ONLY_CONTROL),
        ("GET", "/api/v1/control/inventory", C7, ONLY_CONTROL),
        ("GET", "/api/v1/control/inventory", READ, None),
        ("GET", "/", None, None),
        ("GET", "/static/dashboard.js", None, None),
        ("GET", "/static", None, MISSING),
        ("GET", "/healthz", None, None),
        ("GET", "/openapi.json", None, None),
        ("GET", "/healthz/x", None, MISSING),
        ("GET", "/no/such/route", None, MISSING),
    ],
)  # fmt: skip
def test_the_policy_with_tokens(
    method: str, path: str, token: str | None, want: tuple[int, str] | None
) -> None:
    assert decide(POLICY, method, path, token) == want


@pytest.mark.parametrize(
    ("client", "allowed"),
    [("127.0.0.1", True), ("::1", True), ("127.8.9.1", True), ("10.0.0.5", False),
     ("2001:db8::1", False), (None, False), ("testclient", False)],
)  # fmt: skip
def test_without_tokens_only_loopback_clients_on_every_route(
    client: str | None, allowed: bool
) -> None:
    for policy in (AccessPolicy(), AccessPolicy.of(None), AccessPolicy.of({})):
        for method, route in (("GET", "/"), ("GET", "/healthz"), ("POST", REGISTER),
                              ("GET", "/metrics"), ("DELETE", "/api/v1/sessions/s1")):  # fmt: skip
            got = decide(policy, method, route, ADMIN, client=client)
            want = None if allowed else (403, "no API tokens configured: loopback clients only")
            assert got == want, (method, route)


def test_open_access_serves_every_client_without_a_token() -> None:
    policy = AccessPolicy.of(None, open=True)
    assert decide(policy, "POST", REGISTER, None, client="10.0.0.5") is None
    assert decide(policy, "DELETE", "/api/v1/sessions/s1", client="2001:db8::1") is None
    # With tokens, "open" changes nothing: tokens decide.
    assert decide(AccessPolicy.of(TOKENS, open=True), "GET", "/api/v1/flows") == MISSING


def test_bearer_scheme_is_case_insensitive_and_other_schemes_are_refused() -> None:
    route = "/api/v1/sessions/s1"
    assert check_access(POLICY, AccessRequest("DELETE", route, f"bearer {ADMIN}")) is None
    basic = check_access(POLICY, AccessRequest("GET", "/api/v1/flows", f"Basic {READ}"))
    assert basic is not None
    assert (basic.status, basic.detail) == (401, "unknown bearer token")
    assert decide(POLICY, "GET", "/api/v1/flows", READ.upper()) == (401, "unknown bearer token")


def test_grants_parse_and_print() -> None:
    assert Grant.parse("read") == Grant(Role.READ)
    assert Grant.parse(" collector:42 ") == Grant(Role.COLLECTOR, 42)
    assert str(Grant.parse("collector:42")) == "collector:42"
    for bad, message in (
        ("root", "expected the role read, admin, collector or collector:ID, got 'root'"),
        ("admin:3", "only a collector role takes an id, got 'admin:3'"),
        ("collector:0", "collector_id 0 out of range 1..4294967295"),
        ("collector:x", "expected the role read, admin, collector or collector:ID"),
    ):
        with pytest.raises(ValueError, match=message):
            Grant.parse(bad)
    with pytest.raises(ValueError, match="a token needs at least 16 characters"):
        AccessPolicy.of({"short": "read"})


def test_tokens_file_errors_name_the_line_not_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"{READ}: read\n{ADMIN}: admin\n{C7}: collector:7\n")
    assert load_tokens(str(path)) == {READ: "read", ADMIN: "admin", C7: "collector:7"}
    path.write_text(f"{READ}: read\n{ADMIN}: superuser\n")
    with pytest.raises(ConfigError) as caught:
        load_tokens(str(path))
    assert str(caught.value) == (
        f"{path}:2: expected the role read, admin, collector or collector:ID, got 'superuser'"
    )
    assert ADMIN not in str(caught.value)
    path.write_text("shorty: read\n")
    with pytest.raises(ConfigError, match=r":1: a token needs at least 16 characters"):
        load_tokens(str(path))


def test_loopback_hosts() -> None:
    assert is_loopback_host("127.0.0.1")
    assert is_loopback_host("[::1]")
    assert is_loopback_host("localhost")
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "no-such-host.invalid"):
        assert not is_loopback_host(host), host


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_views(tmp_path_factory.mktemp("auth"), tokens=TOKENS, read_api=False) as served:
        yield served


@pytest.mark.parametrize(
    "path", ["/api/v1/hosts", "/api/v1/vms", "/api/v1/top", "/api/v1/matrix", "/metrics",
             "/api/v1/sessions", "/api/v1/vms/web-01"],
)  # fmt: skip
def test_reads_need_a_token_of_either_role(served: Served, path: str) -> None:
    status, doc, headers = served.call("GET", path)
    assert (status, doc) == (401, {"detail": "missing bearer token"})
    assert headers["www-authenticate"] == "Bearer"
    assert served.call("GET", path, token="wrong")[:2] == (401, {"detail": "unknown bearer token"})
    assert served.call("GET", path, token=READ)[0] == 200
    assert served.call("GET", path, token=ADMIN)[0] == 200
    assert served.call("GET", path, token=C7)[0] == 403


def test_writes_need_the_admin_role(served: Served) -> None:
    assert served.call("POST", "/api/v1/sessions", SESSION)[0] == 401
    status, doc, _ = served.call("POST", "/api/v1/sessions", SESSION, token=READ)
    assert (status, doc) == (403, {"detail": "POST needs the admin role, token has read"})
    assert served.call("POST", "/api/v1/sessions", SESSION, token=ADMIN)[0] == 201
    for method, body in (("PUT", SESSION), ("DELETE", None)):
        assert served.call(method, "/api/v1/sessions/s1", body, token=READ)[0] == 403
    assert served.call("PUT", "/api/v1/sessions/s1", SESSION, token=ADMIN)[0] == 200
    assert served.call("DELETE", "/api/v1/sessions/s1", token=ADMIN)[0] == 204


def test_the_dashboard_page_itself_needs_no_token(served: Served) -> None:
    status, body, headers = served.call("GET", "/", raw=True)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"dashboard.js" in body
    assert served.call("GET", "/static/dashboard.js", raw=True)[0] == 200
