"""The analyzer's counters for Prometheus: one ``prometheus_client`` collector read at scrape.

``AnalyzerCollector(source).collect()`` reads ``source.counters()`` (``Analyzer.counters()``),
the invalid messages by reason, the store's size and the collectors' latest heartbeats, and
yields metric families: counters (``…_total`` in the exposition), gauges for levels. The
parts are tables (key → metric, type, help); a key a table does not know is still exposed,
as ``untyped``, so nothing counted is hidden. A part's key ``name{reason}`` (the store
writer's, the ring's) becomes a sample of ``name`` with a ``reason`` label.

Per-collector series exist only for *accepted* collectors: hosts of the inventory (static
or registered) and collectors that sent a valid tunnel message. Messages rejected from any
other collector_id (an invalid datagram can claim any) are counted under
``collector_id="0"`` with the unreadable ones, so hostile datagrams cannot grow the output.

Receivers are exposed generically, labelled ``receiver`` (``udp``, ``tcp``): their drops, by
``cause`` (``dropped_X``, ``X_drops``, a ``dropped``/``drops`` map, or a key ``backpressure``
or ``kernel``), in ``vspan_receiver_drops_total``; their other counters by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Protocol

import pandas as pd
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from vspan.analysis.inventory.capture_counters import capture_drops, not_mirrored
from vspan.analysis.inventory.state import InventoryState
from vspan.analysis.store.store import Store

__all__ = ["AnalyzerCollector", "MetricsSource"]

_LABELLED: Final = re.compile(r"(\w+)\{(.*)\}")
_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9_]")
UNACCEPTED: Final = "0"
"""The ``collector_id`` label of messages not attributable to an accepted collector."""

_COLLECTOR: Final = (  # column of Accounting.collectors(), metric (counter), help
    ("frames", "vspan_collector_frames", "Frames received from the collector."),
    ("bytes", "vspan_collector_bytes", "Bytes of valid tunnel messages from the collector."),
    ("received", "vspan_collector_messages", "Valid tunnel messages received."),
    (
        "lost",
        "vspan_collector_lost_messages",
        "Tunnel messages the network lost (sequence gaps not charged to the analyzer's socket).",
    ),
    (
        "kernel",
        "vspan_collector_kernel_dropped_messages",
        "Tunnel messages of the collector the analyzer's socket dropped (its buffer was full).",
    ),
    (
        "missed_while_down",
        "vspan_collector_messages_missed_while_down",
        "Tunnel messages the collector sent while the analyzer was stopped (the sequence gap "
        "found at its restart); after a crash also those received since its last counters "
        "save, at most 10 s of them. Not network loss.",
    ),
    ("duplicates", "vspan_collector_duplicate_messages", "Duplicate tunnel messages."),
    ("reordered", "vspan_collector_reordered_messages", "Tunnel messages out of order."),
    ("stale", "vspan_collector_stale_messages", "Tunnel messages too far behind to place."),
    ("restarts", "vspan_collector_restarts", "New boot ids of the collector."),
)
_CAPTURE: Final = (  # Heartbeat field, metric (counter), help
    ("frames", "vspan_collector_captured_frames", "Frames the collector captured (heartbeat)."),
    ("bytes", "vspan_collector_captured_bytes", "Bytes the collector captured (heartbeat)."),
    ("truncated", "vspan_collector_truncated_frames", "Frames sent cut to the snap length."),
)
_Spec = tuple[str, str, str, bool]
"""A part's key: metric name (after the part's prefix), counter or gauge, help, by reason."""
_PARTS: Final[dict[str, tuple[str, dict[str, _Spec]]]] = {
    # key of counters(): (metric prefix, {key: spec}); "undecodable" gathers undecodable_X
    "engine": ("vspan_", {
        "frames": ("frames", "counter", "Frames taken by the flow engine.", False),
        "bytes": ("bytes", "counter", "Bytes of frames taken by the flow engine.", False),
        "messages": ("messages", "counter", "Tunnel messages processed.", False),
        "chunks": ("engine_chunks", "counter", "Receive chunks processed.", False),
        "decoded": ("frames_decoded", "counter", "Frames decoded.", False),
        "flows_finished": ("flows", "counter", "Flows finished (timeouts, end).", False),
        "late_frames": ("frames_late", "counter", "Frames older than an open flow of their key "
                        "that could not join it within the timeouts (a flow of their own).",
                        False),
        "copies_paired": ("copies_paired", "counter", "Cross-host packets whose two copies "
                          "were paired (delay measured).", False),
        "copies_unpaired": ("copies_unpaired", "counter", "Copies whose partner never came "
                            "within the pair window.", False),
        "copies_ambiguous": ("copies_ambiguous", "counter", "Copies not paired because "
                             "another copy had the same identity.", False),
        "pending_overflow": ("copies_pending_overflow", "counter", "Copies not paired "
                             "because the pending map was full.", False),
        "clock_resets": ("clock_resets", "counter", "Times a host's capture time went back by "
                         "more than the idle timeout (a replay, a sender restarted, a clock "
                         "set back): it got a new flow clock.", False),
        "clocks_full_frames": ("clocks_full_frames", "counter", "Frames judged by the shared "
                               "clock because the per-host clock table was full "
                               "(max_host_clocks).", False),
        "host_clocks": ("host_clocks", "gauge", "Per-host flow clocks in use.", False),
        "pending_copies": ("copies_pending", "gauge", "Copies waiting for their partner.",
                           False),
        "idled": ("flows_idled", "counter", "Flows ended by the idle timeout while no frame "
                  "came (the analyzer's clock moved flow time on).", False),
        "evicted": ("flows_evicted", "counter", "Flows evicted from a full table.", False),
        "dropped_flows": ("flows_dropped", "counter", "Flows dropped.", False),
        "errors": ("engine_errors", "counter", "Chunks the engine failed to process.", False),
        "open_flows": ("open_flows", "gauge", "Flows in the flow table now.", False),
        "undecodable": ("frames_undecodable", "counter", "Frames not decoded, by reason.", True),
        "dropped_duplicate": ("messages_dropped_duplicate", "counter", "Tunnel messages not "
                              "ingested: a seq their boot had already sent (replay or "
                              "duplicate).", False),
        "dropped_stale": ("messages_dropped_stale", "counter", "Tunnel messages not ingested: "
                          "too far behind their stream to tell from a replay.", False),
        "dropped_stale_boot": ("messages_dropped_stale_boot", "counter", "Tunnel messages "
                               "not ingested: an older boot of a keyed collector.", False),
        "streams": ("streams", "gauge", "(collector, boot) sequences tracked.", False),
        "streams_evicted": ("streams_evicted", "counter", "Sequence states forgotten (stale "
                            "boots, or over max_streams).", False),
        "collectors_tracked": ("collectors_tracked", "gauge", "Collectors with counters of "
                               "their own.", False),
        "collectors_evicted": ("collectors_evicted", "counter", "Collectors forgotten over "
                               "max_collectors.", False),
        "learned_macs": ("learned_macs", "gauge", "MACs learned behind vifs from the tags.",
                         False),
        "learned_macs_evicted": ("learned_macs_evicted", "counter", "Learned MACs forgotten "
                                 "over max_macs_per_vif or max_learned_macs.", False),
    }),
    "store_writer": ("vspan_store_", {
        "rows_written": ("rows_written", "counter", "Rows written to the store, by lane "
                         "(reason: flows, open_flows, ...); open_flows counts every row of "
                         "every open-flow snapshot, not flows.", True),
        "writes": ("writes", "counter", "Writes to the store, by lane.", True),
        "queue_rows": ("queue_rows", "gauge", "Rows waiting for the store writer.", False),
        "queue_items": ("queue_items", "gauge", "Items waiting for the store writer.", False),
        "dropped": ("dropped_rows", "counter", "Rows not stored because the writer's queue "
                    "was full (backpressure), by lane.", True),
        "errors": ("errors", "counter", "Rows whose write failed, by lane and exception.", True),
        "rejected": ("rejected_rows", "counter", "Rows the store could not keep, by reason.",
                     True),
        "coerced": ("coerced_values", "counter", "Values stored as NULL because they did not "
                    "fit their column, by column.", True),
    }),
    "ring": ("vspan_ring_", {
        "frames_written": ("frames_written", "counter", "Frames written to the ring.", False),
        "segments_created": ("segments_created", "counter", "Ring segments created.", False),
        "segments_deleted": ("segments_deleted", "counter", "Segments deleted, by reason.", True),
        "frames_dropped": ("frames_dropped", "counter", "Frames not in the ring, by reason.", True),
        "ring_errors": ("errors", "counter", "Ring write errors, by reason.", True),
        "store_errors": ("store_errors", "counter", "Ring index writes that failed.", False),
        "segments": ("segments", "gauge", "Ring segments on disk.", False),
        "bytes": ("bytes", "gauge", "Bytes of ring segments on disk.", False),
        "queue_bytes": ("queue_bytes", "gauge", "Frame bytes waiting for the ring's disk.",
                        False),
    }),
    "recorder": ("vspan_", {
        "recovered": ("flows_recovered", "counter", "Flows open when the analyzer stopped "
                      "without finishing them (killed), stored at the next start with their "
                      "counters as of the last snapshot of the open flows.", False),
    }),
    "inventory": ("vspan_inventory_", {}),  # every inventory counter counts events
}  # fmt: skip
_RECEIVER: Final = {  # receiver counter key -> (type, help); other keys are exposed untyped
    "datagrams": ("counter", "Datagrams received."),
    "bytes": ("counter", "Bytes received."),
    "chunks": ("counter", "Chunks handed to the engine."),
    "messages": ("counter", "Messages received on streams."),
    "connections": ("counter", "Connections accepted."),
    "closed_invalid": ("counter", "Connections closed on an invalid message."),
    "errors": ("counter", "Receive errors."),
    "rcvbuf": ("gauge", "Kernel receive buffer granted, bytes."),
    "open_connections": ("gauge", "TCP connections open now."),
    "max_connections": ("gauge", "TCP connections allowed at once."),
    "rejected_connections": ("counter", "TCP connections closed at once: over the limit."),
    "closed_idle": ("counter", "TCP connections closed after the idle timeout."),
    "accept_errors": ("counter", "TCP accepts that failed (descriptors exhausted: backed off)."),
    "backpressure_waits": (
        "counter",
        "Times the receiver stopped reading because every chunk "
        "buffer was in use (datagrams waited in the socket buffer).",
    ),
    "backpressure_ms": ("counter", "Seconds the receiver so waited."),
}
_DROP_MAPS: Final = frozenset({"dropped", "drops"})
_DROP_KEYS: Final = frozenset({"backpressure", "kernel"})


class MetricsSource(Protocol):
    """What the collector reads: ``Analyzer``'s counters, store and inventory state."""

    @property
    def store(self) -> Store: ...

    @property
    def state(self) -> InventoryState: ...

    def counters(self) -> dict[str, Any]: ...


