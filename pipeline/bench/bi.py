"""``pipeline bench bi``: events/s landed exactly once by the BI worker.

N events of five types (order.created, order.status_changed, invoice.issued,
payment.completed, customer.upserted) are pre-published; each run lands them all with the
batch-sink runtime into a fresh schema (``postgres``: typed tables + the raw table, positions in
the same transaction) or a fresh folder (``parquet``). The rate is counted from the first
consumed record to the last landed batch.

Baseline, in the same run: a plain COPY of the very same rows (built beforehand, one
transaction per batch, no Kafka, no decoding, no positions) into the same kind of tables.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql

from pipeline.bench import scoped
from pipeline.bench.worker import _publish
from pipeline.config import Settings, WorkerConfig
from pipeline.db import database_url
from pipeline.embedded.stack import local_stack
from pipeline.kafka.client import consumer_config
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from pipeline.sink.runtime import SinkWorker
from pipeline.sink.target import BatchTarget
from pipeline.worker.connector import Event
from pipeline.worker.records import event_of, headers_of

EVENT_TYPES = (
    "order.created",
    "order.status_changed",
    "invoice.issued",
    "payment.completed",
    "customer.upserted",
)


def run_bi_bench(
    settings: Settings, *, events: int, repeat: int, batch_size: int, parquet: bool
) -> dict[str, Any]:
    with local_stack(settings, fresh_database=True) as s:
        s = scoped(s)
        topic = s.topics.event_topic("order")
        _publish(
            s, topic, events, keys=1000, partitions=s.topics.partitions, event_types=EVENT_TYPES
        )
        sample = _read_events(s, topic, events)
        pg_runs, base_runs, pq_runs = [], [], []
        for i in range(repeat):
            base_runs.append(_baseline_copy(s, sample, batch_size, f"bench_base_{i}"))
            pg_runs.append(_sink_run(s, events, batch_size, _pg_target(f"bench_bi_{i}"), i))
            if parquet:
                folder = tempfile.mkdtemp(prefix="bench-parquet-")
                try:
                    pq_runs.append(_sink_run(s, events, batch_size, _pq_target(folder), i))
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
        pg_median = statistics.median(pg_runs)
        base_median = statistics.median(base_runs)
        result: dict[str, Any] = {
            "events": events,
            "event_types": list(EVENT_TYPES),
            "batch_size": batch_size,
            "postgres": {
                "events_per_s_median": round(pg_median),
                "runs": [round(r) for r in pg_runs],
                "rows_per_event": 2,  # the raw table and the event type's table
            },
            "baseline_plain_copy": {
                "events_per_s_median": round(base_median),
                "runs": [round(r) for r in base_runs],
            },
            "postgres_vs_baseline": round(pg_median / base_median, 3) if base_median else None,
            "cpus": os.cpu_count(),
        }
        if parquet:
            result["parquet"] = {
                "events_per_s_median": round(statistics.median(pq_runs)),
                "runs": [round(r) for r in pq_runs],
            }
        return result


def _pg_target(schema: str) -> BatchTarget:
    from connectors.bi.postgres import PostgresTarget

    return PostgresTarget(schema=schema)


def _pq_target(folder: str) -> BatchTarget:
    from connectors.bi.parquet import ParquetTarget

    target: BatchTarget = ParquetTarget(folder)
    return target


def _sink_run(s: Settings, n: int, batch_size: int, target: BatchTarget, i: int) -> float:
    wc = WorkerConfig(
        connector="<bench>",
        group=f"bench-bi-{uuid.uuid4().hex[:6]}",
        batch_size=batch_size,
        batch_max_wait_s=0.5,
        session_timeout_ms=6000,
    )
    sink = SinkWorker(s, f"bench-bi-{i}", target, config=wc)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 600
    while sink.stats.landed < n:
        if errors or not t.is_alive() or time.monotonic() > deadline:
            stop.set()
            raise RuntimeError(
                f"BI sink landed {sink.stats.landed} of {n} events and "
                f"{'stopped: ' + repr(errors[0]) if errors else 'ran out of time'}"
            )
        time.sleep(0.01)
    stop.set()
    t.join(60)
    st = sink.stats
    assert st.first_consumed_at is not None and st.last_landed_at is not None
    return n / (st.last_landed_at - st.first_consumed_at)


def _read_events(s: Settings, topic: str, n: int) -> list[Event]:
    """The published records as the sink decodes them (for the baseline's rows)."""
    decoder = Decoder(Catalogue.load(s.schemas.path))
    c = Consumer(consumer_config(s, f"bench-read-{uuid.uuid4().hex[:6]}"))
    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    out: list[Event] = []
    deadline = time.monotonic() + 120
    while len(out) < n and time.monotonic() < deadline:
        for m in c.consume(1000, timeout=1.0):
            if m.error() is None:
                tp = (str(m.topic()), int(m.partition() or 0))
                e = event_of(decoder, m, tp, int(m.offset() or 0), headers_of(m))
                e.payload  # noqa: B018
                out.append(e)
    c.close()
    return out


def _baseline_copy(s: Settings, sample: list[Event], batch_size: int, schema: str) -> float:
    """Plain COPY of the same rows: built first (not timed), then COPYed batch by batch."""
    from connectors.bi.postgres import PostgresTarget, copy_rows

    target = PostgresTarget(schema=schema)
    target.open(s, "baseline")
    target.prepare(sample)
    batches = [
        target.rows_for(sample[i : i + batch_size]) for i in range(0, len(sample), batch_size)
    ]
    target.close()
    with psycopg.connect(database_url(s)) as conn:
        started = time.perf_counter()
        for prepared in batches:
            with conn.transaction():
                copy_rows(conn, prepared)
        elapsed = time.perf_counter() - started
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return len(sample) / elapsed
