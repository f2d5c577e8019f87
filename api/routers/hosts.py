"""``GET /api/v1/hosts``: every host, its VMs and its intra-/cross-host traffic."""

from __future__ import annotations

from fastapi import APIRouter

from vspan.analysis import views
from vspan.api.models_views import HostRow, HostsOut
from vspan.api.routers import INVALID, PREFIX, Since, Until, unprocessable
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["hosts"])


@router.get("/hosts", responses=INVALID)
def list_hosts(source: SourceDep, since: Since = None, until: Until = None) -> HostsOut:
    """Hosts by name with VM counts and the traffic of their flows in the window."""
    with unprocessable():
        lo, hi = views.window(since, until, source.clock())
        rows = views.hosts(source.store, source.state.snapshot(), since=lo, until=hi)
    return HostsOut(hosts=[HostRow(**r) for r in rows])