class AnalyzerCollector(Collector):
    """The analyzer's metric families, read from ``source`` at each scrape."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        """Every family, from the counters as they are now."""
        source = self.source
        counters = source.counters()
        engine = getattr(source, "engine", None)
        invalid = engine.accounting.invalid() if engine is not None else None
        collectors = pd.DataFrame(counters.get("collectors") or [])
        accepted = {h.collector_id for h in source.state.snapshot().hosts}
        if "received" in collectors.columns:
            valid = collectors[collectors["received"].fillna(0) > 0]
            accepted |= {int(c) for c in valid["collector_id"]}
        yield from _collectors(collectors, accepted)
        yield _invalid(invalid, accepted)
        yield from _captures(source.state.latest_heartbeats())
        for part, (prefix, table) in _PARTS.items():
            yield from _part(part, prefix, table, counters.get(part) or {})
        yield from _receivers(counters.get("receivers") or [])
        store = GaugeMetricFamily("vspan_store_file_bytes", "Size of the store's files.")
        store.add_metric([], float(source.store.size().file_bytes))
        yield store
        deleted = CounterMetricFamily(
            "vspan_store_rows_deleted",
            "Stored rows deleted, by table and reason (age: retention; size: the size bound).",
            labels=["table", "reason"],
        )
        for table, by in sorted(((counters.get("store") or {}).get("deleted") or {}).items()):
            for reason, n in sorted(by.items()):
                deleted.add_metric([str(table), str(reason)], float(n))
        yield deleted
        errors = CounterMetricFamily(
            "vspan_analyzer_errors", "Analyzer failures, by kind.", labels=["kind"]
        )
        for kind, n in sorted((counters.get("errors") or {}).items()):
            errors.add_metric([str(kind)], float(n))
        yield errors


def _collectors(frame: pd.DataFrame, accepted: set[int]) -> Iterator[Metric]:
    rows = frame[frame["collector_id"].isin(list(accepted))] if len(frame) else frame
    for column, name, help_text in _COLLECTOR:
        family = CounterMetricFamily(name, help_text, labels=["collector_id"])
        if column in rows.columns:
            for cid, value in zip(rows["collector_id"], rows[column].fillna(0), strict=True):
                family.add_metric([str(int(cid))], float(value))
        yield family


def _invalid(invalid: pd.DataFrame | None, accepted: set[int]) -> Metric:
    family = CounterMetricFamily(
        "vspan_collector_invalid_messages",
        'Tunnel messages rejected, by reason (collector_id "0": header unreadable, or an id '
        "that is neither in the inventory nor sent a valid message).",
        labels=["collector_id", "reason"],
    )
    if invalid is None or invalid.empty:
        return family
    ids = invalid["collector_id"].astype("int64")
    label = ids.astype(str).where(ids.isin(list(accepted)), UNACCEPTED)
    sums = invalid.assign(label=label).groupby(["label", "reason"], as_index=False, sort=True)
    per = sums["messages"].sum()
    for cid, reason, n in zip(per["label"], per["reason"], per["messages"], strict=True):
        family.add_metric([str(cid), str(reason)], float(n))
    return family


def _captures(beats: Mapping[int, Any]) -> Iterator[Metric]:
    for field, name, help_text in _CAPTURE:
        family = CounterMetricFamily(name, help_text, labels=["collector_id"])
        for cid, beat in sorted(beats.items()):
            family.add_metric([str(cid)], float(getattr(beat, field)))
        yield family
    drops = CounterMetricFamily(
        "vspan_collector_capture_drops",
        "Frames a collector lost before they reached an analyzer, by cause (heartbeat): "
        "kernel (capture ring full), runts, queue_full, send_error, stopped, unsent.",
        labels=["collector_id", "cause"],
    )
    left_out = CounterMetricFamily(
        "vspan_collector_frames_not_mirrored",
        "Frames a collector captured and left out on purpose, by reason (heartbeat; not a "
        "loss): duplicates (intra-host delivery copies), unselected, filtered, sampled_out.",
        labels=["collector_id", "reason"],
    )
    waiting = GaugeMetricFamily(
        "vspan_collector_frames_waiting",
        "Frames a collector exported and has not sent yet (heartbeat).",
        labels=["collector_id"],
    )
    when = GaugeMetricFamily(
        "vspan_collector_heartbeat_timestamp_seconds",
        "When the analyzer got the collector's latest heartbeat.",
        labels=["collector_id"],
    )
    for cid, beat in sorted(beats.items()):
        for cause, n in capture_drops(beat).items():
            drops.add_metric([str(cid), cause], float(n))
        for reason, n in not_mirrored(beat).items():
            left_out.add_metric([str(cid), reason], float(n))
        waiting.add_metric([str(cid)], float(beat.waiting))
        when.add_metric([str(cid)], float(beat.received))
    yield drops
    yield left_out
    yield waiting
    yield when


_Family = CounterMetricFamily | GaugeMetricFamily | UnknownMetricFamily


def _family(kind: str, name: str, help_text: str, labels: list[str]) -> _Family:
    if kind == "counter":
        return CounterMetricFamily(name, help_text, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, help_text, labels=labels)
    return UnknownMetricFamily(name, help_text, labels=labels)


def _part(
    part: str, prefix: str, table: Mapping[str, _Spec], values: Mapping[str, Any]
) -> Iterator[Metric]:
    """One part's families: each of the table's (zero while nothing is counted), then the
    keys it does not know (counters for the inventory, whose keys all count events; else
    untyped)."""
    samples: dict[str, list[tuple[str | None, float]]] = {key: [] for key in table}
    for key, value in sorted(values.items()):
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        match = _LABELLED.fullmatch(key)
        base, reason = (match.group(1), match.group(2)) if match else (key, None)
        if part == "engine" and base.startswith("undecodable_"):
            base, reason = "undecodable", base.removeprefix("undecodable_")
        samples.setdefault(base, []).append((reason, float(value)))
    unknown = "counter" if part == "inventory" else "untyped"
    for base, found in samples.items():
        any_reason = any(reason is not None for reason, _ in found)
        name, kind, help_text, by_reason = table.get(
            base, (base, unknown, f"{part} counter {base}.", any_reason)
        )
        family = _family(kind, prefix + _UNSAFE.sub("_", name), help_text,
                         ["reason"] if by_reason else [])  # fmt: skip
        for reason, value in found:
            family.add_metric([reason or ""] if by_reason else [], value)
        if not found and not by_reason:
            family.add_metric([], 0.0)
        yield family


def _receivers(receivers: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    drops = CounterMetricFamily(
        "vspan_receiver_drops",
        "Tunnel datagrams or messages the analyzer's receivers dropped, by cause.",
        labels=["receiver", "cause"],
    )
    families: dict[str, _Family] = {}
    for index, entry in enumerate(receivers):
        label = str(entry.get("receiver", index))
        for key, value in sorted(entry.items()):
            if isinstance(value, Mapping):
                if key in _DROP_MAPS:
                    for cause, n in sorted(value.items()):
                        _add_drop(drops, label, str(cause), n)
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            cause = _drop_cause(key)
            if cause is not None:
                _add_drop(drops, label, cause, value)
                continue
            kind, help_text = _RECEIVER.get(key, ("untyped", f"receiver counter {key}."))
            name = "vspan_receiver_" + _UNSAFE.sub("_", key)
            if kind == "gauge" and key == "rcvbuf":
                name += "_bytes"
            sample = float(value)
            if key.endswith("_ms"):  # Prometheus' base unit of time is the second
                name, sample = name.removesuffix("_ms") + "_seconds", sample / 1000
            family = families.get(name)
            if family is None:
                family = families[name] = _family(kind, name, help_text, ["receiver"])
            family.add_metric([label], sample)
    yield drops
    yield from families.values()


def _drop_cause(key: str) -> str | None:
    if key in _DROP_KEYS:
        return key
    if key.startswith("dropped_"):
        return key.removeprefix("dropped_")
    if key.endswith("_drops"):
        return key.removesuffix("_drops")
    return None


def _add_drop(family: CounterMetricFamily, receiver: str, cause: str, value: object) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        family.add_metric([receiver, _UNSAFE.sub("_", cause)], float(value))
