"""Consumer lag from what a consumer already knows (cached watermarks, positions): no request
to the broker, cheap enough for the workers' loops and their metrics gauges."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

TP = tuple[str, int]


def lag_figures(
    consumer: Consumer, assigned: set[TP], last_ts: dict[TP, int], group_id: str
) -> tuple[list[tuple[float, dict[str, Any]]], list[tuple[float, dict[str, Any]]]]:
    """(records behind the end, age in seconds of the last record consumed while behind) per
    assigned partition, from the consumer's cached watermarks and positions."""
    lag: list[tuple[float, dict[str, Any]]] = []
    age: list[tuple[float, dict[str, Any]]] = []
    now_ms = time.time() * 1000
    for tp in list(assigned):
        try:
            _lo, hi = consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            pos = consumer.position([TopicPartition(*tp)])[0].offset
        except KafkaException:
            continue
        if hi < 0 or pos < 0:
            continue
        behind = max(0, hi - pos)
        attrs = {"messaging.consumer.group.name": group_id,
                 "messaging.destination.name": tp[0],
                 "messaging.destination.partition.id": str(tp[1])}
        lag.append((float(behind), attrs))
        ts = last_ts.get(tp)
        age.append((max(0.0, (now_ms - ts) / 1000) if behind and ts and ts > 0 else 0.0, attrs))
    return lag, age
