"""BI landing into PostgreSQL: one typed table per event type, a raw ``events`` table, and the
consumed positions, all written by one transaction per batch (exactly once, no per-row lookup).

Tables, in the configured schema (default ``bi``)::

    events            every event: ids, type, aggregate, version, times, Kafka position,
                      the other headers and the payload as jsonb
    <event_type>      e.g. order_created: the _-prefixed metadata columns, then one typed column
                      per top-level field (numeric(18,2), timestamptz, date …; nested → jsonb)
    _positions        (consumer, topic, partition) → next offset to consume

A batch: the partitions' positions are moved by compare-and-set first (which also locks them
against a second writer), the rows are COPYed, rejected rows are dead-lettered, then one COMMIT.
A value PostgreSQL refuses (a NUL character in a string, say) fails the COPY: the batch is
written again row by row under savepoints, and only the refused rows are rejected.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from connectors.bi.columns import (
    BOOLEAN,
    BYTES,
    DATE,
    DECIMAL,
    DOUBLE,
    FLOAT,
    INT,
    JSON,
    LOCAL_TIMESTAMP,
    LONG,
    META,
    STRING,
    TIME,
    TIMESTAMP,
    UUID,
    Column,
    columns_of,
    merge,
    table_name,
    to_json,
)
from pipeline.db import database_url
from pipeline.errors import ConfigError, DatabaseUnavailable, PermanentError
from pipeline.kafka import names
from pipeline.sink.target import TP, Batch, BeforeCommit, PositionConflict, Rejected
from pipeline.worker.connector import Event

if TYPE_CHECKING:
    from pipeline.config import Settings

log = logging.getLogger("connectors.bi")

_PG_TYPES = {
    STRING: "text", INT: "integer", LONG: "bigint", FLOAT: "real", DOUBLE: "double precision",
    BOOLEAN: "boolean", BYTES: "bytea", DATE: "date", TIME: "time",
    TIMESTAMP: "timestamptz", LOCAL_TIMESTAMP: "timestamp", UUID: "uuid", JSON: "jsonb",
}
_RAW_COLUMNS = ("event_id", "event_type", "aggregate_type", "aggregate_id", "aggregate_version",
                "occurred_at", "schema_version", "topic", "partition", "offset",
                "kafka_timestamp", "traceparent", "headers", "payload")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# a COPY statement and its rows
Prepared = tuple[sql.Composed, Sequence[Sequence[Any]]]


def copy_rows(conn: psycopg.Connection[Any], prepared: Iterable[Prepared]) -> None:
    """Run COPY statements with their rows (text format; psycopg's C row writer)."""
    for stmt, rows in prepared:
        with conn.cursor().copy(stmt) as copy:
            for row in rows:
                copy.write_row(row)


class RowRefused(PermanentError):
    """PostgreSQL refused an event's row (a value its column cannot hold)."""


def pg_type(col: Column) -> str:
    if col.kind == DECIMAL:
        return f"numeric({col.precision},{col.scale})" if col.precision else "numeric"
    return _PG_TYPES[col.kind]


class PostgresTarget:
    """``options``: ``url`` (default: ``database.url``), ``schema`` (default ``bi``),
    ``raw`` (the raw ``events`` table, default on), ``typed`` (per-type tables, default on)."""

    name = "postgres"

    def __init__(self, url: str | None = None, schema: str = "bi", raw: bool = True,
                 typed: bool = True) -> None:
        if not raw and not typed:
            raise ConfigError("the BI PostgreSQL target needs raw or typed tables (both off)")
        self.url = url
        self.schema = schema
        self.raw = raw
        self.typed = typed
        self._conn: psycopg.Connection[Any] | None = None
        self._tables: dict[str, dict[str, Column]] = {}  # table → its columns (as created)
        self._seen: set[tuple[str, int]] = set()  # (event type, schema fingerprint) checked

    # -- connection -----------------------------------------------------------------------------
    def open(self, settings: Settings, consumer: str) -> None:
        if not self.url:
            if not settings.database.url:
                raise ConfigError(
                    "the BI PostgreSQL target needs a database: set workers.<name>.options.url "
                    "or database.url"
                )
            self.url = database_url(settings)
        self._connect()
        self._ensure_base()

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        assert self.url is not None
        try:
            self._conn = psycopg.connect(self.url, connect_timeout=5,
                                         application_name="pipeline-bi")
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"BI database unreachable: {exc}".strip()) from exc
        self._tables.clear()
        self._seen.clear()
        return self._conn

    def _transient(self, exc: psycopg.Error) -> DatabaseUnavailable:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        return DatabaseUnavailable(f"BI database: {type(exc).__name__}: {exc}".strip())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- DDL --------------------------------------------------------------------------------------
    def _ensure_base(self) -> None:
        conn = self._connect()
        s = sql.Identifier(self.schema)
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
                conn.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}._positions (consumer text NOT NULL, "
                    "topic text NOT NULL, partition integer NOT NULL, next_offset bigint NOT "
                    "NULL, updated_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (consumer, topic, partition))").format(s))
                if self.raw:
                    conn.execute(sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}.events (event_id text NOT NULL, "
                        "event_type text NOT NULL, aggregate_type text NOT NULL, aggregate_id "
                        "text NOT NULL, aggregate_version bigint NOT NULL, occurred_at "
                        "timestamptz, schema_version integer, topic text NOT NULL, partition "
                        "integer NOT NULL, \"offset\" bigint NOT NULL, kafka_timestamp "
                        "timestamptz, traceparent text, headers jsonb NOT NULL, payload jsonb "
                        "NOT NULL, landed_at timestamptz NOT NULL DEFAULT now())").format(s))
        except psycopg.OperationalError as exc:
            raise self._transient(exc) from exc
        except psycopg.Error as exc:
            raise ConfigError(
                f"cannot create the BI tables in schema {self.schema!r}: {exc}; the database "
                "user needs CREATE on the database (or create the schema for it)"
            ) from exc
        self._load_tables()

    def _load_tables(self) -> None:
        conn = self._connect()
        rows = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s ORDER BY table_name, ordinal_position", (self.schema,)
        ).fetchall()
        conn.commit()
        tables: dict[str, dict[str, Column]] = defaultdict(dict)
        kinds = {v: k for k, v in _PG_TYPES.items()}
        kinds.update({"numeric": DECIMAL, "timestamp with time zone": TIMESTAMP,
                      "timestamp without time zone": LOCAL_TIMESTAMP,
                      "time without time zone": TIME})
        for table, column, data_type in rows:
            tables[table][column] = Column(column, kinds.get(data_type, JSON))
        self._tables = dict(tables)

    def _ensure_table(self, event: Event) -> None:
        """Create the event type's table, or add/widen the columns a new schema brings."""
        schema = event.schema
        assert schema is not None
        seen = (event.event_type, schema.fingerprint)
        if seen in self._seen:
            return
        table = table_name(event.event_type)
        fields = columns_of(schema)
        conn = self._connect()
        ident = sql.Identifier(self.schema, table)
        with conn.transaction():
            existing = self._tables.get(table)
            if existing is None:
                cols: list[sql.Composable] = [sql.SQL("{} {}{}").format(
                    sql.Identifier(c.name), sql.SQL(pg_type(c)),
                    sql.SQL("" if c.nullable else " NOT NULL")) for c in META]
                cols += [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(pg_type(c)))
                         for c in fields]
                cols.append(sql.SQL("_landed_at timestamptz NOT NULL DEFAULT now()"))
                conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                    ident, sql.SQL(", ").join(cols)))
                if schema.raw.get("doc"):
                    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
                        ident, sql.Literal(str(schema.raw["doc"]))))
                log.info("BI table %s.%s created for %s", self.schema, table, event.event_type)
            else:
                added, widened = merge(existing.values(), fields)
                for c in added:
                    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        ident, sql.Identifier(c.name), sql.SQL(pg_type(c))))
                    log.info("BI table %s.%s: column %s %s added (schema %s v%d)", self.schema,
                             table, c.name, pg_type(c), event.event_type, schema.version)
                for c in widened:
                    conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
                        ident, sql.Identifier(c.name), sql.SQL(pg_type(c))))
                    log.info("BI table %s.%s: column %s widened to %s", self.schema, table,
                             c.name, pg_type(c))
        if existing is None or added or widened:
            self._load_tables()
        self._seen.add(seen)

    # -- positions --------------------------------------------------------------------------------
    def positions(self, consumer: str, tps: Sequence[TP]) -> dict[TP, int | None]:
        try:
            conn = self._connect()
            rows = conn.execute(
                sql.SQL("SELECT topic, partition, next_offset FROM {}._positions WHERE "
                        "consumer = %s").format(sql.Identifier(self.schema)), (consumer,)
            ).fetchall()
            conn.commit()
        except psycopg.OperationalError as exc:
            raise self._transient(exc) from exc
        stored = {(str(t), int(p)): int(n) for t, p, n in rows}
        return {tp: stored.get(tp) for tp in tps}

    def _move_positions(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        pos = sql.Identifier(self.schema, "_positions")
        moved_elsewhere = []
        for (topic, partition), (expected, new) in batch.positions.items():
            if expected is None:
                cur = conn.execute(sql.SQL(
                    "INSERT INTO {} (consumer, topic, partition, next_offset) VALUES "
                    "(%s, %s, %s, %s) ON CONFLICT DO NOTHING").format(pos),
                    (batch.consumer, topic, partition, new))
            else:
                cur = conn.execute(sql.SQL(
                    "UPDATE {} SET next_offset = %s, updated_at = now() WHERE consumer = %s "
                    "AND topic = %s AND partition = %s AND next_offset = %s").format(pos),
                    (new, batch.consumer, topic, partition, expected))
            if cur.rowcount != 1:
                moved_elsewhere.append((topic, partition))
        if moved_elsewhere:
            raise PositionConflict(
                "stored position of " + ", ".join(f"{t}[{p}]" for t, p in moved_elsewhere)
                + " is not the one this batch started from", moved_elsewhere)

    # -- landing ----------------------------------------------------------------------------------
    def write(self, batch: Batch, before_commit: BeforeCommit) -> None:
        try:
            self._write(batch, before_commit)
        except PositionConflict:
            raise
        except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
            raise self._transient(exc) from exc

    def _write(self, batch: Batch, before_commit: BeforeCommit) -> None:
        self.prepare(batch.events)
        conn = self._connect()
        batch.rejected.clear()
        try:
            with conn.transaction():
                self._move_positions(conn, batch)
                with conn.transaction():  # a savepoint: a refused value falls back per row
                    self._copy(conn, batch.events)
                before_commit([])
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError,
                psycopg.errors.InvalidTextRepresentation) as exc:
            log.warning("BI batch of %d events refused by PostgreSQL (%s); landing it row by "
                        "row to isolate the refused rows", len(batch.events),
                        str(exc).splitlines()[0])
            self._write_row_by_row(conn, batch, before_commit)

    def _write_row_by_row(self, conn: psycopg.Connection[Any], batch: Batch,
                          before_commit: BeforeCommit) -> None:
        batch.rejected.clear()
        with conn.transaction():
            self._move_positions(conn, batch)
            for event in batch.events:
                try:
                    with conn.transaction():
                        self._copy(conn, [event])
                except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                    batch.rejected.append(Rejected(event, RowRefused(
                        f"PostgreSQL refused event {event.event_id} ({event.event_type}) for "
                        f"{self.schema}.{table_name(event.event_type)}: "
                        f"{str(exc).splitlines()[0]}")))
            before_commit(batch.rejected)

    def _copy(self, conn: psycopg.Connection[Any], events: Iterable[Event]) -> None:
        copy_rows(conn, self.rows_for(events))

    def rows_for(self, events: Iterable[Event]) -> list[Prepared]:
        """The COPY statements and rows of these events: the raw table's, then one per type."""
        by_type: dict[str, list[Event]] = defaultdict(list)
        raw_rows = []
        for e in events:
            if self.typed:
                by_type[e.event_type].append(e)
            if self.raw:
                raw_rows.append(_raw_row(e))
        out: list[Prepared] = []
        if raw_rows:
            out.append((sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(self.schema, "events"),
                sql.SQL(", ").join(map(sql.Identifier, _RAW_COLUMNS))), raw_rows))
        for event_type, group in by_type.items():
            table = table_name(event_type)
            fields = [c for c in self._tables.get(table, {}).values()
                      if not c.name.startswith("_")]
            names = [c.name for c in META] + [c.name for c in fields]
            json_cols = {c.name for c in fields if c.kind == JSON}
            rows = []
            for e in group:
                p = e.payload
                row: list[Any] = [e.event_id, e.aggregate_type, e.aggregate_id,
                                  e.aggregate_version, e.occurred_at,
                                  e.schema.version if e.schema else None, e.topic,
                                  e.partition, e.offset]
                for c in fields:
                    v = p.get(c.name)
                    row.append(to_json(v) if c.name in json_cols and v is not None else v)
                rows.append(row)
            out.append((sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(self.schema, table),
                sql.SQL(", ").join(map(sql.Identifier, names))), rows))
        return out

    def prepare(self, events: Sequence[Event]) -> None:
        """Create the tables these events need (as a write would), without landing them."""
        for event in events:
            if event.schema is not None and self.typed:
                self._ensure_table(event)

    # -- backfill ---------------------------------------------------------------------------------
    def reset(self, consumer: str) -> None:
        """Empty the BI tables of this schema and forget the consumer's positions."""
        conn = self._connect()
        self._load_tables()
        with conn.transaction():
            tables = [t for t in self._tables if t != "_positions"]
            if tables:
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(
                    sql.Identifier(self.schema, t) for t in tables)))
            conn.execute(sql.SQL("DELETE FROM {} WHERE consumer = %s").format(
                sql.Identifier(self.schema, "_positions")), (consumer,))


