"""``GET /api/v1/policies/hits`` and ``GET /api/v1/violations``: what the port-profiles
decided (``docs/policy.md``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from vspan.analysis.store.queries import DEFAULT_LIMIT, policy_hits, violations
from vspan.api.deps import NowDep, StoreDep
from vspan.api.models import FlowRow, PolicyHitRow, PolicyHitsOut, ViolationsOut, rows_of
from vspan.api.routers import INVALID, PREFIX, Since, Until, VmFilter, unprocessable

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["policies"])


@router.get("/policies/hits", responses=INVALID)
def hits(
    store: StoreDep,
    vm: VmFilter = None,
    profile: Annotated[str | None, Query(description="port-profile name")] = None,
) -> PolicyHitsOut:
    """Per rule and VM: the flows, packets and bytes it decided, added up."""
    with unprocessable():
        frame = policy_hits(store, vm=vm, profile=profile)
    return PolicyHitsOut(hits=rows_of(PolicyHitRow, frame))


@router.get("/violations", responses=INVALID)
def list_violations(
    *,
    store: StoreDep,
    now: NowDep,
    vm: VmFilter = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(description="1..10000")] = DEFAULT_LIMIT,
) -> ViolationsOut:
    """Flows a profile denied that were observed anyway, the most recent first."""
    with unprocessable():
        frame = violations(store, vm=vm, since=since, until=until, limit=limit, now=now)
    return ViolationsOut(violations=rows_of(FlowRow, frame))
