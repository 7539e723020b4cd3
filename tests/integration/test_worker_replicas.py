"""Several `pipeline worker` processes of one group, the topology users run: a key's events are
applied once each, in version order, through transient failures, a kill -9, a SIGTERM with a
late replacement and a scale from 1 to 3 to 1 while the ERP writes. Effects are counted in the
PostgreSQL sink itself (tests/fixtures/connectors.py: SinkConnector, its inbox ledger refuses a
version older than one applied, so an event applied out of order shows up as never applied)."""

from __future__ import annotations

import collections
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.kafka.names import GroupTopics
from pipeline.kafka.tail import read_to_end
from tests.fixtures.connectors import (
    applied_rows,
    flaky_failures,
    make_events,
    publish,
)
from tests.fixtures.processes import WorkerProcesses, sink_group
from tests.fixtures.relay import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEYS, VERSIONS, FLAKY_PCT = 40, 50, 10
DELAYS = [0.5, 1.0, 2.0]


@pytest.fixture(params=[pytest.param("classic"),
                        pytest.param("consumer", marks=pytest.mark.kafka_only)])
def group(request: pytest.FixtureRequest, tmp_path: Path, database_url: str,
          kafka_bootstrap: str, topic_prefix: str) -> Iterator[tuple[WorkerProcesses, dict]]:
    g, config = sink_group(tmp_path, database_url, kafka_bootstrap, topic_prefix,
                           partitions=6, options={"latency_s": 0.002, "flaky_pct": FLAKY_PCT},
                           retry_delays_s=DELAYS, max_in_flight=8,
                           group_protocol=request.param)
    try:
        yield g, config
    finally:
        g.close()


def _dead_letters(config: dict, prefix: str) -> list[str]:
    s = load_config(None, overrides={k: v for k, v in config.items() if k != "workers"})
    topic = GroupTopics(prefix, "sink").dlq_topic
    return [str(m.headers()) for m in read_to_end(s, [topic], timeout_s=30, purpose="t-dlq")]


def _live_parked(config: dict, prefix: str) -> dict[bytes, bytes]:
    s = load_config(None, overrides={k: v for k, v in config.items() if k != "workers"})
    latest: dict[bytes, bytes | None] = {}
    for m in read_to_end(s, [GroupTopics(prefix, "sink").parked_topic], timeout_s=30,
                         purpose="t-parked"):
        latest[m.key() or b""] = m.value()
    return {k: v for k, v in latest.items() if v is not None}


def _diagnose(config: dict, prefix: str, url: str) -> str:
    """On a failure: each still-parked key's state, where its head's records are, and the
    group's committed offsets there (so a stall says which partition held it)."""
    from confluent_kafka import Consumer, TopicPartition

    s = load_config(None, overrides={k: v for k, v in config.items() if k != "workers"})
    gt = GroupTopics(prefix, "sink", DELAYS)
    topics = [f"{prefix}.order", *gt.retry_topics]
    where: dict[str, list[str]] = collections.defaultdict(list)
    for m in read_to_end(s, topics, timeout_s=30, purpose="t-diag"):
        ce = dict(m.headers() or []).get("ce_id", b"").decode()
        where[ce].append(f"{m.topic()}[{m.partition()}]@{m.offset()}")
    c = Consumer({"bootstrap.servers": config["kafka"]["bootstrap_servers"],
                  "group.id": gt.group_id})
    try:
        parts = [TopicPartition(t, p) for t in topics for p in range(6)]
        committed = {f"{tp.topic}[{tp.partition}]": tp.offset
                     for tp in c.committed(parts, timeout=10)}
    finally:
        c.close()
    applied = {r[0] for r in applied_rows(url)}
    lines = []
    for key, state in list(_live_parked(config, prefix).items())[:8]:
        st = json.loads(state)
        head = st["head"]
        spots = where.get(head, [])
        lines.append(f"parked {key.decode()}: {st} head applied={head in applied} at {spots} "
                     f"committed {[committed.get(x.split('@')[0]) for x in spots]}")
    return "\n".join(lines)


def _check(url: str) -> None:
    rows = applied_rows(url)
    ids = collections.Counter(r[0] for r in rows)
    dup = [i for i, n in ids.items() if n > 1]
    assert not dup, f"{len(dup)} events applied twice"
    per: dict[str, list[int]] = collections.defaultdict(list)
    for _e, key, version, _a in rows:
        per[key].append(version)
    missing = {k: sorted(set(range(1, VERSIONS + 1)) - set(v)) for k, v in per.items()
               if len(v) != VERSIONS}
    assert len(ids) == KEYS * VERSIONS, (
        f"{KEYS * VERSIONS - len(ids)} events never applied; by key: "
        f"{dict(list(missing.items())[:5])}")
    bad = {k: v for k, v in per.items() if v != list(range(1, VERSIONS + 1))}
    assert not bad, f"keys applied out of order: {dict(list(bad.items())[:3])}"


def test_three_replicas_through_kill_sigterm_and_scaling_apply_every_event_once_in_order(
        group: tuple[WorkerProcesses, dict], database_url: str, kafka_bootstrap: str,
        topic_prefix: str) -> None:
    g, config = group
    keys = [f"SO-{i:03d}" for i in range(KEYS)]
    rows = make_events(keys, VERSIONS, seed=7)  # 2,000 events, version by version
    flaky = [r for r in rows if flaky_failures(r.event_id, FLAKY_PCT)]
    assert 0.05 * len(rows) < len(flaky) < 0.15 * len(rows)  # ~10 % fail once or twice

    # the ERP writes throughout: ~80 events/s for ~25 s
    writer_done = threading.Event()
    written = [0]

    def write() -> None:
        for i in range(0, len(rows), 40):
            publish(kafka_bootstrap, topic_prefix, rows[i:i + 40])
            written[0] = i + 40
            time.sleep(0.5)
        writer_done.set()

    w1 = g.start()  # scale 1
    wait_for(lambda: "assigned" in g.all_logs(), 60, "the first worker to join")
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    wait_for(lambda: len(applied_rows(database_url)) >= 100, 60, "the first worker applying")
    w2, w3 = g.start(), g.start()  # scale 1 → 3
    wait_for(lambda: written[0] >= 600, 60, "more events written")
    time.sleep(3)  # the three share the partitions, with retries under way
    w2.kill()  # kill -9: its cells move on after the session timeout
    w2.wait(10)
    wait_for(lambda: written[0] >= 1000, 60, "more events written")
    w3.send_signal(signal.SIGTERM)  # a clean leave ...
    assert w3.wait(30) == 0, g.tails()
    time.sleep(2.5)
    w4 = g.start()  # ... and its replacement, late
    wait_for(lambda: written[0] >= 1600, 60, "more events written")
    time.sleep(3)
    w4.send_signal(signal.SIGTERM)  # scale 3 → 1: only w1 is left
    assert w4.wait(30) == 0, g.tails()
    assert writer_done.wait(60)
    wait_for(lambda: len(applied_rows(database_url)) >= KEYS * VERSIONS, 120,
             "every event applied",
             on_timeout=lambda: _diagnose(config, topic_prefix, database_url) + "\n"
             + g.tails())
    time.sleep(2.0)  # anything redelivered after the last commit is absorbed by the ledger
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(30) == 0, g.tails()

    _check(database_url)
    assert _dead_letters(config, topic_prefix) == []
    assert _live_parked(config, topic_prefix) == {}, "keys still parked at the end"
    logs = g.all_logs()
    assert "is stalled" not in logs and "gone round the retry path" not in logs
    assert '"retry 1 in' in logs or "retry 1 in" in logs  # the transient failures happened
