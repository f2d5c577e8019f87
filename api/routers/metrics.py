"""``GET /metrics``: the analyzer's counters for Prometheus (text format 0.0.4)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from vspan.analysis.prometheus import CONTENT_TYPE, exposition
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse)
@router.get("/api/v1/metrics", response_class=PlainTextResponse, include_in_schema=False)
def metrics(source: SourceDep) -> PlainTextResponse:
    """Per collector: frames, bytes, messages lost/duplicate/reordered, invalid by reason;
    flows and open flows; store writer, store size and packet ring counters."""
    engine = getattr(source, "engine", None)
    invalid = engine.accounting.invalid() if engine is not None else None
    text = exposition(source.counters(), invalid=invalid,
                      store_bytes=source.store.size().file_bytes)  # fmt: skip
    return PlainTextResponse(text, media_type=CONTENT_TYPE)
