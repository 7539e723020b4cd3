"""``pipeline bench dlq``: the DLQ tool on a large dead-letter topic.

N dead letters (realistic: encoded events with the worker's dead-letter headers, four error
classes, 2,000 keys) are written to ``<prefix>.bench.dlq``. Measured, each ``repeat`` times
(the ``ls`` runs first, then replay and baseline alternated):

* ``ls``: read the whole DLQ, filter (one error class) and format the table, as
  ``pipeline dlq ls --group bench --error TargetRefused`` does (the same calls: the group's
  DLQ, ``GroupDlq.listing``, ``layout`` joined into the text it writes; seconds, without
  process start); ``GroupDlq.select`` of the same filter is checked apart, untimed;
* replay throughput, unthrottled: plan + send every record to the group's first retry tier and
  record them as replayed (events/s).

Baseline, same run: a bare producer writing the same N records (value, key, headers) to a
topic, without planning or bookkeeping.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import statistics
import time
import uuid
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from pipeline.bench import scoped
from pipeline.config import Settings
from pipeline.dlq import replay as rp
from pipeline.dlq.records import Filter, layout
from pipeline.dlq.store import GroupDlq
from pipeline.embedded.stack import local_stack
from pipeline.kafka.client import admin_config, produce, producer_config
from pipeline.kafka.topics import TopicSpec, apply_topics
from pipeline.relay.envelope import OutboxRow, Record, build_record
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder
from pipeline.simulator.payloads import payload_for
from pipeline.worker import routing

_ERRORS = ("TargetRefused", "TransientError", "RowRefused", "MappingError")


class _Err(Exception):
    pass


def _dead_letters(n: int, prefix: str) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    enc = Encoder(Catalogue.load())
    rng = random.Random(3)
    now = dt.datetime.now(dt.UTC)
    payload = {k: payload_for("order.created", rng, aggregate_id=f"SO-{k:05d}", now=now)
               for k in range(2000)}
    out = []
    now_ms = int(time.time() * 1000)
    for i in range(n):
        k = i % 2000
        row = OutboxRow(i + 1, str(uuid.uuid4()), "order", f"SO-{k:05d}", i // 2000 + 1,
                        "order.created", payload[k], {}, now.isoformat())
        rec = build_record(row, enc, topic=f"{prefix}.order", source="/bench",
                           max_inline_bytes=1 << 20, max_payload_bytes=1 << 24)
        assert isinstance(rec, Record)
        err = type(_ERRORS[i % 4], (_Err,), {})(f"bench failure {i}: the target said no")
        headers = routing.failure_headers(
            rec.headers, topic=f"{prefix}.order", partition=i % 3, offset=i,
            timestamp_ms=now_ms, group=f"{prefix}.bench", error=err, attempts=1,
            route=routing.Route(f"{prefix}.bench.dlq", 0, None), now_ms=now_ms)
        out.append((rec.value, rec.key, headers))
    return out


def _produce(s: Settings, topic: str, records: list[Any]) -> float:
    p = Producer(producer_config(s, **{"linger.ms": 20}))
    started = time.monotonic()
    for value, key, headers in records:
        produce(p, topic, value, key, headers=headers)
    if p.flush(120):
        raise RuntimeError(f"benchmark records to {topic} were not all acknowledged")
    return len(records) / (time.monotonic() - started)


def run_dlq_bench(settings: Settings, *, records: int, repeat: int) -> dict[str, Any]:
    with local_stack(settings, fresh_database=False) as s:
        s = scoped(s)
        prefix = s.topics.prefix
        dlq_topic = f"{prefix}.bench.dlq"
        t = s.topics
        apply_topics(AdminClient(admin_config(s)),
                     [TopicSpec(dlq_topic, t.partitions, t.replication_factor, {})],
                     create_only=True)
        letters = _dead_letters(records, prefix)
        _produce(s, dlq_topic, letters)
        flt = Filter.build(error="TargetRefused")
        ls_runs, replay_runs, base_runs = [], [], []
        refused = len(range(0, records, 4))  # every fourth is a TargetRefused
        # ls first, on a broker at rest: the replays and baselines write 2 x N records each
        # round, and the broker's flushing and collecting after them fell into the next ls
        for _ in range(repeat):
            started = time.monotonic()
            dlq = GroupDlq(s, "bench")
            rows, errors = dlq.listing(flt, dt.datetime.now(dt.UTC))
            text = "\n".join(layout(rows, errors))
            ls_runs.append(time.monotonic() - started)
            if len(rows) != refused or text.count("\n") != refused:
                raise RuntimeError(f"ls listed {len(rows)} of {refused} dead letters")
        shown = dlq.select(flt)
        if len(shown) != refused:
            raise RuntimeError(f"select took {len(shown)} of {refused} dead letters")
        if len(dlq.records()) != records:
            raise RuntimeError(f"read {len(dlq.records())} of {records} dead letters")
        for i in range(repeat):
            base_runs.append(_produce(s, f"{prefix}.baseline.{i}", letters))
            started = time.monotonic()  # planning, sending, acks and the replay record
            p = rp.plan(dlq.records(), dlq.records(), dlq.replayed(), again=True)
            result = rp.send(dlq, p.send, rate=None)
            replay_runs.append(result.sent / (time.monotonic() - started))
        return {
            "records": records,
            "ls_seconds_median": round(statistics.median(ls_runs), 3),
            "ls_runs": [round(x, 3) for x in ls_runs],
            "ls_matched": len(rows),
            "replay_events_per_s_median": round(statistics.median(replay_runs)),
            "replay_runs": [round(x) for x in replay_runs],
            "baseline_bare_produce_per_s_median": round(statistics.median(base_runs)),
            "baseline_runs": [round(x) for x in base_runs],
            "cpus": os.cpu_count(),
        }
