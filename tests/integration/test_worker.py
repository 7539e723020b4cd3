"""The worker runtime on a real broker and a real PostgreSQL sink (issue 3's scenarios)."""

from __future__ import annotations

import collections
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.outbox.migrations import install
from pipeline.worker import routing
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import (
    SinkConnector,
    applied_rows,
    make_events,
    publish,
    publish_raw,
)
from tests.fixtures.relay import _url, wait_for
from tests.fixtures.sink import Running

pytestmark = pytest.mark.integration


def worker_settings(database_url: str, bootstrap: str, prefix: str, **worker: Any) -> Settings:
    cfg = {"connector": "tests.fixtures.connectors:SinkConnector",
           "retry_delays_s": [0.5, 1.0], "session_timeout_ms": 6000,
           "commit_interval_s": 0.2, "shutdown_grace_s": 10, **worker}
    s = make_settings(database_url, bootstrap, prefix,
                      topics={"aggregate_types": ["order"], "partitions": 3},
                      workers={"sink": cfg})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    return s


@pytest.fixture
def sink_settings(database_url: str, kafka_bootstrap: str, topic_prefix: str) -> Settings:
    return worker_settings(database_url, kafka_bootstrap, topic_prefix)



def _start(s: Settings, sink: SinkConnector) -> Running:
    return Running(Worker(s, "sink", sink))


def _dlq(read_topic, s: Settings, expect: int) -> list[Any]:  # type: ignore[no-untyped-def]
    return read_topic(f"{s.topics.prefix}.sink.dlq", expect=expect, timeout_s=30)


@pytest.mark.tansu_smoke
def test_transient_twice_then_success_applies_once_after_retries(sink_settings, read_topic):
    rows = make_events(["SO-1", "SO-2"], 1)
    flaky = rows[0].event_id
    sink = SinkConnector(_url(sink_settings), script={flaky: ["transient", "transient"]})
    with _start(sink_settings, sink) as run:
        publish(str(sink_settings.kafka.bootstrap_servers), sink_settings.topics.prefix, rows)
        wait_for(lambda: len(applied_rows(_url(sink_settings))) == 2, 40, "both applied")
        stats = run.worker.stats
    applied = applied_rows(_url(sink_settings))
    assert sorted(r[0] for r in applied) == sorted(r.event_id for r in rows)
    assert [r[3] for r in applied if r[0] == flaky] == [3]  # applied on the third attempt
    assert [c[1:] for c in sink.calls if c[0] == flaky] == [(1, "transient"), (2, "transient"),
                                                            (3, "ok")]
    assert stats.retried == {1: 1, 2: 1}
    assert stats.dead_lettered_total == 0
    # the retry hops carry Spring's headers with the attempt count
    tier2 = read_topic(f"{sink_settings.topics.prefix}.sink.retry.2", expect=1)
    hd = tier2[0].headers
    assert hd["kafka_dlt-original-topic"] == f"{sink_settings.topics.prefix}.order"
    assert hd["kafka_dlt-exception-fqcn"] == "pipeline.errors.TransientError"
    assert "retry_topic-attempts" in hd and "retry_topic-backoff-timestamp" in hd
    assert hd["ce_id"] == flaky


def _k_first_fails_twice(s: Settings) -> tuple[SinkConnector, str]:
    rows = make_events(["K", "A", "B", "C"], 5)
    k_first = next(r for r in rows if r.aggregate_id == "K" and r.aggregate_version == 1)
    sink = SinkConnector(_url(s), script={k_first.event_id: ["transient", "transient"]})
    with _start(s, sink):
        publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
        wait_for(lambda: any(c[0] == k_first.event_id and c[2] == "ok" for c in sink.calls),
                 60, "K's first event to succeed on its third attempt")
        wait_for(lambda: len(sink.calls) >= 22, 30, "every event handled")
    return sink, k_first.event_id


def test_strict_ordering_keeps_a_key_in_order_while_others_flow(sink_settings):
    _k_first_fails_twice(sink_settings)
    applied = applied_rows(_url(sink_settings))
    k = [r[2] for r in applied if r[1] == "K"]
    assert k == [1, 2, 3, 4, 5], f"K applied out of order: {k}"
    first_k = next(i for i, r in enumerate(applied) if r[1] == "K")
    others_before = [r for r in applied[:first_k] if r[1] != "K"]
    assert len(others_before) == 15, "other keys were held back behind K"
    for key in "ABC":
        assert [r[2] for r in applied if r[1] == key] == [1, 2, 3, 4, 5]


