"""The whole pipeline on real servers: ERP simulator → outbox → relay → Kafka → the WMS, CRM and
BI workers → the reference WMS and CRM over HTTP and the BI tables in PostgreSQL.

Every committed event is applied exactly once per target, each entity's events in order, and
the CRM's totals and the BI tables match what the ERP wrote (the simulator's ledger)."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from connectors.bi.postgres import PostgresTarget
from connectors.crm.connector import CrmConnector
from connectors.crm.server import CrmServer
from connectors.wms.connector import WmsConnector
from connectors.wms.server import WmsServer
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.simulator.erp import ErpSimulator, SimulatorConfig
from pipeline.sink.runtime import SinkWorker
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.relay import outbox_count, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGGREGATES = ["order", "inventory", "shipment", "customer", "payment", "invoice"]


def _q(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def test_erp_to_wms_crm_and_bi_exactly_once_in_order(database_url, kafka_bootstrap,
                                                     topic_prefix, read_topic):
    rest = {"session_timeout_ms": 6000, "retry_delays_s": [0.3, 0.6, 1.2, 2.4, 4.8],
            "commit_interval_s": 0.3, "connector": "unused:unused"}
    schema = f"bi_{topic_prefix}"
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      topics={"aggregate_types": AGGREGATES, "partitions": 3},
                      workers={"wms": rest, "crm": rest,
                               "bi": {"connector": "unused:unused", "batch_size": 200,
                                      "batch_max_wait_s": 0.2, "session_timeout_ms": 6000}})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    sim = ErpSimulator(database_url, "pipeline",
                       SimulatorConfig(writers=4, rate=0, max_events=700, keep_ledger=True,
                                       rollback_ratio=0.05, late_commit_ratio=0.03,
                                       late_commit_s=0.2, seed=7))
    with WmsServer() as wms, CrmServer() as crm:
        parts = [(Relay(s).run, threading.Event()),
                 (Worker(s, "wms", WmsConnector(wms.url)).run, threading.Event()),
                 (Worker(s, "crm", CrmConnector(crm.url)).run, threading.Event()),
                 (SinkWorker(s, "bi", PostgresTarget(schema=schema)).run, threading.Event())]
        crm_worker = parts[2][0].__self__  # type: ignore[attr-defined]
        wms_worker = parts[1][0].__self__  # type: ignore[attr-defined]
        threads = [threading.Thread(target=fn, args=(stop,), daemon=True) for fn, stop in parts]
        for t in threads:
            t.start()
        try:
            sim_stop = threading.Event()
            sim.run(sim_stop)  # returns when its 700 events are written
            ledger = dict(sim.stats.ledger)
            assert len(ledger) == sim.stats.written == 700 and sim.stats.rolled_back > 0
            wait_for(lambda: outbox_count(database_url) == 0, 60, "the relay to drain the outbox")
            wait_for(lambda: _q(database_url, f'SELECT count(*) FROM "{schema}".events')[0][0]
                     >= len(ledger), 120, "BI to land every event")
            expected_calls = sum(1 for et, _a, _p in ledger.values()
                                 if et in ("order.created", "payment.completed",
                                           "invoice.issued"))
            wait_for(lambda: len(crm.activities) >= expected_calls, 120,
                     "the CRM to have every activity")
            wms_types = {"order.created", "order.status_changed", "order.cancelled",
                         "inventory.reserved", "shipment.created"}
            n_wms = sum(1 for et, _a, _p in ledger.values() if et in wms_types)
            wait_for(lambda: wms_worker.stats.applied >= n_wms, 120,
                     "the WMS worker to apply its events")
            wms_orders = {o["order_id"]: o for o in
                          httpx.get(f"{wms.url}/fulfilment-orders", timeout=5).json()["items"]}
            reservations = httpx.get(f"{wms.url}/reservations", timeout=5).json()["items"]
            contacts = {c["customer_id"]: c for c in
                        httpx.get(f"{crm.url}/contacts", timeout=5).json()["items"]}
            crm_dlq = crm_worker.stats.dead_lettered_total
        finally:
            for _fn, stop in parts:
                stop.set()
            for t in threads:
                t.join(60)

    by_type = Counter(et for et, _a, _p in ledger.values())
    payloads = defaultdict(list)
    for et, _agg, p in ledger.values():
        payloads[et].append(p)

    # BI: every committed event exactly once, typed rows per type, totals as written
    bi_rows = _q(database_url, f'SELECT event_id, count(*) FROM "{schema}".events GROUP BY 1')
    assert {e for e, _n in bi_rows} == set(ledger)
    assert all(n == 1 for _e, n in bi_rows)
    for et, n in by_type.items():
        table = et.replace(".", "_")
        assert _q(database_url, f'SELECT count(*) FROM "{schema}".{table}')[0][0] == n, et
    bi_paid = _q(database_url,
                 f'SELECT coalesce(sum(amount), 0) FROM "{schema}".payment_completed')
    assert bi_paid[0][0] == sum(Decimal(p["amount"]) for p in payloads["payment.completed"])
    # per-entity order in BI: versions of each aggregate are 1..n without gaps or repeats
    versions = _q(database_url, "SELECT aggregate_type, aggregate_id, array_agg("
                                "aggregate_version ORDER BY aggregate_version) "
                                f'FROM "{schema}".events GROUP BY 1, 2')
    assert all(v == list(range(1, len(v) + 1)) for _t, _a, v in versions)

    # WMS: every order once, its history in version order; every reservation once
    created = {p["order_id"] for p in payloads["order.created"]}
    assert set(wms_orders) == created
    for o in wms_orders.values():
        assert o["history"] == sorted(set(o["history"])), o
    assert len(reservations) == by_type["inventory.reserved"]

    # CRM: each activity once; running totals per customer match the ERP's payments/invoices
    order_customer = {p["order_id"]: p["customer"] for p in payloads["order.created"]}
    paid: dict[str, Decimal] = defaultdict(Decimal)
    invoiced: dict[str, Decimal] = defaultdict(Decimal)
    activities: Counter[str] = Counter()
    for p in payloads["payment.completed"]:
        paid[order_customer[p["order_id"]]] += Decimal(p["amount"])
        activities[order_customer[p["order_id"]]] += 1
    for p in payloads["invoice.issued"]:
        invoiced[p["customer"]] += Decimal(p["amount"])
        activities[p["customer"]] += 1
    for p in payloads["order.created"]:
        activities[p["customer"]] += 1
    assert crm_dlq == 0
    assert len(crm.activities) == expected_calls
    for customer, n in activities.items():
        c = contacts[customer]
        assert c["activity_count"] == n, customer
        assert Decimal(c["lifetime_value"]) == paid[customer], customer
        assert Decimal(c["invoiced"]) == invoiced[customer], customer
    for topic in ("wms", "crm", "bi"):
        assert read_topic(f"{topic_prefix}.{topic}.dlq") == [], topic
