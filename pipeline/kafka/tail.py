"""Reading topics up to their current end: the relay's read-back (decision 4), the worker's
parked-keys rebuild and ``pipeline up``'s verification all need "every record (or the last N of
each partition) that is there now", with no consumer group and a bounded wait."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable
from pipeline.kafka.client import consumer_config, wrap_kafka_error


def read_to_end(
    settings: Settings,
    topics: list[str],
    *,
    last: int | None = None,
    since_ms: int | None = None,
    timeout_s: float = 60.0,
    purpose: str = "read",
    settle_s: float = 0.3,
    partitions: set[int] | None = None,
) -> Iterator[Message]:
    """Yield the records of ``topics`` (all, or the ``last`` N of each partition, extended back
    to the first record at or after ``since_ms`` when given) up to their end. Missing topics are
    skipped; ``partitions`` reads only those partition numbers. Raises BrokerUnavailable when
    the broker cannot be reached or the end is not reached within ``timeout_s``.

    The end is where both rules hold: every partition read up to the high watermark seen at the
    start (its position there: the last offsets may be transaction markers), *and* then a
    fetch of ``settle_s`` that brings nothing more. A real Kafka broker's
    watermark is exact, so the second rule costs one short wait; a broker whose watermark lies
    low (tansu reports a batch's base offset + 1 after a batched produce) is still read to its
    real end. Records written meanwhile may be yielded too: callers take "at least what was
    there"."""
    for batch in read_batches_to_end(settings, topics, last=last, since_ms=since_ms,
                                     timeout_s=timeout_s, purpose=purpose, settle_s=settle_s,
                                     partitions=partitions):
        for msg in batch:
            if msg.error() is None:
                yield msg


_READ_CONFIG: dict[str, Any] = {"enable.auto.offset.store": False, "fetch.wait.max.ms": 50}


def read_batches_to_end(
    settings: Settings,
    topics: list[str],
    *,
    last: int | None = None,
    since_ms: int | None = None,
    timeout_s: float = 60.0,
    purpose: str = "read",
    settle_s: float = 0.3,
    partitions: set[int] | None = None,
    settle_always: bool = True,
    batch_size: int = 5000,
    consumer_overrides: dict[str, Any] | None = None,
    spans: dict[int, tuple[int, int | None]] | None = None,
) -> Iterator[list[Message]]:
    """:func:`read_to_end`'s records a consume call's batch at a time (error events included:
    the caller skips them). With ``settle_always`` false the settling fetch is made only when a
    partition turned out to hold records past its watermark (the watermark lied); on a broker
    whose watermarks are exact the read then ends as soon as what was fetched is taken — for
    listings read by people (``dlq ls``), not for the relay's read-back.

    ``spans`` (one topic only) reads just those partitions, partition ``p`` from offset ``a``
    up to ``b`` exclusive (``None``: to its end, as without spans): readers in several
    processes share one partition's records that way (``pipeline dlq ls``). Records of a
    bounded span are never yielded past its ``b``, nor is its end settled: the reader of the
    partition's last span does that."""
    if spans is not None and len(topics) != 1:
        raise ValueError("offset spans name partitions of one topic: give one topic")
    consumer = Consumer(
        consumer_config(
            settings,
            f"pipeline-{purpose}-{uuid.uuid4().hex[:8]}",
            **{**_READ_CONFIG, **(consumer_overrides or {})},
        )
    )
    request = settings.kafka.request_timeout_s
    try:
        try:
            md = consumer.list_topics(timeout=request)
        except KafkaException as exc:
            raise wrap_kafka_error(exc, f"reading topic metadata ({purpose})", consumer) from exc
        assignment: list[TopicPartition] = []
        ends: dict[tuple[str, int], int] = {}
        highs: dict[tuple[str, int], int] = {}
        stops: dict[tuple[str, int], int] = {}  # bounded spans' ends (exclusive)
        lookups_until = time.monotonic() + timeout_s
        for topic in topics:
            tmd = md.topics.get(topic)
            if tmd is None or tmd.error is not None:
                continue
            for p in sorted(tmd.partitions):
                if partitions is not None and p not in partitions:
                    continue
                if spans is not None and p not in spans:
                    continue
                lo, hi = watermarks(consumer, topic, p, request, lookups_until)
                start = lo if last is None else max(lo, hi - last)
                if since_ms is not None and start > lo:
                    start = max(
                        lo, min(start, _offset_at(consumer, topic, p, since_ms, hi, request))
                    )
                end = hi
                if spans is not None:
                    first, stop = spans[p]
                    start = max(start, first)
                    if stop is not None:  # a bounded span: nothing at or past stop is read
                        stops[(topic, p)] = stop
                        end = max(start, min(stop, hi))  # hi below stop: it went back
                        if start >= end:
                            continue  # nothing of this partition for this reader
                # every partition is assigned, even one that looks empty: its watermark may lie
                assignment.append(TopicPartition(topic, p, start))
                # a bounded span's records past stop are not past the watermark: never "lied"
                highs[(topic, p)] = hi if (topic, p) not in stops else _NEVER
                if start < end:
                    ends[(topic, p)] = end
        if not assignment:
            return
        past = False  # a record at or past its partition's watermark: the watermark lied
        paused: set[tuple[str, int]] = set()
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"{purpose}: {len(ends)} partition(s) not read to their end in "
                    f"{timeout_s:.0f}s, e.g. {sorted(ends)[:3]}"
                )
            batch = consumer.consume(batch_size, timeout=0.1)
            if batch:
                if stops:
                    batch = _paused_at_stops(consumer, batch, stops, paused)
                yield batch
                past = _mark_read(batch, ends, highs) or past
            if ends:
                # the last offsets may hold no record for us: a transaction's commit marker,
                # or records of an aborted one; the position moves past them
                for tp_pos in consumer.position([TopicPartition(t, p) for t, p in ends]):
                    key = (str(tp_pos.topic), int(tp_pos.partition))
                    if tp_pos.offset is not None and tp_pos.offset >= ends[key]:
                        del ends[key]
        if not settle_always:
            # what was fetched with the last records (the rest of their batch) is taken now
            while batch := consumer.consume(batch_size, timeout=0):
                if stops:
                    batch = _paused_at_stops(consumer, batch, stops, paused)
                yield batch
                past = _mark_read(batch, ends, highs) or past
            if not past:
                return
        # Past every watermark: what a lying watermark hid comes now. Fetch until a fetch of
        # settle_s brings nothing, bounded so that steady writers cannot keep us here.
        settle_until = time.monotonic() + max(2.0, 5 * settle_s)
        while time.monotonic() < settle_until:
            batch = consumer.consume(batch_size, timeout=settle_s)
            if stops:
                batch = _paused_at_stops(consumer, batch, stops, paused)
            if not any(m.error() is None for m in batch):
                return
            yield batch
    finally:
        consumer.close()


