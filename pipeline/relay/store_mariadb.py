"""The relay's MariaDB / MySQL adapter, with the contract of ``pipeline.relay.store.RelayStore``.

* Leadership is ``GET_LOCK`` on the connection that reads and deletes: a session lock, released
  when the connection ends, so a relay that loses its connection loses its leadership too.
* Reads are READ COMMITTED statements in autocommit: each fetch sees every commit so far, so a
  late commit (a lower id committed after higher ones) is simply fetched by a later batch, never
  skipped (rows are deleted once published; there is no high-water mark to jump over it).
* One aggregate's events commit in version order (the counter row lock of ``outbox_emit``):
  fetching in id order and publishing batch after batch keeps that order.
* MariaDB has no LISTEN/NOTIFY: an idle relay polls, every ``_IDLE_POLL_S`` at most.
* Every driver error that means the connection is gone becomes DatabaseUnavailable (the relay's
  session then ends, and a new one reconnects and reads back from Kafka before publishing).

PyMySQL connections are not thread-safe; the relay's fetch thread and main thread share this
store, so every call holds a lock.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import pymysql

from pipeline import mariadb
from pipeline.errors import DatabaseUnavailable
from pipeline.outbox.mariadb import q
from pipeline.relay.envelope import OutboxRow
from pipeline.relay.store import ReadBackRows

_IDLE_POLL_S = 0.05
T = TypeVar("T")


def _ints(ids: list[int]) -> str:
    return ",".join(str(int(i)) for i in ids)


class MariaDbRelayStore(ReadBackRows):
    def __init__(self, url: str, schema: str, shard: int, shards: int,
                 writer_fingerprints: dict[str, bytes] | None = None) -> None:
        self.url = url
        self.schema = schema
        self.shard = shard
        self.shards = shards
        self.conn: Any = None
        self._lock = threading.RLock()
        self._fingerprints = dict(writer_fingerprints or {})
        key = f"{schema}:relay:{shard}/{shards}"
        # GET_LOCK names are 64 characters at most: a long schema name must not cut the shard off
        self.lock_key = key if len(key) <= 64 else (
            "pipeline:relay:" + hashlib.sha1(key.encode()).hexdigest())
        t = q(schema)
        self._in_shard = (
            "true" if shards == 1 else f"mod(crc32(aggregate_id), {int(shards)}) = {int(shard)}"
        )
        if self._fingerprints:
            # event types as hex literals: a name with a quote, a backslash or a % (the
            # catalogue's folder names) can neither break the SQL nor PyMySQL's formatting
            whens = " ".join(
                f"WHEN convert(x'{et.encode().hex()}' USING utf8mb4) THEN x'{fp.hex()}'"
                for et, fp in sorted(self._fingerprints.items())
            )
            passes = (f"(encoded IS NOT NULL AND substring(encoded, 3, 8) = "
                      f"CASE event_type {whens} END)")
        else:
            passes = "false"
        self._select = (
            "SELECT id, event_id, aggregate_type, aggregate_id, aggregate_version, event_type, "
            "CASE WHEN pass THEN NULL ELSE payload END, headers, "
            "date_format(occurred_at, '%%Y-%%m-%%dT%%H:%%i:%%s.%%f+00:00'), "
            f"CASE WHEN pass THEN encoded END FROM (SELECT *, {passes} AS pass FROM {t}.outbox "
            f"WHERE {self._in_shard} {{exclude}} ORDER BY id LIMIT %s) o ORDER BY id"
        )
        self._state = (
            f"INSERT INTO {t}.relay_state (shard, leader, since, last_publish, published, "
            " dead_lettered, heartbeat) VALUES (%s, %s, utc_timestamp(6), "
            " CASE WHEN %s > 0 THEN utc_timestamp(6) END, %s, %s, utc_timestamp(6)) "
            "ON DUPLICATE KEY UPDATE "
            " since = IF(leader = VALUES(leader), since, utc_timestamp(6)), "
            " leader = VALUES(leader), "
            " last_publish = coalesce(VALUES(last_publish), last_publish), "
            " published = published + VALUES(published), "
            " dead_lettered = dead_lettered + VALUES(dead_lettered), "
            " heartbeat = utc_timestamp(6)"
        )

    # -- connection ---------------------------------------------------------------------------
    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        with self._lock:
            if self.conn is None:
                raise DatabaseUnavailable("relay's MariaDB connection is closed")
            try:
                with self.conn.cursor() as cur:
                    yield cur
            except mariadb.Error as exc:
                if not mariadb.is_lost(exc):
                    raise  # a setup mistake or a bug: say so, do not retry it forever
                raise DatabaseUnavailable(
                    f"MariaDB connection lost: {mariadb.message(exc)}") from exc

    def _one(self, sql: str, args: Any = None, get: Callable[[Any], T] = lambda r: r) -> T:
        with self._cursor() as cur:
            cur.execute(sql, args)
            return get(cur.fetchone())

    def connect(self) -> None:
        self.close()
        with self._lock:
            # a dead network must not hang the relay (and its lock) forever: reads and writes
            # time out, and the server drops the session (so the lock) a minute after silence
            self.conn = mariadb.connect(self.url, read_timeout=30, write_timeout=30,
                                        session_wait_timeout_s=60)

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                try:
                    self.conn.close()
                except pymysql.err.Error:
                    pass  # already gone
                finally:
                    self.conn = None

    # -- leadership ---------------------------------------------------------------------------
    def try_lead(self) -> bool:
        return self._one("SELECT GET_LOCK(%s, 0)", (self.lock_key,), lambda r: bool(r[0] == 1))

    def last_activity_ms(self) -> int | None:
        return self._one(
            "SELECT cast(unix_timestamp(heartbeat) * 1000 AS signed) FROM "
            f"{q(self.schema)}.relay_state WHERE shard = %s", (self.shard,),
            lambda r: None if r is None else int(r[0]),
        )

    def current_leader(self) -> str | None:
        return self._one(f"SELECT leader FROM {q(self.schema)}.relay_state WHERE shard = %s",
                         (self.shard,), lambda r: None if r is None else str(r[0]))

    # -- rows ---------------------------------------------------------------------------------
    def fetch(self, limit: int, exclude: list[int] | None = None) -> list[OutboxRow]:
        cond = f"AND id NOT IN ({_ints(exclude)})" if exclude else ""
        with self._cursor() as cur:
            cur.execute(self._select.replace("{exclude}", cond), (limit,))
            return [OutboxRow.from_stored(*r) for r in cur.fetchall()]

    def payload_text(self, outbox_id: int) -> str | None:
        return self._one(f"SELECT payload FROM {q(self.schema)}.outbox WHERE id = %s",
                         (outbox_id,), lambda r: None if r is None else str(r[0]))

    def pending_aggregate_types(self) -> list[str]:
        with self._cursor() as cur:
            cur.execute(f"SELECT DISTINCT aggregate_type FROM {q(self.schema)}.outbox "
                        f"WHERE {self._in_shard}")
            return [str(r[0]) for r in cur.fetchall()]

    def check_engine(self) -> None:
        """One engine on MariaDB: the table is polled."""

    def existing_events(self, found: set[tuple[int, str]]) -> list[int]:
        if not found:
            return []
        pairs = sorted(found)
        out: list[int] = []
        with self._cursor() as cur:
            for i in range(0, len(pairs), 1000):
                part = pairs[i:i + 1000]
                cur.execute(
                    f"SELECT id FROM {q(self.schema)}.outbox WHERE (id, event_id) IN ("
                    + ",".join(["(%s,%s)"] * len(part)) + ")",
                    [v for pair in part for v in pair])
                out += [int(r[0]) for r in cur.fetchall()]
        return sorted(out)

    def complete(self, ids: list[int], leader: str, published: int, dead_lettered: int) -> None:
        """Delete published (or dead-lettered) rows and account for them, atomically."""
        with self._cursor() as cur:
            try:
                cur.execute("START TRANSACTION")
                if ids:
                    cur.execute(f"DELETE FROM {q(self.schema)}.outbox WHERE id IN ({_ints(ids)})")
                cur.execute(self._state, (self.shard, leader, published, published,
                                          dead_lettered))
                cur.execute("COMMIT")
            except BaseException:
                if self.conn is not None and self.conn.open:
                    with suppress(mariadb.Error):
                        cur.execute("ROLLBACK")
                raise

    def wait(self, timeout: float) -> None:
        """No NOTIFY on MariaDB: the next poll comes after ``timeout`` or ``_IDLE_POLL_S``,
        whichever is sooner."""
        time.sleep(min(timeout, _IDLE_POLL_S))
