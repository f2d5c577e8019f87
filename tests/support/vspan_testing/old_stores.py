"""Stores as earlier versions of vspan wrote them, made from a store of today.

``as_written_by(path, version)`` turns the store in ``path`` into what vspan wrote at schema
``version``: version 5 had no ``collector_counters.highest_seq``, ``last_seen``,
``missed_while_down`` nor ``stale`` (``V6_COUNTER_COLUMNS``); version 4 kept ``inventory_history``, ``migrations`` and ``policy_hits`` by a
``vm_uuid`` that could not be NULL (``V4_TABLES``, the DDL vspan 4 ran, word for word; those
tables come back empty), version 3 had no ``collector_counters.kernel``, version 2 no
``ingest_time`` either, version 1 no ``flows.delay_us`` either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import duckdb

from vspan.analysis.store.schema import TABLES

__all__ = ["V4_TABLES", "V6_COUNTER_COLUMNS", "as_written_by"]

V6_COUNTER_COLUMNS: Final = ("highest_seq", "last_seen", "missed_while_down", "stale")
"""The columns version 6 added to ``collector_counters``."""

V4_TABLES: Final = {
    "inventory_history": """CREATE TABLE IF NOT EXISTS "inventory_history" (
    "time" TIMESTAMPTZ NOT NULL,
    "host" VARCHAR NOT NULL,
    "vm_uuid" UUID NOT NULL,
    "vm_name" VARCHAR,
    "vif" INTEGER,
    "mac" VARCHAR,
    "profile" VARCHAR,
    "event" VARCHAR NOT NULL CHECK ("event" IN ('added', 'removed', 'changed')),
    "ingest_time" TIMESTAMPTZ NOT NULL
)""",
    "migrations": """CREATE TABLE IF NOT EXISTS "migrations" (
    "time" TIMESTAMPTZ NOT NULL,
    "vm_uuid" UUID NOT NULL,
    "vm_name" VARCHAR,
    "from_host" VARCHAR,
    "to_host" VARCHAR NOT NULL,
    "source" VARCHAR NOT NULL CHECK ("source" IN ('inventory', 'dataplane')),
    "ingest_time" TIMESTAMPTZ NOT NULL
)""",
    "policy_hits": """CREATE TABLE IF NOT EXISTS "policy_hits" (
    "rule" VARCHAR NOT NULL,
    "vm_uuid" UUID NOT NULL,
    "vm_name" VARCHAR,
    "verdict" VARCHAR,
    "flows" UBIGINT NOT NULL,
    "packets" UBIGINT NOT NULL,
    "bytes" UBIGINT NOT NULL,
    "last_hit" TIMESTAMPTZ NOT NULL,
    "ingest_time" TIMESTAMPTZ NOT NULL,
    PRIMARY KEY ("rule", "vm_uuid")
)""",
}
"""The tables of schema 4 that version 5 changed, as ``store.schema.duckdb_ddl`` made them."""


def as_written_by(path: Path, version: int) -> None:
    """The store in ``path`` (closed) as vspan wrote it at schema ``version`` (1..5)."""
    con = duckdb.connect(str(path / "vspan.duckdb"))
    for column in V6_COUNTER_COLUMNS:
        con.execute(f'ALTER TABLE collector_counters DROP COLUMN "{column}"')
    for table, ddl in V4_TABLES.items():
        if version <= 4:
            con.execute(f'DROP TABLE "{table}"')
            con.execute(ddl)
    if version <= 3:
        con.execute('ALTER TABLE collector_counters DROP COLUMN "kernel"')
    for table in TABLES.values():
        if "ingest_time" in table.names and version <= 2:
            con.execute(f'ALTER TABLE "{table.name}" DROP COLUMN "ingest_time"')
    if version == 1:
        con.execute('ALTER TABLE flows DROP COLUMN "delay_us"')
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])
    con.close()
