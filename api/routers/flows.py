"""``GET /api/v1/flows``: stored flows, filtered, a page at a time (keyset cursor)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from vspan.analysis.store.queries import DEFAULT_LIMIT, FLOW_SORTS, flows
from vspan.api.deps import NowDep, StoreDep
from vspan.api.models import FlowsOut
from vspan.api.routers import INVALID, PREFIX, Since, Until, VmFilter, unprocessable

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["flows"])
_SORTS = ", ".join(f"{s}, -{s}" for s in FLOW_SORTS)


@router.get("/flows", responses=INVALID)
def list_flows(
    *,
    store: StoreDep,
    now: NowDep,
    vm: VmFilter = None,
    host: Annotated[str | None, Query(description="observer, or either side's host")] = None,
    scope: Annotated[str | None, Query(description="intra-host, cross-host, external")] = None,
    proto: Annotated[str | None, Query(description="number or tcp, udp, icmp...")] = None,
    ip: Annotated[str | None, Query(description="either side")] = None,
    port: Annotated[int | None, Query(description="either side")] = None,
    since: Since = None,
    until: Until = None,
    sort: Annotated[str, Query(description=f"one of {_SORTS}")] = "-last",
    limit: Annotated[int, Query(description="rows per page, 1..10000")] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(description="next_cursor of the last page")] = None,
) -> FlowsOut:
    """Flows overlapping ``[since, until)`` that match every filter given, in ``sort``
    order; ``next_cursor`` fetches the next page (stable while flows are appended)."""
    with unprocessable():
        page = flows(
            store, vm=vm, host=host, scope=scope, proto=proto, ip=ip, port=port, since=since,
            until=until, sort=sort, limit=limit, cursor=cursor, now=now,
        )  # fmt: skip
    return FlowsOut.of(page)
