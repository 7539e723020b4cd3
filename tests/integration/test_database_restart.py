"""The PostgreSQL server itself restarts (not only a connection killed) while the relay and the
BI sink run: both wait, reconnect, and nothing is lost or published or landed twice. The test
starts a pgserver of its own (the embedded PostgreSQL CI uses), so that it can stop it."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pipeline.embedded.postgres import EmbeddedPostgres, create_database, with_database
from pipeline.outbox.migrations import install
from pipeline.relay.relay import Relay
from pipeline.sink.runtime import SinkWorker
from tests.conftest import make_settings
from tests.fixtures.kafka import read_all
from tests.fixtures.relay import assert_exactly_once_in_order, outbox_count, wait_for
from tests.fixtures.sink import Running
from tests.integration.test_bi_postgres import _assert_exactly_once, _count
from tests.integration.test_relay_operations import _emit_orders

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_relay_and_bi_sink_ride_out_a_database_server_restart(
        kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    base = Path(tempfile.mkdtemp(prefix="pipeline-pgserver-"))
    pg = EmbeddedPostgres(base / "data").start()
    try:
        url = with_database(pg.url, create_database(pg.url, "pipeline_restart"))
        s = make_settings(url, kafka_bootstrap, topic_prefix,
                          topics={"aggregate_types": ["order"], "partitions": 3},
                          workers={"bi": {"connector": "connectors.bi.postgres:PostgresTarget",
                                          "options": {"schema": f"bi_{topic_prefix}"},
                                          "batch_size": 50, "batch_max_wait_s": 0.2,
                                          "session_timeout_ms": 6000}})
        with psycopg.connect(url, autocommit=True) as conn:
            install(conn, "pipeline")
        first = _emit_orders(url, 100, keys=10)
        relay, stop = Relay(s), threading.Event()
        t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        t.start()
        try:
            with Running(SinkWorker(s, "bi")), \
                    caplog.at_level("WARNING", logger="pipeline"):
                wait_for(lambda: outbox_count(url) == 0, 60, "the first events published")
                wait_for(lambda: _count(s) == 100, 60, "the first events landed")
                pg.stop()  # the server goes away: every connection breaks
                time.sleep(3)
                pg = EmbeddedPostgres(base / "data").start()  # same data, same socket
                second = {f"00000000-0000-4000-9000-{i:012d}" for i in range(100)}
                with psycopg.connect(url) as conn:
                    import datetime as dt
                    import random

                    from pipeline.outbox.emit import emit
                    from pipeline.simulator.payloads import payload_for

                    rng = random.Random(9)
                    for i, eid in enumerate(sorted(second)):
                        key = f"SO-{i % 10:05d}"
                        emit(conn, "order", key, "order.created",
                             payload_for("order.created", rng, aggregate_id=key,
                                         now=dt.datetime.now(dt.UTC)), event_id=eid)
                    conn.commit()
                wait_for(lambda: outbox_count(url) == 0, 90, "the relay to publish after it")
                wait_for(lambda: _count(s) == 200, 90, "the sink to land after it")
        finally:
            stop.set()
            t.join(60)
        assert not t.is_alive()
        assert "PostgreSQL" in caplog.text  # the outage was said, not swallowed
        recs = read_all(kafka_bootstrap, f"{topic_prefix}.order", expect=200, timeout_s=60)
        assert_exactly_once_in_order(recs, expected_ids=first | second)
        _assert_exactly_once(s, first | second)
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
