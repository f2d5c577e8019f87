"""The predictions over stored flows, with their inputs built one way for every caller:
``vspan predict`` (``vspan/cli/predict.py``) and ``/api/v1/predictions``
(``api/routers/predictions.py``).

Inputs, from the flow records of the store:

- **series** to forecast: bytes per bin of each cross-host directed host pair (``A->B``)
  and of each host uplink (``HOST:out``, ``HOST:in``), from ``matrix.host_matrix``;
- **placement** (VM → host): the host of each VM in the latest flow that shows it,
  overridden by the inventory's VMs when an inventory is given; the inventory's hosts are
  the candidate hosts of a move, with the hosts of the placement;
- **recent VM-pair traffic**: the mean bytes and packets per bin of every directed VM pair
  over the last ``recent`` bins (``whatif.mean_matrix``), what what-if and placement work on.

Errors are ``ConfigError`` naming the parameter: a bad value (a bin that does not divide a
day, a lone VM as an anti-affinity group); ``NotEnoughDataError`` when the window holds too
little traffic (no flows, a single bin: the API's forecast answers it with no series and a
note); ``UnknownNameError`` for a move naming a VM or host the data does not know (the API
answers 404).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import pandas as pd

from vspan.analysis.predict.forecast import (
    DAY_NS,
    ForecastConfig,
    fit_forecast,
    host_pair_series,
    uplink_series,
)
from vspan.analysis.predict.placement import Constraints, advise
from vspan.analysis.predict.whatif import Move, WhatIf, mean_matrix, what_if
from vspan.analysis.records.matrix import EXTERNAL, host_matrix, uplink_load, vm_hosts, vm_matrix
from vspan.analysis.store.store import Store
from vspan.errors import ConfigError
from vspan.inventory import Host, Vm

__all__ = [
    "LEVELS",
    "Forecast",
    "NotEnoughDataError",
    "Placement",
    "UnknownNameError",
    "advise_moves",
    "check_bin",
    "forecast",
    "placement_of",
    "predict_moves",
    "recent_pairs",
    "series",
    "stored_flows",
]

LEVELS: Final = ("host-pair", "uplink")
"""What can be forecast: cross-host directed host pairs, host uplinks."""


class UnknownNameError(ConfigError):
    """A move names a VM or a host that neither the flows nor the inventory know."""


class NotEnoughDataError(ConfigError):
    """The window holds too little traffic for the question (no flows, one bin)."""


def stored_flows(
    store: Store, *, since: int | None = None, until: int | None = None
) -> pd.DataFrame:
    """The flow records of the window (ns; None: open); ``NotEnoughDataError`` if none."""
    flows = store.query_flows(since=since, until=until, limit=None)
    if flows.empty:
        raise NotEnoughDataError("the store holds no flows in the window", field="since")
    return flows


def check_bin(bin_s: float) -> int:
    """The bin in ns; ``ConfigError`` unless it is positive and divides a day."""
    step = round(bin_s * 1e9)
    if step <= 0 or DAY_NS % step:
        raise ConfigError(f"a bin of {bin_s:g} s does not divide a day", field="bin")
    return step


def series(flows: pd.DataFrame, *, bin_s: float, level: str | None = None) -> pd.DataFrame:
    """Wide bytes per bin (index ``bin_ns``) of the host pairs, the uplinks, or both (None):
    one column per series, missing bins 0."""
    check_bin(bin_s)
    hosts = host_matrix(flows, bin_s)
    build = {
        "host-pair": lambda: host_pair_series(hosts, bin_s),
        "uplink": lambda: uplink_series(uplink_load(hosts), bin_s),
    }
    if level is not None and level not in build:
        raise ConfigError(f"unknown level {level!r}; expected one of {LEVELS}", field="level")
    parts = [build[name]() for name in (LEVELS if level is None else (level,))]
    return pd.concat(parts, axis=1).fillna(0.0)


@dataclass(frozen=True, slots=True)
class Forecast:
    """Measured series and their forecast."""

    measured: pd.DataFrame
    """Wide bytes per bin, as ``series`` returns it."""
    forecast: pd.DataFrame
    """Long: ``series``, ``bin_ns``, ``forecast``, ``lower``, ``upper``
    (``forecast.fit_forecast``)."""


def forecast(
    flows: pd.DataFrame,
    *,
    bin_s: float,
    horizon: int,
    level: str | None = None,
    config: ForecastConfig | None = None,
) -> Forecast:
    """Forecast the next ``horizon`` bins of every series of ``level``."""
    measured = series(flows, bin_s=bin_s, level=level)
    if measured.shape[1] == 0:
        what = "cross-host" if level == "host-pair" else "host"
        raise NotEnoughDataError(f"the flows show no {what} traffic to forecast", field="level")
    if len(measured) < 2:
        raise NotEnoughDataError(
            f"the flows span {len(measured)} bin of {bin_s:g} s; a forecast needs at least 2",
            field="bin",
        )
    return Forecast(
        measured, fit_forecast(measured, horizon=horizon, config=config or ForecastConfig())
    )


@dataclass(frozen=True, slots=True)
class Placement:
    """Where VMs run and where they may go."""

    vms: dict[str, str]
    """VM → host."""
    hosts: list[str]
    """Hosts of the inventory (candidates for moves, possibly empty of VMs)."""

    def known_hosts(self) -> set[str]:
        """The inventory's hosts and those of the placement."""
        return ({*self.hosts, *self.vms.values()}) - {EXTERNAL}


