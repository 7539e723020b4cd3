"""Copies of consumed records to a group's own topics: at the event's home partition, bytes
untouched, Spring-compatible failure headers, and delivery counted back. A fake producer stands
in for librdkafka."""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest

from pipeline.kafka import names
from pipeline.kafka.forward import Forwarder, Source, home_partition
from pipeline.kafka.names import GroupTopics
from pipeline.worker import routing
from pipeline.worker.routing import Route, big_int, read_int, route_failure

TIERS = GroupTopics("erp", "wms", (1.0, 10.0, 60.0))
GROUP = "erp.wms"
NOW_MS = 1_764_227_700_123


class FakeError:
    def __init__(self, text: str) -> None:
        self.text = text

    def str(self) -> str:
        return self.text


class Delivered:
    def __init__(self, topic: str, partition: int | None) -> None:
        self._topic, self._partition = topic, partition

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int | None:
        return self._partition


class FakeProducer:
    """Records each produce; ``poll`` serves the delivery reports (failing those in
    ``fail_topics``); ``full`` BufferErrors are raised before a produce is accepted."""

    def __init__(self, fail_topics: dict[str, str] | None = None, full: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.unacked: list[tuple[Any, Delivered]] = []
        self.fail_topics = fail_topics or {}
        self.full = full
        self.polls = 0

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Any = None,
        on_delivery: Any = None,
        partition: int | None = None,
    ) -> None:
        if self.full:
            self.full -= 1
            raise BufferError("queue full")
        self.calls.append(
            {"topic": topic, "value": value, "key": key, "headers": headers, "partition": partition}
        )
        self.unacked.append((on_delivery, Delivered(topic, partition)))

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        served, self.unacked = self.unacked, []
        for cb, msg in served:
            if cb is None:
                continue
            text = self.fail_topics.get(msg.topic())
            cb(FakeError(text) if text is not None else None, msg)
        return len(served)


class FakeMessage:
    def __init__(
        self,
        *,
        topic: str = "erp.order",
        partition: int | None = 3,
        offset: int | None = 17,
        key: bytes | None = b"k1",
        value: bytes | None = b"\x00\x01payload",
        headers: Any = None,
        timestamp: tuple[int, int] = (1, 1_700_000_000_000),
    ) -> None:
        self._t, self._p, self._o = topic, partition, offset
        self._k, self._v, self._h, self._ts = key, value, headers, timestamp

    def topic(self) -> str:
        return self._t

    def partition(self) -> int | None:
        return self._p

    def offset(self) -> int | None:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def headers(self) -> Any:
        return self._h

    def timestamp(self) -> tuple[int, int]:
        return self._ts


def _values(headers: list[tuple[str, bytes]], name: str) -> list[bytes]:
    return [v for n, v in headers if n == name]


def _one(headers: list[tuple[str, bytes]], name: str) -> bytes:
    vs = _values(headers, name)
    assert len(vs) == 1, f"{name}: {vs!r}"
    return vs[0]


def _retried_source(
    *,
    partition: int = 5,
    home: int = 2,
    hops: int = 3,
    extra: list[tuple[str, bytes]] | None = None,
) -> Source:
    """A record consumed from retry tier 1 (at ``partition``), first consumed from
    erp.order partition ``home``."""
    headers = [
        ("ce_id", b"e1"),
        (names.TRACEPARENT, b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (names.ORIGINAL_TOPIC, b"erp.order"),
        (names.ORIGINAL_PARTITION, struct.pack(">i", home)),
        (names.ORIGINAL_OFFSET, struct.pack(">q", 99)),
        (names.ORIGINAL_TIMESTAMP, struct.pack(">q", 1_700_000_000_000)),
        (names.ORIGINAL_GROUP, GROUP.encode()),
        (names.FIRST_FAILURE_TIMESTAMP, big_int(NOW_MS - 5_000)),
        (names.EXCEPTION_FQCN, b"builtins.TimeoutError"),
        (names.EXCEPTION_MESSAGE, b"old"),
        (names.ATTEMPTS, big_int(2)),
        (names.HOPS, big_int(hops)),
        (names.BACKOFF_TIMESTAMP, big_int(NOW_MS - 1_000)),
        (names.RETRY_TIER, b"1"),
        *(extra or []),
    ]
    return Source(
        "erp.wms.retry.1",
        partition,
        42,
        NOW_MS - 900,
        b"order-7",
        b"\x00\xffavro-bytes\x00",
        headers,
    )


def _first_source(partition: int = 4) -> Source:
    return Source(
        "erp.order",
        partition,
        1234,
        1_700_000_000_000,
        b"order-8",
        b'{"raw": true}',
        [("ce_id", b"e2")],
    )


# -- home_partition ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 1, 7, 300, 70_000, 2**31 - 1])
def test_home_partition_reads_the_4_byte_big_endian_header(p: int) -> None:
    hdrs = [("ce_id", b"x"), (names.ORIGINAL_PARTITION, struct.pack(">i", p))]
    assert home_partition(hdrs, 9) == p


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("ce_id", b"x")],
        [(names.ORIGINAL_PARTITION, b"")],
        [(names.ORIGINAL_PARTITION, None)],
        [(names.ORIGINAL_PARTITION, struct.pack(">i", -1))],
        [("kafka_dlt-original-partition-x", struct.pack(">i", 3))],
        [(names.ORIGINAL_OFFSET, struct.pack(">q", 3))],
    ],
)
def test_home_partition_defaults_without_a_usable_header(headers: list[Any]) -> None:
    assert home_partition(headers, 6) == 6


