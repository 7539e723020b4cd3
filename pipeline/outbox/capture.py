"""Capture triggers: let an unmodified ERP table feed the outbox (``pipeline outbox capture``).

A row-level AFTER trigger calls ``<schema>.capture_row_v2()`` (installed by the migrations),
which emits ``<prefix>.created``, ``.updated`` or ``.deleted`` through ``outbox_emit`` in the ERP's
own transaction, and a statement-level one ``<prefix>.truncated``. The key is the primary key
(or ``--key-column``, NOT NULL): one column's text, or the JSON array of several columns' texts;
bytea columns travel as base64. Captured events without a dedicated schema are encoded with
the generic ``pipeline.row_change`` record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.errors import ConfigError
from pipeline.schemas.catalogue import Catalogue

EVENTS = ("insert", "update", "delete", "truncate")
_SUFFIX = {"insert": "created", "update": "updated", "delete": "deleted", "truncate": "truncated"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_AGGREGATE = re.compile(r"^[A-Za-z0-9_-]+$")  # the outbox's own CHECK (a topic name part)
_PREFIX = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class CaptureSpec:
    table: str  # "sale_order" or "public.sale_order"
    aggregate_type: str
    key_columns: tuple[str, ...] = ()  # () = the table's primary key
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


@dataclass(frozen=True)
class Resolved:
    key_columns: tuple[str, ...]
    bytea_columns: tuple[str, ...]


def validate_spec(conn: psycopg.Connection[Any], spec: CaptureSpec, catalogue: Catalogue,
                  schema: str = "pipeline") -> Resolved:
    """Everything that would make the trigger fail an ERP write later is refused now."""
    bad = [e for e in spec.events if e not in EVENTS]
    if bad or not spec.events:
        raise ConfigError(f"--events must be a subset of {','.join(EVENTS)}; got {bad or 'none'}")
    if not _AGGREGATE.match(spec.aggregate_type):
        raise ConfigError(
            f"aggregate type {spec.aggregate_type!r} is not allowed: letters, digits, _ and - "
            "only (it names the topic <prefix>.<aggregate_type>; the outbox refuses others, "
            "so every write of the table would fail)"
        )
    if not _PREFIX.match(spec.prefix):
        raise ConfigError(
            f"event type prefix {spec.prefix!r} is not allowed: letters, digits, _, . and - "
            "(event types are <prefix>.created …)"
        )
    _table_ident(spec.table)
    fn = conn.execute("SELECT to_regprocedure(%s)", (f"{schema}.capture_row_v2()",)).fetchone()
    if fn in (None, (None,)):
        raise ConfigError(
            f"the outbox is not installed (or is older) in schema {schema!r} of this database: "
            "run `pipeline outbox install` first, then capture"
        )
    if conn.execute("SELECT to_regclass(%s)", (spec.table,)).fetchone() in (None, (None,)):
        raise ConfigError(f"table {spec.table} does not exist in this database")
    cols = {
        r[0]: (r[1], r[2])
        for r in conn.execute(
            "SELECT attname, attnotnull, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (spec.table,),
        ).fetchall()
    }
    keys = spec.key_columns
    if not keys:
        keys = tuple(
            r[0]
            for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY "
                "AS k(attnum, n) ON true JOIN pg_attribute a ON a.attrelid = i.indrelid AND "
                "a.attnum = k.attnum WHERE i.indrelid = %s::regclass AND i.indisprimary "
                "ORDER BY k.n",
                (spec.table,),
            ).fetchall()
        )
    check_keys(spec, spec.table, keys, {c: not nn for c, (nn, _t) in cols.items()}, catalogue)
    binary = tuple(sorted(c for c, (_nn, t) in cols.items() if t == "bytea"))
    return Resolved(keys, binary)


def check_keys(spec: CaptureSpec, table: str, keys: tuple[str, ...],
               nullable: dict[str, bool], catalogue: Catalogue) -> None:
    """The refusals both databases share: no key, a key column missing or nullable, event
    types that collide with the catalogue. ``nullable``: every column of the table."""
    if not keys:
        raise ConfigError(
            f"table {table} has no primary key: name its key with --key-column "
            "(one column, or several comma-separated, all NOT NULL)"
        )
    missing = [k for k in keys if k not in nullable]
    if missing:
        raise ConfigError(
            f"table {table} has no column(s) {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(sorted(nullable))})"
        )
    can_be_null = [k for k in keys if nullable[k]]
    if can_be_null:
        raise ConfigError(
            f"key column(s) {', '.join(can_be_null)} of {table} can be NULL: a row without a "
            "key cannot be an event, and the trigger would have to fail the ERP's write. Make "
            "them NOT NULL, or capture by the primary key (leave --key-column out)"
        )
    clash = [t for t in spec.event_types() if catalogue.has(t)]
    if clash:
        raise ConfigError(
            f"event type(s) {', '.join(clash)} already have a dedicated schema whose fields a "
            "captured row would not match; choose another --event-type-prefix "
            f"(default is the table name, {table.split('.')[-1]!r})"
        )


def install_capture(
    conn: psycopg.Connection[Any], spec: CaptureSpec, schema: str, catalogue: Catalogue
) -> Resolved:
    got = validate_spec(conn, spec, catalogue, schema)
    rows = [e for e in spec.events if e != "truncate"]
    args = sql.SQL(", ").join(
        sql.Literal(a)
        for a in (spec.aggregate_type, ",".join(got.key_columns), spec.prefix,
                  ",".join(got.bytea_columns))
    )
    table = _table_ident(spec.table)
    with conn.transaction():
        for name in (spec.trigger_name, spec.trigger_name + "_truncate"):
            conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), table)
            )
        if rows:
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} AFTER {} ON {} FOR EACH ROW "
                    "EXECUTE FUNCTION {}.capture_row_v2({})"
                ).format(
                    sql.Identifier(spec.trigger_name),
                    sql.SQL(" OR ").join(sql.SQL(e.upper()) for e in rows),
                    table,
                    sql.Identifier(schema),
                    args,
                )
            )
        if "truncate" in spec.events:
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT "
                    "EXECUTE FUNCTION {}.capture_row_v2({})"
                ).format(
                    sql.Identifier(spec.trigger_name + "_truncate"),
                    table,
                    sql.Identifier(schema),
                    args,
                )
            )
    return got


def drop_capture(conn: psycopg.Connection[Any], table: str) -> bool:
    """Remove the capture triggers; returns False when there was none."""
    name = f"pipeline_capture_{table.split('.')[-1]}"
    exists = conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgname IN (%s, %s) AND tgrelid = to_regclass(%s)",
        (name, name + "_truncate", table),
    ).fetchone()
    for n in (name, name + "_truncate"):
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(n),
                                                             _table_ident(table))
        )
    return exists is not None
