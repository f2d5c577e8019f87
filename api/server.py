"""The analyzer's HTTP server: the FastAPI app over an ``Analyzer``, served by uvicorn."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from vspan.analysis.service import Analyzer
from vspan.api.control import install_control

__all__ = ["HttpServer", "create_app"]


def create_app(analyzer: Analyzer) -> FastAPI:
    """The API of a running analyzer: control plane, read API and health."""
    app = FastAPI(
        title="vspan analyzer",
        version="1",
        description="Per-VM flows, policy hits, migrations and collectors of a vspan analyzer.",
    )
    install_control(app, analyzer.state, profiles_for=analyzer.profiles_for, now=analyzer.clock)
    app.state.analyzer = analyzer
    app.state.store = analyzer.store

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/status")
    def status() -> dict[str, Any]:
        """Every counter of the analyzer (engine, receivers, store, ring, inventory)."""
        return analyzer.counters()

    return app


class HttpServer:
    """uvicorn in a thread, with a clean stop."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                     access_log=False, lifespan="off")  # fmt: skip
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
