"""``pipeline bench relay``.

* Throughput (``--events N``): N order events (~300 bytes of JSON each, 500 aggregates) are
  written to the outbox first, then one relay drains them; ``events_per_s`` is rows published
  and deleted per second. Baseline ``produce_per_s``: the same number of records of the same size
  and keys produced straight to Kafka with the same producer settings, no PostgreSQL.
* Latency (``--rate R --seconds S``): the ERP simulator commits R events/s while the relay runs;
  ``latency_ms`` is from each event's commit to its Kafka acknowledgement.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import statistics
import threading
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import Producer

from pipeline.bench.erp_load import (
    RATE_REACHED_MIN,
    WARMUP_S,
    latency_figures,
    percentile,
    simulate_at,
)
from pipeline.config import Settings
from pipeline.db import database_url
from pipeline.embedded.stack import local_stack
from pipeline.kafka.client import producer_config
from pipeline.outbox.migrations import install
from pipeline.relay.envelope import OutboxRow
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder
from pipeline.simulator.payloads import payload_for

AGGREGATES = 500


def _prewrite(conn: psycopg.Connection[Any], schema: str, n: int, *, encoded: bool) -> int:
    """N events in one transaction, as an ERP writes them: ``encoded`` as
    ``pipeline.outbox.emit()`` does (the Avro bytes beside the jsonb), else as SQL emitters do
    (capture triggers, lsFusion: jsonb only, encoded by the relay)."""
    payload = payload_for(
        "order.created", random.Random(1), aggregate_id="SO-0000001", now=dt.datetime.now(dt.UTC)
    )
    text = json.dumps(payload, separators=(",", ":"))
    value = (
        Encoder(Catalogue.load()).encode("order.created", payload, topic="").value
        if encoded else None
    )
    conn.execute(
        f"SELECT {schema}.outbox_emit('order', 'SO-' || lpad((i %% %s)::text, 7, '0'), "
        "'order.created', %s::jsonb, '{}', gen_random_uuid(), %s::bytea) "
        "FROM generate_series(1, %s) i",
        (AGGREGATES, text, value, n),
    )
    conn.commit()
    return len(text)


def _drain(relay: Relay) -> float:
    t0 = time.perf_counter()
    while relay.step():
        pass
    return time.perf_counter() - t0


def _baseline_produce(settings: Settings, topic: str, n: int, value_size: int) -> float:
    p = Producer(producer_config(settings))
    value = bytes(random.Random(2).getrandbits(8) for _ in range(value_size))
    keys = [f"SO-{i:07d}".encode() for i in range(AGGREGATES)]
    hdrs: list[tuple[str, str | bytes | None]] = [("ce_id", uuid.uuid4().hex.encode())] * 10
    t0 = time.perf_counter()
    for i in range(n):
        while True:
            try:
                p.produce(topic, value, keys[i % AGGREGATES], headers=hdrs)
                break
            except BufferError:
                p.poll(0.05)
    left = p.flush(60)
    elapsed = time.perf_counter() - t0
    if left:
        raise RuntimeError(f"baseline producer left {left} records unacknowledged")
    return n / elapsed


def _baseline_latency(
    settings: Settings, topic: str, rate: int, seconds: float, value_size: int
) -> dict[str, float]:
    """Produce → acknowledgement latency of the same producer settings at the same rate, no
    PostgreSQL: the floor under the relay's commit → acknowledgement latency."""
    lat: list[float] = []
    sent: dict[int, float] = {}

    def delivered(err: Any, msg: Any) -> None:
        if err is None and int(msg.key()) >= 0:
            lat.append((time.perf_counter() - sent[int(msg.key())]) * 1000)

    p = Producer(producer_config(settings, on_delivery=delivered))
    value = b"x" * value_size
    p.produce(topic, value, b"-1")  # warm-up: topic metadata and connections, not measured
    p.flush(30)
    lat.clear()
    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            p.poll(min(0.001, due - now))
        sent[i] = time.perf_counter()
        p.produce(topic, value, str(i).encode())
        p.poll(0)
    p.flush(30)
    return {
        "p50": round(percentile(lat, 0.50), 2),
        "p99": round(percentile(lat, 0.99), 2),
        "max": round(max(lat) if lat else float("nan"), 2),
    }


