"""Bearer-token access to the view routers: two roles, ``read`` and ``admin``.

``tokens`` maps a token to its role (from the analyzer's config). Reads (GET, HEAD) need
either role; writes (POST, PUT, PATCH, DELETE) need ``admin``. No ``Authorization: Bearer``
header, or an unknown token: 401 (with ``WWW-Authenticate: Bearer``); a ``read`` token on a
write: 403. With no tokens configured, only loopback clients are served (the demo), others
get 403. ``check_access`` decides, with no I/O; ``authorize`` is the FastAPI dependency.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from typing import Final

from fastapi import HTTPException, Request

from vspan.api.views_deps import get_view_context

__all__ = ["READ_METHODS", "ROLES", "authorize", "check_access", "check_tokens"]

ROLES: Final = ("read", "admin")
READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def check_tokens(tokens: Mapping[str, str]) -> dict[str, str]:
    """``tokens`` validated (roles known, tokens non-empty); ``ValueError`` naming the bad one."""
    for token, role in tokens.items():
        if role not in ROLES:
            raise ValueError(f"token role {role!r} is not one of {list(ROLES)}")
        if not token.strip():
            raise ValueError("an empty token would let anyone in")
    return dict(tokens)


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _role(tokens: Mapping[str, str], authorization: str | None) -> str | None:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    for token, role in tokens.items():  # compare every token in constant time
        if hmac.compare_digest(token.encode(), given.strip().encode()):
            return role
    return None


def check_access(
    tokens: Mapping[str, str] | None, *, method: str, authorization: str | None, client: str | None
) -> None:
    """Raise the ``HTTPException`` (401 or 403) that refuses this request, if any."""
    if not tokens:
        if not _loopback(client):
            raise HTTPException(403, detail="no API tokens configured: loopback clients only")
        return
    role = _role(tokens, authorization)
    if role is None:
        reason = "missing bearer token" if not authorization else "unknown bearer token"
        raise HTTPException(401, detail=reason, headers={"WWW-Authenticate": "Bearer"})
    if method.upper() not in READ_METHODS and role != "admin":
        raise HTTPException(403, detail=f"{method.upper()} needs the admin role, token has {role}")


def authorize(request: Request) -> None:
    """The dependency applied to every view router."""
    context = get_view_context(request)
    check_access(
        context.tokens,
        method=request.method,
        authorization=request.headers.get("authorization"),
        client=request.client.host if request.client else None,
    )
