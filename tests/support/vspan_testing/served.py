"""The view API over real HTTP: a stored data directory (``readstore.build``), the inventory
state, and uvicorn on 127.0.0.1 serving ``install_views`` with the read API and the control
plane beside it, wired as in the analyzer (the control plane's ``sessions_for`` is the
``SessionStore`` of the views, every route behind the gate of ``tokens``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from vspan.analysis.inventory.state import InventoryState
from vspan.analysis.policy.profiles import PolicySet
from vspan.analysis.store.store import Store
from vspan.api.auth import AccessPolicy
from vspan.api.control import install_control
from vspan.api.gate import install_gate
from vspan.api.server import HttpServer
from vspan.api.views_app import install_views
from vspan_testing.readstore import ReadData, build


@dataclass
class Source:
    """A stand-in for the ``Analyzer``: what ``api.views_deps.ViewSource`` asks for."""

    store: Store
    state: InventoryState
    data_dir: Path
    clock: Callable[[], float]
    live: dict[str, Any] = field(default_factory=dict)
    policy: PolicySet | None = None

    def counters(self) -> dict[str, Any]:
        return self.live


@dataclass
class Client:
    """JSON (or raw) requests to a served app."""

    url: str

    def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None,
        raw: bool = False,
    ) -> tuple[int, Any, Mapping[str, str]]:  # fmt: skip
        """(status, JSON or bytes, headers) of a request; error answers too."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
                status, headers = response.status, dict(response.headers)
        except urllib.error.HTTPError as exc:
            payload, status, headers = exc.read(), exc.code, dict(exc.headers)
        headers = {k.lower(): v for k, v in headers.items()}
        if raw or not payload or "json" not in headers.get("content-type", ""):
            return status, payload, headers
        return status, json.loads(payload), headers

    def get(self, path: str, **kw: Any) -> Any:
        status, doc, _ = self.call("GET", path, **kw)
        assert status == 200, (path, status, doc)
        return doc


@dataclass
class Served(Client):
    """The view API serving a stored data directory."""

    data: ReadData
    source: Source
    app: FastAPI


@contextmanager
def serve_views(
    folder: Path, *, tokens: Mapping[str, str] | None = None, read_api: bool = True
) -> Iterator[Served]:
    """Fill ``folder``, open its store and serve the views (+ the read API) on 127.0.0.1."""
    data = build(folder, ring=True)
    state = InventoryState()
    state.add_static(data.cap.inventory(), data.now - 3600)
    with Store(folder) as store:
        source = Source(store, state, folder, lambda: data.now)
        app = FastAPI()
        install_gate(app, AccessPolicy.of(tokens))
        if read_api:
            from vspan.api.app import install_read_api

            install_read_api(app, store=store, now=source.clock, heartbeats=state.latest_heartbeats)
        sessions = install_views(app, source)
        install_control(
            app,
            state,
            sessions_for=sessions.sessions_for,
            now=source.clock,
            sessions_total=sessions.count,
        )
        server = HttpServer(app, "127.0.0.1", 0)
        server.start()
        try:
            yield Served(f"http://127.0.0.1:{server.port}", data, source, app)
        finally:
            server.stop()
