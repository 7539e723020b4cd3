"""Failure classification, the Event a handler sees, handler dispatch and connector loading."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import urllib3

from pipeline.errors import (
    BrokerUnavailable,
    ConfigError,
    DatabaseUnavailable,
    DecodeError,
    PayloadError,
    PermanentError,
    SchemaError,
    TransientError,
    UnknownSchema,
)
from pipeline.worker import Connector, Event, on
from pipeline.worker.classify import PERMANENT, TRANSIENT, classify
from pipeline.worker.connector import dispatch_of, load_connector

# -- classify ------------------------------------------------------------------------------------


def _status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://wms.example/api/orders")
    response = httpx.Response(status, request=request, json={"error": "x"})
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599, 408, 425, 429])
def test_http_status_transient(status: int) -> None:
    assert classify(_status_error(status)) == TRANSIENT


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 415, 422])
def test_http_status_permanent(status: int) -> None:
    assert classify(_status_error(status)) == PERMANENT


def test_raise_for_status_errors_are_classified() -> None:
    request = httpx.Request("GET", "https://wms.example/x")
    for status, kind in ((503, TRANSIENT), (404, PERMANENT), (429, TRANSIENT)):
        with pytest.raises(httpx.HTTPStatusError) as info:
            httpx.Response(status, request=request).raise_for_status()
        assert classify(info.value) == kind


def test_any_error_carrying_a_response_status_is_classified() -> None:
    class ClientError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(status)
            self.response = types.SimpleNamespace(status_code=status)

    assert classify(ClientError(503)) == TRANSIENT
    assert classify(ClientError(400)) == PERMANENT


def test_a_non_integer_status_is_ignored() -> None:
    class Odd(Exception):
        response = types.SimpleNamespace(status_code="500")

    assert classify(Odd()) == TRANSIENT  # unknown errors are transient


def _request() -> httpx.Request:
    return httpx.Request("GET", "https://wms.example/")


@pytest.mark.parametrize(
    "exc_factory",
    [
        lambda: httpx.ConnectTimeout("connect timed out", request=_request()),
        lambda: httpx.ReadTimeout("read timed out", request=_request()),
        lambda: httpx.PoolTimeout("pool", request=_request()),
        lambda: httpx.ConnectError("refused", request=_request()),
        lambda: httpx.RemoteProtocolError("peer closed", request=_request()),
        lambda: httpx.ConnectTimeout("no request attached"),
    ],
)
def test_httpx_transport_errors_are_transient(exc_factory: Callable[[], Exception]) -> None:
    assert classify(exc_factory()) == TRANSIENT


@pytest.mark.parametrize(
    "exc",
    [
        urllib3.exceptions.NewConnectionError(None, "refused"),  # type: ignore[arg-type]
        urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("Connection aborted", ConnectionResetError()),
        urllib3.exceptions.EmptyPoolError(None, "no free connection"),  # type: ignore[arg-type]
    ],
)
def test_urllib3_transport_errors_are_transient(exc: Exception) -> None:
    assert classify(exc) == TRANSIENT


def test_a_malformed_url_for_urllib3_is_permanent() -> None:
    assert classify(urllib3.exceptions.LocationParseError("http://[::1")) == PERMANENT


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
    ],
)
def test_postgres_transient(exc: Exception) -> None:
    assert classify(exc) == TRANSIENT


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.errors.ForeignKeyViolation("fk"),
        psycopg.errors.NotNullViolation("null"),
        psycopg.errors.NumericValueOutOfRange("too big"),
        psycopg.errors.InvalidTextRepresentation("bad int"),
        psycopg.DataError("data"),
        psycopg.IntegrityError("integrity"),
    ],
)
def test_postgres_permanent(exc: Exception) -> None:
    assert classify(exc) == PERMANENT


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError("t"),
        ConnectionError("c"),
        ConnectionRefusedError("refused"),
        ConnectionResetError("reset"),
        BrokenPipeError("pipe"),
        TransientError("t"),
        BrokerUnavailable("broker", code=1),
        DatabaseUnavailable("db"),
        RuntimeError("something unknown"),
        OSError("unknown os error"),
        Exception("plain"),
    ],
)
def test_transient_builtin_and_pipeline_errors(exc: BaseException) -> None:
    assert classify(exc) == TRANSIENT


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        TypeError("bad"),
        KeyError("sku"),
        AttributeError("x"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        PermanentError("p"),
        SchemaError("s"),
        PayloadError("p", event_type="order.created"),
        DecodeError("d"),
        UnknownSchema("u"),
    ],
)
def test_permanent_builtin_and_pipeline_errors(exc: BaseException) -> None:
    assert classify(exc) == PERMANENT


def test_pipeline_verdict_wins_over_builtin_base_classes() -> None:
    class BadButTransient(TransientError, ValueError):
        pass

    class TimeoutButPermanent(PermanentError, TimeoutError):
        pass

    assert classify(BadButTransient()) == TRANSIENT
    assert classify(TimeoutButPermanent()) == PERMANENT


def test_connector_rule_overrides_the_builtin_rules() -> None:
    def rule(exc: BaseException) -> str | None:
        if isinstance(exc, ValueError):
            return TRANSIENT
        if isinstance(exc, TimeoutError):
            return PERMANENT
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 404:
            return TRANSIENT  # e.g. eventual consistency on the target
        return None

    assert classify(ValueError("x"), rule) == TRANSIENT
    assert classify(TimeoutError("x"), rule) == PERMANENT
    assert classify(_status_error(404), rule) == TRANSIENT
    assert classify(PermanentError("x"), rule) == PERMANENT  # rule said None: built-in rules
    assert classify(KeyError("x"), rule) == PERMANENT


@pytest.mark.parametrize("verdict", [None, "", "retry", "TRANSIENT", 1])
def test_an_unknown_connector_verdict_falls_back_to_the_rules(verdict: object) -> None:
    def rule(exc: BaseException) -> Any:
        return verdict

    assert classify(ValueError("x"), rule) == PERMANENT
    assert classify(TimeoutError("x"), rule) == TRANSIENT


def test_connector_rule_sees_the_exception() -> None:
    seen: list[BaseException] = []
    exc = RuntimeError("boom")
    classify(exc, lambda e: seen.append(e))  # type: ignore[func-returns-value]
    assert seen == [exc]


# -- Event ---------------------------------------------------------------------------------------


def _event(**kw: Any) -> Event:
    args: dict[str, Any] = {
        "event_id": "ev-1",
        "event_type": "order.created",
        "aggregate_type": "order",
        "aggregate_id": "o-42",
        "aggregate_version": 3,
        "occurred_at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "raw_headers": {},
        "topic": "erp.order",
        "partition": 1,
        "offset": 99,
    }
    args.update(kw)
    return Event(**args)


def test_event_defaults_and_key() -> None:
    ev = _event()
    assert ev.attempt == 1
    assert ev.traceparent is None
    assert ev.extra == {}
    assert ev.key == "o-42"
    assert ev.payload == {}


def test_payload_is_loaded_lazily_and_once() -> None:
    calls: list[int] = []

    def load() -> dict[str, Any]:
        calls.append(1)
        return {"sku": "A-1", "qty": 2}

    ev = _event(load_payload=load)
    assert calls == []
    assert ev.payload == {"sku": "A-1", "qty": 2}
    assert ev.payload is ev.payload
    assert calls == [1]


def test_a_corrupt_payload_raises_on_access_only() -> None:
    def load() -> dict[str, Any]:
        raise DecodeError("corrupt body")

    ev = _event(load_payload=load)
    assert ev.event_id == "ev-1"
    with pytest.raises(DecodeError, match="corrupt body"):
        _ = ev.payload


def test_headers_are_text_without_binary_retry_bookkeeping() -> None:
    raw = {
        "ce_id": b"ev-1",
        "ce_type": b"order.created",
        "traceparent": b"00-abc-def-01",
        "kafka_dlt-original-topic": b"erp.order",
        "kafka_dlt-exception-message": b"timed out",
        "kafka_dlt-original-partition": b"\x00\x00\x00\x01",
        "kafka_dlt-original-offset": b"\x00" * 7 + b"\x05",
        "kafka_dlt-original-timestamp": b"\x00" * 8,
        "retry_topic-attempts": b"\x02",
        "retry_topic-backoff-timestamp": b"\x01\x9a\xbc",
        "retry_topic-original-timestamp": b"\x01\x9a\xbb",
        "utf8": "grüße".encode(),
        "broken": b"ok\xffok",
    }
    ev = _event(raw_headers=raw)
    assert ev.headers == {
        "ce_id": "ev-1",
        "ce_type": "order.created",
        "traceparent": "00-abc-def-01",
        "kafka_dlt-original-topic": "erp.order",
        "kafka_dlt-exception-message": "timed out",
        "utf8": "grüße",
        "broken": "ok\ufffdok",
    }


def test_headers_skip_non_bytes_values() -> None:
    ev = _event(raw_headers={"a": b"1", "b": None})
    assert ev.headers == {"a": "1"}


def test_event_is_frozen_and_compares_without_the_loader() -> None:
    ev = _event(load_payload=lambda: {"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.event_id = "other"  # type: ignore[misc]
    assert ev == _event(load_payload=lambda: {"b": 2})
    assert ev != _event(offset=100)


# -- on / dispatch_of ----------------------------------------------------------------------------


class Wms(Connector):
    name = "wms"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @on("order.created")
    def create(self, event: Event) -> str:
        self.seen.append(("create", event.event_id))
        return "created"

    @on("order.cancelled", "order.voided")
    def cancel(self, event: Event) -> str:
        return "cancelled"


def test_on_records_event_types_and_stacks() -> None:
    @on("a")
    @on("b", "c")
    def handler(event: Event) -> None:
        pass

    assert sorted(handler.__pipeline_event_types__) == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert on("x")(handler) is handler


def test_dispatch_of_on_methods_bound_to_the_instance() -> None:
    wms = Wms()
    d = dispatch_of(wms)
    assert set(d.handlers) == {"order.created", "order.cancelled", "order.voided"}
    handler = d.handler_for("order.created")
    assert handler is not None
    assert handler(_event()) == "created"
    assert wms.seen == [("create", "ev-1")]
    assert d.handler_for("order.voided")(_event()) == "cancelled"  # type: ignore[misc]


def test_base_class_default_means_no_default() -> None:
    d = dispatch_of(Wms())
    assert d.default is None
    assert d.handler_for("invoice.posted") is None


def test_a_subclass_default_handles_every_other_type() -> None:
    class WithDefault(Wms):
        def default(self, event: Event) -> str:
            return f"default:{event.event_type}"

    d = dispatch_of(WithDefault())
    assert d.default is not None
    assert d.handler_for("invoice.posted")(_event(event_type="invoice.posted")) == (  # type: ignore[misc]
        "default:invoice.posted"
    )
    assert d.handler_for("order.created")(_event()) == "created"  # type: ignore[misc]


def test_a_connector_with_only_a_default_is_valid() -> None:
    class OnlyDefault(Connector):
        def default(self, event: Event) -> str:
            return "d"

    d = dispatch_of(OnlyDefault())
    assert d.handlers == {}
    assert d.handler_for("anything")(_event()) == "d"  # type: ignore[misc]


def test_handlers_inherited_from_a_parent_connector() -> None:
    class Child(Wms):
        @on("invoice.posted")
        def invoice(self, event: Event) -> str:
            return "invoice"

    d = dispatch_of(Child())
    assert set(d.handlers) == {"order.created", "order.cancelled", "order.voided", "invoice.posted"}


def test_handlers_mapping_on_a_plain_object() -> None:
    calls: list[str] = []

    class Plain:
        def __init__(self) -> None:
            self.handlers = {"a.b": lambda e: calls.append(e.event_id)}

    d = dispatch_of(Plain())
    assert set(d.handlers) == {"a.b"}
    assert d.default is None
    d.handler_for("a.b")(_event())  # type: ignore[misc]
    assert calls == ["ev-1"]
    # A plain object without classify or close gets harmless fallbacks.
    assert d.classify(ValueError()) is None
    d.close()


def test_handlers_mapping_and_on_methods_combine() -> None:
    class Mixed(Connector):
        def __init__(self) -> None:
            self.handlers = {"x.created": lambda e: "mapped"}

        @on("y.created")
        def y(self, event: Event) -> str:
            return "marked"

    d = dispatch_of(Mixed())
    assert d.handler_for("x.created")(_event()) == "mapped"  # type: ignore[misc]
    assert d.handler_for("y.created")(_event()) == "marked"  # type: ignore[misc]


def test_plain_object_with_a_default_function_attribute() -> None:
    obj = types.SimpleNamespace(default=lambda e: "dflt")
    d = dispatch_of(obj)
    assert d.handler_for("z")(_event()) == "dflt"  # type: ignore[misc]


def test_dispatch_uses_the_connectors_classify_and_close() -> None:
    closed: list[bool] = []

    class Custom(Wms):
        def classify(self, exc: BaseException) -> str | None:
            return "permanent" if isinstance(exc, TimeoutError) else None

        def close(self) -> None:
            closed.append(True)

    d = dispatch_of(Custom())
    assert d.classify(TimeoutError()) == "permanent"
    assert classify(TimeoutError(), d.classify) == PERMANENT
    assert classify(ValueError(), d.classify) == PERMANENT
    d.close()
    assert closed == [True]


def test_base_classify_defers_to_the_builtin_rules() -> None:
    d = dispatch_of(Wms())
    assert d.classify(TimeoutError()) is None
    assert classify(TimeoutError(), d.classify) == TRANSIENT


@pytest.mark.parametrize(
    "connector",
    [Connector(), object(), types.SimpleNamespace(handlers={}), types.SimpleNamespace(name="x")],
)
def test_no_handlers_and_no_default_is_a_config_error(connector: object) -> None:
    with pytest.raises(ConfigError, match="has no handlers"):
        dispatch_of(connector)


def test_config_error_names_the_connector_class() -> None:
    class Empty(Connector):
        name = "empty"

    with pytest.raises(ConfigError, match=r"connector Empty has no handlers.*@on"):
        dispatch_of(Empty())


# -- load_connector ------------------------------------------------------------------------------

MODULE = "tests_unit_fake_connectors"


class Configurable(Connector):
    def __init__(self, url: str = "http://default", retries: int = 1) -> None:
        self.url = url
        self.retries = retries

    @on("order.created")
    def create(self, event: Event) -> None:
        pass


class Instance:
    handlers = types.MappingProxyType({"a": print})


class CallableConnector(Connector):
    """An instance that is also callable must not be mistaken for a factory."""

    @on("order.created")
    def create(self, event: Event) -> None:
        pass

    def __call__(self) -> None:  # pragma: no cover - must never be called
        raise AssertionError("called")


class CallableWithOn:
    @on("order.created")
    def create(self, event: Event) -> None:
        pass

    def __call__(self) -> None:  # pragma: no cover - must never be called
        raise AssertionError("called")


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    mod = types.ModuleType(MODULE)
    mod.Configurable = Configurable  # type: ignore[attr-defined]
    mod.instance = Instance()  # type: ignore[attr-defined]
    mod.callable_instance = CallableConnector()  # type: ignore[attr-defined]
    mod.callable_with_on = CallableWithOn()  # type: ignore[attr-defined]

    def factory(**options: Any) -> Configurable:
        return Configurable(**options)

    def broken_factory() -> Configurable:
        raise TypeError("factory bug")

    mod.factory = factory  # type: ignore[attr-defined]
    mod.broken_factory = broken_factory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, MODULE, mod)
    yield mod


def test_load_an_instance_as_is(fake_module: types.ModuleType) -> None:
    assert load_connector(f"{MODULE}:instance") is fake_module.instance
    assert load_connector(f"{MODULE}:instance", {"url": "x"}) is fake_module.instance


def test_load_a_callable_instance_without_calling_it(fake_module: types.ModuleType) -> None:
    assert load_connector(f"{MODULE}:callable_instance") is fake_module.callable_instance
    assert load_connector(f"{MODULE}:callable_with_on") is fake_module.callable_with_on


def test_load_a_class_with_options(fake_module: types.ModuleType) -> None:
    obj = load_connector(f"{MODULE}:Configurable", {"url": "https://wms", "retries": 3})
    assert isinstance(obj, Configurable)
    assert (obj.url, obj.retries) == ("https://wms", 3)
    plain = load_connector(f"{MODULE}:Configurable")
    assert isinstance(plain, Configurable)
    assert plain.url == "http://default"
    assert dispatch_of(obj).handler_for("order.created") is not None


def test_load_a_factory_with_options(fake_module: types.ModuleType) -> None:
    obj = load_connector(f"{MODULE}:factory", {"url": "https://f"})
    assert isinstance(obj, Configurable)
    assert obj.url == "https://f"


def test_load_a_class_with_unknown_options(fake_module: types.ModuleType) -> None:
    with pytest.raises(ConfigError, match=r"cannot create connector .*Configurable.*colour"):
        load_connector(f"{MODULE}:Configurable", {"colour": "red"})


def test_load_a_factory_that_fails(fake_module: types.ModuleType) -> None:
    with pytest.raises(ConfigError, match="cannot create connector"):
        load_connector(f"{MODULE}:broken_factory")


def test_load_a_real_module() -> None:
    obj = load_connector("pipeline.worker.connector:Connector")
    assert isinstance(obj, Connector)


@pytest.mark.parametrize(
    "spec", ["", "no_colon", ":attr", "module:", ":", "pipeline.worker.connector"]
)
def test_bad_spec_asks_for_module_colon_attribute(spec: str) -> None:
    with pytest.raises(ConfigError, match="must be given as module:attribute"):
        load_connector(spec)


def test_unknown_module() -> None:
    with pytest.raises(ConfigError, match=r"cannot import connector module 'no_such_mod_xyz'"):
        load_connector("no_such_mod_xyz:Thing")


def test_unknown_attribute(fake_module: types.ModuleType) -> None:
    with pytest.raises(ConfigError, match=rf"module '{MODULE}' has no attribute 'Missing'"):
        load_connector(f"{MODULE}:Missing")