def test_source_home_prefers_the_header_to_the_partition_it_came_from() -> None:
    assert _retried_source(partition=5, home=2).home == 2
    assert _first_source(partition=4).home == 4


# -- Forwarder.copy ------------------------------------------------------------------------------


def test_copy_sends_bytes_unchanged_to_the_route_at_the_home_partition() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    src = _retried_source(partition=5, home=2)
    route = route_failure(TIERS, "transient", 2, NOW_MS)
    fwd.copy(src, route, error=TimeoutError("slow"), attempts=3)
    assert len(prod.calls) == 1
    call = prod.calls[0]
    assert call["topic"] == "erp.wms.retry.2"
    assert call["partition"] == 2  # home, not the partition it was consumed from (5)
    assert call["key"] == src.key
    assert call["value"] == src.value


def test_copy_headers_are_the_failure_headers() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    src = _retried_source(hops=3)
    route = route_failure(TIERS, "transient", 2, NOW_MS)
    err = ValueError("boom")
    fwd.copy(src, route, error=err, attempts=3, blocked_by="h0")
    hdrs = prod.calls[0]["headers"]
    # every header is what routing.failure_headers gives (the source carries the first-failure
    # time already, so the clock does not enter)
    assert hdrs == routing.failure_headers(
        src.headers,
        topic=src.topic,
        partition=src.partition,
        offset=src.offset,
        timestamp_ms=src.timestamp_ms,
        group=GROUP,
        error=err,
        attempts=3,
        route=route,
        now_ms=0,
        blocked_by="h0",
    )
    assert read_int(_one(hdrs, names.ATTEMPTS)) == 3
    assert read_int(_one(hdrs, names.HOPS)) == 4  # 3 before, this hop makes 4
    assert _one(hdrs, names.EXCEPTION_FQCN) == b"builtins.ValueError"
    assert _one(hdrs, names.EXCEPTION_MESSAGE) == b"boom"
    assert read_int(_one(hdrs, names.BACKOFF_TIMESTAMP)) == route.due_ms
    assert _one(hdrs, names.RETRY_TIER) == b"2"
    assert _one(hdrs, names.BLOCKED_BY) == b"h0"
    # the original position is kept from the first hop
    assert _one(hdrs, names.ORIGINAL_TOPIC) == b"erp.order"
    assert _one(hdrs, names.ORIGINAL_PARTITION) == struct.pack(">i", 2)
    assert _one(hdrs, names.ORIGINAL_OFFSET) == struct.pack(">q", 99)
    assert _one(hdrs, "ce_id") == b"e1"
    # traceparent kept as it was when none is given
    assert _one(hdrs, names.TRACEPARENT) == src.headers[1][1]