def test_relaxed_ordering_lets_later_events_overtake(database_url, kafka_bootstrap,
                                                     topic_prefix):
    s = worker_settings(database_url, kafka_bootstrap, topic_prefix, ordering="relaxed")
    sink, k_first = _k_first_fails_twice(s)
    assert len([c for c in sink.calls if c[2] == "ok"]) == 20  # every event handled once
    # K's v2..v5 overtook v1 (so they were applied first), and the ledger then refused the
    # overtaken v1: never an older version over a newer one
    applied = applied_rows(_url(s))
    assert [r[2] for r in applied if r[1] == "K"] == [2, 3, 4, 5]
    assert k_first not in {r[0] for r in applied}


def test_permanent_failure_and_undecodable_record_go_to_dlq_at_once(sink_settings, read_topic):
    rows = make_events(["SO-1", "SO-2", "SO-3"], 2)
    bad = rows[1].event_id
    sink = SinkConnector(_url(sink_settings), script={bad: ["permanent"]})
    topic = f"{sink_settings.topics.prefix}.order"
    with _start(sink_settings, sink) as run:
        publish(str(sink_settings.kafka.bootstrap_servers), sink_settings.topics.prefix, rows)
        publish_raw(str(sink_settings.kafka.bootstrap_servers), topic, b"SO-9",
                    b"\xc3\x01garbage!", [("ce_id", b"x-1"), ("erp_aggregate_version", b"1")])
        publish_raw(str(sink_settings.kafka.bootstrap_servers), topic, b"SO-8", b"{}",
                    [("source", b"someone else")])
        wait_for(lambda: len(applied_rows(_url(sink_settings))) == 5, 40, "good events applied")
        dlq = _dlq(read_topic, sink_settings, 3)
        stats = run.worker.stats
    assert stats.retried == {}, "a permanent failure must not be retried"
    assert stats.undecodable == 2
    no_headers = next(r for r in dlq if r.key == b"SO-8")
    assert no_headers.value == b"{}"
    assert "lacks header(s) ce_id, erp_aggregate_version" in no_headers.headers["erp_decode_error"]
    by_id = {r.headers.get("ce_id"): r for r in dlq}
    perm = by_id[bad].headers
    for name in ("kafka_dlt-original-topic", "kafka_dlt-original-partition",
                 "kafka_dlt-original-offset", "kafka_dlt-original-timestamp",
                 "kafka_dlt-original-consumer-group", "kafka_dlt-exception-fqcn",
                 "kafka_dlt-exception-message", "kafka_dlt-exception-stacktrace",
                 "retry_topic-attempts"):
        assert name in perm, f"DLQ record lacks {name}"
    assert perm["kafka_dlt-original-topic"] == topic
    assert perm["kafka_dlt-exception-fqcn"] == "pipeline.errors.PermanentError"
    assert "422" in perm["kafka_dlt-exception-message"]
    assert perm["erp_target_error_body"] == '{"error": "unprocessable", "field": "customer"}'
    assert perm["kafka_dlt-original-consumer-group"] == f"{sink_settings.topics.prefix}.sink"
    raw = by_id["x-1"]
    assert raw.value == b"\xc3\x01garbage!", "undecodable bytes must reach the DLQ untouched"
    assert "erp_decode_error" in raw.headers
    assert "unknown schema fingerprint" in raw.headers["erp_decode_error"]


def test_strict_follower_of_a_dead_lettered_event_goes_to_dlq_marked(database_url,
                                                                     kafka_bootstrap,
                                                                     topic_prefix,
                                                                     read_topic):
    s = worker_settings(database_url, kafka_bootstrap, topic_prefix, retry_delays_s=[0.5])
    rows = make_events(["K", "A"], 3)
    head = next(r for r in rows if r.aggregate_id == "K" and r.aggregate_version == 1)
    sink = SinkConnector(_url(s), script={head.event_id: ["transient", "transient"]})
    with _start(s, sink):
        publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
        dlq = read_topic(f"{topic_prefix}.sink.dlq", expect=3, timeout_s=40)
        wait_for(lambda: len(applied_rows(_url(s))) == 3, 30, "A's events applied")
    by_version = {int(r.headers["erp_aggregate_version"]): r.headers for r in dlq}
    assert sorted(by_version) == [1, 2, 3]
    assert "erp_blocked_by" not in by_version[1]
    assert by_version[2]["erp_blocked_by"] == head.event_id
    assert by_version[3]["erp_blocked_by"] == head.event_id
    assert [r[1] for r in applied_rows(_url(s))] == ["A", "A", "A"]