def placement_of(
    flows: pd.DataFrame, *, vms: Iterable[Vm] = (), hosts: Iterable[Host] = ()
) -> Placement:
    """The placement of the latest flows, overridden by the inventory's ``vms``."""
    placed = vm_hosts(flows)
    placed.update({vm.name: vm.host for vm in vms})
    return Placement(placed, [h.name for h in hosts])


def recent_pairs(flows: pd.DataFrame, *, bin_s: float, recent: int) -> pd.DataFrame:
    """Mean ``bytes`` and ``packets`` per bin of every directed VM pair over the last
    ``recent`` bins (``src``, ``dst``, ``bytes``, ``packets``, ``flows``)."""
    check_bin(bin_s)
    if recent < 1:
        raise ConfigError(f"recent must be at least 1 bin, got {recent}", field="recent")
    return mean_matrix(vm_matrix(flows, bin_s), last_bins=recent, bin_s=bin_s)


def _check_moves(moves: Sequence[Move], placement: Placement) -> None:
    if not moves:
        raise ConfigError("at least one move is needed", field="moves")
    hosts = placement.known_hosts()
    for k, move in enumerate(moves):
        if move.vm not in placement.vms or move.vm == EXTERNAL:
            raise UnknownNameError(f"unknown VM {move.vm!r}", field=f"moves[{k}].vm")
        if move.host not in hosts:
            raise UnknownNameError(
                f"unknown host {move.host!r}; known: {', '.join(sorted(hosts))}",
                field=f"moves[{k}].host",
            )


def predict_moves(
    flows: pd.DataFrame,
    placement: Placement,
    moves: Sequence[Move],
    *,
    bin_s: float,
    recent: int,
) -> WhatIf:
    """``whatif.what_if`` on the recent VM-pair traffic; ``UnknownNameError`` for a move
    naming a VM without a host or a host nobody knows."""
    _check_moves(moves, placement)
    return what_if(recent_pairs(flows, bin_s=bin_s, recent=recent), placement.vms, moves)


def advise_moves(
    flows: pd.DataFrame,
    placement: Placement,
    constraints: Constraints,
    *,
    bin_s: float,
    recent: int,
    max_moves: int,
) -> pd.DataFrame:
    """``placement.advise`` on the recent VM-pair traffic (``placement.MOVE_COLUMNS``)."""
    for k, group in enumerate(constraints.anti_affinity):
        if len(group) < 2:
            raise ConfigError(
                f"group {k} needs at least two VMs, got {sorted(group)}", field="anti_affinity"
            )
    if max_moves < 0:
        raise ConfigError(f"max_moves must be 0 or more, got {max_moves}", field="max_moves")
    pairs = recent_pairs(flows, bin_s=bin_s, recent=recent)
    return advise(pairs, placement.vms, constraints, hosts=placement.hosts, max_moves=max_moves)
