"""Bearer tokens on the view routers, over real HTTP: reads need a token of either role,
writes the admin role; 401 without (or with an unknown) token, 403 for the wrong role or,
with no tokens configured, for a client that is not on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import HTTPException

from vspan.api.auth import check_access, check_tokens
from vspan_testing.served import Served, serve_views

TOKENS = {"r-token-123": "read", "a-token-456": "admin"}
SESSION = {"name": "s1", "vms": ["web-01"]}


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
    assert served.call("GET", path, token="r-token-123")[0] == 200
    assert served.call("GET", path, token="a-token-456")[0] == 200


def test_writes_need_the_admin_role(served: Served) -> None:
    assert served.call("POST", "/api/v1/sessions", SESSION)[0] == 401
    status, doc, _ = served.call("POST", "/api/v1/sessions", SESSION, token="r-token-123")
    assert (status, doc) == (403, {"detail": "POST needs the admin role, token has read"})
    assert served.call("POST", "/api/v1/sessions", SESSION, token="a-token-456")[0] == 201
    for method, body in (("PUT", SESSION), ("DELETE", None)):
        assert served.call(method, "/api/v1/sessions/s1", body, token="r-token-123")[0] == 403
    assert served.call("PUT", "/api/v1/sessions/s1", SESSION, token="a-token-456")[0] == 200
    assert served.call("DELETE", "/api/v1/sessions/s1", token="a-token-456")[0] == 204


def test_the_dashboard_page_itself_needs_no_token(served: Served) -> None:
    status, body, headers = served.call("GET", "/", raw=True)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"dashboard.js" in body


@pytest.mark.parametrize(
    ("client", "allowed"),
    [("127.0.0.1", True), ("::1", True), ("127.8.9.1", True), ("10.0.0.5", False),
     ("2001:db8::1", False), (None, False), ("testclient", False)],
)  # fmt: skip
def test_without_tokens_only_loopback_clients(client: str | None, allowed: bool) -> None:
    for method in ("GET", "POST"):
        if allowed:
            check_access(None, method=method, authorization=None, client=client)
            continue
        with pytest.raises(HTTPException) as caught:
            check_access({}, method=method, authorization="Bearer x", client=client)
        assert caught.value.status_code == 403
        assert caught.value.detail == "no API tokens configured: loopback clients only"


def test_tokens_from_any_client_and_scheme_is_case_insensitive() -> None:
    check_access(TOKENS, method="DELETE", authorization="bearer a-token-456", client="10.0.0.5")
    with pytest.raises(HTTPException) as caught:
        check_access(TOKENS, method="GET", authorization="Basic a-token-456", client="127.0.0.1")
    assert caught.value.status_code == 401


def test_token_config_is_checked() -> None:
    with pytest.raises(ValueError, match="token role 'root' is not one of"):
        check_tokens({"t": "root"})
    with pytest.raises(ValueError, match="empty token"):
        check_tokens({" ": "read"})
    assert check_tokens(TOKENS) == TOKENS
