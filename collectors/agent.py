"""The collector: one component that captures VM traffic, tags it and ships it.

Per step: poll the capture source → mirror (VN-tag per the mirroring rules and the SPAN
sessions, per route) → forward (tunnel messages, flushed when full or after 20 ms; one
stream per route: the collector's analyzer and each session destination, ``routes``).
Every ``refresh_interval_s`` the port directory is asked again; new ports are captured
from their first frame and sessions are re-selected (sessions follow VMs, so a VM that
arrived by live migration is mirrored at once). With a control plane the collector
registers its ports, fetches its sessions and sends heartbeats with its counters.

Sessions: those of the collector's config and those the control plane pushes (a pushed
session replaces a configured one of the same name). While any session exists — here, or
on the analyzer for any host (``sessions_total`` of the control plane's answers) — only
what sessions select is mirrored, and a host none of whose VMs is selected sends nothing;
with none at all, everything is mirrored to the collector's analyzer. The control plane's
last good answer stands while it cannot be reached.

Time is an argument of ``step``; only the command-line loop reads the clock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vspan.collectors import agent_report
from vspan.collectors._ratelog import RateLimitedLog
from vspan.collectors.control.sync import ControlPlane, ControlSync, ControlSyncConfig
from vspan.collectors.forward.forwarder import Forwarder, ForwarderConfig, Sender
from vspan.collectors.forward.routes import Routes, SenderFactory, make_sender
from vspan.collectors.mirror import Mirror
from vspan.collectors.model import CaptureSource, PortBatch, PortDirectory
from vspan.errors import VspanError
from vspan.inventory import Port
from vspan.sessions import Destination, Selection, SessionSet

__all__ = ["Collector", "CollectorSettings", "PortAware"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CollectorSettings:
    """What a collector needs besides its parts."""

    collector_id: int
    """This host's id in the tunnel (1..2^32-1)."""
    host: str
    """This host's name."""
    key: bytes | None = None
    """AUTH key shared with the analyzer; None sends without AUTH."""
    max_message: int | None = None
    """Largest tunnel message; None: the sender's default (UDP 1,400 bytes)."""
    snaplen: int = 0
    """Bytes kept of each frame for every session (0: whole frames)."""
    sample: int = 1
    """Keep 1 frame in N per port for every session."""
    refresh_interval_s: float = 2.0
    """How often the port directory is asked again."""
    heartbeat_interval_s: float = 10.0
    """How often counters go to the control plane."""
    register_retry_max_s: float = 30.0
    """Longest wait between two attempts to register (the first waits a refresh interval,
    each next one twice as long)."""
    analyzer: Destination | None = None
    """The collector's own analyzer as a session would name it: a session destination
    equal to it (host text, port, transport) is that analyzer's stream, not a second one."""


@runtime_checkable
class PortAware(Protocol):
    """A capture source whose set of ports can change (AF_PACKET); replay has fixed ports."""

    def add_port(self, port: Port) -> None: ...

    def remove_port(self, name: str) -> bool: ...


