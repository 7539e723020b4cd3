"""A consumed Kafka record as an :class:`~pipeline.worker.connector.Event`: the relay's headers
read at once, the Avro body decoded on first access (or at once, for batch sinks)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from confluent_kafka import Message

from pipeline.errors import DecodeError
from pipeline.kafka import names
from pipeline.schemas.codec import Decoder
from pipeline.worker import routing
from pipeline.worker.connector import Event


def headers_of(msg: Message) -> dict[str, Any]:
    """The record's headers, name → bytes (the last of a repeated name wins)."""
    raw = msg.headers()
    return dict(raw) if raw else {}  # a list of pairs from Kafka; a dict from a hand-made one


# header names bound once: the functions below run once per consumed record
_CE_ID, _VERSION, _CE_SUBJECT, _CE_TYPE = (
    names.CE_ID, names.AGGREGATE_VERSION, names.CE_SUBJECT, names.CE_TYPE)
_AGG_TYPE, _CE_TIME, _TRACEPARENT, _ATTEMPTS = (
    names.AGGREGATE_TYPE, names.CE_TIME, names.TRACEPARENT, names.ATTEMPTS)
_fromisoformat = dt.datetime.fromisoformat


def event_of(
    decoder: Decoder,
    msg: Message,
    tp: tuple[str, int],
    offset: int,
    raw: dict[str, Any],
) -> Event:
    """The event of a record: the headers it needs now, the body on first access.

    Raises :class:`~pipeline.errors.DecodeError` when the record was not published by the relay
    (no ``ce_id`` / aggregate version) or its framing names no known schema."""
    get = raw.get
    ce_id, version_b = get(_CE_ID), get(_VERSION)
    if not ce_id or not version_b:
        pairs = ((_CE_ID, ce_id), (_VERSION, version_b))
        missing = [n for n, v in pairs if not v]
        raise DecodeError(
            f"record lacks header(s) {', '.join(missing)}: not an event published by the relay"
        )
    value = msg.value()
    schema = decoder.schema_of(value)  # framing and schema now, body on access
    subject, ce_type, agg_type = get(_CE_SUBJECT), get(_CE_TYPE), get(_AGG_TYPE)
    occurred, trace, attempts = get(_CE_TIME), get(_TRACEPARENT), get(_ATTEMPTS)
    try:
        version = int(version_b)
        occurred_at = _fromisoformat(occurred.decode()) if occurred else None
    except ValueError as exc:
        raise DecodeError(f"bad event header: {exc}") from exc
    key = msg.key()
    ts = msg.timestamp()
    # Built through its __dict__: a frozen dataclass's __init__ sets each of its 16 fields with
    # object.__setattr__, a tenth of a no-op event's trip through the worker. Every field is
    # given here (tests/unit/test_worker_records.py holds this list to Event's fields).
    ev: Event = _new(Event)
    ev.__dict__.update(
        event_id=ce_id.decode(),
        event_type=ce_type.decode() if ce_type else schema.event_type,
        aggregate_type=agg_type.decode() if agg_type else tp[0].rsplit(".", 1)[-1],
        aggregate_id=subject.decode() if subject else (key.decode() if key else ""),
        aggregate_version=version,
        occurred_at=occurred_at,
        raw_headers=raw,
        topic=tp[0],
        partition=tp[1],
        offset=offset,
        attempt=1 if attempts is None else _attempt(attempts),
        traceparent=trace.decode() if trace else None,
        schema=schema,
        timestamp_ms=int(ts[1]) if ts and ts[1] > 0 else 0,
        extra={},
        load_payload=lambda: decoder.decode(value).value,
    )
    return ev


_new = object.__new__


def _attempt(header: bytes) -> int:
    """The attempts header (absent on a first delivery; a bad one counts as 1)."""
    return max(1, routing.read_int(header) or 1)
