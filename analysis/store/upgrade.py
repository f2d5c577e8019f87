"""Upgrading a store file: the statements that take schema version ``k`` to ``k + 1``
(``MIGRATIONS``), run in order by ``Store.start`` in one transaction per step; a read-only
store of an older version is refused until a writer has upgraded it."""

from __future__ import annotations

from typing import Final

from vspan.analysis.store.schema import INGEST_COLUMN

__all__ = ["MIGRATIONS"]


def _rebuilt(table: str, columns: str, select: str) -> tuple[str, ...]:
    """``table`` made again with ``columns`` (DDL), its rows copied by ``select`` (``{key}``:
    the row's UUID as ``vm_key``; ``{ingest}``: its ``ingest_time``, or now)."""
    exprs = select.format(
        key='CAST("vm_uuid" AS VARCHAR)', ingest=f'coalesce("{INGEST_COLUMN}", now())'
    )
    return (
        f'CREATE TABLE "{table}_v5" ({columns})',
        f'INSERT INTO "{table}_v5" SELECT {exprs} FROM "{table}"',
        f'DROP TABLE "{table}"',
        f'ALTER TABLE "{table}_v5" RENAME TO "{table}"',
    )


_AGED: Final = ("flows", "inventory_history", "migrations", "policy_hits", "collector_counters")
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: ('ALTER TABLE flows ADD COLUMN "delay_us" DOUBLE',),
    # Rows stored before version 3 have no ingest time: they count as ingested at the
    # upgrade, so that retention never deletes them earlier than it would have by age.
    # (The column stays without NOT NULL in an upgraded file: DuckDB refuses the
    # constraint in the transaction that filled it on a table with a primary key. The
    # store writes it on every row, and a row without it is refused before the insert.)
    2: tuple(
        statement
        for table in _AGED
        for statement in (
            f'ALTER TABLE "{table}" ADD COLUMN "{INGEST_COLUMN}" TIMESTAMPTZ',
            f'UPDATE "{table}" SET "{INGEST_COLUMN}" = now()',
        )
    ),
    3: ('ALTER TABLE collector_counters ADD COLUMN "kernel" UBIGINT',),
    # A VM without a UUID keeps its rows too: each table gets ``vm_key`` (a version 4 row's
    # UUID), ``vm_uuid`` may be NULL, policy hits are keyed by (rule, vm_key). DuckDB moves
    # no column and changes no primary key: each table is made again as version 5 makes it.
    4: (
        *_rebuilt(
            "inventory_history",
            '"time" TIMESTAMPTZ NOT NULL, "host" VARCHAR NOT NULL, "vm_key" VARCHAR NOT NULL, '
            '"vm_uuid" UUID, "vm_name" VARCHAR, "vif" INTEGER, "mac" VARCHAR, "profile" VARCHAR, '
            "\"event\" VARCHAR NOT NULL CHECK (\"event\" IN ('added', 'removed', 'changed')), "
            '"ingest_time" TIMESTAMPTZ NOT NULL',
            '"time", "host", {key}, "vm_uuid", "vm_name", "vif", "mac", "profile", "event", '
            "{ingest}",
        ),
        *_rebuilt(
            "migrations",
            '"time" TIMESTAMPTZ NOT NULL, "vm_key" VARCHAR NOT NULL, "vm_uuid" UUID, '
            '"vm_name" VARCHAR, "from_host" VARCHAR, "to_host" VARCHAR NOT NULL, '
            "\"source\" VARCHAR NOT NULL CHECK (\"source\" IN ('inventory', 'dataplane')), "
            '"ingest_time" TIMESTAMPTZ NOT NULL',
            '"time", {key}, "vm_uuid", "vm_name", "from_host", "to_host", "source", {ingest}',
        ),
        *_rebuilt(
            "policy_hits",
            '"rule" VARCHAR NOT NULL, "vm_key" VARCHAR NOT NULL, "vm_uuid" UUID, '
            '"vm_name" VARCHAR, "verdict" VARCHAR, "flows" UBIGINT NOT NULL, '
            '"packets" UBIGINT NOT NULL, "bytes" UBIGINT NOT NULL, '
            '"last_hit" TIMESTAMPTZ NOT NULL, "ingest_time" TIMESTAMPTZ NOT NULL, '
            'PRIMARY KEY ("rule", "vm_key")',
            '"rule", {key}, "vm_uuid", "vm_name", "verdict", "flows", "packets", "bytes", '
            '"last_hit", {ingest}',
        ),
    ),
    # What a restarted analyzer needs to resume each collector's sequence, and the cause of
    # loss it then finds (rows of version 5 have them NULL: nothing is resumed from those).
    5: tuple(
        f'ALTER TABLE collector_counters ADD COLUMN "{name}" {kind}'
        for name, kind in (
            ("highest_seq", "UINTEGER"),
            ("last_seen", "TIMESTAMPTZ"),
            ("missed_while_down", "UBIGINT"),
            ("stale", "UBIGINT"),
        )
    ),
}
"""Statements that upgrade version ``k`` to ``k + 1``."""
