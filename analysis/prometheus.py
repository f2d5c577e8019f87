"""The analyzer's counters in the Prometheus text exposition format (version 0.0.4).

``exposition`` takes what ``Analyzer.counters()`` returns, the invalid messages by reason
(``Accounting.invalid()``) and the store's size, and writes one ``# HELP``/``# TYPE`` pair
per metric family, then its samples. The families are a table: adding one is one line.
A counter key of the form ``name{reason}`` (the store writer's and the ring's) becomes a
sample of ``name`` with a ``reason`` label.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import pandas as pd

__all__ = ["CONTENT_TYPE", "exposition"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_LABELLED: Final = re.compile(r"(\w+)\{(.*)\}")

_COLLECTOR: Final = (  # column of Accounting.collectors(), metric, help
    ("frames", "vspan_collector_frames_total", "Frames received from the collector."),
    ("bytes", "vspan_collector_bytes_total", "Bytes of frames received from the collector."),
    ("received", "vspan_collector_messages_total", "Valid tunnel messages received."),
    ("lost", "vspan_collector_lost_messages_total", "Tunnel messages lost (sequence gaps)."),
    ("duplicates", "vspan_collector_duplicate_messages_total", "Duplicate tunnel messages."),
    ("reordered", "vspan_collector_reordered_messages_total", "Tunnel messages out of order."),
    ("restarts", "vspan_collector_restarts_total", "New boot ids of the collector."),
)
_ENGINE: Final = (  # key of Engine.counters(), metric, type, help
    ("frames", "vspan_frames_total", "counter", "Frames decoded by the flow engine."),
    ("bytes", "vspan_bytes_total", "counter", "Bytes of frames seen by the flow engine."),
    ("messages", "vspan_messages_total", "counter", "Tunnel messages processed."),
    ("flows_finished", "vspan_flows_total", "counter", "Flows finished (idle, active, end)."),
    ("open_flows", "vspan_open_flows", "gauge", "Flows in the flow table now."),
    ("evicted", "vspan_flows_evicted_total", "counter", "Flows evicted from a full table."),
    ("dropped_flows", "vspan_flows_dropped_total", "counter", "Flows dropped."),
)
_PARTS: Final = (  # key of counters(), prefix, {counter: (type, help)}
    ("store_writer", "vspan_store_", {
        "rows_written": ("counter", "Flow rows written to the store."),
        "appends": ("counter", "Appends to the store."),
        "queue_depth": ("gauge", "Flow batches waiting for the store writer."),
        "dropped": ("counter", "Flow rows dropped before the store, by reason."),
        "rejected": ("counter", "Flow rows the store could not keep, by reason."),
        "coerced": ("counter", "Flow values stored as NULL (did not fit), by column."),
        "errors": ("counter", "Store append failures, by reason."),
    }),
    ("ring", "vspan_ring_", {
        "frames_written": ("counter", "Frames written to the packet ring."),
        "segments_created": ("counter", "Ring segments created."),
        "segments_deleted": ("counter", "Ring segments deleted, by reason."),
        "frames_dropped": ("counter", "Frames not written to the ring, by reason."),
        "ring_errors": ("counter", "Ring write errors, by reason."),
        "store_errors": ("counter", "Ring index writes to the store that failed."),
        "segments": ("gauge", "Ring segments on disk."),
        "bytes": ("gauge", "Bytes of ring segments on disk."),
    }),
)  # fmt: skip


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number):
        return "NaN"
    return str(int(number)) if number.is_integer() else repr(number)


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, object], object]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return lines


def exposition(
    counters: Mapping[str, Any], *, invalid: pd.DataFrame | None = None,
    store_bytes: int | None = None,
) -> str:  # fmt: skip
    """The text exposition of ``counters`` (``Analyzer.counters()``)."""
    lines: list[str] = []
    collectors = pd.DataFrame(counters.get("collectors") or [])
    for column, name, help_text in _COLLECTOR:
        rows = collectors if column in collectors.columns else pd.DataFrame()
        samples = [
            ({"collector_id": int(c)}, v)
            for c, v in zip(rows.get("collector_id", []), rows.get(column, []), strict=True)
        ]
        lines += _family(name, "counter", help_text, samples)
    inv = invalid if invalid is not None else pd.DataFrame(columns=["collector_id", "reason"])
    if "messages" not in inv.columns:
        inv = inv.assign(messages=0)
    per = inv.groupby(["collector_id", "reason"], as_index=False)["messages"].sum()
    lines += _family(
        "vspan_collector_invalid_messages_total", "counter",
        "Tunnel messages rejected, by reason (collector_id 0: header unreadable).",
        [({"collector_id": int(c), "reason": r}, n)
         for c, r, n in zip(per["collector_id"], per["reason"], per["messages"], strict=True)],
    )  # fmt: skip
    engine = counters.get("engine") or {}
    for key, name, kind, help_text in _ENGINE:
        lines += _family(name, kind, help_text, [({}, engine.get(key, 0))])
    for part, prefix, spec in _PARTS:
        values: Mapping[str, object] = counters.get(part) or {}
        grouped: dict[str, list[tuple[dict[str, object], object]]] = {k: [] for k in spec}
        for key, value in sorted(values.items()):
            match = _LABELLED.fullmatch(key)
            base, labels = (match.group(1), {"reason": match.group(2)}) if match else (key, {})
            if base in grouped:
                grouped[base].append((labels, value))
        for key, (kind, help_text) in spec.items():
            found = grouped[key]
            if not found and key not in _BY_REASON:
                found = [({}, 0)]
            lines += _family(prefix + key, kind, help_text, found)
    if store_bytes is not None:
        lines += _family("vspan_store_file_bytes", "gauge", "Size of the store's files.",
                         [({}, store_bytes)])  # fmt: skip
    deleted = (counters.get("store") or {}).get("deleted") or {}
    lines += _family("vspan_store_rows_deleted_total", "counter",
                     "Stored rows deleted, by table and reason (age: retention; size: bound).",
                     [({"table": t, "reason": r}, n) for t, by in sorted(deleted.items())
                      for r, n in sorted(by.items())])  # fmt: skip
    errors = counters.get("errors") or {}
    lines += _family("vspan_analyzer_errors_total", "counter", "Analyzer failures, by kind.",
                     [({"kind": k}, v) for k, v in sorted(errors.items())])  # fmt: skip
    return "\n".join(lines) + "\n"


_BY_REASON: Final = frozenset(
    {"dropped", "rejected", "coerced", "errors", "segments_deleted", "frames_dropped",
     "ring_errors"}
)  # fmt: skip
