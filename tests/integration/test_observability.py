"""Traces and metrics on real servers: one trace id from the ERP transaction that called emit()
through the relay and the worker (and a retry hop) to the reference WMS's HTTP call; /metrics
of the relay and of a worker with the right values after a known workload."""

from __future__ import annotations

import datetime as dt
import random
import re
import threading
import urllib.request
from collections.abc import Iterator

import psycopg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from connectors.wms.connector import WmsConnector
from connectors.wms.server import WmsServer
from pipeline import telemetry
from pipeline.outbox import emit
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.simulator.payloads import payload_for
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import SinkConnector, make_events, publish
from tests.fixtures.relay import _url, outbox_count, wait_for
from tests.fixtures.sink import Running

pytestmark = pytest.mark.integration


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.setup("test", span_exporter=exporter)
    yield exporter
    telemetry.setup("test")  # tracing off again for the other tests


def test_one_trace_from_the_erp_transaction_to_the_wms_call_through_a_retry(
        spans, database_url, kafka_bootstrap, topic_prefix):
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      topics={"aggregate_types": ["order"]},
                      workers={"wms": {"connector": "unused:unused", "session_timeout_ms": 6000,
                                       "retry_delays_s": [0.3], "commit_interval_s": 0.2}})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    now = dt.datetime.now(dt.UTC)
    payload = payload_for("order.created", random.Random(5), aggregate_id="SO-T1", now=now)
    with telemetry._tracer().start_as_current_span("erp: enter sales order") as erp, \
            psycopg.connect(database_url) as conn:
        emit(conn, "order", "SO-T1", "order.created", payload)
        conn.commit()
    trace_id = erp.get_span_context().trace_id
    with WmsServer(error_rate=1.0, error_status=500) as wms:
        relay_stop = threading.Event()
        relay = threading.Thread(target=Relay(s).run, args=(relay_stop,), daemon=True)
        relay.start()
        try:
            with Running(Worker(s, "wms", WmsConnector(wms.url))) as run:
                wait_for(lambda: run.worker.stats.retried.get(1, 0) >= 1, 60,
                         "the first attempt to fail and go to the retry tier")
                wms.set_faults(error_rate=0.0)
                wait_for(lambda: run.worker.stats.applied == 1, 60, "the retry to succeed")
        finally:
            relay_stop.set()
            relay.join(30)
        assert wms.stats.get("injected_errors", 0) >= 1
    finished = spans.get_finished_spans()
    ours = [sp for sp in finished if sp.context.trace_id == trace_id]
    names = [sp.name for sp in ours]
    topic, retry = f"{topic_prefix}.order", f"{topic_prefix}.wms.retry.1"
    assert f"send {topic}" in names
    assert names.count(f"process {topic}") == 1 and f"send {retry}" in names
    assert f"process {retry}" in names
    http = [sp for sp in ours if sp.kind == SpanKind.CLIENT]
    assert len(http) == 2, names  # the failed call and the successful one, same trace
    by_id = {sp.context.span_id: sp for sp in ours}

    def parent_name(sp):  # type: ignore[no-untyped-def]
        return by_id[sp.parent.span_id].name if sp.parent and sp.parent.span_id in by_id else None

    send = next(sp for sp in ours if sp.name == f"send {topic}")
    first = next(sp for sp in ours if sp.name == f"process {topic}")
    hop = next(sp for sp in ours if sp.name == f"send {retry}")
    second = next(sp for sp in ours if sp.name == f"process {retry}")
    assert parent_name(send) == "erp: enter sales order" and send.kind == SpanKind.PRODUCER
    assert parent_name(first) == f"send {topic}" and first.kind == SpanKind.CONSUMER
    assert parent_name(hop) == f"process {topic}"
    assert parent_name(second) == f"send {retry}"
    assert {parent_name(sp) for sp in http} == {f"process {topic}", f"process {retry}"}
    # semantic-convention attributes
    a = first.attributes or {}
    assert a["messaging.system"] == "kafka" and a["messaging.destination.name"] == topic
    assert a["messaging.operation.type"] == "process"
    assert a["messaging.consumer.group.name"] == f"{topic_prefix}.wms"
    assert a["messaging.kafka.message.key"] == "SO-T1" and a["erp.event_type"] == "order.created"
    assert a["erp.aggregate_version"] == 1 and "messaging.kafka.offset" in a
    assert first.status.status_code.name == "ERROR"
    assert (send.attributes or {})["messaging.message.id"] == (a["messaging.message.id"])
    assert (http[0].attributes or {})["http.request.method"] == "POST"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^(\w+)(\{(.*)\})? (\S+)$", line)
        assert m, line
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
            found = True
    assert found, f"no sample of {name} with {labels} in /metrics"
    return total


