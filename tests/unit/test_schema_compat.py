"""Unit tests for pipeline.schemas.compat.check_backward (Avro BACKWARD compatibility)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.schemas.compat import Incompatibility, SchemaError, check_backward

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"

DECIMAL = {"type": "bytes", "logicalType": "decimal", "precision": 18, "scale": 2}


def record(name: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def fld(name: str, typ: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": typ, **extra}


def paths(result: list[Incompatibility]) -> list[str]:
    return [i.path for i in result]


def order_v1() -> dict[str, Any]:
    return record(
        "OrderCreated",
        fld("order_id", "string"),
        fld(
            "lines",
            {
                "type": "array",
                "items": record(
                    "OrderLine",
                    fld("sku", "string"),
                    fld("qty", "int"),
                    fld("unit_price", DECIMAL),
                ),
            },
        ),
        fld("note", ["null", "string"], default=None),
        namespace="erp.order",
    )


# --- identity / catalogue ------------------------------------------------------------------


def test_identical_schema_is_compatible() -> None:
    assert check_backward(order_v1(), order_v1()) == []


@pytest.mark.parametrize("path", sorted(SCHEMAS_DIR.glob("*/v*.avsc")), ids=lambda p: p.parent.name)
def test_every_catalogue_schema_is_compatible_with_itself(path: Path) -> None:
    schema = json.loads(path.read_text())
    assert check_backward(schema, schema) == []
    assert check_backward(path.read_text(), path.read_text()) == []


def test_catalogue_versions_are_backward_compatible() -> None:
    for directory in sorted(p for p in SCHEMAS_DIR.iterdir() if p.is_dir()):
        versions = sorted(directory.glob("v*.avsc"), key=lambda p: int(p.stem[1:]))
        for old, new in itertools.pairwise(versions):
            result = check_backward(json.loads(old.read_text()), json.loads(new.read_text()))
            assert result == [], f"{new} breaks {old}: {result}"


# --- fields --------------------------------------------------------------------------------


def test_field_added_without_default_is_incompatible() -> None:
    new = order_v1()
    new["fields"].append(fld("priority", "int"))
    result = check_backward(order_v1(), new)
    assert result == [
        Incompatibility(
            "priority",
            "field 'priority' was added without a default: old data has no value for it",
        )
    ]


def test_field_added_with_default_is_compatible() -> None:
    new = order_v1()
    new["fields"].append(fld("priority", "int", default=0))
    new["fields"].append(fld("tag", ["null", "string"], default=None))
    assert check_backward(order_v1(), new) == []


def test_field_removed_is_compatible() -> None:
    new = order_v1()
    new["fields"] = [f for f in new["fields"] if f["name"] != "note"]
    assert check_backward(order_v1(), new) == []


def test_field_renamed_without_alias_is_incompatible() -> None:
    new = order_v1()
    new["fields"][0] = fld("id", "string")
    assert paths(check_backward(order_v1(), new)) == ["id"]


def test_field_renamed_with_alias_is_compatible() -> None:
    new = order_v1()
    new["fields"][0] = fld("id", "string", aliases=["order_id"])
    assert check_backward(order_v1(), new) == []


def test_field_order_does_not_matter() -> None:
    new = order_v1()
    new["fields"].reverse()
    assert check_backward(order_v1(), new) == []


def test_nested_field_added_reports_path_through_array() -> None:
    new = order_v1()
    new["fields"][1]["type"]["items"]["fields"].append(fld("discount", DECIMAL))
    result = check_backward(order_v1(), new)
    assert paths(result) == ["lines[].discount"]
    assert "added without a default" in result[0].message


def test_multiple_problems_are_all_reported() -> None:
    new = order_v1()
    new["fields"][0]["type"] = "int"
    new["fields"][1]["type"]["items"]["fields"][1]["type"] = "string"
    new["fields"].append(fld("x", "long"))
    assert paths(check_backward(order_v1(), new)) == ["order_id", "lines[].qty", "x"]


# --- primitives and promotions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
        ("boolean", "boolean"),
        ("null", "null"),
    ],
)
def test_allowed_promotions(writer: str, reader: str) -> None:
    old = record("R", fld("v", writer))
    new = record("R", fld("v", reader))
    assert check_backward(old, new) == []


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("long", "int"),
        ("double", "float"),
        ("float", "long"),
        ("double", "int"),
        ("int", "string"),
        ("string", "int"),
        ("boolean", "int"),
        ("bytes", "long"),
        ("null", "string"),
    ],
)
def test_disallowed_type_changes(writer: str, reader: str) -> None:
    old = record("R", fld("v", writer))
    new = record("R", fld("v", reader))
    result = check_backward(old, new)
    assert paths(result) == ["v"]
    assert writer in result[0].message and reader in result[0].message


def test_primitive_top_level_schemas() -> None:
    assert check_backward("int", "long") == []
    assert check_backward('"int"', {"type": "double"}) == []
    result = check_backward("long", "int")
    assert paths(result) == [""]
    assert "the root" in result[0].message


def test_primitive_to_complex_is_incompatible() -> None:
    old = record("R", fld("v", "string"))
    new = record("R", fld("v", {"type": "array", "items": "string"}))
    assert paths(check_backward(old, new)) == ["v"]


# --- logical types -------------------------------------------------------------------------


def test_decimal_precision_change_is_incompatible() -> None:
    new = order_v1()
    new["fields"][1]["type"]["items"]["fields"][2]["type"] = {**DECIMAL, "precision": 20}
    result = check_backward(order_v1(), new)
    assert paths(result) == ["lines[].unit_price"]
    assert "decimal" in result[0].message


def test_decimal_scale_change_is_incompatible() -> None:
    old = record("R", fld("amount", DECIMAL))
    new = record("R", fld("amount", {**DECIMAL, "scale": 4}))
    assert paths(check_backward(old, new)) == ["amount"]


def test_decimal_without_scale_means_scale_zero() -> None:
    old = record("R", fld("a", {"type": "bytes", "logicalType": "decimal", "precision": 9}))
    new = record("R", fld("a", {**old["fields"][0]["type"], "scale": 0}))
    assert check_backward(old, new) == []


def test_logical_type_change_is_incompatible() -> None:
    old = record("R", fld("at", {"type": "long", "logicalType": "timestamp-millis"}))
    new = record("R", fld("at", {"type": "long", "logicalType": "timestamp-micros"}))
    result = check_backward(old, new)
    assert paths(result) == ["at"]
    assert "timestamp-millis" in result[0].message


def test_same_logical_type_is_compatible() -> None:
    ts = {"type": "long", "logicalType": "timestamp-micros"}
    assert check_backward(record("R", fld("at", ts)), record("R", fld("at", dict(ts)))) == []


def test_decimal_on_fixed_precision_change_is_incompatible() -> None:
    def fixed(precision: int) -> dict[str, Any]:
        return {
            "type": "fixed",
            "name": "Money",
            "size": 8,
            "logicalType": "decimal",
            "precision": precision,
            "scale": 2,
        }

    old = record("R", fld("m", fixed(18)))
    assert check_backward(old, record("R", fld("m", fixed(18)))) == []
    assert paths(check_backward(old, record("R", fld("m", fixed(16))))) == ["m"]


# --- unions --------------------------------------------------------------------------------


def test_making_a_field_optional_is_compatible() -> None:
    old = record("R", fld("v", "string"))
    new = record("R", fld("v", ["null", "string"], default=None))
    assert check_backward(old, new) == []


def test_non_union_writer_matches_promoted_reader_branch() -> None:
    old = record("R", fld("v", "int"))
    new = record("R", fld("v", ["null", "double"], default=None))
    assert check_backward(old, new) == []


def test_making_optional_field_required_is_incompatible() -> None:
    old = record("R", fld("v", ["null", "string"], default=None))
    new = record("R", fld("v", "string"))
    result = check_backward(old, new)
    assert paths(result) == ["v"]
    assert "null" in result[0].message


def test_removing_a_union_branch_is_incompatible() -> None:
    old = record("R", fld("v", ["null", "string", "int"], default=None))
    new = record("R", fld("v", ["null", "string"], default=None))
    result = check_backward(old, new)
    assert paths(result) == ["v"]
    assert "int" in result[0].message


def test_adding_a_union_branch_is_compatible() -> None:
    old = record("R", fld("v", ["null", "string"], default=None))
    new = record("R", fld("v", ["null", "string", "long"], default=None))
    assert check_backward(old, new) == []


def test_union_branch_promotion_is_compatible() -> None:
    old = record("R", fld("v", ["null", "int"], default=None))
    new = record("R", fld("v", ["null", "long"], default=None))
    assert check_backward(old, new) == []


def test_writer_union_against_non_union_reader_that_covers_all_branches() -> None:
    old = record("R", fld("v", ["int", "long"]))
    new = record("R", fld("v", "double"))
    assert check_backward(old, new) == []


def test_non_union_writer_matching_no_reader_branch() -> None:
    old = record("R", fld("v", "boolean"))
    new = record("R", fld("v", ["null", "string"], default=None))
    result = check_backward(old, new)
    assert paths(result) == ["v"]
    assert "matches no branch" in result[0].message


def test_optional_nested_record_reports_inner_path() -> None:
    address_v1 = record("Address", fld("city", "string"))
    address_v2 = record("Address", fld("city", "string"), fld("zip", "string"))
    old = record("Customer", fld("address", ["null", address_v1], default=None))
    new = record("Customer", fld("address", ["null", address_v2], default=None))
    assert paths(check_backward(old, new)) == ["address.zip"]


def test_nested_record_in_optional_reader_union_reports_inner_path() -> None:
    old = record("Customer", fld("address", record("Address", fld("city", "string"))))
    new_address = record("Address", fld("city", "int"))
    new = record("Customer", fld("address", ["null", new_address], default=None))
    assert paths(check_backward(old, new)) == ["address.city"]


# --- enums ---------------------------------------------------------------------------------

STATUS = ["DRAFT", "CONFIRMED", "PICKING", "SHIPPED", "DELIVERED", "CANCELLED"]


def status_record(symbols: list[str], **enum_extra: Any) -> dict[str, Any]:
    enum = {"type": "enum", "name": "OrderStatus", "symbols": symbols, **enum_extra}
    return record(
        "OrderStatusChanged",
        fld("from_status", enum),
        fld("to_status", "OrderStatus"),
        namespace="erp.order",
    )


def test_enum_symbol_added_is_compatible() -> None:
    assert check_backward(status_record(STATUS), status_record([*STATUS, "RETURNED"])) == []


def test_enum_symbol_reordered_is_compatible() -> None:
    assert check_backward(status_record(STATUS), status_record(list(reversed(STATUS)))) == []


def test_enum_symbol_removed_is_incompatible_for_every_use() -> None:
    new = status_record([s for s in STATUS if s != "PICKING"])
    result = check_backward(status_record(STATUS), new)
    assert paths(result) == ["from_status", "to_status"]
    assert all("'PICKING'" in i.message for i in result)


def test_enum_symbol_removed_with_reader_default_is_compatible() -> None:
    new = status_record([s for s in STATUS if s != "PICKING"], default="CONFIRMED")
    assert check_backward(status_record(STATUS), new) == []


def test_enum_renamed_is_incompatible_unless_aliased() -> None:
    old = record("R", fld("e", {"type": "enum", "name": "Color", "symbols": ["RED"]}))
    renamed = {"type": "enum", "name": "Colour", "symbols": ["RED"]}
    assert paths(check_backward(old, record("R", fld("e", renamed)))) == ["e"]
    aliased = {**renamed, "aliases": ["Color"]}
    assert check_backward(old, record("R", fld("e", aliased))) == []


def test_enum_to_string_is_incompatible() -> None:
    old = status_record(STATUS)
    new = record(
        "OrderStatusChanged",
        fld("from_status", "string"),
        fld("to_status", "string"),
        namespace="erp.order",
    )
    assert paths(check_backward(old, new)) == ["from_status", "to_status"]


# --- arrays and maps -----------------------------------------------------------------------


def test_array_items_promotion_is_compatible() -> None:
    old = record("R", fld("xs", {"type": "array", "items": "int"}))
    new = record("R", fld("xs", {"type": "array", "items": "long"}))
    assert check_backward(old, new) == []


def test_array_items_narrowing_is_incompatible() -> None:
    old = record("R", fld("xs", {"type": "array", "items": "long"}))
    new = record("R", fld("xs", {"type": "array", "items": "int"}))
    assert paths(check_backward(old, new)) == ["xs[]"]


def test_map_values_are_checked() -> None:
    old = record("R", fld("attrs", {"type": "map", "values": "string"}))
    assert check_backward(old, record("R", fld("attrs", {"type": "map", "values": "bytes"}))) == []
    result = check_backward(old, record("R", fld("attrs", {"type": "map", "values": "int"})))
    assert paths(result) == ["attrs{}"]


def test_map_of_records_reports_nested_path() -> None:
    def schema(*fields: dict[str, Any]) -> dict[str, Any]:
        return record("R", fld("stock", {"type": "map", "values": record("Level", *fields)}))

    old = schema(fld("qty", "int"))
    new = schema(fld("qty", "int"), fld("bin", "string"))
    assert paths(check_backward(old, new)) == ["stock{}.bin"]


def test_array_to_map_is_incompatible() -> None:
    old = record("R", fld("xs", {"type": "array", "items": "string"}))
    new = record("R", fld("xs", {"type": "map", "values": "string"}))
    assert paths(check_backward(old, new)) == ["xs"]


def test_nested_arrays() -> None:
    old = record("R", fld("m", {"type": "array", "items": {"type": "array", "items": "float"}}))
    new = copy.deepcopy(old)
    new["fields"][0]["type"]["items"]["items"] = "double"
    assert check_backward(old, new) == []
    new["fields"][0]["type"]["items"]["items"] = "int"
    assert paths(check_backward(old, new)) == ["m[][]"]


# --- named types ---------------------------------------------------------------------------


def test_record_renamed_is_incompatible() -> None:
    new = order_v1()
    new["name"] = "OrderPlaced"
    result = check_backward(order_v1(), new)
    assert paths(result) == [""]
    assert "OrderCreated" in result[0].message


def test_record_renamed_with_alias_is_compatible() -> None:
    new = order_v1()
    new["name"] = "OrderPlaced"
    new["aliases"] = ["OrderCreated"]
    assert check_backward(order_v1(), new) == []


def test_record_matched_by_unqualified_name_across_namespaces() -> None:
    new = order_v1()
    new["namespace"] = "erp.sales"
    assert check_backward(order_v1(), new) == []


def test_record_alias_with_full_name() -> None:
    old = record("Old", fld("a", "int"), namespace="x.y")
    new = record("New", fld("a", "int"), namespace="z", aliases=["x.y.Old"])
    assert check_backward(old, new) == []


def test_nested_record_renamed_reports_array_path() -> None:
    new = order_v1()
    new["fields"][1]["type"]["items"]["name"] = "Line"
    assert paths(check_backward(order_v1(), new)) == ["lines[]"]


def test_named_type_reference_is_resolved() -> None:
    money = {"type": "fixed", "name": "Money", "size": 8}
    old = record("R", fld("a", money), fld("b", "Money"), namespace="erp")
    new = record("R", fld("a", {**money, "size": 16}), fld("b", "erp.Money"), namespace="erp")
    result = check_backward(old, new)
    assert paths(result) == ["a", "b"]
    assert "size" in result[0].message


def test_fixed_same_size_is_compatible() -> None:
    old = record("R", fld("h", {"type": "fixed", "name": "Hash", "size": 32}))
    assert check_backward(old, copy.deepcopy(old)) == []


def test_fixed_to_bytes_is_incompatible() -> None:
    old = record("R", fld("h", {"type": "fixed", "name": "Hash", "size": 32}))
    new = record("R", fld("h", "bytes"))
    assert paths(check_backward(old, new)) == ["h"]


def test_recursive_schema_terminates() -> None:
    def node(*extra: dict[str, Any]) -> dict[str, Any]:
        return record(
            "Node",
            fld("value", "int"),
            fld("children", {"type": "array", "items": "Node"}),
            *extra,
        )

    assert check_backward(node(), node()) == []
    assert check_backward(node(), node(fld("label", "string", default=""))) == []
    assert paths(check_backward(node(), node(fld("label", "string")))) == ["label"]


def test_error_type_is_treated_as_record() -> None:
    old = {"type": "error", "name": "Failure", "fields": [fld("code", "int")]}
    new = {"type": "error", "name": "Failure", "fields": [fld("code", "long")]}
    assert check_backward(old, new) == []


# --- input handling ------------------------------------------------------------------------


def test_accepts_json_text() -> None:
    old = json.dumps(order_v1())
    new = order_v1()
    new["fields"].append(fld("priority", "int"))
    assert paths(check_backward(old, json.dumps(new))) == ["priority"]


def test_top_level_unions() -> None:
    assert check_backward(["null", "int"], ["null", "int", "string"]) == []
    assert paths(check_backward(["null", "int", "string"], ["null", "int"])) == [""]


@pytest.mark.parametrize(
    "bad",
    [
        "NoSuchType",
        {"type": "record", "fields": []},
        {"type": "record", "name": "R", "fields": [fld("x", "Missing")]},
        "{not json",
        42,
    ],
)
def test_malformed_schema_raises(bad: Any) -> None:
    with pytest.raises(SchemaError):
        check_backward(bad, "int")


def test_incompatibility_is_frozen_value_object() -> None:
    a = Incompatibility("x", "m")
    assert a == Incompatibility("x", "m")
    with pytest.raises(AttributeError):
        a.path = "y"  # type: ignore[misc]
