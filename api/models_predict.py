"""The JSON shapes of ``/api/v1/predictions`` (forecast, what-if, placement), in one place.

Times are epoch seconds of bin starts; traffic is bytes (and packets) **per bin**: the
measured value of a bin, a forecast for a bin, or the mean per bin of the recent bins a
what-if or a placement works on.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Band",
    "ForecastOut",
    "ForecastSeries",
    "HostPairDelta",
    "MoveIn",
    "PlacementMove",
    "PlacementOut",
    "Point",
    "UplinkDelta",
    "VmPairChange",
    "WhatIfIn",
    "WhatIfOut",
]


class Point(BaseModel):
    """A measured bin."""

    time: int = Field(description="start of the bin, epoch seconds")
    value: float = Field(description="bytes in the bin")


class Band(BaseModel):
    """A forecast bin: the median and the prediction interval."""

    time: int = Field(description="start of the bin, epoch seconds")
    forecast: float
    lower: float = Field(description="lower end of the prediction interval")
    upper: float = Field(description="upper end of the prediction interval")


class ForecastSeries(BaseModel):
    """One host pair (``A->B``) or uplink (``HOST:out``, ``HOST:in``)."""

    name: str
    measured: list[Point]
    forecast: list[Band]


class ForecastOut(BaseModel):
    level: str = Field(description="host-pair or uplink")
    bin: int = Field(description="seconds per bin")
    horizon: int = Field(description="bins forecast")
    interval: float = Field(description="coverage the interval aims at, e.g. 0.8")
    series: list[ForecastSeries]
    note: str | None = Field(default=None, description="why there are no series, if there are none")


class MoveIn(BaseModel):
    """Run ``vm`` on ``host``."""

    model_config = ConfigDict(extra="forbid")
    vm: str = Field(min_length=1)
    host: str = Field(min_length=1)


class WhatIfIn(BaseModel):
    """Planned moves, applied in order, and the traffic they are judged on."""

    model_config = ConfigDict(extra="forbid")
    moves: list[MoveIn] = Field(min_length=1)
    bin: int = Field(3600, ge=1, le=86_400, description="seconds per bin")
    recent: int = Field(24, ge=1, le=10_000, description="mean of the last N bins")


class HostPairDelta(BaseModel):
    """A directed host pair before and after the moves (per bin)."""

    model_config = ConfigDict(populate_by_name=True)
    src: str
    dst: str
    pair_class: str = Field(alias="class", description="intra-host, cross-host or external")
    bytes_before: float
    bytes_after: float
    bytes_delta: float
    packets_before: float
    packets_after: float
    packets_delta: float


class UplinkDelta(BaseModel):
    """A host's uplink bytes per bin, leaving (``out``) and entering (``in``) it."""

    host: str
    out_before: float
    out_after: float
    out_delta: float
    in_before: float
    in_after: float
    in_delta: float


class VmPairChange(BaseModel):
    """A directed VM pair with a moved end: its traffic per bin and its hosts."""

    src: str
    dst: str
    bytes: float
    packets: float
    src_host_before: str
    dst_host_before: str
    src_host_after: str
    dst_host_after: str
    class_before: str
    class_after: str
    change: str = Field(description="to-intra-host, to-wire, rerouted or unchanged")


class WhatIfOut(BaseModel):
    bin: int
    recent: int
    moves: list[MoveIn]
    host_pairs: list[HostPairDelta]
    uplinks: list[UplinkDelta]
    vm_pairs: list[VmPairChange]


class PlacementMove(BaseModel):
    """One advised move and the cross-host bytes per bin it saves."""

    step: int
    vm: str
    from_host: str
    to_host: str
    saving: float
    cross_before: float
    cross_after: float


class PlacementOut(BaseModel):
    bin: int
    recent: int
    max_vms_per_host: int | None
    pinned: list[str]
    anti_affinity: list[list[str]]
    moves: list[PlacementMove]
