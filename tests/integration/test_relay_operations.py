"""Operating the relay: dependencies missing at start, sharding, and `pipeline up`."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.embedded.broker import EmbeddedBroker, free_port
from pipeline.embedded.postgres import drop_database, with_database
from pipeline.outbox import emit
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.simulator.payloads import payload_for
from tests.conftest import make_settings
from tests.fixtures.kafka import read_all
from tests.fixtures.relay import _url, assert_exactly_once_in_order, outbox_count, wait_for

pytestmark = pytest.mark.integration


def _emit_orders(url: str, n: int, keys: int = 10) -> set[str]:
    rng = random.Random(3)
    ids = set()
    with psycopg.connect(url) as conn:
        for i in range(n):
            key = f"SO-{i % keys:05d}"
            payload = payload_for("order.created", rng, aggregate_id=key,
                                  now=dt.datetime.now(dt.UTC))
            eid = f"00000000-0000-4000-8000-{i:012d}"
            emit(conn, "order", key, "order.created", payload, event_id=eid)
            ids.add(eid)
        conn.commit()
    return ids


def _run_relay(relay: Relay) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    t.start()
    return t, stop


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP")),
                    reason="needs a broker process this test starts late")
def test_broker_unreachable_at_start_relay_waits_then_publishes(installed: Settings, caplog):
    port = free_port()
    s = make_settings(_url(installed), f"127.0.0.1:{port}", installed.topics.prefix,
                      kafka={"request_timeout_s": 1.0})
    ids = _emit_orders(_url(s), 50)
    relay = Relay(s)
    t, stop = _run_relay(relay)
    try:
        with caplog.at_level("WARNING", logger="pipeline.relay"):
            wait_for(lambda: "waiting for a dependency" in caplog.text, 30,
                     "the relay to say what it waits for")
        assert outbox_count(_url(s)) == 50  # nothing lost while the broker is away
        with EmbeddedBroker(port=port) as broker:
            wait_for(lambda: outbox_count(_url(s)) == 0, 40, "the outbox to drain")
            recs = read_all(broker.bootstrap, f"{s.topics.prefix}.order", expect=50)
            assert_exactly_once_in_order(recs, expected_ids=ids)
            stop.set()
            t.join(30)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()


def test_database_missing_at_start_relay_waits_then_publishes(pg_admin_url: str,
                                                              kafka_bootstrap: str,
                                                              topic_prefix: str, caplog):
    name = f"pipeline_late_{topic_prefix}"
    url = with_database(pg_admin_url, name)
    s = make_settings(url, kafka_bootstrap, topic_prefix)
    relay = Relay(s)
    t, stop = _run_relay(relay)
    try:
        with caplog.at_level("WARNING", logger="pipeline.relay"):
            wait_for(lambda: "cannot connect to PostgreSQL" in caplog.text, 30,
                     "the relay to report the missing database")
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(url, autocommit=True) as conn:
            install(conn, "pipeline")
        ids = _emit_orders(url, 30)
        wait_for(lambda: outbox_count(url) == 0, 40, "the outbox to drain")
        recs = read_all(kafka_bootstrap, f"{topic_prefix}.order", expect=30)
        assert_exactly_once_in_order(recs, expected_ids=ids)
    finally:
        stop.set()
        t.join(30)
        drop_database(pg_admin_url, name)
    assert not t.is_alive()


def test_two_shards_split_aggregates_each_with_its_leader(database_url: str,
                                                          kafka_bootstrap: str,
                                                          topic_prefix: str):
    s = make_settings(database_url, kafka_bootstrap, topic_prefix, relay={"shards": 2})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    ids = _emit_orders(database_url, 400, keys=40)
    relays = [Relay(s, shard=k) for k in (0, 1)]
    runs = [_run_relay(r) for r in relays]
    try:
        wait_for(lambda: outbox_count(database_url) == 0, 40, "both shards to drain")
    finally:
        for t, stop in runs:
            stop.set()
            t.join(30)
    published = [r.stats.published for r in relays]
    assert sum(published) == 400
    assert all(p > 0 for p in published), f"one shard did all the work: {published}"
    recs = read_all(kafka_bootstrap, f"{topic_prefix}.order", expect=400)
    assert_exactly_once_in_order(recs, expected_ids=ids)
    with psycopg.connect(database_url) as conn:
        shards = conn.execute("SELECT shard, published FROM pipeline.relay_state ORDER BY shard"
                              ).fetchall()
    assert [row[0] for row in shards] == [0, 1]
    assert sum(row[1] for row in shards) == 400


def test_shard_out_of_range_is_refused(settings: Settings):
    with pytest.raises(ValueError, match=r"shard 3 is out of range: relay\.shards is 1"):
        Relay(settings, shard=3)


def _up(tmp_path: Path, env_extra: dict[str, str], *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "up", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _verdict(out: str) -> dict[str, str]:
    return dict(re.findall(r"^  ([a-z][A-Za-z ()]+?)\s{2,}(\S+)$", out, re.M))


@pytest.mark.slow
def test_pipeline_up_runs_embedded_and_reports_a_clean_verdict(tmp_path: Path,
                                                                kafka_bootstrap: str):
    # Broker: the session's (or KAFKA_BOOTSTRAP); database: embedded/local, chosen by `up`.
    proc = _up(tmp_path, {"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
                          "PIPELINE_TOPICS__PREFIX": f"up{os.getpid()}"},
               "--duration", "8", "--rate", "300")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    v = _verdict(out)
    written = int(v["events written (committed)"])
    assert written > 500, out
    assert v["lost"] == "0" and v["duplicates in Kafka"] == "0", out
    assert v["order violations"] == "0", out
    assert int(v["in Kafka"]) == written, out
    # the three workers against the reference servers and the BI tables
    for target in ("wms", "crm"):
        assert v[f"{target} lost"] == "0" and v[f"{target} applied twice"] == "0", out
        assert v[f"{target} order violations"] == "0", out
        assert int(v[f"{target} applied"]) > 0, out
        handled = sum(int(v[f"{target} {k}"]) for k in ("applied", "skipped", "dead lettered"))
        assert handled >= written, out
    assert v["bi lost"] == "0" and v["bi landed twice"] == "0", out
    assert int(v["bi landed"]) + int(v["bi dead lettered"]) == written, out
    # the injected failures were exercised: retries (WMS 503s, early events) and the DLQ
    # (the reference CRM's seeded 422s: its first is its 345th request)
    assert int(v["wms retried"]) + int(v["crm retried"]) > 0, out
    assert int(v["wms dead lettered"]) + int(v["crm dead lettered"]) > 0, out
    assert "verdict: OK" in out


@pytest.mark.slow
def test_pipeline_up_stops_cleanly_on_sigint(tmp_path: Path, kafka_bootstrap: str):
    proc = _up(tmp_path, {"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
                          "PIPELINE_TOPICS__PREFIX": f"upsig{os.getpid()}"}, "--rate", "200")
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "published" in line and "written" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=150)
    out = seen + out
    assert proc.returncode == 0, out
    assert "verdict: OK" in out, out


@pytest.mark.slow
def test_pipeline_up_runs_a_subset_of_components(tmp_path: Path, kafka_bootstrap: str):
    proc = _up(tmp_path, {"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
                          "PIPELINE_TOPICS__PREFIX": f"upsub{os.getpid()}"},
               "--components", "simulator,relay,bi", "--duration", "4", "--rate", "200")
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    v = _verdict(out)
    assert "wms applied" not in v and "crm applied" not in v, out
    assert v["bi lost"] == "0" and int(v["bi landed"]) == int(v["events written (committed)"])


def test_pipeline_up_names_every_unreachable_dependency(tmp_path: Path):
    from pipeline.embedded.broker import free_port

    proc = _up(tmp_path, {"PIPELINE_DATABASE__URL": "postgresql://postgres@127.0.0.1:1/erp",
                          "PIPELINE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
               "--duration", "1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert any("database postgresql://postgres@127.0.0.1:1/erp unreachable" in e
               for e in errors), out
    assert any("Kafka at 127.0.0.1:" in e and "unreachable" in e for e in errors), out
    assert "verdict" not in out
    r = subprocess.run([sys.executable, "-m", "pipeline", "up", "--components", "relay,nope"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")})
    assert r.returncode == 2 and "--components: unknown nope" in r.stderr


def test_read_back_reaches_back_to_the_previous_leaders_last_activity(settings: Settings):
    """A count window alone misses a dead leader's records once other shards wrote after them;
    the time bound (its last heartbeat) still finds them."""
    from confluent_kafka import Producer

    from pipeline.relay.relay import read_back_positions

    topic = f"{settings.topics.prefix}.order"
    p = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    dead_leader_seen = int(time.time() * 1000)
    for pos in range(1, 101):  # the dead leader's unconfirmed records, then other shards' ones
        src = b"/erp/outbox" if pos <= 20 else b"/other/shard"
        p.produce(topic, b"v", b"K", partition=0,
                  headers=[("erp_outbox_position", str(pos).encode()), ("ce_source", src),
                           ("ce_id", f"event-{pos}".encode())])
        assert p.flush(10) == 0  # one record per batch: offsets count records on any broker
    window_only = read_back_positions(settings, [topic], 10, "/erp/outbox", timeout_s=10)
    assert window_only == set(), "the count window cannot see them any more"
    with_time = read_back_positions(settings, [topic], 10, "/erp/outbox", timeout_s=10,
                                    since_ms=dead_leader_seen - 30_000)
    assert with_time == {(pos, f"event-{pos}") for pos in range(1, 21)}


def test_two_outboxes_with_the_same_source_do_not_take_each_others_records(
        installed: Settings, read_topic):
    """Positions are unique per outbox only. Two outboxes (here two schemas; two ERP
    databases alike) left with the same relay.source write into the same topics: the second
    relay's read-back sees the first one's positions 1..N, and must not take its own unpublished
    rows 1..N for published ones (their event ids differ)."""
    url = _url(installed)
    with psycopg.connect(url, autocommit=True) as conn:
        install(conn, "pipeline_b")
    other = installed.model_copy(update={"database": installed.database.model_copy(
        update={"schema_name": "pipeline_b"})})
    status = {"order_id": "x", "from_status": "DRAFT", "to_status": "CONFIRMED",
              "changed_at": "2026-12-02T10:00:00+00:00"}
    for s, prefix in ((installed, "A"), (other, "B")):
        with psycopg.connect(url) as conn:
            for i in range(50):
                emit(conn, "order", f"{prefix}-{i % 5}", "order.status_changed", status,
                     schema=s.database.schema_name)
            conn.commit()
        relay = Relay(s)
        stop = threading.Event()
        t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        t.start()
        wait_for(lambda s=s: _count(url, s.database.schema_name) == 0, 30,
                 f"relay {prefix} to drain its outbox")
        stop.set()
        t.join(30)
        assert relay.stats.skipped_duplicates == 0, prefix
    recs = read_topic(f"{installed.topics.prefix}.order", expect=100, timeout_s=30)
    assert_exactly_once_in_order([r for r in recs if r.key and r.key.startswith(b"A")])
    assert len({r.headers["ce_id"] for r in recs}) == 100


def _count(url: str, schema: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {schema}.outbox").fetchone()
    return int(row[0]) if row else 0