def run_relay_bench(
    settings: Settings, *, events: int, rate: int | None, seconds: float, repeat: int,
    vs: str | None = None, shards: int = 1,
) -> dict[str, Any]:
    with local_stack(settings) as s:
        conninfo = database_url(s)
        schema = s.database.schema_name
        with psycopg.connect(conninfo) as conn:
            install(conn, schema)
        base: dict[str, Any] = {
            "machine": {"cpus": _cpus()},
            "broker": s.kafka.bootstrap_servers,
            "embedded": {
                "database": settings.database.url is None,
                "broker": settings.kafka.bootstrap_servers is None,
            },
        }
        if vs == "mariadb":
            from pipeline.bench.mariadb import run_versus_mariadb

            return {**base, "mode": "versus-mariadb",
                    **run_versus_mariadb(s, events=events, repeat=repeat)}
        if vs == "debezium":
            from pipeline.bench.versus import run_latency_versus_debezium, run_versus_debezium

            if rate:
                return {**base, "mode": "latency-versus-debezium",
                        **run_latency_versus_debezium(s, rate=rate, seconds=seconds,
                                                      repeat=repeat, shards=shards)}
            return {**base, "mode": "versus-debezium",
                    **run_versus_debezium(s, events=events, repeat=repeat, shards=shards)}
        if vs == "wal":
            return {**base, "mode": "versus-wal-engine",
                    **_versus_wal(s, conninfo, events, repeat, rate, seconds)}
        if rate:
            return {**base, "mode": "latency", **_latency(s, rate, seconds, repeat)}
        return {**base, "mode": "throughput", **_throughput(s, conninfo, schema, events, repeat)}


def _postgres_cpu_s() -> float:
    """CPU seconds used so far by this machine's PostgreSQL processes (the relay's database
    work runs there)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] in ("postgres", "postmaster") and proc.info["cpu_times"]:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def _drain_once(
    s: Settings, conninfo: str, schema: str, events: int, *, encoded: bool
) -> dict[str, float]:
    relay = Relay(s)
    relay.store.connect()
    relay.store.try_lead()
    relay.store.check_engine()  # the WAL engine makes its slot here: before the writes
    with psycopg.connect(conninfo) as conn:
        size = _prewrite(conn, schema, events, encoded=encoded)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {schema}.outbox")  # as autovacuum would, between runs
    relay.step()  # warm-up: topic creation and producer connection, not timed
    relay._settle()
    rest = events - relay.stats.published
    cpu0, pg0 = time.process_time(), _postgres_cpu_s()
    elapsed = _drain(relay)
    cpu, pg = time.process_time() - cpu0, _postgres_cpu_s() - pg0
    relay._drain(30)
    relay.store.close()
    relay.encoder.close()
    return {
        "events_per_s": rest / elapsed,
        "relay_cpu_s_per_1000": cpu / rest * 1000,
        "postgres_cpu_s_per_1000": pg / rest * 1000,
        "payload_json_bytes": size,
    }


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    def med(key: str, digits: int) -> float:
        return round(statistics.median(r[key] for r in runs), digits)

    return {
        "events_per_s": round(med("events_per_s", 0)),
        "runs_events_per_s": [round(r["events_per_s"]) for r in runs],
        "relay_cpu_s_per_1000_events": med("relay_cpu_s_per_1000", 4),
        "postgres_cpu_s_per_1000_events": med("postgres_cpu_s_per_1000", 4),
    }


def _throughput(
    s: Settings, conninfo: str, schema: str, events: int, repeat: int
) -> dict[str, Any]:
    """Both kinds of rows, alternated: encoded by their writer (``pipeline.outbox.emit``, the
    relay moves bytes) and jsonb only (SQL emitters: capture triggers, lsFusion)."""
    import resource

    encoded_runs, jsonb_runs, baselines = [], [], []
    for _ in range(repeat):
        encoded_runs.append(_drain_once(s, conninfo, schema, events, encoded=True))
        jsonb_runs.append(_drain_once(s, conninfo, schema, events, encoded=False))
        baselines.append(
            _baseline_produce(s, s.topics.event_topic("order") + ".baseline", events, 120)
        )
    base = statistics.median(baselines)
    enc, js = _summary(encoded_runs), _summary(jsonb_runs)
    return {
        "events": events,
        "payload_json_bytes": encoded_runs[0]["payload_json_bytes"],
        # rows written by pipeline.outbox.emit (Avro bytes stored beside the jsonb)
        **enc,
        "jsonb_rows": js,  # rows written by SQL (jsonb only): the relay parses and encodes
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "baseline": {
            "produce_per_s": round(base),
            "runs": [round(b) for b in baselines],
        },
        "ratio_to_baseline": round(enc["events_per_s"] / base, 3),
        "jsonb_ratio_to_baseline": round(js["events_per_s"] / base, 3),
    }


def _versus_wal(s: Settings, conninfo: str, events: int, repeat: int, rate: int | None,
                seconds: float) -> dict[str, Any]:
    """Both engines on the same server and broker, runs alternated: the polling relay over
    rows (schema ``<schema>``) and the WAL relay over messages (schema ``<schema>_wal``: its
    outbox_emit writes WAL messages once its slot exists). Rows encoded by their writer, as
    ``emit()`` writes them, for both."""
    schema = s.database.schema_name
    wal_schema = f"{schema}_wal"
    with psycopg.connect(conninfo) as conn:
        install(conn, wal_schema)
    wal = s.model_copy(update={
        "database": s.database.model_copy(update={"schema_name": wal_schema}),
        # its own ce_source: outbox positions are unique per outbox, and the read-back
        # (decision 4) tells its own records from the polling relay's in the same topic by it
        "relay": s.relay.model_copy(update={"engine": "wal", "source": f"{s.relay.source}/wal"}),
    })
    poll = s.model_copy(update={"relay": s.relay.model_copy(update={"engine": "poll"})})
    try:
        if rate:
            poll_lat = _latency(poll, rate, seconds, repeat)
            wal_lat = _latency(wal, rate, seconds, repeat)
            return {
                "rate": rate, "seconds": seconds,
                "poll": {k: poll_lat[k] for k in ("latency_ms", "achieved_rate",
                                                  "rate_reached", "verdict")},
                "wal": {k: wal_lat[k] for k in ("latency_ms", "achieved_rate",
                                                "rate_reached", "verdict")},
                "p99_ratio_wal_to_poll": round(
                    wal_lat["latency_ms"]["p99"] / max(poll_lat["latency_ms"]["p99"], 1e-9), 3),
            }
        poll_runs, wal_runs = [], []
        for _ in range(repeat):
            poll_runs.append(_drain_once(poll, conninfo, schema, events, encoded=True))
            wal_runs.append(_drain_once(wal, conninfo, wal_schema, events, encoded=True))
        p, w = _summary(poll_runs), _summary(wal_runs)
        return {
            "events": events,
            "poll": p,
            "wal": w,
            "ratio_wal_to_poll": round(w["events_per_s"] / p["events_per_s"], 3),
            "wal_rows_inserted": _rows_inserted(conninfo, wal_schema),
        }
    finally:
        from pipeline.outbox.engine import switch_to_poll

        with psycopg.connect(conninfo, autocommit=True) as conn:
            switch_to_poll(conn, wal_schema, wait_s=0, force=True)  # no slot left behind


def _rows_inserted(conninfo: str, schema: str) -> int:
    """Rows ever inserted into the WAL-engine outbox's table: 0 when every event was a
    message."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute("SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = %s "
                           "AND relname = 'outbox'", (schema,)).fetchone()
    return int(row[0]) if row else 0


