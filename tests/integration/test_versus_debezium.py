"""The Debezium side of ``pipeline bench relay --vs debezium``, for real: Debezium 3.6's embedded
engine streams the test database's outbox over pgoutput, the EventRouter makes events of the
rows, and the harness's KafkaProducer publishes them to the test broker.

Checked: every committed row arrives exactly once, keyed by its aggregate id, on
``<prefix>.<aggregate_type>``, with its payload as the JSON text stored and its event id and type
in headers, in version order per key; the warm-up's deletes produce nothing; a run leaves no
replication slot, publication or warm-up row behind; a missing outbox is said plainly. Needs Java
17+ with javac and Maven (the first run fetches Debezium from Maven Central into the cache).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import Any

import psycopg
import pytest

from pipeline.bench.debezium import WARMUP_AGGREGATE, DebeziumRun, debezium_available
from pipeline.outbox.migrations import install

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not debezium_available(),
        reason="the Debezium bench needs Java 17+ with javac and Maven (or its jars already in "
        "the cache): apt-get install openjdk-17-jdk-headless maven",
    ),
]

SCHEMA = "pipeline"
EVENTS = 300
AGGREGATES = 40


def _write(url: str, n: int) -> float:
    """``n`` order events through the outbox's own function, in one transaction; the commit's
    time."""
    with psycopg.connect(url) as conn:
        conn.execute(
            f"SELECT {SCHEMA}.outbox_emit('order', 'SO-' || (i %% %s), 'order.created', "
            "jsonb_build_object('n', i, 'note', 'é \"quoted\"')) FROM generate_series(1, %s) i",
            (AGGREGATES, n),
        )
        conn.commit()
        return time.time()


def test_every_outbox_event_arrives_once_keyed_by_aggregate(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, read_topic: Any
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, SCHEMA)
    prefix = f"{topic_prefix}_dbz"
    with DebeziumRun(database_url, kafka_bootstrap, schema=SCHEMA, topic_prefix=prefix,
                     poll_interval_ms=50, partitions=3, warmup_events=200,
                     warmup_max_events=200) as run:
        slot = run.slot
        run.begin()
        committed = _write(database_url, EVENTS)
        figures = run.wait_acked(EVENTS, committed_at=committed, timeout_s=120)
        warmup = dict(run.warmup)

    assert figures["events"] == EVENTS
    assert figures["seconds"] > 0 and figures["events_per_s"] > 0
    assert figures["cpu_s"] >= 0 and figures["peak_rss_mb"] > 0
    assert figures["producer"]["acks"] == "all"
    assert figures["engine"]["poll_interval_ms"] == 50

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT event_id::text, aggregate_id, aggregate_version, event_type, payload "
            f"FROM {SCHEMA}.outbox WHERE aggregate_type = 'order'"
        ).fetchall()
        left = conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s), "
            "(SELECT count(*) FROM pg_publication WHERE pubname = %s), "
            f"(SELECT count(*) FROM {SCHEMA}.outbox WHERE aggregate_type = %s)",
            (slot, slot, WARMUP_AGGREGATE),
        ).fetchone()
    assert len(rows) == EVENTS
    assert left == (0, 0, 0), "slot, publication and warm-up rows must be gone after the run"
    by_id = {r[0]: r for r in rows}

    records = read_topic(f"{prefix}.order", expect=EVENTS)
    ids = Counter(rec.headers["id"] for rec in records)
    assert set(ids) == set(by_id), "every committed event, and nothing else, is on the topic"
    assert max(ids.values()) == 1, f"duplicates: {[i for i, c in ids.items() if c > 1][:5]}"

    versions: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        _, aggregate_id, version, event_type, payload = by_id[rec.headers["id"]]
        assert rec.key == aggregate_id.encode()
        assert rec.value is not None and json.loads(rec.value) == payload
        assert rec.headers["ce_type"] == event_type
        assert rec.headers["erp_aggregate_type"] == "order"
        assert rec.headers["erp_aggregate_version"] == str(version)
        versions[rec.key].append(version)
        partitions[rec.key].add(rec.partition)
    assert all(len(p) == 1 for p in partitions.values()), "one partition per aggregate"
    assert all(v == sorted(v) for v in versions.values()), "versions in order per aggregate"

    # the warm-up wrote and deleted its rows: the inserts are events, the deletes nothing
    warm = read_topic(f"{prefix}.{WARMUP_AGGREGATE}", expect=warmup["events"])
    assert {rec.headers["ce_type"] for rec in warm} == {"bench.warmup"}


def test_a_missing_outbox_is_said_plainly(database_url: str, kafka_bootstrap: str) -> None:
    with pytest.raises(RuntimeError, match=r"nosuch\.outbox does not exist: install the outbox"):
        DebeziumRun(database_url, kafka_bootstrap, schema="nosuch").start()


def test_each_event_gets_its_acknowledgement_time_and_throughput_still_works(
    database_url: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, SCHEMA)
    with DebeziumRun(database_url, kafka_bootstrap, schema=SCHEMA,
                     topic_prefix=f"{topic_prefix}_dbz", poll_interval_ms=10, partitions=3,
                     warmup_events=200, warmup_max_events=200) as run:
        run.track_acks()
        committed = _write(database_url, EVENTS)
        with psycopg.connect(database_url) as conn:
            ids = [r[0] for r in conn.execute(
                f"SELECT event_id::text FROM {SCHEMA}.outbox WHERE aggregate_type = 'order'"
            ).fetchall()]
        acks = run.ack_times(ids, timeout_s=60)
        # the throughput protocol goes on after a tracked round
        run.begin()
        again = _write(database_url, 100)
        figures = run.wait_acked(100, committed_at=again, timeout_s=60)
        run.untrack_acks()

    assert len(ids) == EVENTS
    assert set(acks) == set(ids), "every committed event's acknowledgement, by its event id"
    # the commit time is taken after COMMIT returned: an acknowledgement may precede it by
    # the moment that takes, never by more
    assert all(committed - 0.05 < t < committed + 60 for t in acks.values())
    assert figures["events"] == 100 and figures["events_per_s"] > 0


def test_latency_versus_debezium_gives_every_written_event_an_ack_time(
    settings: Any,
) -> None:
    from pipeline.bench.versus import run_latency_versus_debezium

    out = run_latency_versus_debezium(
        settings, rate=100, seconds=3, repeat=1, debezium_default=False,
        debezium_options={"warmup_events": 200, "warmup_max_events": 200})

    for key in ("rate", "seconds", "relay_shards", "relay", "debezium_poll_10ms",
                "relay_beats_debezium_p99", "rate_reached", "target", "verdict", "protocol"):
        assert key in out, key
    assert "debezium_default" not in out
    for name in ("relay", "debezium_poll_10ms"):
        system = out[name]
        assert system["written"] > 200, (name, system)
        assert system["acknowledged"] == system["written"], (name, system)
        assert set(system["latency_ms"]) == {"p50", "p99", "max"}
        assert 0 < system["latency_ms"]["p50"] <= system["latency_ms"]["p99"] \
            <= system["latency_ms"]["max"] < 10_000, (name, system)
        assert len(system["runs"]) == 1 and "achieved_rate" in system["runs"][0]
    assert out["debezium_poll_10ms"]["engine"]["poll_interval_ms"] == 10
    assert isinstance(out["relay_beats_debezium_p99"], bool)
    assert out["verdict"].startswith(("NOT A PASS", "measured at the asked rate"))
