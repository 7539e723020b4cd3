"""The relay's delivery guarantees under stress, on a real PostgreSQL and a real broker.

Every scenario ends with the same check: the event topic holds every committed event exactly
once (by ``ce_id`` and by ``erp_outbox_position``), each key on one partition with its aggregate
versions 1..n in order and without a gap, and nothing that was rolled back.

* interleaved writers (late commits, rollbacks) while a relay runs;
* ``kill -9`` of the relay process mid-run, then a restart;
* two relay processes: the leader is killed, the standby takes over;
* the broker frozen (SIGSTOP) mid-run;
* the relay's database connection terminated mid-run.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.outbox import emit
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.simulator.payloads import payload_for
from tests.conftest import make_settings
from tests.fixtures.kafka import read_all
from tests.fixtures.relay import (
    InterleavedWriters,
    SteadyWriter,
    _url,
    assert_exactly_once_in_order,
    outbox_count,
    relay_leader,
    wait_for,
)

pytestmark = pytest.mark.integration



def Writer(url: str, keys: list[str], total: int, per_txn: int, pause_s: float,
           seed: int = 1, deadline_s: float = 60.0) -> SteadyWriter:
    """A steady writer through ``emit()`` on PostgreSQL."""
    return SteadyWriter(
        lambda: psycopg.connect(url),
        lambda conn, key, et, payload, eid: emit(conn, "order", key, et, payload, event_id=eid),
        keys, total, per_txn, pause_s, seed, deadline_s)


# -- 1. interleaved writers ----------------------------------------------------------------------
def test_interleaved_writers_late_commits_and_rollbacks(installed: Settings, read_topic):
    url = _url(installed)
    writers = InterleavedWriters(
        lambda: psycopg.connect(url),
        lambda conn, agg, et, payload, eid: emit(conn, "order", agg, et, payload, event_id=eid))
    relay = Relay(installed)
    stop = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    relay_thread.start()
    try:
        writers.run()
        wait_for(lambda: outbox_count(url) == 0, 30, "the relay to drain the outbox")
    finally:
        stop.set()
        relay_thread.join(30)
    assert not relay_thread.is_alive()
    committed, rolled_back = writers.committed, writers.rolled_back

    recs = read_topic(f"{installed.topics.prefix}.order", expect=len(committed), timeout_s=30)
    assert_exactly_once_in_order(recs, expected_ids=set(committed),
                                 forbidden_ids=set(rolled_back))
    assert relay.stats.published == len(committed)
    assert relay.stats.dead_lettered == 0
    # versions are gapless among committed events: the counter matches what was published
    with psycopg.connect(url, autocommit=True) as conn:
        counters = dict(conn.execute(
            "SELECT aggregate_id, version FROM pipeline.aggregate_versions").fetchall())
    per_key = collections.Counter(r.key.decode() for r in recs if r.key)
    assert counters == dict(per_key)


# -- 2. kill -9 mid-run --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.tansu_smoke
def test_kill_9_mid_run_then_restart_publishes_exactly_once(installed: Settings, relay_procs,
                                                            read_topic):
    url = _url(installed)
    total, keys = 50_000, 500
    payload = json.dumps(payload_for("order.created", random.Random(3), aggregate_id="SO-1",
                                     now=dt.datetime.now(dt.UTC)))
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT count(pipeline.outbox_emit('order', 'SO-' || (i %% %s), 'order.created', "
            "%s::jsonb)) FROM generate_series(1, %s) i",
            (keys, payload, total),
        )
        conn.commit()
    assert outbox_count(url) == total
    relay_procs.env["PIPELINE_RELAY__BATCH_SIZE"] = "500"

    first = relay_procs.start("first")
    deadline = time.monotonic() + 30
    left = total
    while True:
        left = outbox_count(url)
        if left <= total - 3000:
            break
        assert first.poll() is None, "relay died:\n" + relay_procs.log_of(first)[-3000:]
        assert time.monotonic() < deadline, "relay did not start publishing in 30s:\n" + \
            relay_procs.log_of(first)[-3000:]
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    left_at_kill = outbox_count(url)
    assert 0 < left_at_kill < total, "the kill did not land mid-run"

    second = relay_procs.start("second")
    wait_for(lambda: outbox_count(url) == 0 or second.poll() is not None, 45,
             "the restarted relay to drain the outbox", interval_s=0.2)
    assert second.poll() is None, "restarted relay died:\n" + relay_procs.log_of(second)[-3000:]
    rc = relay_procs.stop(second)
    assert rc == 0, relay_procs.log_of(second)[-3000:]

    recs = read_topic(f"{installed.topics.prefix}.order", expect=total, timeout_s=60)
    assert_exactly_once_in_order(recs, expected_per_key={f"SO-{i}": total // keys
                                                         for i in range(keys)})
    assert sorted(int(r.headers["erp_outbox_position"]) for r in recs) == \
        list(range(1, total + 1))


# -- 3. leader killed, standby takes over --------------------------------------------------------
@pytest.mark.slow
def test_standby_takes_over_when_leader_is_killed(installed: Settings, relay_procs, read_topic):
    url = _url(installed)
    host = socket.gethostname()
    a = relay_procs.start("a")
    wait_for(lambda: relay_leader(url) == f"{host}:{a.pid}" or a.poll() is not None, 20,
             "relay A to lead")
    assert a.poll() is None, relay_procs.log_of(a)[-3000:]
    b = relay_procs.start("b")
    wait_for(lambda: "standby" in relay_procs.log_of(b) or b.poll() is not None, 20,
             "relay B to report standby")
    assert b.poll() is None, relay_procs.log_of(b)[-3000:]
    assert relay_leader(url) == f"{host}:{a.pid}"

    keys = [f"SO-{i:06d}" for i in range(20)]
    writer = Writer(url, keys, total=2000, per_txn=20, pause_s=0.06, seed=3)
    writer.start()
    try:
        wait_for(lambda: writer.written >= 600, 30, "600 events written")
        assert outbox_count(url) < writer.written, "relay A published nothing before the kill"
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        assert writer.written < writer.total, "the kill did not land mid-stream"
        took = wait_for(lambda: relay_leader(url) == f"{host}:{b.pid}", 10,
                        "relay B to take over")
        committed = writer.finish()
    finally:
        writer.stop_flag.set()
        writer.join(45)
    wait_for(lambda: outbox_count(url) == 0, 20,
             "relay B to drain the outbox")
    assert took < 10
    assert b.poll() is None, relay_procs.log_of(b)[-3000:]
    assert relay_procs.stop(b) == 0, relay_procs.log_of(b)[-3000:]

    recs = read_topic(f"{installed.topics.prefix}.order", expect=len(committed), timeout_s=30)
    assert_exactly_once_in_order(recs, expected_ids=committed)
    assert relay_leader(url) == f"{host}:{b.pid}"


# -- 4. broker frozen mid-run --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP")),
                    reason="needs a broker process this test controls")
def test_broker_paused_mid_run(database_url: str, topic_prefix: str, tmp_path: Path):
    from pipeline.embedded.broker import EmbeddedBroker

    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = make_settings(database_url, broker.bootstrap, topic_prefix)
        url = _url(settings)
        with psycopg.connect(url, autocommit=True) as conn:
            install(conn, settings.database.schema_name)
        relay = Relay(settings)
        stop = threading.Event()
        relay_thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        relay_thread.start()
        keys = [f"SO-{i:06d}" for i in range(10)]
        try:
            first = Writer(url, keys, total=200, per_txn=20, pause_s=0.0, seed=4)
            first.start()
            committed = first.finish()
            wait_for(lambda: outbox_count(url) == 0, 30, "the first events to be published")

            second = Writer(url, keys, total=400, per_txn=10, pause_s=0.1, seed=5)
            second.start()
            try:
                wait_for(lambda: second.written >= 80, 20, "writes before the pause")
                broker.pause()
                try:
                    paused_at = second.written
                    time.sleep(5)
                    # the relay cannot publish, the outbox keeps what was written meanwhile
                    assert second.written > paused_at, "writes stopped during the broker pause"
                    assert outbox_count(url) > 0
                finally:
                    broker.resume()
                committed |= second.finish()
            finally:
                second.stop_flag.set()
                second.join(45)
            wait_for(lambda: outbox_count(url) == 0, 40,
                     "the relay to drain the outbox after the broker resumed")
        finally:
            stop.set()
            relay_thread.join(40)
        assert not relay_thread.is_alive()
        recs = read_all(broker.bootstrap, f"{topic_prefix}.order", expect=len(committed),
                        timeout_s=30)
    assert_exactly_once_in_order(recs, expected_ids=committed)
    assert relay.stats.published == len(committed)


# -- 5. database connection lost mid-run ---------------------------------------------------------
_RELAY_BACKENDS = ("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pipeline-relay%' "
                   "AND datname = current_database() AND backend_type = 'client backend'")


@pytest.mark.slow
def test_relay_survives_database_connection_loss(database_url: str, kafka_bootstrap: str,
                                                 topic_prefix: str, read_topic):
    settings = make_settings(database_url, kafka_bootstrap, topic_prefix,
                             relay={"batch_size": 200})
    url = _url(settings)
    keys = [f"SO-{i:06d}" for i in range(15)]
    backlog = 6000
    payload = json.dumps(payload_for("order.status_changed", random.Random(5),
                                     aggregate_id="SO-000001", now=dt.datetime.now(dt.UTC)))
    with psycopg.connect(url) as conn:
        install(conn, settings.database.schema_name)
        conn.execute(
            "SELECT count(pipeline.outbox_emit('order', 'SO-' || lpad((i %% 15)::text, 6, '0'), "
            "'order.status_changed', %s::jsonb)) FROM generate_series(1, %s) i",
            (payload, backlog))
        committed = {r[0] for r in conn.execute("SELECT event_id::text FROM pipeline.outbox")}
        conn.commit()
    assert len(committed) == backlog

    relay = Relay(settings)
    stop = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    writer = Writer(url, keys, total=1500, per_txn=15, pause_s=0.03, seed=6)
    killed: set[int] = set()
    try:
        relay_thread.start()
        writer.start()
        with psycopg.connect(url, autocommit=True) as admin:

            def relay_pids() -> set[int]:
                return {r[0] for r in admin.execute(_RELAY_BACKENDS).fetchall()}

            for n in range(3):
                # an outage while the relay is busy: every ~1,200 rows of the backlog
                wait_for(lambda n=n: outbox_count(url) <= backlog - 1200 * (n + 1)
                         or (not writer.is_alive() and outbox_count(url) == 0), 30,
                         "the relay to make progress")
                wait_for(lambda: bool(relay_pids() - killed), 20, "the relay to (re)connect",
                         interval_s=0.02)
                for pid in relay_pids() - killed:
                    if admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() \
                            == (True,):
                        killed.add(pid)
        committed |= writer.finish()
        wait_for(lambda: outbox_count(url) == 0, 40, "the relay to drain the outbox")
    finally:
        writer.stop_flag.set()
        writer.join(45)
        stop.set()
        relay_thread.join(40)
    assert not relay_thread.is_alive()
    assert len(killed) >= 3, f"the relay's backend was terminated only {len(killed)} times"
    recs = read_topic(f"{topic_prefix}.order", expect=len(committed), timeout_s=30)
    assert_exactly_once_in_order(recs, expected_ids=committed)
    assert relay.stats.published + relay.stats.skipped_duplicates == len(committed)
