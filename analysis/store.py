"""The embedded store: one DuckDB file in the data directory, no server.

``Store`` owns ``DATA_DIR/vspan.duckdb``: it creates the tables of ``store_schema`` (or
upgrades them; a file from a newer vspan is refused), appends DataFrames through DuckDB's
zero-copy ``register`` and one ``INSERT … SELECT`` each (committed before the call returns:
a row reported as stored survives a crash of the process), answers filtered queries with
parameterised SQL only (``store_sql``), and enforces retention by age and by size. Writes
go through one lock; reads use a cursor of their own, so a long query does not hold up
appends. ``store_writer.StoreWriter`` keeps the appends off the receive loop.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import duckdb
import pandas as pd
import pyarrow as pa

from vspan.inventory import InventoryView

from .store_schema import MIGRATIONS, SCHEMA_VERSION, TABLES, Table, duckdb_ddl, quote
from .store_sql import (
    FLOWS_SQL,
    StoreError,
    Where,
    events_where,
    flows_where,
    insert_sql,
    prepare,
    schema_of,
    select_sql,
    time_param,
    upsert_sql,
)

Columns = Sequence[str] | None
"""The columns a query reads (None: all)."""

__all__ = ["FILE_NAME", "RetentionResult", "Store", "StoreError", "StoreSize"]

FILE_NAME: Final = "vspan.duckdb"
_DAY_NS: Final = 86_400 * 10**9
_NULLABLE: Final = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}
"""Integer columns come back as pandas nullable integers (not floats with NaN)."""


@dataclass(frozen=True, slots=True)
class StoreSize:
    """How big the store is."""

    file_bytes: int
    """The database file and its write-ahead log, as the file system says."""
    used_bytes: int
    """Blocks holding data, plus the log; freed blocks are reused before the file grows."""


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """Rows ``apply_retention`` deleted per table, and the size after it."""

    deleted: dict[str, int]
    size: StoreSize


class Store:
    """``DATA_DIR/vspan.duckdb``: ``start()``, append and query, ``apply_retention``, ``stop()``.

    ``retention_days`` (None: forever) bounds the age of every table with a time column;
    ``max_bytes`` (None: no bound) the live data, by deleting the oldest flows.
    ``read_only`` opens an existing store without changing it (another process may read).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        retention_days: float | None = 30.0,
        max_bytes: int | None = None,
        read_only: bool = False,
    ) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self.retention_days = retention_days
        self.max_bytes = max_bytes
        self.read_only = read_only
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._open = _no_open_flows()
        """The open flows (``set_open_flows``), as every read of flows sees them."""

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Open the database, creating or upgrading its tables; refuse a newer schema."""
        if self.read_only and not self.path.exists():
            raise StoreError(f"{self.path}: no store here")
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(str(self.path), read_only=self.read_only)
        except duckdb.Error as exc:
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from exc
        try:
            self._open_schema(con)
        except BaseException:
            con.close()
            raise
        self._con = con

    def _open_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        found = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta'")
        version = 0
        if (_one(found) or (0,))[0]:
            row = _one(con.execute("SELECT value FROM meta WHERE key = 'schema_version'"))
            version = int(row[0]) if row is not None else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} was written by a newer vspan; "
                f"this one reads versions up to {SCHEMA_VERSION}"
            )
        if self.read_only or version == SCHEMA_VERSION:
            return
        con.execute("BEGIN")
        for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                con.execute(statement)
        for spec in TABLES.values():
            con.execute(duckdb_ddl(spec))
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
        con.execute("COMMIT")

    def stop(self) -> None:
        """Checkpoint and close."""
        with self._lock:
            if self._con is None:
                return
            if not self.read_only:
                self._con.execute("CHECKPOINT")
            self._con.close()
            self._con = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise StoreError(f"{self.path}: the store is not started")
        return self._con

    # --- writing ----------------------------------------------------------------------

    def append(self, table: str, df: pd.DataFrame) -> int:
        """Insert the rows of ``df`` into ``table``; committed when this returns."""
        spec = schema_of(table)
        if df.empty:
            return 0
        sql = insert_sql(spec, list(df.columns))
        if spec.primary_key:
            sql = sql.replace("INSERT INTO", "INSERT OR REPLACE INTO", 1)
        self._write(sql, prepare(spec, df))
        return len(df)

    def append_flows(self, df: pd.DataFrame, *, inventory: InventoryView | None = None) -> int:
        """Insert flow records (``records.RECORD_COLUMNS``, optionally the extra columns);
        ``flow_uid`` is generated when absent, VM UUIDs filled from ``inventory``."""
        if inventory is not None:
            uuids = {vm.name: vm.uuid for vm in inventory.vms}
            missing = [s for s in ("src", "dst") if f"{s}_vm_uuid" not in df.columns]
            df = df.assign(**{f"{s}_vm_uuid": df[f"{s}_vm"].map(uuids) for s in missing})
        return self.append("flows", df)

    def append_inventory_events(self, df: pd.DataFrame) -> int:
        return self.append("inventory_history", df)

    def append_migrations(self, df: pd.DataFrame) -> int:
        return self.append("migrations", df)

    def append_collector_counters(self, df: pd.DataFrame) -> int:
        """Counter samples; ``invalid`` holds one ``{reason: count}`` dict per row."""
        return self.append("collector_counters", df)

    def add_policy_hits(self, df: pd.DataFrame) -> int:
        """Add ``flows, packets, bytes`` per (``rule``, ``vm_uuid``) to the running totals."""
        spec = TABLES["policy_hits"]
        if df.empty:
            return 0
        given = [c for c in spec.names if c in df.columns]
        sql = upsert_sql(spec, given, ("flows", "packets", "bytes"), "last_hit")
        self._write(sql, prepare(spec, df))
        return len(df)

    def replace_ring_segment(self, segment: Mapping[str, object], keys: pd.DataFrame) -> None:
        """Record a ring segment and its keys (``kind``, ``value`` columns), atomically."""
        names, name = TABLES["ring_segments"].names, str(segment["name"])
        with self._lock:
            con = self._connection()
            con.execute("BEGIN")
            try:
                con.execute("DELETE FROM ring_segment_keys WHERE segment = ?", [name])
                con.execute(
                    f"INSERT OR REPLACE INTO ring_segments VALUES ({', '.join('?' * len(names))})",
                    [segment[c] for c in names],
                )
                con.register("incoming", keys.assign(segment=name))
                con.execute(
                    "INSERT INTO ring_segment_keys SELECT segment, kind, value FROM incoming"
                )
                con.unregister("incoming")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def forget_ring_segments(self, names: Sequence[str]) -> None:
        """Delete the rows of ring segments whose files were deleted."""
        if names:
            with self._lock:
                con = self._connection()
                con.execute(
                    "DELETE FROM ring_segment_keys WHERE list_contains(?, segment)", [names]
                )
                con.execute("DELETE FROM ring_segments WHERE list_contains(?, name)", [names])

    def _write(self, sql: str, df: pd.DataFrame) -> None:
        with self._lock:
            con = self._connection()
            con.register("incoming", df)
            try:
                con.execute(sql)
            except duckdb.Error as exc:
                raise StoreError(f"{self.path}: append failed: {exc}") from exc
            finally:
                con.unregister("incoming")

    def set_open_flows(self, df: pd.DataFrame) -> None:
        """The flows still open, as flow records (columns of ``flows``; those missing are
        null): every read through ``FLOWS`` sees them beside the stored ones, with ``state``
        ``open`` (the stored are ``closed``). Replaces the previous set; kept in memory,
        never written to the file."""
        spec = TABLES["flows"]
        unknown = [c for c in df.columns if c not in spec.names]
        if unknown:
            raise StoreError(f"open flows: table flows has no column {', '.join(unknown)}")
        missing = {c: None for c in spec.names if c not in df.columns}
        self._open = prepare(spec, df.assign(**missing)[list(spec.names)].reset_index(drop=True))

    @property
    def open_flows(self) -> pd.DataFrame:
        """The open flows as last set (``set_open_flows``)."""
        return self._open

    # --- reading ----------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[object] = ()) -> pd.DataFrame:
        """A read-only statement on a cursor of its own; nullable integers stay integers.
        ``FLOWS`` in ``sql`` reads the stored flows and the open ones."""
        with self._lock:
            cur = self._connection().cursor()
        try:
            cur.register("open_flows", self._open)
            result = cur.sql(sql, params=list(params)).to_arrow_table()
        except duckdb.Error as exc:
            raise StoreError(f"{self.path}: query failed: {exc}") from exc
        finally:
            cur.close()
        return result.to_pandas(types_mapper=_NULLABLE.get)  # type: ignore[no-any-return]

    def _select(
        self, table: str, where: Where, order: str, limit: int | None, columns: Columns = None
    ) -> pd.DataFrame:
        spec = schema_of(table)
        rows = self.query(*select_sql(spec, where, order, limit, columns))
        for col in spec.columns:  # a MAP arrives as (key, value) pairs: make it a dict
            if col.duckdb.startswith("MAP(") and col.name in rows:
                maps = [None if v is None else dict(v) for v in rows[col.name]]
                rows[col.name] = pd.Series(maps, index=rows.index, dtype=object)
        return rows

    def query_flows(
        self,
        *,
        vm: str | None = None,
        host: str | None = None,
        scope: str | None = None,
        proto: int | str | None = None,
        ip: str | None = None,
        port: int | None = None,
        since: object = None,
        until: object = None,
        limit: int | None = 1000,
        order: str = "first_ns",
        columns: Columns = None,
    ) -> pd.DataFrame:
        """Flows matching every filter given: ``vm`` (name or UUID, either side), ``host``
        (the observer, either side's host or any observer), ``ip``/``port`` (either side),
        ``since``/``until`` (flows overlapping ``[since, until)``; ns, ISO text or datetime).
        ``order`` is a column name, ``-name`` for descending; ``columns`` the columns to read
        (all by default: fewer make large reads much cheaper)."""
        where = flows_where(
            vm=vm, host=host, scope=scope, proto=proto, ip=ip, port=port, since=since, until=until
        )
        return self._select("flows", where, order, limit, columns)

    def query_inventory_history(
        self, *, vm: str | None = None, host: str | None = None, since: object = None,
        until: object = None, limit: int | None = 1000, order: str = "time",
    ) -> pd.DataFrame:  # fmt: skip
        where = events_where(vm=vm, since=since, until=until, host=host)
        return self._select("inventory_history", where, order, limit)

    def query_migrations(
        self, *, vm: str | None = None, since: object = None, until: object = None,
        limit: int | None = 1000, order: str = "time",
    ) -> pd.DataFrame:  # fmt: skip
        return self._select(
            "migrations", events_where(vm=vm, since=since, until=until), order, limit
        )

    def query_policy_hits(
        self, *, vm: str | None = None, rule: str | None = None, limit: int | None = 1000,
        order: str = "-last_hit",
    ) -> pd.DataFrame:  # fmt: skip
        return self._select("policy_hits", events_where(vm=vm, rule=rule), order, limit)

    def query_collector_counters(
        self, *, collector_id: int | None = None, since: object = None, until: object = None,
        limit: int | None = 1000, order: str = "time",
    ) -> pd.DataFrame:  # fmt: skip
        where = events_where(since=since, until=until, collector_id=collector_id)
        return self._select("collector_counters", where, order, limit)

    def flow(self, key: int | str | uuid.UUID) -> dict[str, Any]:
        """One flow record by ``flow_uid``, or by ``flow_id`` when that is unambiguous."""
        by_id = isinstance(key, int)
        where = '"flow_id" = ?' if by_id else '"flow_uid" = TRY_CAST(? AS UUID)'
        params: list[object] = [key if by_id else str(key)]
        rows = self.query(f"SELECT * FROM {FLOWS_SQL} WHERE {where} LIMIT 2", params)
        if len(rows) != 1:
            what = "no flow" if rows.empty else "more than one flow (give its flow_uid)"
            raise StoreError(f"{self.path}: {what} matches {key!r}")
        return {str(k): v for k, v in rows.iloc[0].items()}

    def count(self, table: str) -> int:
        """Rows in ``table``."""
        rows = self.query(f"SELECT count(*) AS n FROM {quote(schema_of(table).name)}")
        return int(rows["n"].iloc[0])

    # --- size and retention -----------------------------------------------------------

    def size(self) -> StoreSize:
        """The file's size and the bytes of live data (as of the last checkpoint)."""
        with self._lock:
            row = _one(self._connection().execute("PRAGMA database_size"))
        wal = Path(f"{self.path}.wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        used = int(row[2]) * int(row[4]) if row is not None else 0  # block_size * used_blocks
        return StoreSize(self.path.stat().st_size + wal_bytes, used + wal_bytes)

    def apply_retention(self, now: object) -> RetentionResult:
        """Delete rows older than ``retention_days`` before ``now``; then, if the file is over
        ``max_bytes``, the oldest flows, as many as the live data is over 90 % of it at its
        present bytes per row. Space comes back a row group (122,880 rows) at a time and
        freed blocks are reused before the file grows, so the file stays bounded."""
        deleted = dict.fromkeys(TABLES, 0)
        now_ns = int(time_param(now).value)
        if self.retention_days is not None:
            cutoff = now_ns - int(self.retention_days * _DAY_NS)
            for spec in TABLES.values():
                if spec.time_column is not None:
                    deleted[spec.name] += self._delete_before(spec, cutoff)
        self._checkpoint()
        size, rows = self.size(), self.count("flows")
        if self.max_bytes is not None and size.file_bytes > self.max_bytes and rows:
            keep = int(rows * min(1.0, self.max_bytes * 0.9 / max(size.used_bytes, 1)))
            if keep < rows:
                nth = self.query(
                    "SELECT last_ns FROM flows ORDER BY last_ns DESC LIMIT 1 OFFSET ?", [keep]
                )
                cutoff = int(nth["last_ns"].iloc[0]) + 1
                deleted["flows"] += self._delete_before(TABLES["flows"], cutoff)
                self._checkpoint()
                size = self.size()
        return RetentionResult({k: v for k, v in deleted.items() if v}, size)

    def _delete_before(self, spec: Table, cutoff_ns: int) -> int:
        col = spec.column(spec.time_column or "")
        value: object = cutoff_ns if col.duckdb == "BIGINT" else time_param(cutoff_ns)
        with self._lock:
            row = _one(
                self._connection().execute(
                    f"DELETE FROM {quote(spec.name)} WHERE {quote(col.name)} < ?", [value]
                )
            )
        return int(row[0]) if row is not None else 0

    def _checkpoint(self) -> None:
        with self._lock:
            self._connection().execute("CHECKPOINT")


def _no_open_flows() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in TABLES["flows"].names})


def _one(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """The first row of a result, reading it to the end: ``fetchone`` would leave the result
    open, and DuckDB refuses the connection's next statement until it is finished."""
    rows = result.fetchall()
    return tuple(rows[0]) if rows else None
