"""The outbox on MariaDB / MySQL: install, status, ``emit()``, capture triggers.

The same contract as on PostgreSQL (DESIGN decision 1), in MariaDB's terms:

* ``{schema}`` is a database on the ERP's server; ``outbox_emit`` is a procedure, called with
  ``CALL {schema}.outbox_emit(...)`` in the ERP's transaction (InnoDB: the event commits or
  rolls back with the ERP's rows). The per-aggregate counter row it upserts stays locked until
  that commit, so one aggregate's events commit in version order.
* Migrations run under ``GET_LOCK`` (MariaDB's DDL commits implicitly, so each statement is
  written to be re-runnable: ``IF NOT EXISTS`` / ``OR REPLACE``).
* MariaDB has no row-to-JSON of a whole row in a trigger (PostgreSQL's ``to_jsonb(NEW)``): the
  capture triggers are generated from the table's columns at install time. A column added to
  the table later is not captured until ``pipeline outbox capture`` runs again (it says so).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError
from pipeline.outbox.capture import (
    _AGGREGATE,
    _PREFIX,
    EVENTS,
    CaptureSpec,
    Resolved,
    check_keys,
)
from pipeline.outbox.migrations import _SCHEMA, Migration, migrations
from pipeline.outbox.status import OutboxStatus, ShardState
from pipeline.schemas.catalogue import Catalogue

FOLDER = "migrations_mariadb"
_INSTALL_LOCK_S = 60

Conn = Any  # a pymysql.connections.Connection (PyMySQL ships no type hints)


def q(name: str) -> str:
    """A quoted identifier (names are validated before they get here)."""
    return "`" + name.replace("`", "``") + "`"


def _check_schema(schema: str) -> None:
    if not _SCHEMA.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits, _")


# -- install ---------------------------------------------------------------------------------------
def install(conn: Conn, schema: str) -> list[Migration]:
    """Apply the migrations not yet applied; returns those applied now (empty when current).
    ``conn`` must allow multiple statements (:func:`pipeline.mariadb.connect`)."""
    _check_schema(schema)
    lock = f"pipeline:install:{schema}"
    with conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, %s)", (lock, _INSTALL_LOCK_S))
        got = cur.fetchone()
        if not got or got[0] != 1:
            raise ConfigError(
                f"another `pipeline outbox install` holds the install lock of {schema} for "
                f"over {_INSTALL_LOCK_S}s; wait for it, then run install again"
            )
        try:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {q(schema)} "
                        "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {q(schema)}.schema_migrations ("
                " version int PRIMARY KEY, name varchar(255) NOT NULL,"
                " applied_at datetime(6) NOT NULL) ENGINE = InnoDB"
            )
            cur.execute(f"SELECT version FROM {q(schema)}.schema_migrations")
            done = {int(r[0]) for r in cur.fetchall()}
            applied: list[Migration] = []
            for mig in migrations(FOLDER):
                if mig.version in done:
                    continue
                cur.execute(mig.text.replace("{schema}", q(schema)))
                while cur.nextset():
                    pass
                cur.execute(
                    f"INSERT INTO {q(schema)}.schema_migrations (version, name, applied_at) "
                    "VALUES (%s, %s, utc_timestamp(6))",
                    (mig.version, mig.name),
                )
                applied.append(mig)
            return applied
        finally:
            cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))


def installed_version(conn: Conn, schema: str) -> int | None:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = %s "
            "AND table_name = 'schema_migrations'", (schema,),
        )
        if cur.fetchone() is None:
            return None
        cur.execute(f"SELECT max(version) FROM {q(schema)}.schema_migrations")
        row = cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def outbox_status(conn: Conn, schema: str) -> OutboxStatus:
    version = installed_version(conn, schema)
    if version is None:
        return OutboxStatus(None, 0, None, [])
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), timestampdiff(MICROSECOND, min(occurred_at), utc_timestamp(6)) "
            f"FROM {q(schema)}.outbox"
        )
        rows, age_us = cur.fetchone()
        cur.execute(
            "SELECT shard, leader, since, last_publish, published, dead_lettered, "
            "timestampdiff(MICROSECOND, heartbeat, utc_timestamp(6)) "
            f"FROM {q(schema)}.relay_state ORDER BY shard"
        )
        shards = [
            ShardState(int(r[0]), str(r[1]), _utc(r[2]), _utc(r[3]) if r[3] else None,
                       int(r[4]), int(r[5]), float(r[6]) / 1e6)
            for r in cur.fetchall()
        ]
    return OutboxStatus(version, int(rows), None if age_us is None else float(age_us) / 1e6,
                        shards)


def _utc(value: Any) -> Any:
    import datetime as dt

    return value.replace(tzinfo=dt.UTC) if isinstance(value, dt.datetime) else value


def backlog(conn: Conn, schema: str) -> tuple[float, float]:
    """Rows waiting and the age of the oldest (seconds), for the metrics gauges."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), coalesce(timestampdiff(MICROSECOND, min(occurred_at), "
            f"utc_timestamp(6)), 0) FROM {q(schema)}.outbox"
        )
        n, age_us = cur.fetchone()
    return float(n), float(age_us) / 1e6


