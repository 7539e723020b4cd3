"""The Avro event catalogue in schemas/<event_type>/v<N>.avsc: parseable, documented, unique
names, conventions, and sample payloads that round-trip through fastavro."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"

BUSINESS_TYPES = {
    "customer.upserted": "erp.customer.CustomerUpserted",
    "order.created": "erp.order.OrderCreated",
    "order.status_changed": "erp.order.OrderStatusChanged",
    "order.cancelled": "erp.order.OrderCancelled",
    "inventory.reserved": "erp.inventory.InventoryReserved",
    "inventory.released": "erp.inventory.InventoryReleased",
    "payment.completed": "erp.payment.PaymentCompleted",
    "invoice.issued": "erp.invoice.InvoiceIssued",
    "shipment.created": "erp.shipment.ShipmentCreated",
}
INTERNAL_TYPES = {
    "pipeline.row_change": "pipeline.RowChange",
    "pipeline.claim_check": "pipeline.ClaimCheck",
}
ALL_TYPES = {**BUSINESS_TYPES, **INTERNAL_TYPES}

AT = datetime(2026, 11, 27, 7, 15, 0, 123456, tzinfo=UTC)

SAMPLES: dict[str, dict[str, Any]] = {
    "customer.upserted": {
        "customer_id": "CUST-1001",
        "name": "Nord Handel GmbH",
        "email": "orders@nord.example",
        "country": "DE",
        "credit_limit": Decimal("25000.00"),
        "currency": "EUR",
        "updated_at": AT,
    },
    "order.created": {
        "order_id": "SO-000123",
        "customer": "CUST-1001",
        "lines": [
            {"line_no": 1, "sku": "A-01", "qty": 3, "unit_price": Decimal("12.50")},
            {"line_no": 2, "sku": "B-03", "qty": 1, "unit_price": Decimal("7.25")},
            {"line_no": 3, "sku": "C-08", "qty": 10, "unit_price": Decimal("2.40")},
        ],
        "currency": "EUR",
        "total": Decimal("68.75"),
        "created_at": AT,
        "note": None,
    },
    "order.status_changed": {
        "order_id": "SO-000123",
        "from_status": "CONFIRMED",
        "to_status": "PICKING",
        "changed_at": AT,
    },
    "order.cancelled": {
        "order_id": "SO-000123",
        "reason": "customer request",
        "cancelled_at": AT,
    },
    "inventory.reserved": {
        "reservation_id": "RES-000123-1",
        "order_id": "SO-000123",
        "sku": "A-01",
        "qty": 3,
        "warehouse": "WH-BER",
        "at": AT,
    },
    "inventory.released": {
        "reservation_id": "RES-000123-1",
        "order_id": "SO-000123",
        "sku": "A-01",
        "qty": 3,
        "warehouse": "WH-BER",
        "at": AT,
    },
    "payment.completed": {
        "payment_id": "PAY-000123",
        "order_id": "SO-000123",
        "amount": Decimal("68.75"),
        "currency": "EUR",
        "method": "CARD",
        "completed_at": AT,
    },
    "invoice.issued": {
        "invoice_id": "INV-000123",
        "order_id": "SO-000123",
        "customer": "CUST-1001",
        "amount": Decimal("68.75"),
        "tax": Decimal("10.98"),
        "currency": "EUR",
        "issued_at": AT,
        "due_date": date(2026, 12, 27),
    },
    "shipment.created": {
        "shipment_id": "SHP-000123",
        "order_id": "SO-000123",
        "carrier": "DHL",
        "tracking_number": "DH123456789012",
        "lines": [{"sku": "A-01", "qty": 3}, {"sku": "B-03", "qty": 1}],
        "shipped_at": AT,
    },
    "pipeline.row_change": {
        "table": "sales_order",
        "operation": "UPDATE",
        "key": "SO-000123",
        "row": '{"id": "SO-000123", "status": "PICKING"}',
        "old_row": '{"id": "SO-000123", "status": "CONFIRMED"}',
        "schema_name": "public",
    },
    "pipeline.claim_check": {
        "event_type": "order.created",
        "store": "dir",
        "ref": "2026/11/27/SO-000123.json",
        "size_bytes": 1_250_000,
        "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    },
}


def versions(event_type: str) -> list[Path]:
    return sorted(
        (SCHEMAS_DIR / event_type).glob("v*.avsc"), key=lambda p: int(p.stem.removeprefix("v"))
    )


def load(path: Path) -> dict[str, Any]:
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def writer_schema(event_type: str) -> dict[str, Any]:
    return load(versions(event_type)[-1])


def all_files() -> list[Path]:
    return sorted(SCHEMAS_DIR.glob("*/v*.avsc"))


def named_types(schema: Any, namespace: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (fullname, definition) for every named type defined (not referenced) in schema."""
    if isinstance(schema, list):
        for branch in schema:
            yield from named_types(branch, namespace)
        return
    if not isinstance(schema, dict):
        return
    typ = schema.get("type")
    if typ in ("record", "error", "enum", "fixed"):
        name = schema["name"]
        ns = schema.get("namespace", namespace)
        fullname = name if "." in name or not ns else f"{ns}.{name}"
        yield fullname, schema
        inner_ns = fullname.rsplit(".", 1)[0] if "." in fullname else None
        for f in schema.get("fields", []):
            yield from named_types(f["type"], inner_ns)
    elif typ == "array":
        yield from named_types(schema["items"], namespace)
    elif typ == "map":
        yield from named_types(schema["values"], namespace)
    elif isinstance(typ, (dict, list)):
        yield from named_types(typ, namespace)


