"""The SQL the store sends, built from ``store.schema``: inserts and WHERE clauses.

Every value reaches DuckDB as a bound parameter; identifiers come only from the schema
tables (quoted). Filters are validated here, once, with errors that say what was expected.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import numpy as np
import pandas as pd

from vspan.analysis.store.schema import INGEST_COLUMN, TABLES, VM_NAME_KEY, Table, quote, vm_key
from vspan.errors import VspanError

__all__ = [
    "PROTOCOLS",
    "VM_TABLES",
    "StoreError",
    "Where",
    "events_where",
    "flows_where",
    "insert_sql",
    "normalize_ip",
    "schema_of",
    "select_sql",
    "time_param",
    "upsert_sql",
    "vm_keys",
    "vm_rekey_sql",
    "with_vm_keys",
]

PROTOCOLS: Final = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
"""Protocol names accepted where a number is expected."""
VM_TABLES: Final = tuple(t.name for t in TABLES.values() if "vm_key" in t.names)
"""The tables that keep rows per VM, by ``vm_key`` (``store.schema``)."""
_SUMMED: Final = ("flows", "packets", "bytes")
"""The running totals of ``policy_hits``."""


class StoreError(VspanError):
    """The store cannot be opened, a query is malformed, or an append does not fit."""


def schema_of(name: str) -> Table:
    """The schema of table ``name``."""
    if name not in TABLES:
        raise StoreError(f"no table {name!r}; tables: {', '.join(TABLES)}")
    return TABLES[name]


def time_param(value: object) -> pd.Timestamp:
    """A point in time as a UTC ``Timestamp``: ns since the epoch (int), ISO text, datetime."""
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str | datetime):
        raise StoreError(
            f"expected a time (ns since the epoch, ISO text or datetime), got {value!r}"
        )
    try:
        stamp = pd.Timestamp(value, unit="ns") if isinstance(value, int) else pd.Timestamp(value)
    except ValueError as exc:
        raise StoreError(f"cannot read {value!r} as a time: {exc}") from exc
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def normalize_ip(text: str) -> str:
    """An address as flow records print it (IPv4-mapped IPv6 as dotted IPv4)."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise StoreError(f"expected an IPv4 or IPv6 address, got {text!r}") from exc
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def protocol(value: int | str) -> int:
    """An IP protocol number from a number or a name of ``PROTOCOLS``."""
    if isinstance(value, str) and not value.isdigit():
        if value.lower() not in PROTOCOLS:
            raise StoreError(
                f"unknown protocol {value!r}; expected a number or one of {list(PROTOCOLS)}"
            )
        return PROTOCOLS[value.lower()]
    number = int(value)
    if not 0 <= number <= 255:
        raise StoreError(f"protocol {number} is outside 0..255")
    return number


@dataclass
class Where:
    """An AND of parameterised conditions."""

    clauses: list[str] = field(default_factory=list)
    params: list[object] = field(default_factory=list)

    def add(self, clause: str, *params: object, skip: bool = False) -> None:
        """Add ``clause`` (one ``?`` per parameter) unless ``skip``."""
        if not skip:
            self.clauses.append(clause)
            self.params.extend(params)

    def any_of(self, columns: tuple[str, ...], value: object, cast: str = "") -> None:
        """``value`` equals at least one of ``columns``."""
        marker = f"CAST(? AS {cast})" if cast else "?"
        ors = " OR ".join(f"{quote(c)} = {marker}" for c in columns)
        self.add(f"({ors})", *([value] * len(columns)))

    def vm(self, vm: str, *, uuid_cols: tuple[str, ...], name_cols: tuple[str, ...]) -> None:
        """A VM by UUID (when ``vm`` is one) or by name."""
        try:
            self.any_of(uuid_cols, str(uuid.UUID(vm)), "UUID")
        except ValueError:
            self.any_of(name_cols, vm)

    def vm_key(self, vm: str) -> None:
        """The rows (of a table of ``VM_TABLES``) of a VM by UUID, or of every VM that has
        had the name ``vm``: their ``vm_key`` is one a row of those tables has with that
        ``vm_name`` (a VM renamed, or given a UUID, keeps one key for all its rows)."""
        key = vm_key(vm, None)
        if key is not None:
            self.add('"vm_key" = ?', key)
            return
        named = " UNION ".join(
            f'SELECT "vm_key" FROM {quote(t)} WHERE "vm_name" = ?' for t in VM_TABLES
        )
        self.add(
            f'("vm_key" = ? OR "vm_key" IN ({named}))', VM_NAME_KEY + vm, *[vm] * len(VM_TABLES)
        )

    def sql(self) -> str:
        """`` WHERE …`` (empty when there is no condition)."""
        return " WHERE " + " AND ".join(self.clauses) if self.clauses else ""