# -- emit ------------------------------------------------------------------------------------------
def emit(
    conn: Conn,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    event_id: uuid.UUID | str | None = None,
    schema: str = "pipeline",
    catalogue: Catalogue | None = None,
    validate: bool = True,
) -> int:
    """Insert one event in the caller's transaction; returns its aggregate version. Validates
    (and encodes) the payload first like :func:`pipeline.outbox.emit.emit`."""
    from pipeline.outbox.emit import _dumps, validated

    if conn.get_autocommit():
        # every statement of a CALLed procedure would commit on its own: the counter row's lock
        # would be gone before the event is inserted, and with it the order of versions
        raise ConfigError(
            "pipeline.outbox.mariadb.emit() needs the connection in a transaction "
            "(autocommit off): it writes the event in the caller's transaction")
    encoded, carrier = validated(event_type, payload, headers, catalogue, validate)
    with conn.cursor() as cur:
        cur.execute(
            f"CALL {q(schema)}.outbox_emit(%s, %s, %s, %s, %s, %s, %s)",
            (aggregate_type, str(aggregate_id), event_type, _dumps(payload),
             json.dumps(carrier), str(event_id) if event_id is not None else str(uuid.uuid4()),
             encoded),
        )
        cur.execute("SELECT @pipeline_outbox_version")
        row = cur.fetchone()
    return int(row[0])


# -- capture ---------------------------------------------------------------------------------------
# ERPNext's tables are named like "tabSales Order": spaces are allowed (names are quoted)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_ $-]*$")
_BINARY = {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"}
_TRIGGER_OF = {"insert": "ins", "update": "upd", "delete": "del"}


def _split(table: str, conn: Conn) -> tuple[str, str]:
    parts = table.split(".")
    if len(parts) > 2 or not all(_NAME.match(p) for p in parts):
        raise ConfigError(f"invalid table name {table!r}: expected table or database.table")
    if len(parts) == 2:
        return parts[0], parts[1]
    with conn.cursor() as cur:
        cur.execute("SELECT database()")
        db = cur.fetchone()[0]
    if not db:
        raise ConfigError(
            f"table {table!r} names no database and database.url names none: write "
            "database.table, or put the ERP's database in the URL (mysql://…/erp)"
        )
    return str(db), table


def trigger_names(table: str) -> list[str]:
    """Three trigger names for the table: readable, and unique per table name (a hash of the
    exact name: "tabSales Order" and "tabSales_Order" must not share triggers); 64 at most."""
    import hashlib

    name = table.split(".")[-1]
    tag = hashlib.sha1(name.encode()).hexdigest()[:8]
    base = "pipeline_capture_" + name.replace(" ", "_").lower()
    return [f"{base[:50]}_{tag}_{suffix}" for suffix in _TRIGGER_OF.values()]


def validate_spec(conn: Conn, spec: CaptureSpec, catalogue: Catalogue,
                  schema: str = "pipeline") -> tuple[str, str, list[tuple[str, str]], Resolved]:
    """(database, table, [(column, data type)], resolved keys): everything that would make a
    trigger fail an ERP write later is refused now."""
    bad = [e for e in spec.events if e not in EVENTS]
    if "truncate" in spec.events and bad == []:
        # MariaDB fires no trigger on TRUNCATE; say so rather than capture it silently never
        raise ConfigError(
            "--events truncate: MariaDB/MySQL fire no trigger on TRUNCATE TABLE; leave it out "
            "(--events insert,update,delete)"
        )
    if bad or not spec.events:
        raise ConfigError(
            f"--events must be a subset of insert,update,delete; got {bad or 'none'}")
    if not _AGGREGATE.match(spec.aggregate_type):
        raise ConfigError(
            f"aggregate type {spec.aggregate_type!r} is not allowed: letters, digits, _ and - "
            "only (it names the topic <prefix>.<aggregate_type>)"
        )
    if not _PREFIX.match(spec.prefix.replace(" ", "_")):
        raise ConfigError(f"event type prefix {spec.prefix!r} is not allowed: letters, digits, "
                          "_, . and -")
    if installed_version(conn, schema) is None:
        raise ConfigError(
            f"the outbox is not installed in database {schema!r} of this server: run "
            "`pipeline outbox install` first, then capture"
        )
    db, table = _split(spec.table, conn)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (db, table),
        )
        cols = [(str(r[0]), str(r[1]).lower(), r[2] == "YES") for r in cur.fetchall()]
        if not cols:
            raise ConfigError(f"table {db}.{table} does not exist on this server")
        keys = spec.key_columns
        if not keys:
            cur.execute(
                "SELECT column_name FROM information_schema.key_column_usage "
                "WHERE table_schema = %s AND table_name = %s AND constraint_name = 'PRIMARY' "
                "ORDER BY ordinal_position", (db, table),
            )
            keys = tuple(str(r[0]) for r in cur.fetchall())
    check_keys(spec, f"{db}.{table}", tuple(keys), {c: n for c, _t, n in cols}, catalogue)
    binary = tuple(sorted(c for c, t, _n in cols if t in _BINARY))
    return db, table, [(c, t) for c, t, _n in cols], Resolved(tuple(keys), binary)


