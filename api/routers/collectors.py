"""``GET /api/v1/collectors``: each collector's latest receive counters, rates and loss."""

from __future__ import annotations

from fastapi import APIRouter

from vspan.analysis.queries import collectors
from vspan.api.deps import CountersDep
from vspan.api.models import CollectorRow, CollectorsOut, rows_of
from vspan.api.routers import PREFIX

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["collectors"])


@router.get("/collectors")
def list_collectors(samples: CountersDep) -> CollectorsOut:
    """Per collector: latest counters, rates over its last two samples, loss, drops."""
    return CollectorsOut(collectors=rows_of(CollectorRow, collectors(samples)))
