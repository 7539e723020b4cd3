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

import re
from collections.abc import Mapping
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
    value: Any = context
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            raise MappingError(f"the event has no {path!r} (mapping reference {{{path}}})")
    return value


def render(template: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(template, str):
        whole = _REF.fullmatch(template)
        if whole:
            return lookup(context, whole.group(1))
        return _REF.sub(lambda m: _text(lookup(context, m.group(1))), template)
    if isinstance(template, Mapping):
        if "$each" in template:
            items = lookup(context, str(template["$each"]))
            if not isinstance(items, list):
                raise MappingError(f"{template['$each']} is not a list")
            return [render(template.get("$item", "{item}"),
                           {**context, **item} if isinstance(item, Mapping)
                           else {**context, "item": item}) for item in items]
        if "$map" in template:
            value = lookup(context, str(template["$map"]))
            values = template.get("values", {})
            if value in values:
                return values[value]
            default = template.get("default", "$same")
            return value if default == "$same" else default
        return {k: render(v, context) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, context) for v in template]
    return template


def _text(value: Any) -> str:
    from urllib.parse import quote

    return quote(str(value), safe="") if not isinstance(value, str) else quote(value, safe="")


def build_call(route: Route, context: Mapping[str, Any]) -> Call:
    """The HTTP call for one event: path references are URL-quoted, the body keeps types."""
    path = _REF.sub(lambda m: _text(lookup(context, m.group(1))), route.path)
    body = render(route.body, context) if route.body is not None else None
    return Call(route.method, path, body, route.skip, route.retry)
