"""Who may call what: the one authorization policy of every route of the analyzer's app.

Tokens (``--tokens FILE``, a YAML mapping ``token: role``) carry one of three roles::

    read           GET and HEAD of every route except a collector's control-plane routes
    admin          every route, every method
    collector      only /api/v1/control/collectors/{collector_id}/... (register, heartbeat,
    collector:ID   sessions, profiles); with ``:ID`` only for that collector_id. The
                   collector itself (``/api/v1/control/collectors/{collector_id}``, whose
                   DELETE removes it from the inventory) is not a collector's: admin only

Public paths (``PUBLIC``, and ``/static/...``: the dashboard's page and files,
``/healthz``, the OpenAPI document and its viewers) hold no data and need no token. Every
other path, ``/metrics`` included, needs a token: none, or an unknown one, is a 401 with
``WWW-Authenticate: Bearer``; a token whose role does not allow the request is a 403 that
says why. With no tokens configured, only loopback clients are served, on every path
(public ones too) — unless the policy is ``open`` (``--insecure-listen``): then every
client is served.

The rules are on the request's path, as a reverse proxy's would be: a path under
``/api/v1/control/collectors/ID/`` can only reach a collector's routes, ``/static/`` only
the dashboard's files, so deciding before routing cannot let a request past its route's
rule. ``check_access`` decides from an ``AccessRequest`` alone (no I/O, no framework);
``api.gate`` applies it to every request before routing. ``load_tokens`` reads the file.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from vspan.errors import ConfigError
from vspan.yamlconf import load_file

__all__ = [
    "COLLECTOR_ROUTES",
    "PUBLIC",
    "READ_METHODS",
    "AccessPolicy",
    "AccessRequest",
    "Grant",
    "Refusal",
    "Role",
    "check_access",
    "is_loopback_host",
    "load_tokens",
]

READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC: Final = frozenset(
    {"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
"""Paths served without a token (and every path under ``/static/``): they hold no data."""
COLLECTOR_ROUTES: Final = "/api/v1/control/collectors/{collector_id}"
"""The paths (and those below) that a collector token may call, for its own id."""
_COLLECTOR_PATH: Final = re.compile(r"/api/v1/control/collectors/([^/]+)/[^/]")
"""The routes below a collector (not the collector itself: removing it is an admin's)."""
MIN_TOKEN: Final = 16
_GRANT: Final = re.compile(r"(read|admin|collector)(?::(\d{1,10}))?")
_MAX_ID: Final = 2**32 - 1


class Role(StrEnum):
    """What a token may do."""

    READ = "read"
    ADMIN = "admin"
    COLLECTOR = "collector"


@dataclass(frozen=True, slots=True)
class Grant:
    """A token's role; for ``collector``, the one collector_id it speaks for (None: any)."""

    role: Role
    collector_id: int | None = None

    @classmethod
    def parse(cls, text: str) -> Grant:
        """``read``, ``admin``, ``collector`` or ``collector:ID``; ``ValueError`` otherwise."""
        match = _GRANT.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"expected the role read, admin, collector or collector:ID, got {text!r}"
            )
        role, cid = Role(match.group(1)), match.group(2)
        if cid is not None and role is not Role.COLLECTOR:
            raise ValueError(f"only a collector role takes an id, got {text!r}")
        if cid is not None and not 1 <= int(cid) <= _MAX_ID:
            raise ValueError(f"collector_id {cid} out of range 1..{_MAX_ID}")
        return cls(role, None if cid is None else int(cid))

    def __str__(self) -> str:
        return self.role if self.collector_id is None else f"{self.role}:{self.collector_id}"


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Bearer tokens and their grants; None: no tokens (loopback clients only, or all if
    ``open``)."""

    tokens: Mapping[str, Grant] | None = None
    open: bool = False
    """With no tokens: serve every client (``--insecure-listen``), not only loopback ones."""

    @classmethod
    def of(cls, tokens: Mapping[str, str] | None, *, open: bool = False) -> AccessPolicy:
        """The policy of ``token → role text`` (``ValueError`` naming a bad one)."""
        if tokens is None:
            return cls(None, open)
        grants: dict[str, Grant] = {}
        for token, role in tokens.items():
            if len(token.strip()) < MIN_TOKEN:
                raise ValueError(f"a token needs at least {MIN_TOKEN} characters")
            grants[token.strip()] = Grant.parse(role)
        return cls(grants or None, open)


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """What the policy looks at: the method, the path (%-decoded), the ``Authorization``
    header and the client's address."""

    method: str
    path: str
    authorization: str | None = None
    client: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP answer that refuses a request: status and reason (the ``detail``)."""

    status: int
    detail: str
    headers: Mapping[str, str] = field(default_factory=dict)


def check_access(policy: AccessPolicy, request: AccessRequest) -> Refusal | None:
    """The refusal of ``request`` under ``policy``, or None when it may go on."""
    if policy.tokens is None:
        if policy.open or _loopback(request.client):
            return None
        return Refusal(403, "no API tokens configured: loopback clients only")
    if request.path in PUBLIC or request.path.startswith("/static/"):
        return None
    grant = _grant(policy.tokens, request.authorization)
    if grant is None:
        reason = "missing bearer token" if not request.authorization else "unknown bearer token"
        return Refusal(401, reason, {"WWW-Authenticate": "Bearer"})
    if grant.role is Role.ADMIN:
        return None
    method = request.method.upper()
    collector = _COLLECTOR_PATH.match(request.path)
    if collector is not None:
        if grant.role is not Role.COLLECTOR:
            return Refusal(403, f"the control plane needs a collector token, token has {grant}")
        if grant.collector_id is not None and collector.group(1) != str(grant.collector_id):
            shown = collector.group(1)[:24]
            return Refusal(403, f"the token is collector {grant.collector_id}'s, not {shown}'s")
        return None
    if grant.role is Role.COLLECTOR:
        return Refusal(403, f"a collector token is only for {COLLECTOR_ROUTES}/...")
    if method not in READ_METHODS:
        return Refusal(403, f"{method} needs the admin role, token has {grant}")
    return None


def _grant(tokens: Mapping[str, Grant], authorization: str | None) -> Grant | None:
    scheme, _, given = (authorization or "").partition(" ")
    secret = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not secret:
        return None
    found = None
    for token, grant in tokens.items():  # compare with every token, in constant time
        if hmac.compare_digest(token.encode(), secret):
            found = grant
    return found


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` (an address or a name) reaches loopback clients only."""
    if _loopback(host.strip("[]")):
        return True
    if not host or host in ("0.0.0.0", "::"):
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(_loopback(str(info[4][0])) for info in infos)


def load_tokens(path: str) -> dict[str, str]:
    """API bearer tokens: a YAML mapping ``token: role`` (see ``Grant.parse``). Errors name
    the file and line, never the token itself (it is a secret)."""
    root = load_file(path)
    if not isinstance(root.value, dict):
        raise root.error("expected a mapping of token to role (read, admin, collector:ID)")
    tokens: dict[str, str] = {}
    for token in root.keys():  # noqa: SIM118 - Node.keys(), not a dict
        node = root.get(token)
        problem = None
        if len(token.strip()) < MIN_TOKEN:
            problem = f"a token needs at least {MIN_TOKEN} characters"
        else:
            try:
                Grant.parse(str(node.value))
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            raise ConfigError(problem, path=node.path, line=node.line)
        tokens[token] = str(node.value)
    return tokens
