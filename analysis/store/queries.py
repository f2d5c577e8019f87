"""The read queries: one function per resource of the read API and of the query commands.

Each takes the ``Store`` (``collectors`` also a frame of live counter samples) and filters as
people type them, validates them once — a bad value raises ``ConfigError`` naming the
argument and what was expected — and returns a DataFrame (``flows``: a ``FlowPage``).

Times are ISO 8601 (``2024-05-01T12:00:00Z``; no zone means UTC), epoch seconds, or a time
before ``now``: ``-15m``, ``2h`` (units ms, s, m, h, d, w). ``parse_time`` reads them all;
``now`` is an argument, read from the clock only by the API and the command line.

Flows are paged by keyset: a cursor is the page's last row's (sort key, ``flow_uid``), as
opaque base64. The next page starts strictly after it in the sort order, so appending flows
between requests never repeats or skips a stored row.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import pandas as pd

from vspan.analysis.inventory.migration_report import FOLLOWED_COLUMNS, policy_followed
from vspan.analysis.records.build import RECORD_COLUMNS
from vspan.analysis.records.render import render
from vspan.analysis.store.schema import TABLES, quote
from vspan.analysis.store.sql import (
    FLOWS_SQL,
    StoreError,
    Where,
    flows_where,
    normalize_ip,
    protocol,
)
from vspan.analysis.store.store import Store
from vspan.errors import ConfigError

__all__ = [
    "COLLECTOR_COLUMNS",
    "DEFAULT_LIMIT",
    "FLOW_COLUMNS",
    "FLOW_SORTS",
    "HIT_COLUMNS",
    "MAX_LIMIT",
    "MIGRATION_COLUMNS",
    "FlowPage",
    "collectors",
    "flows",
    "json_rows",
    "migrations",
    "parse_time",
    "policy_hits",
    "violations",
]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 10_000
FLOW_COLUMNS: Final = (
    *RECORD_COLUMNS, "flow_uid", "src_vm_uuid", "dst_vm_uuid", "policy_verdict", "policy_rule",
    "state",
)  # fmt: skip
"""A flow: the record columns, then what the store adds, and ``state`` (``open`` while the
flow goes on: counters so far; ``closed`` once it ended and was stored)."""
FLOW_SORTS: Final = {"first": "first_ns", "last": "last_ns", "bytes": "bytes", "packets": "packets"}
"""``sort`` of ``flows`` (``-name``: descending) → the column it orders by."""
HIT_COLUMNS: Final = (
    "profile", "rule", "verdict", "vm_name", "vm_uuid", "flows", "packets", "bytes", "last_hit",
)  # fmt: skip
MIGRATION_COLUMNS: Final = (
    "time", "vm_name", "vm_uuid", "from_host", "to_host", "source", *FOLLOWED_COLUMNS,
)  # fmt: skip
COLLECTOR_COLUMNS: Final = (
    "collector_id", "restarts", "time", "received", "lost", "kernel", "missed_while_down",
    "duplicates", "reordered", "frames", "bytes", "loss", "messages_per_s", "frames_per_s",
    "bytes_per_s", "invalid", "drops",
)  # fmt: skip
_SCOPES: Final = TABLES["flows"].column("scope").check
_UNITS: Final[dict[str, Decimal]] = {
    "ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600),
    "d": Decimal(86400), "w": Decimal(604800),
}  # fmt: skip
_RELATIVE: Final = re.compile(r"-?(\d+(?:\.\d*)?)(ms|s|m|h|d|w)")
_EPOCH: Final = re.compile(r"\d+(?:\.\d*)?")
_MAX_NS: Final = 2**63 - 1
_EPOCH_START: Final = datetime(1970, 1, 1, tzinfo=UTC)
_COUNTERS: Final = (
    "received", "lost", "kernel", "missed_while_down", "duplicates", "reordered", "frames", "bytes",
)  # fmt: skip


def parse_time(text: str | int | float, now: float, *, field: str = "time") -> int:
    """Nanoseconds since the epoch of ``text``: ISO 8601, epoch seconds, or ``-15m``/``15m``
    (before ``now``, in seconds since the epoch) or ``now``; ``ConfigError`` otherwise."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ConfigError(f"expected a time, got {text!r}", field=field)
    value = text.strip() if isinstance(text, str) else text
    try:
        if isinstance(value, int | float) or _EPOCH.fullmatch(value):
            ns = int(Decimal(str(value)) * 10**9)
        elif value == "now":
            ns = int(Decimal(repr(now)) * 10**9)
        elif match := _RELATIVE.fullmatch(value):
            ago = Decimal(match.group(1)) * _UNITS[match.group(2)]
            ns = int((Decimal(repr(now)) - ago) * 10**9)
        else:
            stamp = datetime.fromisoformat(value)
            stamp = stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp
            ns = (stamp - _EPOCH_START) // timedelta(microseconds=1) * 1000
    except (ValueError, InvalidOperation, OverflowError):
        raise ConfigError(
            f"cannot read {text!r} as a time: expected ISO 8601 (2024-05-01T12:00:00Z), "
            "epoch seconds, or a time before now like -15m or 2h",
            field=field,
        ) from None
    if not 0 <= ns <= _MAX_NS:
        raise ConfigError(f"{text!r} is outside 1970..2262", field=field)
    return ns


