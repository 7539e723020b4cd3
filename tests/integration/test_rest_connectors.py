"""The WMS and CRM connectors on the worker runtime, against the reference servers over HTTP,
with events published as the relay publishes them."""

from __future__ import annotations

import datetime as dt
import random
import threading
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.crm.connector import CrmConnector
from connectors.crm.server import CrmServer
from connectors.wms.connector import WmsConnector
from connectors.wms.server import WmsServer
from pipeline.relay.envelope import OutboxRow
from pipeline.simulator.payloads import payload_for
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import publish
from tests.fixtures.relay import wait_for

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 11, 27, 8, 0, tzinfo=dt.UTC)


class Versions:
    """Assigns aggregate versions as outbox_emit would."""

    def __init__(self) -> None:
        self.v: dict[tuple[str, str], int] = {}
        self.pos = 0

    def row(self, agg_type: str, agg_id: str, event_type: str, payload: dict[str, Any]
            ) -> OutboxRow:
        key = (agg_type, agg_id)
        self.v[key] = self.v.get(key, 0) + 1
        self.pos += 1
        return OutboxRow(self.pos, str(uuid.uuid4()), agg_type, agg_id, self.v[key], event_type,
                         payload, {}, NOW.isoformat())


def order_story(n_orders: int, seed: int = 1) -> list[OutboxRow]:
    rng = random.Random(seed)
    vs = Versions()
    rows = []
    for i in range(n_orders):
        oid = f"SO-{i:07d}"
        p = payload_for("order.created", rng, aggregate_id=oid, now=NOW)
        rows.append(vs.row("order", oid, "order.created", p))
        for et, agg in (("inventory.reserved", "inventory"), ("order.status_changed", "order"),
                        ("shipment.created", "shipment")):
            rows.append(vs.row(agg, oid, et, payload_for(et, rng, aggregate_id=oid, now=NOW)))
    return rows


def settings_for(database_url: str, kafka_bootstrap: str, prefix: str, name: str,
                 **worker: Any) -> Any:
    return make_settings(
        database_url, kafka_bootstrap, prefix,
        topics={"aggregate_types": ["order", "inventory", "shipment", "customer", "payment",
                                    "invoice"]},
        workers={name: {"connector": "unused:unused", "session_timeout_ms": 6000,
                        "retry_delays_s": [0.5, 1.0, 2.0], "commit_interval_s": 0.3,
                        **worker}})


class Running:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=worker.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def _wms_orders(url: str) -> dict[str, Any]:
    items = httpx.get(f"{url}/fulfilment-orders", timeout=5).json()["items"]
    return {o["order_id"]: o for o in items}


def test_wms_applies_the_order_story_once_and_in_order(database_url, kafka_bootstrap,
                                                      topic_prefix, read_topic):
    rows = order_story(8)
    s = settings_for(database_url, kafka_bootstrap, topic_prefix, "wms")
    with WmsServer() as wms:
        connector = WmsConnector(wms.url)
        with Running(Worker(s, "wms", connector)) as w:
            publish(kafka_bootstrap, topic_prefix, rows)
            wait_for(lambda: w.stats.applied == len(rows), 60, "every event handled")
        orders = _wms_orders(wms.url)
        reservations = httpx.get(f"{wms.url}/reservations", timeout=5).json()["items"]
        stats = wms.stats
    assert len(orders) == 8 and len(reservations) == 8
    for o in orders.values():
        assert o["history"] == [1, 2], o  # created, then its status change: once each, in order
        # a shipment travels on another topic than its order's status change, so it may
        # arrive before the order turned final (accepted) or after (refused as too late)
        final = o["status"] in ("DELIVERED", "CANCELLED")
        assert len(o["shipments"]) in ((0, 1) if final else (1,)), o
    assert read_topic(f"{topic_prefix}.wms.dlq") == []
    assert stats.get("validation_errors", 0) == 0


def test_wms_survives_a_429_storm_500s_and_timeouts(database_url, kafka_bootstrap,
                                                    topic_prefix, read_topic):
    rows = order_story(6, seed=2)
    s = settings_for(database_url, kafka_bootstrap, topic_prefix, "wms",
                     breaker={"threshold": 50})
    with WmsServer(seed=7, error_rate=0.3, rate_limit_per_s=20.0, rate_limit_burst=2) as wms:
        connector = WmsConnector(wms.url, timeout_s=0.5)
        with Running(Worker(s, "wms", connector)) as w:
            publish(kafka_bootstrap, topic_prefix, rows)
            wait_for(lambda: w.stats.retried or w.stats.held, 30, "failures to be met")
            wms.set_faults(latency_ms=1500)  # slower than the client's 0.5 s timeout
            wait_for(lambda: sum(w.stats.retried.values()) >= 3, 30, "timeouts retried")
            wms.set_faults(latency_ms=0, error_rate=0.0)
            wait_for(lambda: w.stats.applied == len(rows), 90,
                     "every event applied after the storm")
        stats = wms.stats
        orders = _wms_orders(wms.url)
    assert read_topic(f"{topic_prefix}.wms.dlq") == [], "no event may be dead-lettered"
    assert stats["rate_limited"] > 0 and stats["injected_errors"] > 0
    assert len(orders) == 6
    assert all(o["history"] == [1, 2] for o in orders.values())


