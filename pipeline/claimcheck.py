"""Claim-check stores for events too large to travel inline (the relay's
``relay.max_inline_bytes``): the encoded event is stored here and the Kafka record carries a
``pipeline.claim_check`` reference that the shared decoder resolves.

Stores: ``table`` (``<schema>.claim_check`` in the ERP database, the default) and ``dir`` (a
directory shared by relay and consumers). An S3-compatible store is not implemented yet.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

from pipeline.config import Settings
from pipeline.errors import ConfigError, DecodeError


class ClaimStore(Protocol):
    name: str

    def put(self, event_id: str, body: bytes) -> str: ...

    def get(self, ref: str) -> bytes: ...

    def close(self) -> None: ...


class TableClaimStore:
    """Bodies in ``<schema>.claim_check``; ``put`` commits on its own connection."""

    name = "table"

    def __init__(self, conninfo: str, schema: str) -> None:
        self._conninfo = conninfo
        self._schema = schema
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _c(self) -> psycopg.Connection[Any]:
        with self._lock:  # the relay's two threads share a store
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._conninfo, autocommit=True)
            return self._conn

    def put(self, event_id: str, body: bytes) -> str:
        ref = str(uuid.uuid4())
        self._c().execute(
            sql.SQL("INSERT INTO {}.claim_check (ref, event_id, body) VALUES (%s, %s, %s)").format(
                sql.Identifier(self._schema)
            ),
            (ref, event_id, body),
        )
        return ref

    def get(self, ref: str) -> bytes:
        row = (
            self._c()
            .execute(
                sql.SQL("SELECT body FROM {}.claim_check WHERE ref = %s").format(
                    sql.Identifier(self._schema)
                ),
                (ref,),
            )
            .fetchone()
        )
        if row is None:
            raise DecodeError(
                f"claim-check reference {ref} not found in {self._schema}.claim_check"
            )
        return bytes(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class DirClaimStore:
    """Bodies as files ``<dir>/<ref>``, written atomically (temp file + rename)."""

    name = "dir"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def put(self, event_id: str, body: bytes) -> str:
        ref = str(uuid.uuid4())
        tmp = self.path / f".{ref}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / ref)
        return ref

    def get(self, ref: str) -> bytes:
        try:
            return (self.path / ref).read_bytes()
        except FileNotFoundError:
            raise DecodeError(f"claim-check reference {ref} not found in {self.path}") from None

    def close(self) -> None:
        """Nothing to release: files are opened per call."""


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def claim_store(settings: Settings) -> ClaimStore:
    """The claim-check store the configuration names (relay writes, consumers read)."""
    from pipeline.db import database_url

    cc = settings.relay.claim_check
    if cc.store == "dir":
        if cc.path is None:
            raise ConfigError("relay.claim_check.store is dir but relay.claim_check.path is unset")
        return DirClaimStore(cc.path)
    url = database_url(settings)
    from pipeline.mariadb import is_mariadb_url

    if is_mariadb_url(url):
        return MariaDbClaimStore(url, settings.database.schema_name)
    return TableClaimStore(url, settings.database.schema_name)


class MariaDbClaimStore:
    """Bodies in ``<schema>.claim_check`` on MariaDB / MySQL (the ``table`` store there)."""

    name = "table"

    def __init__(self, url: str, schema: str) -> None:
        from pipeline.outbox.mariadb import q

        self._url = url
        self._table = f"{q(schema)}.claim_check"
        self._schema = schema
        self._conn: Any = None
        self._lock = threading.Lock()

    def _run(self, query: str, args: tuple[Any, ...]) -> Any:
        from pipeline import mariadb

        with self._lock:  # PyMySQL connections are not thread-safe
            for attempt in (1, 2):
                if self._conn is None:
                    self._conn = mariadb.connect(self._url)
                try:
                    with self._conn.cursor() as cur:
                        cur.execute(query, args)
                        return cur.fetchone()
                except mariadb.LOST:
                    self._conn = None  # reconnect once: the store is used rarely
                    if attempt == 2:
                        raise
        return None

    def put(self, event_id: str, body: bytes) -> str:
        ref = str(uuid.uuid4())
        self._run(f"INSERT INTO {self._table} (ref, event_id, body, created_at) "
                  "VALUES (%s, %s, %s, utc_timestamp(6))", (ref, event_id, body))
        return ref

    def get(self, ref: str) -> bytes:
        row = self._run(f"SELECT body FROM {self._table} WHERE ref = %s", (ref,))
        if row is None:
            raise DecodeError(
                f"claim-check reference {ref} not found in {self._schema}.claim_check")
        return bytes(row[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
