"""``emit()``: write one event into the outbox inside the caller's own transaction.

The payload is validated against the event type's Avro schema first, so a bad event fails in
the ERP's transaction (with the offending field named) instead of reaching the relay. Validating
is encoding: the Avro bytes are stored beside the jsonb payload (``outbox.encoded``), and the
relay sends them as they are instead of parsing and encoding the payload again. The current
OpenTelemetry context is stored in the row's headers so the trace continues through Kafka.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import psycopg
from opentelemetry import propagate
from psycopg import sql
from psycopg.types.json import Jsonb

from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder


@lru_cache(maxsize=4)
def _encoder(path: str | None) -> Encoder:
    from pathlib import Path

    return Encoder(Catalogue.load(Path(path) if path else None))


_ENCODERS: dict[int, tuple[Catalogue, Encoder]] = {}


def _encoder_of(catalogue: Catalogue) -> Encoder:
    """One encoder per catalogue: an encoder compiles each schema on first use, which costs far
    more than encoding (an encoder per call made every emit() pay it)."""
    hit = _ENCODERS.get(id(catalogue))
    if hit is None or hit[0] is not catalogue:
        if len(_ENCODERS) >= 8:
            _ENCODERS.clear()
        hit = _ENCODERS[id(catalogue)] = (catalogue, Encoder(catalogue))
    return hit[1]


def emit(
    conn: psycopg.Connection[Any],
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
    """Insert one event; returns its aggregate version (1, 2, 3 … per aggregate).

    Raises :class:`~pipeline.errors.SchemaError` for an unknown event type and
    :class:`~pipeline.errors.PayloadError` for a payload that does not match its schema. The
    caller commits (or rolls back) as part of its own transaction.
    """
    query, params = emit_statement(conn, aggregate_type, aggregate_id, event_type, payload,
                                   headers=headers, event_id=event_id, schema=schema,
                                   catalogue=catalogue, validate=validate)
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def emit_statement(
    conn: psycopg.Connection[Any],
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
) -> tuple[sql.Composed, tuple[Any, ...]]:
    """The statement :func:`emit` runs for one event and its parameters, the payload validated
    and encoded now (same errors as :func:`emit`): ``conn.execute(*emit_statement(...))``
    writes the event. A writer that paces many events (the latency benches' ERP) builds them
    before its clock starts, so that the clock measures the writes alone."""
    value, carrier = validated(event_type, payload, headers, catalogue, validate)
    encoded = value if value is not None and _takes_encoded(conn, schema) else None
    query = sql.SQL(
        "SELECT {}.outbox_emit(%s, %s, %s, %s, %s, %s, %s)"
        if encoded is not None else "SELECT {}.outbox_emit(%s, %s, %s, %s, %s, %s)"
    ).format(sql.Identifier(schema))
    params = (
        aggregate_type,
        str(aggregate_id),
        event_type,
        Jsonb(payload, dumps=_dumps),
        Jsonb(carrier),
        str(event_id) if event_id is not None else str(uuid.uuid4()),
        *([encoded] if encoded is not None else []),
    )
    return query, params


def validated(event_type: str, payload: Mapping[str, Any], headers: Mapping[str, str] | None,
              catalogue: Catalogue | None, validate: bool) -> tuple[bytes | None, dict[str, str]]:
    """(the Avro bytes, or None without ``validate``; the headers with the current trace
    context): what every database's ``emit()`` writes beside the payload. Validating is
    encoding: the bytes are kept, so the relay moves them as they are."""
    value = None
    if validate:
        encoder = _encoder_of(catalogue) if catalogue is not None else _encoder(None)
        value = encoder.encode(event_type, payload, topic="").value
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return value, carrier


_TAKES_ENCODED: dict[tuple[str, str, str, str], bool] = {}


def _takes_encoded(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Whether the installed outbox_emit takes the encoded bytes (migration 0004): an ERP on a
    newer library than its installed outbox keeps writing, the relay encoding its events.
    Asked once per database and schema."""
    info = conn.info
    key = (info.host, str(info.port), info.dbname, schema)
    known = _TAKES_ENCODED.get(key)
    if known is None:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s AND p.proname = 'outbox_emit' AND p.pronargs = 7)",
            (schema,),
        ).fetchone()
        known = _TAKES_ENCODED[key] = bool(row and row[0])
    return known


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
