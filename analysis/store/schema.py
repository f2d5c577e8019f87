"""The store's schema as data: one ``Table`` per table, each column with its DuckDB type,
its ClickHouse type and a line of documentation.

``duckdb_ddl`` turns a table into the embedded store's ``CREATE TABLE``; ``clickhouse_ddl``
into the ``MergeTree`` table of a server deployment (``docs/store.md`` shows its output;
a test keeps the two in step). Changing a table means bumping ``SCHEMA_VERSION`` and adding
the statements that upgrade the previous version to ``upgrade.MIGRATIONS``.

**A VM's identity** in the tables that keep rows per VM (``inventory_history``,
``migrations``, ``policy_hits``) is ``vm_key`` (``vm_key``): its UUID when it has one, else
``name:`` and its name — a VM a collector found behind a Linux bridge port has no UUID, and
is kept by name. ``vm_uuid`` is NULL for such a VM. When a VM gets a UUID, or a VM without
one is renamed, the store gives its earlier rows the new key (``Store.rekey_vm``), so they
follow it.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Final

__all__ = [
    "INGEST_COLUMN",
    "RETENTION_BASES",
    "SCHEMA_VERSION",
    "TABLES",
    "VM_NAME_KEY",
    "Column",
    "Table",
    "clickhouse_ddl",
    "duckdb_ddl",
    "quote",
    "vm_key",
]

SCHEMA_VERSION: Final = 6
"""Version of the tables below; stored in ``meta`` as ``schema_version``."""
INGEST_COLUMN: Final = "ingest_time"
"""When the store wrote the row: every table with a ``time_column`` has it, and retention
ages rows by it unless told to age them by capture time (``Store.retention_basis``)."""
VM_NAME_KEY: Final = "name:"
"""The ``vm_key`` of a VM without a UUID is this followed by its name."""
RETENTION_BASES: Final = ("ingest", "capture")
"""What retention ages rows by: when the store wrote them, or their own (capture) time."""


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its name, its types in both stores, and what it holds."""

    name: str
    duckdb: str
    """DuckDB type (``VARCHAR[]`` for a list, ``MAP(K, V)`` for a map)."""
    clickhouse: str
    """ClickHouse type; ``Nullable`` is added for nullable columns outside the sort key."""
    doc: str
    null: bool = True
    """Whether the column may hold NULL."""
    check: tuple[str, ...] = ()
    """The only values allowed (a CHECK constraint; an ``Enum8`` in ClickHouse)."""


