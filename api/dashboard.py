"""The web dashboard: ``GET /`` serves ``static/index.html``, ``/static/*`` its CSS and JS.

Plain HTML, CSS and vanilla JavaScript, no CDN: the page polls the API every few seconds and
draws its charts itself (SVG). The page holds no data, so it is served without a token; its
API calls send the token kept in the browser (``#token=…`` in the URL, then localStorage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC", "install_dashboard"]

STATIC: Final = Path(__file__).resolve().parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/")
def index(
    poll: Annotated[str | None, Query(description="ms between refreshes")] = None,
    bin: Annotated[str | None, Query(description="matrix bin, seconds")] = None,
    window: Annotated[str | None, Query(description="since, e.g. -1h")] = None,
    vm: Annotated[str | None, Query(description="the VM shown first")] = None,
) -> FileResponse:
    """The dashboard's page; its script reads these parameters from the address itself."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at ``/`` and its files at ``/static``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