def test_wms_refusal_goes_to_dlq_with_the_targets_error_body(database_url, kafka_bootstrap,
                                                            topic_prefix, read_topic):
    vs = Versions()
    good = payload_for("order.created", random.Random(3), aggregate_id="SO-1", now=NOW)
    bad = payload_for("order.created", random.Random(4), aggregate_id="SO-2", now=NOW)
    bad["lines"][0]["qty"] = 0  # valid Avro, refused by the WMS (qty must be positive)
    rows = [vs.row("order", "SO-1", "order.created", good),
            vs.row("order", "SO-2", "order.created", bad)]
    s = settings_for(database_url, kafka_bootstrap, topic_prefix, "wms")
    with WmsServer() as wms, Running(Worker(s, "wms", WmsConnector(wms.url))):
        publish(kafka_bootstrap, topic_prefix, rows)
        dlq = read_topic(f"{topic_prefix}.wms.dlq", expect=1, timeout_s=30)
        assert list(_wms_orders(wms.url)) == ["SO-1"]
    h = dlq[0].headers
    assert h["ce_id"] == rows[1].event_id
    assert h["kafka_dlt-exception-fqcn"] == "connectors.rest.client.TargetRefused"
    assert "422" in h["kafka_dlt-exception-message"]
    body = h["erp_target_error_body"]
    assert "validation" in body and "lines[0].qty" in body


def test_crm_contacts_and_running_totals_match_what_the_erp_wrote(database_url, kafka_bootstrap,
                                                                   topic_prefix, read_topic):
    rng = random.Random(5)
    vs = Versions()
    rows: list[OutboxRow] = []
    expected_ltv: dict[str, Decimal] = {}
    customers: dict[str, str] = {}
    for i in range(10):
        oid = f"SO-{i:07d}"
        order = payload_for("order.created", rng, aggregate_id=oid, now=NOW)
        cust = order["customer"]
        if cust not in customers:
            customers[cust] = cust
            rows.append(vs.row("customer", cust, "customer.upserted",
                               payload_for("customer.upserted", rng, aggregate_id=cust, now=NOW)))
        pay = payload_for("payment.completed", rng, aggregate_id=oid, now=NOW)
        inv = payload_for("invoice.issued", rng, aggregate_id=oid, now=NOW)
        # the payment first: it reaches the CRM before its order (another topic) and must wait
        rows.append(vs.row("payment", oid, "payment.completed", pay))
        rows.append(vs.row("order", oid, "order.created", order))
        rows.append(vs.row("invoice", oid, "invoice.issued", inv))
        expected_ltv[cust] = expected_ltv.get(cust, Decimal(0)) + Decimal(pay["amount"])
    s = settings_for(database_url, kafka_bootstrap, topic_prefix, "crm")
    # the payments (and customers) first, the orders once a payment has been retried: a
    # payment that reaches the CRM before its order (another topic) must wait in the retry tiers
    early = [r for r in rows if r.aggregate_type in ("customer", "payment")]
    late = [r for r in rows if r.aggregate_type not in ("customer", "payment")]
    with CrmServer() as crm, Running(Worker(s, "crm", CrmConnector(crm.url))) as w:
        publish(kafka_bootstrap, topic_prefix, early)
        wait_for(lambda: bool(w.stats.retried), 60, "a payment without its order to be retried")
        publish(kafka_bootstrap, topic_prefix, late)

        def totals() -> dict[str, Decimal]:
            items = httpx.get(f"{crm.url}/contacts", timeout=5).json()["items"]
            return {c["customer_id"]: Decimal(c["lifetime_value"]) for c in items}

        wait_for(lambda: totals() == expected_ltv, 60, "CRM totals to match the ERP's")
        contacts = {c["customer_id"]: c for c in
                    httpx.get(f"{crm.url}/contacts", timeout=5).json()["items"]}
    assert read_topic(f"{topic_prefix}.crm.dlq") == []
    assert sum(c["open_orders"] for c in contacts.values()) == 10
    assert all(c["name"] for c in contacts.values()), "customer.upserted applied"
