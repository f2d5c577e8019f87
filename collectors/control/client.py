"""The collector's side of the control plane: register, heartbeat, fetch configuration.

Standard library only (``urllib.request``), so the collector stays light. Every failure is a
``ControlError`` that says what was asked of whom and what came back::

    control plane http://10.0.0.5:8080: POST /api/v1/control/collectors/7/heartbeat:
    HTTP 404 Not Found: collector 7 is not registered; register it first

With a ``token`` (the analyzer's ``collector:ID`` token for this collector), every request
carries it as ``Authorization: Bearer``; without one an analyzer with tokens answers 401.

``status`` is the HTTP status (None when no answer came): ``control.sync`` registers again
after a 404 (the analyzer restarted and does not know the collector) and retries later,
with backoff, after a connection error or a refusal.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from vspan.errors import ConfigError, VspanError
from vspan.inventory import Port, format_mac

__all__ = ["PREFIX", "ControlClient", "ControlError", "port_payload"]

PREFIX = "/api/v1/control"


class ControlError(VspanError):
    """The control plane could not be reached or refused a request."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """HTTP status, or None when no HTTP answer came (refused, timeout, bad URL)."""


def port_payload(port: Port) -> dict[str, Any]:
    """A port as the register request carries it."""
    return {
        "name": port.name,
        "vif": port.vif,
        "mac": format_mac(port.mac) if port.mac else None,
        "vm_name": port.vm_name,
        "vm_uuid": port.vm_uuid,
        "profile": port.profile,
        "ifindex": port.ifindex,
        "bridge": port.bridge,
    }


class ControlClient:
    """Talks to the analyzer's control plane for one collector."""

    def __init__(
        self, base_url: str, collector_id: int, timeout: float = 5.0, *, token: str | None = None
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"control plane URL {base_url!r}: expected http://host:port")
        if not 1 <= collector_id <= 2**32 - 1:
            raise ConfigError(f"collector_id {collector_id} out of range 1..{2**32 - 1}")
        if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
            raise ConfigError("the control-plane token is empty or spans lines")
        self.base_url = base_url.rstrip("/")
        self.collector_id = collector_id
        self.timeout = timeout
        self.token = None if token is None else token.strip()
        """The analyzer's bearer token for this collector (``collector:ID`` role), if any."""

    def register(self, host_name: str, ports: Sequence[Port]) -> dict[str, Any]:
        """Register the host and all its VM ports; the answer holds sessions and profiles."""
        body = {"host": host_name, "ports": [port_payload(p) for p in ports]}
        return _object(self._call("POST", "register", body), "register")

    def heartbeat(self, counters: Mapping[str, Any]) -> None:
        """Report capture counters (``agent_report.heartbeat``: ``HeartbeatIn``)."""
        self._call("POST", "heartbeat", dict(counters))

    def sessions(self) -> list[dict[str, Any]]:
        """The SPAN sessions that concern this collector's VMs."""
        return _list(self._call("GET", "sessions"), "sessions")

    def session_state(self) -> dict[str, Any]:
        """``{"sessions": [...], "sessions_total": N, "registered": bool}``: the SPAN sessions
        that concern this collector's VMs, how many the analyzer has for all hosts, and
        whether this analyzer has a registration of the collector (the last two absent from
        older analyzers)."""
        doc = _object(self._call("GET", "sessions"), "sessions")
        _list(doc, "sessions")
        return doc

    def profiles(self) -> list[dict[str, Any]]:
        """The port-profiles bound to this collector's VMs."""
        return _list(self._call("GET", "profiles"), "profiles")

    def _call(self, method: str, what: str, body: Any = None) -> Any:
        path = f"{PREFIX}/collectors/{self.collector_id}/{what}"
        where = f"control plane {self.base_url}: {method} {path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _detail(exc.read())
            raise ControlError(
                f"{where}: HTTP {exc.code} {exc.reason}: {detail}", status=exc.code
            ) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise ControlError(f"{where}: no answer within {self.timeout:g} s") from exc
            raise ControlError(f"{where}: {_reason(exc.reason)}") from exc
        except TimeoutError as exc:
            raise ControlError(f"{where}: no answer within {self.timeout:g} s") from exc
        except OSError as exc:
            raise ControlError(f"{where}: {_reason(exc)}") from exc
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ControlError(f"{where}: the answer is not JSON: {raw[:80]!r}") from exc


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the analyzer running?)"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


def _detail(raw: bytes) -> str:
    """The ``detail`` of a FastAPI error answer, readable (422: ``field: message``)."""
    try:
        detail = json.loads(raw)["detail"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", errors="replace") or "(no body)"
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        return "; ".join(parts)
    return str(detail)


def _object(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ControlError(f"control plane {what}: expected a JSON object, got {doc!r:.80}")
    return doc


def _list(doc: Any, key: str) -> list[dict[str, Any]]:
    items = _object(doc, key).get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ControlError(f"control plane {key}: expected a list of objects under {key!r}")
    return items
