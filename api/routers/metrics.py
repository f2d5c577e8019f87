"""``GET /metrics``: the analyzer's counters for Prometheus (``analysis.prometheus``).

Each scrape builds a registry with the analyzer's collector and the process's own metrics
(``process_*``: memory, CPU, open files) and writes it in the format the scraper asks for
(``Accept``): the text format 0.0.4 by default, or OpenMetrics.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from vspan.analysis.service.prometheus import AnalyzerCollector
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse)
@router.get("/api/v1/metrics", response_class=PlainTextResponse, include_in_schema=False)
def metrics(source: SourceDep, request: Request) -> Response:
    """Per collector: frames, bytes, messages lost/duplicate/reordered, invalid by reason,
    capture counters and drops (heartbeats); receivers' drops by cause; flows and open
    flows; store writer, store size and packet ring counters; the process's resources."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AnalyzerCollector(source))
    ProcessCollector(registry=registry)
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), media_type=content_type)
