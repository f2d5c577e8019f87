"""The read API: one ``APIRouter`` per resource, mounted by ``api.app.install_read_api``.

Routes (prefix ``/api/v1``, except ``/healthz``)::

    GET /flows            vm host scope proto ip port since until sort limit cursor -> FlowsOut
    GET /violations       vm since until limit                  -> ViolationsOut
    GET /policies/hits    vm profile                            -> PolicyHitsOut
    GET /migrations       vm since until limit                  -> MigrationHistoryOut
    GET /collectors                                             -> CollectorsOut
    GET /healthz                                                -> HealthOut

Handlers are glue: they pass the parameters to ``analysis.queries`` and its frame to a model
of ``api.models``. A parameter the query refuses (``ConfigError``) is a 422 whose
``detail`` is the reason, like ``"since: cannot read 'soon' as a time: ..."``; a parameter
of the wrong type is FastAPI's own 422.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Final

from fastapi import HTTPException, Query

from vspan.errors import ConfigError

__all__ = ["INVALID", "PREFIX", "Since", "Until", "VmFilter", "unprocessable"]

PREFIX: Final = "/api/v1"
INVALID: Final[dict[int | str, dict[str, object]]] = {
    422: {"description": "a parameter is invalid; detail says which and why"}
}
_TIME = "ISO 8601, epoch seconds, or before now: -15m, 2h, 1d"
Since = Annotated[str | None, Query(description=f"at or after; {_TIME}")]
Until = Annotated[str | None, Query(description=f"before; {_TIME}")]
VmFilter = Annotated[str | None, Query(description="VM name or UUID")]


@contextmanager
def unprocessable() -> Iterator[None]:
    """Turn a ``ConfigError`` (a bad query parameter) into a 422 whose detail is its reason."""
    try:
        yield
    except ConfigError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
