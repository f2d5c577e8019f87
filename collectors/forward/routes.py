"""Where tagged frames go: the collector's analyzer, and each SPAN session destination.

``Routes`` holds one ``Forwarder`` per route: route None is the collector's own analyzer
(its sender given, started with the collector, never removed); every distinct session
``destination`` gets a forwarder of its own when a session names it and loses it when none
does any more. Each forwarder is a tunnel stream of its own (``spec/tunnel.md``): the
collector's ``collector_id`` and AUTH key, its own ``boot_id`` (``boot_id_at`` its start)
and ``seq`` from 0, so an analyzer sees only its own messages, without gaps; and its own
sender and counters.

A destination whose sender cannot start (a name that does not resolve) is retried at every
``retry``; the frames meant for it meanwhile are counted as ``unsent``, by destination.
The counters of a destination's forwarders that were stopped are kept (``retired``), so
what is reported per destination never goes backwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vspan.batch import FrameBatch
from vspan.collectors.forward.forwarder import (
    DROP_REASONS,
    LOSS_REASONS,
    Forwarder,
    ForwarderConfig,
    SendCounters,
    Sender,
    TcpSender,
    UdpSender,
    boot_id_at,
)
from vspan.sessions import Destination

__all__ = ["DestinationCounters", "Routes", "SenderFactory", "make_sender", "sender_state"]

log = logging.getLogger(__name__)

SenderFactory = Callable[[Destination, "int | None"], Sender]
"""A sender for a destination, given the configured largest message (None: its default)."""


def make_sender(destination: Destination, max_message: int | None) -> Sender:
    """A ``UdpSender`` (1,400-byte messages by default) or a ``TcpSender`` (8,900)."""
    addr = (destination.host, destination.port)
    if destination.transport == "tcp":
        return TcpSender(addr, max_message=max_message or 8900)
    return UdpSender(addr, max_message=max_message or 1400)


def sender_state(counters: SendCounters) -> str:
    """A sender's connection for people: empty for UDP; ``connected``; ``connecting, 57
    failed attempts, last: connection refused``."""
    if not counters.state:
        return ""
    parts = [counters.state]
    if counters.state == "connecting" and counters.failed_attempts:
        parts.append(f"{counters.failed_attempts:,} failed attempts")
    if counters.state != "connected" and counters.last_error:
        parts.append(f"last: {counters.last_error}")
    return ", ".join(parts)


@dataclass
class DestinationCounters:
    """What was sent to one destination, over all its forwarders (monotonic)."""

    sent: SendCounters = field(default_factory=SendCounters)
    """The senders' counters, added up."""
    unsent: int = 0
    """Frames for the destination while its sender could not start."""

    def add(self, other: SendCounters) -> None:
        """Add a sender's counters."""
        s = self.sent
        s.messages_sent += other.messages_sent
        s.frames_sent += other.frames_sent
        s.bytes_sent += other.bytes_sent
        s.frames_dropped += other.frames_dropped
        s.waiting += other.waiting
        s.connects += other.connects
        s.errors += other.errors
        for reason in DROP_REASONS:
            s.dropped[reason] += other.dropped.get(reason, 0)
        for reason in LOSS_REASONS:
            s.frames_lost[reason] += other.frames_lost.get(reason, 0)
        s.state, s.failed_attempts = other.state, other.failed_attempts
        s.last_error = other.last_error

    def lost(self) -> dict[str, int]:
        """Frames lost on the way to the destination, by reason (``unsent``: its sender could
        not start)."""
        return {**self.sent.frames_lost, "unsent": self.unsent}


