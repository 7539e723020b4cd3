"""The BI worker landing into PostgreSQL on a real broker: typed tables and the raw table,
exactly once across restarts, crashes, rebalances and database outages; bad records
dead-lettered; a schema that gains a field adds the column."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from connectors.bi.postgres import PostgresTarget
from pipeline.config import Settings
from pipeline.kafka import names
from pipeline.schemas.catalogue import Catalogue, default_catalogue_path
from pipeline.sink.runtime import SinkWorker
from tests.conftest import make_settings
from tests.fixtures.connectors import make_events, publish, publish_raw
from tests.fixtures.relay import _url, wait_for
from tests.fixtures.sink import Running, cli, start_worker

pytestmark = pytest.mark.integration


def bi_settings(database_url: str, bootstrap: str, prefix: str, **worker: Any) -> Settings:
    cfg = {"connector": "connectors.bi.postgres:PostgresTarget",
           "options": {"schema": f"bi_{prefix}"}, "batch_size": 300, "batch_max_wait_s": 0.2,
           "session_timeout_ms": 6000, "shutdown_grace_s": 10, **worker}
    return make_settings(database_url, bootstrap, prefix,
                         topics={"aggregate_types": ["order"], "partitions": 3},
                         workers={"bi": cfg})


def _sink(s: Settings) -> SinkWorker:
    return SinkWorker(s, "bi")


def _q(s: Settings, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(_url(s)) as conn:
        return conn.execute(query.replace("BI.", f'"bi_{s.topics.prefix}".'), args).fetchall()


def _count(s: Settings, table: str = "events") -> int:
    try:
        return int(_q(s, f"SELECT count(*) FROM BI.{table}")[0][0])
    except psycopg.errors.UndefinedTable:
        return 0


def _assert_exactly_once(s: Settings, event_ids: set[str]) -> None:
    rows = _q(s, "SELECT event_id, count(*) FROM BI.events GROUP BY event_id")
    dupes = {e: n for e, n in rows if n > 1}
    assert not dupes, f"landed twice: {list(dupes)[:5]}"
    landed = {e for e, _n in rows}
    assert landed == event_ids, (f"missing {len(event_ids - landed)}, "
                                 f"unexpected {len(landed - event_ids)}")


@pytest.mark.tansu_smoke
def test_every_event_lands_typed_and_raw_exactly_once_across_restarts(
        database_url, kafka_bootstrap, topic_prefix):
    s = bi_settings(database_url, kafka_bootstrap, topic_prefix)
    rows = (make_events([f"SO-{i}" for i in range(20)], 5, "order.created", seed=1)
            + make_events([f"SO-{i}" for i in range(20)], 2, "invoice.issued", seed=2)
            + make_events([f"SO-{i}" for i in range(10)], 1, "payment.completed", seed=3))
    bootstrap = str(s.kafka.bootstrap_servers)
    assert len(rows) == 150
    publish(bootstrap, s.topics.prefix, rows[:90])
    with Running(_sink(s)) as run:
        wait_for(lambda: _count(s) == 90, 60, "the first 90 events landed")
        stats = run.sink.stats
    assert stats.landed == 90 and stats.dead_lettered_total == 0
    publish(bootstrap, s.topics.prefix, rows[90:])
    with Running(_sink(s)):  # a restart continues from the stored positions
        wait_for(lambda: _count(s) == len(rows), 60, "every event landed")
        time.sleep(1.0)  # nothing more arrives
    _assert_exactly_once(s, {r.event_id for r in rows})

    # typed columns, values as the ERP wrote them
    created = {r.event_id: r for r in rows if r.event_type == "order.created"}
    typed = _q(s, "SELECT _event_id, _aggregate_id, _aggregate_version, order_id, total, "
                  "currency, created_at, lines, note, _topic, _offset FROM BI.order_created")
    assert len(typed) == len(created) == 100
    for eid, agg, version, order_id, total, currency, created_at, lines, note, topic, off in typed:
        src = created[eid]
        assert (agg, version) == (src.aggregate_id, src.aggregate_version)
        assert order_id == src.payload["order_id"] and currency == src.payload["currency"]
        assert total == Decimal(src.payload["total"]) and isinstance(total, Decimal)
        assert created_at.isoformat().startswith(src.payload["created_at"][:19])
        assert [ln["sku"] for ln in lines] == [ln["sku"] for ln in src.payload["lines"]]
        assert [ln["unit_price"] for ln in lines] == [ln["unit_price"]
                                                      for ln in src.payload["lines"]]
        assert note == src.payload.get("note")
        assert topic == f"{topic_prefix}.order" and off >= 0
    col_types = dict(_q(s, "SELECT column_name, data_type FROM information_schema.columns "
                           "WHERE table_schema = %s AND table_name = 'invoice_issued'",
                        f"bi_{topic_prefix}"))
    assert col_types["amount"] == "numeric" and col_types["due_date"] == "date"
    assert col_types["issued_at"] == "timestamp with time zone"
    assert col_types["_aggregate_version"] == "bigint"
    inv_total = _q(s, "SELECT sum(amount) FROM BI.invoice_issued")[0][0]
    assert inv_total == sum(Decimal(r.payload["amount"]) for r in rows
                            if r.event_type == "invoice.issued")
    # raw table: payload and headers as jsonb
    raw = _q(s, "SELECT payload, headers, event_type FROM BI.events WHERE event_id = %s",
             rows[0].event_id)[0]
    assert raw[0]["order_id"] == rows[0].payload["order_id"]
    assert raw[1][names.CE_SOURCE] == "/erp/outbox" and raw[2] == "order.created"
    assert names.CE_ID not in raw[1]  # headers with a column of their own are not repeated
    # positions: one row per partition, at the end of what was consumed
    positions = _q(s, "SELECT topic, partition, next_offset FROM BI._positions")
    assert {p[0] for p in positions} == {f"{topic_prefix}.order"}
    assert sum(p[2] for p in positions) == len(rows)  # offsets are dense: one per record


def test_two_instances_of_the_group_land_everything_once(database_url, kafka_bootstrap,
                                                         topic_prefix):
    """A second instance joining takes partitions over (rebalance): nothing twice, none lost."""
    s = bi_settings(database_url, kafka_bootstrap, topic_prefix, batch_size=100)
    rows = make_events([f"SO-{i}" for i in range(30)], 20)
    bootstrap = str(s.kafka.bootstrap_servers)
    publish(bootstrap, s.topics.prefix, rows[:300])
    with Running(_sink(s)):
        wait_for(lambda: _count(s) > 0, 60, "the first instance landing")
        with Running(_sink(s)):
            publish(bootstrap, s.topics.prefix, rows[300:])
            wait_for(lambda: _count(s) >= len(rows), 90, "every event landed")
            time.sleep(1.0)
    _assert_exactly_once(s, {r.event_id for r in rows})


def test_database_connections_killed_mid_run_lose_and_duplicate_nothing(
        database_url, kafka_bootstrap, topic_prefix):
    s = bi_settings(database_url, kafka_bootstrap, topic_prefix, batch_size=100)
    rows = make_events([f"SO-{i}" for i in range(40)], 25)
    waves = [rows[i:i + 250] for i in range(0, 1000, 250)]  # in order, four parts
    with Running(_sink(s)) as run:
        landed = 0
        for wave in waves[:3]:
            # a wave lands, then its connections are killed: the next wave meets them dead
            publish(str(s.kafka.bootstrap_servers), s.topics.prefix, wave)
            landed += len(wave)
            wait_for(lambda n=landed: _count(s) >= n, 60, "a wave landed")
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'pipeline-bi'")
        publish(str(s.kafka.bootstrap_servers), s.topics.prefix, waves[3])
        wait_for(lambda: _count(s) >= len(rows), 90, "every event landed after the outages")
        time.sleep(0.5)
        failures = run.sink.stats.write_failures
    _assert_exactly_once(s, {r.event_id for r in rows})
    assert failures >= 1  # the outages were seen, and survived


def test_bad_records_are_dead_lettered_with_the_reason_and_the_rest_lands(
        database_url, kafka_bootstrap, topic_prefix, read_topic):
    s = bi_settings(database_url, kafka_bootstrap, topic_prefix)
    rows = make_events([f"SO-{i}" for i in range(5)], 4)
    nul = rows[7]
    nul.payload["note"] = "bad \x00 byte"  # Avro carries it; PostgreSQL text cannot
    bootstrap = str(s.kafka.bootstrap_servers)
    publish(bootstrap, s.topics.prefix, rows)
    publish_raw(bootstrap, f"{topic_prefix}.order", b"SO-0", b"garbage-bytes",
                [(names.CE_ID, b"e-garbage"), (names.AGGREGATE_VERSION, b"1")])
    with Running(_sink(s)) as run:
        wait_for(lambda: _count(s) == len(rows) - 1, 60, "the good events landed")
        wait_for(lambda: run.sink.stats.dead_lettered_total == 2, 30, "two dead letters")
    _assert_exactly_once(s, {r.event_id for r in rows} - {nul.event_id})
    dlq = read_topic(f"{topic_prefix}.bi.dlq", expect=2, timeout_s=30)
    by_id = {d.headers.get(names.CE_ID): d.headers for d in dlq}
    assert "RowRefused" in by_id[nul.event_id]["kafka_dlt-exception-fqcn"]
    assert nul.event_id in by_id[nul.event_id]["kafka_dlt-exception-message"]
    assert "order_created" in by_id[nul.event_id]["kafka_dlt-exception-message"]
    assert by_id["e-garbage"]["kafka_dlt-exception-fqcn"].endswith("DecodeError")
    assert by_id["e-garbage"]["kafka_dlt-original-topic"] == f"{topic_prefix}.order"
    # the positions moved past both: a restart lands nothing again and dead-letters nothing
    with Running(_sink(s)) as run:
        time.sleep(2.0)
        assert run.sink.stats.consumed == 0
    assert _count(s) == len(rows) - 1


def _catalogue_with_order_v2(tmp: Path) -> Path:
    root = tmp / "schemas"
    shutil.copytree(default_catalogue_path(), root)
    v1 = json.loads((root / "order.created" / "v1.avsc").read_text())
    v1["fields"].append({"name": "channel", "type": ["null", "string"], "default": None,
                         "doc": "Sales channel (added in v2)."})
    (root / "order.created" / "v2.avsc").write_text(json.dumps(v1, indent=2))
    return root


def test_a_schema_that_gains_an_optional_field_adds_the_column(
        database_url, kafka_bootstrap, topic_prefix, tmp_path):
    s = bi_settings(database_url, kafka_bootstrap, topic_prefix)
    bootstrap = str(s.kafka.bootstrap_servers)
    old = make_events(["SO-1", "SO-2"], 2)
    publish(bootstrap, s.topics.prefix, old)
    with Running(_sink(s)):
        wait_for(lambda: _count(s) == 4, 60, "v1 events landed")
    cols = [r[0] for r in _q(s, "SELECT column_name FROM information_schema.columns WHERE "
                                "table_schema = %s AND table_name = 'order_created'",
                             f"bi_{topic_prefix}")]
    assert "channel" not in cols

    root = _catalogue_with_order_v2(tmp_path)
    s2 = make_settings(_url(s), bootstrap, topic_prefix, schemas={"path": str(root)},
                       topics={"aggregate_types": ["order"], "partitions": 3},
                       workers={"bi": s.workers["bi"].model_dump()})
    new = make_events(["SO-3"], 2, seed=5)
    for r in new:
        r.payload["channel"] = "web"
    publish(bootstrap, topic_prefix, new, Catalogue.load(root))  # written with v2
    with Running(_sink(s2)):
        wait_for(lambda: _count(s) == 6, 60, "v2 events landed")
    got = dict(_q(s, "SELECT _event_id, channel FROM BI.order_created"))
    assert {got[r.event_id] for r in new} == {"web"}
    assert {got[r.event_id] for r in old} == {None}
    assert {v for (v,) in _q(s, "SELECT DISTINCT _schema_version FROM BI.order_created")} == {1, 2}


def test_target_configuration_errors_are_clear(database_url, kafka_bootstrap, topic_prefix):
    s = bi_settings(database_url, kafka_bootstrap, topic_prefix)
    with pytest.raises(Exception, match="needs raw or typed"):
        PostgresTarget(raw=False, typed=False)
    t = PostgresTarget(url="postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(Exception, match="BI database unreachable"):
        t.open(s, "g")


# -- kill -9 of the worker process mid-batch ------------------------------------------------------


@pytest.fixture
def bi_proc(tmp_path: Path, database_url: str, kafka_bootstrap: str, topic_prefix: str
            ) -> Iterator[tuple[Settings, list[subprocess.Popen[bytes]], Path]]:
    s = bi_settings(database_url, kafka_bootstrap, topic_prefix, batch_size=2000)
    config = {"database": {"url": database_url},
              "kafka": {"bootstrap_servers": kafka_bootstrap},
              "topics": {"prefix": topic_prefix, "aggregate_types": ["order"], "partitions": 3},
              "workers": {"bi": s.workers["bi"].model_dump(exclude_none=True)}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    procs: list[subprocess.Popen[bytes]] = []
    yield s, procs, path
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.slow
def test_kill_9_mid_batch_lands_every_event_exactly_once(bi_proc):
    s, procs, path = bi_proc
    rows = make_events([f"SO-{i}" for i in range(100)], 100)  # 10,000 events
    publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
    first = start_worker(path, "bi", procs)
    wait_for(lambda: _count(s) >= 2000, 90, "landing under way")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    landed_at_kill = _count(s)
    assert landed_at_kill < len(rows), "killed too late to test anything"
    second = start_worker(path, "bi", procs)
    wait_for(lambda: _count(s) >= len(rows), 120, "every event landed after the restart")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    _assert_exactly_once(s, {r.event_id for r in rows})
    assert _count(s, "order_created") == len(rows)


def test_backfill_rebuilds_the_tables_from_the_topics(bi_proc):
    s, _procs, path = bi_proc
    rows = make_events([f"SO-{i}" for i in range(30)], 4)
    publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
    r = cli(path, "bi", "backfill")  # catch up from the stored positions (none yet) and exit
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["caught_up"] is True and out["landed"] == len(rows)
    _assert_exactly_once(s, {r.event_id for r in rows})
    # the BI tables get damaged; a backfill from the beginning rebuilds them exactly
    _q_exec(s, "DELETE FROM BI.order_created WHERE _aggregate_version = 2")
    _q_exec(s, "UPDATE BI.events SET payload = '{}'::jsonb")
    r = cli(path, "bi", "backfill", "--from-beginning", "--yes")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["from_beginning"] is True and out["landed"] == len(rows)
    _assert_exactly_once(s, {r.event_id for r in rows})
    assert _count(s, "order_created") == len(rows)
    assert _q(s, "SELECT count(*) FROM BI.events WHERE payload = '{}'::jsonb")[0][0] == 0
    # a worker that is not a BI target is refused with a clear message
    r = cli(path, "bi", "backfill", "--worker", "nope")
    assert r.returncode != 0 and "no worker named 'nope'" in r.stderr


def _q_exec(s: Settings, query: str) -> None:
    with psycopg.connect(_url(s), autocommit=True) as conn:
        conn.execute(query.replace("BI.", f'"bi_{s.topics.prefix}".'))


def test_a_refused_row_corrected_and_replayed_lands_once(bi_proc):
    """On-call: the BI database refused a row; `dlq edit` corrects it, `dlq replay` sends it to
    the BI worker's replay input, and it lands exactly once."""
    s, procs, path = bi_proc
    rows = make_events([f"SO-{i}" for i in range(4)], 3)
    bad = rows[5]
    bad.payload["note"] = "bad \x00 byte"
    publish(str(s.kafka.bootstrap_servers), s.topics.prefix, rows)
    start_worker(path, "bi", procs)
    wait_for(lambda: _count(s) == len(rows) - 1, 90, "the good rows landed")
    listed = json.loads(cli(path, "dlq", "ls", "--group", "bi", "--json").stdout)
    assert [d["event_id"] for d in listed] == [bad.event_id]
    assert listed[0]["error_class"] == "RowRefused"
    fix = cli(path, "dlq", "edit", "bi", listed[0]["position"], "--set", "note=clean")
    assert fix.returncode == 0, fix.stderr
    sent = json.loads(cli(path, "dlq", "replay", "--group", "bi", "--yes", "--json").stdout)
    assert sent["sent"] == 1 and sent["superseded_by_edit"] == 1
    wait_for(lambda: _count(s) == len(rows), 60, "the corrected row landed")
    _assert_exactly_once(s, {r.event_id for r in rows})
    note = _q(s, "SELECT note, _topic FROM BI.order_created WHERE _event_id = %s", bad.event_id)
    assert note == [("clean", f"{s.topics.prefix}.bi.retry.1")]
