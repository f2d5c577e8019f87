"""The gate in front of every route: access (``api.auth``), then a strict query string.

``install_gate(app, policy)`` installs both halves on an app, before any route is added:

* an ASGI middleware that asks ``auth.check_access`` about every HTTP request — any path,
  the dashboard's files, ``/docs`` and unknown paths included — before routing; a refusal is
  answered at once as JSON ``{"detail": reason}`` and nothing of the request (not even its
  body) reaches the app;
* an app-level dependency, so part of every FastAPI route (those of the OpenAPI document,
  the dashboard's page, ``/api/v1/metrics``), that checks the query string against the
  parameters the matched route declares (``check_query``): a 422 with the reason.

The query string must be UTF-8 (after ``%``-decoding), hold no control characters (NUL…),
keep each value within ``MAX_VALUE`` characters, name only parameters the route declares
(``?verdict=deny`` on a route without ``verdict`` is a 422, not silently ignored) and give a
single-valued parameter at most once.
"""

from __future__ import annotations

import json
import re
import types
from typing import Any, Final, Union, get_args, get_origin
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from vspan.api.auth import PUBLIC, AccessPolicy, AccessRequest, Refusal, check_access

__all__ = ["MAX_PARAMS", "MAX_VALUE", "AccessMiddleware", "check_query", "install_gate"]

MAX_VALUE: Final = 1024
"""Characters of one query value (names, times, cursors are far shorter)."""
MAX_PARAMS: Final = 64
"""Query parameters of one request."""
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DECLARED: Final = "vspan_query_params"
"""Where a route keeps its declared query parameters once computed."""


def install_gate(app: FastAPI, policy: AccessPolicy) -> None:
    """Put the gate in front of every route of ``app``; call it before adding routes (the
    query check is a dependency of each route added after)."""
    added = [r for r in app.router.routes if not (type(r) is Route and r.path in PUBLIC)]
    if added:
        raise RuntimeError("install_gate(app, ...) must come before the app's routes")
    app.add_middleware(AccessMiddleware, policy=policy)
    app.router.dependencies.append(Depends(strict_query))


class AccessMiddleware:
    """``check_access`` on every HTTP request, before routing."""

    def __init__(self, app: ASGIApp, *, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        authorization = dict(scope.get("headers") or []).get(b"authorization")
        client = scope.get("client")
        refusal = check_access(
            self.policy,
            AccessRequest(
                method=str(scope.get("method", "GET")),
                path=str(scope.get("path", "")),
                authorization=None if authorization is None else authorization.decode("latin-1"),
                client=str(client[0]) if client else None,
            ),
        )
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            body = json.dumps({"detail": refusal.detail}).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode())]  # fmt: skip
            headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
            await send(
                {"type": "http.response.start", "status": refusal.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})


def strict_query(request: Request) -> None:
    """The app-level dependency: a 422 for a query string its route does not take."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    refusal = check_query(declared_query(route), request.scope.get("query_string", b""))
    if refusal is not None:
        raise HTTPException(refusal.status, detail=refusal.detail)


def declared_query(route: APIRoute) -> dict[str, bool]:
    """The route's query parameters, its dependencies' included: name → takes a list."""
    found: dict[str, bool] | None = getattr(route, _DECLARED, None)
    if found is None:
        found = {}
        todo: list[Dependant] = [route.dependant]
        while todo:
            dependant = todo.pop()
            for param in dependant.query_params:
                found[param.alias] = _is_sequence(param.field_info.annotation)
            todo.extend(dependant.dependencies)
        setattr(route, _DECLARED, found)
    return found


def check_query(declared: dict[str, bool], raw: bytes) -> Refusal | None:
    """The 422 for a query string that is not UTF-8, holds control characters or too long a
    value, names a parameter not in ``declared`` (name → takes a list) or repeats a single
    one; None when it is fine."""
    if not raw:
        return None
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return Refusal(422, "the query string is not UTF-8 (after %-decoding)")
    if len(pairs) > MAX_PARAMS:
        return Refusal(422, f"{len(pairs)} query parameters, at most {MAX_PARAMS}")
    seen: set[str] = set()
    for key, value in pairs:
        if _CONTROL.search(key):
            return Refusal(422, "a query parameter name holds control characters")
        if key not in declared:
            takes = ", ".join(sorted(declared)) or "no parameters"
            return Refusal(422, f"unknown query parameter {_shown(key)}; this route takes: {takes}")
        if len(value) > MAX_VALUE:
            return Refusal(422, f"{key}: {len(value)} characters, at most {MAX_VALUE}")
        if _CONTROL.search(value):
            return Refusal(422, f"{key}: control characters (NUL, ...) are not allowed")
        if key in seen and not declared[key]:
            return Refusal(422, f"{key}: given more than once")
        seen.add(key)
    return None


def _is_sequence(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return any(_is_sequence(a) for a in get_args(annotation) if a is not type(None))
    return origin in (list, tuple, set, frozenset)


def _shown(key: str) -> str:
    """A parameter name for a message: quoted, cut to 64 characters."""
    return repr(key[:64] + ("…" if len(key) > 64 else ""))
