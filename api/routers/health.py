"""``GET /healthz``: the process answers HTTP (for load balancers and supervisors)."""

from __future__ import annotations

from fastapi import APIRouter

from vspan.api.models import HealthOut

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> HealthOut:
    """Always ``{"status": "ok"}`` while the analyzer serves requests."""
    return HealthOut()
