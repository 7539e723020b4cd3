"""The reference WMS and CRM servers (``connectors.wms.server``, ``connectors.crm.server``), over
real HTTP on loopback: idempotency keys, the version guard, validation details, fault injection,
the admin endpoints, the WMS order lifecycle, the CRM running totals and the OpenAPI documents.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from connectors.crm.server import CrmServer
from connectors.reference.server import ApiError, ReferenceServer
from connectors.wms.server import WmsServer

ROOT = Path(__file__).resolve().parents[2]
_keys = itertools.count(1)


def key() -> str:
    return f"key-{next(_keys)}"


def write(client: httpx.Client, method: str, path: str, body: Any = None, *,
          idem: str | None = None, **headers: str) -> httpx.Response:
    """A write with a fresh Idempotency-Key unless one is given."""
    return client.request(method, path, json=body,
                          headers={"Idempotency-Key": idem or key(), **headers})


def order(order_id: str = "SO-1", version: int = 1, **extra: Any) -> dict[str, Any]:
    return {"order_id": order_id, "customer": "CUST-1", "version": version,
            "lines": [{"line_no": 1, "sku": "SKU-A", "qty": 2},
                      {"line_no": 2, "sku": "SKU-B", "qty": 1}], **extra}


def activity(activity_id: str, kind: str, order_id: str, amount: str, *,
             customer_id: str | None = "CUST-1", currency: str = "EUR") -> dict[str, Any]:
    body = {"activity_id": activity_id, "kind": kind, "order_id": order_id, "amount": amount,
            "currency": currency, "occurred_at": "2025-01-31T12:00:00+00:00"}
    if customer_id is not None:
        body["customer_id"] = customer_id
    return body


@pytest.fixture
def wms() -> Iterator[WmsServer]:
    with WmsServer(seed=7) as server:
        yield server


@pytest.fixture
def crm() -> Iterator[CrmServer]:
    with CrmServer(seed=7) as server:
        yield server


@pytest.fixture
def wc(wms: WmsServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=wms.url, timeout=5.0) as client:
        yield client


@pytest.fixture
def cc(crm: CrmServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=crm.url, timeout=5.0) as client:
        yield client


def test_many_clients_connecting_at_once_are_all_served(wms: WmsServer) -> None:
    """64 connections opened at the same moment (a worker's pool warming up): none is reset
    or left waiting for a SYN retransmission (socketserver's backlog of 5 did both)."""
    barrier = threading.Barrier(64)
    answers: list[int] = []

    def one(_i: int) -> None:
        with httpx.Client(base_url=wms.url, timeout=5.0) as client:
            barrier.wait(5)
            answers.append(client.get("/fulfilment-orders").status_code)

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert answers == [200] * 64
    assert time.monotonic() - started < 3  # a dropped SYN alone waits 1 s, then 3 s


# -- idempotency ------------------------------------------------------------------------------


def test_same_key_replays_the_stored_answer_and_applies_once(wc: httpx.Client) -> None:
    first = write(wc, "POST", "/fulfilment-orders", order(), idem="k-1")
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    again = write(wc, "POST", "/fulfilment-orders", order(), idem="k-1")
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert again.headers["Location"] == "/fulfilment-orders/SO-1"

    got = wc.get("/fulfilment-orders/SO-1").json()
    assert got["history"] == [1]
    assert len(wc.get("/fulfilment-orders").json()["items"]) == 1
    stats = wc.get("/_stats").json()
    assert (stats["writes_applied"], stats["idempotent_replays"]) == (1, 1)


def test_same_key_with_another_body_is_422_and_changes_nothing(wc: httpx.Client) -> None:
    assert write(wc, "POST", "/fulfilment-orders", order(), idem="k-2").status_code == 201
    r = write(wc, "POST", "/fulfilment-orders", order("SO-2"), idem="k-2")
    assert r.status_code == 422
    assert r.json() == {"error": "idempotency_key_reused"}
    # another path under the same key is a reuse too
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", {"status": "PICKING", "version": 2},
              idem="k-2")
    assert r.status_code == 422
    assert wc.get("/fulfilment-orders/SO-2").status_code == 404
    assert wc.get("/fulfilment-orders/SO-1").json()["status"] == "OPEN"


def test_a_write_without_idempotency_key_is_400(wc: httpx.Client) -> None:
    for method, path, body in [
        ("POST", "/fulfilment-orders", order()),
        ("PUT", "/fulfilment-orders/SO-1/status", {"status": "PICKING", "version": 2}),
        ("DELETE", "/reservations/R-1", None),
    ]:
        r = wc.request(method, path, json=body)
        assert r.status_code == 400, (method, path)
        assert r.json() == {"error": "missing_idempotency_key"}
    assert wc.get("/fulfilment-orders").json() == {"items": []}
    assert wc.get("/_stats").json()["idempotency_errors"] == 3
    # reads need no key
    assert wc.get("/reservations").status_code == 200


def test_errors_are_not_stored_so_a_retry_under_the_same_key_runs_again(
        wc: httpx.Client) -> None:
    # the status change arrives before its order: 404, then the same request succeeds
    change = {"status": "PICKING", "version": 2}
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", change, idem="k-3")
    assert r.status_code == 404
    assert r.json() == {"error": "not_found"}
    write(wc, "POST", "/fulfilment-orders", order())
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", change, idem="k-3")
    assert r.status_code == 200
    assert "Idempotent-Replayed" not in r.headers
    assert r.json()["status"] == "PICKING"


def test_concurrent_requests_with_one_key_apply_once(wms: WmsServer) -> None:
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        with httpx.Client(base_url=wms.url, timeout=5.0) as client:
            r = write(client, "POST", "/fulfilment-orders", order(), idem="k-par")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status_code for r in results} == {201}
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in results) == 11
    assert len({r.content for r in results}) == 1
    assert wms.stats["writes_applied"] == 1


