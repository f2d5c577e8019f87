"""The collector: one component that captures VM traffic, tags it and ships it.

Per step: poll the capture source → mirror (VN-tag per the mirroring rules and the SPAN
sessions) → forward (tunnel messages, flushed when full or after 20 ms). Every
``refresh_interval_s`` the port directory is asked again; new ports are captured from
their first frame and sessions are re-selected (sessions follow VMs, so a VM that arrived
by live migration is mirrored at once). With a control plane the collector registers its
ports, fetches its sessions and sends heartbeats with its counters.

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

from vspan.collectors.control_client import ControlClient, heartbeat_payload
from vspan.collectors.forward import Forwarder, ForwarderConfig, Sender, boot_id_at
from vspan.collectors.mirror import Mirror
from vspan.collectors.model import CaptureSource, Port, PortBatch, PortDirectory
from vspan.collectors.sessions import Selection, SessionSet
from vspan.errors import VspanError

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
        control: ControlClient | None = None,
        refresh: Any = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.source = source
        self.directory = directory
        self.sessions = sessions
        self.control = control
        self.wall = wall
        """The wall clock, only for the heartbeat's timestamp and the ``boot_id`` of a start
        (quarter seconds: boots increase, see ``forward.boot_id_at``); ``step`` takes ``now``."""
        self.mirror = Mirror()
        self.forwarder = Forwarder(
            ForwarderConfig(
                collector_id=settings.collector_id,
                max_message=settings.max_message,
                key=settings.key,
            ),
            sender,
        )
        self._refresh = refresh  # a Discovery's refresh(), when the directory is one
        self._session_doc: list[Any] | None = None
        self._last_now = 0.0
        self.ports: list[Port] = []
        self._next_refresh = 0.0
        self._next_heartbeat = 0.0
        self.steps = 0
        self.errors: dict[str, int] = {}
        """Control-plane and refresh failures by kind (the data path goes on)."""

    # --- component ----------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Find the ports, start sending and capturing.

        A port directory that fails now (a missing bridge, no permission) is an error;
        later failures are counted and the last good ports kept.
        """
        if self._refresh is not None:
            self._refresh()
        previous = self.forwarder.boot_id if self.forwarder.boot_id else None
        self.forwarder.start(boot_id=boot_id_at(self.wall(), after=previous))
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
                self.forwarder.stop()

    def step(self, now: float, poll_s: float = 0.02) -> int:
        """One round: capture, mirror, forward; returns the frames exported."""
        self.steps += 1
        if now >= self._next_refresh:
            self._update_ports(now)
        self._last_now = now
        exported = 0
        batch = self.source.poll(poll_s)
        if batch is not None and len(batch.frames):
            exported = self._export(batch, now)
        if self.forwarder.flush_due(now):
            self.forwarder.flush()
        control = self.control
        if control is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval_s
            self._call("heartbeat", lambda: control.heartbeat(self.heartbeat()))
        return exported

    def _export(self, batch: PortBatch, now: float) -> int:
        """Mirror a captured batch and queue its tagged frames; learn VM MACs on the way."""
        learn = getattr(self.directory, "learn_macs", None)
        if callable(learn) and learn(batch):  # ports whose VM MAC the source did not know
            self._apply_ports(self.directory.ports())
        result = self.mirror.process(batch)
        self.forwarder.push(result.frames, now)
        return len(result.frames)

    # --- ports and sessions -------------------------------------------------------------

    def _update_ports(self, now: float) -> None:
        self._next_refresh = now + self.settings.refresh_interval_s
        if self._refresh is not None:
            try:
                self._refresh()
            except VspanError as exc:
                self._count("refresh")
                if self.errors["refresh"] in (1, 10) or self.errors["refresh"] % 100 == 0:
                    log.warning("port discovery failed (%d times): %s", self.errors["refresh"], exc)
                return
        ports = self.directory.ports()
        changed = ports != self.ports or not self.steps
        if changed:
            self._apply_ports(ports)
        if self.control is None:
            return
        # The control plane is the one source of sessions: register when the ports change
        # (the reply carries the sessions), else ask for them, so that sessions created or
        # deleted on the analyzer reach this host within a refresh interval.
        control = self.control
        if changed:
            reply = self._call("register", lambda: control.register(self.settings.host, ports))
            doc = reply.get("sessions") if isinstance(reply, dict) else None
        else:
            doc = self._call("sessions", control.sessions)
        if isinstance(doc, list) and doc != self._session_doc:
            parsed = self._call("sessions", lambda: SessionSet.from_json_value(doc))
            if isinstance(parsed, SessionSet):
                self._session_doc = doc
                self.sessions = parsed
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
        selection = (
            self.sessions.select(self.ports)
            if self.sessions and self.sessions.sessions
            else Selection.everything()
        )
        snaplen, sample = self.settings.snaplen, self.settings.sample
        if snaplen or sample > 1:
            cut = selection.snaplen
            cut = np.where(cut == 0, snaplen, np.minimum(cut, snaplen) if snaplen else cut)
            selection = dataclasses.replace(
                selection,
                snaplen=cut.astype(np.int32),
                sample=np.maximum(selection.sample, sample).astype(np.int32),
            )
        self.mirror.set_selection(selection)

    # --- counters -----------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Everything counted so far (the heartbeat's body and the stats line's source)."""
        cap = self.source.counters
        sent = self.forwarder.sender.counters
        mirror = self.mirror.counters
        return {
            "frames": cap.frames,
            "bytes": cap.bytes,
            "truncated": cap.truncated + mirror.truncated + sent.dropped.get("truncated", 0),
            "kernel_drops": cap.kernel_drops,
            "sampled_out": cap.sampled_out + mirror.dropped.get("sampled_out", 0),
            "dropped": {  # frames not sent, by reason (truncated frames were sent)
                **{k: v for k, v in mirror.dropped.items() if k != "sampled_out"},
                **{k: v for k, v in sent.dropped.items() if k != "truncated"},
            },
            "per_port": dict(cap.per_port),
            "exported": mirror.exported,
            "messages_sent": sent.messages_sent,
            "frames_sent": sent.frames_sent,
            "bytes_sent": sent.bytes_sent,
            "ports": len(self.ports),
            "errors": dict(self.errors),
        }

    def heartbeat(self) -> dict[str, Any]:
        """The heartbeat body of the control plane (``time`` from the wall clock given)."""
        totals = self.counters()
        body = heartbeat_payload(self.source.counters, self.wall(), totals["dropped"])
        body["truncated"] = totals["truncated"]
        body["sampled_out"] = totals["sampled_out"]
        return body

    def stats_line(self) -> str:
        """One line for the terminal."""
        c = self.counters()
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(c["dropped"].items()) if v) or "none"
        return (
            f"{self.settings.host}: {c['ports']} ports, captured {c['frames']:,} frames, "
            f"exported {c['exported']:,}, sent {c['frames_sent']:,} in "
            f"{c['messages_sent']:,} messages, truncated {c['truncated']:,}, "
            f"kernel drops {c['kernel_drops']:,}, dropped: {dropped}"
        )

    def _call(self, kind: str, fn: Any) -> object:
        try:
            return fn()
        except VspanError as exc:
            self._count(kind)
            log.warning("control plane %s failed: %s", kind, exc)
            return None

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
