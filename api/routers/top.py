"""``GET /api/v1/top``: the largest VMs, VM pairs or host pairs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from vspan.analysis import views
from vspan.api.models_views import TopOut, TopRow
from vspan.api.routers import INVALID, PREFIX, Since, Until, unprocessable
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["top"])


@router.get("/top", responses=INVALID)
def top(
    source: SourceDep,
    *,
    by: Literal["vm", "vm-pair", "host-pair"] = "vm",
    metric: Literal["bytes", "packets"] = "bytes",
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> TopOut:
    """The ``limit`` largest by ``metric`` (both directions of their flows), largest first."""
    with unprocessable():
        lo, hi = views.window(since, until, source.clock())
        rows = views.top(source.store, by=by, metric=metric, since=lo, until=hi, limit=limit)
    return TopOut(by=by, metric=metric, top=[TopRow(**r) for r in rows])
