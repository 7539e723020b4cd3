"""Versioned, idempotent installation of the outbox schema (``pipeline outbox install``).

Migrations are the numbered ``migrations/NNNN_name.sql`` files beside this module (MariaDB's in
``migrations_mariadb/``, installed by :mod:`pipeline.outbox.mariadb`); applied ones
are recorded in ``<schema>.schema_migrations``. Installing takes a transaction-level advisory lock,
so concurrent installers (several relays starting at once) apply each migration exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]*$")
_INSTALL_LOCK = 0x70697065  # "pipe"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


def migrations(folder: str = "migrations") -> list[Migration]:
    """The packaged migrations in version order: ``migrations`` (PostgreSQL) or
    ``migrations_mariadb``."""
    found = []
    for entry in resources.files(__package__).joinpath(folder).iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found, key=lambda mig: mig.version)


def install(conn: psycopg.Connection[object], schema: str) -> list[Migration]:
    """Apply the migrations not yet applied; returns those applied now (empty when current)."""
    if not _SCHEMA.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits, _")
    applied_now: list[Migration] = []
    ident = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INSTALL_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        cur = conn.execute(sql.SQL("SELECT version FROM {}.schema_migrations").format(ident))
        done = {row[0] for row in cur.fetchall()}  # type: ignore[index]
        for mig in migrations():
            if mig.version in done:
                continue
            # The SQL files use {schema}; the schema name is validated by the config pattern.
            conn.execute(mig.text.replace("{schema}", schema).encode())
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(
                    ident
                ),
                (mig.version, mig.name),
            )
            applied_now.append(mig)
    return applied_now


def installed_version(conn: psycopg.Connection[object], schema: str) -> int | None:
    """The highest applied migration, or None when the outbox is not installed."""
    cur = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.schema_migrations",))
    row = cur.fetchone()
    if not row or not row[0]:  # type: ignore[index]
        return None
    cur = conn.execute(
        sql.SQL("SELECT max(version) FROM {}.schema_migrations").format(sql.Identifier(schema))
    )
    row = cur.fetchone()
    return None if row is None else row[0]  # type: ignore[index]
