"""Reads the event topics back and checks the pipeline's promises: every event once, each
key's versions in order without gaps. Used by ``pipeline run``'s verdict and the benchmarks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import headers as h
from pipeline.kafka.client import consumer_config, wrap_kafka_error


@dataclass
class VerifyReport:
    records: int = 0
    duplicates: int = 0
    order_violations: int = 0
    keys: int = 0
    examples: list[str] = field(default_factory=list)


def verify_topics(
    settings: Settings, written_ids: set[str] | None = None, timeout_s: float = 60.0
) -> VerifyReport:
    topics = [settings.topics.event_topic(a) for a in settings.topics.aggregate_types]
    c = Consumer(consumer_config(settings, f"pipeline-verify-{uuid.uuid4().hex[:8]}"))
    report = VerifyReport()
    seen: set[bytes] = set()
    last: dict[tuple[str, bytes], int] = {}
    src = settings.relay.source.encode()
    try:
        try:
            md = c.list_topics(timeout=10)
        except KafkaException as exc:
            raise wrap_kafka_error(exc, "listing topics for verification") from exc
        assign: list[TopicPartition] = []
        ends: dict[tuple[str, int], int] = {}
        for t in topics:
            tmd = md.topics.get(t)
            if tmd is None or tmd.error is not None:
                continue
            for p in tmd.partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                if hi > lo:
                    assign.append(TopicPartition(t, p, lo))
                    ends[(t, p)] = hi - 1
        if assign:
            c.assign(assign)
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            for m in c.consume(5000, timeout=0.5):
                if m.error() is not None:
                    continue
                hd = {i[0]: i[1] if isinstance(i[1], bytes) else b"" for i in m.headers() or []}
                tp = (str(m.topic()), int(m.partition() or 0))
                if tp in ends and (m.offset() or 0) >= ends[tp]:
                    del ends[tp]
                if hd.get(h.CE_SOURCE) != src:
                    continue
                report.records += 1
                ce_id = hd.get(h.CE_ID, b"")
                if ce_id in seen:
                    report.duplicates += 1
                    _example(report, f"duplicate event {ce_id.decode()}")
                seen.add(ce_id)
                key = (tp[0], m.key() or b"")
                version = int(hd.get(h.AGGREGATE_VERSION, b"0"))
                prev = last.get(key)
                if prev is not None and version != prev + 1:
                    report.order_violations += 1
                    _example(report, f"{key[0]} key {key[1].decode()}: v{version} after v{prev}")
                last[key] = version
    finally:
        c.close()
    report.keys = len(last)
    return report


def _example(report: VerifyReport, text: str) -> None:
    if len(report.examples) < 10:
        report.examples.append(text)
