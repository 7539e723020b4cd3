"""The one way a copy of a consumed record, or a per-key state record, reaches a group's own
topics (retry tiers, DLQ, parked keys, a corrected dead letter, a replay).

Every write goes to the partition *number* of the event's own partition (its ``home``: the
original partition header once the record has made one hop, else the partition it was consumed
from), so a group's topics stay co-partitioned and one member owns all of a key (see
:mod:`pipeline.worker.ownership`). The bytes of the record are never changed; the headers are
:func:`pipeline.worker.routing.failure_headers`. Each write reports back once Kafka acknowledged
it (or refused it): a caller counts a record finished only then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError

from pipeline.kafka import names
from pipeline.kafka.client import produce
from pipeline.worker import routing

Headers = list[tuple[str, bytes]]
Done = Callable[[str | None, Any], None]  # (error text or None, the delivered message)


@dataclass(frozen=True)
class Source:
    """A consumed record, as much of it as a copy needs."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    @classmethod
    def of(cls, msg: Any) -> Source:
        raw = msg.headers() or []
        hdrs = list(raw.items()) if isinstance(raw, dict) else list(raw)
        ts = msg.timestamp()
        return cls(
            str(msg.topic()),
            int(msg.partition() or 0),
            int(msg.offset() or 0),
            int(ts[1]) if ts and ts[1] > 0 else 0,
            msg.key(),
            msg.value(),
            [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in hdrs],
        )

    @property
    def home(self) -> int:
        return home_partition(self.headers, self.partition)


def home_partition(headers: Iterable[tuple[str, Any]], default: int) -> int:
    """The partition number of the event's own partition: the original-partition header (set at
    the first hop), else ``default``."""
    for name, value in headers:
        if name == names.ORIGINAL_PARTITION and value:
            got = routing.read_int(value)
            if got is not None and got >= 0:
                return got
    return default


class Forwarder:
    """Writes through one producer and counts what is not acknowledged yet."""

    def __init__(self, producer: Any, group_id: str) -> None:
        self.producer = producer
        self.group_id = group_id
        self.pending = 0

    def send(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        on_done: Done | None = None,
    ) -> None:
        self.pending += 1

        def delivered(err: KafkaError | None, msg: Any) -> None:
            self.pending -= 1
            if on_done is not None:
                on_done(err.str() if err is not None else None, msg)

        try:
            produce(
                self.producer,
                topic,
                value,
                key,
                headers=headers,
                on_delivery=delivered,
                partition=partition,
            )
        except BaseException:
            self.pending -= 1  # never queued: no report will come
            raise

    def copy(
        self,
        src: Source,
        route: routing.Route,
        *,
        error: BaseException | None,
        attempts: int,
        blocked_by: str | None = None,
        decode_error: str | None = None,
        traceparent: str | None = None,
        on_done: Done | None = None,
    ) -> None:
        """A retry or dead-letter copy of ``src`` (bytes untouched) at its home partition."""
        headers = routing.failure_headers(
            src.headers,
            topic=src.topic,
            partition=src.partition,
            offset=src.offset,
            timestamp_ms=src.timestamp_ms,
            group=self.group_id,
            error=error,
            attempts=attempts,
            route=route,
            now_ms=int(time.time() * 1000),
            blocked_by=blocked_by,
            decode_error=decode_error,
        )
        if traceparent is not None:
            headers = [(k, v) for k, v in headers if k != names.TRACEPARENT]
            headers.append((names.TRACEPARENT, traceparent.encode()))
        self.send(route.topic, src.home, src.key, src.value, headers, on_done)

    def move(self, src: Source, topic: str, on_done: Done | None = None) -> None:
        """The record, headers and all, to ``topic`` at its home partition (a retry copy found
        outside its home partition, written before the co-partitioned layout)."""
        self.send(topic, src.home, src.key, src.value, src.headers, on_done)
