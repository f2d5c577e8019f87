"""What API handlers receive through ``Depends``: the inventory state, the clock, and the
providers of sessions and port-profiles; for the read API the store, its clock and the
source of collector counters.

The control plane's pieces hang off one ``ControlContext`` in ``app.state`` (set by
``api.control.install_control``); the read API's are ``app.state.store``,
``app.state.read_clock`` and ``app.state.counter_samples`` (set by
``api.app.install_read_api``). Tests replace any piece with
``app.dependency_overrides[get_state] = ...`` rather than patching globals. Only this
outermost layer reads the wall clock; the state and the queries get ``now`` passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import pandas as pd
from fastapi import Depends, Request

from vspan.analysis.inventory.state import Heartbeat, InventoryState
from vspan.analysis.store.store import Store
from vspan.inventory import Host, Vm

T = TypeVar("T")

__all__ = [
    "AppContext",
    "Clock",
    "ClockDep",
    "ContextDep",
    "ControlContext",
    "CounterSamples",
    "CountersDep",
    "Heartbeats",
    "HeartbeatsDep",
    "NowDep",
    "ProfilesDep",
    "ProfilesFor",
    "SessionsDep",
    "SessionsFor",
    "SessionsTotal",
    "SessionsTotalDep",
    "StateDep",
    "StoreDep",
    "get_clock",
    "get_context",
    "get_counter_samples",
    "get_heartbeats",
    "get_now",
    "get_profiles_for",
    "get_sessions_for",
    "get_sessions_total",
    "get_state",
    "get_store",
    "no_sessions",
    "nothing_for",
    "set_context",
]

SessionsFor = Callable[[Host, Sequence[Vm]], Sequence[Mapping[str, Any]]]
"""The SPAN sessions (JSON objects, ``vspan.sessions`` fields) that concern the
given VMs of a host."""
SessionsTotal = Callable[[], int]
"""How many SPAN sessions exist, for all hosts."""
ProfilesFor = Callable[[Host, Sequence[Vm]], Sequence[Mapping[str, Any]]]
"""The port-profiles (JSON objects) bound to the given VMs of a host."""
Clock = Callable[[], float]
CounterSamples = Callable[[], pd.DataFrame]
"""Live collector-counter samples in the columns of the store's ``collector_counters``."""
Heartbeats = Callable[[], Mapping[int, Heartbeat]]
"""The latest heartbeat (capture counters) of each collector that sent one."""


def nothing_for(host: Host, vms: Sequence[Vm]) -> list[dict[str, Any]]:
    """The default provider: no sessions, no profiles."""
    return []


def no_sessions() -> int:
    """The default count of sessions: none."""
    return 0


@dataclass(frozen=True, slots=True)
class ControlContext:
    """What the control plane's handlers work with."""

    state: InventoryState
    sessions_for: SessionsFor = nothing_for
    profiles_for: ProfilesFor = nothing_for
    now: Clock = time.time
    """Wall clock, seconds since the epoch."""
    sessions_total: SessionsTotal = no_sessions
    """How many sessions exist for all hosts."""


class AppContext(Generic[T]):
    """A context object kept on an app's ``state`` under one key, for dependencies to read.

    ``install`` puts it there; ``get`` (a FastAPI dependency) takes it back, and fails
    clearly when the part that needs it was not installed on the app.
    """

    def __init__(self, key: str, kind: type[T], missing: str) -> None:
        self.key, self.kind, self.missing = key, kind, missing

    def install(self, app_state: Any, context: T) -> None:
        """Install ``context`` on an app's ``state``."""
        setattr(app_state, self.key, context)

    def get(self, request: Request) -> T:
        """The context installed on the request's app."""
        context = getattr(request.app.state, self.key, None)
        if not isinstance(context, self.kind):
            raise RuntimeError(self.missing)
        return context


_CONTROL = AppContext(
    "vspan_control", ControlContext, "control plane not installed: call install_control(app, state)"
)
get_context = _CONTROL.get
"""The ``ControlContext`` installed on the app."""
set_context = _CONTROL.install
"""Install a ``ControlContext`` on an app's ``state``."""

ContextDep = Annotated[ControlContext, Depends(get_context)]


def get_state(context: ContextDep) -> InventoryState:
    """The analyzer's inventory state."""
    return context.state


def get_clock(context: ContextDep) -> Clock:
    """The wall clock."""
    return context.now


def get_sessions_for(context: ContextDep) -> SessionsFor:
    """The sessions provider."""
    return context.sessions_for


def get_sessions_total(context: ContextDep) -> SessionsTotal:
    """The count of sessions."""
    return context.sessions_total


def get_profiles_for(context: ContextDep) -> ProfilesFor:
    """The port-profiles provider."""
    return context.profiles_for


StateDep = Annotated[InventoryState, Depends(get_state)]
ClockDep = Annotated[Clock, Depends(get_clock)]
SessionsDep = Annotated[SessionsFor, Depends(get_sessions_for)]
SessionsTotalDep = Annotated[SessionsTotal, Depends(get_sessions_total)]
ProfilesDep = Annotated[ProfilesFor, Depends(get_profiles_for)]


# --- the read API -----------------------------------------------------------------------


_STORE = AppContext("store", Store, "read API not installed: call install_read_api(app, store=...)")
get_store = _STORE.get
"""The analyzer's store (``app.state.store``)."""


StoreDep = Annotated[Store, Depends(get_store)]


def get_now(request: Request) -> float:
    """Now, seconds since the epoch (``app.state.read_clock``, the wall clock by default)."""
    clock: Clock = getattr(request.app.state, "read_clock", time.time)
    return clock()


NowDep = Annotated[float, Depends(get_now)]


def get_counter_samples(request: Request, store: StoreDep) -> Store | pd.DataFrame:
    """Where collector counters come from: live samples when the analyzer gave a source
    (``app.state.counter_samples``), else the store's ``collector_counters``."""
    live: CounterSamples | None = getattr(request.app.state, "counter_samples", None)
    return live() if live is not None else store


CountersDep = Annotated[Store | pd.DataFrame, Depends(get_counter_samples)]


def get_heartbeats(request: Request) -> Mapping[int, Heartbeat]:
    """The collectors' latest heartbeats (``app.state.heartbeats``; none by default)."""
    source: Heartbeats | None = getattr(request.app.state, "heartbeats", None)
    return {} if source is None else source()


HeartbeatsDep = Annotated[Mapping[int, Heartbeat], Depends(get_heartbeats)]
