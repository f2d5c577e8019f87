"""What API handlers receive through ``Depends``: the inventory state, the clock, and the
providers of sessions and port-profiles.

Everything hangs off one ``ControlContext`` in ``app.state`` (set by
``api.control.install_control``); tests replace any piece with
``app.dependency_overrides[get_state] = ...`` rather than patching globals. Only this
outermost layer reads the wall clock (``ControlContext.now``); the state gets ``now`` passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from vspan.analysis.inventory_state import InventoryState
from vspan.inventory import Host, Vm

__all__ = [
    "Clock",
    "ClockDep",
    "ContextDep",
    "ControlContext",
    "ProfilesDep",
    "ProfilesFor",
    "SessionsDep",
    "SessionsFor",
    "StateDep",
    "get_clock",
    "get_context",
    "get_profiles_for",
    "get_sessions_for",
    "get_state",
    "nothing_for",
    "set_context",
]

SessionsFor = Callable[[Host, Sequence[Vm]], Sequence[Mapping[str, Any]]]
"""The SPAN sessions (JSON objects, ``vspan.collectors.sessions`` fields) that concern the
given VMs of a host."""
ProfilesFor = Callable[[Host, Sequence[Vm]], Sequence[Mapping[str, Any]]]
"""The port-profiles (JSON objects) bound to the given VMs of a host."""
Clock = Callable[[], float]


def nothing_for(host: Host, vms: Sequence[Vm]) -> list[dict[str, Any]]:
    """The default provider: no sessions, no profiles."""
    return []


@dataclass(frozen=True, slots=True)
class ControlContext:
    """What the control plane's handlers work with."""

    state: InventoryState
    sessions_for: SessionsFor = nothing_for
    profiles_for: ProfilesFor = nothing_for
    now: Clock = time.time
    """Wall clock, seconds since the epoch."""


_KEY = "vspan_control"


def get_context(request: Request) -> ControlContext:
    """The ``ControlContext`` installed on the app."""
    context = getattr(request.app.state, _KEY, None)
    if not isinstance(context, ControlContext):
        raise RuntimeError("control plane not installed: call install_control(app, state)")
    return context


def set_context(app_state: Any, context: ControlContext) -> None:
    """Install ``context`` on an app's ``state``."""
    setattr(app_state, _KEY, context)


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


def get_profiles_for(context: ContextDep) -> ProfilesFor:
    """The port-profiles provider."""
    return context.profiles_for


StateDep = Annotated[InventoryState, Depends(get_state)]
ClockDep = Annotated[Clock, Depends(get_clock)]
SessionsDep = Annotated[SessionsFor, Depends(get_sessions_for)]
ProfilesDep = Annotated[ProfilesFor, Depends(get_profiles_for)]
