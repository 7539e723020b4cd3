"""The WAL engine (``relay.engine: wal``) on a real PostgreSQL (wal_level=logical) and broker.

Every scenario ends with the relay guarantee check (every committed event exactly once, each
key's versions 1..n in order on one partition, nothing rolled back), and the engine's own
promise: while it runs, ``outbox_emit`` inserts no row.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.outbox import emit
from pipeline.outbox.engine import current_engine, slot_states, switch_to_poll
from pipeline.relay.relay import Relay
from tests.conftest import make_settings
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


def _wal(settings: Settings, **relay: Any) -> Settings:
    return settings.model_copy(
        update={"relay": settings.relay.model_copy(update={"engine": "wal", **relay})})


def inserted_rows(url: str) -> int:
    """Rows ever inserted into the outbox table (the statistics collector's count)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute(
            "SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = 'pipeline' "
            "AND relname = 'outbox'").fetchone()
    return int(row[0]) if row else 0


def published(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(published), 0) FROM pipeline.relay_state"
                           ).fetchone()
    return int(row[0]) if row else 0


def slot_lag(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return max((s.lag_bytes or 0) for s in slot_states(conn, "pipeline"))


class RunningRelay:
    def __init__(self, settings: Settings, shard: int = 0) -> None:
        self.relay = Relay(settings, shard)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.relay.run(self.stop)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def __enter__(self) -> RunningRelay:
        self.thread.start()
        return self

    def wait_ready(self, timeout_s: float = 30) -> None:
        wait_for(lambda: self.relay.ready.is_set() or self.error is not None, timeout_s,
                 "the WAL relay to start")
        assert self.error is None, self.error

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "relay did not stop"


@pytest.fixture
def wal_settings(installed: Settings) -> Iterator[Settings]:
    yield _wal(installed)


def _emit(conn: Any, agg: str, et: str, payload: Any, eid: str) -> None:
    emit(conn, "order", agg, et, payload, event_id=eid)


# -- 1. messages, not rows -----------------------------------------------------------------------
def test_wal_engine_interleaved_writers_no_rows(wal_settings: Settings, read_topic):
    url = _url(wal_settings)
    with RunningRelay(wal_settings) as running:
        running.wait_ready()
        with psycopg.connect(url, autocommit=True) as conn:
            assert current_engine(conn, "pipeline") == ("wal", False)
        writers = InterleavedWriters(lambda: psycopg.connect(url), _emit)
        writers.run()
        committed = writers.committed
        recs = read_topic(f"{wal_settings.topics.prefix}.order", expect=len(committed),
                          timeout_s=60)
        wait_for(lambda: slot_lag(url) < 64 * 1024, 30, "the slot to be advanced")
    assert_exactly_once_in_order(recs, expected_ids=set(committed),
                                 forbidden_ids=set(writers.rolled_back))
    assert inserted_rows(url) == 0, "the WAL engine inserted outbox rows"
    assert outbox_count(url) == 0
    assert running.relay.stats.published == len(committed)
    with psycopg.connect(url, autocommit=True) as conn:
        (state,) = slot_states(conn, "pipeline")
    assert state.exists and state.shard == 0 and state.shards == 1
    assert state.retained_bytes is not None and state.lag_bytes is not None


# -- 2. switching from polling with rows waiting ------------------------------------------------
def test_rows_written_before_the_switch_come_first_in_order(installed: Settings, read_topic):
    url = _url(installed)
    keys = [f"SO-{i}" for i in range(10)]
    with psycopg.connect(url) as conn:
        for n in range(300):  # rows, while the outbox is polled
            emit(conn, "order", keys[n % 10], "order.status_changed",
                 {"order_id": keys[n % 10], "from_status": "DRAFT", "to_status": "CONFIRMED",
                  "changed_at": "2026-12-02T10:00:00+00:00"})
        conn.commit()
    assert outbox_count(url) == 300
    writer = SteadyWriter(lambda: psycopg.connect(url),
                          lambda c, key, et, p, eid: emit(c, "order", key, et, p, event_id=eid),
                          keys, total=600, per_txn=5, pause_s=0.005, seed=7, deadline_s=60)
    with RunningRelay(_wal(installed, batch_size=50)) as running:
        writer.start()  # writes across the switch: rows first, messages after
        running.wait_ready()
        committed = writer.finish()
        recs = read_topic(f"{installed.topics.prefix}.order", expect=300 + len(committed),
                          timeout_s=60)
        wait_for(lambda: outbox_count(url) == 0, 30, "the table rows to be deleted")
    assert_exactly_once_in_order(recs, expected_per_key=None)
    per_key: dict[str, list[int]] = {}
    for r in recs:
        per_key.setdefault(r.headers["ce_subject"], []).append(
            int(r.headers["erp_aggregate_version"]))
    for key, versions in per_key.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), key
    assert set(committed) <= {r.headers["ce_id"] for r in recs}


