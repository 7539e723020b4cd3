"""The relay end to end on a real PostgreSQL and a real broker: happy path and headers."""

from __future__ import annotations

import datetime as dt
import random
import threading

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.outbox import emit
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from pipeline.simulator.payloads import payload_for
from tests.fixtures.relay import _url

pytestmark = [pytest.mark.integration, pytest.mark.tansu_smoke]



def drain(relay: Relay) -> int:
    relay.store.connect()
    assert relay.store.try_lead()
    n = total = 1
    while n:
        n = relay.step()
        total += n
    relay._drain(10)
    relay.store.close()
    return total - 1


def test_events_published_in_order_with_cloudevents_headers(installed: Settings, read_topic):
    rng = random.Random(7)
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(_url(installed)) as conn:
        for i in range(30):
            order = f"SO-{i % 5:06d}"
            versions = emit(conn, "order", order, "order.created",
                            payload_for("order.created", rng, aggregate_id=order, now=now),
                            headers={"traceparent":
                                     "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
            assert versions == i // 5 + 1
        conn.commit()
    relay = Relay(installed)
    assert drain(relay) == 30
    recs = read_topic(f"{installed.topics.prefix}.order", expect=30)
    dec = Decoder(Catalogue.load())
    by_key: dict[bytes, list[int]] = {}
    for r in sorted(recs, key=lambda r: (r.partition, r.offset)):
        assert r.headers["ce_specversion"] == "1.0"
        assert r.headers["ce_type"] == "order.created"
        assert r.headers["ce_subject"] == r.key.decode()
        assert r.headers["ce_source"] == installed.relay.source
        assert r.headers["content-type"] == "application/avro"
        assert r.headers["traceparent"].startswith("00-0af7651916cd43dd")
        assert dt.datetime.fromisoformat(r.headers["ce_time"])
        assert int(r.headers["erp_outbox_position"]) > 0
        by_key.setdefault(r.key, []).append(int(r.headers["erp_aggregate_version"]))
        ev = dec.decode(r.value)
        assert ev.event_type == "order.created"
        assert ev.value["order_id"] == r.key.decode()
    # one partition per key, versions 1..6 in order
    assert {k: v for k, v in by_key.items()} == {k: [1, 2, 3, 4, 5, 6] for k in by_key}
    assert len(by_key) == 5
    with psycopg.connect(_url(installed)) as conn:
        assert conn.execute("SELECT count(*) FROM pipeline.outbox").fetchone() == (0,)


def test_relay_run_wakes_on_notify_and_stops_on_event(installed: Settings, read_topic):
    relay = Relay(installed)
    stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,))
    t.start()
    try:
        rng = random.Random(1)
        with psycopg.connect(_url(installed)) as conn:
            emit(conn, "customer", "CUST-1", "customer.upserted",
                 payload_for("customer.upserted", rng, aggregate_id="CUST-1",
                             now=dt.datetime.now(dt.UTC)))
            conn.commit()
        read_topic(f"{installed.topics.prefix}.customer", expect=1, timeout_s=20)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert relay.stats.published == 1
