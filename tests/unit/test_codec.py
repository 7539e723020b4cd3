"""Avro encoding of events: single-object and Confluent framing, the decoder, error messages."""

from __future__ import annotations

import datetime as dt
import io
import json
import random
import struct
from dataclasses import dataclass
from typing import Any

import fastavro
import pytest

from pipeline.errors import DecodeError, PayloadError, SchemaError, UnknownSchema
from pipeline.schemas.catalogue import CLAIM_CHECK, ROW_CHANGE, Catalogue, rabin_fingerprint
from pipeline.schemas.codec import Decoder, Encoder, RegistryClient
from pipeline.schemas.jsonform import to_json_form
from pipeline.simulator.payloads import EVENT_TYPES, payload_for

NOW = dt.datetime(2026, 11, 27, 7, 15, 0, 123456, tzinfo=dt.UTC)
TOPIC = "erp.order"


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue.load()


def sample(event_type: str, seed: int = 1) -> dict[str, Any]:
    agg = "CUST-1001" if event_type == "customer.upserted" else "SO-000042"
    return payload_for(event_type, random.Random(seed), aggregate_id=agg, now=NOW)


# -- a tiny in-memory Schema Registry -------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    schema_str: str
    schema_type: str = "AVRO"


class MemoryRegistry:
    """Just enough of confluent-kafka's SchemaRegistryClient for the codec."""

    def __init__(self, first_id: int = 100_001) -> None:
        self._next = first_id
        self.by_id: dict[int, _Stored] = {}
        self.subjects: dict[str, list[int]] = {}
        self.register_calls = 0

    def register_schema(self, subject_name: str, schema: Any) -> int:
        self.register_calls += 1
        text = schema.schema_str
        sid = next((i for i, s in self.by_id.items() if s.schema_str == text), None)
        if sid is None:
            sid = self._next
            self._next += 1
            self.by_id[sid] = _Stored(text, getattr(schema, "schema_type", "AVRO"))
        ids = self.subjects.setdefault(subject_name, [])
        if sid not in ids:
            ids.append(sid)
        return sid

    def get_schema(self, schema_id: int) -> Any:
        try:
            return self.by_id[schema_id]
        except KeyError:
            raise LookupError(f"Schema {schema_id} not found (40403)") from None


def test_memory_registry_satisfies_the_protocol() -> None:
    reg: RegistryClient = MemoryRegistry()
    assert callable(reg.register_schema)
    assert callable(reg.get_schema)


# -- single-object encoding ----------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_round_trip_every_catalogue_event_type(catalogue: Catalogue, event_type: str) -> None:
    payload = sample(event_type)
    enc = Encoder(catalogue).encode(event_type, payload, topic=TOPIC)
    assert enc.schema is catalogue.writer(event_type)
    decoded = Decoder(catalogue).decode(enc.value)
    assert decoded.event_type == event_type
    assert decoded.wire_form == "single-object"
    assert decoded.schema.fingerprint == catalogue.writer(event_type).fingerprint
    assert to_json_form(decoded.value) == payload


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_single_object_header(catalogue: Catalogue, event_type: str) -> None:
    value = Encoder(catalogue).encode(event_type, sample(event_type), topic=TOPIC).value
    sv = catalogue.writer(event_type)
    assert value[:2] == b"\xc3\x01"
    (fp,) = struct.unpack("<Q", value[2:10])
    assert fp == sv.fingerprint == rabin_fingerprint(sv.canonical.encode())
    assert value[2:10] == sv.fingerprint_le
    # the body after the 10-byte header is plain Avro of the writer schema
    body = fastavro.schemaless_reader(io.BytesIO(value[10:]), sv.parsed, None)
    assert to_json_form(body) == sample(event_type)


def test_encoding_is_deterministic(catalogue: Catalogue) -> None:
    enc = Encoder(catalogue)
    p = sample("order.created")
    assert enc.encode("order.created", p, topic=TOPIC).value == \
        enc.encode("order.created", p, topic="other").value


