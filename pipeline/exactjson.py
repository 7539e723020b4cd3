"""JSON without binary floats: what an ERP wrote is what the pipeline carries.

``loads`` reads every number with a fraction or an exponent as a :class:`decimal.Decimal`
(exactly the digits written: ``140.00`` stays ``140.00``, ``99999999999999.99`` is not rounded,
``1e400`` is not infinity) and integers as Python ints (of any size). ``dumps`` writes them back
as the same number text. PostgreSQL's jsonb holds numerics exactly, so an outbox payload read
with ``loads`` and written with ``dumps`` keeps every digit.
"""

from __future__ import annotations

import decimal
import json
from typing import Any


class JsonError(ValueError):
    """Text that is not JSON this module can carry (the message says why, and where)."""


def _no_constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_float=decimal.Decimal, parse_constant=_no_constant)


def loads(text: str | bytes) -> Any:
    if isinstance(text, bytes | bytearray):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise JsonError(f"not UTF-8: {exc}") from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise JsonError(f"not JSON: {exc}") from None
    except RecursionError:
        raise JsonError("nested too deeply to parse") from None


def _encode_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def dumps(obj: Any) -> str:
    """Compact JSON; Decimals as their number text, ints at any size."""
    out: list[str] = []
    _write(obj, out, 0)
    return "".join(out)


def _write(obj: Any, out: list[str], depth: int) -> None:
    if depth > 10_000:
        raise JsonError("nested too deeply to write")
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_encode_str(obj))
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, decimal.Decimal):
        if not obj.is_finite():
            raise JsonError(f"{obj} is not a JSON number")
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(json.dumps(obj, allow_nan=False))  # a given float: its shortest text
    elif isinstance(obj, dict):
        out.append("{")
        first = True
        for k, v in obj.items():
            if not first:
                out.append(",")
            first = False
            out.append(_encode_str(str(k)))
            out.append(":")
            _write(v, out, depth + 1)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(",")
            _write(v, out, depth + 1)
        out.append("]")
    else:
        out.append(_encode_str(str(obj)))  # dates, UUIDs …: their text
