"""Which relay engine a PostgreSQL outbox is written for (``pipeline outbox engine``).

``poll`` (the default): ``outbox_emit`` inserts rows; the relay polls the table. ``wal``:
``outbox_emit`` writes WAL messages into the replication slots of ``<schema>.wal_slots`` (one
per relay shard), read by ``relay.engine: wal`` (:mod:`pipeline.relay.store_wal`). Switching to
``wal`` makes every shard's slot first and registers them in one transaction, so no event is
written while a shard has no slot. Switching back to ``poll`` makes ``outbox_emit`` write rows
again at once, waits until the slots hold no event the WAL relays have not published, then
drops them (migration 0005 holds the tables).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.outbox")

_SLOT_CHARS = re.compile(r"[^a-z0-9_]+")

# a peek's view of a slot when telling whether it is drained
_PEEK_ROWS = 200_000


def slot_name(prefix: str, shard: int, shards: int) -> str:
    """A valid replication slot name (lower-case letters, digits, _; at most 63 characters)."""
    base = _SLOT_CHARS.sub("_", f"{prefix}_{shard}of{shards}".lower()).strip("_")
    if len(base) <= 63:
        return base
    tag = hashlib.sha1(base.encode()).hexdigest()[:8]
    return f"{base[:54]}_{tag}"


def slot_names(conn: psycopg.Connection[Any], schema: str, shards: int,
               prefix: str | None = None) -> list[str]:
    """Every shard's slot name. Slot names are unique per server, not per database: by
    default the database's name is in them (``<database>_<schema>_<shard>of<shards>``)."""
    if prefix is None:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        prefix = f"{row[0]}_{schema}"
    return [slot_name(prefix, k, shards) for k in range(shards)]


def publication(schema: str) -> str:
    return f"{schema}_outbox"


@dataclass(frozen=True)
class SlotState:
    slot_name: str
    shard: int
    shards: int
    exists: bool
    active: bool
    retained_bytes: int | None  # WAL the server keeps for the slot (from its restart_lsn)
    lag_bytes: int | None  # WAL written since the slot's confirmed position
    wal_status: str | None  # reserved / extended / unreserved / lost

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def has_wal_tables(conn: psycopg.Connection[Any], schema: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.wal_slots",)).fetchone()
    return bool(row and row[0])


def slot_states(conn: psycopg.Connection[Any], schema: str) -> list[SlotState]:
    """The WAL engine's slots and what they hold back; [] when the engine is not used."""
    if not has_wal_tables(conn, schema):
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT w.slot_name, w.shard, w.shards, s.slot_name IS NOT NULL, "
            "coalesce(s.active, false), "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, "
            "s.wal_status "
            "FROM {}.wal_slots w LEFT JOIN pg_catalog.pg_replication_slots s "
            "ON s.slot_name = w.slot_name ORDER BY w.shards, w.shard"
        ).format(sql.Identifier(schema))
    ).fetchall()
    return [SlotState(*r) for r in rows]


def current_engine(conn: psycopg.Connection[Any], schema: str) -> tuple[str, bool]:
    """(what outbox_emit writes for: 'wal' or 'poll', whether it was pinned by a switch)."""
    if not has_wal_tables(conn, schema):
        return "poll", False
    row = conn.execute(
        sql.SQL("SELECT engine, pinned FROM {}.outbox_engine").format(sql.Identifier(schema))
    ).fetchone()
    return (str(row[0]), bool(row[1])) if row else ("poll", False)


def require_wal_ready(conn: psycopg.Connection[Any], schema: str) -> None:
    """The server decodes logically and the outbox has migration 0005, or a clear error."""
    row = conn.execute("SELECT current_setting('wal_level')").fetchone()
    level = str(row[0]) if row else "?"
    if level != "logical":
        raise ConfigError(
            f"the WAL engine needs logical decoding but PostgreSQL runs at wal_level={level}: "
            "set wal_level = logical (ALTER SYSTEM SET wal_level = logical) and restart the "
            "server, or use relay.engine: poll"
        )
    if not has_wal_tables(conn, schema):
        raise ConfigError(
            f"{schema}.wal_slots is missing (migration 0005 not applied): run pipeline outbox "
            "install"
        )


def ensure_publication(conn: psycopg.Connection[Any], schema: str) -> None:
    """The publication of the outbox table's inserts, which the slots decode."""
    name = publication(schema)
    if conn.execute("SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s",
                    (name,)).fetchone():
        return
    try:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}.outbox WITH (publish = 'insert')")
            .format(sql.Identifier(name), sql.Identifier(schema))
        )
    except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        pass  # another shard's relay made it meanwhile
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"this database role cannot create publication {name} "
            f"({exc.diag.message_primary}): create it as the outbox's owner: CREATE "
            f"PUBLICATION {name} FOR TABLE {schema}.outbox WITH (publish = 'insert')"
        ) from exc


