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

from pipeline.config import Settings
from pipeline.db import database_url
from pipeline.embedded.stack import local_stack
from pipeline.kafka.client import producer_config
from pipeline.outbox.migrations import install
from pipeline.relay.envelope import OutboxRow
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder
from pipeline.simulator.erp import ErpSimulator, SimulatorConfig
from pipeline.simulator.payloads import payload_for

AGGREGATES = 500


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


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
        "'order.created', %s::jsonb, '{}', gen_random_uuid(), %s::bytea) FROM generate_series(1, %s) i",
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
        "p50": round(_percentile(lat, 0.50), 2),
        "p99": round(_percentile(lat, 0.99), 2),
        "max": round(max(lat) if lat else float("nan"), 2),
    }


def run_relay_bench(
    settings: Settings, *, events: int, rate: int | None, seconds: float, repeat: int
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
        if rate:
            return {**base, "mode": "latency", **_latency(s, rate, seconds, repeat)}
        return {**base, "mode": "throughput", **_throughput(s, conninfo, schema, events, repeat)}


def _throughput(
    s: Settings, conninfo: str, schema: str, events: int, repeat: int
) -> dict[str, Any]:
    rates, baselines, sizes = [], [], []
    for _ in range(repeat):
        with psycopg.connect(conninfo) as conn:
            sizes.append(_prewrite(conn, schema, events))
        relay = Relay(s)
        relay.store.connect()
        relay.store.try_lead()
        relay.step()  # warm-up: topic creation and producer connection, not timed
        rest = events - relay.stats.published
        elapsed = _drain(relay)
        relay._drain(30)
        relay.store.close()
        rates.append(rest / elapsed)
        baselines.append(
            _baseline_produce(s, s.topics.event_topic("order") + ".baseline", events, 120)
        )
    return {
        "events": events,
        "payload_json_bytes": sizes[0],
        "events_per_s": round(statistics.median(rates)),
        "runs_events_per_s": [round(r) for r in rates],
        "baseline": {
            "produce_per_s": round(statistics.median(baselines)),
            "runs": [round(b) for b in baselines],
        },
        "ratio_to_baseline": round(statistics.median(rates) / statistics.median(baselines), 3),
    }


def _latency(s: Settings, rate: int, seconds: float, repeat: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeat):
        acks: dict[str, float] = {}

        def observe(rows: list[OutboxRow], ack: float, acks: dict[str, float] = acks) -> None:
            for r in rows:
                acks[r.event_id] = ack

        relay = Relay(s, observer=observe)
        sim = ErpSimulator(
            database_url(s),
            s.database.schema_name,
            SimulatorConfig(
                writers=4, rate=rate, rollback_ratio=0.0, late_commit_ratio=0.0, track_latency=True
            ),
        )
        stop_relay, stop_sim = threading.Event(), threading.Event()
        rt = threading.Thread(target=relay.run, args=(stop_relay,), daemon=True)
        rt.start()
        st = threading.Thread(target=sim.run, args=(stop_sim,), daemon=True)
        # leadership, topics, the producer (and its transactions) and the read-back before
        # the clock starts: events written meanwhile would measure the start, not the relay
        if not relay.ready.wait(120):
            stop_relay.set()
            raise RuntimeError("the relay did not become a ready leader in 120 s")
        st.start()
        time.sleep(seconds)
        stop_sim.set()
        st.join(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(acks) < sim.stats.written:
            time.sleep(0.05)
        stop_relay.set()
        rt.join(30)
        lat = [(acks[e] - c) * 1000 for e, c in sim.stats.committed_at.items() if e in acks]
        runs.append(
            {
                "written": sim.stats.written,
                "acknowledged": len(lat),
                "achieved_rate": round(sim.stats.written / seconds, 1),
                "p50": round(_percentile(lat, 0.50), 2),
                "p99": round(_percentile(lat, 0.99), 2),
                "max": round(max(lat) if lat else float("nan"), 2),
            }
        )
    med = {k: statistics.median(r[k] for r in runs) for k in ("p50", "p99", "max")}
    return {
        "rate": rate,
        "seconds": seconds,
        "latency_ms": {k: round(v, 2) for k, v in med.items()},
        "runs": runs,
        "baseline": {
            "produce_latency_ms": _baseline_latency(
                s, s.topics.event_topic("order") + ".baseline", rate, min(seconds, 10.0), 120
            ),
        },
    }


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
