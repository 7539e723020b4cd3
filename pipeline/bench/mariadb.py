"""``pipeline bench relay --vs mariadb``: the relay draining a MariaDB outbox beside the same
relay draining the PostgreSQL one, on the same broker, runs alternated.

MariaDB is an embedded ``mariadbd`` (Debian's package, ``make mariadb``) on a data directory
of its own. Both outboxes get the same rows: the bench payload encoded by its writer (the Avro
bytes beside the JSON, as ``emit()`` writes them), 500 aggregates. On PostgreSQL they are written
by ``outbox_emit`` in one statement; on MariaDB, where a procedure cannot be called from a
SELECT, by one INSERT … SELECT from MariaDB's sequence engine with the versions
``outbox_emit`` would have given — the bench measures the relay's drain, not the writes.
Reported: events/s, the relay's CPU and the database server's CPU per 1,000 events, medians.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from pipeline import mariadb
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.outbox import mariadb as outbox
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder
from pipeline.simulator.payloads import payload_for

AGGREGATES = 500


def _server_cpu_s(names: tuple[str, ...]) -> float:
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] in names and proc.info["cpu_times"]:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def _prewrite(url: str, schema: str, n: int) -> None:
    payload = payload_for("order.created", random.Random(1), aggregate_id="SO-0000001",
                          now=dt.datetime.now(dt.UTC))
    text = json.dumps(payload, separators=(",", ":"))
    value = Encoder(Catalogue.load()).encode("order.created", payload, topic="").value
    with mariadb.connect(url, autocommit=False) as c, c.cursor() as cur:
        cur.execute(
            f"INSERT INTO {outbox.q(schema)}.outbox (event_id, aggregate_type, aggregate_id, "
            "aggregate_version, event_type, payload, headers, encoded, occurred_at) "
            "SELECT uuid(), 'order', concat('SO-', lpad(seq %% %s, 7, '0')), "
            " (seq - 1) div %s + 1, 'order.created', %s, '{}', %s, utc_timestamp(6) "
            f"FROM seq_1_to_{int(n)}",
            (AGGREGATES, AGGREGATES, text, value),
        )
        c.commit()
        cur.execute(f"ANALYZE TABLE {outbox.q(schema)}.outbox")
        cur.fetchall()


def _drain_once(s: Settings, events: int) -> dict[str, float]:
    url = s.database.url.get_secret_value() if s.database.url else ""
    _prewrite(url, s.database.schema_name, events)
    relay = Relay(s)
    relay.store.connect()
    if not relay.store.try_lead():
        raise PipelineError("bench: another relay leads the bench's MariaDB outbox")
    relay.step()  # warm-up: topic creation and producer connection, not timed
    relay._settle()
    rest = events - relay.stats.published
    cpu0, db0 = time.process_time(), _server_cpu_s(("mariadbd", "mysqld"))
    t0 = time.perf_counter()
    while relay.step():
        pass
    relay._settle()
    elapsed = time.perf_counter() - t0
    cpu, db = time.process_time() - cpu0, _server_cpu_s(("mariadbd", "mysqld")) - db0
    relay._drain(30)
    relay.store.close()
    relay.encoder.close()
    return {"events_per_s": rest / elapsed, "relay_cpu_s_per_1000": cpu / rest * 1000,
            "database_cpu_s_per_1000": db / rest * 1000}


def _med(runs: list[dict[str, float]], key: str, digits: int) -> float:
    return round(statistics.median(r[key] for r in runs), digits)


def run_versus_mariadb(s: Settings, *, events: int, repeat: int) -> dict[str, Any]:
    """``s``: the bench's PostgreSQL stack (local_stack); MariaDB is started here."""
    from pipeline.bench.relay import _drain_once as drain_postgres
    from pipeline.embedded.mariadb import EmbeddedMariaDB, mariadb_available

    if not mariadb_available():
        raise PipelineError(
            "bench relay --vs mariadb needs MariaDB's server here (mariadbd): run `make "
            "mariadb` (Debian's mariadb-server)")
    base = Path(tempfile.mkdtemp(prefix="pipeline-bench-mariadb-"))
    try:
        with EmbeddedMariaDB(base / "data") as server:
            with mariadb.connect(server.url()) as c, c.cursor() as cur:
                cur.execute("CREATE DATABASE erp")
            ms = s.model_copy(update={"database": s.database.model_copy(
                update={"url": SecretStr(server.url("erp"))})})
            with mariadb.connect(server.url("erp"), multi_statements=True) as c:
                outbox.install(c, s.database.schema_name)
            pg_url = s.database.url.get_secret_value() if s.database.url else ""
            pg_runs, my_runs = [], []
            for _ in range(repeat):
                pg_runs.append(drain_postgres(s, pg_url, s.database.schema_name, events,
                                              encoded=True))
                my_runs.append(_drain_once(ms, events))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    pg_rate, my_rate = _med(pg_runs, "events_per_s", 0), _med(my_runs, "events_per_s", 0)
    return {
        "events": events,
        "postgresql": {
            "events_per_s": round(pg_rate),
            "runs_events_per_s": [round(r["events_per_s"]) for r in pg_runs],
            "relay_cpu_s_per_1000_events": _med(pg_runs, "relay_cpu_s_per_1000", 4),
            "database_cpu_s_per_1000_events": _med(pg_runs, "postgres_cpu_s_per_1000", 4),
        },
        "mariadb": {
            "events_per_s": round(my_rate),
            "runs_events_per_s": [round(r["events_per_s"]) for r in my_runs],
            "relay_cpu_s_per_1000_events": _med(my_runs, "relay_cpu_s_per_1000", 4),
            "database_cpu_s_per_1000_events": _med(my_runs, "database_cpu_s_per_1000", 4),
        },
        "mariadb_vs_postgresql": round(my_rate / pg_rate, 3) if pg_rate else None,
    }
