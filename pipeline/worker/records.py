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


def header_list(msg: Message) -> list[Any]:
    raw = msg.headers() or []
    return list(raw.items()) if isinstance(raw, dict) else raw


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
    ce_id, version_b = raw.get(names.CE_ID), raw.get(names.AGGREGATE_VERSION)
    if not ce_id or not version_b:
        pairs = ((names.CE_ID, ce_id), (names.AGGREGATE_VERSION, version_b))
        missing = [n for n, v in pairs if not v]
        raise DecodeError(
            f"record lacks header(s) {', '.join(missing)}: not an event published by the relay"
        )
    value = msg.value()
    schema = decoder.schema_of(value)  # framing and schema now, body on access
    subject, ce_type = raw.get(names.CE_SUBJECT), raw.get(names.CE_TYPE)
    agg_type, occurred, trace = (
        raw.get(names.AGGREGATE_TYPE),
        raw.get(names.CE_TIME),
        raw.get(names.TRACEPARENT),
    )
    try:
        version = int(version_b)
        occurred_at = dt.datetime.fromisoformat(occurred.decode()) if occurred else None
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
        attempt=_attempt(raw.get(names.ATTEMPTS)),
        traceparent=trace.decode() if trace else None,
        schema=schema,
        timestamp_ms=int(ts[1]) if ts and ts[1] > 0 else 0,
        extra={},
        load_payload=lambda: decoder.decode(value).value,
    )
    return ev


_new = object.__new__


def _attempt(header: bytes | None) -> int:
    """The attempts header (absent on a first delivery; a bad one counts as 1)."""
    if header is None:
        return 1
    return max(1, routing.read_int(header) or 1)
