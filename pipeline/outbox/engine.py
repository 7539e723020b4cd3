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

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from pipeline.errors import ConfigError, DatabaseUnavailable

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

    def line(self) -> str:
        """One line for `pipeline status` and `pipeline outbox status`."""
        where = f"wal slot {self.slot_name} (shard {self.shard}/{self.shards})"
        if not self.exists:
            return f"{where}: MISSING; outbox_emit writes rows until its relay makes it again"
        # wal_status other than reserved: max_slot_wal_keep_size is about to, or did, cut it off
        status = f", WAL {self.wal_status}" if self.wal_status not in (None, "reserved") else ""
        return (f"{where}: retained {mib(self.retained_bytes)}, lag {mib(self.lag_bytes)}"
                f"{', active' if self.active else ''}{status}")


def mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024 / 1024:.1f} MiB"


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


def live_slots(conn: psycopg.Connection[Any]) -> set[str]:
    """Slots that can decode: a slot is listed as soon as its creation begins, and has a
    confirmed position only once it ends."""
    return {str(r[0]) for r in conn.execute(
        "SELECT slot_name FROM pg_catalog.pg_replication_slots "
        "WHERE confirmed_flush_lsn IS NOT NULL").fetchall()}


def switch_to_wal(conn: psycopg.Connection[Any], schema: str, names: list[str]
                  ) -> dict[str, int]:
    """Make every shard's slot, then register them all and make outbox_emit write messages,
    in one transaction; one switch at a time (every shard's relay may try at once). Returns
    each slot's boundary: rows up to it may predate the slot (drained from the table first)."""
    require_wal_ready(conn, schema)
    ensure_publication(conn, schema)
    lock = f"{schema}:wal-switch"
    conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock,))
    try:
        return _switch_to_wal(conn, schema, names)
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (lock,))


def _switch_to_wal(conn: psycopg.Connection[Any], schema: str, names: list[str]
                   ) -> dict[str, int]:
    existing = {str(r[0]) for r in conn.execute(
        "SELECT slot_name FROM pg_catalog.pg_replication_slots").fetchall()}
    created: set[str] = set()
    for name in names:
        if name in existing:
            continue
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
            created.add(name)
            log.info("created replication slot %s", name)
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
        row = conn.execute(
            sql.SQL("SELECT engine FROM {}.outbox_engine FOR UPDATE").format(s)).fetchone()
        registered = {str(r[0]): int(r[1]) for r in conn.execute(
            sql.SQL("SELECT slot_name, boundary FROM {}.wal_slots").format(s)).fetchall()}
        unusable = sorted(set(names) - live_slots(conn))
        if unusable:
            raise DatabaseUnavailable(
                f"replication slot(s) {', '.join(unusable)} exist but cannot decode yet (being "
                "made by another process?); the relay tries again")
        if not (row is not None and row[0] == "wal" and set(registered) == set(names)):
            # Switched by this transaction. A new slot's boundary is read after it exists: a
            # row with a larger id is decoded by it. A registered slot's is never moved: a row
            # drained first must not overtake an earlier message still in that slot.
            conn.execute(
                sql.SQL("DELETE FROM {}.wal_slots WHERE slot_name <> ALL(%s)").format(s),
                (names,))
            seq = conn.execute(
                sql.SQL("SELECT last_value FROM {}.outbox_id_seq").format(s)).fetchone()
            now = int(seq[0]) if seq else 0
            for k, name in enumerate(names):
                fresh = name in created or name not in registered
                conn.execute(
                    sql.SQL("INSERT INTO {}.wal_slots (slot_name, shard, shards, boundary) "
                            "VALUES (%s, %s, %s, %s) ON CONFLICT (slot_name) DO "
                            + ("UPDATE SET boundary = excluded.boundary" if fresh
                               else "NOTHING")).format(s),
                    (name, k, len(names), now),
                )
            conn.execute(sql.SQL("UPDATE {}.outbox_engine SET engine = 'wal', pinned = false, "
                                 "changed_at = now()").format(s))
            log.info("the outbox now writes events as WAL messages into slots %s",
                     ", ".join(names))
        return {str(r[0]): int(r[1]) for r in conn.execute(
            sql.SQL("SELECT slot_name, boundary FROM {}.wal_slots").format(s)).fetchall()}