# -- validation, version guard, routing -------------------------------------------------------


def test_validation_422_names_each_field(wc: httpx.Client) -> None:
    bad = {"order_id": "", "customer": "CUST-1", "version": "1",
           "lines": [{"line_no": 1, "sku": "SKU-A", "qty": 0},
                     {"line_no": 1, "sku": "", "qty": 2.5}]}
    r = write(wc, "POST", "/fulfilment-orders", bad)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "validation"
    details = {d["field"]: d["message"] for d in body["details"]}
    assert details["lines[0].qty"] == "must be a positive integer"
    assert set(details) == {"order_id", "version", "lines[0].qty", "lines[1].line_no",
                            "lines[1].sku", "lines[1].qty"}
    r = write(wc, "POST", "/fulfilment-orders", {**order(), "lines": []})
    assert r.json()["details"] == [{"field": "lines", "message": "must be a non-empty array"}]
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", {"status": "LOST", "version": 2})
    assert r.json()["details"][0]["field"] == "status"
    assert wc.get("/fulfilment-orders").json() == {"items": []}
    assert wc.get("/_stats").json()["validation_errors"] == 3


def test_stale_version_is_409_and_leaves_the_state_alone(wc: httpx.Client) -> None:
    write(wc, "POST", "/fulfilment-orders", order(version=1))
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", {"status": "PICKING", "version": 3})
    assert r.status_code == 200
    before = wc.get("/fulfilment-orders/SO-1").json()
    for status, version in [("SHIPPED", 2), ("OPEN", 3)]:  # older, then the same version
        r = write(wc, "PUT", "/fulfilment-orders/SO-1/status",
                  {"status": status, "version": version})
        assert r.status_code == 409
        assert r.json() == {"error": "stale_version", "current": 3}
    r = write(wc, "POST", "/fulfilment-orders/SO-1/cancel", {"reason": "late", "version": 1})
    assert r.json() == {"error": "stale_version", "current": 3}
    r = write(wc, "POST", "/fulfilment-orders", order(version=1))  # a redelivered creation
    assert r.json() == {"error": "stale_version", "current": 3}
    assert wc.get("/fulfilment-orders/SO-1").json() == before
    assert before["history"] == [1, 3]
    assert wc.get("/_stats").json()["stale_rejections"] == 4