def flows_where(
    *,
    vm: str | None,
    host: str | None,
    scope: str | None,
    proto: int | str | None,
    ip: str | None,
    port: int | None,
    since: object,
    until: object,
) -> Where:
    """The conditions of ``Store.query_flows``."""
    where = Where()
    if vm is not None:
        where.vm(vm, uuid_cols=("src_vm_uuid", "dst_vm_uuid"), name_cols=("src_vm", "dst_vm"))
    if host is not None:
        where.add(
            '("host" = ? OR "src_host" = ? OR "dst_host" = ? OR list_contains("observed_at", ?))',
            *([host] * 4),
        )
    if scope is not None:
        allowed = TABLES["flows"].column("scope").check
        if scope not in allowed:
            raise StoreError(f"unknown scope {scope!r}; expected one of {list(allowed)}")
        where.add('"scope" = ?', scope)
    if proto is not None:
        where.add('"proto" = ?', protocol(proto))
    if ip is not None:
        where.any_of(("src_ip", "dst_ip"), normalize_ip(ip))
    if port is not None:
        if not 0 <= int(port) <= 65535:
            raise StoreError(f"port {port} is outside 0..65535")
        where.any_of(("src_port", "dst_port"), int(port))
    if since is not None:
        where.add('"last_ns" >= ?', int(time_param(since).value))
    if until is not None:
        where.add('"first_ns" < ?', int(time_param(until).value))
    return where


def insert_sql(spec: Table, given: list[str]) -> str:
    """``INSERT INTO t (…) SELECT … FROM incoming`` for the columns ``given``."""
    unknown = [c for c in given if c not in spec.names]
    if unknown:
        raise StoreError(
            f"table {spec.name} has no column {', '.join(map(repr, unknown))}; "
            "add it to store_schema and bump SCHEMA_VERSION"
        )
    names, exprs = [], []
    for col in spec.columns:
        if col.name in given:
            source = quote(col.name)
            if col.duckdb.startswith("MAP("):
                source = f"CAST({source} AS JSON)"
            exprs.append(f"CAST({source} AS {col.duckdb}) AS {quote(col.name)}")
        elif col.name == "flow_uid":
            exprs.append('gen_random_uuid() AS "flow_uid"')
        elif not col.null:
            raise StoreError(f"table {spec.name} needs column {col.name!r}, which is missing")
        else:
            continue
        names.append(quote(col.name))
    return (
        f"INSERT INTO {quote(spec.name)} ({', '.join(names)}) "
        f"SELECT {', '.join(exprs)} FROM incoming"
    )


def upsert_sql(spec: Table, given: list[str], sums: tuple[str, ...], latest: str) -> str:
    """An insert that adds ``sums`` to the rows with the same primary key (duplicates in
    the input are summed first); ``latest`` keeps the maximum, other columns the newest."""
    keys = [c for c in given if c in spec.primary_key]

    def agg(c: str) -> str:
        if c in keys:
            return quote(c)
        if c in sums:
            return f"sum({quote(c)})"
        return f"max({quote(c)})" if c == latest else f"arg_max({quote(c)}, {quote(latest)})"

    def update(c: str) -> str:
        if c in sums:
            return f"{quote(c)} = {quote(c)} + EXCLUDED.{quote(c)}"
        if c == latest:
            return f"{quote(c)} = greatest({quote(c)}, EXCLUDED.{quote(c)})"
        return f"{quote(c)} = EXCLUDED.{quote(c)}"

    head, body = insert_sql(spec, given).split(" SELECT ", 1)
    key_list = ", ".join(quote(k) for k in keys)
    return (
        f"{head} SELECT {', '.join(agg(c) for c in given)} FROM (SELECT {body}) "
        f"GROUP BY {key_list} ON CONFLICT ({key_list}) "
        f"DO UPDATE SET {', '.join(update(c) for c in given if c not in keys)}"
    )


def _open_flows_sql() -> str:
    """The registered frame of open flows as rows of ``flows`` (each column cast)."""
    spec = TABLES["flows"]
    casts = ", ".join(
        f"CAST({quote(c.name)} AS {c.duckdb}) AS {quote(c.name)}" for c in spec.columns
    )
    return f"SELECT {casts}, 'open' AS \"state\" FROM open_flows"


FLOWS_SQL: Final = (
    f"(SELECT *, 'closed' AS \"state\" FROM flows UNION ALL BY NAME {_open_flows_sql()}) AS flows"
)
"""What reads of flows select from: the stored flows (``state`` ``closed``) and the open
ones the store was given (``Store.set_open_flows``; ``state`` ``open``), through
``Store.query``, which registers them."""


def source_sql(spec: Table) -> str:
    """What a read of ``spec`` selects from (``FLOWS_SQL`` for flows)."""
    return FLOWS_SQL if spec.name == "flows" else quote(spec.name)