def test_first_hop_copy_records_where_the_event_came_from() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    src = _first_source(partition=4)
    before = int(time.time() * 1000)
    fwd.copy(src, route_failure(TIERS, "transient", 1, NOW_MS), error=TimeoutError("t"), attempts=2)
    after = int(time.time() * 1000)
    call = prod.calls[0]
    hdrs = call["headers"]
    assert call["topic"] == "erp.wms.retry.1"
    assert call["partition"] == 4
    assert _one(hdrs, names.ORIGINAL_TOPIC) == b"erp.order"
    assert _one(hdrs, names.ORIGINAL_PARTITION) == struct.pack(">i", 4)
    assert _one(hdrs, names.ORIGINAL_OFFSET) == struct.pack(">q", 1234)
    assert _one(hdrs, names.ORIGINAL_GROUP) == GROUP.encode()
    assert read_int(_one(hdrs, names.HOPS)) == 1
    assert read_int(_one(hdrs, names.ATTEMPTS)) == 2
    first = read_int(_one(hdrs, names.FIRST_FAILURE_TIMESTAMP))
    assert first is not None and before <= first <= after
    # the home of the copy, read back the way the next hop reads it, is the same partition
    assert home_partition(hdrs, 0) == 4


def test_copy_to_the_dlq_has_no_due_time() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    src = _retried_source(partition=1, home=3)
    dlq = route_failure(TIERS, "transient", 4, NOW_MS)
    assert dlq == Route("erp.wms.dlq", 0, None)
    fwd.copy(src, dlq, error=TimeoutError("slow"), attempts=4)
    call = prod.calls[0]
    assert call["topic"] == "erp.wms.dlq"
    assert call["partition"] == 3
    assert _values(call["headers"], names.BACKOFF_TIMESTAMP) == []
    assert _values(call["headers"], names.RETRY_TIER) == []


def test_copy_replaces_the_traceparent_when_given() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    new = "00-11111111111111111111111111111111-2222222222222222-01"
    fwd.copy(
        _retried_source(),
        route_failure(TIERS, "transient", 1, NOW_MS),
        error=None,
        attempts=2,
        traceparent=new,
    )
    hdrs = prod.calls[0]["headers"]
    assert _values(hdrs, names.TRACEPARENT) == [new.encode()]
    assert _one(hdrs, "ce_id") == b"e1"  # the rest is kept


def test_copy_adds_a_traceparent_when_the_source_had_none() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    new = "00-33333333333333333333333333333333-4444444444444444-01"
    fwd.copy(
        _first_source(),
        route_failure(TIERS, "transient", 1, NOW_MS),
        error=None,
        attempts=2,
        traceparent=new,
    )
    assert _values(prod.calls[0]["headers"], names.TRACEPARENT) == [new.encode()]


def test_copy_without_error_drops_the_previous_exception_headers() -> None:
    prod = FakeProducer()
    Forwarder(prod, GROUP).copy(
        _retried_source(), route_failure(TIERS, "transient", 1, NOW_MS), error=None, attempts=1
    )
    hdrs = prod.calls[0]["headers"]
    assert _values(hdrs, names.EXCEPTION_FQCN) == []
    assert _values(hdrs, names.EXCEPTION_MESSAGE) == []


def test_copy_does_not_change_the_source() -> None:
    src = _retried_source()
    kept = list(src.headers)
    Forwarder(FakeProducer(), GROUP).copy(
        src,
        route_failure(TIERS, "transient", 1, NOW_MS),
        error=ValueError("x"),
        attempts=2,
        traceparent="00-x",
    )
    assert src.headers == kept


# -- Forwarder.move ------------------------------------------------------------------------------


def test_move_keeps_headers_and_bytes_and_goes_home() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    src = _retried_source(partition=0, home=2)
    fwd.move(src, "erp.wms.retry.1")
    assert prod.calls == [
        {
            "topic": "erp.wms.retry.1",
            "value": src.value,
            "key": src.key,
            "headers": src.headers,
            "partition": 2,
        }
    ]


def test_move_of_a_record_without_original_partition_keeps_its_partition() -> None:
    prod = FakeProducer()
    src = _first_source(partition=6)
    Forwarder(prod, GROUP).move(src, "erp.wms.dlq")
    assert prod.calls[0]["partition"] == 6
    assert prod.calls[0]["headers"] == [("ce_id", b"e2")]


# -- delivery accounting -------------------------------------------------------------------------


