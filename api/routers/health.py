"""``GET /healthz``: the process answers HTTP (for load balancers and supervisors), and
whether it processes traffic yet."""

from __future__ import annotations

from fastapi import APIRouter, Request

from vspan.api.models import HealthOut

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(request: Request) -> HealthOut:
    """``status`` is always ``ok`` while the analyzer serves requests; ``ready`` says
    whether it already processes traffic (its kernels loaded)."""
    ready = getattr(request.app.state, "ready", None)
    return HealthOut(ready=True if ready is None else bool(ready()))
