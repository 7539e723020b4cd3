"""The relay's guarantees with MariaDB as the ERP database (ERPNext's default), on a real
``mariadbd`` and a real broker: the same checks as ``test_relay_guarantees`` — every committed
event exactly once (by ``ce_id`` and outbox position), each key on one partition with versions
1..n in order, nothing rolled back — under interleaved writers with late commits and rollbacks,
``kill -9`` mid-run, a leader killed with a standby waiting, and the relay's connection killed.
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
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline import mariadb
from pipeline.outbox import mariadb as outbox
from pipeline.relay.relay import Relay
from pipeline.simulator.payloads import payload_for
from tests.fixtures.mariadb import MariaDbErp
from tests.fixtures.relay import (
    InterleavedWriters,
    RelayProcs,
    SteadyWriter,
    assert_exactly_once_in_order,
    wait_for,
)

pytestmark = pytest.mark.integration



def _emit_backlog(maria: MariaDbErp, total: int, keys: int) -> set[str]:
    """``total`` order.created events over ``keys`` aggregates, written by the procedure in
    one transaction (as an ERP's bulk job would)."""
    rng = random.Random(3)
    ids: set[str] = set()
    with maria.admin(autocommit=False) as c, c.cursor() as cur:
        for i in range(total):
            key = f"SO-{i % keys}"
            eid = str(uuid.uuid4())
            outbox.emit(c, "order", key, "order.created",
                        payload_for("order.created", rng, aggregate_id=key,
                                    now=dt.datetime.now(dt.UTC)),
                        event_id=eid, schema=maria.schema)
            ids.add(eid)
        c.commit()
        cur.execute("SELECT 1")
    return ids


def Writer(maria: MariaDbErp, keys: list[str], total: int, per_txn: int,
           pause_s: float, seed: int) -> SteadyWriter:
    """A steady writer through ``CALL outbox_emit`` on MariaDB."""
    return SteadyWriter(
        lambda: maria.admin(autocommit=False),
        lambda conn, key, et, payload, eid: outbox.emit(conn, "order", key, et, payload,
                                                        event_id=eid, schema=maria.schema),
        keys, total, per_txn, pause_s, seed)


def _procs(maria: MariaDbErp, kafka_bootstrap: str, prefix: str, tmp_path: Path,
           **env: str) -> RelayProcs:
    work = tmp_path / "relay-cwd"
    work.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    base.update({
        "PIPELINE_DATABASE__URL": maria.url,
        "PIPELINE_DATABASE__SCHEMA_NAME": maria.schema,
        "PIPELINE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "PIPELINE_TOPICS__PREFIX": prefix,
        "PIPELINE_TOPICS__PARTITIONS": "3",
        "PIPELINE_RELAY__POLL_INTERVAL_S": "0.2",
        "PIPELINE_RELAY__LOCK_RETRY_S": "0.2",
        "PIPELINE_LOG__FORMAT": "json",
        **env,
    })
    return RelayProcs(work, base)


# -- 1. interleaved writers, late commits, rollbacks ------------------------------------------
def test_interleaved_writers_late_commits_and_rollbacks(maria: MariaDbErp, kafka_bootstrap: str,
                                                        topic_prefix: str, read_topic: Any):
    maria.install()
    settings = maria.settings(kafka_bootstrap, topic_prefix)
    writers = InterleavedWriters(
        lambda: maria.admin(autocommit=False),
        lambda conn, agg, et, payload, eid: outbox.emit(conn, "order", agg, et, payload,
                                                        event_id=eid, schema=maria.schema))
    relay = Relay(settings)
    stop = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    relay_thread.start()
    try:
        writers.run()
        wait_for(lambda: maria.outbox_count() == 0, 30, "the relay to drain the outbox")
    finally:
        stop.set()
        relay_thread.join(30)
    assert not relay_thread.is_alive()
    committed, rolled_back = writers.committed, writers.rolled_back

    recs = read_topic(f"{topic_prefix}.order", expect=len(committed), timeout_s=30)
    assert_exactly_once_in_order(recs, expected_ids=set(committed),
                                 forbidden_ids=set(rolled_back))
    assert relay.stats.published == len(committed)
    with maria.admin() as c, c.cursor() as cur:
        cur.execute(f"SELECT aggregate_id, version FROM {maria.schema}.aggregate_versions")
        counters = {str(k): int(v) for k, v in cur.fetchall()}
    assert counters == dict(collections.Counter(r.key.decode() for r in recs if r.key))


# -- 2. kill -9 mid-run, then a restart --------------------------------------------------------
@pytest.mark.slow
def test_kill_9_mid_run_then_restart_publishes_exactly_once(
        maria: MariaDbErp, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        read_topic: Any):
    maria.install()
    total, keys = 8000, 200
    ids = _emit_backlog(maria, total, keys)
    procs = _procs(maria, kafka_bootstrap, topic_prefix, tmp_path,
                   PIPELINE_RELAY__BATCH_SIZE="200")
    try:
        first = procs.start("first")
        deadline = time.monotonic() + 40
        while maria.outbox_count() > total - 1500:
            assert first.poll() is None, "relay died:\n" + procs.log_of(first)[-3000:]
            assert time.monotonic() < deadline, "relay did not publish in 40s:\n" + \
                procs.log_of(first)[-3000:]
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        assert 0 < maria.outbox_count() < total, "the kill did not land mid-run"
        second = procs.start("second")
        wait_for(lambda: maria.outbox_count() == 0 or second.poll() is not None, 60,
                 "the restarted relay to drain the outbox", interval_s=0.2)
        assert second.poll() is None, procs.log_of(second)[-3000:]
        assert procs.stop(second) == 0, procs.log_of(second)[-3000:]
    finally:
        procs.close()
    recs = read_topic(f"{topic_prefix}.order", expect=total, timeout_s=60)
    assert_exactly_once_in_order(recs, expected_ids=ids,
                                 expected_per_key={f"SO-{i}": total // keys for i in range(keys)})


# -- 3. the leader killed, the standby takes over (GET_LOCK) -----------------------------------
@pytest.mark.slow
def test_standby_takes_over_when_leader_is_killed(maria: MariaDbErp, kafka_bootstrap: str,
                                                  topic_prefix: str, tmp_path: Path,
                                                  read_topic: Any):
    maria.install()
    host = socket.gethostname()
    procs = _procs(maria, kafka_bootstrap, topic_prefix, tmp_path)
    writer = Writer(maria, [f"SO-{i:06d}" for i in range(20)], total=1500, per_txn=15,
                    pause_s=0.05, seed=3)
    try:
        a = procs.start("a")
        wait_for(lambda: maria.leader() == f"{host}:{a.pid}" or a.poll() is not None, 30,
                 "relay A to lead")
        assert a.poll() is None, procs.log_of(a)[-3000:]
        b = procs.start("b")
        wait_for(lambda: "standby" in procs.log_of(b) or b.poll() is not None, 30,
                 "relay B to report standby")
        assert b.poll() is None, procs.log_of(b)[-3000:]
        writer.start()
        wait_for(lambda: writer.written >= 450, 40, "450 events written")
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        assert writer.written < writer.total, "the kill did not land mid-stream"
        took = wait_for(lambda: maria.leader() == f"{host}:{b.pid}", 15, "relay B to take over")
        committed = writer.finish()
        wait_for(lambda: maria.outbox_count() == 0, 30, "relay B to drain the outbox")
        assert took < 15
        assert procs.stop(b) == 0, procs.log_of(b)[-3000:]
    finally:
        writer.stop_flag.set()
        writer.join(60)
        procs.close()
    recs = read_topic(f"{topic_prefix}.order", expect=len(committed), timeout_s=30)
    assert_exactly_once_in_order(recs, expected_ids=committed)


# -- 4. the relay's connection killed mid-run --------------------------------------------------
@pytest.mark.slow
def test_relay_survives_its_connection_being_killed(maria: MariaDbErp, kafka_bootstrap: str,
                                                    topic_prefix: str, read_topic: Any):
    maria.install()
    settings = maria.settings(kafka_bootstrap, topic_prefix, relay={"batch_size": 200})
    committed = _emit_backlog(maria, 5000, 15)
    relay = Relay(settings)
    stop = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    writer = Writer(maria, [f"SO-{i}" for i in range(15)], total=1000, per_txn=10,
                    pause_s=0.03, seed=6)
    killed: set[int] = set()
    lock_name = f"{maria.schema}:relay:0/1"
    try:
        relay_thread.start()
        writer.start()
        with maria.admin() as admin, admin.cursor() as cur:
            for n in range(3):
                wait_for(lambda n=n: maria.outbox_count() <= 5000 - 1000 * (n + 1)
                         or (not writer.is_alive() and maria.outbox_count() == 0), 40,
                         "the relay to make progress")

                def holder() -> int | None:
                    cur.execute("SELECT IS_USED_LOCK(%s)", (lock_name,))
                    got = cur.fetchone()[0]
                    return None if got is None or got in killed else int(got)

                wait_for(lambda: holder() is not None, 30, "the relay to (re)connect and lead",
                         interval_s=0.02)
                pid = holder()
                assert pid is not None
                cur.execute(f"KILL CONNECTION {pid}")
                killed.add(pid)
        committed |= writer.finish()
        wait_for(lambda: maria.outbox_count() == 0, 60, "the relay to drain the outbox")
    finally:
        writer.stop_flag.set()
        writer.join(60)
        stop.set()
        relay_thread.join(40)
    assert not relay_thread.is_alive()
    assert len(killed) == 3
    recs = read_topic(f"{topic_prefix}.order", expect=len(committed), timeout_s=30)
    assert_exactly_once_in_order(recs, expected_ids=committed)
    assert relay.stats.published + relay.stats.skipped_duplicates == len(committed)


# -- bad input: the ERP's write fails with the reason, and nothing is half-written -------------
def test_outbox_emit_refuses_bad_events_with_the_reason(maria: MariaDbErp) -> None:
    maria.install()
    cases = [
        (("order", "", "order.created", "{}"), "aggregate_id is empty (event type order.created)"),
        (("order", "SO-1", "order.created", "{not json"), "payload is null or not JSON"),
        (("bad type!", "SO-1", "order.created", "{}"), "outbox_aggregate_type_ok"),
    ]
    with maria.admin(autocommit=False) as c, c.cursor() as cur:
        for args, message in cases:
            with pytest.raises(mariadb.Error) as err:
                cur.execute(f"CALL {maria.schema}.outbox_emit(%s, %s, %s, %s, NULL, NULL, NULL)",
                            args)
            assert message in str(err.value), err.value
            c.rollback()
        with pytest.raises(mariadb.Error) as err:
            cur.execute(f"CALL {maria.schema}.outbox_emit('order', 'SO-1', 'order.created', "
                        "'{}', NULL, NULL, x'0000')")
        assert "encoded is not Avro single-object encoding" in str(err.value)
        c.rollback()
    assert maria.outbox_count() == 0
    assert maria.scalar(f"SELECT count(*) FROM {maria.schema}.aggregate_versions") == 0


def test_payload_numbers_are_kept_exact(maria: MariaDbErp) -> None:
    maria.install()
    text = json.dumps({"total": 0.1}).replace("0.1", "12345678901234567890.123456789")
    with maria.admin() as c, c.cursor() as cur:
        cur.execute(f"CALL {maria.schema}.outbox_emit('order', 'SO-1', 'thing.happened', %s, "
                    "NULL, NULL, NULL)", (text,))
        cur.execute(f"SELECT payload FROM {maria.schema}.outbox")
        assert cur.fetchone()[0] == text


# -- 5. two shards, each with a leader and a standby, while the ERP writes ---------------------
@pytest.mark.slow
def test_two_shards_with_standbys_split_the_load_exactly_once(
        maria: MariaDbErp, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        read_topic: Any):
    maria.install()
    backlog = _emit_backlog(maria, 3000, 60)
    procs = _procs(maria, kafka_bootstrap, topic_prefix, tmp_path, PIPELINE_RELAY__SHARDS="2",
                   PIPELINE_RELAY__BATCH_SIZE="300")
    writer = Writer(maria, [f"SO-{i}" for i in range(60)], total=1200, per_txn=12,
                    pause_s=0.02, seed=9)
    started = []
    try:
        for shard in (0, 1, 0, 1):  # a leader and a standby per shard
            started.append(procs.start_args(f"s{shard}", ["--shard", str(shard)]))
        writer.start()
        committed = writer.finish() | backlog
        wait_for(lambda: maria.outbox_count() == 0, 60, "both shards to drain the outbox",
                 on_timeout=lambda: "\n".join(procs.log_of(p)[-1500:] for p in started))
        leaders = maria.scalar(f"SELECT count(DISTINCT leader) FROM {maria.schema}.relay_state")
        assert leaders == 2, "each shard has its own leader"
        for p in started:
            assert p.poll() is None, procs.log_of(p)[-3000:]
            assert procs.stop(p) == 0, procs.log_of(p)[-3000:]
    finally:
        writer.stop_flag.set()
        writer.join(60)
        procs.close()
    recs = read_topic(f"{topic_prefix}.order", expect=len(committed), timeout_s=60)
    assert_exactly_once_in_order(recs, expected_ids=committed)
