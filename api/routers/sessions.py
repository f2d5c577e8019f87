"""``/api/v1/sessions``: the SPAN sessions the control plane hands to collectors.

``GET /sessions``, ``GET /sessions/{name}``, ``POST /sessions`` (201; 409 if the name is
taken), ``PUT /sessions/{name}`` (404 if none), ``DELETE /sessions/{name}`` (204). Bodies
are the JSON fields of ``vspan.sessions``; one that does not validate (a
``filter`` libpcap rejects included) is a 422 whose detail names the field and says why
(``filter: bad capture filter 'udp port x': ...``). Collectors apply a change within their
refresh interval; while any session exists, a collector mirrors only what sessions select.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Response

from vspan.analysis.inventory.span_sessions import SessionConflictError, UnknownSessionError
from vspan.api.models_views import SessionOut, SessionsListOut
from vspan.api.routers import PREFIX
from vspan.api.views_deps import SessionsStoreDep
from vspan.errors import ConfigError

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["sessions"])
_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"description": "no session has this name"},
    409: {"description": "the name is taken, or the body renames the session"},
    422: {"description": "the session does not validate; detail says why"},
}


@contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except UnknownSessionError as exc:
        raise HTTPException(404, detail=str(exc)) from exc
    except SessionConflictError as exc:
        raise HTTPException(409, detail=str(exc)) from exc
    except ConfigError as exc:
        raise HTTPException(422, detail=str(exc)) from exc


@router.get("/sessions")
def list_sessions(sessions: SessionsStoreDep) -> SessionsListOut:
    """Every session, in creation order."""
    return SessionsListOut(sessions=[SessionOut(**s) for s in sessions.all()])


@router.get("/sessions/{name}", responses=_ERRORS)
def get_session(name: str, sessions: SessionsStoreDep) -> SessionOut:
    with _mapped():
        return SessionOut(**sessions.get(name))


@router.post("/sessions", status_code=201, responses=_ERRORS)
def create_session(
    sessions: SessionsStoreDep, body: Annotated[dict[str, Any], Body()]
) -> SessionOut:
    """Add a session; collectors receive it with their next sessions fetch."""
    with _mapped():
        return SessionOut(**sessions.create(body))


@router.put("/sessions/{name}", responses=_ERRORS)
def replace_session(
    name: str, sessions: SessionsStoreDep, body: Annotated[dict[str, Any], Body()]
) -> SessionOut:
    with _mapped():
        return SessionOut(**sessions.replace(name, body))


@router.delete("/sessions/{name}", status_code=204, responses=_ERRORS)
def delete_session(name: str, sessions: SessionsStoreDep) -> Response:
    with _mapped():
        sessions.delete(name)
    return Response(status_code=204)
