"""Avro binary encoding straight from the *JSON form* of an event (what an ERP writes into the
outbox's jsonb column), validating as it goes; and :func:`to_json_form`, the way back from a
decoded datum.

This is the relay's hot path. An encoder compiled once per schema walks the payload and writes
Avro's binary encoding (zig-zag varints, length-prefixed strings, decimals as unscaled
two's-complement bytes) without building an intermediate datum for a generic writer: about half
the cost of converting and then calling fastavro. Decoding stays with fastavro. The output is
byte-for-byte what fastavro writes for the same values (the unit tests hold it to that).

JSON form conventions: decimals as strings (``"12.50"``) or numbers, timestamps as ISO-8601
strings (or integers in the logical type's unit), dates as ``"YYYY-MM-DD"``, enums as their
symbol, optional fields as ``null`` or absent (when the schema gives a default).

Every mismatch raises :class:`PayloadError` with the path of the offending field.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
import struct
import uuid
from collections.abc import Callable
from typing import Any

from pipeline.errors import PayloadError

Converter = Callable[[Any], Any]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_INF = float("inf")


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
    # a JSON number with a fraction arrives as an exact Decimal (pipeline.exactjson); the
    # schema's float/double is where it becomes binary
    _expect(isinstance(v, int | float | decimal.Decimal) and not isinstance(v, bool), "a number",
            v)
    f = float(v)
    if f in (_INF, -_INF) or f != f:
        raise _Fail(f"number {_short(v)} does not fit a double")
    return f


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
            # minimal two's complement, as Java's BigInteger.toByteArray (Avro's
            # DecimalConversion) writes it: -128 is 80, not ff80
            bits = unscaled.bit_length() if unscaled >= 0 else (~unscaled).bit_length()
            return unscaled.to_bytes(bits // 8 + 1, "big", signed=True)
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


# -- Avro binary encoding ----------------------------------------------------------------------
Encode = Callable[[Any], bytes]

_SMALL = 4096  # zig-zag varints of -4096..4095 are precomputed: lengths, counts, small numbers
_VARINT_CACHE: list[bytes] = []


def _varint_uncached(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_VARINT_CACHE.extend(_varint_uncached(i) for i in range(-_SMALL, _SMALL))


def zigzag(n: int) -> bytes:
    """Avro's encoding of an int or long: zig-zag, then a base-128 varint."""
    if -_SMALL <= n < _SMALL:
        return _VARINT_CACHE[n + _SMALL]
    return _varint_uncached(n)


def _long(v: Any) -> bytes:
    if type(v) is not int:
        _int(v)
    if not -(2**63) <= v < 2**63:
        raise _Fail(f"integer {v} does not fit Avro long (64-bit)")
    return zigzag(v)


def _int32_enc(v: Any) -> bytes:
    return zigzag(_int32(v))


def _string(v: Any) -> bytes:
    if type(v) is not str:
        _str(v)
    b: bytes = v.encode()
    return zigzag(len(b)) + b


def _raw_bytes(b: bytes) -> bytes:
    return zigzag(len(b)) + b


_OTHER, _STRING, _INTEGER = 0, 1, 2  # field kinds the record loop writes inline

_FLOAT = struct.Struct("<f")
_DOUBLE = struct.Struct("<d")


def _encoder_of(conv: Converter, wrap: Callable[[Any], bytes]) -> Encode:
    return lambda v: wrap(conv(v))