def test_unknown_route_wrong_method_and_bad_json(wc: httpx.Client) -> None:
    r = wc.get("/nowhere")
    assert (r.status_code, r.json()) == (404, {"error": "not_found"})
    r = write(wc, "PATCH", "/fulfilment-orders", {})
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, POST"
    r = wc.post("/fulfilment-orders", content=b"{not json",
                headers={"Idempotency-Key": key(), "Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (400, {"error": "invalid_json"})
    r = write(wc, "POST", "/fulfilment-orders", ["not", "an", "object"])
    assert r.json()["details"] == [{"field": "body", "message": "must be a JSON object"}]


def test_trace_headers_are_echoed_and_requests_are_logged(wc: httpx.Client) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = write(wc, "POST", "/fulfilment-orders", order(), idem="k-log",
              **{"X-Request-Id": "req-1", "traceparent": tp})
    assert r.headers["X-Request-Id"] == "req-1"
    assert r.headers["traceparent"] == tp
    assert r.headers["Content-Type"] == "application/json"
    wc.get("/fulfilment-orders/SO-1", headers={"X-Request-Id": "req-2"})
    log = wc.get("/_requests").json()["requests"]
    assert [(e["method"], e["path"], e["status"]) for e in log] == [
        ("POST", "/fulfilment-orders", 201), ("GET", "/fulfilment-orders/SO-1", 200)]
    assert log[0]["headers"]["idempotency-key"] == "k-log"
    assert log[0]["headers"]["traceparent"] == tp
    assert log[0]["body"]["order_id"] == "SO-1"
    assert log[1]["headers"]["x-request-id"] == "req-2"


def test_the_request_log_keeps_the_last_1000(wms: WmsServer) -> None:
    for _ in range(1005):
        wms.dispatch("GET", "/reservations", {}, b"")
    with httpx.Client(base_url=wms.url) as client:
        log = client.get("/_requests").json()["requests"]
    assert len(log) == 1000
    assert log[0]["seq"] == 6


# -- faults -----------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after(wc: httpx.Client) -> None:
    r = wc.post("/_faults", json={"rate_limit_per_s": 0.5, "rate_limit_burst": 2})
    assert r.json()["rate_limit_per_s"] == 0.5
    assert [wc.get("/reservations").status_code for _ in range(2)] == [200, 200]
    r = write(wc, "POST", "/fulfilment-orders", order())
    assert r.status_code == 429
    assert r.json() == {"error": "rate_limited"}
    assert int(r.headers["Retry-After"]) >= 1
    assert wc.get("/_stats").json()["rate_limited"] == 1  # admin requests are not limited
    wc.post("/_faults", json={"rate_limit_per_s": None})
    assert wc.get("/fulfilment-orders").json() == {"items": []}  # the 429 changed nothing


def test_error_rate_one_injects_errors_before_any_change() -> None:
    with WmsServer(error_rate=1.0) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(5):
            r = write(client, "POST", "/fulfilment-orders", order(), idem="k-inj")
            assert (r.status_code, r.json()) == (503, {"error": "injected"})
        assert client.get("/fulfilment-orders").status_code == 503
        client.post("/_faults", json={"error_rate": 0.0})
        assert client.get("/fulfilment-orders").json() == {"items": []}
        # nothing was stored under the key: the retry is executed
        r = write(client, "POST", "/fulfilment-orders", order(), idem="k-inj")
        assert r.status_code == 201
        assert "Idempotent-Replayed" not in r.headers
        assert server.stats["injected_errors"] == 6
        client.post("/_faults", json={"error_rate": 1.0, "error_status": 500})
        assert client.get("/fulfilment-orders").status_code == 500


def test_error_after_apply_loses_the_answer_and_the_retry_is_replayed(
        wc: httpx.Client) -> None:
    wc.post("/_faults", json={"error_after_apply_rate": 1.0})
    r = write(wc, "POST", "/fulfilment-orders", order(), idem="k-lost")
    assert (r.status_code, r.json()) == (503, {"error": "injected"})
    wc.post("/_faults", json={"error_after_apply_rate": 0.0})
    r = write(wc, "POST", "/fulfilment-orders", order(), idem="k-lost")
    assert r.status_code == 201
    assert r.headers["Idempotent-Replayed"] == "true"
    assert wc.get("/fulfilment-orders/SO-1").json()["history"] == [1]


def test_latency_is_added_to_business_requests_only(wc: httpx.Client) -> None:
    wc.post("/_faults", json={"latency_ms": 200})
    t0 = time.monotonic()
    assert wc.get("/fulfilment-orders").status_code == 200
    elapsed = time.monotonic() - t0
    assert 0.19 <= elapsed < 2.0
    t0 = time.monotonic()
    wc.get("/_stats")
    assert time.monotonic() - t0 < 0.15


def test_stop_does_not_wait_for_injected_latency() -> None:
    server = WmsServer(latency_ms=30_000).start()
    client = httpx.Client(base_url=server.url, timeout=10.0)

    def slow_request() -> None:
        with contextlib.suppress(httpx.HTTPError):
            client.get("/fulfilment-orders")

    t = threading.Thread(target=slow_request)
    try:
        t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 2.0
    finally:
        t.join(5)
        client.close()


def test_down_answers_503_until_up_again(wc: httpx.Client) -> None:
    wc.post("/_faults", json={"down": True})
    r = write(wc, "POST", "/fulfilment-orders", order())
    assert (r.status_code, r.json()) == (503, {"error": "unavailable"})
    assert wc.get("/fulfilment-orders").status_code == 503
    assert wc.get("/_health").json() == {"status": "ok", "server": "wms"}
    assert wc.get("/_faults").json()["down"] is True
    wc.post("/_faults", json={"down": False})
    assert wc.get("/fulfilment-orders").json() == {"items": []}
    assert wc.get("/_stats").json()["unavailable"] == 2


def test_invalid_faults_are_422_and_leave_the_faults_alone(wc: httpx.Client) -> None:
    r = wc.post("/_faults", json={"error_rate": 2, "down": "yes", "chaos": 1})
    assert r.status_code == 422
    assert {d["field"] for d in r.json()["details"]} == {"error_rate", "down", "chaos"}
    assert wc.get("/_faults").json()["error_rate"] == 0.0
    with pytest.raises(ApiError, match="422"):
        WmsServer(error_rate=-1)


def test_reset_clears_state_keys_log_stats_and_faults(wc: httpx.Client) -> None:
    write(wc, "POST", "/fulfilment-orders", order(), idem="k-reset")
    wc.post("/_faults", json={"latency_ms": 5, "rate_limit_per_s": 100})
    assert wc.post("/_reset").json() == {"status": "reset"}
    assert wc.get("/_faults").json() == {
        "error_rate": 0.0, "error_status": 503, "error_after_apply_rate": 0.0,
        "latency_ms": 0.0, "rate_limit_per_s": None, "rate_limit_burst": None, "down": False}
    assert wc.get("/fulfilment-orders").json() == {"items": []}
    r = write(wc, "POST", "/fulfilment-orders", order(), idem="k-reset")
    assert r.status_code == 201
    assert "Idempotent-Replayed" not in r.headers
    stats = wc.get("/_stats").json()
    assert (stats["requests"], stats["writes_applied"]) == (2, 1)
    assert len(wc.get("/_requests").json()["requests"]) == 2


# -- WMS --------------------------------------------------------------------------------------


def test_wms_order_lifecycle(wc: httpx.Client) -> None:
    r = write(wc, "POST", "/fulfilment-orders", order(version=1))
    assert r.status_code == 201
    assert {k: r.json()[k] for k in ("order_id", "status", "version")} == {
        "order_id": "SO-1", "status": "OPEN", "version": 1}
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", {"status": "PICKING", "version": 2})
    assert (r.status_code, r.json()["status"]) == (200, "PICKING")
    # a shipment is its own ERP aggregate: its version (1) is not compared with the order's
    shipment = {"shipment_id": "SH-1", "carrier": "DHL", "tracking_number": "T1",
                "lines": [{"sku": "SKU-A", "qty": 2}], "version": 1}
    r = write(wc, "POST", "/fulfilment-orders/SO-1/shipments", shipment)
    assert r.status_code == 201
    assert r.json()["order_status"] == "SHIPPED"
    # a second shipment may not ship what is not (or no longer) on the order
    r = write(wc, "POST", "/fulfilment-orders/SO-1/shipments",
              {**shipment, "shipment_id": "SH-2", "version": 2,
               "lines": [{"sku": "SKU-A", "qty": 1}, {"sku": "SKU-Z", "qty": 1}]})
    assert r.status_code == 422
    assert [d["field"] for d in r.json()["details"]] == ["lines[0].qty", "lines[1].sku"]
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", {"status": "DELIVERED", "version": 3})
    assert r.json()["status"] == "DELIVERED"
    r = write(wc, "POST", "/fulfilment-orders/SO-1/cancel", {"reason": "too late", "version": 4})
    assert r.status_code == 409
    assert r.json()["error"] == "invalid_transition"

    got = wc.get("/fulfilment-orders/SO-1").json()
    assert got["status"] == "DELIVERED"
    assert got["history"] == [1, 2, 3]
    assert [c["action"] for c in got["changes"]] == ["created", "status", "shipped", "status"]
    assert got["shipments"][0]["tracking_number"] == "T1"
    assert wc.get("/fulfilment-orders", params={"status": "DELIVERED"}).json()["items"][0][
        "order_id"] == "SO-1"


def test_wms_cancel_and_unknown_orders(wc: httpx.Client) -> None:
    for method, path, body in [
        ("PUT", "/fulfilment-orders/NOPE/status", {"status": "PICKING", "version": 2}),
        ("POST", "/fulfilment-orders/NOPE/cancel", {"reason": "x", "version": 2}),
        ("POST", "/fulfilment-orders/NOPE/shipments",
         {"shipment_id": "S", "carrier": "c", "tracking_number": "t",
          "lines": [{"sku": "A", "qty": 1}], "version": 2}),
    ]:
        r = write(wc, method, path, body)
        assert (r.status_code, r.json()) == (404, {"error": "not_found"})
    assert wc.get("/fulfilment-orders/NOPE").status_code == 404

    write(wc, "POST", "/fulfilment-orders", order(version=1))
    r = write(wc, "POST", "/fulfilment-orders/SO-1/cancel",
              {"reason": "customer request", "version": 2})
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["cancel_reason"]) == ("CANCELLED", "customer request")
    r = write(wc, "PUT", "/fulfilment-orders/SO-1/status", {"status": "PICKING", "version": 3})
    assert r.status_code == 409
    assert r.json() == {"error": "invalid_transition", "from": "CANCELLED", "to": "PICKING",
                        "current": 2}
    r = write(wc, "POST", "/fulfilment-orders", order(version=5))
    assert r.json() == {"error": "already_exists", "order_id": "SO-1", "current": 2}


def test_wms_reservations(wc: httpx.Client) -> None:
    res = {"reservation_id": "R-1", "order_id": "SO-1", "sku": "SKU-A", "qty": 2,
           "warehouse": "WH-BER"}
    r = write(wc, "POST", "/reservations", res)
    assert r.status_code == 201
    assert r.json() == {**res, "status": "ACTIVE"}
    # the same reservation under another key: a no-op, counted once
    r = write(wc, "POST", "/reservations", res)
    assert r.status_code == 200
    r = write(wc, "POST", "/reservations", {**res, "qty": 3})
    assert (r.status_code, r.json()["error"]) == (409, "conflict")
    r = write(wc, "POST", "/reservations", {**res, "qty": -1})
    assert r.json()["details"] == [{"field": "qty", "message": "must be a positive integer"}]
    assert wc.get("/reservations/R-1").json()["qty"] == 2

    r = write(wc, "DELETE", "/reservations/R-1")
    assert (r.status_code, r.content) == (204, b"")
    assert write(wc, "DELETE", "/reservations/R-1").status_code == 204  # released already
    assert write(wc, "DELETE", "/reservations/R-404").status_code == 404
    assert wc.get("/reservations/R-404").status_code == 404
    r = write(wc, "POST", "/reservations", res)  # a released reservation stays released
    assert (r.status_code, r.json()["error"]) == (409, "reservation_released")
    assert wc.get("/reservations", params={"status": "RELEASED"}).json()["items"] == [
        {**res, "status": "RELEASED"}]
    assert wc.get("/reservations", params={"status": "ACTIVE"}).json()["items"] == []
    stats = wc.get("/_stats").json()
    assert (stats["writes_applied"], stats["duplicates"]) == (2, 2)


# -- CRM --------------------------------------------------------------------------------------


def test_crm_totals_are_kept_from_activities(cc: httpx.Client) -> None:
    assert write(cc, "POST", "/activities",
                 activity("A-1", "order_created", "SO-1", "30.00")).status_code == 201
    write(cc, "POST", "/activities", activity("A-2", "order_created", "SO-2", "5.00"))
    write(cc, "POST", "/activities", activity("A-3", "payment_completed", "SO-1", "10.00"))
    write(cc, "POST", "/activities", activity("A-4", "payment_completed", "SO-2", "2.5"))
    write(cc, "POST", "/activities", activity("A-5", "invoice_issued", "SO-1", "30.00"))
    write(cc, "POST", "/activities",
          activity("A-6", "order_created", "SO-3", "1.00", customer_id="CUST-2"))
    contact = cc.get("/contacts/CUST-1").json()
    assert contact["lifetime_value"] == "12.50"
    assert contact["invoiced"] == "30.00"
    assert contact["open_orders"] == 2
    assert contact["activity_count"] == 5
    assert contact["currency"] == "EUR"
    assert [a["activity_id"] for a in contact["timeline"]] == ["A-1", "A-2", "A-3", "A-4", "A-5"]
    assert contact["name"] is None  # created by its first activity
    assert cc.get("/contacts/CUST-2").json()["lifetime_value"] == "0.00"
    assert [c["customer_id"] for c in cc.get("/contacts").json()["items"]] == ["CUST-1",
                                                                               "CUST-2"]
    assert cc.get("/contacts/NOPE").status_code == 404


def test_crm_duplicate_activity_is_not_counted_twice(cc: httpx.Client) -> None:
    pay = activity("A-1", "payment_completed", "SO-1", "10.00")
    write(cc, "POST", "/activities", activity("A-0", "order_created", "SO-1", "10.00"))
    first = write(cc, "POST", "/activities", pay)
    assert first.status_code == 201
    # a redelivery under a new key (and without the optional customer_id): the stored activity
    again = write(cc, "POST", "/activities", {**pay, "customer_id": None})
    assert again.status_code == 200
    assert again.json() == first.json()
    replay = write(cc, "POST", "/activities", pay, idem=first.request.headers["Idempotency-Key"])
    assert (replay.status_code, replay.headers["Idempotent-Replayed"]) == (201, "true")
    r = write(cc, "POST", "/activities", {**pay, "amount": "11.00"})
    assert (r.status_code, r.json()["error"]) == (409, "activity_conflict")
    contact = cc.get("/contacts/CUST-1").json()
    assert (contact["lifetime_value"], contact["activity_count"]) == ("10.00", 2)
    stats = cc.get("/_stats").json()
    assert (stats["writes_applied"], stats["duplicates"], stats["idempotent_replays"]) == (2, 1, 1)


def test_crm_payment_before_its_order_is_409_then_succeeds(cc: httpx.Client) -> None:
    pay = activity("A-PAY", "payment_completed", "SO-9", "99.90", customer_id=None)
    r = write(cc, "POST", "/activities", pay, idem="k-pay")
    assert r.status_code == 409
    assert r.json() == {"error": "unknown_order", "order_id": "SO-9"}
    assert cc.get("/contacts").json() == {"items": []}
    write(cc, "POST", "/activities",
          activity("A-ORD", "order_created", "SO-9", "99.90", customer_id="CUST-9"))
    r = write(cc, "POST", "/activities", pay, idem="k-pay")  # the retry, same key
    assert r.status_code == 201
    assert "Idempotent-Replayed" not in r.headers
    assert r.json()["customer_id"] == "CUST-9"
    contact = cc.get("/contacts/CUST-9").json()
    assert (contact["lifetime_value"], contact["open_orders"]) == ("99.90", 1)
    assert cc.get("/_stats").json()["unknown_order"] == 1


def test_crm_contact_put_has_a_version_guard_and_keeps_totals(cc: httpx.Client) -> None:
    write(cc, "POST", "/activities", activity("A-1", "invoice_issued", "SO-1", "7.00"))
    body = {"name": "ACME", "email": "ap@acme.example", "country": "DE", "version": 2}
    r = write(cc, "PUT", "/contacts/CUST-1", body)
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["invoiced"], r.json()["version"]) == ("ACME", "7.00", 2)
    r = write(cc, "PUT", "/contacts/CUST-1", {**body, "name": "Old", "version": 1})
    assert (r.status_code, r.json()) == (409, {"error": "stale_version", "current": 2})
    r = write(cc, "PUT", "/contacts/CUST-1", {**body, "email": None, "version": 3})
    assert (r.status_code, r.json()["email"]) == (200, None)
    contact = cc.get("/contacts/CUST-1").json()
    assert (contact["name"], contact["version"], contact["activity_count"]) == ("ACME", 3, 1)
    r = write(cc, "PUT", "/contacts/CUST-2", {"name": "", "email": "nope", "country": "de"})
    assert {d["field"] for d in r.json()["details"]} == {"name", "email", "country", "version"}