def switch_to_wal(conn: psycopg.Connection[Any], schema: str, names: list[str]) -> int:
    """Make every shard's slot, then register them all and make outbox_emit write messages,
    in one transaction. Returns the boundary: rows up to this id may predate the slots."""
    require_wal_ready(conn, schema)
    ensure_publication(conn, schema)
    existing = {str(r[0]) for r in conn.execute(
        "SELECT slot_name FROM pg_catalog.pg_replication_slots").fetchall()}
    for name in names:
        if name in existing:
            continue
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
            log.info("created replication slot %s", name)
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            pass  # another shard's relay made it meanwhile
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"this database role cannot create replication slot {name}: "
                f"{exc.diag.message_primary}; grant it REPLICATION (ALTER ROLE <role> "
                "REPLICATION) or use relay.engine: poll"
            ) from exc
        except psycopg.errors.ConfigurationLimitExceeded as exc:
            raise ConfigError(
                f"PostgreSQL has no free replication slot for {name} "
                f"({exc.diag.message_primary}): raise max_replication_slots, or drop unused "
                "slots (SELECT slot_name FROM pg_replication_slots WHERE NOT active)"
            ) from exc
    s = sql.Identifier(schema)
    with conn.transaction():
        # one switch at a time (every shard's relay may try at once)
        row = conn.execute(
            sql.SQL("SELECT engine FROM {}.outbox_engine FOR UPDATE").format(s)).fetchone()
        registered = [str(r[0]) for r in conn.execute(
            sql.SQL("SELECT slot_name FROM {}.wal_slots").format(s)).fetchall()]
        live = {str(r[0]) for r in conn.execute(
            "SELECT slot_name FROM pg_catalog.pg_replication_slots").fetchall()}
        emitting = (row is not None and row[0] == "wal" and sorted(registered) == sorted(names)
                    and all(n in live for n in names))
        if not emitting:
            # Switched by this transaction. The boundary is read after every slot exists:
            # a row with a larger id is decoded by them. Never moved while messages are
            # written: a row drained first must not overtake an earlier message.
            conn.execute(
                sql.SQL("DELETE FROM {}.wal_slots WHERE slot_name <> ALL(%s)").format(s),
                (names,))
            seq = conn.execute(
                sql.SQL("SELECT last_value FROM {}.outbox_id_seq").format(s)).fetchone()
            for k, name in enumerate(names):
                conn.execute(
                    sql.SQL("INSERT INTO {}.wal_slots (slot_name, shard, shards, boundary) "
                            "VALUES (%s, %s, %s, %s) ON CONFLICT (slot_name) DO UPDATE SET "
                            "boundary = excluded.boundary").format(s),
                    (name, k, len(names), int(seq[0]) if seq else 0),
                )
            conn.execute(sql.SQL("UPDATE {}.outbox_engine SET engine = 'wal', pinned = false, "
                                 "changed_at = now()").format(s))
        got = conn.execute(sql.SQL("SELECT min(boundary) FROM {}.wal_slots").format(s)).fetchone()
    boundary = int(got[0]) if got and got[0] is not None else 0
    if not emitting:
        log.info("the outbox now writes events as WAL messages into slots %s (rows up to id "
                 "%d are published from the table first)", ", ".join(names), boundary)
    return boundary


def pending_messages(conn: psycopg.Connection[Any], schema: str, st: SlotState) -> int:
    """Outbox events of the slot's shard written as messages that it still holds (not yet
    confirmed by its relay), counted in the first ``_PEEK_ROWS`` rows of it."""
    from pipeline.relay.pgoutput import Decoder

    rows = conn.execute(
        "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, "
        "%s, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
        (st.slot_name, _PEEK_ROWS, publication(schema)),
    ).fetchall()
    ids = [ev.aggregate_id for t in Decoder(schema).transactions(rows) for ev in t.events
           if not ev.from_table]
    if st.shards == 1 or not ids:
        return len(ids)
    shard_of = dict(shards_of(conn, set(ids), st.shards))
    return sum(1 for a in ids if shard_of[a] == st.shard)


def shards_of(conn: psycopg.Connection[Any], ids: set[str], shards: int) -> list[tuple[str, int]]:
    """The relay shard of each aggregate id: the polling relay's hash, computed by the server."""
    return [(str(a), int(k)) for a, k in conn.execute(
        "SELECT a, mod(hashtextextended(a, 0) & 9223372036854775807, %s) "
        "FROM unnest(%s::text[]) a", (shards, list(ids))).fetchall()]


def switch_to_poll(conn: psycopg.Connection[Any], schema: str, *, wait_s: float,
                   progress: Callable[[dict[str, int]], None] | None = None,
                   force: bool = False) -> dict[str, int]:
    """Make outbox_emit write rows (at once), wait up to ``wait_s`` until no slot holds an
    event as a message (the WAL relays publish them meanwhile), then drop the slots. Returns
    the messages still held per slot: empty when the switch is complete; with ``force`` the
    slots are dropped anyway and the figures are the events lost."""
    s = sql.Identifier(schema)
    if not has_wal_tables(conn, schema):
        return {}
    with conn.transaction():
        conn.execute(sql.SQL("UPDATE {}.outbox_engine SET engine = 'poll', pinned = true, "
                             "changed_at = now()").format(s))
    deadline = time.monotonic() + wait_s
    while True:
        held: dict[str, int] = {}
        for st in slot_states(conn, schema):
            if st.exists:
                n = pending_messages(conn, schema, st)
                if n:
                    held[st.slot_name] = n
        if not held:
            break
        if progress is not None:
            progress(held)
        if time.monotonic() >= deadline:
            if not force:
                return held
            break
        time.sleep(1.0)
    for st in slot_states(conn, schema):
        if st.exists:
            _drop_slot(conn, st.slot_name)
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {}.wal_slots").format(s))
    return held


def _drop_slot(conn: psycopg.Connection[Any], name: str) -> None:
    for attempt in range(50):
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            return
        except psycopg.errors.ObjectInUse:
            if attempt == 49:
                raise
            time.sleep(0.1)  # a relay's peek holds it for a moment
