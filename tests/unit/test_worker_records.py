"""The Event a consumed record becomes (pipeline.worker.records.event_of), built without a
broker: confluent-kafka's Message can be made by hand."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random

import pytest
from confluent_kafka import Message

from pipeline.errors import DecodeError
from pipeline.kafka import names
from pipeline.relay.envelope import OutboxRow, Record, build_record
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder, Encoder
from pipeline.simulator.payloads import payload_for
from pipeline.worker.connector import Event
from pipeline.worker.records import event_of, headers_of

NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)


def _record(extra_headers: list[tuple[str, bytes]] = ()) -> Message:  # type: ignore[assignment]
    cat = Catalogue.load()
    payload = payload_for("order.created", random.Random(3), aggregate_id="SO-00042", now=NOW)
    row = OutboxRow(7, "0b6f6d7e-1c1a-4d38-9c55-2d4f1b0c9e01", "order", "SO-00042", 3,
                    "order.created", payload, {}, NOW.isoformat())
    rec = build_record(row, Encoder(cat), topic="erp.order", source="/test",
                       max_inline_bytes=1 << 20, max_payload_bytes=1 << 24)
    assert isinstance(rec, Record)
    return Message(topic="erp.order", partition=2, offset=11, key=rec.key, value=rec.value,
                   headers=[*rec.headers, *extra_headers], timestamp=(1, 1_764_000_000_123))


def _event(msg: Message) -> Event:
    return event_of(Decoder(Catalogue.load()), msg, ("erp.order", 2), 11,
                    headers_of(msg))


def test_every_field_of_the_event_is_set() -> None:
    ev = _event(_record())
    fields = {f.name for f in dataclasses.fields(Event)}
    assert set(vars(ev)) >= fields  # built through __dict__: none may be forgotten
    assert (ev.event_id, ev.event_type, ev.aggregate_type, ev.aggregate_id) == (
        "0b6f6d7e-1c1a-4d38-9c55-2d4f1b0c9e01", "order.created", "order", "SO-00042")
    assert (ev.aggregate_version, ev.topic, ev.partition, ev.offset) == (3, "erp.order", 2, 11)
    assert ev.occurred_at == NOW
    assert ev.attempt == 1 and ev.traceparent is None and ev.extra == {}
    assert ev.timestamp_ms == 1_764_000_000_123
    assert ev.schema is not None and ev.schema.event_type == "order.created"
    assert isinstance(ev.payload, dict) and ev.payload  # decoded on first access


def test_it_equals_the_event_its_constructor_makes_and_stays_frozen() -> None:
    ev = _event(_record())
    made = Event(**{f.name: getattr(ev, f.name) for f in dataclasses.fields(Event)})
    assert ev == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.event_id = "changed"  # type: ignore[misc]
    ev.extra["note"] = 1  # a handler's scratch space is its own per event
    assert _event(_record()).extra == {}


def test_the_attempts_header_counts_retries_and_a_bad_one_counts_as_one() -> None:
    assert _event(_record([(names.ATTEMPTS, (3).to_bytes(4, "big"))])).attempt == 3
    assert _event(_record([(names.ATTEMPTS, b"\x00")])).attempt == 1


def test_a_record_without_the_relay_headers_is_refused_by_name() -> None:
    msg = Message(topic="erp.order", partition=0, offset=1, value=b"\x00", headers=[])
    with pytest.raises(DecodeError, match=r"lacks header.*ce_id.*not an event published"):
        _event(msg)