@dataclass(frozen=True, slots=True)
class Table:
    """One table and how it maps onto a ClickHouse ``MergeTree``."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    order_by: tuple[str, ...]
    """The ClickHouse sort key; also the order rows arrive in (time-major for events)."""
    time_column: str | None = None
    """The capture (or event) time of a row. A table that has one also has the column
    ``INGEST_COLUMN``, and retention deletes its rows older than the retention age by one
    or the other (None: never)."""
    primary_key: tuple[str, ...] = ()
    """DuckDB primary key (the tables that are updated in place)."""
    engine: str = "MergeTree"
    partition_by: str | None = None
    ttl: str | None = None

    def __post_init__(self) -> None:
        if self.time_column is not None and INGEST_COLUMN not in self.names:
            raise ValueError(f"table {self.name} has a time column but no {INGEST_COLUMN}")

    def column(self, name: str) -> Column:
        """The column called ``name``."""
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"table {self.name} has no column {name!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def _c(
    name: str, duck: str, click: str, doc: str, *, null: bool = True, check: tuple[str, ...] = ()
) -> Column:
    return Column(name, duck, click, doc, null, check)


_NAME = "LowCardinality(String)"
_TS = "DateTime64(6, 'UTC')"


def _vm_key(what: str = "the VM: ") -> Column:
    return _c(
        "vm_key", "VARCHAR", _NAME,
        f"{what}its UUID, or name:NAME for a VM without one (follows a new UUID or name)",
        null=False,
    )  # fmt: skip


def _vm_uuid() -> Column:
    return _c("vm_uuid", "UUID", "UUID", "the VM's UUID (NULL: none, e.g. behind a Linux bridge)")


def _ingest() -> Column:
    return _c(
        INGEST_COLUMN, "TIMESTAMPTZ", _TS, "when the store wrote the row (retention age)",
        null=False,
    )  # fmt: skip


FLOWS = Table(
    "flows",
    "One row per finished bidirectional flow (``analysis.records.RECORD_COLUMNS``).",
    (
        _c("flow_uid", "UUID", "UUID", "unique id of the flow record", null=False),
        _c("flow_id", "BIGINT", "Int64", "number of the flow within one analyzer run", null=False),
        _c("src_vm", "VARCHAR", _NAME, "VM name of the side that sent first"),
        _c("dst_vm", "VARCHAR", _NAME, "VM name of the other side"),
        _c("src_vm_uuid", "UUID", "UUID", "UUID of src_vm"),
        _c("dst_vm_uuid", "UUID", "UUID", "UUID of dst_vm"),
        _c("src_vif", "INTEGER", "UInt32", "vif of src at the observing host (0: not local)"),
        _c("dst_vif", "INTEGER", "UInt32", "vif of dst at the observing host (0: not local)"),
        _c("host", "VARCHAR", _NAME, "host that observed the flow (first copy)"),
        _c("src_host", "VARCHAR", _NAME, "host src runs on"),
        _c("dst_host", "VARCHAR", _NAME, "host dst runs on"),
        _c(
            "scope",
            "VARCHAR",
            "Enum8",
            "where the traffic went",
            null=False,
            check=("intra-host", "cross-host", "external"),
        ),
        _c("vlan", "USMALLINT", "UInt16", "VLAN id"),
        _c("ethertype", "USMALLINT", "UInt16", "EtherType after all tags", null=False),
        _c("proto", "UTINYINT", "UInt8", "IP protocol"),
        _c("src_ip", "VARCHAR", "IPv6", "source address (IPv4 dotted; IPv4-mapped in ClickHouse)"),
        _c("dst_ip", "VARCHAR", "IPv6", "destination address"),
        _c("src_port", "USMALLINT", "UInt16", "TCP/UDP/SCTP source port"),
        _c("dst_port", "USMALLINT", "UInt16", "TCP/UDP/SCTP destination port"),
        _c("icmp_type", "UTINYINT", "UInt8", "ICMP type (non-echo)"),
        _c("icmp_code", "UTINYINT", "UInt8", "ICMP code (non-echo)"),
        _c("icmp_id", "USMALLINT", "UInt16", "ICMP echo identifier"),
        _c("packets", "UBIGINT", "UInt64", "packets src → dst, each counted once", null=False),
        _c("bytes", "UBIGINT", "UInt64", "bytes src → dst (wire length)", null=False),
        _c("packets_rev", "UBIGINT", "UInt64", "packets dst → src", null=False),
        _c("bytes_rev", "UBIGINT", "UInt64", "bytes dst → src", null=False),
        _c("first", "TIMESTAMPTZ", _TS, "first packet (µs)", null=False),
        _c("last", "TIMESTAMPTZ", _TS, "last packet (µs)", null=False),
        _c("first_ns", "BIGINT", "Int64", "first packet, ns since the epoch", null=False),
        _c("last_ns", "BIGINT", "Int64", "last packet, ns since the epoch", null=False),
        _c("duration_s", "DOUBLE", "Float64", "last - first in seconds", null=False),
        _c("tcp_flags", "USMALLINT", "UInt16", "TCP flags src → dst (OR)"),
        _c("tcp_flags_rev", "USMALLINT", "UInt16", "TCP flags dst → src (OR)"),
        _c("src_mac", "VARCHAR", "String", "src MAC when src is not a known vNIC"),
        _c("dst_mac", "VARCHAR", "String", "dst MAC when dst is not a known vNIC"),
        _c(
            "copies",
            "BIGINT",
            "UInt64",
            "frames received for the flow, copies included",
            null=False,
        ),
        _c("observed_at", "VARCHAR[]", "Array(LowCardinality(String))", "hosts that saw it"),
        _c(
            "delay_us",
            "DOUBLE",
            "Float64",
            "mean time from a packet's sender copy to its receiver copy (cross-host)",
        ),
        _c("policy_verdict", "VARCHAR", _NAME, "verdict of the policy engine"),
        _c("policy_rule", "VARCHAR", _NAME, "rule that decided the verdict"),
        _ingest(),
    ),
    order_by=("src_vm", "dst_vm", "first"),
    time_column="last_ns",
    partition_by="toYYYYMMDD(first)",
    ttl=f"{INGEST_COLUMN} + INTERVAL 30 DAY DELETE",
)

INVENTORY_HISTORY = Table(
    "inventory_history",
    "Every change of the inventory: a vNIC added, removed or changed on a host.",
    (
        _c("time", "TIMESTAMPTZ", _TS, "when the change was seen", null=False),
        _c("host", "VARCHAR", _NAME, "host name", null=False),
        _vm_key(),
        _vm_uuid(),
        _c("vm_name", "VARCHAR", _NAME, "VM name at that time"),
        _c("vif", "INTEGER", "UInt32", "vif of the vNIC on the host"),
        _c("mac", "VARCHAR", "String", "MAC of the vNIC"),
        _c("profile", "VARCHAR", _NAME, "port-profile bound to the VM"),
        _c(
            "event",
            "VARCHAR",
            "Enum8",
            "what happened",
            null=False,
            check=("added", "removed", "changed"),
        ),
        _ingest(),
    ),
    order_by=("vm_key", "time"),
    time_column="time",
)

MIGRATIONS_TABLE = Table(
    "migrations",
    "A VM seen behind another host: from the inventory, or learned from the data plane.",
    (
        _c("time", "TIMESTAMPTZ", _TS, "when the move was detected", null=False),
        _vm_key(),
        _vm_uuid(),
        _c("vm_name", "VARCHAR", _NAME, "VM name at that time"),
        _c("from_host", "VARCHAR", _NAME, "host it left (NULL: first seen)"),
        _c("to_host", "VARCHAR", _NAME, "host it arrived at", null=False),
        _c(
            "source",
            "VARCHAR",
            "Enum8",
            "how it was detected",
            null=False,
            check=("inventory", "dataplane"),
        ),
        _ingest(),
    ),
    order_by=("vm_key", "time"),
    time_column="time",
)

POLICY_HITS = Table(
    "policy_hits",
    "Per rule and VM: flows, packets and bytes the rule decided, added up.",
    (
        _c("rule", "VARCHAR", _NAME, "profile/rule name", null=False),
        _vm_key("the VM the rule applied to: "),
        _vm_uuid(),
        _c("vm_name", "VARCHAR", _NAME, "VM name at the last hit"),
        _c("verdict", "VARCHAR", _NAME, "verdict of the rule"),
        _c("flows", "UBIGINT", "UInt64", "flows decided", null=False),
        _c("packets", "UBIGINT", "UInt64", "packets of those flows", null=False),
        _c("bytes", "UBIGINT", "UInt64", "bytes of those flows", null=False),
        _c(
            "last_hit",
            "TIMESTAMPTZ",
            "SimpleAggregateFunction(max, DateTime64(6, 'UTC'))",
            "last time the rule decided a flow of the VM",
            null=False,
        ),
        _ingest(),
    ),
    order_by=("rule", "vm_key"),
    time_column="last_hit",
    primary_key=("rule", "vm_key"),
    engine="SummingMergeTree((flows, packets, bytes))",
)

COLLECTOR_COUNTERS = Table(
    "collector_counters",
    "Receive counters per collector, sampled over time (each row: totals since boot).",
    (
        _c("time", "TIMESTAMPTZ", _TS, "sample time", null=False),
        _c("collector_id", "UINTEGER", "UInt32", "collector", null=False),
        _c("boot_id", "UINTEGER", "UInt32", "collector boot (a new one restarts seq)", null=False),
        _c(
            "highest_seq",
            "UINTEGER",
            "UInt32",
            "highest seq of the boot received (a restarted analyzer resumes there)",
        ),
        _c("last_seen", "TIMESTAMPTZ", _TS, "the boot's latest message (restored newest first)"),
        _c("received", "UBIGINT", "UInt64", "messages received", null=False),
        _c("lost", "UBIGINT", "UInt64", "messages the network lost (seq gaps)", null=False),
        _c(
            "kernel",
            "UBIGINT",
            "UInt64",
            "messages the analyzer's socket dropped (seq gaps charged to its full buffer)",
        ),
        _c(
            "missed_while_down",
            "UBIGINT",
            "UInt64",
            "messages sent while the analyzer was not receiving (the seq gap at its restart; "
            "after a crash also those received since its last counters save, at most 10 s)",
        ),
        _c("duplicates", "UBIGINT", "UInt64", "duplicate messages", null=False),
        _c("reordered", "UBIGINT", "UInt64", "messages out of order", null=False),
        _c(
            "stale",
            "UBIGINT",
            "UInt64",
            "messages too far behind the highest seq to place (dropped)",
        ),
        _c("frames", "UBIGINT", "UInt64", "frames received", null=False),
        _c("bytes", "UBIGINT", "UInt64", "frame bytes received", null=False),
        _c(
            "invalid",
            "MAP(VARCHAR, UBIGINT)",
            "Map(LowCardinality(String), UInt64)",
            "messages rejected, by reason",
        ),
        _ingest(),
    ),
    order_by=("collector_id", "time"),
    time_column="time",
)

RING_SEGMENTS = Table(
    "ring_segments",
    "Closed packet-ring segment files (mirror of their sidecar index).",
    (
        _c("name", "VARCHAR", "String", "file name in DATA_DIR/ring", null=False),
        _c("first_ns", "BIGINT", "Int64", "earliest frame, ns", null=False),
        _c("last_ns", "BIGINT", "Int64", "latest frame, ns", null=False),
        _c("frames", "UBIGINT", "UInt64", "frames in the file", null=False),
        _c("bytes", "UBIGINT", "UInt64", "file size", null=False),
    ),
    order_by=("first_ns", "name"),
    primary_key=("name",),
    engine="ReplacingMergeTree",
)

RING_SEGMENT_KEYS = Table(
    "ring_segment_keys",
    "What a ring segment holds: hosts, (host, vif)s, VM UUIDs, MACs, IPs.",
    (
        _c("segment", "VARCHAR", "String", "ring_segments.name", null=False),
        _c(
            "kind",
            "VARCHAR",
            "Enum8",
            "key kind",
            null=False,
            check=("host", "host_vif", "vm", "mac", "ip"),
        ),
        _c("value", "VARCHAR", "String", "collector_id, 'id/vif', UUID, MAC or IP", null=False),
    ),
    order_by=("kind", "value", "segment"),
)

META = Table(
    "meta",
    "Key/value facts about the store itself: ``schema_version``.",
    (
        _c("key", "VARCHAR", "String", "name", null=False),
        _c("value", "VARCHAR", "String", "value", null=False),
    ),
    order_by=("key",),
    primary_key=("key",),
    engine="ReplacingMergeTree",
)

TABLES: Final[dict[str, Table]] = {
    t.name: t
    for t in (
        META,
        FLOWS,
        INVENTORY_HISTORY,
        MIGRATIONS_TABLE,
        POLICY_HITS,
        COLLECTOR_COUNTERS,
        RING_SEGMENTS,
        RING_SEGMENT_KEYS,
    )
}


def vm_key(uuid: str | None, name: str | None) -> str | None:
    """A VM's ``vm_key``: its UUID in canonical form when ``uuid`` is one, else ``name:`` and
    its name; None when it has neither (the store leaves such a row out: ``null_vm_key``)."""
    if uuid:
        try:
            return str(uuidlib.UUID(uuid))
        except ValueError:
            pass  # not a UUID: the store keeps NULL for it (counted), the VM by its name
    return VM_NAME_KEY + name if name else None


def quote(name: str) -> str:
    """A quoted SQL identifier (every column is quoted: ``first`` and ``bytes`` are words)."""
    return '"' + name.replace('"', '""') + '"'


def _values(values: tuple[str, ...]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def duckdb_ddl(table: Table) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for the embedded store."""
    lines = []
    for col in table.columns:
        line = f"{quote(col.name)} {col.duckdb}"
        if not col.null:
            line += " NOT NULL"
        if col.check:
            line += f" CHECK ({quote(col.name)} IN ({_values(col.check)}))"
        lines.append(line)
    if table.primary_key:
        lines.append(f"PRIMARY KEY ({', '.join(quote(k) for k in table.primary_key)})")
    body = ",\n    ".join(lines)
    return f"CREATE TABLE IF NOT EXISTS {quote(table.name)} (\n    {body}\n)"


