"""JSON-form payloads from pipeline.simulator.payloads match the Avro catalogue in schemas/."""

from __future__ import annotations

import io
import json
import random
import re
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest

from pipeline.simulator.payloads import EVENT_TYPES, payload_for

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
NOW = datetime(2026, 11, 27, 7, 15, 0, 123456, tzinfo=UTC)
MONEY = re.compile(r"-?\d+\.\d{2}")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00")
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def writer_schema(event_type: str) -> dict[str, Any]:
    paths = sorted(
        (SCHEMAS_DIR / event_type).glob("v*.avsc"), key=lambda p: int(p.stem.removeprefix("v"))
    )
    schema = json.loads(paths[-1].read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def aggregate_for(event_type: str, i: int) -> str:
    return f"CUST-{1001 + i}" if event_type == "customer.upserted" else f"SO-{i:06d}"


def generate(event_type: str, n: int = 50, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        payload_for(event_type, rng, aggregate_id=aggregate_for(event_type, i), now=NOW)
        for i in range(1, n + 1)
    ]


class Types:
    """Resolves named-type references while walking one schema."""

    def __init__(self) -> None:
        self.named: dict[str, Any] = {}

    def resolve(self, typ: Any) -> Any:
        if isinstance(typ, str) and typ in self.named:
            return self.named[typ]
        if isinstance(typ, dict) and typ.get("type") in ("record", "enum", "fixed"):
            self.named[typ["name"]] = typ
        return typ


def check_json_form(value: Any, typ: Any, types: Types, path: str) -> None:
    """Assert value is the JSON form of Avro type typ (see pipeline.simulator.payloads)."""
    typ = types.resolve(typ)
    if isinstance(typ, list):
        assert typ[0] == "null"
        if value is not None:
            check_json_form(value, typ[1], types, path)
        return
    if isinstance(typ, str):
        typ = {"type": typ}
    kind, logical = typ["type"], typ.get("logicalType")
    if logical == "decimal":
        assert isinstance(value, str) and MONEY.fullmatch(value), (path, value)
    elif logical == "timestamp-micros":
        assert isinstance(value, str) and TIMESTAMP.fullmatch(value), (path, value)
        assert datetime.fromisoformat(value).tzinfo is not None
    elif logical == "date":
        assert isinstance(value, str) and DAY.fullmatch(value), (path, value)
        date.fromisoformat(value)
    elif kind == "string":
        assert isinstance(value, str) and value, (path, value)
    elif kind in ("int", "long"):
        assert isinstance(value, int) and not isinstance(value, bool), (path, value)
    elif kind == "enum":
        assert value in typ["symbols"], (path, value)
    elif kind == "array":
        assert isinstance(value, list) and value, (path, value)
        for item in value:
            check_json_form(item, typ["items"], types, path + "[]")
    elif kind == "record":
        assert isinstance(value, dict), (path, value)
        assert list(value) == [f["name"] for f in typ["fields"]], path
        for f in typ["fields"]:
            check_json_form(value[f["name"]], f["type"], types, f"{path}.{f['name']}")
    else:  # pragma: no cover - the catalogue uses no other types
        pytest.fail(f"unexpected type {typ!r} at {path}")


def to_avro(value: Any, typ: Any, types: Types) -> Any:
    """Convert a JSON-form value to the Python types fastavro expects."""
    typ = types.resolve(typ)
    if value is None:
        return None
    if isinstance(typ, list):
        return to_avro(value, typ[1], types)
    if isinstance(typ, str):
        typ = {"type": typ}
    logical = typ.get("logicalType")
    if logical == "decimal":
        return Decimal(value)
    if logical == "timestamp-micros":
        return datetime.fromisoformat(value)
    if logical == "date":
        return date.fromisoformat(value)
    if typ["type"] == "array":
        return [to_avro(v, typ["items"], types) for v in value]
    if typ["type"] == "record":
        return {f["name"]: to_avro(value[f["name"]], f["type"], types) for f in typ["fields"]}
    return value


def test_event_types_match_business_catalogue() -> None:
    business = {p.name for p in SCHEMAS_DIR.iterdir() if p.is_dir()} - {
        "pipeline.row_change",
        "pipeline.claim_check",
    }
    assert len(EVENT_TYPES) == 9
    assert set(EVENT_TYPES) == business


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_payload_fields_and_json_types_match_schema(event_type: str) -> None:
    schema = writer_schema(event_type)
    for payload in generate(event_type):
        assert list(payload) == [f["name"] for f in schema["fields"]]
        check_json_form(payload, schema, Types(), "")
        json.dumps(payload)  # plain JSON, no Decimal/datetime objects


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_payload_encodes_with_avro_after_conversion(event_type: str) -> None:
    schema = writer_schema(event_type)
    parsed = fastavro.parse_schema(schema, named_schemas={})
    for payload in generate(event_type, n=20):
        record = to_avro(payload, schema, Types())
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        buf.seek(0)
        assert fastavro.schemaless_reader(buf, parsed, parsed) == record


def test_optional_fields_take_both_values() -> None:
    orders = generate("order.created", n=200)
    assert {p["note"] is None for p in orders} == {True, False}
    customers = generate("customer.upserted", n=200)
    assert {p["email"] is None for p in customers} == {True, False}
    assert {p["credit_limit"] is None for p in customers} == {True, False}


def test_order_created_is_consistent_and_compact() -> None:
    for payload in generate("order.created", n=100):
        lines = payload["lines"]
        assert [line["line_no"] for line in lines] == list(range(1, len(lines) + 1))
        assert all(line["qty"] > 0 for line in lines)
        total = sum(Decimal(line["unit_price"]) * line["qty"] for line in lines)
        assert Decimal(payload["total"]) == total
        assert re.fullmatch(r"SO-\d{6}", payload["order_id"])
        assert re.fullmatch(r"CUST-\d{4}", payload["customer"])
        assert re.fullmatch(r"[A-Z]{3}", payload["currency"])
        if len(lines) == 3:
            assert 200 <= len(json.dumps(payload, separators=(",", ":"))) <= 350


def test_events_of_one_order_agree() -> None:
    rng = random.Random(1)
    order = "SO-000042"

    def make(event_type: str) -> dict[str, Any]:
        return payload_for(event_type, rng, aggregate_id=order, now=NOW)

    created = make("order.created")
    payment = make("payment.completed")
    invoice = make("invoice.issued")
    shipment = make("shipment.created")
    reserved = make("inventory.reserved")
    assert payment["order_id"] == invoice["order_id"] == shipment["order_id"] == order
    assert payment["amount"] == invoice["amount"] == created["total"]
    assert payment["currency"] == invoice["currency"] == created["currency"]
    assert invoice["customer"] == created["customer"]
    assert Decimal(invoice["tax"]) < Decimal(invoice["amount"])
    ordered = [(line["sku"], line["qty"]) for line in created["lines"]]
    assert [(line["sku"], line["qty"]) for line in shipment["lines"]] == ordered
    assert (reserved["sku"], reserved["qty"]) in ordered


def test_customer_profile_is_stable() -> None:
    a = payload_for("customer.upserted", random.Random(1), aggregate_id="CUST-1001", now=NOW)
    b = payload_for("customer.upserted", random.Random(2), aggregate_id="CUST-1001", now=NOW)
    assert (a["name"], a["country"], a["currency"]) == (b["name"], b["country"], b["currency"])
    assert a["customer_id"] == "CUST-1001"


def test_status_change_is_a_real_transition() -> None:
    for payload in generate("order.status_changed", n=100):
        assert payload["from_status"] != payload["to_status"]
        assert payload["to_status"] != "DRAFT"


def test_same_seed_gives_same_payloads() -> None:
    for event_type in EVENT_TYPES:
        assert generate(event_type, n=5, seed=3) == generate(event_type, n=5, seed=3)


def test_timestamps_are_normalised_to_utc() -> None:
    cet = timezone(timedelta(hours=1))
    local = datetime(2026, 11, 27, 8, 15, 0, 123456, tzinfo=cet)
    payload = payload_for("order.cancelled", random.Random(0), aggregate_id="SO-1", now=local)
    assert payload["cancelled_at"] == "2026-11-27T07:15:00.123456+00:00"
    naive = datetime(2026, 11, 27, 7, 15)
    payload = payload_for("order.cancelled", random.Random(0), aggregate_id="SO-1", now=naive)
    assert payload["cancelled_at"] == "2026-11-27T07:15:00.000000+00:00"


def test_invoice_due_date_after_issue() -> None:
    for payload in generate("invoice.issued", n=20):
        issued = datetime.fromisoformat(payload["issued_at"]).date()
        assert date.fromisoformat(payload["due_date"]) > issued


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        payload_for("order.teleported", random.Random(0), aggregate_id="SO-1", now=NOW)
