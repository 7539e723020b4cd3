"""The relay's PostgreSQL adapter: leadership lock, reading and deleting outbox rows, wake-ups.

One connection does everything, in autocommit mode with explicit transactions for deletes: the
session-level advisory lock that makes this process the shard's leader lives exactly as long as
the connection that reads and deletes, so a relay that loses its connection also loses its
leadership and can never delete rows under a new leader.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
from typing import Any

import orjson
import psycopg
from psycopg import sql

from pipeline.errors import ConfigError, DatabaseUnavailable
from pipeline.relay.envelope import OutboxRow

log = logging.getLogger("pipeline.relay")

# PostgreSQL serialises a whole batch into one JSON document, parsed by one orjson call: the
# server-side work runs on the database's core, and psycopg's per-column loaders (which cost
# more than the rest of a row's trip to Kafka) are bypassed. to_json() of a timestamptz is
# already the ISO-8601 form the ce_time header wants. The payload and headers come as their
# jsonb text, read row by row with exact numbers (pipeline.exactjson): orjson would make every
# decimal a binary float, and one unreadable row would fail the whole batch.
#
# A row its writer encoded (``encoded``, migration 0004) comes as those bytes (base64) and
# without its payload text, when the bytes carry the fingerprint of the schema this relay
# writes for the row's event type ({passes}): the relay then moves bytes. Any other row comes
# with its payload, encoded here.
_BATCH_JSON = (
    "SELECT coalesce(json_agg(json_build_array(id, event_id, aggregate_type, aggregate_id, "
    "aggregate_version, event_type, CASE WHEN pass THEN NULL ELSE payload::text END, "
    "headers::text, occurred_at, {bytes}) ORDER BY id), "
    "'[]')::text "
    "FROM (SELECT *, {passes} AS pass FROM {outbox}.outbox "
    "WHERE {in_shard} AND id <> ALL(%s::bigint[]) ORDER BY id LIMIT %s) o"
)
# an outbox installed before migration 0004 has no ``encoded`` column
_NO_ENCODED = "false"


def _int_array(ids: list[int]) -> str:
    """Ids as one PostgreSQL array literal: psycopg's list dumper costs ~2 µs an element."""
    return "{" + ",".join(map(str, ids)) + "}"


def leader_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ReadBackRows(abc.ABC):
    """What every table-polling store does with the relay's read-back (decision 4)."""

    @abc.abstractmethod
    def existing_events(self, found: set[tuple[int, str]]) -> list[int]:
        """The ids of the rows still here that are the events ``found``: (id, event id)."""

    @abc.abstractmethod
    def complete(self, ids: list[int], leader: str, published: int, dead_lettered: int) -> None:
        """Delete published (or dead-lettered) rows and account for them, atomically."""

    def forget_published(self, found: set[tuple[int, str]], leader: str) -> int:
        """The read-back found these (position, event id) in Kafka: delete the rows still here
        (acknowledged before the last stop, not deleted) without publishing them again; returns
        how many."""
        published = self.existing_events(found)
        if published:
            self.complete(published, leader, 0, 0)
        return len(published)


