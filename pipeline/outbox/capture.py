"""Capture triggers: let an unmodified ERP table feed the outbox (``pipeline outbox capture``).

A row-level AFTER trigger calls ``<schema>.capture_row()`` (installed by the migrations), which
emits ``<prefix>.created``, ``.updated`` or ``.deleted`` through ``outbox_emit`` in the ERP's own
transaction. Captured events without a dedicated schema are encoded with the generic
``pipeline.row_change`` record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.errors import ConfigError
from pipeline.schemas.catalogue import Catalogue

EVENTS = ("insert", "update", "delete")
_SUFFIX = {"insert": "created", "update": "updated", "delete": "deleted"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


@dataclass(frozen=True)
class CaptureSpec:
    table: str  # "sale_order" or "public.sale_order"
    aggregate_type: str
    key_column: str
    events: tuple[str, ...] = EVENTS
    event_type_prefix: str | None = None

    @property
    def prefix(self) -> str:
        return self.event_type_prefix or self.table.split(".")[-1]

    @property
    def trigger_name(self) -> str:
        return f"pipeline_capture_{self.table.split('.')[-1]}"

    def event_types(self) -> list[str]:
        return [f"{self.prefix}.{_SUFFIX[e]}" for e in self.events]


def _table_ident(table: str) -> sql.Composable:
    parts = table.split(".")
    if len(parts) > 2 or not all(_NAME.match(p) for p in parts):
        raise ConfigError(f"invalid table name {table!r}: expected table or schema.table")
    return sql.Identifier(*parts)


def validate_spec(conn: psycopg.Connection[Any], spec: CaptureSpec, catalogue: Catalogue) -> None:
    bad = [e for e in spec.events if e not in EVENTS]
    if bad or not spec.events:
        raise ConfigError(f"--events must be a subset of {','.join(EVENTS)}; got {bad or 'none'}")
    if conn.execute("SELECT to_regclass(%s)", (spec.table,)).fetchone() in (None, (None,)):
        raise ConfigError(f"table {spec.table} does not exist in this database")
    cols = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped",
        (spec.table,),
    ).fetchall()
    names = {c[0] for c in cols}
    if spec.key_column not in names:
        raise ConfigError(
            f"table {spec.table} has no column {spec.key_column!r} "
            f"(columns: {', '.join(sorted(names))})"
        )
    clash = [t for t in spec.event_types() if catalogue.has(t)]
    if clash:
        raise ConfigError(
            f"event type(s) {', '.join(clash)} already have a dedicated schema whose fields a "
            "captured row would not match; choose another --event-type-prefix "
            f"(default is the table name, {spec.table.split('.')[-1]!r})"
        )


def install_capture(
    conn: psycopg.Connection[Any], spec: CaptureSpec, schema: str, catalogue: Catalogue
) -> None:
    validate_spec(conn, spec, catalogue)
    events = sql.SQL(" OR ").join(sql.SQL(e.upper()) for e in spec.events)
    with conn.transaction():
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(spec.trigger_name), _table_ident(spec.table)
            )
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER {} ON {} FOR EACH ROW "
                "EXECUTE FUNCTION {}.capture_row({}, {}, {})"
            ).format(
                sql.Identifier(spec.trigger_name),
                events,
                _table_ident(spec.table),
                sql.Identifier(schema),
                sql.Literal(spec.aggregate_type),
                sql.Literal(spec.key_column),
                sql.Literal(spec.prefix),
            )
        )


def drop_capture(conn: psycopg.Connection[Any], table: str) -> bool:
    """Remove the capture trigger; returns False when there was none."""
    name = f"pipeline_capture_{table.split('.')[-1]}"
    exists = conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgname = %s AND tgrelid = to_regclass(%s)",
        (name, table),
    ).fetchone()
    conn.execute(
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), _table_ident(table))
    )
    return exists is not None
