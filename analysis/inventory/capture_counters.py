"""The collectors' own capture counters, from their heartbeats, beside the tunnel counters.

A collector reports in each heartbeat (control plane) its counters since it started: frames
and bytes captured, frames truncated (sent cut to the snap length), frames exported, frames
waiting to be sent, and — apart, because only the first are losses — ``drops``, frames it
lost by cause (``kernel``: the capture ring overflowed, the kernel's count; ``runts``; its
senders' ``queue_full``, ``send_error``, ``stopped``, ``unsent``), and ``not_mirrored``,
frames it left out on purpose by reason (``duplicates``: the copy of an intra-host frame
delivered to the receiving VM, exported once at its sender; ``unselected`` and ``filtered``
by SPAN sessions; ``sampled_out``). ``capture_of`` turns the latest heartbeat into the
``capture`` object of ``GET /api/v1/collectors`` (times ISO 8601 like every time of the API);
``with_capture`` adds it to the rows of ``queries.collectors``, with a row of its own for a
collector that reports but whose tunnel counters have not been sampled.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from vspan.analysis.inventory.snapshot import Heartbeat

__all__ = ["capture_drops", "capture_of", "iso_time", "not_mirrored", "with_capture"]


def iso_time(seconds: float) -> str:
    """Seconds since the epoch as the API writes times: ``2024-05-01T12:00:00.123456Z``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def capture_drops(beat: Heartbeat) -> dict[str, int]:
    """Frames the collector lost, by cause (``kernel`` always present)."""
    return {"kernel": 0, **{str(k): int(v) for k, v in beat.drops.items()}}


def not_mirrored(beat: Heartbeat) -> dict[str, int]:
    """Frames the collector left out on purpose, by reason."""
    return {str(k): int(v) for k, v in beat.not_mirrored.items()}


def capture_of(beat: Heartbeat) -> dict[str, Any]:
    """The ``capture`` object of one collector's latest heartbeat."""
    return {
        "time": iso_time(beat.time),
        "received": iso_time(beat.received),
        "frames": int(beat.frames),
        "bytes": int(beat.bytes),
        "truncated": int(beat.truncated),
        "exported": None if beat.exported is None else int(beat.exported),
        "waiting": int(beat.waiting),
        "drops": capture_drops(beat),
        "not_mirrored": not_mirrored(beat),
    }


def with_capture(rows: pd.DataFrame, beats: Mapping[int, Heartbeat]) -> pd.DataFrame:
    """``rows`` (``queries.collectors``) with a ``capture`` column (None for a collector
    without a heartbeat), plus a row of zero tunnel counters, at its heartbeat's time, for
    each collector that reported but is not in ``rows``."""
    known = {int(c) for c in rows["collector_id"]} if len(rows) else set()
    extra = sorted(set(beats) - known)
    if extra:
        added = pd.DataFrame({"collector_id": pd.array(extra, dtype="int64")})
        added["time"] = pd.to_datetime([beats[c].received for c in extra], unit="s", utc=True)
        for column in ("restarts", "received", "lost", "kernel", "missed_while_down",
                       "duplicates", "reordered", "frames", "bytes", "invalid"):  # fmt: skip
            added[column] = 0
        added["loss"] = 0.0
        for column in ("messages_per_s", "frames_per_s", "bytes_per_s"):
            added[column] = None
        added["drops"] = pd.Series([{} for _ in extra], dtype=object)
        frames = [rows, added[list(rows.columns)]] if len(rows) else [added[list(rows.columns)]]
        rows = pd.concat(frames, ignore_index=True).sort_values("collector_id", ignore_index=True)
    captures = [
        capture_of(beats[int(c)]) if int(c) in beats else None for c in rows["collector_id"]
    ]
    return rows.assign(capture=pd.Series(captures, index=rows.index, dtype=object))
