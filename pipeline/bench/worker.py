"""``pipeline bench worker``: the worker runtime's throughput and concurrency.

* ``noop``: N events (500 keys) pre-published, one worker process with a no-op handler;
  ``events_per_s`` from the first to the last handled event. Baseline: a bare confluent-kafka
  consumer reading the same records (no decoding, no scheduling), in the same run.
* ``slow_target``: 20 ms per call on a single partition, ``max_in_flight`` 1 vs 64.
* ``retries``: the same workload with 2 % of events failing once (retry tier delay 0.2 s):
  the extra time to drain, and the overhead a retry adds beyond its configured delay.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.bench import scoped
from pipeline.config import Settings, WorkerConfig
from pipeline.embedded.stack import local_stack
from pipeline.errors import TransientError
from pipeline.kafka.client import consumer_config, produce, producer_config
from pipeline.kafka.topics import TopicSpec, apply_topics
from pipeline.relay.envelope import OutboxRow, Record, build_record
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder
from pipeline.simulator.payloads import payload_for
from pipeline.worker.connector import Event
from pipeline.worker.runtime import Worker


class _Target:
    """A connector whose calls take ``latency_s`` and fail once for chosen events."""

    def __init__(self, latency_s: float = 0.0, fail_once: set[str] | None = None) -> None:
        self.latency_s = latency_s
        self.fail_once = set(fail_once or ())
        self.first_try: dict[str, float] = {}
        self.done_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def default(self, event: Event) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)
        if not self.fail_once:
            return  # the no-op series: nothing to fail, nothing to record
        with self._lock:
            if event.event_id in self.fail_once:
                self.fail_once.discard(event.event_id)
                self.first_try[event.event_id] = time.monotonic()
                raise TransientError("benchmark: fail once")


def _publish(
    settings: Settings,
    topic: str,
    n: int,
    keys: int,
    partitions: int,
    event_types: tuple[str, ...] = ("order.created",),
) -> list[OutboxRow]:
    """Publish ``n`` events as the relay would, ``keys`` aggregates, the event types in turn;
    the rows they were built from."""
    t = settings.topics
    from confluent_kafka.admin import AdminClient

    from pipeline.kafka.client import admin_config

    apply_topics(
        AdminClient(admin_config(settings)),
        [TopicSpec(topic, partitions, t.replication_factor, {})],
        create_only=True,
    )
    enc = Encoder(Catalogue.load())
    rng = random.Random(1)
    now = dt.datetime.now(dt.UTC)
    payloads = {
        (k, et): payload_for(et, rng, aggregate_id=f"SO-{k:05d}", now=now)
        for k in range(keys)
        for et in event_types
    }
    p = Producer(producer_config(settings))
    rows = []
    for i in range(n):
        k = i % keys
        et = event_types[(i // keys) % len(event_types)]
        row = OutboxRow(
            i + 1,
            str(uuid.uuid4()),
            "order",
            f"SO-{k:05d}",
            i // keys + 1,
            et,
            payloads[(k, et)],
            {},
            now.isoformat(),
        )
        rec = build_record(
            row,
            enc,
            topic=topic,
            source="/bench",
            max_inline_bytes=1 << 20,
            max_payload_bytes=1 << 24,
        )
        assert isinstance(rec, Record)
        produce(p, topic, rec.value, rec.key, headers=rec.headers)
        rows.append(row)
    if p.flush(60):
        raise RuntimeError("benchmark records were not all acknowledged")
    return rows


def _run_worker(
    settings: Settings, name: str, target: _Target, n: int, **cfg: Any
) -> tuple[float, Worker]:
    handled: list[float] = []
    first: list[float] = []
    done = threading.Event()
    track = bool(target.fail_once)  # the retries series reads when each event was done

    def observe(event: Event, outcome: str) -> None:
        now = time.monotonic()
        if not first:
            first.append(now)
        if track:
            target.done_at[event.event_id] = now
        handled.append(now)
        if len(handled) >= n:
            done.set()

    wc = WorkerConfig(connector="<bench>", session_timeout_ms=6000, commit_interval_s=1.0, **cfg)
    worker = Worker(settings, name, target, config=wc, observer=observe)
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 600
    while not done.wait(0.5):
        if not t.is_alive() or time.monotonic() > deadline:
            stop.set()
            raise RuntimeError(
                f"worker handled {len(handled)} of {n} events and "
                f"{'stopped' if not t.is_alive() else 'ran out of time'}"
            )
    stop.set()
    t.join(60)
    return handled[-1] - first[0], worker


def _bare_consume(settings: Settings, topic: str, n: int) -> float:
    c = Consumer(consumer_config(settings, f"bench-bare-{uuid.uuid4().hex[:6]}"))
    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    got = 0
    start = None
    while got < n:
        msgs = c.consume(1000, timeout=1.0)
        if msgs and start is None:
            start = time.monotonic()
        got += sum(1 for m in msgs if m.error() is None)
    elapsed = time.monotonic() - (start or time.monotonic())
    c.close()
    return n / elapsed if elapsed > 0 else float("inf")


def run_worker_bench(
    settings: Settings, *, events: int, repeat: int, noop_only: bool = False
) -> dict[str, Any]:
    """``noop_only``: the no-op throughput and its baseline alone (the CI's bench smoke)."""
    with local_stack(settings, fresh_database=False) as s:
        s = scoped(s)
        topic = s.topics.event_topic("order")
        _publish(s, topic, events, keys=500, partitions=s.topics.partitions)
        noop_rates, bare_rates = [], []
        for i in range(repeat):
            elapsed, _ = _run_worker(s, f"noop{i}", _Target(), events, max_in_flight=64)
            noop_rates.append(events / elapsed)
            bare_rates.append(_bare_consume(s, topic, events))
        noop = {
            "events_per_s": round(statistics.median(noop_rates)),
            "runs": [round(r) for r in noop_rates],
            "baseline": {
                "bare_consume_per_s": round(statistics.median(bare_rates)),
                "runs": [round(r) for r in bare_rates],
            },
            "ratio_to_baseline": round(
                statistics.median(noop_rates) / statistics.median(bare_rates), 4),
        }
        if noop_only:
            return {"machine": {"cpus": _cpus()}, "events": events, "noop": noop}

        # a slow target on one partition: concurrency across keys is the whole gain
        slow_s = s.model_copy(
            update={
                "topics": s.topics.model_copy(
                    update={"prefix": f"slow{uuid.uuid4().hex[:6]}", "partitions": 1}
                )
            }
        )
        slow_n = 300
        _publish(slow_s, slow_s.topics.event_topic("order"), slow_n, keys=300, partitions=1)
        t1, _ = _run_worker(slow_s, "slow1", _Target(0.02), slow_n, max_in_flight=1)
        t64, _ = _run_worker(slow_s, "slow64", _Target(0.02), slow_n, max_in_flight=64)

        # retries: 2 % of events fail once; tier 1 delay 0.2 s
        retry_s = s.model_copy(
            update={
                "topics": s.topics.model_copy(update={"prefix": f"retry{uuid.uuid4().hex[:6]}"})
            }
        )
        rn = min(events, 20_000)
        ids = [r.event_id for r in _publish(
            retry_s,
            retry_s.topics.event_topic("order"),
            rn,
            keys=500,
            partitions=s.topics.partitions,
        )]
        base_t, _ = _run_worker(retry_s, "clean", _Target(), rn, max_in_flight=64)
        failing = set(random.Random(3).sample(ids, rn // 50))
        target = _Target(fail_once=failing)
        retry_t, w = _run_worker(
            retry_s, "flaky", target, rn, max_in_flight=64, retry_delays_s=[0.2]
        )
        overhead = [
            (target.done_at[e] - target.first_try[e] - 0.2) * 1000
            for e in target.first_try
            if e in target.done_at
        ]
    return {
        "machine": {"cpus": _cpus()},
        "events": events,
        "noop": noop,
        "slow_target_20ms_single_partition": {
            "events": slow_n,
            "max_in_flight_1_events_per_s": round(slow_n / t1, 1),
            "max_in_flight_64_events_per_s": round(slow_n / t64, 1),
            "speedup": round(t1 / t64, 1),
        },
        "retries": {
            "events": rn,
            "failing_once": len(failing),
            "retry_delay_s": 0.2,
            "drain_s_without_failures": round(base_t, 3),
            "drain_s_with_failures": round(retry_t, 3),
            "extra_s": round(retry_t - base_t, 3),
            "retry_overhead_ms_beyond_delay": {
                "p50": round(statistics.median(overhead), 1) if overhead else None,
                "max": round(max(overhead), 1) if overhead else None,
            },
            "retried": dict(w.stats.retried),
        },
    }


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def run_wms_bench(
    settings: Settings, *, events: int, latency_ms: float, max_in_flight: int, repeat: int = 3
) -> dict[str, Any]:
    """``pipeline bench wms``: order.created events through the WMS connector against the
    reference WMS answering after ``latency_ms``; baseline: the very calls the connector makes
    for those events (built beforehand by its mapping) made straight with httpx from as many
    threads (no Kafka, no runtime), in the same run, alternated; beside it the same calls
    straight from urllib3 (the library the connector's client is built on) and through the
    connector's own client (``RestTarget``) without Kafka or the runtime, which tell the
    runtime's cost from the client's. The reference WMS runs in a
    process of its own, as a real WMS would: in the worker's process it would share the
    worker's interpreter lock, and the bench would measure the server's Python as much as the
    worker."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import urllib3

    from connectors.rest.client import RestTarget
    from connectors.rest.mapping import Call, Route, build_call
    from connectors.wms.connector import DEFAULT_MAPPING, WmsConnector

    with local_stack(settings, fresh_database=False) as s, _wms_process(latency_ms) as url:
        s = s.model_copy(
            update={
                "topics": s.topics.model_copy(
                    update={"prefix": f"wms{uuid.uuid4().hex[:6]}", "aggregate_types": ["order"]}
                )
            }
        )
        topic = s.topics.event_topic("order")
        rows = _publish(s, topic, events, keys=events, partitions=s.topics.partitions)
        route = Route.parse("order.created", DEFAULT_MAPPING["order.created"])
        # the very calls the connector makes for these events (method, path, body, key)
        calls = [(build_call(route, {"aggregate_version": r.aggregate_version,
                                     "payload": r.payload}), r.event_id) for r in rows]
        worker_rates, direct_rates, client_rates, applied, dead = [], [], [], [], 0
        urllib3_rates: list[float] = []
        with httpx.Client(base_url=url, timeout=30) as admin:

            def timed(one_call: Callable[[tuple[Call, str]], None]) -> float:
                """Calls/s of ``calls`` made by ``one_call`` from max_in_flight threads, on a
                freshly reset WMS."""
                admin.post("/_reset").raise_for_status()
                t0 = time.monotonic()
                with ThreadPoolExecutor(max_in_flight) as pool:
                    list(pool.map(one_call, calls))
                return events / (time.monotonic() - t0)

            for i in range(repeat):
                admin.post("/_reset").raise_for_status()
                connector = WmsConnector(url, max_connections=max_in_flight)
                try:  # a group of its own each run: every run reads the topic from the start
                    elapsed, w = _run_worker(
                        s, f"wms{i}", _Forward(connector), events, max_in_flight=max_in_flight
                    )
                finally:
                    connector.close()
                worker_rates.append(events / elapsed)
                dead += w.stats.dead_lettered_total
                applied.append(len(admin.get("/fulfilment-orders").json()["items"]))
                with httpx.Client(
                    base_url=url,
                    timeout=30,
                    limits=httpx.Limits(max_connections=max_in_flight),
                ) as client:

                    def one(item: tuple[Call, str]) -> None:
                        call, key = item
                        client.request(
                            call.method, call.path, json=call.body,
                            headers={"Idempotency-Key": key},
                        ).raise_for_status()

                    direct_rates.append(timed(one))
                # the same calls straight from urllib3 (the client library the connector uses)
                u3 = urllib3.connection_from_url(url, maxsize=max_in_flight, block=True,
                                                 timeout=30.0, retries=False)
                try:

                    def raw(item: tuple[Call, str], pool: Any = u3) -> None:
                        call, key = item
                        r = pool.urlopen(call.method, call.path, body=json.dumps(call.body),
                                         headers={"Idempotency-Key": key,
                                                  "Content-Type": "application/json"})
                        if r.status >= 300:
                            raise RuntimeError(f"reference WMS answered {r.status}: {r.data!r}")

                    urllib3_rates.append(timed(raw))
                finally:
                    u3.close()
                # the connector's own HTTP client called straight, without Kafka or the
                # runtime: what the runtime costs on top of the client
                target = RestTarget(url, max_connections=max_in_flight)
                try:

                    def through(item: tuple[Call, str], target: RestTarget = target) -> None:
                        call, key = item
                        target.call(call.method, call.path, body=call.body,
                                    idempotency_key=key)

                    client_rates.append(timed(through))
                finally:
                    target.close()
    median, direct = statistics.median(worker_rates), statistics.median(direct_rates)
    return {
        "machine": {"cpus": _cpus()},
        "events": events,
        "target_latency_ms": latency_ms,
        "max_in_flight": max_in_flight,
        "events_per_s": round(median, 1),
        "runs": [round(r, 1) for r in worker_rates],
        "applied_in_wms": applied,
        "dead_lettered": dead,
        "baseline": {
            "direct_http_calls_per_s": round(direct, 1),
            "runs": [round(r, 1) for r in direct_rates],
        },
        "ratio_to_baseline": round(median / direct, 3),
        "baseline_urllib3": {
            "direct_http_calls_per_s": round(statistics.median(urllib3_rates), 1),
            "runs": [round(r, 1) for r in urllib3_rates],
            "ratio_of_worker": round(median / statistics.median(urllib3_rates), 3),
        },
        "connector_client_alone": {
            "calls_per_s": round(statistics.median(client_rates), 1),
            "runs": [round(r, 1) for r in client_rates],
            "ratio_of_worker": round(median / statistics.median(client_rates), 3),
        },
    }


@contextlib.contextmanager
def _wms_process(latency_ms: float) -> Iterator[str]:
    """The reference WMS (``python -m connectors.wms.server``) in a process of its own: its
    URL, while it runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "connectors.wms.server", "--port", "0",
         "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(
                f"the reference WMS did not start (exit {proc.poll()}): run "
                "`python -m connectors.wms.server` to see why"
            )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class _Forward(_Target):
    """The WMS connector's handlers, with the bookkeeping the benchmark's observer uses."""

    def __init__(self, connector: Any) -> None:
        super().__init__()
        self.handlers = connector.handlers