def _latency(s: Settings, rate: int, seconds: float, repeat: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeat):
        acks: dict[str, float] = {}

        def observe(rows: list[OutboxRow], ack: float, acks: dict[str, float] = acks) -> None:
            for r in rows:
                acks[r.event_id] = ack

        relay = Relay(s, observer=observe)
        stop_relay = threading.Event()
        rt = threading.Thread(target=relay.run, args=(stop_relay,), daemon=True)
        rt.start()
        # leadership, topics, the producer (and its transactions) and the read-back before
        # the clock starts: events written meanwhile would measure the start, not the relay
        if not relay.ready.wait(120):
            stop_relay.set()
            raise RuntimeError("the relay did not become a ready leader in 120 s")
        try:
            # warmed up at the rate first (the broker's JIT, the relay's first batches), as
            # the systems of ``--vs debezium`` are: the figures are of the steady state
            warm, _ = simulate_at(database_url(s), s.database.schema_name, rate,
                                  min(seconds, WARMUP_S))
            _wait_for_acks(acks, warm, 30)
            acks.clear()
            written, committed_at = simulate_at(database_url(s), s.database.schema_name, rate,
                                                seconds)
        except BaseException:
            stop_relay.set()
            raise
        _wait_for_acks(acks, written, 30)
        stop_relay.set()
        rt.join(30)
        runs.append(latency_figures(committed_at, acks, written=written, rate=rate,
                                    seconds=seconds))
    med = {k: statistics.median(r[k] for r in runs) for k in ("p50", "p99", "max")}
    reached_all = all(r["rate_reached"] for r in runs)
    return {
        "rate": rate,
        "seconds": seconds,
        "latency_ms": {k: round(v, 2) for k, v in med.items()},
        "achieved_rate": statistics.median(r["achieved_rate"] for r in runs),
        # only a latency measured at (nearly) the asked rate says anything about that rate
        "rate_reached": reached_all,
        "verdict": (
            "measured at the asked rate" if reached_all else
            f"NOT A PASS: the ERP simulator reached less than {RATE_REACHED_MIN:.0%} of "
            f"{rate}/s in some run (see runs); the latency is that of a lighter load"
        ),
        "runs": runs,
        "baseline": {
            "produce_latency_ms": _baseline_latency(
                s, s.topics.event_topic("order") + ".baseline", rate, min(seconds, 10.0), 120
            ),
        },
    }


def _wait_for_acks(acks: dict[str, float], count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(acks) < count:
        time.sleep(0.05)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
