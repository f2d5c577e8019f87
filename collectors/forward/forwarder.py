"""Forwarding: tagged frames → tunnel messages → the analyzer, over UDP or TCP.

``Forwarder`` holds the tunnel identity (``collector_id``, the ``boot_id`` of this start,
``seq``) and the frames waiting for a message: whole messages leave as soon as
they are full, the rest when ``flush_due(now)`` says the oldest waited ``flush_interval_s``
(20 ms). ``now`` is always an argument: the outer loop passes ``time.monotonic()``.

Senders (``collectors.senders``, ``collectors.tcp_sender``, re-exported here) never block the
capture loop: ``UdpSender`` sends one datagram per message (a refusal is lost as
``send_error``); ``TcpSender`` queues within a bound and sends from a thread that
(re)connects with backoff, logging at a limited rate why it cannot. Both count what they sent,
lost (by reason, in messages and frames) and still hold (``SendCounters``).

``boot_id``: a collector takes the time of its start in quarter seconds since the Unix epoch
(``boot_id_at``), so that its boots increase (modulo 2^32 in serial-number order, like seqs:
any two starts less than 17 years apart compare right): the analyzer refuses, from a
collector with a key, a boot older than its current one as a replay of captured traffic
(``docs/tunnel.md``). Starting a collector process takes longer than a quarter second, so two
starts do not share a value; a clock set back by more than the time between two starts makes
the analyzer refuse the new boot until the clock has caught up (counted as ``stale_boot``).

Memory is bounded when the analyzer is down: the forwarder keeps less than one message of
frames, the TCP queue ``max_queue_bytes``, UDP nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

import numpy as np

from vspan.batch import FrameBatch
from vspan.collectors.forward.senders import (
    DROP_REASONS,
    LOSS_REASONS,
    SendCounters,
    Sender,
    UdpSender,
    frames_in,
)
from vspan.collectors.forward.tcp_sender import TcpSender
from vspan.wire.tunnel import RECORD_LEN
from vspan.wire.tunnel_batch import concat_batches, encode_batch, plan_messages, slice_batch

__all__ = [
    "BOOT_TICKS_PER_S",
    "DROP_REASONS",
    "LOSS_REASONS",
    "Forwarder",
    "ForwarderConfig",
    "SendCounters",
    "Sender",
    "TcpSender",
    "UdpSender",
    "boot_id_at",
    "frames_in",
]


# --- the forwarder --------------------------------------------------------------------


BOOT_TICKS_PER_S: Final = 4
"""``boot_id`` counts quarter seconds since the Unix epoch (modulo 2^32)."""


def boot_id_at(wall_s: float, *, after: int | None = None) -> int:
    """The ``boot_id`` of a start at Unix time ``wall_s``: its quarter seconds modulo 2^32 —
    or, when ``after`` (this process's previous boot) is not older, the one after ``after``."""
    boot = int(wall_s * BOOT_TICKS_PER_S) % (1 << 32)
    if after is not None and not 0 < (boot - after) % (1 << 32) < 1 << 31:
        boot = (after + 1) % (1 << 32)
    return boot


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    """Settings of a ``Forwarder``."""

    collector_id: int
    """This collector's id in the tunnel (1..2^32-1)."""
    max_message: int | None = None
    """Largest message in bytes; None takes the sender's (``UdpSender``: 1,400, which fits
    a 1,500-byte path; 8,900 suits a jumbo-frame underlay)."""
    key: bytes | None = None
    """AUTH key (keyed BLAKE2b); None sends without AUTH."""
    flush_interval_s: float = 0.020
    """Longest a frame waits for its message to fill."""


class Forwarder:
    """Packs tagged frames into messages and hands them to a ``Sender``."""

    def __init__(
        self, config: ForwarderConfig, sender: Sender, *, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.sender = sender
        self._rng = rng
        self.boot_id = 0
        """Set at ``start``; a new value tells the analyzer the sequence restarted."""
        self.next_seq = 0
        """``seq`` of the next message."""
        self.max_message = config.max_message or sender.max_message
        """Largest message sent."""
        self._pending: FrameBatch | None = None
        self._since = 0.0

    @property
    def pending_frames(self) -> int:
        """Frames waiting for a message."""
        return 0 if self._pending is None else len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Record and frame bytes waiting (less than one message's room after ``push``)."""
        if self._pending is None:
            return 0
        return int(self._pending.caplen.sum(dtype=np.int64)) + RECORD_LEN * len(self._pending)

    def start(self, *, boot_id: int | None = None) -> None:
        """Take ``boot_id`` (a collector passes ``boot_id_at`` of the wall clock; None draws
        a random one from ``rng``), restart ``seq`` at 0, start the sender."""
        if boot_id is None:
            rng = self._rng if self._rng is not None else random.Random()
            boot_id = rng.getrandbits(32)
        if not 0 <= boot_id < 1 << 32:
            raise ValueError(f"boot_id {boot_id} out of range 0..{(1 << 32) - 1}")
        self.boot_id, self.next_seq = boot_id, 0
        self.sender.start()

    def stop(self) -> None:
        """Send what is pending, stop the sender."""
        self.flush()
        self.sender.stop()

    def push(self, frames: FrameBatch, now: float) -> None:
        """Add tagged frames; send every message they complete, keep the rest pending."""
        if len(frames) == 0:
            return
        if self._pending is None:
            self._pending, self._since = frames, now
        else:
            self._pending = concat_batches(self._pending, frames)
        auth = self.config.key is not None
        plan = plan_messages(self._pending.caplen, max_message=self.max_message, auth=auth)
        if plan.messages > 1:  # all but the last are full
            cut = int(plan.bounds[-2])
            self._send(slice_batch(self._pending, 0, cut))
            self._pending = slice_batch(self._pending, cut, len(self._pending))

    def flush_due(self, now: float) -> bool:
        """Whether pending frames have waited ``flush_interval_s`` or more at ``now``."""
        return self._pending is not None and now >= self._since + self.config.flush_interval_s

    def flush(self) -> None:
        """Send every pending frame now."""
        if self._pending is not None:
            self._send(self._pending)
            self._pending = None

    def _send(self, frames: FrameBatch) -> None:
        cfg = self.config
        plan = plan_messages(frames.caplen, max_message=self.max_message, auth=cfg.key is not None)
        messages, self.next_seq = encode_batch(
            frames,
            collector_id=cfg.collector_id,
            boot_id=self.boot_id,
            first_seq=self.next_seq,
            max_message=self.max_message,
            key=cfg.key,
        )
        self.sender.counters.dropped["truncated"] += plan.truncated
        for message in messages:
            self.sender.send(message)