class RelayStore(ReadBackRows):
    def __init__(
        self,
        conninfo: str,
        schema: str,
        shard: int,
        shards: int,
        writer_fingerprints: dict[str, bytes] | None = None,
    ) -> None:
        """``writer_fingerprints``: event type → the 8 fingerprint bytes of the schema this
        relay writes for it; rows encoded with exactly that schema are passed through."""
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
        self._in_shard = in_shard
        self._fingerprints = dict(writer_fingerprints or {})
        self._has_encoded = False  # migration 0004's column, known once connected
        self._fetch = self._fetch_query(encoded_column=False)
        self._pending_types = sql.SQL(
            "SELECT DISTINCT aggregate_type FROM {}.outbox WHERE {}"
        ).format(s, in_shard)
        self._existing = sql.SQL("SELECT id FROM {}.outbox WHERE id = ANY(%s)").format(s)
        # a batch's delete and its accounting as one statement (one round trip; a statement is
        # atomic): the DELETE as a data-modifying CTE, which runs whatever the upsert reads
        self._complete_one = sql.SQL(
            "WITH gone AS (DELETE FROM {0}.outbox WHERE id = ANY(%s::bigint[])) "
            "INSERT INTO {0}.relay_state AS r (shard, leader, since, last_publish, published, "
            " dead_lettered, heartbeat) VALUES (%s, %s, now(), CASE WHEN %s > 0 THEN now() END, "
            " %s, %s, now()) "
            "ON CONFLICT (shard) DO UPDATE SET leader = excluded.leader, "
            " since = CASE WHEN r.leader = excluded.leader THEN r.since ELSE now() END, "
            " last_publish = coalesce(excluded.last_publish, r.last_publish), "
            " published = r.published + excluded.published, "
            " dead_lettered = r.dead_lettered + excluded.dead_lettered, heartbeat = now()"
        ).format(s)
        self.lock_key = f"{schema}:relay:{shard}/{shards}"

    def _fetch_query(self, *, encoded_column: bool,
                     upto_id: int | None = None) -> sql.Composed:
        """The batch query; ``upto_id``: only rows with an id up to it (the WAL engine's rows
        older than its slot)."""
        passes: sql.Composable = sql.SQL(_NO_ENCODED)
        as_bytes: sql.Composable = sql.SQL("NULL")
        if encoded_column and self._fingerprints:
            whens = sql.SQL(" ").join(
                sql.SQL("WHEN {} THEN {}").format(sql.Literal(t), sql.Literal(fp))
                for t, fp in sorted(self._fingerprints.items())
            )
            passes = sql.SQL(
                "(encoded IS NOT NULL AND substring(encoded FROM 3 FOR 8) = "
                "CASE event_type {} END)"
            ).format(whens)
            as_bytes = sql.SQL("CASE WHEN pass THEN encode(encoded, 'base64') END")
        where = self._in_shard if upto_id is None else sql.SQL("{} AND id <= {}").format(
            self._in_shard, sql.Literal(upto_id))
        return sql.SQL(_BATCH_JSON).format(
            passes=passes, bytes=as_bytes, outbox=sql.Identifier(self.schema), in_shard=where,
        )

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        self.close()
        try:
            self.conn = psycopg.connect(
                self.conninfo, autocommit=True, application_name=f"pipeline-relay-{self.shard}"
            )
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            # Not waiting for the WAL flush of this session's writes (the deletes of published
            # rows and the relay's state): a delete lost to a server crash leaves rows that are
            # already in Kafka, which the next leader's read-back finds and deletes without
            # publishing again (decision 4). Waiting would queue the relay's flushes with the
            # ERP's own commits (each NOTIFYing commit holds a global lock until its flush).
            self.conn.execute("SET synchronous_commit = off")
            has_encoded = self.conn.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = 'outbox' AND column_name = 'encoded'", (self.schema,)
            ).fetchone()
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"relay cannot connect to PostgreSQL: {exc}") from exc
        if not has_encoded:
            log.warning(
                "%s.outbox has no encoded column (migration 0004 not applied): events encoded "
                "by their writer are encoded again here; run pipeline outbox install",
                self.schema,
            )
        self._has_encoded = bool(has_encoded)
        self._fetch = self._fetch_query(encoded_column=self._has_encoded)

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
        return self._fetch_rows(self._fetch, limit, exclude or [])

    def _fetch_rows(self, query: sql.Composed, limit: int, exclude: list[int]
                    ) -> list[OutboxRow]:
        row = self._c().execute(query, (_int_array(exclude), limit)).fetchone()
        assert row is not None
        return [OutboxRow.from_stored(*r) for r in orjson.loads(row[0])]

    def payload_text(self, outbox_id: int) -> str | None:
        """The stored payload of one row (a passed-through row being dead-lettered)."""
        row = self._c().execute(
            sql.SQL("SELECT payload::text FROM {}.outbox WHERE id = %s").format(
                sql.Identifier(self.schema)), (outbox_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def pending_aggregate_types(self) -> list[str]:
        return [r[0] for r in self._c().execute(self._pending_types).fetchall()]

    def existing(self, ids: list[int]) -> list[int]:
        if not ids:
            return []
        return [r[0] for r in self._c().execute(self._existing, (ids,)).fetchall()]

    def existing_events(self, found: set[tuple[int, str]]) -> list[int]:
        if not found:
            return []
        pairs = sorted(found)
        return [int(r[0]) for r in self._c().execute(
            sql.SQL("SELECT o.id FROM {}.outbox o JOIN unnest(%s::bigint[], %s::text[]) "
                    "AS k(id, event_id) ON o.id = k.id AND o.event_id::text = k.event_id "
                    "ORDER BY o.id").format(sql.Identifier(self.schema)),
            (_int_array([p for p, _ in pairs]), [e for _, e in pairs])).fetchall()]

    def check_engine(self) -> None:
        """On leadership: refuse to poll an outbox whose events go to the WAL engine's slots
        (a polling relay would never see them)."""
        from pipeline.outbox.engine import current_engine, slot_states

        conn = self._c()
        slots = slot_states(conn, self.schema)
        if current_engine(conn, self.schema)[0] == "wal" or slots:
            names = ", ".join(s.slot_name for s in slots) or "none left"
            raise ConfigError(
                f"the outbox in schema {self.schema} is read by the WAL engine (replication "
                f"slots {names}): events are written as WAL messages, which this polling relay "
                "(relay.engine: poll) would never see. Run the relay with relay.engine: wal, or "
                "switch back first with `pipeline outbox engine poll` (it waits until the slots "
                "are drained, then drops them)"
            )

    def complete(self, ids: list[int], leader: str, published: int, dead_lettered: int) -> None:
        """Delete published (or dead-lettered) rows and account for them, atomically."""
        conn = self._c()
        params = (_int_array(ids), self.shard, leader, published, published, dead_lettered)
        if not self._progress_to_record():
            conn.execute(self._complete_one, params)  # per batch: one round trip, not five
            return
        with conn.transaction():
            conn.execute(self._complete_one, params)
            self._record_progress(conn)

    def _progress_to_record(self) -> bool:
        """Whether :meth:`_record_progress` has something to write with this batch."""
        return False

    def _record_progress(self, conn: psycopg.Connection[Any]) -> None:
        """More to keep with a completed batch, in its transaction (the WAL engine's position)."""

    def wait(self, timeout: float) -> None:
        """Block until a NOTIFY arrives or ``timeout`` passes (the poll backstop)."""
        for _ in self._c().notifies(timeout=timeout, stop_after=1):
            pass


def relay_store(url: str, schema: str, shard: int, shards: int,
                writer_fingerprints: dict[str, bytes] | None = None, *, engine: str = "poll",
                slot_prefix: str | None = None) -> Any:
    """The store for the ERP database ``url`` names and the engine: :class:`RelayStore` for
    PostgreSQL (polling), :class:`pipeline.relay.store_wal.WalRelayStore` for its WAL engine,
    :class:`pipeline.relay.store_mariadb.MariaDbRelayStore` for ``mysql://``."""
    from pipeline.mariadb import is_mariadb_url

    if is_mariadb_url(url):
        if engine != "poll":
            raise ConfigError(
                f"relay.engine: {engine} reads PostgreSQL's WAL; on MariaDB / MySQL the relay "
                "polls the outbox table (relay.engine: poll)"
            )
        from pipeline.relay.store_mariadb import MariaDbRelayStore

        return MariaDbRelayStore(url, schema, shard, shards, writer_fingerprints)
    if engine == "wal":
        from pipeline.relay.store_wal import WalRelayStore

        return WalRelayStore(url, schema, shard, shards, writer_fingerprints, slot_prefix)
    return RelayStore(url, schema, shard, shards, writer_fingerprints)