class Compiler:
    """Compiles a parsed (fastavro) schema into an encoder: JSON form in, Avro binary out.

    Validation and encoding are one walk: each field is checked (with its path on failure) as
    it is written, with no intermediate datum and no schema interpretation per event.
    """

    def __init__(self) -> None:
        self._named: dict[str, Encode] = {}

    def compile(self, schema: Any) -> Encode:
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
            return self._array(self.compile(schema["items"]))
        if t == "map":
            return self._map(self.compile(schema["values"]))
        if t == "fixed":
            enc = self._fixed(schema)
            self._named[schema["name"]] = enc  # later references use the name alone
            return enc
        return self._primitive(t, schema)

    @staticmethod
    def _array(item: Encode) -> Encode:
        def arr(v: Any) -> bytes:
            if type(v) is not list:
                _expect(isinstance(v, list), "an array", v)
            if not v:
                return b"\x00"
            i = 0
            try:
                parts = [zigzag(len(v))]
                for i, x in enumerate(v):  # noqa: B007 - i is read in the handler
                    parts.append(item(x))
            except _Fail as e:
                e.segments.append(f"[{i}]")
                raise
            parts.append(b"\x00")
            return b"".join(parts)

        return arr

    @staticmethod
    def _map(value: Encode) -> Encode:
        def mp(v: Any) -> bytes:
            _expect(isinstance(v, dict), "an object", v)
            if not v:
                return b"\x00"
            k = ""
            try:
                parts = [zigzag(len(v))]
                for k, x in v.items():
                    parts.append(_string(k))
                    parts.append(value(x))
            except _Fail as e:
                e.segments.append(str(k))
                raise
            parts.append(b"\x00")
            return b"".join(parts)

        return mp

    def _fixed(self, schema: dict[str, Any]) -> Encode:
        if schema.get("logicalType") == "decimal":
            return self._primitive("fixed", schema)
        size = int(schema["size"])

        def fixed(v: Any) -> bytes:
            b = _bytes(v)
            if len(b) != size:
                raise _Fail(f"expected {size} bytes, got {len(b)}")
            return bytes(b)

        return fixed

    def _primitive(self, t: str, schema: dict[str, Any]) -> Encode:
        if t in self._named:
            return self._named[t]
        logical = schema.get("logicalType")
        if logical == "decimal" and t in ("bytes", "fixed"):
            size = int(schema["size"]) if t == "fixed" else None
            dec = _decimal(int(schema["precision"]), int(schema.get("scale", 0)), size)
            return dec if size is not None else _encoder_of(dec, _raw_bytes)
        if logical == "timestamp-micros" and t == "long":
            return _encoder_of(_timestamp(1_000_000), zigzag)
        if logical == "timestamp-millis" and t == "long":
            return _encoder_of(_timestamp(1_000), zigzag)
        if logical == "date" and t == "int":
            return _encoder_of(_date, zigzag)
        if logical == "uuid" and t == "string":
            return _encoder_of(_uuid, _string)
        table: dict[str, Encode] = {
            "null": lambda v: _null(v) or b"",
            "boolean": lambda v: b"\x01" if _bool(v) else b"\x00",
            "int": _int32_enc,
            "long": _long,
            "float": lambda v: _FLOAT.pack(_float(v)),
            "double": lambda v: _DOUBLE.pack(_float(v)),
            "string": _string,
            "bytes": lambda v: _raw_bytes(_bytes(v)),
        }
        try:
            return table[t]
        except KeyError:
            raise ValueError(f"unsupported Avro type {t!r}") from None

    def _enum(self, schema: dict[str, Any]) -> Encode:
        index = {sym: zigzag(i) for i, sym in enumerate(schema["symbols"])}
        listed = ", ".join(schema["symbols"])

        def enum(v: Any) -> bytes:
            try:
                return index[v]
            except (KeyError, TypeError):
                raise _Fail(f"expected one of {listed}, got {_short(v)}") from None

        self._named[schema["name"]] = enum
        return enum

    def _record(self, schema: dict[str, Any]) -> Encode:
        fields: list[tuple[str, int, Encode, bytes | None]] = []
        cache = _VARINT_CACHE

        def rec(v: Any) -> bytes:
            if type(v) is not dict:
                _expect(isinstance(v, dict), "an object", v)
            parts: list[bytes] = []
            append = parts.append
            matched = 0
            for name, kind, enc, default in fields:
                if name in v:
                    matched += 1
                    x = v[name]
                    # The commonest fields inline, without a call per field.
                    if kind == _STRING and type(x) is str:
                        b = x.encode()
                        n = len(b)
                        append(cache[n + _SMALL] if n < _SMALL else zigzag(n))
                        append(b)
                        continue
                    if kind == _INTEGER and type(x) is int and -_SMALL <= x < _SMALL:
                        append(cache[x + _SMALL])
                        continue
                    try:
                        append(enc(x))
                    except _Fail as e:
                        e.segments.append(name)
                        raise
                elif default is not None:
                    append(default)
                else:
                    raise _Fail("required field is missing", name)
            if matched != len(v):
                known = {f[0] for f in fields}
                extra = sorted(k for k in v if k not in known)
                raise _Fail(f"unknown field(s) {', '.join(extra)}: not in the schema", extra[0])
            return b"".join(parts)

        # Register before compiling the fields so recursive references resolve.
        self._named[schema["name"]] = rec
        for f in schema["fields"]:
            ftype = f["type"]
            enc = self.compile(ftype)
            default = None
            if "default" in f:
                # A union's default is a value of its first branch.
                default = (
                    b"\x00" + self.compile(ftype[0])(f["default"])
                    if isinstance(ftype, list)
                    else enc(f["default"])
                )
            kind = {"string": _STRING, "int": _INTEGER, "long": _INTEGER}.get(
                ftype if isinstance(ftype, str) else "", _OTHER
            )
            fields.append((f["name"], kind, enc, default))
        return rec

    def _union(self, branches: list[Any]) -> Encode:
        encs = [(zigzag(i), b, self.compile(b)) for i, b in enumerate(branches)]
        null_tag = next((tag for tag, b, _ in encs if b == "null"), None)
        non_null = [(tag, enc) for tag, b, enc in encs if b != "null"]

        def union(v: Any) -> bytes:
            if v is None:
                if null_tag is not None:
                    return null_tag
                raise _Fail("expected a value, got null")
            errors: list[_Fail] = []
            for tag, enc in non_null:
                try:
                    return tag + enc(v)
                except _Fail as e:
                    errors.append(e)
            if len(errors) == 1:
                raise errors[0]
            raise _Fail("matches no branch of the union: " + "; ".join(e.message for e in errors))

        return union


def compile_encoder(parsed_schema: Any, event_type: str) -> Callable[[Any], bytes]:
    """A function turning a JSON-form payload into Avro binary (the body, without framing), or
    raising :class:`PayloadError` naming the offending field."""
    root = Compiler().compile(parsed_schema)

    def encode(payload: Any) -> bytes:
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

    return encode


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
