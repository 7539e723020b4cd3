"""The inbox ledger: effectively-once, order-safe apply for sinks that live in PostgreSQL.

    with conn.transaction():
        if ledger.claim(conn, event):      # False: a duplicate, or older than what is applied
            ...  # the sink's own writes, in the same transaction

The claim and the sink's writes commit or roll back together, so a redelivered event (after a
crash or a rebalance) is skipped, and a stale version is never applied over a newer one.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pipeline.worker.connector import Event


class Ledger:
    def __init__(self, group: str, schema: str = "pipeline") -> None:
        self.group = group
        s = sql.Identifier(schema)
        self._insert = sql.SQL(
            "INSERT INTO {}.inbox (consumer_group, event_id, aggregate_type, aggregate_id, "
            "version) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        ).format(s)
        # Upsert the key's version only forwards; returns a row when this version is newer.
        self._advance = sql.SQL(
            "INSERT INTO {}.inbox_versions AS v (consumer_group, aggregate_type, aggregate_id, "
            "version) VALUES (%s, %s, %s, %s) ON CONFLICT (consumer_group, aggregate_type, "
            "aggregate_id) DO UPDATE SET version = excluded.version "
            "WHERE v.version < excluded.version RETURNING version"
        ).format(s)

    def claim(self, conn: psycopg.Connection[Any], event: Event) -> bool:
        """Record the event in the caller's transaction; False means: skip it."""
        cur = conn.execute(
            self._insert,
            (
                self.group,
                event.event_id,
                event.aggregate_type,
                event.aggregate_id,
                event.aggregate_version,
            ),
        )
        if cur.rowcount == 0:
            return False  # already applied
        row = conn.execute(
            self._advance,
            (self.group, event.aggregate_type, event.aggregate_id, event.aggregate_version),
        ).fetchone()
        return row is not None  # None: a newer version was applied before
