"""The control plane: collectors register their VMs, report counters, and fetch the SPAN
sessions and port-profiles that concern their VMs — the analyzer is the single source of
configuration, like a supervisor module.

Routes (prefix ``/api/v1/control``)::

    POST /collectors/{collector_id}/register   RegisterIn  -> ConfigOut
    POST /collectors/{collector_id}/heartbeat  HeartbeatIn -> HeartbeatOut
    GET  /collectors/{collector_id}/sessions               -> SessionsOut (+ sessions_total)
    GET  /collectors/{collector_id}/profiles               -> ProfilesOut
    DELETE /collectors/{collector_id}                      -> 204 (admin only)
    GET  /inventory                                        -> InventoryOut
    GET  /migrations?since=<time>                          -> MigrationsOut

Errors are JSON ``{"detail": ...}``: 422 for a body or path that does not validate
(collector_id 0 included), 404 for a collector no host has, 409 for a registration that
contradicts the inventory (a host name already taken by another collector_id, or a new name
for a host of the inventory file). A collector may rename its host to a free name; an
administrator removes a collector (and its host) with ``DELETE /collectors/{collector_id}``
— a collector's own token cannot (``api.auth``: only the routes below it are a collector's).
Handlers are glue: the work is ``analysis.inventory_state``'s, the JSON shapes
``api.models_control``'s.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from vspan.analysis.inventory.state import (
    MAX_COLLECTOR_ID,
    InventoryState,
    RegistrationError,
    UnknownCollectorError,
)
from vspan.api.auth import AccessPolicy
from vspan.api.deps import (
    Clock,
    ClockDep,
    ControlContext,
    ProfilesDep,
    ProfilesFor,
    SessionsDep,
    SessionsFor,
    SessionsTotal,
    SessionsTotalDep,
    StateDep,
    no_sessions,
    nothing_for,
    set_context,
)
from vspan.api.gate import install_gate
from vspan.api.models_control import (
    ConfigOut,
    HeartbeatIn,
    HeartbeatOut,
    InventoryOut,
    MigrationsOut,
    ProfilesOut,
    RegisterIn,
    SessionsOut,
    as_dicts,
)

__all__ = ["PREFIX", "create_control_app", "install_control", "router"]

PREFIX = "/api/v1/control"
router = APIRouter(prefix=PREFIX, tags=["control"])

CollectorId = Annotated[
    int, Path(ge=1, le=MAX_COLLECTOR_ID, description="the collector's id in tunnel headers")
]
_NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"description": "no host has this collector_id"}
}
_CONFLICT: dict[int | str, dict[str, object]] = {
    409: {"description": "the registration contradicts the inventory"}
}


@router.post("/collectors/{collector_id}/register", responses=_CONFLICT)
def register(
    collector_id: CollectorId,
    body: RegisterIn,
    *,
    state: StateDep,
    now: ClockDep,
    sessions_for: SessionsDep,
    sessions_total: SessionsTotalDep,
    profiles_for: ProfilesDep,
) -> ConfigOut:
    """Register the collector's host and all its VM ports; answer with its configuration."""
    state.register(collector_id, body.host, body.to_ports(), now())
    host, vms = state.collector_view(collector_id)
    return ConfigOut(
        collector_id=collector_id,
        host=host.name,
        vms=len(vms),
        sessions=as_dicts(sessions_for(host, vms)),
        sessions_total=sessions_total(),
        profiles=as_dicts(profiles_for(host, vms)),
    )


@router.post("/collectors/{collector_id}/heartbeat", responses=_NOT_FOUND)
def heartbeat(
    collector_id: CollectorId, body: HeartbeatIn, state: StateDep, now: ClockDep
) -> HeartbeatOut:
    """Keep the collector's capture counters (a bounded ring per collector)."""
    received = now()
    state.record_heartbeat(collector_id, body.to_heartbeat(received))
    return HeartbeatOut(collector_id=collector_id, received=received)


@router.get("/collectors/{collector_id}/sessions", responses=_NOT_FOUND)
def sessions(
    collector_id: CollectorId,
    state: StateDep,
    sessions_for: SessionsDep,
    sessions_total: SessionsTotalDep,
) -> SessionsOut:
    """The SPAN sessions that concern the VMs on the collector's host, and how many exist."""
    host, vms = state.collector_view(collector_id)
    return SessionsOut(
        sessions=as_dicts(sessions_for(host, vms)),
        sessions_total=sessions_total(),
        registered=collector_id in state.registrations(),
    )


@router.get("/collectors/{collector_id}/profiles", responses=_NOT_FOUND)
def profiles(collector_id: CollectorId, state: StateDep, profiles_for: ProfilesDep) -> ProfilesOut:
    """The port-profiles bound to the VMs on the collector's host."""
    host, vms = state.collector_view(collector_id)
    return ProfilesOut(profiles=as_dicts(profiles_for(host, vms)))


@router.delete(
    "/collectors/{collector_id}",
    status_code=204,
    responses=_NOT_FOUND,
    response_class=Response,
)
def remove_collector(collector_id: CollectorId, state: StateDep, now: ClockDep) -> Response:
    """Forget a collector and its host (admin): its VMs are gone from the host, its
    registration and heartbeats dropped. A collector still running registers again."""
    state.remove_collector(collector_id, now())
    return Response(status_code=204)


@router.get("/inventory")
def inventory(state: StateDep) -> InventoryOut:
    """All hosts, and the VMs running now with their vifs and host."""
    return InventoryOut.of(state.snapshot(), state.registrations())


@router.get("/migrations")
def migrations(
    state: StateDep, since: Annotated[float | None, Query(description="at or after")] = None
) -> MigrationsOut:
    """VM migrations kept in memory, oldest first."""
    return MigrationsOut.of(state.migrations(since))


async def _unknown_collector(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _bad_registration(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


def install_control(
    app: FastAPI,
    state: InventoryState,
    *,
    sessions_for: SessionsFor = nothing_for,
    profiles_for: ProfilesFor = nothing_for,
    now: Clock = time.time,
    sessions_total: SessionsTotal = no_sessions,
) -> None:
    """Mount the control plane on ``app``: the router, its context and its error mapping."""
    set_context(app.state, ControlContext(state, sessions_for, profiles_for, now, sessions_total))
    app.add_exception_handler(UnknownCollectorError, _unknown_collector)
    app.add_exception_handler(RegistrationError, _bad_registration)
    app.include_router(router)


def create_control_app(
    state: InventoryState,
    *,
    sessions_for: SessionsFor = nothing_for,
    profiles_for: ProfilesFor = nothing_for,
    now: Clock = time.time,
    sessions_total: SessionsTotal = no_sessions,
) -> FastAPI:
    """A FastAPI app serving only the control plane (the analyzer mounts it with more), to
    loopback clients only."""
    app = FastAPI(title="vspan control plane", version="1")
    install_gate(app, AccessPolicy())
    install_control(
        app,
        state,
        sessions_for=sessions_for,
        profiles_for=profiles_for,
        now=now,
        sessions_total=sessions_total,
    )
    return app
