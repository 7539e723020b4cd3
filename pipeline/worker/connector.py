"""What a connector author writes: an object with handlers per event type (and a default).

    from pipeline.worker import Connector, Event, on

    class Wms(Connector):
        name = "wms"

        @on("order.created")
        def create(self, event: Event) -> None: ...

        def default(self, event: Event) -> None:  # optional: every other type
            ...

A handler returns (done), or raises :class:`~pipeline.errors.TransientError` (retry) or
:class:`~pipeline.errors.PermanentError` (dead-letter); anything else is classified by
:mod:`pipeline.worker.classify`, which a connector extends by overriding ``classify``. Event
types with no handler and no default are skipped (acknowledged), and counted.

Any object works, not only subclasses: ``handlers`` (a mapping of event type to callable) or
methods marked with ``@on``, an optional ``default`` and ``classify``. ``load_connector``
accepts ``module:attribute`` naming an instance, a class, or a factory.
"""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pipeline.errors import ConfigError
from pipeline.kafka import names
from pipeline.schemas.catalogue import SchemaVersion

Handler = Callable[["Event"], Any]
_ON_ATTR = "__pipeline_event_types__"
# Retry bookkeeping headers are big-endian integers (Spring's encoding), not text.
_BINARY_HEADERS = frozenset(
    {
        names.ORIGINAL_PARTITION,
        names.ORIGINAL_OFFSET,
        names.ORIGINAL_TIMESTAMP,
        names.ATTEMPTS,
        names.BACKOFF_TIMESTAMP,
        names.FIRST_FAILURE_TIMESTAMP,
        names.HOPS,
    }
)


@dataclass(frozen=True)
class Event:
    """A decoded event as a handler sees it.

    ``payload`` is decoded from Avro on first access (Decimal, datetime, date … as the schema
    says; :func:`~pipeline.schemas.jsonform.to_json_form` gives the JSON form). The record's
    framing and schema are checked before the handler runs; a body that turns out corrupt
    raises :class:`~pipeline.errors.DecodeError` on access, which dead-letters the event.
    """

    event_id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    occurred_at: dt.datetime | None
    raw_headers: Mapping[str, bytes]  # the record's headers as received
    topic: str
    partition: int
    offset: int
    attempt: int = 1  # 1 on the first delivery, 2 on the first retry …
    traceparent: str | None = None
    # the writer schema the record's framing names (its body is decoded with it)
    schema: SchemaVersion | None = field(default=None, repr=False, compare=False)
    timestamp_ms: int = 0  # the Kafka record's timestamp (0 when the broker gave none)
    extra: dict[str, Any] = field(default_factory=dict)
    load_payload: Callable[[], dict[str, Any]] = field(default=dict, repr=False, compare=False)

    @cached_property
    def payload(self) -> dict[str, Any]:
        return self.load_payload()

    @cached_property
    def headers(self) -> dict[str, str]:
        """The text headers (binary retry bookkeeping left out)."""
        return {
            k: v.decode("utf-8", "replace")
            for k, v in self.raw_headers.items()
            if k not in _BINARY_HEADERS and isinstance(v, bytes)
        }

    @property
    def key(self) -> str:
        return self.aggregate_id


def on(*event_types: str) -> Callable[[Handler], Handler]:
    """Mark a method as the handler of these event types."""

    def mark(fn: Handler) -> Handler:
        setattr(fn, _ON_ATTR, (*getattr(fn, _ON_ATTR, ()), *event_types))
        return fn

    return mark


class Connector:
    """Optional base class; see the module docstring."""

    name: str = "connector"
    handlers: Mapping[str, Handler] = {}

    def default(self, event: Event) -> Any:
        """Override to handle event types without a handler; the base class's means "none":
        such events are skipped (acknowledged) and counted."""
        return None

    def classify(self, exc: BaseException) -> str | None:
        """'transient', 'permanent', or None to use the built-in rules."""
        return None

    def close(self) -> None:
        """Release clients (HTTP pools, connections) on shutdown."""


@dataclass(frozen=True)
class Dispatch:
    """A connector's handlers resolved once: event type → callable, and the fallbacks."""

    handlers: dict[str, Handler]
    default: Handler | None
    classify: Callable[[BaseException], str | None]
    close: Callable[[], None]

    def handler_for(self, event_type: str) -> Handler | None:
        return self.handlers.get(event_type, self.default)


def dispatch_of(connector: object) -> Dispatch:
    handlers: dict[str, Handler] = dict(getattr(connector, "handlers", {}) or {})
    for attr in dir(type(connector)):
        fn = getattr(type(connector), attr, None)
        for event_type in getattr(fn, _ON_ATTR, ()):
            handlers[event_type] = getattr(connector, attr)
    default = getattr(connector, "default", None)
    if default is not None and getattr(type(connector), "default", None) is Connector.default:
        default = None  # the base class's default means "no default"
    classify = getattr(connector, "classify", None) or (lambda exc: None)
    close = getattr(connector, "close", None) or (lambda: None)
    if not handlers and default is None:
        raise ConfigError(
            f"connector {type(connector).__name__} has no handlers: mark methods with "
            "@on('event.type'), set a handlers mapping, or define default(event)"
        )
    return Dispatch(handlers, default, classify, close)


def load_connector(spec: str, options: Mapping[str, Any] | None = None) -> object:
    """``module:attribute`` → a connector object (an instance; classes and factories are
    called with the configured options as keyword arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"connector {spec!r} must be given as module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import connector module {module_name!r}: {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or (
        callable(obj) and not hasattr(obj, "handlers") and not _has_on(obj)
    ):
        try:
            obj = obj(**dict(options or {}))
        except TypeError as exc:
            raise ConfigError(f"cannot create connector {spec}: {exc}") from exc
    return obj


def _has_on(obj: object) -> bool:
    return any(getattr(getattr(type(obj), a, None), _ON_ATTR, None) for a in dir(type(obj)))