def _value(img: str, col: str, binary: bool) -> str:
    ref = f"{img}.{q(col)}"
    return f"to_base64({ref})" if binary else ref


def _row_json(img: str, cols: list[tuple[str, str]], binary: set[str]) -> str:
    pairs = ", ".join(f"{_lit(c)}, {_value(img, c, c in binary)}" for c, _t in cols)
    return f"json_object({pairs})"


def _key_expr(img: str, keys: tuple[str, ...]) -> str:
    texts = [f"cast({img}.{q(k)} AS char)" for k in keys]
    return texts[0] if len(texts) == 1 else f"json_array({', '.join(texts)})"


def _lit(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def install_capture(conn: Conn, spec: CaptureSpec, schema: str, catalogue: Catalogue) -> Resolved:
    db, table, cols, got = validate_spec(conn, spec, catalogue, schema)
    binary = set(got.bytea_columns)
    tbl = f"{db}.{table}"
    target = f"{q(db)}.{q(table)}"
    names = dict(zip(_TRIGGER_OF, trigger_names(table), strict=True))
    with conn.cursor() as cur:
        # each requested trigger is replaced in one statement (MariaDB's DDL commits at once: a
        # DROP then CREATE would leave ERP writes uncaptured in between); others are dropped
        for event, name in names.items():
            if event not in spec.events:
                cur.execute(f"DROP TRIGGER IF EXISTS {q(db)}.{q(name)}")
        for event in spec.events:
            img = "OLD" if event == "delete" else "NEW"
            new_row = "NULL" if event == "delete" else _row_json("NEW", cols, binary)
            old_row = "NULL" if event == "insert" else _row_json("OLD", cols, binary)
            key = _key_expr(img, got.key_columns)
            suffix = {"insert": "created", "update": "updated", "delete": "deleted"}[event]
            call = (
                f"CALL {q(schema)}.outbox_emit({_lit(spec.aggregate_type)}, {key}, "
                f"{_lit(spec.prefix + '.' + suffix)}, json_object('table', {_lit(tbl)}, "
                f"'operation', {_lit(event.upper())}, 'key', {key}, 'row', {new_row}, "
                f"'old_row', {old_row}), json_object('erp_capture', {_lit(tbl)}), NULL, NULL)"
            )
            if event == "update":
                same = " AND ".join(f"NEW.{q(c)} <=> OLD.{q(c)}" for c, _t in cols)
                # an update that changed nothing is not an event
                body = f"BEGIN IF NOT ({same}) THEN {call}; END IF; END"
            else:
                body = f"BEGIN {call}; END"
            cur.execute(
                f"CREATE OR REPLACE TRIGGER {q(db)}.{q(names[event])} AFTER {event.upper()} "
                f"ON {target} "
                f"FOR EACH ROW {body}"
            )
    return got


def drop_capture(conn: Conn, table: str) -> bool:
    db, name = _split(table, conn)
    triggers = trigger_names(name)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM information_schema.triggers WHERE trigger_schema = %s AND "
            f"trigger_name IN ({', '.join(['%s'] * len(triggers))})", (db, *triggers),
        )
        existed = int(cur.fetchone()[0]) > 0
        for t in triggers:
            cur.execute(f"DROP TRIGGER IF EXISTS {q(db)}.{q(t)}")
    return existed
