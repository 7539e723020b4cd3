"""Pure relay logic: an outbox row in, a Kafka record (or a dead letter) out."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import random
import uuid
from typing import Any

import pytest

from pipeline.errors import PayloadError, PayloadTooLarge, SchemaError
from pipeline.kafka import names as h
from pipeline.relay.envelope import (
    OutboxRow,
    Oversized,
    Record,
    build_record,
    claim_check_record,
    dead_letter_record,
    dead_letter_stub,
    event_headers,
)
from pipeline.schemas.catalogue import CLAIM_CHECK, Catalogue
from pipeline.schemas.codec import Decoder, Encoder
from pipeline.schemas.jsonform import to_json_form
from pipeline.simulator.payloads import payload_for

TOPIC = "erp.order"
SOURCE = "/erp/test"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EVENT_ID = "3f2b8c1e-2d4a-4a8e-9b1c-5d6e7f8a9b0c"
OCCURRED = "2026-11-27T07:15:00.123456+00:00"
BIG = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue.load()


@pytest.fixture
def encoder(catalogue: Catalogue) -> Encoder:
    return Encoder(catalogue)


def payload() -> dict[str, Any]:
    return payload_for("order.created", random.Random(3), aggregate_id="SO-000123",
                       now=dt.datetime(2026, 11, 27, 7, 15, 0, 123456, tzinfo=dt.UTC))


def make_row(**kw: Any) -> OutboxRow:
    base: dict[str, Any] = {
        "id": 4711,
        "event_id": EVENT_ID,
        "aggregate_type": "order",
        "aggregate_id": "SO-000123",
        "aggregate_version": 3,
        "event_type": "order.created",
        "payload": payload(),
        "headers": {"traceparent": TRACEPARENT},
        "occurred_at": OCCURRED,
    }
    base.update(kw)
    return OutboxRow(**base)


def hdict(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    return {n: v.decode() for n, v in headers}


def names(headers: list[tuple[str, bytes]]) -> list[str]:
    return [n for n, _ in headers]


def build(row: OutboxRow, encoder: Encoder, **kw: Any) -> Record | Oversized:
    args: dict[str, Any] = {"topic": TOPIC, "source": SOURCE, "max_inline_bytes": 256 * 1024,
                            "max_payload_bytes": BIG}
    args.update(kw)
    return build_record(row, encoder, **args)


# -- build_record --------------------------------------------------------------------------------


def test_record_headers_key_and_value(encoder: Encoder, catalogue: Catalogue) -> None:
    row = make_row()
    rec = build(row, encoder)
    assert isinstance(rec, Record)
    assert rec.topic == TOPIC
    assert rec.key == b"SO-000123"
    assert hdict(rec.headers) == {
        "ce_specversion": "1.0",
        "ce_id": EVENT_ID,
        "ce_type": "order.created",
        "ce_source": SOURCE,
        "ce_subject": "SO-000123",
        "ce_time": OCCURRED,
        "content-type": "application/avro",
        "erp_aggregate_type": "order",
        "erp_aggregate_version": "3",
        "erp_outbox_position": "4711",
        "traceparent": TRACEPARENT,
    }
    assert all(isinstance(v, bytes) for _, v in rec.headers)
    decoded = Decoder(catalogue).decode(rec.value)
    assert decoded.event_type == "order.created"
    assert to_json_form(decoded.value) == row.payload


def test_row_headers_cannot_override_reserved_headers(encoder: Encoder) -> None:
    evil = {
        "ce_type": "order.cancelled",
        "ce_id": "forged",
        "ce_source": "/elsewhere",
        "ce_subject": "SO-999999",
        "ce_time": "1970-01-01T00:00:00Z",
        "ce_specversion": "0.3",
        "content-type": "text/plain",
        "erp_aggregate_type": "customer",
        "erp_aggregate_version": "99",
        "erp_outbox_position": "1",
        "erp_claim_check": "dir",
        "erp_capture": "public.sale_order",
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=1",
        "x-tenant": "acme",
        "x-count": 3,
        "x-obj": {"a": 1},
    }
    rec = build(make_row(headers=evil), encoder)
    assert isinstance(rec, Record)
    hn = names(rec.headers)
    assert len(hn) == len(set(hn)), f"duplicate header names: {hn}"
    d = hdict(rec.headers)
    assert d["ce_type"] == "order.created"
    assert d["ce_id"] == EVENT_ID
    assert d["ce_source"] == SOURCE
    assert d["ce_subject"] == "SO-000123"
    assert d["ce_time"] == OCCURRED
    assert d["ce_specversion"] == "1.0"
    assert d["content-type"] == "application/avro"
    assert d["erp_aggregate_type"] == "order"
    assert d["erp_aggregate_version"] == "3"
    assert d["erp_outbox_position"] == "4711"
    assert "erp_claim_check" not in d
    assert "erp_capture" not in d
    assert d["traceparent"] == TRACEPARENT
    assert d["tracestate"] == "vendor=1"
    assert d["x-tenant"] == "acme"
    assert json.loads(d["x-count"]) == 3
    assert json.loads(d["x-obj"]) == {"a": 1}


def test_event_headers_without_row_headers() -> None:
    hdrs = event_headers(make_row(headers={}), SOURCE)
    assert names(hdrs) == [
        h.CE_SPECVERSION, h.CE_ID, h.CE_TYPE, h.CE_SOURCE, h.CE_SUBJECT, h.CE_TIME,
        h.CONTENT_TYPE, h.AGGREGATE_TYPE, h.AGGREGATE_VERSION, h.OUTBOX_POSITION,
    ]


def test_key_is_the_aggregate_id_utf8(encoder: Encoder) -> None:
    rec = build(make_row(aggregate_id="Kunde-Müller"), encoder)
    assert isinstance(rec, Record)
    assert rec.key == "Kunde-Müller".encode()
    assert hdict(rec.headers)["ce_subject"] == "Kunde-Müller"


def test_same_row_gives_the_same_record(encoder: Encoder) -> None:
    assert build(make_row(), encoder) == build(make_row(), encoder)


def test_oversized_above_max_inline_bytes(encoder: Encoder, catalogue: Catalogue) -> None:
    inline = build(make_row(), encoder)
    assert isinstance(inline, Record)
    size = len(inline.value)
    exact = build(make_row(), encoder, max_inline_bytes=size)
    assert isinstance(exact, Record)  # at the limit: still inline
    over = build(make_row(), encoder, max_inline_bytes=size - 1)
    assert isinstance(over, Oversized)
    assert over.event_type == "order.created"
    assert over.body == inline.value
    assert Decoder(catalogue).decode(over.body).event_type == "order.created"


def test_payload_too_large_above_max_payload_bytes(encoder: Encoder) -> None:
    inline = build(make_row(), encoder)
    assert isinstance(inline, Record)
    size = len(inline.value)
    with pytest.raises(PayloadTooLarge) as ei:
        build(make_row(), encoder, max_inline_bytes=10, max_payload_bytes=size - 1)
    msg = str(ei.value)
    assert EVENT_ID in msg
    assert "order.created" in msg
    assert f"encodes to {size} bytes" in msg
    assert f"relay.max_payload_bytes={size - 1}" in msg
    # at the limit it is claim-checked, not rejected
    assert isinstance(build(make_row(), encoder, max_inline_bytes=10, max_payload_bytes=size),
                      Oversized)


def test_invalid_payload_raises_payload_error(encoder: Encoder) -> None:
    p = payload()
    p["total"] = "12.345"
    with pytest.raises(PayloadError) as ei:
        build(make_row(payload=p), encoder)
    assert ei.value.path == "total"
    assert "more than 2 decimal places" in str(ei.value)


def test_unknown_event_type_raises_schema_error(encoder: Encoder) -> None:
    with pytest.raises(SchemaError, match=r"unknown event type 'order\.teleported'"):
        build(make_row(event_type="order.teleported"), encoder)


def test_captured_row_builds_a_row_change_record(encoder: Encoder, catalogue: Catalogue) -> None:
    row = make_row(
        event_type="sale_order.created",
        aggregate_id="7",
        payload={"table": "public.sale_order", "operation": "INSERT", "key": "7",
                 "row": {"id": 7, "name": "x"}, "old_row": None},
        headers={"erp_capture": "public.sale_order"},
    )
    rec = build(row, encoder)
    assert isinstance(rec, Record)
    d = hdict(rec.headers)
    assert d["ce_type"] == "sale_order.created"
    assert "erp_capture" not in d
    decoded = Decoder(catalogue).decode(rec.value)
    assert decoded.event_type == "pipeline.row_change"
    assert json.loads(decoded.value["row"]) == {"id": 7, "name": "x"}


# -- dead letters --------------------------------------------------------------------------------


def test_dead_letter_record_is_the_row_as_json_with_error_headers() -> None:
    row = make_row(payload={"nonsense": True})
    err = PayloadError("payload of order.created does not match its schema: order_id: "
                       "required field is missing", event_type="order.created", path="order_id")
    rec, body = dead_letter_record(row, err, topic="erp.outbox.dlq", source=SOURCE,
                                   max_inline_bytes=256 * 1024)
    assert body is None
    assert rec.topic == "erp.outbox.dlq"
    assert rec.key == b"SO-000123"
    assert json.loads(rec.value) == {
        "id": 4711, "event_id": EVENT_ID, "aggregate_type": "order",
        "aggregate_id": "SO-000123", "aggregate_version": 3, "event_type": "order.created",
        "payload": {"nonsense": True}, "headers": {"traceparent": TRACEPARENT},
        "occurred_at": OCCURRED,
    }
    d = hdict(rec.headers)
    assert d["erp_error_class"] == "pipeline.errors.PayloadError"
    assert d["erp_error_message"] == str(err)
    assert d["content-type"] == "application/json"
    assert names(rec.headers).count("content-type") == 1
    assert d["ce_id"] == EVENT_ID
    assert d["ce_type"] == "order.created"
    assert d["traceparent"] == TRACEPARENT


def test_dead_letter_error_message_is_bounded() -> None:
    rec, _ = dead_letter_record(make_row(), ValueError("x" * 10_000), topic="dlq",
                                source=SOURCE, max_inline_bytes=256 * 1024)
    d = hdict(rec.headers)
    assert d["erp_error_class"] == "builtins.ValueError"
    assert len(d["erp_error_message"]) == 4000


def test_oversized_dead_letter_returns_the_body_to_claim_check() -> None:
    row = make_row(payload={"blob": "y" * 5000})
    rec, body = dead_letter_record(row, PayloadTooLarge("too big"), topic="dlq", source=SOURCE,
                                   max_inline_bytes=1024)
    assert body is not None
    assert json.loads(body) == row.as_json()
    assert rec.value == b""
    stub = dead_letter_stub(rec, row, "table", "ref-1", len(body))
    meta = json.loads(stub.value)
    assert "payload" not in meta
    assert meta["payload_claim_check"] == {"store": "table", "ref": "ref-1",
                                           "size_bytes": len(body)}
    assert meta["event_id"] == EVENT_ID
    d = hdict(stub.headers)
    assert d["erp_claim_check"] == "table"
    assert d["erp_error_class"] == "pipeline.errors.PayloadTooLarge"
    assert stub.key == rec.key
    assert stub.topic == "dlq"


def test_dead_letter_of_a_non_json_payload_value() -> None:
    row = make_row(payload={"when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)})
    rec, _ = dead_letter_record(row, ValueError("bad"), topic="dlq", source=SOURCE,
                                max_inline_bytes=256 * 1024)
    assert json.loads(rec.value)["payload"] == {"when": "2026-01-01 00:00:00+00:00"}


# -- claim check ---------------------------------------------------------------------------------


def test_claim_check_record(encoder: Encoder, catalogue: Catalogue) -> None:
    row = make_row()
    over = build(row, encoder, max_inline_bytes=10)
    assert isinstance(over, Oversized)
    ref = str(uuid.uuid4())
    sha = hashlib.sha256(over.body).hexdigest()
    rec = claim_check_record(row, encoder, over, topic=TOPIC, source=SOURCE, store="table",
                             ref=ref, sha256=sha)
    assert rec.topic == TOPIC
    assert rec.key == b"SO-000123"
    decoded = Decoder(catalogue).decode(rec.value)
    assert decoded.event_type == CLAIM_CHECK
    assert decoded.value == {"event_type": "order.created", "store": "table", "ref": ref,
                             "size_bytes": len(over.body), "sha256": sha}
    d = hdict(rec.headers)
    assert d["erp_claim_check"] == "table"
    assert d["ce_type"] == "order.created"  # the event's type, not the envelope's
    assert d["ce_id"] == EVENT_ID
    assert d["content-type"] == "application/avro"


def test_outbox_row_is_frozen() -> None:
    row = make_row()
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.id = 1  # type: ignore[misc]
    assert row.as_json()["occurred_at"] == OCCURRED
