"""A three-node Apache Kafka cluster (replication factor 3, ``min.insync.replicas`` 2) losing a
partition leader to ``kill -9`` while the relay, a worker and the BI sink run: nothing lost,
nothing applied twice, every key in order; then the broker comes back and the run finishes."""

from __future__ import annotations

import collections
import threading
import time

import pytest
from confluent_kafka.admin import AdminClient

from pipeline.relay.relay import Relay
from pipeline.sink.runtime import SinkWorker
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import SinkConnector, applied_rows
from tests.fixtures.kafka import read_all
from tests.fixtures.relay import _url, assert_exactly_once_in_order, outbox_count, wait_for
from tests.fixtures.sink import Running
from tests.integration.test_bi_postgres import _assert_exactly_once
from tests.integration.test_relay_guarantees import Writer

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only, pytest.mark.slow]


def _leader(bootstrap: str, topic: str, partition: int) -> int:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return int(md.topics[topic].partitions[partition].leader)


def test_partition_leader_killed_mid_run_loses_nothing_and_duplicates_nothing(
        kafka_cluster, database_url: str, topic_prefix: str) -> None:
    import psycopg

    from pipeline.outbox.migrations import install

    boot = kafka_cluster.bootstrap
    s = make_settings(
        database_url, boot, topic_prefix,
        topics={"aggregate_types": ["order"], "partitions": 3, "replication_factor": 3},
        workers={
            "sink": {"connector": "tests.fixtures.connectors:SinkConnector",
                     "retry_delays_s": [0.5], "session_timeout_ms": 6000,
                     "commit_interval_s": 0.2},
            "bi": {"connector": "connectors.bi.postgres:PostgresTarget",
                   "options": {"schema": f"bi_{topic_prefix}"}, "batch_size": 200,
                   "batch_max_wait_s": 0.2, "session_timeout_ms": 6000},
        })
    url = _url(s)
    with psycopg.connect(url, autocommit=True) as conn:
        install(conn, "pipeline")
    topic = f"{topic_prefix}.order"
    keys = [f"SO-{i:04d}" for i in range(24)]
    relay, stop = Relay(s), threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    relay_thread.start()
    killed: int | None = None
    try:
        with Running(Worker(s, "sink", SinkConnector(url))) as worker, \
                Running(SinkWorker(s, "bi")) as sink:
            # ~200 events/s until told to stop: the ERP writes on through the whole outage
            writer = Writer(url, keys, total=20_000, per_txn=10, pause_s=0.05, seed=11,
                            deadline_s=150)
            writer.start()
            wait_for(lambda: len(applied_rows(url)) >= 200, 90, "the first events applied")
            killed = _leader(boot, topic, 0)
            kafka_cluster.kill(killed)
            t_kill = time.monotonic()
            published_at_kill = relay.stats.published
            # the two surviving replicas are the in-sync quorum: publishing goes on without it
            wait_for(lambda: relay.stats.published >= published_at_kill + 200, 90,
                     "the relay to publish while a broker is down")
            published_while_down = relay.stats.published - published_at_kill
            time.sleep(max(0.0, 5 - (time.monotonic() - t_kill)))  # down for 5 s at least
            kafka_cluster.start_node(killed)
            down_s = time.monotonic() - t_kill
            time.sleep(2)  # and on a while with the node back
            writer.stop_flag.set()
            committed = writer.finish(60)
            wait_for(lambda: outbox_count(url) == 0, 120, "the relay to drain the outbox")
            wait_for(lambda: len(applied_rows(url)) >= len(committed), 150,
                     f"the worker to apply all {len(committed)} events")
            from tests.integration.test_bi_postgres import _count

            wait_for(lambda: _count(s) >= len(committed), 150, "the BI sink to land them all")
            assert worker.worker.stats.dead_lettered_total == 0
            assert sink.sink is not None
    finally:
        stop.set()
        relay_thread.join(60)
        if killed is not None and kafka_cluster.node(killed).proc is None:
            kafka_cluster.start_node(killed)
    assert not relay_thread.is_alive()
    assert down_s >= 5 and published_while_down >= 200, (down_s, published_while_down)

    recs = read_all(boot, topic, expect=len(committed), timeout_s=60)
    assert_exactly_once_in_order(recs, expected_ids=set(committed))
    applied = applied_rows(url)
    assert len(applied) == len(committed) and {r[0] for r in applied} == set(committed)
    per_key: dict[str, list[int]] = collections.defaultdict(list)
    for _eid, key, version, _attempt in applied:
        per_key[key].append(version)
    for key, versions in per_key.items():
        assert versions == sorted(versions), f"{key} applied out of order: {versions}"
    _assert_exactly_once(s, set(committed))