def test_metrics_of_the_relay_and_a_worker_after_a_known_workload(
        database_url, kafka_bootstrap, topic_prefix):
    telemetry.setup("test")  # fresh instruments: counters start at zero
    s = make_settings(database_url, kafka_bootstrap, topic_prefix,
                      topics={"aggregate_types": ["order"], "partitions": 3},
                      relay={"health_port": 0},
                      workers={"sink": {"connector": "unused:unused", "session_timeout_ms": 6000,
                                        "retry_delays_s": [0.3], "commit_interval_s": 0.2,
                                        "health_port": 0}})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    rows = make_events([f"M{i}" for i in range(10)], 3)  # 30 events
    refused = {rows[0].event_id, rows[1].event_id}
    retried = rows[2].event_id
    script = {**{e: ["permanent"] for e in refused}, retried: ["transient"]}
    with psycopg.connect(database_url) as conn:
        for r in rows[:12]:  # 12 through the outbox and the relay
            emit(conn, "order", r.aggregate_id, r.event_type, r.payload, event_id=r.event_id)
        conn.commit()
    relay = Relay(s)
    relay_stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(relay_stop,), daemon=True)
    t.start()
    try:
        wait_for(lambda: outbox_count(database_url) == 0 and relay.health_port is not None, 60,
                 "the relay to publish the 12 outbox events")
        sink = SinkConnector(_url(s), script=script)
        with Running(Worker(s, "sink", sink)) as run:
            publish(kafka_bootstrap, topic_prefix, rows[12:])  # 18 more, straight to Kafka
            w = run.worker
            wait_for(lambda: w.stats.applied + w.stats.dead_lettered_total == 30
                     and w.stats.retried.get(1, 0) == 1, 60, "every event handled")
            port = w.health_port
            assert port is not None

            def settled() -> bool:
                text = _scrape(port)
                return ("pipeline_consumer_lag{" in text and
                        _value(text, "messaging_client_consumed_messages_total") >= 33)

            wait_for(settled, 30, "the consumed counter to be flushed")
            text = _scrape(port)
            consumed = w.stats.consumed  # redeliveries after a rebalance count too
        relay_text = _scrape(relay.health_port)  # type: ignore[arg-type]
    finally:
        relay_stop.set()
        t.join(30)
    group = f"{topic_prefix}.sink"
    # 30 first deliveries + 3 from the retry tier: the retried event and the two later events
    # of its key that waited behind it (strict ordering), + any redelivery after a rebalance
    assert consumed >= 33
    assert _value(text, "messaging_client_consumed_messages_total",
                  messaging_consumer_group_name=group) == consumed
    assert _value(text, "messaging_client_consumed_messages_total",
                  messaging_destination_name=f"{topic_prefix}.sink.retry.1") == 3
    assert _value(text, "pipeline_dead_lettered_total", error_type="PermanentError") == 2
    assert _value(text, "pipeline_retries_total", tier="1") == 1
    ok = _value(text, "messaging_process_duration_seconds_count", outcome="ok")
    assert 28 <= ok <= 28 + consumed - 33
    assert _value(text, "messaging_process_duration_seconds_count", outcome="failed") == 3
    assert _value(text, "pipeline_end_to_end_duration_seconds_count") == ok
    assert _value(text, "pipeline_parked_keys", messaging_consumer_group_name=group) == 0
    assert _value(text, "pipeline_breaker_state") == 0
    assert _value(text, "pipeline_consumer_lag") == 0
    # the relay published the 12 outbox events and leads shard 0; the backlog is empty
    assert _value(relay_text, "messaging_client_sent_messages_total",
                  messaging_destination_name=f"{topic_prefix}.order") == 12
    assert _value(relay_text, "pipeline_relay_leader", shard="0") == 1
    assert _value(relay_text, "pipeline_outbox_backlog") == 0
    assert _value(relay_text, "messaging_client_operation_duration_seconds_count") >= 1


def test_a_collector_that_is_down_never_blocks_the_relay(tmp_path, database_url,
                                                         kafka_bootstrap, topic_prefix):
    """Tracing on (OTLP endpoint set) with nothing listening there: the relay publishes
    everything and stops on SIGTERM with exit code 0 in bounded time."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    from pipeline.embedded.broker import free_port

    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    rows = make_events([f"C{i}" for i in range(10)], 2)
    with psycopg.connect(database_url) as conn:
        for r in rows:
            emit(conn, "order", r.aggregate_id, r.event_type, r.payload, event_id=r.event_id)
        conn.commit()
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url}, "kafka": {"bootstrap_servers": kafka_bootstrap},
        "topics": {"prefix": topic_prefix, "aggregate_types": ["order"]},
        "relay": {"poll_interval_s": 0.2}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "OTEL_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "relay.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--config", str(config),
                                 "relay"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: outbox_count(database_url) == 0, 60, "the relay to publish everything")
        time.sleep(1.0)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - stopped < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