def test_pending_counts_unacknowledged_sends() -> None:
    prod = FakeProducer()
    fwd = Forwarder(prod, GROUP)
    done: list[tuple[str | None, Any]] = []
    assert fwd.pending == 0
    fwd.copy(
        _first_source(),
        route_failure(TIERS, "transient", 1, NOW_MS),
        error=None,
        attempts=2,
        on_done=lambda e, m: done.append((e, m)),
    )
    fwd.move(_retried_source(), "erp.wms.retry.1", on_done=lambda e, m: done.append((e, m)))
    fwd.send("erp.wms.parked", 1, b"k", b"v")  # no callback
    assert fwd.pending == 3
    assert done == []  # nothing is reported before Kafka acknowledged it
    prod.poll()
    assert fwd.pending == 0
    assert [e for e, _ in done] == [None, None]
    assert [m.topic() for _, m in done] == ["erp.wms.retry.1", "erp.wms.retry.1"]


def test_a_refused_write_reports_its_error_text() -> None:
    prod = FakeProducer(fail_topics={"erp.wms.dlq": "Broker: Topic authorization failed"})
    fwd = Forwarder(prod, GROUP)
    done: list[tuple[str | None, Any]] = []
    fwd.move(_retried_source(), "erp.wms.dlq", on_done=lambda e, m: done.append((e, m)))
    fwd.move(_retried_source(), "erp.wms.retry.1", on_done=lambda e, m: done.append((e, m)))
    assert fwd.pending == 2
    prod.poll()
    assert fwd.pending == 0  # a refusal is an answer too: nothing is left waiting
    assert [e for e, _ in done] == ["Broker: Topic authorization failed", None]


def test_a_full_queue_is_waited_out_and_counted_once() -> None:
    prod = FakeProducer(full=2)
    fwd = Forwarder(prod, GROUP)
    fwd.send("erp.wms.retry.1", 0, b"k", b"v")
    assert len(prod.calls) == 1
    assert prod.polls == 2
    assert fwd.pending == 1
    prod.poll()
    assert fwd.pending == 0


def test_send_passes_the_partition_explicitly() -> None:
    prod = FakeProducer()
    Forwarder(prod, GROUP).send("erp.wms.parked", 0, None, None)
    assert prod.calls[0]["partition"] == 0  # 0 is a partition, not "the partitioner's"


# -- Source.of -----------------------------------------------------------------------------------


def test_source_of_a_message_with_list_headers() -> None:
    msg = FakeMessage(headers=[("ce_id", b"e1"), ("text", "plain"), ("empty", None)])
    src = Source.of(msg)
    assert src == Source(
        "erp.order",
        3,
        17,
        1_700_000_000_000,
        b"k1",
        b"\x00\x01payload",
        [("ce_id", b"e1"), ("text", b"plain"), ("empty", b"")],
    )


def test_source_of_a_message_with_dict_headers() -> None:
    msg = FakeMessage(headers={names.ORIGINAL_PARTITION: struct.pack(">i", 1), "ce_id": "e9"})
    src = Source.of(msg)
    assert src.headers == [(names.ORIGINAL_PARTITION, struct.pack(">i", 1)), ("ce_id", b"e9")]
    assert src.home == 1
    assert src.partition == 3


def test_source_of_a_message_without_headers_or_timestamp() -> None:
    src = Source.of(FakeMessage(headers=None, timestamp=(0, -1), key=None, value=None))
    assert src.headers == []
    assert src.timestamp_ms == 0
    assert src.key is None and src.value is None
    assert src.home == 3


def test_source_of_reads_the_timestamp_of_either_kind() -> None:
    assert Source.of(FakeMessage(timestamp=(2, 1_234))).timestamp_ms == 1_234  # log append
    assert Source.of(FakeMessage(timestamp=(1, 5_678))).timestamp_ms == 5_678  # create time


def test_source_of_then_copy_round_trip() -> None:
    msg = FakeMessage(
        topic="erp.wms.retry.2",
        partition=0,
        offset=8,
        headers=[
            (names.ORIGINAL_PARTITION, struct.pack(">i", 5)),
            (names.ORIGINAL_TOPIC, b"erp.order"),
            (names.HOPS, big_int(1)),
        ],
    )
    prod = FakeProducer()
    Forwarder(prod, GROUP).copy(
        Source.of(msg),
        route_failure(TIERS, "transient", 3, NOW_MS),
        error=TimeoutError("x"),
        attempts=4,
    )
    call = prod.calls[0]
    assert (call["topic"], call["partition"]) == ("erp.wms.retry.3", 5)
    assert read_int(_one(call["headers"], names.HOPS)) == 2
    assert call["value"] == b"\x00\x01payload"