def test_crm_activity_validation(cc: httpx.Client) -> None:
    r = write(cc, "POST", "/activities",
              {"activity_id": "A-1", "kind": "order_shipped", "order_id": "SO-1",
               "amount": 12.5, "currency": "euro", "occurred_at": "yesterday"})
    assert r.status_code == 422
    assert {d["field"] for d in r.json()["details"]} == {"kind", "amount", "currency",
                                                         "occurred_at"}
    r = write(cc, "POST", "/activities",
              {**activity("A-1", "order_created", "SO-1", "12.345"), "customer_id": None})
    assert {d["field"]: d["message"] for d in r.json()["details"]} == {
        "customer_id": "must be a non-empty string",
        "amount": "must have at most 2 decimal places"}
    write(cc, "POST", "/activities", activity("A-2", "order_created", "SO-1", "1.00"))
    r = write(cc, "POST", "/activities",
              activity("A-3", "invoice_issued", "SO-1", "1.00", currency="USD"))
    assert r.json()["details"] == [{"field": "currency",
                                    "message": "contact totals are kept in EUR"}]
    assert cc.get("/contacts/CUST-1").json()["activity_count"] == 1


# -- the servers as programs, and their OpenAPI documents -------------------------------------


@pytest.mark.parametrize("name", ["wms", "crm"])
def test_server_runs_as_a_module_until_sigterm(name: str) -> None:
    with subprocess.Popen([sys.executable, "-m", f"connectors.{name}.server", "--port", "0"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            with httpx.Client(base_url=url) as client:
                assert client.get("/_health").json() == {"status": "ok", "server": name}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


@pytest.mark.parametrize("server_cls", [WmsServer, CrmServer])
def test_openapi_documents_every_endpoint(server_cls: type[ReferenceServer]) -> None:
    path = ROOT / "connectors" / server_cls.name / "openapi.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["openapi"].startswith("3.0")
    documented = {(method.upper(), p) for p, item in doc["paths"].items()
                  for method in item if method != "parameters"}
    assert documented == set(server_cls().route_table)
    for ref in _refs(doc):
        assert _resolve(doc, ref) is not None, ref
    for p, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["responses"], (method, p)
            params = [_resolve(doc, x["$ref"]) if "$ref" in x else x
                      for x in op.get("parameters", [])]
            has_key = any(x["name"] == "Idempotency-Key" for x in params)
            is_write = method in ("post", "put", "delete") and not p.startswith("/_")
            assert has_key == is_write, (method, p)
            if is_write:
                assert {"400", "422", "429", "503"} <= set(op["responses"]), (method, p)