def test_decoder_reads_every_known_version(catalogue: Catalogue) -> None:
    for event_type in catalogue.event_types:
        for sv in catalogue.versions(event_type):
            assert catalogue.by_fingerprint(sv.fingerprint) is sv


def test_unknown_event_type_raises_schema_error(catalogue: Catalogue) -> None:
    with pytest.raises(SchemaError) as ei:
        Encoder(catalogue).encode("order.vanished", {}, topic=TOPIC)
    assert "unknown event type 'order.vanished'" in str(ei.value)
    assert "order.vanished/v1.avsc" in str(ei.value)


def test_invalid_payload_raises_payload_error(catalogue: Catalogue) -> None:
    p = sample("order.created")
    p["lines"][0]["qty"] = "two"
    with pytest.raises(PayloadError) as ei:
        Encoder(catalogue).encode("order.created", p, topic=TOPIC)
    assert ei.value.event_type == "order.created"
    assert ei.value.path == "lines[0].qty"
    assert "payload of order.created does not match its schema: lines[0].qty" in str(ei.value)


# -- decoder errors ------------------------------------------------------------------------------


def test_unknown_fingerprint_raises_unknown_schema_with_hex(catalogue: Catalogue) -> None:
    body = Encoder(catalogue).encode("order.created", sample("order.created"), topic=TOPIC).value
    forged = b"\xc3\x01" + bytes([1, 2, 3, 4, 5, 6, 7, 8]) + body[10:]
    with pytest.raises(UnknownSchema) as ei:
        Decoder(catalogue).decode(forged)
    msg = str(ei.value)
    assert "unknown schema fingerprint 0807060504030201" in msg  # the little-endian value
    assert "deploy the newer catalogue" in msg
    assert isinstance(ei.value, DecodeError)


@pytest.mark.parametrize("value", [b"", None])
def test_empty_value(catalogue: Catalogue, value: bytes | None) -> None:
    with pytest.raises(DecodeError) as ei:
        Decoder(catalogue).decode(value)
    assert str(ei.value) == "empty record value: no Avro payload to decode"


@pytest.mark.parametrize("length", [2, 5, 9])
def test_truncated_single_object_header(catalogue: Catalogue, length: int) -> None:
    value = Encoder(catalogue).encode("order.created", sample("order.created"), topic=TOPIC).value
    with pytest.raises(DecodeError) as ei:
        Decoder(catalogue).decode(value[:length])
    assert str(ei.value) == f"truncated single-object header ({length} bytes)"
    assert not isinstance(ei.value, UnknownSchema)


@pytest.mark.parametrize(
    "value", [b"{\"order_id\": 1}", b"\x07abcdef", b"\xc3\x02abcdefghij", b"\x00"]
)
def test_garbage_first_bytes(catalogue: Catalogue, value: bytes) -> None:
    with pytest.raises(DecodeError) as ei:
        Decoder(catalogue).decode(value)
    msg = str(ei.value)
    assert msg.startswith(f"not an Avro event: starts with {value[:4].hex()}")
    assert "expected c301 single-object or 00 Confluent framing" in msg


def test_corrupt_body(catalogue: Catalogue) -> None:
    value = Encoder(catalogue).encode("order.created", sample("order.created"), topic=TOPIC).value
    for corrupt in (value[:10] + b"\xff\xff\xff\xff", value[:-30], value[:12]):
        with pytest.raises(DecodeError) as ei:
            Decoder(catalogue).decode(corrupt)
        assert str(ei.value).startswith("corrupt Avro body for order.created v1: ")
        assert ei.value.__cause__ is not None


# -- Confluent framing ---------------------------------------------------------------------------