class Routes:
    """The forwarders of the collector's routes; ``push`` takes each route's frames."""

    def __init__(
        self,
        config: ForwarderConfig,
        default: Sender,
        *,
        senders: SenderFactory = make_sender,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.senders = senders
        self.wall = wall
        """The wall clock, for the ``boot_id`` of each stream's start (``boot_id_at``)."""
        self._last_boot: int | None = None
        """The newest ``boot_id`` a stream of this collector took: every start takes a later
        one, so no two streams (and no restart of one) share a boot."""
        self.default = Forwarder(config, default)
        """Route None: the collector's own analyzer."""
        self.forwarders: dict[Destination, Forwarder] = {}
        """The session destinations whose forwarder runs."""
        self.wanted: list[Destination] = []
        """The destinations the sessions name now, started or not."""
        self.retired: dict[Destination, DestinationCounters] = {}
        """Counters of stopped forwarders, and frames never sent, by destination."""
        self.start_errors = 0
        """Destination senders that failed to start."""

    def start(self) -> None:
        """Start the default forwarder."""
        self.default.start(boot_id=self._next_boot())

    def stop(self) -> None:
        """Flush and stop every forwarder."""
        try:
            for destination in list(self.forwarders):
                self._retire(destination)
        finally:
            self.default.stop()

    def sync(self, destinations: Iterable[Destination]) -> None:
        """Run a forwarder for each of ``destinations`` and for no other."""
        self.wanted = list(dict.fromkeys(destinations))
        for destination in [d for d in self.forwarders if d not in self.wanted]:
            self._retire(destination)
        self.retry()

    def retry(self) -> None:
        """Start the forwarders of wanted destinations that are not running."""
        for destination in self.wanted:
            if destination not in self.forwarders:
                self._open(destination)

    def push(self, route: Destination | None, frames: FrameBatch, now: float) -> None:
        """Queue ``frames`` on ``route``'s forwarder (counted as unsent if it has none)."""
        if route is None:
            self.default.push(frames, now)
        elif route in self.forwarders:
            self.forwarders[route].push(frames, now)
        elif len(frames):
            self.retired.setdefault(route, DestinationCounters()).unsent += len(frames)

    def flush_due(self, now: float) -> None:
        """Flush every forwarder whose oldest frame waited long enough."""
        for forwarder in self.all():
            if forwarder.flush_due(now):
                forwarder.flush()

    def all(self) -> list[Forwarder]:
        """The default forwarder, then the destinations'."""
        return [self.default, *self.forwarders.values()]

    @property
    def pending_frames(self) -> int:
        """Frames waiting for a message, over every forwarder."""
        return sum(f.pending_frames for f in self.all())

    def counters(self) -> dict[Destination, DestinationCounters]:
        """Per destination ever named: what its forwarders sent and lost, added up."""
        out = {}
        for destination in dict.fromkeys([*self.retired, *self.forwarders]):
            total = DestinationCounters()
            if (old := self.retired.get(destination)) is not None:
                total.add(old.sent)
                total.unsent = old.unsent
            if (forwarder := self.forwarders.get(destination)) is not None:
                total.add(forwarder.sender.counters)
            out[destination] = total
        return out

    def summary(self, exported: Mapping[Destination | None, int]) -> dict[str, dict[str, Any]]:
        """``counters`` as plain data keyed by destination URL, with the frames ``exported``
        to each (the mirror's count by route): what was sent, what is ``waiting`` (in the
        forwarder and the sender), what was ``lost`` (frames, by reason) in how many
        ``lost_messages``, the sender's state."""
        out = {}
        for destination, c in self.counters().items():
            s = c.sent
            forwarder = self.forwarders.get(destination)
            pending = 0 if forwarder is None else forwarder.pending_frames
            out[destination.url] = {
                "exported": exported.get(destination, 0),
                "messages_sent": s.messages_sent,
                "frames_sent": s.frames_sent,
                "bytes_sent": s.bytes_sent,
                "truncated": s.dropped["truncated"],
                "waiting": pending + s.waiting,
                "lost": c.lost(),
                "lost_messages": {k: s.dropped[k] for k in LOSS_REASONS},
                "sender": sender_state(s) if forwarder is not None else "",
                "running": forwarder is not None,
            }
        return out

    def _next_boot(self) -> int:
        self._last_boot = boot_id_at(self.wall(), after=self._last_boot)
        return self._last_boot

    def _open(self, destination: Destination) -> None:
        forwarder = Forwarder(self.config, self.senders(destination, self.config.max_message))
        try:
            forwarder.start(boot_id=self._next_boot())
        except OSError as exc:
            self.start_errors += 1
            if self.start_errors in (1, 10) or self.start_errors % 100 == 0:
                log.warning("cannot send to %s (%d failures): %s", destination.url,
                            self.start_errors, exc)  # fmt: skip
            forwarder.sender.stop()
            return
        self.forwarders[destination] = forwarder

    def _retire(self, destination: Destination) -> None:
        forwarder = self.forwarders.pop(destination)
        try:
            forwarder.stop()
        finally:
            self.retired.setdefault(destination, DestinationCounters()).add(
                forwarder.sender.counters
            )