def select_sql(
    spec: Table, where: Where, order: str, limit: int | None, columns: Sequence[str] | None = None
) -> tuple[str, list[object]]:
    """``SELECT`` of a table's ``columns`` (all by default) with conditions, ``order``
    (``-column``: descending) and a limit. Flows come with their ``state``."""
    name = order.removeprefix("-")
    names = (*spec.names, "state") if spec.name == "flows" else spec.names
    known = ", ".join(names)
    if name not in names:
        raise StoreError(f"cannot order {spec.name} by {name!r}; columns: {known}")
    for wanted in columns or ():
        if wanted not in names:
            raise StoreError(f"table {spec.name} has no column {wanted!r}; columns: {known}")
    picked = "*" if columns is None else ", ".join(quote(c) for c in columns)
    sql = f"SELECT {picked} FROM {source_sql(spec)}{where.sql()} ORDER BY {quote(name)}"
    sql += " DESC" if order.startswith("-") else ""
    if limit is None:
        return sql, where.params
    return sql + " LIMIT ?", [*where.params, int(limit)]


def events_where(
    *, vm: str | None = None, since: object = None, until: object = None, **equal: object
) -> Where:
    """Conditions on a table of ``VM_TABLES`` (or of collector counters): its VM (by UUID or
    by a name it has had: ``Where.vm_key``), its ``time`` range, columns equal to values."""
    where = Where()
    if vm is not None:
        where.vm_key(vm)
    if since is not None:
        where.add('"time" >= ?', time_param(since))
    if until is not None:
        where.add('"time" < ?', time_param(until))
    for column, value in equal.items():
        where.add(f"{quote(column)} = ?", value, skip=value is None)
    return where


def vm_keys(uuids: pd.Series, names: pd.Series) -> pd.Series:
    """The ``vm_key`` of each row's VM (``store.schema.vm_key``): its UUID, else ``name:`` and
    its name; None where it has neither. Each distinct UUID is read once."""
    given = uuids.astype(object).where(uuids.notna(), None)
    distinct = pd.unique(given.dropna())
    canonical = given.map(
        dict(zip(distinct, [vm_key(str(u), None) for u in distinct], strict=True))
    )
    text = names.astype(object).where(names.notna() & (names.astype(object) != ""), None)
    by_name = VM_NAME_KEY + text.dropna().astype(str)
    keys = canonical.where(canonical.notna(), by_name.reindex(given.index))
    return keys.astype(object).where(keys.notna(), None)


def with_vm_keys(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``vm_key`` made from ``vm_uuid`` and ``vm_name`` when it has none (a row
    with neither is left out by the append, counted under ``null_vm_key``)."""
    if "vm_key" in df.columns or df.empty:
        return df
    none = pd.Series(None, index=df.index, dtype=object)
    return df.assign(vm_key=vm_keys(df.get("vm_uuid", none), df.get("vm_name", none)))


def vm_rekey_sql(old: str, new: str, uuid: str | None) -> list[tuple[str, str, list[object]]]:
    """(table, statement, parameters) that give the rows of every table of ``VM_TABLES``
    under ``vm_key`` ``old`` the key ``new``, and the UUID ``uuid`` (None: none) where they
    have none. A table whose primary key holds ``vm_key`` (``policy_hits``) merges each such
    row into the one the new key may have: its counts added up, its time column the
    greatest, ``vm_uuid`` the one that is not NULL, the other columns those of the newer
    row."""
    out: list[tuple[str, str, list[object]]] = []
    if old == new:
        return out
    for spec in (TABLES[t] for t in VM_TABLES):
        table, cast = quote(spec.name), "CAST(? AS UUID)"
        if "vm_key" not in spec.primary_key:
            sql = f'UPDATE {table} SET "vm_key" = ?, "vm_uuid" = coalesce("vm_uuid", {cast}) '
            out.append((spec.name, sql + 'WHERE "vm_key" = ?', [new, uuid, old]))
            continue
        latest = quote(spec.time_column or INGEST_COLUMN)
        exprs = {"vm_key": "?", "vm_uuid": f'coalesce("vm_uuid", {cast})'}
        select = ", ".join(exprs.get(c, quote(c)) for c in spec.names)
        keys = ", ".join(quote(k) for k in spec.primary_key)

        def update(c: str, latest: str = latest) -> str:
            q = quote(c)
            if c in _SUMMED:
                return f"{q} = {q} + EXCLUDED.{q}"
            if q == latest or c == INGEST_COLUMN:
                return f"{q} = greatest({q}, EXCLUDED.{q})"
            if c == "vm_uuid":
                return f"{q} = coalesce({q}, EXCLUDED.{q})"
            return f"{q} = CASE WHEN EXCLUDED.{latest} > {latest} THEN EXCLUDED.{q} ELSE {q} END"

        updates = ", ".join(update(c) for c in spec.names if c not in spec.primary_key)
        merge = (
            f'INSERT INTO {table} SELECT {select} FROM {table} WHERE "vm_key" = ? '
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates}"
        )
        out.append((spec.name, merge, [new, uuid, old]))
        out.append((spec.name, f'DELETE FROM {table} WHERE "vm_key" = ?', [old]))
    return out
