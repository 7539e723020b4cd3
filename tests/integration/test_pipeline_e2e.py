"""ERP → outbox → relay → Kafka → worker → sink, on real servers: every committed event applied
once, in order per key, payloads intact (including one that travelled by claim check)."""

from __future__ import annotations

import collections
import datetime as dt
import random
import threading
import time
from decimal import Decimal

import psycopg
import pytest

from pipeline.errors import TransientError
from pipeline.outbox import emit
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.simulator.payloads import payload_for
from pipeline.worker import Connector, Event, on
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.relay import wait_for

pytestmark = pytest.mark.integration


class OrderBook(Connector):
    """Keeps what it was given, per key, in memory (the test's sink)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = collections.defaultdict(list)
        self.totals: dict[str, Decimal] = {}
        self.notes: dict[str, int] = {}
        self.lock = threading.Lock()

    @on("order.created")
    def created(self, event: Event) -> None:
        with self.lock:
            self.seen[event.aggregate_id].append(event.aggregate_version)
            self.totals[event.event_id] = event.payload["total"]
            self.notes[event.event_id] = len(event.payload["note"] or "")


def test_erp_to_worker_end_to_end_with_a_claim_checked_event(database_url, kafka_bootstrap,
                                                              topic_prefix):
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      topics={"aggregate_types": ["order"]},
                      relay={"max_inline_bytes": 2048},
                      workers={"book": {"connector": "unused:unused", "session_timeout_ms": 6000,
                                        "retry_delays_s": [0.5]}})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    rng = random.Random(11)
    written: dict[str, Decimal] = {}
    with psycopg.connect(database_url) as conn:
        for i in range(60):
            key = f"SO-{i % 6:04d}"
            p = payload_for("order.created", rng, aggregate_id=key, now=dt.datetime.now(dt.UTC))
            if i == 13:
                p["note"] = "n" * 5000  # encodes over max_inline_bytes: claim check
            eid = f"00000000-0000-4000-8000-{i:012d}"
            emit(conn, "order", key, "order.created", p, event_id=eid)
            written[eid] = Decimal(p["total"])
        conn.commit()
    relay, book = Relay(s), OrderBook()
    worker = Worker(s, "book", book)
    stops = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=relay.run, args=(stops[0],), daemon=True),
               threading.Thread(target=worker.run, args=(stops[1],), daemon=True)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(book.totals) == 60, 60, "all 60 events at the worker")
    finally:
        for ev in stops:
            ev.set()
        for t in threads:
            t.join(60)
    assert relay.stats.claim_checked == 1
    assert book.totals == written
    assert book.notes["00000000-0000-4000-8000-000000000013"] == 5000
    assert all(v == list(range(1, 11)) for v in book.seen.values()), dict(book.seen)


class Limited(Connector):
    def __init__(self, retry_after_once: bool) -> None:
        self.calls: list[float] = []
        self.retry_after_once = retry_after_once
        self.lock = threading.Lock()

    def default(self, event: Event) -> None:
        with self.lock:
            self.calls.append(time.monotonic())
            if self.retry_after_once:
                self.retry_after_once = False
                err = TransientError("429 Too Many Requests")
                err.retry_after_s = 2.0  # type: ignore[attr-defined]
                raise err


def _run(s, connector, n: int) -> Worker:  # type: ignore[no-untyped-def]
    from tests.fixtures.connectors import make_events, publish

    w = Worker(s, "limited", connector)
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    try:
        publish(str(s.kafka.bootstrap_servers), s.topics.prefix,
                make_events([f"K{i}" for i in range(n)], 1))
        wait_for(lambda: w.stats.applied >= n, 60, f"{n} events applied")
    finally:
        stop.set()
        t.join(60)
    return w


def _limited_settings(database_url, kafka_bootstrap, topic_prefix, **worker):  # type: ignore[no-untyped-def]
    return make_settings(database_url, kafka_bootstrap, topic_prefix,
                         topics={"aggregate_types": ["order"]},
                         workers={"limited": {"connector": "unused:unused",
                                              "session_timeout_ms": 6000, **worker}})


def test_rate_limit_holds_calls_per_second(database_url, kafka_bootstrap, topic_prefix):
    s = _limited_settings(database_url, kafka_bootstrap, topic_prefix, rate_limit_per_s=20,
                          rate_limit_burst=1)
    c = Limited(retry_after_once=False)
    _run(s, c, 41)
    span = c.calls[-1] - c.calls[0]
    rate = (len(c.calls) - 1) / span
    assert rate <= 22, f"{rate:.1f} calls/s against a limit of 20"
    assert rate >= 15, f"{rate:.1f} calls/s: the limiter is far too strict"


def test_retry_after_pauses_the_target_then_retries_in_place(database_url, kafka_bootstrap,
                                                            topic_prefix, read_topic):
    s = _limited_settings(database_url, kafka_bootstrap, topic_prefix)
    c = Limited(retry_after_once=True)
    w = _run(s, c, 5)
    gap = max(b - a for a, b in zip(c.calls, c.calls[1:], strict=False))
    assert gap >= 1.9, f"calls went on during Retry-After (largest gap {gap:.2f}s)"
    assert w.stats.retried == {}, "a Retry-After is honoured in place, not via a retry topic"
    assert len(c.calls) == 6
    assert read_topic(f"{topic_prefix}.limited.dlq") == []


class Recovering(Connector):
    """Down for the first calls, then answers the first probe with 503 + Retry-After."""

    def __init__(self, down_calls: int) -> None:
        self.calls = 0
        self.down_calls = down_calls
        self.lock = threading.Lock()

    def default(self, event: Event) -> None:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.down_calls:
            raise ConnectionError("target down")
        if n == self.down_calls + 1:
            err = TransientError("503 Service Unavailable")
            err.retry_after_s = 1.0  # type: ignore[attr-defined]
            raise err


def test_breaker_probe_answered_with_retry_after_does_not_stall(database_url, kafka_bootstrap,
                                                                topic_prefix, read_topic):
    s = _limited_settings(database_url, kafka_bootstrap, topic_prefix,
                          breaker={"threshold": 2, "probe_initial_s": 0.3, "probe_max_s": 1.0})
    c = Recovering(down_calls=3)
    w = Worker(s, "limited", c)
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    try:
        from tests.fixtures.connectors import make_events, publish

        publish(kafka_bootstrap, topic_prefix, make_events([f"K{i}" for i in range(6)], 1))
        wait_for(lambda: w.stats.applied >= 6, 40, "all applied after the target recovered")
    finally:
        stop.set()
        t.join(60)
    assert w.stats.breaker_opens >= 1
    assert w.breaker.state == "closed"
    assert read_topic(f"{topic_prefix}.limited.dlq") == []
