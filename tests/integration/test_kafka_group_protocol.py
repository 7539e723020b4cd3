"""Workers and the BI sink under both consumer group protocols: ``classic`` and ``consumer``
(KIP-848, Kafka 4.0+, where the broker assigns partitions incrementally; tansu has only classic).
Two members share the group, a third joins mid-run and leaves again: every event applied or
landed exactly once, every key in version order."""

from __future__ import annotations

import collections
import time

import pytest

from pipeline.config import Settings
from pipeline.sink.runtime import SinkWorker
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import SinkConnector, applied_rows, make_events, publish
from tests.fixtures.relay import _url, wait_for
from tests.fixtures.sink import Running
from tests.integration.test_bi_postgres import _assert_exactly_once, _count

pytestmark = pytest.mark.integration

PROTOCOLS = [pytest.param("classic", marks=pytest.mark.tansu_smoke),
             pytest.param("consumer", marks=pytest.mark.kafka_only)]


def _settings(database_url: str, bootstrap: str, prefix: str, protocol: str) -> Settings:
    import psycopg

    from pipeline.outbox.migrations import install

    common = {"session_timeout_ms": 6000, "group_protocol": protocol, "shutdown_grace_s": 10}
    s = make_settings(
        database_url, bootstrap, prefix,
        topics={"aggregate_types": ["order"], "partitions": 6},
        workers={"sink": {"connector": "tests.fixtures.connectors:SinkConnector",
                          "retry_delays_s": [0.3, 0.6], "commit_interval_s": 0.2, **common},
                 "bi": {"connector": "connectors.bi.postgres:PostgresTarget",
                        "options": {"schema": f"bi_{prefix}"}, "batch_size": 100,
                        "batch_max_wait_s": 0.2, **common}})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    return s


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_workers_of_one_group_apply_once_in_order_through_a_join_and_a_leave(
        protocol: str, database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    s = _settings(database_url, kafka_bootstrap, topic_prefix, protocol)
    url = _url(s)
    rows = make_events([f"SO-{i}" for i in range(20)], 10)
    # ~15 % of events fail once or twice: their retry state must follow their cell from member
    # to member under either protocol (pipeline.worker.ownership)
    first, second = rows[:100], rows[100:]
    target = SinkConnector(url, flaky_pct=15)
    with Running(Worker(s, "sink", target)) as a, Running(Worker(s, "sink", target)) as b:
        # the workers create the topics: publishing first would auto-create them with one
        # partition
        wait_for(lambda: bool(a.worker.assigned or b.worker.assigned), 60, "a first assignment")
        publish(kafka_bootstrap, topic_prefix, first)
        wait_for(lambda: len(applied_rows(url)) >= 50, 60, "the first events applied")
        with Running(Worker(s, "sink", target)) as third:
            wait_for(lambda: bool(third.worker.assigned), 60, "the third member's partitions")
            publish(kafka_bootstrap, topic_prefix, second)
            time.sleep(1.0)
        wait_for(lambda: len(applied_rows(url)) >= len(rows), 90, "every event applied")
    applied = applied_rows(url)
    assert sorted(r[0] for r in applied) == sorted(r.event_id for r in rows)  # once each
    per_key: dict[str, list[int]] = collections.defaultdict(list)
    for _eid, key, version, _attempt in applied:
        per_key[key].append(version)
    assert all(v == list(range(1, 11)) for v in per_key.values()), dict(per_key)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bi_sinks_of_one_group_land_once_through_a_join(
        protocol: str, database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    s = _settings(database_url, kafka_bootstrap, topic_prefix, protocol)
    rows = make_events([f"SO-{i}" for i in range(30)], 20)
    with Running(SinkWorker(s, "bi")):
        publish(kafka_bootstrap, topic_prefix, rows[:300])
        wait_for(lambda: _count(s) >= 100, 60, "landing under way")
        with Running(SinkWorker(s, "bi")) as joined:
            wait_for(lambda: bool(joined.sink.assigned), 60, "the second sink's partitions")
            publish(kafka_bootstrap, topic_prefix, rows[300:])
            wait_for(lambda: _count(s) >= len(rows), 90, "every event landed")
    _assert_exactly_once(s, {r.event_id for r in rows})