def leaf_types(schema: Any) -> Iterator[dict[str, Any]]:
    """Yield every dict-form type (records' fields traversed), for convention checks."""
    if isinstance(schema, list):
        for branch in schema:
            yield from leaf_types(branch)
    elif isinstance(schema, dict):
        yield schema
        for f in schema.get("fields", []):
            yield from leaf_types(f["type"])
        for key in ("items", "values"):
            if key in schema:
                yield from leaf_types(schema[key])


# --- layout --------------------------------------------------------------------------------


def test_catalogue_has_exactly_the_expected_event_types() -> None:
    dirs = {p.name for p in SCHEMAS_DIR.iterdir() if p.is_dir()}
    assert dirs == set(ALL_TYPES)


@pytest.mark.parametrize("event_type", sorted(ALL_TYPES))
def test_versions_are_contiguous_from_v1(event_type: str) -> None:
    found = versions(event_type)
    assert found, f"no schema for {event_type}"
    assert [p.stem for p in found] == [f"v{i}" for i in range(1, len(found) + 1)]
    assert all(re.fullmatch(r"v[1-9][0-9]*\.avsc", p.name) for p in found)


# --- parsing and documentation ---------------------------------------------------------------


@pytest.mark.parametrize("path", all_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_schema_parses_standalone(path: Path) -> None:
    parsed = fastavro.parse_schema(load(path), named_schemas={})
    assert isinstance(parsed, dict) and parsed["type"] == "record"


@pytest.mark.parametrize("path", all_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_named_type_and_field_is_documented(path: Path) -> None:
    missing: list[str] = []
    for fullname, definition in named_types(load(path)):
        if not str(definition.get("doc", "")).strip():
            missing.append(fullname)
        for f in definition.get("fields", []):
            if not str(f.get("doc", "")).strip():
                missing.append(f"{fullname}.{f['name']}")
    assert missing == []


@pytest.mark.parametrize("event_type", sorted(ALL_TYPES))
def test_record_fullname_and_naming_conventions(event_type: str) -> None:
    for path in versions(event_type):
        schema = load(path)
        fullnames = [name for name, _ in named_types(schema)]
        assert fullnames[0] == ALL_TYPES[event_type]
        for fullname in fullnames:
            namespace, _, name = fullname.rpartition(".")
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", name), fullname
            if event_type.startswith("pipeline."):
                assert namespace == "pipeline"
            else:
                assert namespace == "erp." + event_type.split(".")[0]


def test_named_types_are_unique_across_event_types() -> None:
    owner: dict[str, str] = {}
    for event_type in ALL_TYPES:
        for path in versions(event_type):
            for fullname, _ in named_types(load(path)):
                assert owner.setdefault(fullname, event_type) == event_type, (
                    f"{fullname} defined by both {owner[fullname]} and {event_type}"
                )


@pytest.mark.parametrize("path", all_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_type_conventions(path: Path) -> None:
    schema = load(path)
    for node in leaf_types(schema):
        logical = node.get("logicalType")
        if logical == "decimal":
            assert (node["type"], node["precision"], node["scale"]) == ("bytes", 18, 2)
        elif logical is not None:
            assert (node["type"], logical) in {("long", "timestamp-micros"), ("int", "date")}
    for _, definition in named_types(schema):
        for f in definition.get("fields", []):
            name, typ = f["name"], f["type"]
            if name == "at" or name.endswith("_at"):
                assert typ == {"type": "long", "logicalType": "timestamp-micros"}, name
            if name.endswith("_id") or name in ("customer", "currency"):
                assert typ == "string", name
            if isinstance(typ, list):
                assert typ[0] == "null" and "default" in f and f["default"] is None, name
            if any(
                isinstance(t, dict) and t.get("logicalType") == "decimal"
                for t in (typ if isinstance(typ, list) else [typ])
            ):
                # Money always travels with its currency (on the event record).
                assert "currency" in {g["name"] for g in schema["fields"]}, name


def test_order_created_shape() -> None:
    schema = writer_schema("order.created")
    fields = {f["name"]: f for f in schema["fields"]}
    assert list(fields) == [
        "order_id",
        "customer",
        "lines",
        "currency",
        "total",
        "created_at",
        "note",
    ]
    line = fields["lines"]["type"]["items"]
    assert line["name"] == "OrderLine"
    assert [f["name"] for f in line["fields"]] == ["line_no", "sku", "qty", "unit_price"]
    assert fields["note"]["type"] == ["null", "string"] and fields["note"]["default"] is None


def test_order_status_enum() -> None:
    schema = writer_schema("order.status_changed")
    enum = schema["fields"][1]["type"]
    assert enum["symbols"] == ["DRAFT", "CONFIRMED", "PICKING", "SHIPPED", "DELIVERED", "CANCELLED"]


def test_row_change_operation_enum() -> None:
    schema = writer_schema("pipeline.row_change")
    fields = {f["name"]: f for f in schema["fields"]}
    # v2 added TRUNCATE (a statement that emptied a captured table), backward compatible
    assert fields["operation"]["type"]["symbols"] == ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    assert list(fields) == ["table", "operation", "key", "row", "old_row", "schema_name"]
    assert fields["old_row"]["type"] == ["null", "string"]


# --- round trip ----------------------------------------------------------------------------


def roundtrip(schema: dict[str, Any], record: dict[str, Any]) -> tuple[Any, int]:
    parsed = fastavro.parse_schema(schema, named_schemas={})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    size = buf.tell()
    buf.seek(0)
    return fastavro.schemaless_reader(buf, parsed, parsed), size


def test_every_event_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(ALL_TYPES)


@pytest.mark.parametrize("event_type", sorted(ALL_TYPES))
def test_sample_round_trips_through_every_version(event_type: str) -> None:
    sample = SAMPLES[event_type]
    for path in versions(event_type):
        decoded, size = roundtrip(load(path), sample)
        assert decoded == sample
        assert 0 < size < 512


@pytest.mark.parametrize("event_type", sorted(ALL_TYPES))
def test_sample_field_names_match_writer_schema(event_type: str) -> None:
    assert list(SAMPLES[event_type]) == [f["name"] for f in writer_schema(event_type)["fields"]]


def test_optional_fields_round_trip_as_null() -> None:
    sample = {**SAMPLES["customer.upserted"], "email": None, "credit_limit": None}
    assert roundtrip(writer_schema("customer.upserted"), sample)[0] == sample
    delete = {**SAMPLES["pipeline.row_change"], "operation": "DELETE", "row": None}
    assert roundtrip(writer_schema("pipeline.row_change"), delete)[0] == delete


def test_decimal_keeps_two_decimal_places() -> None:
    sample = {**SAMPLES["payment.completed"], "amount": Decimal("1234567890123456.78")}
    decoded, _ = roundtrip(writer_schema("payment.completed"), sample)
    assert decoded["amount"] == Decimal("1234567890123456.78")
    assert decoded["amount"].as_tuple().exponent == -2


def test_unknown_enum_symbol_is_rejected() -> None:
    sample = {**SAMPLES["payment.completed"], "method": "BITCOIN"}
    with pytest.raises(ValueError):
        roundtrip(writer_schema("payment.completed"), sample)
