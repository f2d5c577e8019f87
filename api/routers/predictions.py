"""``/api/v1/predictions``: forecasts of host pairs and uplinks, what-if of planned VM moves
and placement advice, over the stored flows (``analysis.predict_views``).

::

    GET  /api/v1/predictions/forecast   level bin horizon since until          -> ForecastOut
    POST /api/v1/predictions/whatif     {"moves": [{"vm", "host"}], bin, recent} -> WhatIfOut
    GET  /api/v1/predictions/placement  max_vms_per_host pin anti_affinity max_moves bin recent
                                                                               -> PlacementOut

A parameter the data cannot serve is a 422 whose ``detail`` says which and why; a move
naming an unknown VM or host is a 404 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import pandas as pd
from fastapi import APIRouter, HTTPException, Query

from vspan.analysis import views
from vspan.analysis.predict import views as pv
from vspan.analysis.predict.forecast import ForecastConfig
from vspan.analysis.predict.placement import Constraints
from vspan.analysis.predict.whatif import Move
from vspan.api.models_predict import (
    Band,
    ForecastOut,
    ForecastSeries,
    HostPairDelta,
    PlacementMove,
    PlacementOut,
    Point,
    UplinkDelta,
    VmPairChange,
    WhatIfIn,
    WhatIfOut,
)
from vspan.api.routers import INVALID, PREFIX, Since, Until, unprocessable
from vspan.api.views_deps import SourceDep, ViewSource

__all__ = ["router"]

router = APIRouter(prefix=f"{PREFIX}/predictions", tags=["predictions"])
NOT_FOUND: Final[dict[int | str, dict[str, object]]] = {
    **INVALID,
    404: {"description": "a move names an unknown VM or host"},
}
Bin = Annotated[int, Query(ge=60, le=86_400, description="seconds per bin; divides a day")]
Recent = Annotated[int, Query(ge=1, le=10_000, description="mean of the last N bins")]
_SECOND: Final = 10**9


def _flows(source: ViewSource, since: str | None, until: str | None) -> pd.DataFrame:
    lo, hi = views.window(since, until, source.clock())
    return pv.stored_flows(source.store, since=lo, until=hi)


def _placement(source: ViewSource, flows: pd.DataFrame) -> pv.Placement:
    snapshot = source.state.snapshot()
    return pv.placement_of(flows, vms=snapshot.present_vms(), hosts=snapshot.hosts)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


@router.get("/forecast", responses=INVALID)
def forecast(
    source: SourceDep,
    *,
    level: Literal["host-pair", "uplink"] = "host-pair",
    bin: Bin = 3600,
    horizon: Annotated[int, Query(ge=1, le=24 * 14, description="bins to forecast")] = 24,
    since: Since = None,
    until: Until = None,
) -> ForecastOut:
    """Measured bytes per bin of every series of ``level`` and the next ``horizon`` bins'
    forecast with its 80 % prediction interval. A window with too little traffic (no flows,
    a single bin) gives no series and a ``note`` saying why."""
    config = ForecastConfig()
    empty = ForecastOut(level=level, bin=bin, horizon=horizon, interval=config.level, series=[])
    with unprocessable():
        pv.check_bin(bin)
        try:
            flows = _flows(source, since, until)
            result = pv.forecast(flows, bin_s=bin, horizon=horizon, level=level, config=config)
        except pv.NotEnoughDataError as exc:
            return empty.model_copy(update={"note": str(exc)})
    times = result.measured.index.to_numpy() // _SECOND
    bands = result.forecast.assign(time=result.forecast["bin_ns"] // _SECOND)
    by_series = dict(tuple(bands.groupby("series", sort=False)))
    out = []
    for name in result.measured.columns:
        values = result.measured[name].to_numpy(dtype=float)
        mine = by_series.get(name, bands.iloc[:0])
        out.append(
            ForecastSeries(
                name=str(name),
                measured=[
                    Point(time=int(t), value=float(v)) for t, v in zip(times, values, strict=True)
                ],
                forecast=[
                    Band(**r) for r in _records(mine[["time", "forecast", "lower", "upper"]])
                ],
            )
        )
    return empty.model_copy(update={"series": out})


@router.post("/whatif", responses=NOT_FOUND)
def whatif(source: SourceDep, body: WhatIfIn) -> WhatIfOut:
    """The change of every host pair and uplink, and of the VM pairs with a moved end, when
    ``moves`` are applied to where the VMs run now, judged on the recent traffic."""
    moves = [Move(m.vm, m.host) for m in body.moves]
    with unprocessable():
        pv.check_bin(body.bin)
        flows = _flows(source, None, None)
        try:
            result = pv.predict_moves(
                flows, _placement(source, flows), moves, bin_s=body.bin, recent=body.recent
            )
        except pv.UnknownNameError as exc:
            raise HTTPException(404, detail=str(exc)) from exc
    return WhatIfOut(
        bin=body.bin,
        recent=body.recent,
        moves=body.moves,
        host_pairs=[HostPairDelta(**r) for r in _records(result.host_pairs)],
        uplinks=[UplinkDelta(**r) for r in _records(result.uplinks)],
        vm_pairs=[VmPairChange(**r) for r in _records(result.vm_pairs)],
    )


@router.get("/placement", responses=INVALID)
def placement(
    source: SourceDep,
    *,
    max_vms_per_host: Annotated[int | None, Query(ge=1, description="VMs per host at most")] = None,
    pin: Annotated[list[str] | None, Query(description="a VM that must not move")] = None,
    anti_affinity: Annotated[
        list[str] | None, Query(description="VMs that must not share a host: A,B[,C…]")
    ] = None,
    max_moves: Annotated[int, Query(ge=0, le=1000)] = 10,
    bin: Bin = 3600,
    recent: Recent = 24,
) -> PlacementOut:
    """Moves, in order, that cut cross-host bytes per bin under the constraints."""
    groups = tuple(frozenset(g for g in text.split(",") if g) for text in anti_affinity or [])
    constraints = Constraints(
        max_vms_per_host=max_vms_per_host, pinned=frozenset(pin or []), anti_affinity=groups
    )
    with unprocessable():
        flows = _flows(source, None, None)
        moves = pv.advise_moves(
            flows, _placement(source, flows), constraints, bin_s=bin, recent=recent,
            max_moves=max_moves,
        )  # fmt: skip
    return PlacementOut(
        bin=bin,
        recent=recent,
        max_vms_per_host=max_vms_per_host,
        pinned=sorted(constraints.pinned),
        anti_affinity=[sorted(g) for g in groups],
        moves=[PlacementMove(**r) for r in _records(moves)],
    )
