"""What the view routers (hosts, VMs, top, matrix, sessions, pcap, metrics) receive through
``Depends``: one ``ViewContext`` in ``app.state``, set by ``api.views_app.install_views``.

The context holds a ``ViewSource`` — the running ``Analyzer``, or in tests any object with
the same few attributes — and the ``SessionStore``. Tests swap a piece with
``app.dependency_overrides[get_source] = ...``; nothing here is a module-level singleton.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends

from vspan.analysis.inventory.span_sessions import SessionStore
from vspan.analysis.inventory.state import InventoryState
from vspan.analysis.policy.profiles import PolicySet
from vspan.analysis.store.store import Store
from vspan.api.deps import AppContext

__all__ = [
    "ContextDep",
    "SessionsStoreDep",
    "SourceDep",
    "ViewContext",
    "ViewSource",
    "get_source",
    "get_view_context",
    "set_view_context",
]


class ViewSource(Protocol):
    """The narrow view of an ``Analyzer`` the view routers need."""

    @property
    def store(self) -> Store: ...

    @property
    def state(self) -> InventoryState: ...

    @property
    def data_dir(self) -> Path: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def policy(self) -> PolicySet | None:
        """The loaded port-profiles, if any."""
        ...

    def counters(self) -> dict[str, Any]:
        """``Analyzer.counters()``: engine, collectors, receivers, store writer, ring, …"""
        ...


@dataclass(frozen=True, slots=True)
class ViewContext:
    """What the view routers work with."""

    source: ViewSource
    sessions: SessionStore


_VIEWS = AppContext(
    "vspan_views", ViewContext, "views not installed: call install_views(app, analyzer)"
)
get_view_context = _VIEWS.get
"""The ``ViewContext`` installed on the app."""
set_view_context = _VIEWS.install
"""Install a ``ViewContext`` on an app's ``state``."""


ContextDep = Annotated[ViewContext, Depends(get_view_context)]


def get_source(context: ContextDep) -> ViewSource:
    """The analyzer (or its stand-in)."""
    return context.source


def get_sessions_store(context: ContextDep) -> SessionStore:
    """The SPAN sessions."""
    return context.sessions


SourceDep = Annotated[ViewSource, Depends(get_source)]
SessionsStoreDep = Annotated[SessionStore, Depends(get_sessions_store)]
