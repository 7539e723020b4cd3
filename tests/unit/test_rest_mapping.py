"""The REST connectors' mapping language and the HTTP client's answer classification."""

from __future__ import annotations

import httpx
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


def _target(handler) -> RestTarget:  # type: ignore[no-untyped-def]
    return RestTarget("http://wms.test", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("status", "kind"), [(500, TRANSIENT), (503, TRANSIENT), (429, TRANSIENT),
                                              (408, TRANSIENT), (400, PERMANENT),
                                              (422, PERMANENT), (404, PERMANENT)])
def test_status_classification(status: int, kind: str):
    t = _target(lambda req: httpx.Response(status, json={"error": "x"}))
    with pytest.raises((TargetError, TargetRefused)) as ei:
        t.call("POST", "/o", body={}, idempotency_key="k")
    t.close()
    assert classify(ei.value) == kind
    assert ei.value.target_error_body == '{"error":"x"}'  # type: ignore[union-attr]


def test_skip_and_retry_statuses_and_retry_after():
    t = _target(lambda req: httpx.Response(409, json={"error": "stale_version"}))
    assert t.call("PUT", "/o", body={}, idempotency_key="k", skip=[409]).status_code == 409
    with pytest.raises(TargetError):
        t.call("PUT", "/o", body={}, idempotency_key="k", retry=[409])
    t.close()
    t = _target(lambda req: httpx.Response(429, headers={"Retry-After": "3"}))
    with pytest.raises(TargetError) as ei:
        t.call("POST", "/o", body={}, idempotency_key="k")
    t.close()
    assert ei.value.retry_after_s == 3.0


def test_status_rules_tell_one_status_with_several_meanings_apart():
    """CRM: 409 unknown_order means "not yet" (retry); 409 activity_conflict is a refusal."""
    bodies = iter([{"error": "unknown_order"}, {"error": "activity_conflict"}])
    t = _target(lambda req: httpx.Response(409, json=next(bodies)))
    with pytest.raises(TargetError) as retried:
        t.call("POST", "/a", body={}, idempotency_key="k", retry=["409:unknown_order"])
    with pytest.raises(TargetRefused) as refused:
        t.call("POST", "/a", body={}, idempotency_key="k", retry=["409:unknown_order"])
    t.close()
    assert retried.value.target_alive
    assert "activity_conflict" in refused.value.target_error_body
    assert status_rules([409, "404", "409:unknown_order"]) == (
        (409, None), (404, None), (409, "unknown_order"))
    for bad in ("409:", "abc", "99", "409x"):
        with pytest.raises(ValueError, match="bad status rule"):
            status_rules([bad])
    with pytest.raises(ValueError, match="mapping of x: retry: bad status rule"):
        Route.parse("x", {"method": "POST", "path": "/", "retry": ["4o9"]})


def test_headers_sent():
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(201, json={})

    t = RestTarget("http://wms.test", bearer_token="tok", transport=httpx.MockTransport(handler))
    t.call("POST", "/o", body={"a": 1}, idempotency_key="evt-1",
           traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    t.close()
    h = seen[0].headers
    assert h["Idempotency-Key"] == "evt-1"
    assert h["Authorization"] == "Bearer tok"
    assert h["traceparent"].startswith("00-0af7")
    assert len(h["X-Request-Id"]) == 36


def test_timeouts_and_connection_errors_are_transient():
    def boom(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    t = _target(boom)
    with pytest.raises(TargetError, match="failed: ConnectError"):
        t.call("GET", "/", idempotency_key="k")
    t.close()

    def slow(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    t = _target(slow)
    with pytest.raises(TargetError, match="timed out"):
        t.call("GET", "/", idempotency_key="k")
    t.close()


def test_the_connections_are_pools_of_a_few_summing_to_the_limit() -> None:
    from connectors.rest.client import _pool_sizes

    for connections in (1, 2, 3, 4, 5, 7, 16, 63, 64, 100):
        sizes = _pool_sizes(connections)
        assert sum(sizes) == connections
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 4
    t = RestTarget("http://wms.test", max_connections=64)
    try:
        assert [p._transport._pool._max_connections for p in t._pools] == [4] * 16  # type: ignore[attr-defined]
    finally:
        t.close()


def test_a_thread_keeps_its_pool_and_threads_take_the_pools_in_turn() -> None:
    import threading

    t = RestTarget("http://wms.test", max_connections=8)
    try:
        seen: dict[int, list[object]] = {}

        def calls(i: int) -> None:
            seen[i] = [t._client() for _ in range(3)]

        threads = [threading.Thread(target=calls, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
            th.join()
        assert all(len(set(map(id, pools))) == 1 for pools in seen.values())
        assert [seen[i][0] for i in range(4)] == [t._pools[0], t._pools[1]] * 2
    finally:
        t.close()
