"""Keeping a collector registered with the analyzer's control plane, whatever happens to it.

A collector registers its host and VM ports; the analyzer keeps that in memory. So the
registration is a state this module keeps true, every refresh interval (``refresh``):

- not registered yet — the first attempt failed (the analyzer was not up), or it refused
  (a host name taken: 409) — the collector registers again, with exponential backoff from
  ``retry_initial_s`` to ``retry_max_s``, until it works;
- the ports are not those it last registered — compared with what the analyzer was told,
  not with the collector's own view, so a VM MAC learned from traffic between two refreshes
  (``discovery_macs``: applied to the mirror at once) is registered too: it registers them
  at once (when the ports changed since the previous refresh, even during a backoff);
- else it asks for its sessions. An answer that says the analyzer does not know this collector
  — a 404 (``collector 11 is not registered``: the analyzer restarted), or ``registered:
  false`` (a restarted analyzer whose inventory file names the host) — makes it register
  again at once. A heartbeat answered 404 does the same at the next refresh.

The answer of a registration carries the sessions (and the port-profiles) of the host's VMs,
so everything is fetched again after it. Failures are counted by kind (``errors``) and logged
at a limited rate (``RateLimitedLog``: the first, then every ``log_every_n``-th or once per
``log_every_s``), and the success that ends them is logged with their count. The last good
answer stands meanwhile (the collector keeps its sessions). Time is an argument.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vspan.collectors._ratelog import RateLimitedLog
from vspan.errors import VspanError
from vspan.inventory import Port

__all__ = ["ControlPlane", "ControlSync", "ControlSyncConfig"]

log = logging.getLogger(__name__)

_FORGOTTEN = 404
"""The status of a control-plane answer about a collector the analyzer does not know."""


class ControlPlane(Protocol):
    """What ``ControlSync`` asks of the control plane (``control.client.ControlClient``)."""

    def register(self, host_name: str, ports: Sequence[Port]) -> dict[str, Any]: ...

    def session_state(self) -> dict[str, Any]: ...

    def heartbeat(self, counters: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class ControlSyncConfig:
    """Timings of ``ControlSync``."""

    retry_initial_s: float = 2.0
    """Wait after the first failed registration; doubled after each failure."""
    retry_max_s: float = 30.0
    """Longest wait between two registration attempts."""
    log_every_n: int = 10
    """Log every N-th failure of a kind (and the first)."""
    log_every_s: float = 60.0
    """Log a failure at least this often while it goes on."""


class ControlSync:
    """The collector's registration, kept: see the module's docstring."""

    def __init__(self, control: ControlPlane, config: ControlSyncConfig | None = None) -> None:
        self.control = control
        self.config = config or ControlSyncConfig()
        self.registered = False
        """Whether the analyzer knows this collector's ports (as far as we can tell)."""
        self.registrations = 0
        """Successful registrations."""
        self.errors: dict[str, int] = {}
        """Failed requests by kind: ``register``, ``sessions``, ``heartbeat``."""
        self.next_attempt = 0.0
        """When an unregistered collector tries again (``now`` of ``refresh``)."""
        self.reported: tuple[str, tuple[Port, ...]] | None = None
        """The host name and ports of the last registration the analyzer accepted."""
        self._backoff = self.config.retry_initial_s
        cfg = self.config
        self._logs = {
            kind: RateLimitedLog(log, every_n=cfg.log_every_n, every_s=cfg.log_every_s)
            for kind in ("register", "sessions", "heartbeat")
        }

    def refresh(
        self, now: float, host: str, ports: Sequence[Port], *, changed: bool
    ) -> dict[str, Any] | None:
        """Register when needed, else ask for the sessions; the answer (with ``sessions``
        and ``sessions_total``), or None when there is none to apply. ``changed``: the
        ports changed since the previous call (an unregistered collector tries at once)."""
        if self.registered and self.reported == (host, tuple(ports)):
            try:
                state = self.control.session_state()
            except VspanError as exc:
                if getattr(exc, "status", None) != _FORGOTTEN:
                    self._failed("sessions", now, "control plane: cannot get the sessions: %s", exc)
                    return None
                self._count("sessions")
                self._forgotten(now, exc)
            else:
                self._logs["sessions"].success("control plane: sessions answer again")
                if state.get("registered", True) is not False:
                    return state
                self._forgotten(now, "the analyzer has no registration of this collector")
        if not self.registered and not changed and now < self.next_attempt:
            return None
        return self._register(now, host, ports)

    def heartbeat(self, now: float, body: dict[str, Any]) -> None:
        """Send the counters; a 404 means the analyzer forgot us: register at the next
        refresh."""
        if not self.registered:
            return  # the analyzer would not keep it: it does not know the host
        try:
            self.control.heartbeat(body)
        except VspanError as exc:
            if getattr(exc, "status", None) == _FORGOTTEN:
                self._count("heartbeat")
                self._forgotten(now, exc)
            else:
                self._failed("heartbeat", now, "control plane: heartbeat failed: %s", exc)
            return
        self._logs["heartbeat"].success("control plane: heartbeats answer again")

    # --- internals ----------------------------------------------------------------------

    def _register(self, now: float, host: str, ports: Sequence[Port]) -> dict[str, Any] | None:
        try:
            reply = self.control.register(host, ports)
        except VspanError as exc:
            self.registered = False
            self.next_attempt = now + self._backoff
            self._failed(
                "register", now, "control plane: cannot register host %r (next attempt in "
                "%.3g s): %s", host, self._backoff, exc,
            )  # fmt: skip
            self._backoff = min(self._backoff * 2, self.config.retry_max_s)
            return None
        self.registered = True
        self.reported = (host, tuple(ports))
        self.registrations += 1
        self._backoff = self.config.retry_initial_s
        self._logs["register"].success(
            "control plane: registered host %r with %d VM ports", host, len(ports)
        )
        return reply

    def _forgotten(self, now: float, why: object) -> None:
        if self.registered:
            log.warning("control plane: the analyzer does not know this collector (%s): "
                        "registering again", why)  # fmt: skip
        self.registered = False
        self.next_attempt = now
        self._backoff = self.config.retry_initial_s

    def _failed(self, kind: str, now: float, message: str, *args: object) -> None:
        self._count(kind)
        self._logs[kind].failure(now, message, *args)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
