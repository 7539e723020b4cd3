"""``pipeline status`` on a staged situation (real PostgreSQL and broker): the backlog, a group's
lag, retry-tier depth, DLQ depth and newest error, parked keys; the exit code flips when a
threshold is crossed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.kafka import names
from pipeline.outbox import emit
from pipeline.outbox.migrations import install
from tests.fixtures.connectors import make_events, publish
from tests.fixtures.sink import cli

pytestmark = pytest.mark.integration


def _config(tmp: Path, database_url: str, bootstrap: str, prefix: str, **status: Any) -> Path:
    path = tmp / f"pipeline-{len(list(tmp.glob('pipeline-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({
        "database": {"url": database_url}, "kafka": {"bootstrap_servers": bootstrap},
        "topics": {"prefix": prefix, "aggregate_types": ["order"], "partitions": 1},
        "workers": {"sink": {"connector": "tests.fixtures.connectors:SinkConnector",
                             "retry_delays_s": [1.0]}},
        "status": status}))
    return path


def test_status_reports_a_staged_situation_and_flips_its_exit_code(
        tmp_path, database_url, kafka_bootstrap, topic_prefix):
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    backlog = make_events(["B1", "B2"], 2, seed=9)
    with psycopg.connect(database_url) as conn:
        for r in backlog:  # written by the ERP, no relay running
            emit(conn, "order", r.aggregate_id, r.event_type, r.payload, event_id=r.event_id)
        conn.commit()
    topic, group = f"{topic_prefix}.order", f"{topic_prefix}.sink"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(10)
    # one record per produce request: tansu reports a batch's high watermark as its base
    # offset + 1, so a batch of 10 would look like 1 record
    for row in make_events([f"K{i}" for i in range(5)], 2):  # 10 records
        publish(kafka_bootstrap, topic_prefix, [row])
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)  # 6 behind
    c.close()
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(2):
        p.produce(f"{topic_prefix}.sink.retry.1", b"x", f"R{i}".encode())
    for i, cls in enumerate(["TargetRefused", "TargetRefused", "MappingError"]):
        p.produce(f"{topic_prefix}.sink.dlq", b"x", f"D{i}".encode(), headers=[
            (names.EXCEPTION_FQCN, f"connectors.rest.client.{cls}".encode()),
            (names.EXCEPTION_MESSAGE, f"refused number {i}".encode())])
        p.flush(10)
        time.sleep(0.01)  # distinct timestamps: the newest is the MappingError
    p.produce(f"{topic_prefix}.sink.parked", b'{"head": "e1"}', b"a|K1")
    p.produce(f"{topic_prefix}.sink.parked", b'{"head": "e2"}', b"a|K2")
    p.produce(f"{topic_prefix}.sink.parked", None, b"a|K2")  # released
    assert p.flush(10) == 0

    r = cli(_config(tmp_path, database_url, kafka_bootstrap, topic_prefix), "status", "--json")
    assert r.returncode == 1, r.stderr[-2000:]  # no relay leader
    st = json.loads(r.stdout)
    assert st["healthy"] is False
    assert st["outbox"]["backlog_rows"] == 4 and st["outbox"]["oldest_unpublished_age_s"] > 0
    assert any("no leader" in p for p in st["problems"])
    (g,) = st["groups"]
    assert g["group"] == "sink" and g["group_id"] == group
    assert g["lag_records"] == 6 and g["lag"][0]["topic"] == topic
    assert g["lag_seconds"] >= 0
    assert g["retry_depths"] == {"1": 2}
    assert g["dlq_depth"] == 3
    assert g["dlq_newest"]["error_class"] == "MappingError"
    assert g["dlq_newest"]["error_message"] == "refused number 2"
    assert g["parked_keys"] == 1

    calm = _config(tmp_path, database_url, kafka_bootstrap, topic_prefix,
                   require_leader=False, max_backlog_age_s=None, max_lag_s=None)
    r = cli(calm, "status")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "OK" in r.stdout.splitlines()[0] and "sink" in r.stdout
    assert "backlog 4 rows" in r.stdout and "MappingError: refused number 2" in r.stdout

    strict = _config(tmp_path, database_url, kafka_bootstrap, topic_prefix,
                     require_leader=False, max_backlog_age_s=None, max_lag_s=None,
                     max_lag_records=5, max_dlq=2)
    r = cli(strict, "status")
    assert r.returncode == 1
    assert "! sink: 6 records behind (status.max_lag_records 5)" in r.stdout
    assert "! sink: 3 dead letters (status.max_dlq 2)" in r.stdout