def _time(value: str | int | float | None, now: float, field: str) -> int | None:
    return None if value is None else parse_time(value, now, field=field)


def _text(value: str | None, field: str) -> str | None:
    if value is not None and not value.strip():
        raise ConfigError("must not be empty", field=field)
    return value


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"expected 1..{MAX_LIMIT}, got {limit}", field="limit")
    return limit


def _flow_where(
    *, vm: str | None, host: str | None, scope: str | None = None, proto: int | str | None = None,
    ip: str | None = None, port: int | None = None, since: str | int | float | None,
    until: str | int | float | None, now: float,
) -> Where:  # fmt: skip
    """The flow filters, each checked here with an error naming it; then the store's SQL."""
    if scope is not None and scope not in _SCOPES:
        raise ConfigError(
            f"unknown scope {scope!r}; expected one of {list(_SCOPES)}", field="scope"
        )
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"{port} is outside 0..65535", field="port")
    try:
        proto = None if proto is None else protocol(proto)
    except StoreError as exc:
        raise ConfigError(str(exc), field="proto") from exc
    try:
        ip = None if ip is None else normalize_ip(ip)
    except StoreError as exc:
        raise ConfigError(str(exc), field="ip") from exc
    return flows_where(
        vm=_text(vm, "vm"), host=_text(host, "host"), scope=scope, proto=proto, ip=ip, port=port,
        since=_time(since, now, "since"), until=_time(until, now, "until"),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Sort:
    name: str
    """As given: ``-last``."""
    column: str
    descending: bool

    @classmethod
    def parse(cls, sort: str) -> _Sort:
        name = sort.removeprefix("-")
        if name not in FLOW_SORTS:
            choices = ", ".join(f"{s}, -{s}" for s in FLOW_SORTS)
            raise ConfigError(f"unknown sort {sort!r}; expected one of {choices}", field="sort")
        return cls(sort, FLOW_SORTS[name], sort.startswith("-"))

    def cursor(self, row: pd.Series) -> str:
        """The opaque cursor after ``row``."""
        doc = [self.name, int(row[self.column]), str(row["flow_uid"])]
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    def after(self, cursor: str, where: Where) -> None:
        """Add the condition "strictly after the cursor's row" to ``where``."""
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            name, key, uid = json.loads(raw)
            uid = str(uuid.UUID(uid))
            if not isinstance(name, str) or not isinstance(key, int) or abs(key) >= 2**64:
                raise TypeError(name, key)
        except (binascii.Error, ValueError, TypeError, AttributeError):
            raise ConfigError(f"{cursor!r} is not a cursor this API made", field="cursor") from None
        if name != self.name:
            raise ConfigError(f"made for sort={name}, not sort={self.name}", field="cursor")
        col, op = quote(self.column), "<" if self.descending else ">"
        where.add(
            f'({col} {op} ? OR ({col} = ? AND "flow_uid" {op} CAST(? AS UUID)))', key, key, uid
        )

    def sql(self, where: Where, limit: int) -> tuple[str, list[object]]:
        direction = "DESC" if self.descending else "ASC"
        columns = ", ".join(quote(c) for c in FLOW_COLUMNS)
        return (
            f"SELECT {columns} FROM {FLOWS_SQL}{where.sql()} "
            f'ORDER BY {quote(self.column)} {direction}, "flow_uid" {direction} LIMIT ?',
            [*where.params, limit],
        )


@dataclass(frozen=True, slots=True, eq=False)
class FlowPage:
    """One page of flows and the cursor of the next (None: this was the last)."""

    flows: pd.DataFrame
    """``FLOW_COLUMNS``."""
    next_cursor: str | None


def flows(
    store: Store, *, vm: str | None = None, host: str | None = None, scope: str | None = None,
    proto: int | str | None = None, ip: str | None = None, port: int | None = None,
    since: str | int | float | None = None, until: str | int | float | None = None,
    sort: str = "-last", limit: int = DEFAULT_LIMIT, cursor: str | None = None, now: float,
) -> FlowPage:  # fmt: skip
    """Stored flows matching every filter (``Store.query_flows`` semantics), a page at a time
    in ``sort`` order (``FLOW_SORTS``, ties by ``flow_uid``), after ``cursor``."""
    order, limit = _Sort.parse(sort), _limit(limit)
    where = _flow_where(
        vm=vm, host=host, scope=scope, proto=proto, ip=ip, port=port, since=since, until=until,
        now=now,
    )  # fmt: skip
    if cursor is not None:
        order.after(cursor, where)
    rows = store.query(*order.sql(where, limit + 1))
    if len(rows) <= limit:
        return FlowPage(rows, None)
    return FlowPage(rows.iloc[:limit], order.cursor(rows.iloc[limit - 1]))


def violations(
    store: Store, *, vm: str | None = None, since: str | int | float | None = None,
    until: str | int | float | None = None, limit: int = DEFAULT_LIMIT, now: float,
) -> pd.DataFrame:  # fmt: skip
    """Flows whose stored ``policy_verdict`` is ``deny``, the most recent first."""
    where = _flow_where(vm=vm, host=None, since=since, until=until, now=now)
    where.add('"policy_verdict" = ?', "deny")
    return store.query(*_Sort.parse("-last").sql(where, _limit(limit)))


def policy_hits(store: Store, *, vm: str | None = None, profile: str | None = None) -> pd.DataFrame:
    """Hit counters per (rule, VM) — ``HIT_COLUMNS`` — in profile and rule order (a profile's
    default, ``profile#default``, last), then by VM name; ``vm`` by UUID or by a name the VM
    has had (``vm_uuid`` is null for a VM without one)."""
    hits = store.query_policy_hits(vm=_text(vm, "vm"), limit=None, order="rule")
    hits["profile"] = hits["rule"].str.rsplit("#", n=1).str[0]
    if _text(profile, "profile") is not None:
        hits = hits[hits["profile"] == profile]
    number = pd.to_numeric(hits["rule"].str.rsplit("#", n=1).str[1], errors="coerce")
    number = number.where(number > 0, float("inf"))  # "#0" or "#default": the default, last
    hits = hits.assign(_n=number).sort_values(["profile", "_n", "vm_name"], kind="stable")
    return hits[list(HIT_COLUMNS)].reset_index(drop=True)


def migrations(
    store: Store, *, vm: str | None = None, since: str | int | float | None = None,
    until: str | int | float | None = None, limit: int = DEFAULT_LIMIT, now: float,
) -> pd.DataFrame:  # fmt: skip
    """The latest ``limit`` migrations (``MIGRATION_COLUMNS``), oldest first, each with
    whether the VM's port-profile followed it (``inventory.migration_report.policy_followed``);
    ``vm`` by UUID or by a name the VM has had (``vm_uuid`` is null for a VM without one)."""
    rows = store.query_migrations(
        vm=_text(vm, "vm"), since=_time(since, now, "since"), until=_time(until, now, "until"),
        limit=_limit(limit), order="-time",
    )  # fmt: skip
    rows = rows.iloc[::-1].reset_index(drop=True)
    names = list(pd.unique(rows["vm_name"].dropna()))
    parts = [store.query_flows(vm=str(n), limit=None) for n in names]
    flows = pd.concat(parts, ignore_index=True) if parts else store.query_flows(limit=0)
    keys = list(pd.unique(rows["vm_key"].astype(str)))  # a VM with or without a UUID
    history = [store.query_inventory_history(vm_key=k, limit=None) for k in keys]
    bindings = (
        pd.concat(history, ignore_index=True) if history else store.query_inventory_history(limit=0)
    )
    return policy_followed(rows, flows, bindings)[list(MIGRATION_COLUMNS)]


_LAST_TWO: Final = (
    "SELECT * FROM collector_counters QUALIFY dense_rank() OVER "
    '(PARTITION BY "collector_id" ORDER BY "time" DESC) <= 2'
)
"""The rows of each collector's last two sample times (a sample has a row per boot)."""


def collectors(samples: Store | pd.DataFrame) -> pd.DataFrame:
    """Per collector, its latest sample (``COLLECTOR_COLUMNS``), summed over the boots in it:
    ``restarts`` (its boots, less one), ``loss`` (lost / expected messages), rates since its
    sample before (None without one, or when the sums went down: a restart whose earlier boot
    the sample lacks), ``invalid`` (messages rejected) and ``drops`` (``{reason: messages}``:
    ``lost`` (by the network), ``kernel`` (by the analyzer's socket), ``missed_while_down``
    (sent while the analyzer was stopped) and each reason of rejection; non-zero only).
    ``samples``: the store's ``collector_counters``, or live samples in its columns
    (``persist.collector_rows``)."""
    if isinstance(samples, Store):
        frame = samples.query(_LAST_TWO)
        maps = [None if v is None else dict(v) for v in frame["invalid"]]  # (key, value) pairs
        frame["invalid"] = pd.Series(maps, index=frame.index, dtype=object)
    else:
        frame = samples.copy()
        if frame.empty:  # no sample yet (``persist.collector_rows`` gives a bare frame)
            return pd.DataFrame({c: pd.Series(dtype=object) for c in COLLECTOR_COLUMNS})
        if pd.api.types.is_integer_dtype(frame["time"].dtype):
            frame["time"] = pd.to_datetime(frame["time"], unit="ns", utc=True)
    keys = ["collector_id", "time"]
    for name in ("kernel", "missed_while_down"):  # NULL or absent in older samples
        frame[name] = frame[name].fillna(0) if name in frame else 0
    group = frame.astype(dict.fromkeys(_COUNTERS, "int64")).groupby(keys, sort=True)
    out = group[list(_COUNTERS)].sum().reset_index()
    out["restarts"] = group["boot_id"].nunique().to_numpy() - 1
    invalid: dict[tuple[Any, ...], dict[str, int]] = {}  # per collector: on each boot's row
    for key, reasons in zip(frame[keys].itertuples(index=False), frame["invalid"], strict=True):
        merged = invalid.setdefault(tuple(key), {})
        for reason, n in (reasons or {}).items():
            merged[reason] = max(merged.get(reason, 0), int(n))
    before = out.groupby("collector_id", sort=False)[["time", *_COUNTERS]].shift(1)
    seconds = (out["time"] - before["time"]).dt.total_seconds()
    rising = ((seconds > 0) & (out["received"] >= before["received"])).astype(bool)
    for name, counter in (("messages", "received"), ("frames", "frames"), ("bytes", "bytes")):
        rate = (out[counter] - before[counter]) / seconds
        out[f"{name}_per_s"] = rate.astype("float64").where(rising)
    sent = out["received"] - out["duplicates"] + out["lost"] + out["kernel"]
    expected = (sent + out["missed_while_down"]).astype("float64")
    out["loss"] = (out["lost"] / expected.where(expected > 0)).fillna(0.0)
    reasons = [invalid[key] for key in out[keys].itertuples(index=False, name=None)]
    out["invalid"] = pd.array([sum(r.values()) for r in reasons], dtype="Int64")
    causes = out[["lost", "kernel", "missed_while_down"]].to_dict(orient="records")
    drops = [
        {k: n for k, n in sorted({**cause, **r}.items()) if n}
        for cause, r in zip(causes, reasons, strict=True)
    ]
    out["drops"] = pd.Series(drops, index=out.index, dtype=object)
    latest = out.groupby("collector_id", sort=True).tail(1)
    return latest[list(COLLECTOR_COLUMNS)].reset_index(drop=True)


def json_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON values, exactly as ``vspan report --format json`` writes them: times
    ISO 8601 UTC with microseconds, null for missing values."""
    buf = io.BytesIO()
    render(frame, "json", buf)
    rows: list[dict[str, Any]] = json.loads(buf.getvalue())
    return rows
