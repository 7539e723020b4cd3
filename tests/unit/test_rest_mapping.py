"""The REST connectors' mapping language and the HTTP client's answer classification."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from connectors.crm.connector import DEFAULT_MAPPING as CRM
from connectors.rest.client import RestTarget, TargetError, TargetRefused, status_rules
from connectors.rest.mapping import MappingError, Route, build_call, render
from connectors.wms.connector import DEFAULT_MAPPING as WMS
from pipeline.worker.classify import PERMANENT, TRANSIENT, classify

CTX = {
    "event_id": "e-1",
    "aggregate_id": "SO-1",
    "aggregate_version": 3,
    "payload": {
        "order_id": "SO-1", "customer": "CUST-9", "total": "12.50", "to_status": "CONFIRMED",
        "lines": [{"line_no": 1, "sku": "A/1", "qty": 2}, {"line_no": 2, "sku": "B", "qty": 1}],
        "reason": None,
    },
}


def test_a_single_reference_keeps_its_type_and_text_around_references_is_a_string():
    assert render("{aggregate_version}", CTX) == 3
    assert render("{payload.reason}", CTX) is None
    assert render("order {payload.order_id} v{aggregate_version}", CTX) == "order SO-1 v3"


def test_each_and_map():
    lines = render({"$each": "payload.lines", "$item": {"sku": "{sku}", "n": "{qty}"}}, CTX)
    assert lines == [{"sku": "A/1", "n": 2}, {"sku": "B", "n": 1}]
    status = {"$map": "payload.to_status", "values": {"CONFIRMED": "OPEN"}, "default": "$same"}
    assert render(status, CTX) == "OPEN"
    ctx = {**CTX, "payload": {**CTX["payload"], "to_status": "SHIPPED"}}
    assert render(status, ctx) == "SHIPPED"
    assert render({**status, "default": "OTHER"}, ctx) == "OTHER"


def test_a_missing_reference_names_it():
    with pytest.raises(MappingError, match=r"no 'payload.nope'"):
        render({"x": "{payload.nope}"}, CTX)
    assert classify(MappingError("x")) == PERMANENT


def test_path_references_are_url_quoted():
    call = build_call(Route.parse("t", {"method": "put", "path": "/skus/{payload.lines}"}),
                      {"payload": {"lines": "A/1 B"}})
    assert call.method == "PUT" and call.path == "/skus/A%2F1%20B"


def test_route_parse_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['verb'\]"):
        Route.parse("order.created", {"method": "POST", "path": "/", "verb": 1})
    with pytest.raises(ValueError, match="path is required"):
        Route.parse("order.created", {"method": "POST"})


def test_default_mappings_render_for_their_events():
    import datetime as dt
    import random

    from pipeline.simulator.payloads import payload_for

    rng = random.Random(4)
    for mapping in (WMS, CRM):
        for event_type, spec in mapping.items():
            agg = "CUST-1001" if event_type == "customer.upserted" else "SO-0000001"
            payload = payload_for(event_type, rng, aggregate_id=agg, now=dt.datetime.now(dt.UTC))
            call = build_call(Route.parse(event_type, spec),
                              {"event_id": "e", "aggregate_version": 1, "payload": payload})
            assert call.path.startswith("/")
            assert "{" not in call.path


# What the test server saw of a request, and what it answers: (status, headers, JSON body).
Seen = dict[str, Any]
Answer = tuple[int, dict[str, str], Any]


@contextlib.contextmanager
def _server(answer: Callable[[Seen], Answer]) -> Iterator[tuple[str, list[Seen]]]:
    """A real HTTP server on loopback answering every request with ``answer(request)``."""
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request: Seen = {"method": self.command, "path": self.path,
                             "headers": self.headers,
                             "body": self.rfile.read(length) if length else b""}
            seen.append(request)
            status, headers, body = answer(request)
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def _target(answer: Callable[[Seen], Answer], **kw: Any) -> Iterator[RestTarget]:
    with _server(answer) as (url, _seen):
        t = RestTarget(url, **kw)
        try:
            yield t
        finally:
            t.close()


@pytest.mark.parametrize(("status", "kind"), [(500, TRANSIENT), (503, TRANSIENT), (429, TRANSIENT),
                                              (408, TRANSIENT), (400, PERMANENT),
                                              (422, PERMANENT), (404, PERMANENT)])
def test_status_classification(status: int, kind: str):
    with _target(lambda req: (status, {}, {"error": "x"})) as t, \
            pytest.raises((TargetError, TargetRefused)) as ei:
        t.call("POST", "/o", body={}, idempotency_key="k")
    assert classify(ei.value) == kind
    assert ei.value.target_error_body == '{"error": "x"}'  # type: ignore[union-attr]


def test_skip_and_retry_statuses_and_retry_after():
    with _target(lambda req: (409, {}, {"error": "stale_version"})) as t:
        assert t.call("PUT", "/o", body={}, idempotency_key="k", skip=[409]).status == 409
        with pytest.raises(TargetError):
            t.call("PUT", "/o", body={}, idempotency_key="k", retry=[409])
    with _target(lambda req: (429, {"Retry-After": "3"}, None)) as t, \
            pytest.raises(TargetError) as ei:
        t.call("POST", "/o", body={}, idempotency_key="k")
    assert ei.value.retry_after_s == 3.0


def test_status_rules_tell_one_status_with_several_meanings_apart():
    """CRM: 409 unknown_order means "not yet" (retry); 409 activity_conflict is a refusal."""
    bodies = iter([{"error": "unknown_order"}, {"error": "activity_conflict"}])
    with _target(lambda req: (409, {}, next(bodies))) as t:
        with pytest.raises(TargetError) as retried:
            t.call("POST", "/a", body={}, idempotency_key="k", retry=["409:unknown_order"])
        with pytest.raises(TargetRefused) as refused:
            t.call("POST", "/a", body={}, idempotency_key="k", retry=["409:unknown_order"])
    assert retried.value.target_alive
    assert "activity_conflict" in refused.value.target_error_body
    assert status_rules([409, "404", "409:unknown_order"]) == (
        (409, None), (404, None), (409, "unknown_order"))
    for bad in ("409:", "abc", "99", "409x"):
        with pytest.raises(ValueError, match="bad status rule"):
            status_rules([bad])
    with pytest.raises(ValueError, match="mapping of x: retry: bad status rule"):
        Route.parse("x", {"method": "POST", "path": "/", "retry": ["4o9"]})


def test_headers_and_body_sent():
    with _server(lambda req: (201, {}, {})) as (url, seen):
        t = RestTarget(url + "/api/v2/", bearer_token="tok", headers={"X-Tenant": "eu"})
        try:
            r = t.call("POST", "/o", body={"a": 1, "name": "Müller", "total": "12.50"},
                       idempotency_key="evt-1",
                       traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            t.call("GET", "/o/1", idempotency_key="evt-2")
        finally:
            t.close()
    assert r.status == 201
    post, get = seen
    assert (post["method"], post["path"]) == ("POST", "/api/v2/o")
    h = post["headers"]
    assert h["Idempotency-Key"] == "evt-1"
    assert h["Authorization"] == "Bearer tok"
    assert h["X-Tenant"] == "eu"
    assert h["User-Agent"] == "erp-pipeline"
    assert h["Content-Type"] == "application/json"
    assert h["traceparent"].startswith("00-0af7")
    assert len(h["X-Request-Id"]) == 36
    # the JSON as httpx's json= wrote it: compact, UTF-8 (money stays the string it was)
    assert post["body"] == '{"a":1,"name":"Müller","total":"12.50"}'.encode()
    assert (get["path"], get["body"], get["headers"]["Idempotency-Key"]) == ("/api/v2/o/1", b"",
                                                                              "evt-2")
    assert "Content-Type" not in get["headers"]


def test_basic_auth_sent():
    with _server(lambda req: (200, {}, {})) as (url, seen):
        t = RestTarget(url, username="svc", password="s3cret")
        t.call("POST", "/o", body={}, idempotency_key="k")
        t.close()
    assert seen[0]["headers"]["Authorization"] == "Basic c3ZjOnMzY3JldA=="


def test_a_refused_connection_is_transient_and_says_where():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = RestTarget(f"http://127.0.0.1:{port}", connect_timeout_s=1)
    with pytest.raises(TargetError, match=rf"GET http://127.0.0.1:{port}/x failed: cannot "
                                          "connect") as ei:
        t.call("GET", "/x", idempotency_key="k")
    t.close()
    assert classify(ei.value) == TRANSIENT


def test_a_slow_target_times_out_transiently():
    def slow(req: Seen) -> Answer:
        time.sleep(1.0)
        return 200, {}, {}

    started = time.monotonic()
    with _target(slow, timeout_s=0.2) as t, pytest.raises(TargetError, match="timed out"):
        t.call("POST", "/x", body={}, idempotency_key="k")
    assert time.monotonic() - started < 5


def test_a_call_waits_for_a_free_connection_then_fails_clearly():
    """max_connections is a limit: a call beyond it waits ``timeout_s`` for a free connection."""
    with _target(lambda req: (200, {}, {}), max_connections=1, timeout_s=0.3) as t:
        held = t._pool._get_conn()  # the one connection, taken as a slow call would hold it
        started = time.monotonic()
        try:
            with pytest.raises(TargetError, match="no free connection to the target within "
                                                  r"0.3s \(all 1 in use\)"):
                t.call("GET", "/b", idempotency_key="2")
            assert time.monotonic() - started >= 0.25
        finally:
            t._pool._put_conn(held)
        assert t.call("GET", "/b", idempotency_key="2").status == 200  # free again: served


def test_a_bad_base_url_is_refused_at_once():
    with pytest.raises(ValueError, match=r"bad base_url 'wms\.local:8080'"):
        RestTarget("wms.local:8080")


def test_the_environments_proxy_is_used_unless_no_proxy_names_the_host(monkeypatch):
    from connectors.rest.client import _proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "wms.internal,.lan")
    assert _proxy_for("https", "crm.example.com") == "http://proxy.corp:3128"
    assert _proxy_for("https", "wms.internal") is None
    assert _proxy_for("https", "erp.lan") is None
    assert _proxy_for("http", "crm.example.com") is None  # no HTTP_PROXY set
    t = RestTarget("https://crm.example.com")
    try:
        assert t._manager is not None  # the pool goes through the proxy
    finally:
        t.close()


def test_a_call_through_a_plain_http_proxy_names_the_whole_url(monkeypatch):
    """The proxy (here a server that answers itself) is asked for the absolute URL."""
    with _server(lambda req: (201, {}, {})) as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        t = RestTarget("http://wms.invalid:8080/api", bearer_token="tok")
        try:
            assert t.call("POST", "/o", body={"a": 1}, idempotency_key="k").status == 201
        finally:
            t.close()
    assert seen[0]["path"] == "http://wms.invalid:8080/api/o"
    assert seen[0]["headers"]["Authorization"] == "Bearer tok"
    assert seen[0]["body"] == b'{"a":1}'
