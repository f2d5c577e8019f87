"""Mount the view routers (hosts, VMs, top, matrix, sessions, pcap, metrics) and the
dashboard on the analyzer's app (who may call them is ``api.gate``'s, for the whole app).

::

    GET  /api/v1/hosts                   since until                -> HostsOut
    GET  /api/v1/vms                     since until                -> VmsOut
    GET  /api/v1/vms/{name_or_uuid}      since until                -> VmDetailOut (404)
    GET  /api/v1/top                     by metric since until limit -> TopOut
    GET  /api/v1/matrix                  level since until bin      -> MatrixOut
    GET  /api/v1/sessions[/{name}]                                  -> SessionsListOut
    POST /api/v1/sessions, PUT/DELETE /api/v1/sessions/{name}       (admin)
    GET  /api/v1/pcap                    vm host flow since until strip_tag format
    GET  /api/v1/predictions/forecast|placement, POST /api/v1/predictions/whatif
    GET  /metrics                        Prometheus text 0.0.4
    GET  /                               the dashboard
"""

from __future__ import annotations

from fastapi import FastAPI

from vspan.analysis.inventory.span_sessions import SessionStore
from vspan.api.dashboard import install_dashboard
from vspan.api.routers import hosts, matrix, metrics, pcap, profiles, sessions, top, vms
from vspan.api.routers.predictions import router as predictions_router
from vspan.api.views_deps import ViewContext, ViewSource, set_view_context

__all__ = ["VIEW_ROUTERS", "install_views"]

VIEW_ROUTERS = (
    hosts.router, vms.router, top.router, matrix.router, sessions.router, pcap.router,
    metrics.router, profiles.router, predictions_router,
)  # fmt: skip


def install_views(
    app: FastAPI,
    analyzer: ViewSource,
    *,
    sessions: SessionStore | None = None,
) -> SessionStore:
    """Mount the view routers and the dashboard on ``app``. ``sessions``: the SPAN sessions
    (by default ``DATA_DIR/sessions.json``, loaded here); returned, so that its
    ``sessions_for`` can be given to ``install_control``."""
    if sessions is None:
        sessions = SessionStore(analyzer.data_dir / "sessions.json")
        sessions.load()
    set_view_context(app.state, ViewContext(analyzer, sessions))
    for router in VIEW_ROUTERS:
        app.include_router(router)
    install_dashboard(app)
    return sessions
