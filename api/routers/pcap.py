"""``GET /api/v1/pcap``: the packet ring's frames as a capture file download.

``analysis.export.export`` writes the file to a temporary directory; it is streamed as an
attachment and deleted once sent. An unknown VM, host or flow is a 404 naming it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Final, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from vspan.analysis.ring.export import ExportError, export
from vspan.analysis.views import window
from vspan.api.routers import INVALID, PREFIX, Since, Until, unprocessable
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["pcap"])
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")
_MEDIA = {"pcapng": "application/x-pcapng", "pcap": "application/vnd.tcpdump.pcap"}
_ERRORS: dict[int | str, dict[str, object]] = {
    200: {"content": {m: {} for m in _MEDIA.values()}, "description": "the capture file"},
    404: {"description": "unknown VM, host or flow"},
    **INVALID,
}


def _flow_key(flow: str | None) -> int | str | None:
    """A flow_id (digits that fit a flow_id), else the text (a flow_uid)."""
    if flow is not None and flow.isascii() and flow.isdigit():
        if int(flow) >= 2**63:
            raise HTTPException(422, detail=f"flow: {flow[:24]}… is no flow_id (too large)")
        return int(flow)
    return flow


def _file_name(label: str, fmt: str) -> str:
    """The download's file name: the label's safe characters, at most 64 of them."""
    safe = _UNSAFE.sub("_", label)[:64].strip("._") or "capture"
    return f"vspan-{safe}.{fmt}"


@router.get("/pcap", response_class=FileResponse, responses=_ERRORS)
def pcap(
    source: SourceDep,
    *,
    vm: Annotated[str | None, Query(description="VM name or UUID")] = None,
    host: Annotated[str | None, Query(description="capturing host, name or collector_id")] = None,
    flow: Annotated[str | None, Query(description="flow_uid, or flow_id")] = None,
    since: Since = None,
    until: Until = None,
    strip_tag: Annotated[bool, Query(description="remove the VN-Tag/E-TAG")] = False,
    format: Literal["pcapng", "pcap"] = "pcapng",
) -> FileResponse:
    """The frames matching every filter, as pcapng (interfaces per port, comments) or pcap."""
    with unprocessable():
        lo, hi = window(since, until, source.clock())
    key = _flow_key(flow)
    folder = Path(tempfile.mkdtemp(prefix="vspan-pcap-"))
    out = folder / _file_name(vm or host or flow or "all", format)
    try:
        export(
            source.data_dir, out, vm=vm, host=host, flow=key, since=lo, until=hi,
            strip_tag=strip_tag, fmt=format, inventory=source.state.snapshot(),
            store=source.store,
        )  # fmt: skip
    except ExportError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        status = 404 if "unknown" in str(exc) or "matches" in str(exc) else 422
        raise HTTPException(status, detail=str(exc)) from exc
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FileResponse(
        out, media_type=_MEDIA[format], filename=out.name,
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )  # fmt: skip
