"""Backlog and leadership figures of the outbox (``pipeline outbox status``)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pipeline.outbox.engine import SlotState, current_engine, slot_states


@dataclass(frozen=True)
class ShardState:
    shard: int
    leader: str
    since: dt.datetime
    last_publish: dt.datetime | None
    published: int
    dead_lettered: int
    heartbeat_age_s: float


@dataclass(frozen=True)
class OutboxStatus:
    installed_version: int | None
    backlog_rows: int
    oldest_unpublished_age_s: float | None
    shards: list[ShardState]
    # what outbox_emit writes for (relay.engine), and the WAL engine's replication slots
    engine: str = "poll"
    slots: list[SlotState] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for s in d["shards"]:
            s["since"] = s["since"].isoformat()
            s["last_publish"] = s["last_publish"].isoformat() if s["last_publish"] else None
        return d


def outbox_status(conn: Any, schema: str) -> OutboxStatus:
    """From a psycopg connection, or a PyMySQL one (``pipeline.outbox.mariadb``)."""
    if not isinstance(conn, psycopg.Connection):
        from pipeline.outbox import mariadb

        return mariadb.outbox_status(conn, schema)
    from pipeline.outbox.migrations import installed_version

    version = installed_version(conn, schema)
    if version is None:
        return OutboxStatus(None, 0, None, [])
    s = sql.Identifier(schema)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), extract(epoch FROM clock_timestamp() - min(occurred_at)) "
            "FROM {}.outbox"
        ).format(s)
    ).fetchone()
    assert row is not None
    shards = [
        ShardState(r[0], r[1], r[2], r[3], r[4], r[5], float(r[6]))
        for r in conn.execute(
            sql.SQL(
                "SELECT shard, leader, since, last_publish, published, dead_lettered, "
                "extract(epoch FROM clock_timestamp() - heartbeat) FROM {}.relay_state "
                "ORDER BY shard"
            ).format(s)
        ).fetchall()
    ]
    return OutboxStatus(version, int(row[0]), None if row[1] is None else float(row[1]), shards,
                        current_engine(conn, schema)[0], slot_states(conn, schema))


class BacklogProbe:
    """Backlog figures for the metrics gauges, read on its own connection (a scrape runs on
    another thread than the relay's) at most every ``every_s`` seconds."""

    def __init__(self, url: str, schema: str, every_s: float = 5.0) -> None:
        self.url = url
        self.schema = schema
        self.every_s = every_s
        self._at = 0.0
        self._rows = 0.0
        self._age = 0.0
        self._slots: list[SlotState] = []
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._at < self.every_s:
                return
            self._at = time.monotonic()
            from pipeline.mariadb import is_mariadb_url

            if is_mariadb_url(self.url):
                self._refresh_mariadb()
                return
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                    row = conn.execute(
                        sql.SQL(
                            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - "
                            "min(occurred_at)), 0) FROM {}.outbox"
                        ).format(sql.Identifier(self.schema))
                    ).fetchone()
                    slots = slot_states(conn, self.schema)
            except psycopg.Error:
                return  # keep the last figures; the relay's own log says what is wrong
            if row is not None:
                self._rows, self._age = float(row[0]), float(row[1])
            self._slots = slots

    def _refresh_mariadb(self) -> None:
        from pipeline import mariadb
        from pipeline.errors import DatabaseUnavailable
        from pipeline.outbox.mariadb import backlog

        try:
            with mariadb.connect(self.url, connect_timeout=3) as conn:
                self._rows, self._age = backlog(conn, self.schema)
        except (DatabaseUnavailable, mariadb.Error):
            return  # keep the last figures; the relay's own log says what is wrong

    def rows(self) -> list[tuple[float, dict[str, Any]]]:
        self._refresh()
        return [(self._rows, {})]

    def oldest_age(self) -> list[tuple[float, dict[str, Any]]]:
        self._refresh()
        return [(self._age, {})]

    def slot_retained_bytes(self) -> list[tuple[float, dict[str, Any]]]:
        """WAL the server keeps for each WAL-engine slot (relay.engine: wal)."""
        self._refresh()
        return [(float(s.retained_bytes or 0), {"slot": s.slot_name, "shard": s.shard})
                for s in self._slots if s.exists]

    def slot_lag_bytes(self) -> list[tuple[float, dict[str, Any]]]:
        """WAL written since each slot's confirmed position: what its relay has not read."""
        self._refresh()
        return [(float(s.lag_bytes or 0), {"slot": s.slot_name, "shard": s.shard})
                for s in self._slots if s.exists]
