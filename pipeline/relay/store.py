"""The relay's PostgreSQL adapter: leadership lock, reading and deleting outbox rows, wake-ups.

One connection does everything, in autocommit mode with explicit transactions for deletes: the
session-level advisory lock that makes this process the shard's leader lives exactly as long as
the connection that reads and deletes, so a relay that loses its connection also loses its
leadership and can never delete rows under a new leader.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import orjson
import psycopg
from psycopg import sql

from pipeline.errors import DatabaseUnavailable
from pipeline.relay.envelope import OutboxRow

# PostgreSQL serialises a whole batch into one JSON document, parsed by one orjson call: the
# server-side work runs on the database's core, and psycopg's per-column loaders (which cost
# more than the rest of a row's trip to Kafka) are bypassed. to_json() of a timestamptz is
# already the ISO-8601 form the ce_time header wants. The payload and headers come as their
# jsonb text, read row by row with exact numbers (pipeline.exactjson): orjson would make every
# decimal a binary float, and one unreadable row would fail the whole batch.
_BATCH_JSON = (
    "SELECT coalesce(json_agg(json_build_array(id, event_id, aggregate_type, aggregate_id, "
    "aggregate_version, event_type, payload::text, headers::text, occurred_at) ORDER BY id), "
    "'[]')::text "
    "FROM (SELECT * FROM {}.outbox WHERE {} AND id <> ALL(%s::bigint[]) ORDER BY id LIMIT %s) o"
)


def leader_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RelayStore:
    def __init__(self, conninfo: str, schema: str, shard: int, shards: int) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.shard = shard
        self.shards = shards
        self.channel = f"{schema}_outbox"
        self.conn: psycopg.Connection[Any] | None = None
        s = sql.Identifier(schema)
        # mod() rather than %: a literal % would read as a query parameter marker.
        in_shard = (
            sql.SQL("true")
            if shards == 1
            else sql.SQL(
                "mod(hashtextextended(aggregate_id, 0) & 9223372036854775807, {}) = {}"
            ).format(sql.Literal(shards), sql.Literal(shard))
        )
        self._fetch = sql.SQL(_BATCH_JSON).format(s, in_shard)
        self._pending_types = sql.SQL(
            "SELECT DISTINCT aggregate_type FROM {}.outbox WHERE {}"
        ).format(s, in_shard)
        self._delete = sql.SQL("DELETE FROM {}.outbox WHERE id = ANY(%s)").format(s)
        self._existing = sql.SQL("SELECT id FROM {}.outbox WHERE id = ANY(%s)").format(s)
        self._state = sql.SQL(
            "INSERT INTO {}.relay_state AS r (shard, leader, since, last_publish, published, "
            " dead_lettered, heartbeat) VALUES (%s, %s, now(), CASE WHEN %s > 0 THEN now() END, "
            " %s, %s, now()) "
            "ON CONFLICT (shard) DO UPDATE SET leader = excluded.leader, "
            " since = CASE WHEN r.leader = excluded.leader THEN r.since ELSE now() END, "
            " last_publish = coalesce(excluded.last_publish, r.last_publish), "
            " published = r.published + excluded.published, "
            " dead_lettered = r.dead_lettered + excluded.dead_lettered, heartbeat = now()"
        ).format(s)
        self.lock_key = f"{schema}:relay:{shard}/{shards}"

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        try:
            self.conn = psycopg.connect(
                self.conninfo, autocommit=True, application_name=f"pipeline-relay-{self.shard}"
            )
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"relay cannot connect to PostgreSQL: {exc}") from exc

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def _c(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            raise DatabaseUnavailable("relay's PostgreSQL connection is closed")
        return self.conn

    # -- leadership --------------------------------------------------------------------------
    def try_lead(self) -> bool:
        row = (
            self._c()
            .execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self.lock_key,))
            .fetchone()
        )
        return bool(row and row[0])

    def last_activity_ms(self) -> int | None:
        """When this shard's leader last completed a batch or idled (epoch ms), or None."""
        row = (
            self._c()
            .execute(
                sql.SQL(
                    "SELECT (extract(epoch FROM heartbeat) * 1000)::bigint FROM {}.relay_state "
                    "WHERE shard = %s"
                ).format(sql.Identifier(self.schema)),
                (self.shard,),
            )
            .fetchone()
        )
        return None if row is None else int(row[0])

    def current_leader(self) -> str | None:
        row = (
            self._c()
            .execute(
                sql.SQL("SELECT leader FROM {}.relay_state WHERE shard = %s").format(
                    sql.Identifier(self.schema)
                ),
                (self.shard,),
            )
            .fetchone()
        )
        return None if row is None else str(row[0])

    # -- rows -------------------------------------------------------------------------------
    def fetch(self, limit: int, exclude: list[int] | None = None) -> list[OutboxRow]:
        """The first ``limit`` rows in id order, leaving out ``exclude`` (rows in flight)."""
        row = self._c().execute(self._fetch, (exclude or [], limit)).fetchone()
        assert row is not None
        return [OutboxRow.from_stored(*r) for r in orjson.loads(row[0])]

    def pending_aggregate_types(self) -> list[str]:
        return [r[0] for r in self._c().execute(self._pending_types).fetchall()]

    def existing(self, ids: list[int]) -> list[int]:
        if not ids:
            return []
        return [r[0] for r in self._c().execute(self._existing, (ids,)).fetchall()]

    def complete(self, ids: list[int], leader: str, published: int, dead_lettered: int) -> None:
        """Delete published (or dead-lettered) rows and account for them, atomically."""
        conn = self._c()
        with conn.transaction():
            if ids:
                conn.execute(self._delete, (ids,))
            conn.execute(self._state, (self.shard, leader, published, published, dead_lettered))

    def wait(self, timeout: float) -> None:
        """Block until a NOTIFY arrives or ``timeout`` passes (the poll backstop)."""
        for _ in self._c().notifies(timeout=timeout, stop_after=1):
            pass