def _clickhouse_type(col: Column, key: set[str]) -> str:
    kind = col.clickhouse
    if col.check:
        kind = "Enum8(" + ", ".join(f"'{v}' = {i + 1}" for i, v in enumerate(col.check)) + ")"
    if not col.null or col.name in key or kind.startswith(("Array", "Map", "Simple")):
        return kind  # sort-key columns hold '' / 0 for NULL; arrays and maps are empty
    if kind.startswith("LowCardinality("):
        return f"LowCardinality(Nullable({kind[len('LowCardinality(') : -1]}))"
    return f"Nullable({kind})"


def clickhouse_ddl(table: Table) -> str:
    """The same table for ClickHouse (a ``MergeTree`` family engine)."""
    key = set(table.order_by)
    cols = ",\n    ".join(
        f"`{c.name}` {_clickhouse_type(c, key)} COMMENT '{c.doc.replace(chr(39), '')}'"
        for c in table.columns
    )
    text = f"CREATE TABLE {table.name}\n(\n    {cols}\n)\nENGINE = {table.engine}\n"
    if table.partition_by:
        text += f"PARTITION BY {table.partition_by}\n"
    text += f"ORDER BY ({', '.join(table.order_by)})"
    if table.ttl:
        text += f"\nTTL {table.ttl}"
    return text