def test_target_outage_opens_breaker_keeps_dlq_empty_and_recovers(database_url,
                                                                  kafka_bootstrap,
                                                                  topic_prefix, read_topic):
    s = worker_settings(database_url, kafka_bootstrap, topic_prefix,
                        retry_delays_s=[1.0, 2.0],
                        breaker={"threshold": 3, "probe_initial_s": 0.5, "probe_max_s": 2.0})
    sink = SinkConnector(_url(s))
    sink.down.set()
    rows = make_events([f"SO-{i}" for i in range(10)], 3)
    with _start(s, sink) as run:
        publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
        wait_for(lambda: run.worker.breaker.is_open, 30, "the breaker to open")
        time.sleep(30)  # a 30 s outage
        assert run.worker.stats.dead_lettered_total == 0
        calls_during = len(sink.calls)
        sink.down.clear()
        wait_for(lambda: len(applied_rows(_url(s))) == 30, 60, "everything applied after recovery")
        stats = run.worker.stats
    assert read_topic(f"{topic_prefix}.sink.dlq") == []
    assert stats.breaker_opens >= 1
    assert calls_during < 60, f"the breaker should have stopped the flood: {calls_during} calls"
    applied = applied_rows(_url(s))
    assert len({r[0] for r in applied}) == 30
    for i in range(10):
        assert [r[2] for r in applied if r[1] == f"SO-{i}"] == [1, 2, 3]


def test_health_endpoints(database_url, kafka_bootstrap, topic_prefix):
    s = worker_settings(database_url, kafka_bootstrap, topic_prefix, health_port=0)
    sink = SinkConnector(_url(s))
    with _start(s, sink) as run:
        wait_for(lambda: run.worker.health_port is not None, 20, "the health server")
        base = f"http://127.0.0.1:{run.worker.health_port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["ok"] is True
        wait_for(lambda: bool(run.worker.assigned), 30, "a partition assignment")
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
            body = json.loads(r.read())
        assert body["ok"] is True and body["assigned_partitions"] > 0
        assert body["breaker"] == "closed"


def test_retry_header_encodings_round_trip() -> None:
    assert routing.read_int(routing.big_int(1_795_000_000_000)) == 1_795_000_000_000
    assert routing.read_int(b"1795000000000") == 1_795_000_000_000
    assert routing.read_int(routing.big_int(3)) == 3


@pytest.fixture
def many_keys() -> Iterator[list[str]]:
    yield [f"SO-{i:03d}" for i in range(40)]


def test_key_ordered_concurrency_applies_every_key_in_order(sink_settings, many_keys):
    rows = make_events(many_keys, 5)
    sink = SinkConnector(_url(sink_settings), latency_s=0.01)
    with _start(sink_settings, sink):
        publish(str(sink_settings.kafka.bootstrap_servers), sink_settings.topics.prefix, rows)
        wait_for(lambda: len(applied_rows(_url(sink_settings))) == 200, 60, "200 applied")
    applied = applied_rows(_url(sink_settings))
    per_key = collections.defaultdict(list)
    for _eid, key, version, _a in applied:
        per_key[key].append(version)
    assert all(v == [1, 2, 3, 4, 5] for v in per_key.values())
    assert len({r[0] for r in applied}) == 200


def test_readyz_reports_an_unreachable_broker(database_url, topic_prefix):
    import urllib.error

    from pipeline.embedded.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        s = worker_settings(database_url, broker.bootstrap, topic_prefix, health_port=0)
        sink = SinkConnector(_url(s))
        with _start(s, sink) as run:
            wait_for(lambda: bool(run.worker.assigned), 30, "a partition assignment")
            base = f"http://127.0.0.1:{run.worker.health_port}"
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                assert json.loads(r.read())["broker_reachable"] is True
            broker.stop()

            def not_ready() -> bool:
                try:
                    urllib.request.urlopen(f"{base}/readyz", timeout=5)
                except urllib.error.HTTPError as err:
                    return err.code == 503 and json.loads(err.read())["broker_reachable"] is False
                return False

            wait_for(not_ready, 40, "/readyz to report the broker unreachable", interval_s=0.5)
            with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                assert r.status == 200  # alive, just not ready