class Collector:
    """Capture source + port directory + mirror + forwarder (+ control plane)."""

    def __init__(
        self,
        settings: CollectorSettings,
        *,
        source: CaptureSource,
        directory: PortDirectory,
        sender: Sender,
        sessions: SessionSet | None = None,
        control: ControlPlane | None = None,
        refresh: Any = None,
        wall: Callable[[], float] = time.time,
        senders: SenderFactory = make_sender,
    ) -> None:
        self.settings = settings
        self.source = source
        self.directory = directory
        self.local_sessions = sessions or SessionSet()
        """The sessions of the collector's config."""
        self.pushed_sessions = SessionSet()
        """The sessions the control plane sent last."""
        self.sessions_total = 0
        """Sessions on the analyzer, for any host (the control plane's last answer)."""
        self.control = control
        self.sync = (
            None
            if control is None
            else ControlSync(
                control,
                ControlSyncConfig(
                    retry_initial_s=settings.refresh_interval_s,
                    retry_max_s=max(settings.register_retry_max_s, settings.refresh_interval_s),
                ),
            )
        )
        """The registration with the control plane, kept (None without one)."""
        self.wall = wall
        """The wall clock, only for the heartbeat's timestamp and the ``boot_id`` of a start
        (quarter seconds: boots increase, see ``forward.boot_id_at``); ``step`` takes ``now``."""
        self.mirror = Mirror()
        self.routes = Routes(
            ForwarderConfig(
                collector_id=settings.collector_id,
                max_message=settings.max_message,
                key=settings.key,
            ),
            sender,
            senders=senders,
            wall=wall,
        )
        self._refresh = refresh  # a Discovery's refresh(), when the directory is one
        self._session_doc: tuple[list[Any], object] | None = None
        self._last_now = 0.0
        self.ports: list[Port] = []
        self._next_refresh = 0.0
        self._next_heartbeat = 0.0
        self.steps = 0
        self.selection_version = 0
        """Counts the selections applied (a port or session change)."""
        self.errors: dict[str, int] = {}
        """Refresh failures and sessions the collector could not apply, by kind (the data
        path goes on; the control plane's own are ``sync.errors``)."""
        self._logs = {kind: RateLimitedLog(log) for kind in ("refresh", "sessions")}

    @property
    def forwarder(self) -> Forwarder:
        """The forwarder to the collector's own analyzer."""
        return self.routes.default

    @property
    def sessions(self) -> SessionSet:
        """The sessions in force: the config's and the control plane's."""
        return self.local_sessions.merged(self.pushed_sessions)

    @property
    def selective(self) -> bool:
        """Whether sessions exist (here or on the analyzer): only they are mirrored."""
        return bool(self.local_sessions.sessions) or self.sessions_total > 0

    # --- component ----------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Find the ports, start sending and capturing.

        A port directory that fails now (a missing bridge, no permission) is an error;
        later failures are counted and the last good ports kept.
        """
        if self._refresh is not None:
            self._refresh()
        self.routes.start()
        self._update_ports(now)
        self.source.start()

    def stop(self, now: float | None = None) -> None:
        """Take what the capture still holds, flush everything queued, stop."""
        try:
            last = self.source.poll(0.0)  # frames captured since the last step
            if last is not None and len(last.frames):
                self._export(last, self._last_now if now is None else now)
        finally:
            try:
                self.source.stop()
            finally:
                self.routes.stop()

    def step(self, now: float, poll_s: float = 0.02) -> int:
        """One round: capture, mirror, forward; returns the frames exported (to any route)."""
        self.steps += 1
        if now >= self._next_refresh:
            self._update_ports(now)
        self._last_now = now
        exported = 0
        batch = self.source.poll(poll_s)
        if batch is not None and len(batch.frames):
            exported = self._export(batch, now)
        self.routes.flush_due(now)
        if self.sync is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval_s
            self.sync.heartbeat(now, self.heartbeat())
        return exported

    def _export(self, batch: PortBatch, now: float) -> int:
        """Mirror a captured batch and queue its tagged frames; learn VM MACs on the way."""
        learn = getattr(self.directory, "learn_macs", None)
        if callable(learn) and learn(batch, now):  # a VM MAC the source did not know
            # applied here at once (the mirror tags by it); the control plane gets it at the
            # next refresh (``ControlSync`` registers what it was not told yet)
            self._apply_ports(self.directory.ports())
        before = self.mirror.counters.exported
        for route, result in self.mirror.process_routes(batch).items():
            self.routes.push(route, result.frames, now)
        return self.mirror.counters.exported - before

    # --- ports and sessions -------------------------------------------------------------

    def refresh_ports(self, now: float) -> None:
        """Look at the ports now, not at the next refresh, and tell the control plane if
        they changed (``vspan demo`` does so before it stops)."""
        self._update_ports(now)

    def _update_ports(self, now: float) -> None:
        self._next_refresh = now + self.settings.refresh_interval_s
        if self._refresh is not None:
            try:
                self._refresh()
            except VspanError as exc:
                self._count("refresh")
                self._logs["refresh"].failure(now, "port discovery failed: %s", exc)
                return
        ports = self.directory.ports()
        changed = ports != self.ports or not self.steps
        if changed:
            self._apply_ports(ports)
        self.routes.retry()  # destinations whose sender could not start before
        if self.sync is None:
            return
        # Register when the ports change or the analyzer does not know them (the reply
        # carries the sessions), else ask for the sessions, so that sessions created or
        # deleted on the analyzer reach this host within a refresh interval.
        reply = self.sync.refresh(now, self.settings.host, ports, changed=changed)
        if reply is not None:
            self._take_sessions(reply, now)

    def _take_sessions(self, reply: dict[str, Any], now: float) -> None:
        """Apply the sessions of a control-plane answer when they changed."""
        doc, total = reply.get("sessions"), reply.get("sessions_total")
        if not isinstance(doc, list) or (doc, total) == self._session_doc:
            return
        try:
            parsed = SessionSet.from_json_value(doc)
        except VspanError as exc:
            self._count("sessions")
            self._logs["sessions"].failure(now, "control plane: sessions refused: %s", exc)
            return
        self._session_doc = (doc, total)
        self.pushed_sessions = parsed
        # the analyzer has at least those it sent (all, if it does not say)
        self.sessions_total = max(total if isinstance(total, int) else 0, len(doc))
        self._apply_selection()

    def _apply_ports(self, ports: Sequence[Port]) -> None:
        old = {p.name: p for p in self.ports}
        new = {p.name: p for p in ports}
        if isinstance(self.source, PortAware):
            for name in old.keys() - new.keys():
                self.source.remove_port(name)
            for name, port in new.items():
                if old.get(name) != port:
                    if name in old:
                        self.source.remove_port(name)
                    self.source.add_port(port)
        self.ports = list(ports)
        self.mirror.set_ports(self.ports)
        self._apply_selection()

    def _apply_selection(self) -> None:
        """Each route's selections from the sessions in force and the ports; the forwarders
        of the destinations named."""
        routes: dict[Destination | None, tuple[Selection, ...]] = {None: ()}
        if not self.selective:
            routes[None] = (Selection.everything(),)
        else:
            for destination, parts in self.sessions.routes(self.ports).items():
                key = None if destination == self.settings.analyzer else destination
                if parts:  # a destination none of this host's VMs goes to gets no stream
                    routes[key] = routes.get(key, ()) + parts
        snaplen, sample = self.settings.snaplen, self.settings.sample
        if snaplen or sample > 1:
            routes = {
                key: tuple(_cut(p, snaplen, sample) for p in ps) for key, ps in routes.items()
            }
        self.mirror.set_routes(routes)
        self.routes.sync(d for d in routes if d is not None)
        self.selection_version += 1

    # --- counters -----------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Everything counted so far (``agent_report.counters``)."""
        return agent_report.counters(self)

    def heartbeat(self) -> dict[str, Any]:
        """The heartbeat body of the control plane (``time`` from the wall clock given)."""
        return agent_report.heartbeat(self)

    def stats_line(self) -> str:
        """One line for the terminal (``agent_report.stats_line``)."""
        return agent_report.stats_line(self)

    def sessions_line(self) -> str:
        """What is mirrored, in one line: the sessions in force and the ports they select."""
        host = self.settings.host
        if not self.selective:
            return f"{host}: no SPAN session: every VM port mirrored ({len(self.ports)})"
        names = ", ".join(
            s.name if s.destination is None else f"{s.name} -> {s.destination.url}"
            for s in self.sessions.sessions
        )
        ports = {p for parts in self.mirror.routes.values() for sel in parts for p in sel.per_port}
        return (
            f"{host}: SPAN sessions here: {names or 'none'} ({self.sessions_total} on the "
            f"analyzer); {len(ports)} of {len(self.ports)} VM ports selected"
        )

    def destination_lines(self) -> list[str]:
        """One line per session destination: what went there."""
        return agent_report.destination_lines(self)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _cut(selection: Selection, snaplen: int, sample: int) -> Selection:
    """``selection`` with the collector-wide snaplen and sampling applied on top."""
    cut = selection.snaplen
    cut = np.where(cut == 0, snaplen, np.minimum(cut, snaplen) if snaplen else cut)
    return dataclasses.replace(
        selection,
        snaplen=cut.astype(np.int32),
        sample=np.maximum(selection.sample, sample).astype(np.int32),
    )
