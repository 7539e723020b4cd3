"""Event → API call mapping, as configuration (pure).

A route says which call an event type becomes::

    order.created:
      method: POST
      path: /fulfilment-orders/{payload.order_id}
      body:
        order_id: "{payload.order_id}"          # one reference: the value, with its type
        label: "order {payload.order_id}"       # text around references: a string
        lines: {"$each": payload.lines, "$item": {sku: "{sku}", qty: "{qty}"}}
        status: {"$map": payload.to_status, "values": {DRAFT: OPEN}, "default": "$same"}
        version: "{aggregate_version}"
      skip: [409]     # statuses that mean "already applied / stale": done, not an error
      retry: ["409:unknown_order"]  # "not yet": retried; status:code matches the body's
                                    # "error" field, so a 409 with another code is refused

References name a path in the event's context: ``event_id``, ``event_type``, ``aggregate_id``,
``aggregate_version``, ``occurred_at`` and ``payload.…`` (the payload in JSON form: decimals as
strings, timestamps as ISO-8601). A missing reference is an error naming it (the event goes to
the DLQ: the mapping and the event disagree).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.rest.client import status_rules
from pipeline.errors import PermanentError

_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


class MappingError(PermanentError):
    """A route refers to something the event does not have."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    body: Any = None
    skip: tuple[int | str, ...] = ()
    retry: tuple[int | str, ...] = ()

    @functools.cached_property
    def compiled(self) -> tuple[Render, Render | None]:
        """(path, body) as functions of an event's context, worked out on first use."""
        body = compile_template(self.body) if self.body is not None else None
        return _compile_text(self.path, quoted=True), body

    @classmethod
    def parse(cls, event_type: str, spec: Mapping[str, Any]) -> Route:
        unknown = set(spec) - {"method", "path", "body", "skip", "retry"}
        if unknown:
            raise ValueError(f"mapping of {event_type}: unknown keys {sorted(unknown)}")
        for rule in ("skip", "retry"):
            try:
                status_rules(spec.get(rule, ()))
            except ValueError as exc:
                raise ValueError(f"mapping of {event_type}: {rule}: {exc}") from None
        try:
            return cls(method=str(spec["method"]).upper(), path=str(spec["path"]),
                       body=spec.get("body"), skip=tuple(spec.get("skip", ())),
                       retry=tuple(spec.get("retry", ())))
        except KeyError as exc:
            raise ValueError(f"mapping of {event_type}: {exc.args[0]} is required") from None


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any
    skip: tuple[int | str, ...] = ()
    retry: tuple[int | str, ...] = field(default=())


def lookup(context: Mapping[str, Any], path: str) -> Any:
    return _lookup(context, path.split("."), path)


def _lookup(context: Mapping[str, Any], parts: list[str], path: str) -> Any:
    value: Any = context
    for part in parts:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            raise MappingError(f"the event has no {path!r} (mapping reference {{{path}}})")
    return value


Render = Callable[[Mapping[str, Any]], Any]


def render(template: Any, context: Mapping[str, Any]) -> Any:
    return compile_template(template)(context)


def compile_template(template: Any) -> Render:
    """``template`` as a function of an event's context, worked out once: a route's body is
    rendered for every event, and finding its references each time took half the time of
    building a call (order.created's: 14 µs, now 7 µs)."""
    if isinstance(template, str):
        return _compile_text(template, quoted=False)
    if isinstance(template, Mapping):
        if "$each" in template:
            each = str(template["$each"])
            item_of = compile_template(template.get("$item", "{item}"))
            items_of = _reference(each)

            def each_item(context: Mapping[str, Any]) -> Any:
                items = items_of(context)
                if not isinstance(items, list):
                    raise MappingError(f"{each} is not a list")
                return [item_of({**context, **item} if isinstance(item, Mapping)
                                else {**context, "item": item}) for item in items]

            return each_item
        if "$map" in template:
            value_of = _reference(str(template["$map"]))
            values = template.get("values", {})
            default = template.get("default", "$same")

            def mapped(context: Mapping[str, Any]) -> Any:
                value = value_of(context)
                if value in values:
                    return values[value]
                return value if default == "$same" else default

            return mapped
        fields = [(k, compile_template(v)) for k, v in template.items()]
        return lambda context: {k: f(context) for k, f in fields}
    if isinstance(template, list):
        parts = [compile_template(v) for v in template]
        return lambda context: [f(context) for f in parts]
    return lambda _context: template


def _reference(path: str) -> Render:
    parts = path.split(".")
    return lambda context: _lookup(context, parts, path)


def _compile_text(text: str, *, quoted: bool) -> Render:
    """A string template: one whole reference gives the value with its type (``quoted``:
    as URL-quoted text, for a path); text around references gives a string, each value
    URL-quoted."""
    whole = _REF.fullmatch(text)
    if whole and not quoted:
        return _reference(whole.group(1))
    pieces: list[str | Render] = []
    at = 0
    for m in _REF.finditer(text):
        if m.start() > at:
            pieces.append(text[at:m.start()])
        pieces.append(_reference(m.group(1)))
        at = m.end()
    if at < len(text):
        pieces.append(text[at:])
    if not any(callable(p) for p in pieces):
        return lambda _context: text
    return lambda context: "".join(
        p if isinstance(p, str) else _text(p(context)) for p in pieces)


def _text(value: Any) -> str:
    from urllib.parse import quote

    return quote(str(value), safe="") if not isinstance(value, str) else quote(value, safe="")


def build_call(route: Route, context: Mapping[str, Any]) -> Call:
    """The HTTP call for one event: path references are URL-quoted, the body keeps types."""
    path_of, body_of = route.compiled
    return Call(route.method, path_of(context),
                body_of(context) if body_of is not None else None, route.skip, route.retry)
