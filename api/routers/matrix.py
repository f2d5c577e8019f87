"""``GET /api/v1/matrix``: traffic per (src, dst) VM or host pair and time bin."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from vspan.analysis import views
from vspan.api.models_views import MatrixOut, MatrixRow
from vspan.api.routers import INVALID, PREFIX, Since, Until, unprocessable
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["matrix"])


@router.get("/matrix", responses=INVALID)
def matrix(
    source: SourceDep,
    *,
    level: Literal["vm", "host"] = "host",
    since: Since = None,
    until: Until = None,
    bin: Annotated[int, Query(ge=1, le=86_400, description="seconds per time bin")] = 60,
) -> MatrixOut:
    """Bytes, packets and flows per pair and bin, with their intra-/cross-host split."""
    with unprocessable():
        lo, hi = views.window(since, until, source.clock())
        rows = views.matrix(source.store, level=level, since=lo, until=hi, bin_s=bin)
    return MatrixOut(level=level, bin=bin, cells=[MatrixRow(**r) for r in rows])
