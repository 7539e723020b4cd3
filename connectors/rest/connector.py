"""A connector whose handlers are configuration: each event type with a route becomes one HTTP
call to the target (see :mod:`connectors.rest.mapping`); other event types are skipped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connectors.rest.client import RestTarget
from connectors.rest.mapping import Route, build_call
from pipeline.schemas.jsonform import to_json_form
from pipeline.worker.connector import Connector, Event


class RestConnector(Connector):
    """``options``: ``base_url``, ``mapping`` (event type → route; merged over the defaults,
    ``null`` removes a default), ``timeout_s``, ``connect_timeout_s``, ``bearer_token`` or
    ``username``/``password``, ``headers``, ``max_connections``."""

    name = "rest"
    default_mapping: Mapping[str, Mapping[str, Any]] = {}

    def __init__(self, base_url: str, mapping: Mapping[str, Any] | None = None,
                 **client: Any) -> None:
        merged: dict[str, Any] = {**self.default_mapping, **dict(mapping or {})}
        self.routes = {t: Route.parse(t, spec) for t, spec in merged.items() if spec is not None}
        self.target = RestTarget(base_url, **client)
        self.handlers = {t: self._handle for t in self.routes}

    def _handle(self, event: Event) -> None:
        route = self.routes[event.event_type]
        context = {
            "event_id": event.event_id,
            "event_type": event.event_type,
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "aggregate_version": event.aggregate_version,
            "occurred_at": event.occurred_at.isoformat() if event.occurred_at else None,
            "payload": to_json_form(event.payload),
        }
        call = build_call(route, context)
        self.target.call(call.method, call.path, body=call.body, idempotency_key=event.event_id,
                         traceparent=event.traceparent, skip=call.skip, retry=call.retry)

    def close(self) -> None:
        self.target.close()
