"""The analyzer's HTTP server: the FastAPI app over an ``Analyzer``, served by uvicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import uvicorn
from fastapi import FastAPI

from vspan.analysis.inventory.span_sessions import SessionStore
from vspan.analysis.service.analyzer import Analyzer
from vspan.api.app import install_read_api
from vspan.api.auth import AccessPolicy
from vspan.api.control import install_control
from vspan.api.gate import install_gate
from vspan.api.views_app import install_views

__all__ = ["HttpServer", "create_app"]


def create_app(
    analyzer: Analyzer, *, tokens: Mapping[str, str] | None = None, open_access: bool = False
) -> FastAPI:
    """The API of a running analyzer: control plane, read API, views, metrics, dashboard,
    every route behind ``api.gate``.

    ``tokens`` (bearer token → ``read``, ``admin``, ``collector[:ID]``; ``api.auth``) guard
    the API; without them only loopback clients are served, or every client with
    ``open_access`` (``--insecure-listen``)."""
    app = FastAPI(
        title="vspan analyzer",
        version="1",
        description="Per-VM flows, policy hits, migrations and collectors of a vspan analyzer.",
    )
    install_gate(app, AccessPolicy.of(tokens, open=open_access))
    sessions = SessionStore(analyzer.data_dir / "sessions.json")
    sessions.load()
    install_control(
        app,
        analyzer.state,
        sessions_for=lambda host, vms: sessions.sessions_for(host, vms, analyzer.profile_of),
        profiles_for=analyzer.profiles_for,
        now=analyzer.clock,
        sessions_total=sessions.count,
    )
    app.state.analyzer = analyzer
    app.state.ready = analyzer.ready
    app.state.store = analyzer.store
    install_read_api(app, store=analyzer.store, heartbeats=analyzer.state.latest_heartbeats)
    install_views(app, analyzer, sessions=sessions)

    @app.get("/api/v1/status")
    def status() -> dict[str, Any]:
        """Every counter of the analyzer (engine, receivers, store, ring, inventory)."""
        return analyzer.counters()

    return app


class HttpServer:
    """uvicorn in a thread, with a clean stop."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on (the kernel's choice when asked for 0)."""
        servers = getattr(self.server, "servers", [])
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve in a thread; return once listening (or raise)."""
        self._thread = threading.Thread(target=self.server.run, name="vspan-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise OSError(
                    f"the HTTP server could not start on {self.config.host}:{self.config.port}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for it."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
