"""Conversion between the *JSON form* of an event (what an ERP writes into the outbox's jsonb
column) and the *wire datum* that fastavro encodes with the logical types stripped from the
schema (decimals already as unscaled bytes, timestamps and dates as integers): the bytes are the
same as with the logical types, at a fraction of the cost.

JSON form conventions: decimals as strings (``"12.50"``) or numbers, timestamps as ISO-8601
strings (or integers in the logical type's unit), dates as ``"YYYY-MM-DD"``, enums as their
symbol, optional fields as ``null`` or absent (when the schema gives a default).

A converter is compiled once per schema into nested closures, so the per-event cost is a walk of
the payload without any schema interpretation. Every mismatch raises :class:`PayloadError` with
the path of the offending field.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
import uuid
from collections.abc import Callable
from typing import Any

from pipeline.errors import PayloadError

Converter = Callable[[Any], Any]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class _Fail(Exception):
    """A mismatch; containers prepend their path segment while it propagates (paths cost
    nothing on the success path)."""

    def __init__(self, message: str, segment: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.segments: list[str] = [segment] if segment is not None else []

    @property
    def path(self) -> str:
        out = ""
        for seg in reversed(self.segments):
            out += seg if seg.startswith("[") or not out else "." + seg
        return out


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(cond: bool, what: str, value: Any) -> None:
    if not cond:
        raise _Fail(f"expected {what}, got {_type_name(value)} {_short(value)}")


def _int(v: Any) -> Any:
    _expect(isinstance(v, int) and not isinstance(v, bool), "an integer", v)
    return v


def _int32(v: Any) -> Any:
    _int(v)
    if not -(2**31) <= v < 2**31:
        raise _Fail(f"integer {v} does not fit Avro int (32-bit)")
    return v


def _float(v: Any) -> Any:
    _expect(isinstance(v, int | float) and not isinstance(v, bool), "a number", v)
    return float(v)


def _str(v: Any) -> Any:
    _expect(isinstance(v, str), "a string", v)
    return v


def _bool(v: Any) -> Any:
    _expect(isinstance(v, bool), "true or false", v)
    return v


def _null(v: Any) -> Any:
    _expect(v is None, "null", v)
    return None


def _bytes(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    _expect(isinstance(v, str), "a base64 string", v)
    try:
        return base64.b64decode(v, validate=True)
    except ValueError:
        raise _Fail("expected a base64 string") from None


def _timestamp(unit: int) -> Converter:
    def conv(v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, dt.datetime):
            ts = v
        else:
            _expect(isinstance(v, str), "an ISO-8601 timestamp string", v)
            try:
                ts = dt.datetime.fromisoformat(v)
            except ValueError:
                raise _Fail(f"expected an ISO-8601 timestamp, got {_short(v)}") from None
        if ts.tzinfo is None:
            raise _Fail(f"timestamp {_short(v)} has no time zone (add +00:00 or Z)")
        delta = ts - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * unit + delta.microseconds * unit // 1_000_000

    return conv


def _date(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    _expect(isinstance(v, str), "a YYYY-MM-DD date string", v)
    try:
        return (dt.date.fromisoformat(v) - dt.date(1970, 1, 1)).days
    except ValueError:
        raise _Fail(f"expected a YYYY-MM-DD date, got {_short(v)}") from None


def _uuid(v: Any) -> Any:
    _str(v)
    try:
        uuid.UUID(v)
    except ValueError:
        raise _Fail(f"expected a UUID, got {_short(v)}") from None
    return v


_PLAIN_DECIMAL = re.compile(r"^(-?\d+)(?:\.(\d+))?$")


def _decimal(precision: int, scale: int, size: int | None = None) -> Converter:
    """Decimal → the unscaled two's-complement big-endian bytes Avro writes (no Decimal maths
    on the common path: a plain ``"123.45"`` string is scaled as text)."""
    limit = 10**precision

    def to_bytes(unscaled: int, v: Any) -> bytes:
        if not -limit < unscaled < limit:
            raise _Fail(f"decimal {v} has more than {precision} digits")
        if size is None:
            return unscaled.to_bytes((unscaled.bit_length() + 8) // 8, "big", signed=True)
        return unscaled.to_bytes(size, "big", signed=True)

    # Prices repeat: a bounded cache of decimal strings already converted.
    cache: dict[str, bytes] = {}

    def conv(v: Any) -> Any:
        if type(v) is str:
            hit = cache.get(v)
            if hit is not None:
                return hit
            m = _PLAIN_DECIMAL.match(v)
            if m is not None:
                whole, frac = m.group(1), m.group(2) or ""
                if len(frac) <= scale:
                    b = to_bytes(int(whole + frac.ljust(scale, "0")), v)
                    if len(cache) < 8192:
                        cache[v] = b
                    return b
        _expect(
            isinstance(v, str | int | float | decimal.Decimal) and not isinstance(v, bool),
            'a decimal (string like "12.50" or a number)',
            v,
        )
        try:
            d = decimal.Decimal(str(v)) if not isinstance(v, decimal.Decimal) else v
        except decimal.InvalidOperation:
            raise _Fail(f"expected a decimal, got {_short(v)}") from None
        if not d.is_finite():
            raise _Fail(f"decimal {_short(v)} is not finite")
        scaled = d.scaleb(scale)
        if scaled != scaled.to_integral_value():
            raise _Fail(f"decimal {v} has more than {scale} decimal places")
        return to_bytes(int(scaled), v)

    return conv


# Field kinds the record loop handles inline, without a function call per field.
_GENERIC, _STRING, _LONG, _INT = 0, 1, 2, 3
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class Compiler:
    """Compiles a parsed (fastavro) schema into a converter function."""

    def __init__(self) -> None:
        self._named: dict[str, Converter] = {}

    def compile(self, schema: Any) -> Converter:
        if isinstance(schema, str):
            return self._primitive(schema, {})
        if isinstance(schema, list):
            return self._union(schema)
        t = schema["type"]
        if t == "record" or t == "error":
            return self._record(schema)
        if t == "enum":
            return self._enum(schema)
        if t == "array":
            item = self.compile(schema["items"])

            def arr(v: Any) -> Any:
                _expect(isinstance(v, list), "an array", v)
                i = 0
                try:
                    out = []
                    for i, x in enumerate(v):  # noqa: B007 - i is read in the handler
                        out.append(item(x))
                    return out
                except _Fail as e:
                    e.segments.append(f"[{i}]")
                    raise

            return arr
        if t == "map":
            val = self.compile(schema["values"])

            def mp(v: Any) -> Any:
                _expect(isinstance(v, dict), "an object", v)
                k = ""
                try:
                    out = {}
                    for k, x in v.items():
                        out[k] = val(x)
                    return out
                except _Fail as e:
                    e.segments.append(str(k))
                    raise

            return mp
        if t == "fixed":
            conv = self._fixed(schema)
            self._named[schema["name"]] = conv  # later references use the name alone
            return conv
        return self._primitive(t, schema)

    def _fixed(self, schema: dict[str, Any]) -> Converter:
        if schema.get("logicalType") == "decimal":
            return self._primitive("fixed", schema)
        size = int(schema["size"])

        def fixed(v: Any) -> Any:
            b = _bytes(v)
            if len(b) != size:
                raise _Fail(f"expected {size} bytes, got {len(b)}")
            return b

        return fixed

    def _primitive(self, t: str, schema: dict[str, Any]) -> Converter:
        if t in self._named:
            return self._named[t]
        logical = schema.get("logicalType")
        if logical == "decimal" and t in ("bytes", "fixed"):
            size = int(schema["size"]) if t == "fixed" else None
            return _decimal(int(schema["precision"]), int(schema.get("scale", 0)), size)
        if logical == "timestamp-micros" and t == "long":
            return _timestamp(1_000_000)
        if logical == "timestamp-millis" and t == "long":
            return _timestamp(1_000)
        if logical == "date" and t == "int":
            return _date
        if logical == "uuid" and t == "string":
            return _uuid
        table: dict[str, Converter] = {
            "null": _null,
            "boolean": _bool,
            "int": _int32,
            "long": _int,
            "float": _float,
            "double": _float,
            "string": _str,
            "bytes": _bytes,
        }
        try:
            return table[t]
        except KeyError:
            raise ValueError(f"unsupported Avro type {t!r}") from None

    def _enum(self, schema: dict[str, Any]) -> Converter:
        symbols = frozenset(schema["symbols"])
        listed = ", ".join(schema["symbols"])

        def enum(v: Any) -> Any:
            if v not in symbols:
                raise _Fail(f"expected one of {listed}, got {_short(v)}")
            return v

        self._named[schema["name"]] = enum
        return enum

    def _record(self, schema: dict[str, Any]) -> Converter:
        fields: list[tuple[str, int, Converter, bool, Any]] = []

        def rec(v: Any) -> Any:
            if type(v) is not dict:
                _expect(isinstance(v, dict), "an object", v)
            out: dict[str, Any] = {}
            matched = 0
            for name, kind, conv, has_default, default in fields:
                if name in v:
                    matched += 1
                    x = v[name]
                    tx = type(x)
                    if (
                        (kind == _STRING and tx is str)
                        or (kind == _LONG and tx is int)
                        or (kind == _INT and tx is int and _INT_MIN <= x <= _INT_MAX)
                    ):
                        out[name] = x
                        continue
                    try:
                        out[name] = conv(x)
                    except _Fail as e:
                        e.segments.append(name)
                        raise
                elif has_default:
                    out[name] = default
                else:
                    raise _Fail("required field is missing", name)
            if matched != len(v):
                extra = sorted(k for k in v if k not in out)
                raise _Fail(f"unknown field(s) {', '.join(extra)}: not in the schema", extra[0])
            return out

        # Register before compiling the fields so recursive references resolve.
        self._named[schema["name"]] = rec
        for f in schema["fields"]:
            ftype = f["type"]
            conv = self.compile(ftype)
            kind = (
                {"string": _STRING, "long": _LONG, "int": _INT}.get(ftype, _GENERIC)
                if isinstance(ftype, str)
                else _GENERIC
            )
            has_default = "default" in f
            default = f.get("default")
            if has_default and default is not None:
                default = conv(default)
            fields.append((f["name"], kind, conv, has_default, default))
        return rec

    def _union(self, branches: list[Any]) -> Converter:
        convs = [self.compile(b) for b in branches]
        nullable = any(b == "null" for b in branches)
        non_null = [c for b, c in zip(branches, convs, strict=True) if b != "null"]

        def union(v: Any) -> Any:
            if v is None:
                if nullable:
                    return None
                raise _Fail("expected a value, got null")
            errors: list[_Fail] = []
            for c in non_null:
                try:
                    return c(v)
                except _Fail as e:
                    errors.append(e)
            if len(errors) == 1:
                raise errors[0]
            raise _Fail("matches no branch of the union: " + "; ".join(e.message for e in errors))

        return union


def compile_converter(parsed_schema: Any, event_type: str) -> Callable[[Any], Any]:
    """A function turning a JSON-form payload into an Avro datum, or raising PayloadError."""
    root = Compiler().compile(parsed_schema)

    def convert(payload: Any) -> Any:
        try:
            return root(payload)
        except _Fail as e:
            path = e.path
            raise PayloadError(
                f"payload of {event_type} does not match its schema: "
                f"{path or '<payload>'}: {e.message}",
                event_type=event_type,
                path=path,
            ) from None

    return convert


def to_json_form(value: Any) -> Any:
    """An Avro datum (as fastavro decodes it) in JSON form: the inverse of a converter."""
    if isinstance(value, dict):
        return {k: to_json_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json_form(v) for v in value]
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value
