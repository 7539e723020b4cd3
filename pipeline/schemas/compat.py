"""BACKWARD compatibility checks between two versions of an Avro schema.

The event catalogue (``schemas/<event_type>/v<N>.avsc``) only ever grows: the highest version is
the writer schema and older versions stay so that old data can still be decoded.  Before a new
version is accepted, :func:`check_backward` verifies that a consumer using the *new* schema as
its reader schema can decode every record written with the *old* schema, following the schema
resolution rules of the Avro specification:

* records are matched by unqualified name (or a reader alias); reader fields are matched to writer
  fields by name (or a reader field alias); a reader field missing from the writer needs a
  default, writer fields missing from the reader are simply skipped;
* primitive types must be equal or promotable (int -> long/float/double, long -> float/double,
  float -> double, string <-> bytes);
* every branch of a writer union must resolve against the reader (the reader union, or the
  reader schema itself when it is not a union); a non-union writer must match some branch of a
  reader union;
* every writer enum symbol must exist in the reader enum unless the reader enum has a default;
* fixed types need equal sizes; arrays and maps recurse on their items / values.

In addition, and stricter than the plain resolution rules, a change of logical type (including
decimal precision or scale) is reported: the bytes would still decode, but their meaning would
silently change.

The module is pure logic: it accepts raw JSON schemas (``dict`` / ``list`` / ``str``, or a JSON
document as ``str``), never touches the network and does not depend on fastavro.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import SchemaError as _PipelineSchemaError

__all__ = ["Incompatibility", "SchemaError", "check_backward"]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})

#: writer type -> reader types it may be promoted to (besides itself).
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


@dataclass(frozen=True)
class Incompatibility:
    """One reason why data written with the old schema cannot be read with the new one."""

    path: str
    """Field path from the record root, e.g. ``"lines[].unit_price"`` (``""`` for the root)."""
    message: str
    """Human-readable explanation."""


class SchemaError(_PipelineSchemaError, ValueError):
    """The schema JSON is malformed (unknown type, missing name, ...)."""


# --------------------------------------------------------------------------------------------
# Normalised schema model
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Field:
    name: str
    type: _Node
    aliases: tuple[str, ...]
    has_default: bool


@dataclass(eq=False)
class _Node:
    """A schema node; named types are shared objects, so recursive schemas form cycles."""

    kind: str  # a primitive name, "record", "enum", "fixed", "array", "map" or "union"
    logical: str | None = None
    precision: int | None = None
    scale: int | None = None
    fullname: str = ""
    aliases: tuple[str, ...] = ()
    fields: list[_Field] = field(default_factory=list)
    symbols: tuple[str, ...] = ()
    enum_default: str | None = None
    size: int | None = None
    items: _Node | None = None  # array items / map values
    branches: list[_Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Unqualified name of a named type."""
        return self.fullname.rsplit(".", 1)[-1]


def _fullname(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _namespace_of(fullname: str) -> str | None:
    return fullname.rsplit(".", 1)[0] if "." in fullname else None


class _Parser:
    def __init__(self) -> None:
        self.names: dict[str, _Node] = {}

    def parse(self, schema: Any, namespace: str | None) -> _Node:
        if isinstance(schema, str):
            return self._reference(schema, namespace)
        if isinstance(schema, list):
            return _Node(kind="union", branches=[self.parse(b, namespace) for b in schema])
        if not isinstance(schema, dict):
            raise SchemaError(f"not a valid schema: {schema!r}")
        typ = schema.get("type")
        if isinstance(typ, (dict, list)):
            return self.parse(typ, namespace)
        if not isinstance(typ, str):
            raise SchemaError(f"schema without a valid 'type': {schema!r}")
        if typ in _PRIMITIVES:
            return _Node(
                kind=typ,
                logical=_opt_str(schema.get("logicalType")),
                precision=_opt_int(schema.get("precision")),
                scale=_opt_int(schema.get("scale", 0 if "precision" in schema else None)),
            )
        if typ == "array":
            return _Node(kind="array", items=self.parse(schema.get("items"), namespace))
        if typ == "map":
            return _Node(kind="map", items=self.parse(schema.get("values"), namespace))
        if typ in _NAMED:
            return self._named(typ, schema, namespace)
        return self._reference(typ, namespace)

    def _reference(self, name: str, namespace: str | None) -> _Node:
        if name in _PRIMITIVES:
            return _Node(kind=name)
        for candidate in (_fullname(name, namespace), name):
            if candidate in self.names:
                return self.names[candidate]
        raise SchemaError(f"unknown type {name!r}")

    def _named(self, typ: str, schema: dict[str, Any], namespace: str | None) -> _Node:
        name = schema.get("name")
        if not isinstance(name, str) or not name:
            raise SchemaError(f"{typ} without a name: {schema!r}")
        ns = _opt_str(schema.get("namespace"))
        fullname = _fullname(name, ns if ns is not None else namespace)
        own_ns = _namespace_of(fullname)
        aliases = tuple(_fullname(a, own_ns) for a in _str_list(schema.get("aliases")))
        node = _Node(kind="record" if typ == "error" else typ, fullname=fullname, aliases=aliases)
        self.names[fullname] = node
        if typ == "enum":
            node.symbols = tuple(_str_list(schema.get("symbols")))
            node.enum_default = _opt_str(schema.get("default"))
        elif typ == "fixed":
            node.size = _opt_int(schema.get("size"))
            node.logical = _opt_str(schema.get("logicalType"))
            node.precision = _opt_int(schema.get("precision"))
            scale = schema.get("scale", 0 if "precision" in schema else None)
            node.scale = _opt_int(scale)
        else:
            for raw in schema.get("fields", []):
                if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                    raise SchemaError(f"invalid field in {fullname}: {raw!r}")
                node.fields.append(
                    _Field(
                        name=raw["name"],
                        type=self.parse(raw.get("type"), own_ns),
                        aliases=tuple(_str_list(raw.get("aliases"))),
                        has_default="default" in raw,
                    )
                )
        return node


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str)]