def test_confluent_framing_and_subject_name(catalogue: Catalogue) -> None:
    reg = MemoryRegistry(first_id=0x01020304)
    enc = Encoder(catalogue, reg)
    value = enc.encode("order.created", sample("order.created"), topic="erp.order").value
    assert value[0] == 0
    (sid,) = struct.unpack(">I", value[1:5])
    assert sid == 0x01020304
    assert value[1:5] == b"\x01\x02\x03\x04"
    assert reg.subjects == {"erp.order-erp.order.OrderCreated": [sid]}
    registered = json.loads(reg.by_id[sid].schema_str)
    assert registered == catalogue.writer("order.created").raw
    body = fastavro.schemaless_reader(
        io.BytesIO(value[5:]), catalogue.writer("order.created").parsed, None
    )
    assert to_json_form(body) == sample("order.created")


def test_confluent_ids_are_cached_per_topic_and_schema(catalogue: Catalogue) -> None:
    reg = MemoryRegistry()
    enc = Encoder(catalogue, reg)
    for seed in range(3):
        enc.encode("order.created", sample("order.created", seed), topic="erp.order")
    assert reg.register_calls == 1
    enc.encode("order.cancelled", sample("order.cancelled"), topic="erp.order")
    enc.encode("order.created", sample("order.created"), topic="acme.order")
    assert set(reg.subjects) == {
        "erp.order-erp.order.OrderCreated",
        "erp.order-erp.order.OrderCancelled",
        "acme.order-erp.order.OrderCreated",
    }
    assert reg.register_calls == 3


def confluent_frame(reg: MemoryRegistry, catalogue: Catalogue, event_type: str,
                    payload: dict[str, Any], topic: str) -> bytes:
    """Confluent framing built by hand (independent of the Encoder's registry code)."""
    sv = catalogue.writer(event_type)
    sid = reg.register_schema(f"{topic}-{sv.fullname}", _Stored(json.dumps(sv.raw)))
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", sid))
    # the Avro body of the single-object form (after C3 01 + 8-byte fingerprint)
    buf.write(Encoder(catalogue).encode(event_type, payload, topic=topic).value[10:])
    return buf.getvalue()


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_decoder_with_registry_reads_confluent_framing(catalogue: Catalogue,
                                                      event_type: str) -> None:
    reg = MemoryRegistry()
    payload = sample(event_type)
    value = confluent_frame(reg, catalogue, event_type, payload, "erp.x")
    decoded = Decoder(catalogue, reg).decode(value)
    assert decoded.wire_form == "confluent"
    assert decoded.event_type == event_type
    assert decoded.schema.fullname == catalogue.writer(event_type).fullname
    assert to_json_form(decoded.value) == payload


def test_encoder_and_decoder_share_a_registry(catalogue: Catalogue) -> None:
    reg = MemoryRegistry()
    payload = sample("invoice.issued")
    value = Encoder(catalogue, reg).encode("invoice.issued", payload, topic="erp.invoice").value
    decoded = Decoder(catalogue, reg).decode(value)
    assert decoded.wire_form == "confluent"
    assert decoded.event_type == "invoice.issued"
    assert to_json_form(decoded.value) == payload


def test_decoder_without_registry_names_the_setting(catalogue: Catalogue) -> None:
    value = confluent_frame(MemoryRegistry(), catalogue, "order.created",
                            sample("order.created"), TOPIC)
    with pytest.raises(UnknownSchema) as ei:
        Decoder(catalogue).decode(value)
    msg = str(ei.value)
    assert "Schema Registry id 100001" in msg
    assert "schema_registry.url" in msg


def test_decoder_with_registry_unknown_id(catalogue: Catalogue) -> None:
    value = b"\x00" + struct.pack(">I", 4242) + b"\x02"
    with pytest.raises(UnknownSchema) as ei:
        Decoder(catalogue, MemoryRegistry()).decode(value)
    assert "Schema Registry has no schema id 4242" in str(ei.value)


