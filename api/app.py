"""The analyzer's FastAPI application: the read API's routers, mounted on an app.

``install_read_api`` puts what the handlers depend on into ``app.state`` (``api.deps``:
``get_store``, ``get_now``, ``get_counter_samples``) and includes one router per resource
(``api.routers``); the control plane is mounted beside it by ``api.control.install_control``.
"""

from __future__ import annotations

import time

from fastapi import FastAPI

from vspan.analysis.store.store import Store
from vspan.api.auth import AccessPolicy
from vspan.api.deps import Clock, CounterSamples, Heartbeats
from vspan.api.gate import install_gate
from vspan.api.routers import collectors, flows, health, migrations, policies

__all__ = ["ROUTERS", "create_read_app", "install_read_api"]

ROUTERS = (health.router, flows.router, policies.router, migrations.router, collectors.router)


def install_read_api(
    app: FastAPI,
    *,
    store: Store,
    now: Clock = time.time,
    counter_samples: CounterSamples | None = None,
    heartbeats: Heartbeats | None = None,
) -> None:
    """Mount the read API on ``app``, answering from ``store`` (started; read-only is
    enough). ``now`` is the clock relative times are read against; ``counter_samples``
    gives live collector counters (default: the store's ``collector_counters``);
    ``heartbeats`` the latest capture counters each collector reported (default: none)."""
    app.state.store = store
    app.state.read_clock = now
    app.state.counter_samples = counter_samples
    app.state.heartbeats = heartbeats
    for router in ROUTERS:
        app.include_router(router)


def create_read_app(
    store: Store, *, now: Clock = time.time, counter_samples: CounterSamples | None = None
) -> FastAPI:
    """A FastAPI app serving only the read API (the analyzer mounts it with more), to
    loopback clients only."""
    app = FastAPI(title="vspan analyzer", version="1")
    install_gate(app, AccessPolicy())
    install_read_api(app, store=store, now=now, counter_samples=counter_samples)
    return app
