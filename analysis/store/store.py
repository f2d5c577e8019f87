"""The embedded store: one DuckDB file in the data directory, no server.

``Store`` owns ``DATA_DIR/vspan.duckdb``: it creates the tables of ``store.schema`` (or
upgrades them; a file from a newer vspan is refused), appends DataFrames through DuckDB's
zero-copy ``register`` and one ``INSERT … SELECT`` each (committed before the call returns:
a row reported as stored survives a crash of the process), answers filtered queries with
parameterised SQL only (``store.sql``), and enforces retention by age and by size. Writes
go through one lock; reads use a cursor of their own, so a long query does not hold up
appends. ``store.writer.StoreWriter`` keeps the appends off the receive loop.

An append never fails as a whole for a bad value: ``store.append.prepare`` checks every
column first (a value that does not fit a nullable column becomes NULL, a row that cannot
be stored is left out, each counted by column or reason), and an insert the database still
refuses is split in halves until only the rows it refuses are left out
(``refused_<error>``). ``AppendResult`` says what was written and what was not; the same
counts add up in ``counters()`` and are logged. Every row carries the time the store wrote
it (``ingest_time``, from ``clock``); retention deletes rows by that time, or by their
capture time with ``retention_basis="capture"``, and each deletion is counted and logged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import duckdb
import pandas as pd
import pyarrow as pa

from vspan.analysis.store.append import AppendResult, StoreCounts, insert_in_parts, prepare
from vspan.analysis.store.schema import (
    INGEST_COLUMN,
    RETENTION_BASES,
    SCHEMA_VERSION,
    TABLES,
    Table,
    duckdb_ddl,
    quote,
)
from vspan.analysis.store.sql import (
    FLOWS_SQL,
    StoreError,
    Where,
    events_where,
    flows_where,
    insert_sql,
    schema_of,
    select_sql,
    upsert_sql,
    vm_rekey_sql,
    with_vm_keys,
)
from vspan.analysis.store.upgrade import MIGRATIONS
from vspan.inventory import InventoryView

if TYPE_CHECKING:
    from vspan.analysis.store.retention import RetentionResult

Columns = Sequence[str] | None
"""The columns a query reads (None: all)."""

__all__ = [
    "FILE_NAME",
    "RETENTION_BASES",
    "AppendResult",
    "Store",
    "StoreError",
    "StoreSize",
]

log = logging.getLogger("vspan.store")

FILE_NAME: Final = "vspan.duckdb"
_ROW_ERRORS: Final = (duckdb.DataError, duckdb.IntegrityError, duckdb.InvalidInputException)
"""What the database says about the values of a row (split the insert to find the rows);
anything else (I/O, a closed file) fails the append as a whole."""
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


class Store:
    """``DATA_DIR/vspan.duckdb``: ``start()``, append and query, ``apply_retention``, ``stop()``.

    ``retention_days`` (None: forever) bounds the age of every table with a time column;
    ``max_bytes`` (None: no bound) the live data, by deleting the oldest flows. The age is
    counted from ``ingest_time`` (``retention_basis="ingest"``: a capture replayed today
    is kept as long as today's traffic) or from the rows' own time (``"capture"``).
    ``clock`` gives the ingest time of appended rows (seconds since the epoch).
    ``read_only`` opens an existing store without changing it (another process may read).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        retention_days: float | None = 30.0,
        max_bytes: int | None = None,
        retention_basis: str = "ingest",
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
    ) -> None:
        if retention_basis not in RETENTION_BASES:
            raise StoreError(
                f"retention_basis {retention_basis!r}: expected one of {list(RETENTION_BASES)}"
            )
        self.path = Path(data_dir) / FILE_NAME
        self.retention_days = retention_days
        self.max_bytes = max_bytes
        self.retention_basis = retention_basis
        self.clock = clock
        self.read_only = read_only
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._open = _no_open_flows()
        """The open flows (``set_open_flows``), as every read of flows sees them."""

        self._counts = StoreCounts()

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
        if self.read_only and 0 < version < SCHEMA_VERSION:  # its tables are not ours
            old = f"{self.path}: schema version {version} was written by an older vspan"
            raise StoreError(f"{old}; open it for writing once (vspan analyze) to upgrade it")
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

    def append(self, table: str, df: pd.DataFrame) -> AppendResult:
        """Insert the rows of ``df`` into ``table``; committed when this returns. Values
        and rows that cannot be stored are counted in the result, not raised; a
        ``StoreError`` means nothing could be written (unknown or missing columns, I/O)."""
        spec = schema_of(table)
        if df.empty:
            return AppendResult(0)
        df = self._stamped(spec, df)
        sql = insert_sql(spec, list(df.columns))
        if spec.primary_key:
            sql = sql.replace("INSERT INTO", "INSERT OR REPLACE INTO", 1)
        return self._insert(spec, sql, df)

    def append_flows(
        self, df: pd.DataFrame, *, inventory: InventoryView | None = None
    ) -> AppendResult:
        """Insert flow records (``records.RECORD_COLUMNS``, optionally the extra columns);
        ``flow_uid`` is generated when absent, VM UUIDs filled from ``inventory`` (NULL for
        a VM that has none)."""
        if inventory is not None:
            uuids = {vm.name: vm.uuid for vm in inventory.vms}
            missing = [s for s in ("src", "dst") if f"{s}_vm_uuid" not in df.columns]
            df = df.assign(**{f"{s}_vm_uuid": df[f"{s}_vm"].map(uuids) for s in missing})
        return self.append("flows", df)

    def append_inventory_events(self, df: pd.DataFrame) -> AppendResult:
        return self.append("inventory_history", df)

    def append_migrations(self, df: pd.DataFrame) -> AppendResult:
        return self.append("migrations", df)

    def append_collector_counters(self, df: pd.DataFrame) -> AppendResult:
        """Counter samples; ``invalid`` holds one ``{reason: count}`` dict per row."""
        return self.append("collector_counters", df)

    def add_policy_hits(self, df: pd.DataFrame) -> AppendResult:
        """Add ``flows, packets, bytes`` per (``rule``, ``vm_key``) to the running totals."""
        spec = TABLES["policy_hits"]
        if df.empty:
            return AppendResult(0)
        df = self._stamped(spec, df)
        given = [c for c in spec.names if c in df.columns]
        sql = upsert_sql(spec, given, ("flows", "packets", "bytes"), "last_hit")
        return self._insert(spec, sql, df)

    def rekey_vm(self, old: str, new: str, uuid: str | None = None) -> dict[str, int]:
        """The rows of the VM ``old`` (a ``vm_key``) moved to the key ``new``, with ``uuid``
        (``store.sql.vm_rekey_sql``), in one transaction; the rows moved per table."""
        moved: dict[str, int] = {}
        with self.transaction() as con:
            for table, sql, params in vm_rekey_sql(old, new, uuid):
                row = _one(con.execute(sql, params))
                moved[table] = max(moved.get(table, 0), int(row[0]) if row else 0)
        if moved := {table: n for table, n in moved.items() if n}:
            rows = ", ".join(f"{table} {n}" for table, n in moved.items())
            log.info("store: VM %s is now %s: its rows moved (%s)", old, new, rows)
        return moved

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The connection under the store's lock, in one transaction: committed at the end,
        rolled back on an error."""
        with self._lock:
            con = self._connection()
            con.execute("BEGIN")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def counters(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per kind, table and reason, since ``start``: rows ``written``, values
        ``coerced`` to NULL (by column), rows ``rejected`` (by reason) and rows ``deleted``
        (``age``: older than the retention; ``size``: over ``max_bytes``)."""
        return self._counts.snapshot()

    def _stamped(self, spec: Table, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` with the ingest time of now, in the tables that keep one, and with its
        VMs' ``vm_key`` (``store.sql.with_vm_keys``) in those that keep rows per VM."""
        df = with_vm_keys(df) if "vm_key" in spec.names else df
        if INGEST_COLUMN not in spec.names:
            return df
        now = pd.Timestamp(int(self.clock() * 1e9), unit="ns", tz="UTC")
        return df.assign(**{INGEST_COLUMN: now})

    def _insert(self, spec: Table, sql: str, df: pd.DataFrame) -> AppendResult:
        """Check the values, insert what fits; count what did not (``StoreCounts``)."""
        ready = prepare(spec, df)
        try:
            written, refused, error = insert_in_parts(
                functools.partial(self._write, sql), ready.frame, refused_by=_ROW_ERRORS
            )
        except duckdb.Error as exc:
            raise StoreError(f"{self.path}: append to {spec.name} failed: {exc}") from exc
        result = AppendResult(written, ready.coerced, ready.rejected | refused)
        self._counts.appended(spec.name, result, error)
        return result

    def replace_ring_segment(self, segment: Mapping[str, object], keys: pd.DataFrame) -> None:
        """Record a ring segment and its keys (``kind``, ``value`` columns), atomically."""
        names, name = TABLES["ring_segments"].names, str(segment["name"])
        with self.transaction() as con:
            con.execute("DELETE FROM ring_segment_keys WHERE segment = ?", [name])
            con.execute(
                f"INSERT OR REPLACE INTO ring_segments VALUES ({', '.join('?' * len(names))})",
                [segment[c] for c in names],
            )
            con.register("incoming", keys.assign(segment=name))
            con.execute("INSERT INTO ring_segment_keys SELECT segment, kind, value FROM incoming")
            con.unregister("incoming")

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
        """One statement over ``df`` as ``incoming`` (raises DuckDB's own errors)."""
        with self._lock:
            con = self._connection()
            con.register("incoming", df)
            try:
                con.execute(sql)
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
        frame = df.assign(**missing)[list(spec.names)].reset_index(drop=True)
        for col in spec.columns:  # our own records: only the times need converting
            if col.duckdb == "TIMESTAMPTZ" and pd.api.types.is_integer_dtype(frame[col.name]):
                frame[col.name] = pd.to_datetime(frame[col.name], unit="ns", utc=True)
        self._open = frame

    def stored_flow_uids(self, uids: Sequence[str]) -> set[str]:
        """Those of ``uids`` that a stored flow has."""
        if not uids:
            return set()
        found = self.query(
            "SELECT CAST(flow_uid AS VARCHAR) AS u FROM flows "
            "WHERE flow_uid IN (SELECT TRY_CAST(unnest(?) AS UUID))",
            [list(uids)],
        )
        return set(found["u"].astype(str))

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
        self, *, vm: str | None = None, vm_key: str | None = None, host: str | None = None,
        since: object = None, until: object = None, limit: int | None = 1000,
        order: str = "time",
    ) -> pd.DataFrame:  # fmt: skip
        """``vm``: by UUID or a name it has had; ``vm_key``: exactly (so in the next two)."""
        where = events_where(vm=vm, since=since, until=until, host=host, vm_key=vm_key)
        return self._select("inventory_history", where, order, limit)

    def query_migrations(
        self, *, vm: str | None = None, vm_key: str | None = None, since: object = None,
        until: object = None, limit: int | None = 1000, order: str = "time",
    ) -> pd.DataFrame:  # fmt: skip
        where = events_where(vm=vm, since=since, until=until, vm_key=vm_key)
        return self._select("migrations", where, order, limit)

    def query_policy_hits(
        self, *, vm: str | None = None, vm_key: str | None = None, rule: str | None = None,
        limit: int | None = 1000, order: str = "-last_hit",
    ) -> pd.DataFrame:  # fmt: skip
        where = events_where(vm=vm, rule=rule, vm_key=vm_key)
        return self._select("policy_hits", where, order, limit)

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
        """Delete what ``retention_days`` and ``max_bytes`` say is too old or too much
        (``retention.apply_retention``)."""
        from vspan.analysis.store.retention import apply_retention

        return apply_retention(self, now)

    def execute(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        """Run one statement under the store's lock; its first row (read to the end)."""
        with self._lock:
            return _one(self._connection().execute(sql, list(params)))

    def count_deleted(self, table: str, why: str, rows: int) -> None:
        """Count rows retention deleted from ``table`` (``counters()["deleted"]``)."""
        self._counts.add("deleted", table, {why: rows})

    def checkpoint(self) -> None:
        """Write the log into the file (freed blocks become reusable)."""
        self._checkpoint()

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