def test_decoder_with_registry_still_reads_single_object(catalogue: Catalogue) -> None:
    value = Encoder(catalogue).encode("order.created", sample("order.created"), topic=TOPIC).value
    decoded = Decoder(catalogue, MemoryRegistry()).decode(value)
    assert decoded.wire_form == "single-object"
    assert decoded.event_type == "order.created"


# -- captured table rows -------------------------------------------------------------------------

CAPTURE_HEADERS = {"erp_capture": "public.sale_order"}


def captured(operation: str = "UPDATE") -> dict[str, Any]:
    return {
        "table": "public.sale_order",
        "operation": operation,
        "key": "7",
        "row": {"id": 7, "name": "SO7", "amount": 12.5},
        "old_row": {"id": 7, "name": "so7", "amount": 12.5},
    }


def test_captured_event_encodes_as_row_change(catalogue: Catalogue) -> None:
    assert not catalogue.has("sale_order.updated")
    enc = Encoder(catalogue)
    out = enc.encode("sale_order.updated", captured(), topic=TOPIC, headers=CAPTURE_HEADERS)
    assert out.schema.event_type == ROW_CHANGE
    assert out.value[2:10] == catalogue.writer(ROW_CHANGE).fingerprint_le
    decoded = Decoder(catalogue).decode(out.value)
    assert decoded.event_type == ROW_CHANGE
    v = decoded.value
    assert v["table"] == "public.sale_order"
    assert v["operation"] == "UPDATE"
    assert v["key"] == "7"
    assert isinstance(v["row"], str)
    assert json.loads(v["row"]) == {"id": 7, "name": "SO7", "amount": 12.5}
    assert json.loads(v["old_row"]) == {"id": 7, "name": "so7", "amount": 12.5}


def test_captured_insert_and_delete_have_null_images(catalogue: Catalogue) -> None:
    enc, dec = Encoder(catalogue), Decoder(catalogue)
    ins = captured("INSERT")
    ins["old_row"] = None
    v = dec.decode(enc.encode("sale_order.created", ins, topic=TOPIC,
                              headers=CAPTURE_HEADERS).value).value
    assert v["old_row"] is None
    assert json.loads(v["row"])["id"] == 7
    dele = captured("DELETE")
    dele["row"] = None
    v = dec.decode(enc.encode("sale_order.deleted", dele, topic=TOPIC,
                              headers=CAPTURE_HEADERS).value).value
    assert v["row"] is None
    assert v["operation"] == "DELETE"


def test_captured_row_change_names_the_database_schema(catalogue: Catalogue) -> None:
    # pipeline.row_change documents schema_name as "Database schema containing the table,
    # e.g. \"public\"".
    out = Encoder(catalogue).encode("sale_order.updated", captured(), topic=TOPIC,
                                    headers=CAPTURE_HEADERS)
    assert Decoder(catalogue).decode(out.value).value["schema_name"] == "public"


def test_captured_event_without_trigger_payload(catalogue: Catalogue) -> None:
    with pytest.raises(PayloadError) as ei:
        Encoder(catalogue).encode("sale_order.updated", {"id": 7}, topic=TOPIC,
                                  headers=CAPTURE_HEADERS)
    assert "captured event sale_order.updated lacks the capture trigger's payload" in str(ei.value)


def test_unknown_type_without_capture_header_is_not_a_row_change(catalogue: Catalogue) -> None:
    with pytest.raises(SchemaError, match=r"unknown event type 'sale_order\.updated'"):
        Encoder(catalogue).encode("sale_order.updated", captured(), topic=TOPIC, headers={})


def test_claim_check_record_round_trip(catalogue: Catalogue) -> None:
    ref = {"event_type": "order.created", "store": "table", "ref": "abc", "size_bytes": 123,
           "sha256": "0" * 64}
    value = Encoder(catalogue).encode(CLAIM_CHECK, ref, topic=TOPIC).value
    decoded = Decoder(catalogue).decode(value)
    assert decoded.event_type == CLAIM_CHECK
    assert decoded.value == ref
