"""``GET /api/v1/vms`` and ``GET /api/v1/vms/{name_or_uuid}``."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from vspan.analysis import views
from vspan.api.models_views import VmDetailOut, VmRow, VmsOut
from vspan.api.routers import INVALID, PREFIX, Since, Until, unprocessable
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["vms"])
_NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"description": "no VM has this name or UUID"},
    **INVALID,
}


@router.get("/vms", responses=INVALID)
def list_vms(source: SourceDep, since: Since = None, until: Until = None) -> VmsOut:
    """VMs of the inventory by name: host, profile, vifs and traffic in the window."""
    with unprocessable():
        lo, hi = views.window(since, until, source.clock())
        rows = views.vms(source.store, source.state.snapshot(), since=lo, until=hi)
    return VmsOut(vms=[VmRow(**r) for r in rows])


@router.get("/vms/{name_or_uuid}", responses=_NOT_FOUND)
def vm_detail(
    name_or_uuid: str, source: SourceDep, since: Since = None, until: Until = None
) -> VmDetailOut:
    """One VM: vifs, host history, profile, traffic, flows, policy hits, migrations."""
    with unprocessable():
        lo, hi = views.window(since, until, source.clock())
        try:
            row = views.vm_detail(
                source.store, source.state.snapshot(), name_or_uuid, since=lo, until=hi,
                host_history=source.state.vm_host_history,
            )  # fmt: skip
        except views.UnknownVmError as exc:
            raise HTTPException(404, detail=str(exc)) from exc
    return VmDetailOut(**row)
