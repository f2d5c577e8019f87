"""``GET /api/v1/collectors``: each collector's latest receive counters, rates and loss, and
the capture counters and drops it reported in its latest heartbeat."""

from __future__ import annotations

from fastapi import APIRouter

from vspan.analysis.inventory.capture_counters import with_capture
from vspan.analysis.store.queries import collectors
from vspan.api.deps import CountersDep, HeartbeatsDep
from vspan.api.models import CollectorRow, CollectorsOut, rows_of
from vspan.api.routers import PREFIX

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["collectors"])


@router.get("/collectors")
def list_collectors(samples: CountersDep, beats: HeartbeatsDep) -> CollectorsOut:
    """Per collector: latest counters, rates over its last two samples, loss, drops; and
    ``capture``: what it captured and dropped before sending (its latest heartbeat)."""
    rows = with_capture(collectors(samples), beats)
    return CollectorsOut(collectors=rows_of(CollectorRow, rows))