def on_slot(conn: psycopg.Connection[Any], slot: str, query: str, params: tuple[Any, ...]
            ) -> list[Any]:
    """A call that takes the slot (a peek, an advance): another process holding it for a
    moment is waited for (5 s)."""
    for attempt in range(50):
        try:
            return conn.execute(query, params).fetchall()
        except psycopg.errors.ObjectInUse as exc:
            if attempt == 49:
                raise DatabaseUnavailable(
                    f"replication slot {slot} is held by another process for 5 s "
                    f"({exc.diag.message_primary}): is something else reading it? (SELECT "
                    "active_pid FROM pg_replication_slots)") from exc
            time.sleep(0.1)
    raise AssertionError("unreachable")


def pending_messages(conn: psycopg.Connection[Any], schema: str, st: SlotState) -> int:
    """Outbox events of the slot's shard written as messages that it still holds (not yet
    confirmed by its relay), counted in the first ``_PEEK_ROWS`` rows of it."""
    from pipeline.relay.pgoutput import Decoder

    rows = on_slot(
        conn, st.slot_name,
        "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, "
        "%s, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
        (st.slot_name, _PEEK_ROWS, publication(schema)))
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
    """Make outbox_emit write rows (at once), then wait up to ``wait_s`` until (1) every
    transaction open before the switch has ended (one may have written a message, or still
    will under REPEATABLE READ) and (2) every slot's relay has confirmed past the WAL written
    until then; then unregister the slots (so no relay makes them again) and drop them.
    Returns what still held the switch when it timed out: empty when it completed; with
    ``force`` the slots are dropped anyway and the figures are the events lost."""
    s = sql.Identifier(schema)
    if not has_wal_tables(conn, schema):
        return {}
    with conn.transaction():
        conn.execute(sql.SQL("UPDATE {}.outbox_engine SET engine = 'poll', pinned = true, "
                             "changed_at = now()").format(s))
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    switched_at = row[0]
    deadline = time.monotonic() + wait_s
    held: dict[str, int] = {}
    while True:
        old = [int(r[0]) for r in conn.execute(
            "SELECT pid FROM pg_catalog.pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start < %s ORDER BY pid",
            (switched_at,)).fetchall()]
        if not old:
            break
        held = {"transactions open since before the switch (pid "
                + ", ".join(map(str, old[:5])) + ("…" if len(old) > 5 else "") + ")": len(old)}
        if time.monotonic() >= deadline:
            if not force:
                return held
            break
        if progress is not None:
            progress(held)
        time.sleep(0.2)
    row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    assert row is not None
    written = row[0]
    while True:
        lagging = {str(r[0]) for r in conn.execute(
            "SELECT slot_name FROM pg_catalog.pg_replication_slots "
            "WHERE confirmed_flush_lsn < %s", (written,)).fetchall()}
        behind = [st for st in slot_states(conn, schema) if st.slot_name in lagging]
        if not behind:
            held = {}
            break
        if time.monotonic() >= deadline:
            held = {st.slot_name: n for st in behind
                    if (n := pending_messages(conn, schema, st))}
            if held and not force:
                return held
            break
        if progress is not None:
            progress({st.slot_name: int(st.lag_bytes or 0) for st in behind})
        time.sleep(0.5)
    states = slot_states(conn, schema)
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {}.wal_slots").format(s))
    for st in states:
        if st.exists:
            _drop_slot(conn, st.slot_name)
    return held


def _drop_slot(conn: psycopg.Connection[Any], name: str) -> None:
    with contextlib.suppress(psycopg.errors.UndefinedObject):  # gone already
        on_slot(conn, name, "SELECT pg_drop_replication_slot(%s)", (name,))