_NEVER = 1 << 63


def _within(batch: list[Message], stops: dict[tuple[str, int], int]
            ) -> tuple[list[Message], set[tuple[str, int]]]:
    """``batch`` without the records at or past a bounded span's stop (fetched with the last
    records of the span), and the partitions whose stop it reached. Offsets grow within a
    partition: a batch whose last record of each bounded partition lies before its stop is
    returned as it is, unscanned."""
    over: set[tuple[str, int]] = set()
    seen: set[tuple[str, int]] = set()
    for m in reversed(batch):
        if m.error() is not None:
            continue
        tp = (str(m.topic()), int(m.partition() or 0))
        stop = stops.get(tp)
        if stop is None or tp in seen:
            continue
        seen.add(tp)
        if (m.offset() or 0) >= stop - 1:
            over.add(tp)
        if len(seen) == len(stops):
            break
    if not over:
        return batch, over
    return [m for m in batch if m.error() is not None or (m.offset() or 0) < stops.get(
        (str(m.topic()), int(m.partition() or 0)), _NEVER)], over


def _paused_at_stops(consumer: Consumer, batch: list[Message],
                     stops: dict[tuple[str, int], int], paused: set[tuple[str, int]]
                     ) -> list[Message]:
    """:func:`_within`, and the partitions whose stop the batch reached paused at once
    (nothing more of them is fetched and parsed for nothing)."""
    batch, reached = _within(batch, stops)
    if reached - paused:
        consumer.pause([TopicPartition(t, p) for t, p in reached - paused])
        paused |= reached
    return batch


def _mark_read(batch: list[Message], ends: dict[tuple[str, int], int],
               highs: dict[tuple[str, int], int]) -> bool:
    """Partitions whose end the batch reached leave ``ends``; True when a record lies at or
    past its partition's watermark (the watermark lied low)."""
    past = False
    seen: set[tuple[str, int]] = set()
    for m in reversed(batch):  # the last record of each partition in the batch
        if m.error() is not None:
            continue
        tp = (str(m.topic()), int(m.partition() or 0))
        if tp in seen:
            continue
        seen.add(tp)
        off = m.offset() or 0
        if off >= highs.get(tp, 0):
            past = True
        if tp in ends and off >= ends[tp] - 1:
            del ends[tp]
        if len(seen) == len(highs):
            break
    return past


# A partition just created, or whose leader just moved, answers these until metadata settles.
_SETTLING = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


def watermarks(
    consumer: Consumer, topic: str, partition: int, request_s: float, deadline: float
) -> tuple[int, int]:
    """A partition's (low, high) watermarks, riding out a leadership still settling (a topic
    just created, a leader just moved) until ``deadline`` (monotonic)."""
    delay = 0.05
    while True:
        try:
            lo, hi = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=request_s
            )
            return int(lo), int(hi)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code not in _SETTLING or time.monotonic() + delay > deadline:
                raise wrap_kafka_error(exc, f"reading offsets of {topic}[{partition}]") from exc
            time.sleep(delay)
            delay = min(1.0, delay * 2)
            if code in (KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART):
                # the client's own metadata is older than the topic: ask again, or it keeps
                # answering from its cache until the next periodic refresh (minutes)
                with contextlib.suppress(KafkaException):
                    consumer.list_topics(topic, timeout=request_s)


def _offset_at(
    consumer: Consumer, topic: str, partition: int, ts_ms: int, hi: int, timeout_s: float
) -> int:
    """The first offset whose timestamp is at or after ``ts_ms`` (``hi`` when none is)."""
    try:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, partition, ts_ms)], timeout=timeout_s
        )
    except KafkaException as exc:
        raise wrap_kafka_error(exc, f"looking up {topic}[{partition}] by time") from exc
    off = found[0].offset if found else -1
    return hi if off is None or off < 0 else int(off)
