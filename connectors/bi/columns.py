"""Columns from Avro schemas (pure): what the BI targets create and how values are stored.

Each top-level field of an event's schema becomes a column of the event type's table, typed by
its Avro type; records, arrays, maps and unions of several types become JSON. A later schema
version that adds a field adds its column; ``int``→``long`` and ``float``→``double`` promotions
widen the column. Metadata columns start with ``_`` so they never collide with a field.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.schemas.catalogue import SchemaVersion

# Logical kinds (each target maps them to its own types)
STRING, INT, LONG, FLOAT, DOUBLE, BOOLEAN, BYTES = (
    "string", "int", "long", "float", "double", "boolean", "bytes")
DECIMAL, DATE, TIME, TIMESTAMP, LOCAL_TIMESTAMP, UUID, JSON = (
    "decimal", "date", "time", "timestamp", "local_timestamp", "uuid", "json")

_PRIMITIVE = {"string": STRING, "int": INT, "long": LONG, "float": FLOAT, "double": DOUBLE,
              "boolean": BOOLEAN, "bytes": BYTES}
_LOGICAL = {"date": DATE, "time-millis": TIME, "time-micros": TIME,
            "timestamp-millis": TIMESTAMP, "timestamp-micros": TIMESTAMP,
            "local-timestamp-millis": LOCAL_TIMESTAMP, "local-timestamp-micros": LOCAL_TIMESTAMP,
            "uuid": UUID}
# a column of the first kind can take values of the second after widening
WIDENING = {(INT, LONG): LONG, (FLOAT, DOUBLE): DOUBLE, (INT, DOUBLE): DOUBLE,
            (LONG, DOUBLE): DOUBLE, (INT, FLOAT): FLOAT, (LONG, FLOAT): DOUBLE}


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    nullable: bool = True
    precision: int = 0  # decimals
    scale: int = 0
    doc: str = ""


# Metadata columns of every event-type table, then the fields.
META: tuple[Column, ...] = (
    Column("_event_id", STRING, False, doc="event id (CloudEvents ce_id)"),
    Column("_aggregate_type", STRING, False),
    Column("_aggregate_id", STRING, False),
    Column("_aggregate_version", LONG, False),
    Column("_occurred_at", TIMESTAMP),
    Column("_schema_version", INT),
    Column("_topic", STRING, False),
    Column("_partition", INT, False),
    Column("_offset", LONG, False),
)


def table_name(event_type: str) -> str:
    """``order.created`` → ``order_created`` (a safe, lower-case identifier, ≤ 63 bytes)."""
    name = re.sub(r"[^a-z0-9_]", "_", event_type.lower())
    if not name or name[0].isdigit():
        name = f"t_{name}"
    return name[:63]


def columns_of(schema: SchemaVersion) -> list[Column]:
    """The field columns of one schema version, in field order."""
    names: dict[str, Any] = {}
    _collect_names(schema.raw, names, schema.raw.get("namespace"))
    out = []
    for f in schema.raw.get("fields", []):
        kind, nullable, precision, scale = _kind(f["type"], names)
        if kind is None:
            continue  # a field that is always null
        out.append(Column(str(f["name"]), kind, nullable, precision, scale,
                          str(f.get("doc", ""))))
    return out


def merge(current: Iterable[Column], incoming: Iterable[Column]) -> tuple[list[Column],
                                                                            list[Column]]:
    """(columns to add, columns to widen) so a table of ``current`` takes ``incoming`` rows.

    A field whose type changed beyond a widening keeps its column; its values are stored as
    the column's kind can hold them (or the row is rejected by the target)."""
    have = {c.name: c for c in current}
    added, widened = [], []
    for col in incoming:
        old = have.get(col.name)
        if old is None:
            added.append(Column(col.name, col.kind, True, col.precision, col.scale, col.doc))
        elif old.kind != col.kind and (old.kind, col.kind) in WIDENING:
            widened.append(Column(col.name, WIDENING[(old.kind, col.kind)], True,
                                  col.precision, col.scale, col.doc))
    return added, widened


def _collect_names(t: Any, names: dict[str, Any], ns: str | None) -> None:
    if isinstance(t, list):
        for m in t:
            _collect_names(m, names, ns)
    elif isinstance(t, dict):
        if t.get("type") in ("record", "enum", "fixed") and "name" in t:
            name = str(t["name"])
            space = t.get("namespace", ns)
            full = name if "." in name or not space else f"{space}.{name}"
            names[full] = names[name] = t
            ns = space
        for f in t.get("fields", []) or []:
            _collect_names(f.get("type"), names, ns)
        for k in ("items", "values"):
            if k in t:
                _collect_names(t[k], names, ns)


def _kind(t: Any, names: Mapping[str, Any]) -> tuple[str | None, bool, int, int]:
    """(kind, nullable, precision, scale) of a field type."""
    if isinstance(t, list):
        members = [m for m in t if m != "null"]
        nullable = len(members) < len(t)
        if not members:
            return None, True, 0, 0
        if len(members) > 1:
            return JSON, nullable, 0, 0
        kind, _n, p, s = _kind(members[0], names)
        return kind, nullable, p, s
    if isinstance(t, str):
        if t in _PRIMITIVE:
            return _PRIMITIVE[t], False, 0, 0
        if t == "null":
            return None, True, 0, 0
        named = names.get(t)
        return (_kind(named, names) if named is not None else (JSON, False, 0, 0))
    if isinstance(t, dict):
        logical = t.get("logicalType")
        if logical == "decimal":
            return DECIMAL, False, int(t.get("precision", 38)), int(t.get("scale", 0))
        if logical in _LOGICAL:
            return _LOGICAL[logical], False, 0, 0
        base = t.get("type")
        if base == "enum":
            return STRING, False, 0, 0
        if base == "fixed":
            return BYTES, False, 0, 0
        if base in ("record", "array", "map"):
            return JSON, False, 0, 0
        if isinstance(base, str | list | dict):
            return _kind(base, names)
    return JSON, False, 0, 0


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.date | dt.time | uuid.UUID):
        return str(value) if isinstance(value, uuid.UUID) else value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def to_json(value: Any) -> str:
    """A decoded Avro value as JSON text (decimals as strings, bytes in base64 — the same JSON
    form as :func:`pipeline.schemas.jsonform.to_json_form`)."""
    return orjson.dumps(value, default=_json_default).decode()