def _header_text(value: Any) -> Any:
    """Header bytes as text; binary ones (not UTF-8, or with NUL, which jsonb refuses) in hex."""
    if not isinstance(value, bytes):
        return value
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()
    return "0x" + value.hex() if "\x00" in text else text


# headers the raw table has columns for are not repeated in its headers column
_IN_COLUMNS = frozenset({names.CE_ID, names.CE_TYPE, names.CE_SUBJECT, names.CE_TIME,
                         names.TRACEPARENT, names.AGGREGATE_TYPE, names.AGGREGATE_VERSION})


def _headers_json(raw: Mapping[str, Any]) -> str:
    try:  # the usual case: every header is UTF-8 text without NUL
        text = to_json({k: v.decode() for k, v in raw.items() if k not in _IN_COLUMNS})
        if "\\u0000" not in text:
            return text
    except (UnicodeDecodeError, AttributeError):
        pass
    return to_json({k: _header_text(v) for k, v in raw.items() if k not in _IN_COLUMNS})


def _raw_row(e: Event) -> tuple[Any, ...]:
    return (e.event_id, e.event_type, e.aggregate_type, e.aggregate_id, e.aggregate_version,
            e.occurred_at, e.schema.version if e.schema else None, e.topic, e.partition,
            e.offset,
            _EPOCH + dt.timedelta(milliseconds=e.timestamp_ms) if e.timestamp_ms else None,
            e.traceparent, _headers_json(e.raw_headers), to_json(e.payload))
