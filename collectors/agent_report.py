"""What a collector says about itself: its counters, its heartbeat, its lines on the terminal.

Every frame captured is counted once, by what became of it::

    captured = exported + not mirrored (on purpose) + runts

*Not mirrored* is what the collector leaves out by design, not a loss: ``duplicates`` (the
copy of a frame between two VMs of this host delivered to the receiving VM — it was exported
once, at the sender), ``unselected`` (no SPAN session selects it), ``filtered`` (a session's
filter refused it), ``sampled_out`` (1:N sampling; with AF_PACKET some are left out before
they count as captured). *Lost* is what should have reached an analyzer and did not:
``kernel`` (the capture ring overflowed: the kernel's count, frames never captured), ``runts``
(shorter than an Ethernet header), and each sender's ``queue_full``, ``send_error``,
``stopped`` (whole messages: the lines also say how many) and ``unsent`` (a session
destination whose sender could not start). Of what was exported to an analyzer::

    exported there = sent + waiting + lost on the way

*Waiting* frames are in the forwarder (at most 20 ms) or a TCP sender's queue (while it cannot
connect): not lost yet, not sent either. A TCP sender's state (``connecting, 57 failed
attempts, last: connection refused``) ends the stats line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from vspan.collectors.forward.forwarder import LOSS_REASONS
from vspan.collectors.forward.routes import sender_state

if TYPE_CHECKING:
    from vspan.collectors.agent import Collector

__all__ = ["NOT_MIRRORED", "counters", "destination_lines", "heartbeat", "stats_line"]

NOT_MIRRORED: Final = ("duplicates", "unselected", "filtered", "sampled_out")
"""Why a captured frame was not mirrored on purpose (``mirror.DROP_REASONS`` but runts)."""


def counters(c: Collector) -> dict[str, Any]:
    """Everything counted so far (the heartbeat's source and the stats line's).

    ``sent``, ``lost`` (of the sender), ``waiting`` and ``sender`` are the collector's own
    analyzer's; ``destinations`` has the same for each session destination; ``macs`` what
    discovery learned of VM MACs from the traffic (``discovery_macs``; empty without it).
    """
    cap = c.source.counters
    sent = c.forwarder.sender.counters
    mirror = c.mirror.counters
    not_mirrored = {reason: mirror.dropped.get(reason, 0) for reason in NOT_MIRRORED}
    not_mirrored["sampled_out"] += cap.sampled_out
    lost = {"kernel": cap.kernel_drops, "runts": mirror.dropped.get("runts", 0)}
    lost |= {reason: sent.frames_lost.get(reason, 0) for reason in LOSS_REASONS}
    errors = dict(c.errors)
    if c.sync is not None:
        for kind, n in c.sync.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    return {
        "frames": cap.frames,
        "bytes": cap.bytes,
        "truncated": cap.truncated + mirror.truncated + sent.dropped.get("truncated", 0),
        "exported": mirror.exported,
        "not_mirrored": not_mirrored,
        "lost": lost,
        "lost_messages": {reason: sent.dropped.get(reason, 0) for reason in LOSS_REASONS},
        "waiting": c.forwarder.pending_frames + sent.waiting,
        "sender": sender_state(sent),
        "messages_sent": sent.messages_sent,
        "frames_sent": sent.frames_sent,
        "bytes_sent": sent.bytes_sent,
        "per_port": dict(cap.per_port),
        "ports": len(c.ports),
        "errors": errors,
        "registered": None if c.sync is None else c.sync.registered,
        "sessions": len(c.sessions.sessions),
        "sessions_total": c.sessions_total,
        "destinations": c.routes.summary(mirror.routes),
        "macs": dict(learner.counters) if (learner := getattr(c.directory, "macs", None)) else {},
    }


def heartbeat(c: Collector) -> dict[str, Any]:
    """The heartbeat body of the control plane (``api.models_control.HeartbeatIn``), at
    ``c.wall()``: the capture counters, what was exported, what waits, and the frames lost
    (``drops``, every route's losses added up) apart from those not mirrored on purpose."""
    totals = counters(c)
    drops = dict(totals["lost"])
    waiting = totals["waiting"]
    for route in totals["destinations"].values():
        waiting += route["waiting"]
        for reason, n in route["lost"].items():
            drops[reason] = drops.get(reason, 0) + n
    return {
        "time": c.wall(),
        "frames": totals["frames"],
        "bytes": totals["bytes"],
        "truncated": totals["truncated"],
        "exported": totals["exported"],
        "waiting": waiting,
        "drops": drops,
        "not_mirrored": totals["not_mirrored"],
        "per_port": totals["per_port"],
    }


def _lost(lost: dict[str, int], messages: dict[str, int]) -> str:
    parts = []
    for reason, n in sorted(lost.items()):
        if n:
            m = messages.get(reason)
            parts.append(f"{reason} {n:,}" + (f" ({m:,} messages)" if m else ""))
    return ", ".join(parts) or "none"


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()) if v) or "none"


def stats_line(c: Collector) -> str:
    """One line for the terminal: what was captured and what became of it."""
    t = counters(c)
    line = (
        f"{c.settings.host}: {t['ports']} ports, captured {t['frames']:,} frames, "
        f"exported {t['exported']:,}, sent {t['frames_sent']:,} in {t['messages_sent']:,} "
        f"messages, waiting {t['waiting']:,}, truncated {t['truncated']:,}, lost: "
        f"{_lost(t['lost'], t['lost_messages'])}, not mirrored: {_reasons(t['not_mirrored'])}"
    )
    return line + (f"; tcp {t['sender']}" if t["sender"] else "")


def destination_lines(c: Collector) -> list[str]:
    """One line per session destination: what went there."""
    lines = []
    for url, d in counters(c)["destinations"].items():
        line = (
            f"{c.settings.host} -> {url}: exported {d['exported']:,}, sent "
            f"{d['frames_sent']:,} in {d['messages_sent']:,} messages, waiting "
            f"{d['waiting']:,}, truncated {d['truncated']:,}, lost: "
            f"{_lost(d['lost'], d['lost_messages'])}"
        )
        lines.append(line + (f"; tcp {d['sender']}" if d["sender"] else ""))
    return lines