def _load(schema: dict[str, Any] | list[Any] | str) -> _Node:
    raw: Any = schema
    if isinstance(schema, str):
        text = schema.strip()
        if text[:1] in ("{", "[", '"'):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SchemaError(f"schema is not valid JSON: {exc}") from exc
        else:
            raw = text
    return _Parser().parse(raw, None)


# --------------------------------------------------------------------------------------------
# Resolution check
# --------------------------------------------------------------------------------------------


def _describe(node: _Node) -> str:
    if node.kind == "union":
        return "union[" + ", ".join(_describe(b) for b in node.branches) + "]"
    if node.kind == "array":
        assert node.items is not None
        return f"array<{_describe(node.items)}>"
    if node.kind == "map":
        assert node.items is not None
        return f"map<{_describe(node.items)}>"
    if node.kind in ("record", "enum", "fixed"):
        return f"{node.kind} {node.fullname}"
    if node.logical == "decimal":
        return f"{node.kind} (decimal({node.precision},{node.scale}))"
    if node.logical:
        return f"{node.kind} ({node.logical})"
    return node.kind


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _where(path: str) -> str:
    return f"'{path}'" if path else "the root"


class _Checker:
    def __init__(self) -> None:
        # (reader, writer) pairs currently being checked; assumed compatible while in progress so
        # that recursive types terminate.
        self._active: set[tuple[int, int]] = set()

    def check(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        if writer.kind == "union":
            return self._writer_union(reader, writer, path)
        if reader.kind == "union":
            return self._reader_union(reader, writer, path)
        return self._non_union(reader, writer, path)

    def _writer_union(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        problems: list[Incompatibility] = []
        for branch in writer.branches:
            if reader.kind == "union":
                problems.extend(self._reader_union(reader, branch, path))
                continue
            found = self._non_union(reader, branch, path)
            if found and _same_shape(reader, branch):
                problems.extend(found)
            elif found:
                problems.append(
                    Incompatibility(
                        path,
                        f"union branch {_describe(branch)} at {_where(path)} can be written by the "
                        f"old schema but the new schema only reads {_describe(reader)}",
                    )
                )
        return problems

    def _reader_union(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        candidates: list[list[Incompatibility]] = []
        for branch in reader.branches:
            found = self._non_union(branch, writer, path)
            if not found:
                return []
            if _same_shape(branch, writer):
                candidates.append(found)
        if len(candidates) == 1:
            # A single branch of the same kind/name: report what is wrong inside it.
            return candidates[0]
        return [
            Incompatibility(
                path,
                f"{_describe(writer)} written by the old schema at {_where(path)} matches no "
                f"branch of the new {_describe(reader)}",
            )
        ]

    def _non_union(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        if reader.kind == "union" or writer.kind == "union":
            return self.check(reader, writer, path)
        if reader.kind in _PRIMITIVES and writer.kind in _PRIMITIVES:
            return self._primitive(reader, writer, path)
        if reader.kind != writer.kind:
            return [_type_changed(reader, writer, path)]
        if reader.kind == "array":
            assert reader.items is not None and writer.items is not None
            return self.check(reader.items, writer.items, path + "[]")
        if reader.kind == "map":
            assert reader.items is not None and writer.items is not None
            return self.check(reader.items, writer.items, path + "{}")
        # named types
        if not _names_match(reader, writer):
            return [
                Incompatibility(
                    path,
                    f"{reader.kind} name changed from {writer.fullname!r} to {reader.fullname!r} "
                    f"at {_where(path)} and the new schema has no matching alias",
                )
            ]
        key = (id(reader), id(writer))
        if key in self._active:
            return []
        self._active.add(key)
        try:
            if reader.kind == "record":
                return self._record(reader, writer, path)
            if reader.kind == "enum":
                return self._enum(reader, writer, path)
            return self._fixed(reader, writer, path)
        finally:
            self._active.discard(key)

    def _primitive(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        if reader.kind != writer.kind and reader.kind not in _PROMOTIONS.get(writer.kind, ()):
            return [_type_changed(reader, writer, path)]
        return _logical(reader, writer, path)

    def _record(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        by_name = {f.name: f for f in writer.fields}
        problems: list[Incompatibility] = []
        for rfield in reader.fields:
            fpath = _join(path, rfield.name)
            wfield = by_name.get(rfield.name)
            if wfield is None:
                wfield = next((by_name[a] for a in rfield.aliases if a in by_name), None)
            if wfield is None:
                if not rfield.has_default:
                    problems.append(
                        Incompatibility(
                            fpath,
                            f"field {rfield.name!r} was added without a default: old data has no "
                            "value for it",
                        )
                    )
                continue
            problems.extend(self.check(rfield.type, wfield.type, fpath))
        return problems

    def _enum(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        missing = [s for s in writer.symbols if s not in reader.symbols]
        if not missing:
            return []
        if reader.enum_default is not None and reader.enum_default in reader.symbols:
            return []
        listed = ", ".join(repr(s) for s in missing)
        return [
            Incompatibility(
                path,
                f"enum {reader.fullname} at {_where(path)} no longer has symbol(s) {listed} that "
                "old data may contain, and the new enum has no default",
            )
        ]

    def _fixed(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        if reader.size != writer.size:
            return [
                Incompatibility(
                    path,
                    f"fixed {reader.fullname} at {_where(path)} changed size from {writer.size} "
                    f"to {reader.size} bytes",
                )
            ]
        return _logical(reader, writer, path)


def _same_shape(a: _Node, b: _Node) -> bool:
    """Whether two non-union nodes are "the same slot" (so details are worth reporting)."""
    if a.kind != b.kind:
        return False
    if a.kind in ("record", "enum", "fixed"):
        return _names_match(a, b)
    return True


def _names_match(reader: _Node, writer: _Node) -> bool:
    if reader.fullname == writer.fullname or writer.fullname in reader.aliases:
        return True
    unqualified = {a.rsplit(".", 1)[-1] for a in reader.aliases}
    unqualified.add(reader.name)
    return writer.name in unqualified


def _type_changed(reader: _Node, writer: _Node, path: str) -> Incompatibility:
    return Incompatibility(
        path,
        f"type of {_where(path)} changed from {_describe(writer)} to {_describe(reader)}, which "
        "cannot be read from old data",
    )


def _logical(reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
    if reader.logical != writer.logical:
        return [
            Incompatibility(
                path,
                f"logical type of {_where(path)} changed from {_describe(writer)} to "
                f"{_describe(reader)}: old values would be misinterpreted",
            )
        ]
    if reader.logical == "decimal" and (
        reader.precision != writer.precision or reader.scale != writer.scale
    ):
        return [
            Incompatibility(
                path,
                f"decimal at {_where(path)} changed from ({writer.precision},{writer.scale}) to "
                f"({reader.precision},{reader.scale}): old values would be misinterpreted",
            )
        ]
    return []


def check_backward(
    old: dict[str, Any] | list[Any] | str, new: dict[str, Any] | list[Any] | str
) -> list[Incompatibility]:
    """Check that data written with ``old`` can be read with ``new`` (BACKWARD compatibility).

    Both schemas are raw Avro JSON (a parsed ``dict``/``list``, a primitive type name, or a JSON
    document as ``str``).  Returns the list of incompatibilities; an empty list means compatible.
    Raises :class:`SchemaError` if either schema is malformed.
    """
    writer = _load(old)
    reader = _load(new)
    return _Checker().check(reader, writer, "")