# -- 3. kill -9 and restart ----------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_mid_run_then_restart_publishes_exactly_once(installed: Settings, relay_procs,
                                                            read_topic):
    url = _url(installed)
    relay_procs.env["PIPELINE_RELAY__ENGINE"] = "wal"
    relay_procs.env["PIPELINE_RELAY__BATCH_SIZE"] = "500"
    first = relay_procs.start("first")
    wait_for(lambda: slot_exists(url) or first.poll() is not None, 30, "the slot to be made")
    total, keys = 30_000, 200  # 50 per key in each of three transactions
    payload = json.dumps({"order_id": "x", "from_status": "DRAFT", "to_status": "CONFIRMED",
                          "changed_at": "2026-12-02T10:00:00+00:00"})
    with psycopg.connect(url) as conn:
        for _chunk in range(3):
            conn.execute(
                "SELECT count(pipeline.outbox_emit('order', 'SO-' || (i %% %s), "
                "'order.status_changed', %s::jsonb)) FROM generate_series(1, %s) i",
                (keys, payload, total // 3))
            conn.commit()
    assert inserted_rows(url) == 0
    wait_for(lambda: published(url) >= 3000 or first.poll() is not None, 30,
             "the first relay to publish", interval_s=0.01)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    at_kill = published(url)
    assert at_kill < total, "the kill did not land mid-run"
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT wal_carry_lsn FROM pipeline.relay_state").fetchone()
    in_parts = row is not None and row[0] is not None  # killed inside a 10,000-event txn

    second = relay_procs.start("second")
    wait_for(lambda: published(url) >= total - at_kill or second.poll() is not None, 60,
             "the restarted relay to publish the rest", interval_s=0.2)
    recs = read_topic(f"{installed.topics.prefix}.order", expect=total, timeout_s=60)
    assert second.poll() is None, relay_procs.log_of(second)[-3000:]
    assert relay_procs.stop(second) == 0, relay_procs.log_of(second)[-3000:]
    assert_exactly_once_in_order(recs, expected_per_key={f"SO-{i}": total // keys
                                                         for i in range(keys)})
    print(f"killed inside a transaction published in parts: {in_parts}")
    if in_parts:
        assert "resumes a transaction" in relay_procs.log_of(second)


def slot_exists(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return any(s.exists for s in slot_states(conn, "pipeline"))


# -- 4. standby takes over -----------------------------------------------------------------------
@pytest.mark.slow
def test_standby_takes_over_when_leader_is_killed(installed: Settings, relay_procs, read_topic):
    url = _url(installed)
    host = socket.gethostname()
    relay_procs.env["PIPELINE_RELAY__ENGINE"] = "wal"
    a = relay_procs.start("a")
    wait_for(lambda: (relay_leader(url) == f"{host}:{a.pid}" and slot_exists(url))
             or a.poll() is not None, 30, "relay A to lead")
    assert a.poll() is None, relay_procs.log_of(a)[-3000:]
    b = relay_procs.start("b")
    wait_for(lambda: "standby" in relay_procs.log_of(b) or b.poll() is not None, 20,
             "relay B to report standby")
    keys = [f"SO-{i:06d}" for i in range(20)]
    writer = SteadyWriter(lambda: psycopg.connect(url),
                          lambda c, key, et, p, eid: emit(c, "order", key, et, p, event_id=eid),
                          keys, total=2000, per_txn=20, pause_s=0.06, seed=3, deadline_s=60)
    writer.start()
    try:
        wait_for(lambda: writer.written >= 600, 30, "600 events written")
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        assert writer.written < writer.total, "the kill did not land mid-stream"
        wait_for(lambda: relay_leader(url) == f"{host}:{b.pid}", 15, "relay B to take over")
        committed = writer.finish()
    finally:
        writer.stop_flag.set()
        writer.join(45)
    recs = read_topic(f"{installed.topics.prefix}.order", expect=len(committed), timeout_s=60)
    assert b.poll() is None, relay_procs.log_of(b)[-3000:]
    assert relay_procs.stop(b) == 0, relay_procs.log_of(b)[-3000:]
    assert_exactly_once_in_order(recs, expected_ids=committed)
    assert inserted_rows(url) == 0


# -- 5. two shards -------------------------------------------------------------------------------
def test_two_shards_each_read_their_own_slot(installed: Settings, read_topic):
    url = _url(installed)
    settings = _wal(installed, shards=2)
    with RunningRelay(settings, 0) as r0, RunningRelay(settings, 1) as r1:
        r0.wait_ready()
        r1.wait_ready()
        writers = InterleavedWriters(lambda: psycopg.connect(url), _emit)
        writers.run()
        recs = read_topic(f"{installed.topics.prefix}.order", expect=len(writers.committed),
                          timeout_s=60)
    assert_exactly_once_in_order(recs, expected_ids=set(writers.committed))
    assert r0.relay.stats.published > 0 and r1.relay.stats.published > 0
    assert r0.relay.stats.published + r1.relay.stats.published == len(writers.committed)
    with psycopg.connect(url, autocommit=True) as conn:
        assert [(s.shard, s.shards) for s in slot_states(conn, "pipeline")] == [(0, 2), (1, 2)]
    assert inserted_rows(url) == 0


# -- 6. the engines do not mix -------------------------------------------------------------------
def test_polling_relay_refuses_an_outbox_written_for_the_wal_engine(wal_settings: Settings):
    with RunningRelay(wal_settings) as running:
        running.wait_ready()
    with pytest.raises(ConfigError) as err:
        Relay(wal_settings.model_copy(update={"relay": wal_settings.relay.model_copy(
            update={"engine": "poll"})})).run(threading.Event())
    msg = str(err.value)
    assert "WAL engine" in msg and "relay.engine: wal" in msg and "outbox engine poll" in msg


# -- 7. idle slots keep up ------------------------------------------------------------------------
def test_an_idle_slot_advances_while_other_tables_are_written(wal_settings: Settings):
    url = _url(wal_settings)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE erp_noise (id bigserial PRIMARY KEY, v text)")
    with RunningRelay(wal_settings) as running:
        running.wait_ready()
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(40):  # ~4 MB of WAL the outbox has no part in
                conn.execute("INSERT INTO erp_noise (v) SELECT repeat('x', 1000) "
                             "FROM generate_series(1, 100)")
                time.sleep(0.05)
        wait_for(lambda: slot_lag(url) < 256 * 1024, 20,
                 "the idle slot to follow the WAL (heartbeat messages)")


# -- 8. back to polling --------------------------------------------------------------------------
def test_switch_back_to_polling_drains_then_drops_the_slots(wal_settings: Settings, read_topic):
    url = _url(wal_settings)
    keys = [f"SO-{i}" for i in range(5)]
    with RunningRelay(wal_settings) as running:
        running.wait_ready()
        with psycopg.connect(url) as conn:
            for n in range(100):
                emit(conn, "order", keys[n % 5], "order.status_changed",
                     {"order_id": "x", "from_status": "DRAFT", "to_status": "CONFIRMED",
                      "changed_at": "2026-12-02T10:00:00+00:00"})
            conn.commit()
        with psycopg.connect(url, autocommit=True) as conn:
            held = switch_to_poll(conn, "pipeline", wait_s=30)
            assert held == {}
            assert slot_states(conn, "pipeline") == []
            assert current_engine(conn, "pipeline") == ("poll", True)
        with psycopg.connect(url) as conn:  # rows again
            for n in range(10):
                emit(conn, "order", keys[n % 5], "order.status_changed",
                     {"order_id": "x", "from_status": "DRAFT", "to_status": "CONFIRMED",
                      "changed_at": "2026-12-02T10:00:00+00:00"})
            conn.commit()
        assert outbox_count(url) == 10
    assert inserted_rows(url) == 10
    poll = wal_settings.model_copy(update={"relay": wal_settings.relay.model_copy(
        update={"engine": "poll"})})
    with RunningRelay(poll) as running:
        running.wait_ready()
        recs = read_topic(f"{wal_settings.topics.prefix}.order", expect=110, timeout_s=60)
    assert_exactly_once_in_order(recs)
    # the WAL relay does not switch back by itself
    with pytest.raises(ConfigError, match="switched to polling"):
        Relay(wal_settings).run(threading.Event())


# -- 9. bad configuration ------------------------------------------------------------------------
def test_a_role_without_replication_gets_the_grant_it_needs(installed: Settings, topic_prefix):
    url = _url(installed)
    role = f"erp_{topic_prefix}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' NOREPLICATION")
        conn.execute(f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {role}")
        conn.execute(f"GRANT ALL ON SCHEMA pipeline TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA pipeline TO {role}")
        conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA pipeline TO {role}")
        conn.execute(f"ALTER TABLE pipeline.outbox OWNER TO {role}")
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    params.update(user=role, password="pw")
    settings = make_settings(make_conninfo("", **params), str(installed.kafka.bootstrap_servers),
                             installed.topics.prefix, relay={"engine": "wal"})
    try:
        with pytest.raises(ConfigError) as err:
            Relay(settings).run(threading.Event())
        assert "REPLICATION" in str(err.value) and "relay.engine: poll" in str(err.value)
        with psycopg.connect(url, autocommit=True) as conn:  # nothing switched
            assert current_engine(conn, "pipeline") == ("poll", False)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE pipeline.outbox OWNER TO CURRENT_USER")
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


# -- 10. the CLI ---------------------------------------------------------------------------------
def test_engine_cli_switches_shows_slots_and_refuses_to_lose_events(installed: Settings):
    from click.testing import CliRunner

    from pipeline.cli import main

    url = _url(installed)
    env = {"PIPELINE_DATABASE__URL": url, "PIPELINE_RELAY__SHARDS": "2"}

    def cli(*args: str) -> Any:
        return CliRunner().invoke(main, ["--config", os.devnull, "outbox", *args], env=env,
                                  catch_exceptions=False)

    r = cli("engine")
    assert r.exit_code == 0 and "engine poll" in r.output and "wal slot" not in r.output
    r = cli("engine", "wal")
    assert r.exit_code == 0, r.output
    assert "engine wal" in r.output
    assert r.output.count("wal slot ") == 2 and "(shard 1/2)" in r.output
    with psycopg.connect(url) as conn:  # messages now, which no relay reads
        emit(conn, "order", "SO-1", "order.status_changed",
             {"order_id": "x", "from_status": "DRAFT", "to_status": "CONFIRMED",
              "changed_at": "2026-12-02T10:00:00+00:00"})
        conn.commit()
    assert outbox_count(url) == 0
    r = cli("status")
    assert r.exit_code == 0 and "engine            wal" in r.output
    assert "retained" in r.output and "lag" in r.output
    r = cli("engine", "poll", "--wait", "1")
    assert r.exit_code == 1
    assert "still hold events" in r.output and ": 1" in r.output and "--force" in r.output
    assert "_0of2: 1" in r.output or "_1of2: 1" in r.output  # the shard of SO-1 alone
    with psycopg.connect(url, autocommit=True) as conn:  # rows already, the slots kept
        assert current_engine(conn, "pipeline") == ("poll", True)
        assert len(slot_states(conn, "pipeline")) == 2
    r = cli("engine", "poll", "--wait", "0", "--force")
    assert r.exit_code == 0, r.output
    assert "1 lost" in r.output and "engine poll" in r.output
    with psycopg.connect(url, autocommit=True) as conn:
        assert slot_states(conn, "pipeline") == []


def test_switch_back_waits_for_a_transaction_that_wrote_a_message(wal_settings: Settings,
                                                                   read_topic):
    """A transaction that wrote its event as a message before the switch and commits after it:
    the slots are kept until it ended and its relay confirmed past it."""
    url = _url(wal_settings)
    with RunningRelay(wal_settings) as running:
        running.wait_ready()
        open_txn = psycopg.connect(url)
        emit(open_txn, "order", "SO-late", "order.status_changed",
             {"order_id": "x", "from_status": "DRAFT", "to_status": "CONFIRMED",
              "changed_at": "2026-12-02T10:00:00+00:00"})
        with psycopg.connect(url, autocommit=True) as conn:
            held = switch_to_poll(conn, "pipeline", wait_s=1)
            assert list(held) and "open since before the switch" in next(iter(held)), held
            assert len(slot_states(conn, "pipeline")) == 1  # kept
        open_txn.commit()  # the message lands in the slot now
        open_txn.close()
        with psycopg.connect(url, autocommit=True) as conn:
            assert switch_to_poll(conn, "pipeline", wait_s=30) == {}
            assert slot_states(conn, "pipeline") == []
        (rec,) = read_topic(f"{wal_settings.topics.prefix}.order", expect=1, timeout_s=30)
    assert rec.headers["ce_subject"] == "SO-late"
    assert inserted_rows(url) == 0
