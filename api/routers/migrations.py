"""``GET /api/v1/migrations``: VM moves between hosts, as the store kept them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from vspan.analysis.store.queries import DEFAULT_LIMIT, migrations
from vspan.api.deps import NowDep, StoreDep
from vspan.api.models import MigrationHistoryOut, MigrationRow, rows_of
from vspan.api.routers import INVALID, PREFIX, Since, Until, VmFilter, unprocessable

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["migrations"])


@router.get("/migrations", responses=INVALID)
def list_migrations(
    *,
    store: StoreDep,
    now: NowDep,
    vm: VmFilter = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(description="the latest N, 1..10000")] = DEFAULT_LIMIT,
) -> MigrationHistoryOut:
    """The latest migrations in ``[since, until)``, oldest first."""
    with unprocessable():
        frame = migrations(store, vm=vm, since=since, until=until, limit=limit, now=now)
    return MigrationHistoryOut(migrations=rows_of(MigrationRow, frame))
