"""Retry tiers, where a failure goes next, and the Spring-compatible failure headers."""

from __future__ import annotations

import random
import struct

import pytest

from pipeline.kafka import names
from pipeline.kafka.names import GroupTopics as Tiers
from pipeline.worker.routing import Route, big_int, failure_headers, read_int, route_failure

TIERS = Tiers("erp", "wms", (1.0, 10.0, 60.0))
NOW_MS = 1_764_227_700_123


def _java_to_byte_array(n: int) -> bytes:
    """Reference: java.math.BigInteger.toByteArray() (bitLength excludes the sign bit)."""
    bit_length = n.bit_length() if n >= 0 else (~n).bit_length()
    return n.to_bytes(bit_length // 8 + 1, "big", signed=True)


def _names(headers: list[tuple[str, bytes]]) -> list[str]:
    return [n for n, _ in headers]


def _one(headers: list[tuple[str, bytes]], name: str) -> bytes:
    values = [v for n, v in headers if n == name]
    assert len(values) == 1, f"{name}: {values!r}"
    return values[0]


# -- Tiers ---------------------------------------------------------------------------------------


def test_topic_names() -> None:
    assert TIERS.retry_topic(1) == "erp.wms.retry.1"
    assert TIERS.retry_topic(3) == "erp.wms.retry.3"
    assert TIERS.dlq_topic == "erp.wms.dlq"
    assert TIERS.parked_topic == "erp.wms.parked"
    assert TIERS.retry_topics == ["erp.wms.retry.1", "erp.wms.retry.2", "erp.wms.retry.3"]


def test_no_delays_means_no_retry_topics() -> None:
    assert Tiers("p", "g", ()).retry_topics == []


@pytest.mark.parametrize(
    ("topic", "tier"),
    [
        ("erp.wms.retry.1", 1),
        ("erp.wms.retry.3", 3),
        ("erp.wms.retry.12", 12),
        ("erp.order", 0),
        ("erp.wms.dlq", 0),
        ("erp.wms.parked", 0),
        ("erp.wms.retry.", 0),
        ("erp.wms.retry.x", 0),
        ("erp.wms.retry.1a", 0),
        ("erp.wms.retry.-1", 0),
        ("erp.other.retry.1", 0),  # another group's retry topic
        ("xerp.wms.retry.1", 0),
        ("erp.wms.retry", 0),
    ],
)
def test_tier_of(topic: str, tier: int) -> None:
    assert TIERS.tier_of(topic) == tier


def test_tier_of_inverts_retry_topic() -> None:
    for t in (Tiers("a.b", "c.d", (1, 2, 3, 4, 5)), Tiers("p", "g", (0.5,))):
        for i, name in enumerate(t.retry_topics, start=1):
            assert t.tier_of(name) == i


def test_tiers_are_frozen() -> None:
    with pytest.raises(AttributeError):
        TIERS.prefix = "x"  # type: ignore[misc]


# -- route_failure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "tier", "delay_ms"), [(1, 1, 1_000), (2, 2, 10_000), (3, 3, 60_000)]
)
def test_transient_failures_climb_the_tiers(failures: int, tier: int, delay_ms: int) -> None:
    route = route_failure(TIERS, "transient", failures, NOW_MS)
    assert route == Route(f"erp.wms.retry.{tier}", tier, NOW_MS + delay_ms)
    assert not route.is_dlq


@pytest.mark.parametrize("failures", [4, 5, 100])
def test_transient_failures_past_the_last_tier_go_to_the_dlq(failures: int) -> None:
    route = route_failure(TIERS, "transient", failures, NOW_MS)
    assert route == Route("erp.wms.dlq", 0, None)
    assert route.is_dlq


@pytest.mark.parametrize("failures", [1, 2, 3, 4])
def test_permanent_failures_go_to_the_dlq_at_once(failures: int) -> None:
    route = route_failure(TIERS, "permanent", failures, NOW_MS)
    assert route == Route("erp.wms.dlq", 0, None)


def test_no_tiers_sends_transient_failures_to_the_dlq() -> None:
    assert route_failure(Tiers("p", "g", ()), "transient", 1, NOW_MS).is_dlq


def test_fractional_delays_are_in_milliseconds() -> None:
    t = Tiers("p", "g", (0.25, 1.5))
    assert route_failure(t, "transient", 1, 1000).due_ms == 1250
    assert route_failure(t, "transient", 2, 1000).due_ms == 2500


def test_delay_is_not_shortened_by_float_truncation() -> None:
    # 2.01 s is 2010 ms; int(2.01 * 1000) would give 2009.
    delays = [d / 100 for d in range(1, 10_000)] + [d / 1000 for d in range(1, 5_000)]
    wrong = {}
    for delay_s in delays:
        due = route_failure(Tiers("p", "g", (delay_s,)), "transient", 1, 0).due_ms
        if due != round(delay_s * 1000):
            wrong[delay_s] = due
    assert wrong == {}


# -- integer encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x00\x80"),
        (255, b"\x00\xff"),
        (256, b"\x01\x00"),
        (32767, b"\x7f\xff"),
        (32768, b"\x00\x80\x00"),
        (NOW_MS, _java_to_byte_array(NOW_MS)),
        (-1, b"\xff"),
        (-127, b"\x81"),
    ],
)
def test_big_int_matches_java_biginteger(n: int, encoded: bytes) -> None:
    assert big_int(n) == encoded


def test_big_int_matches_java_for_non_negative_values() -> None:
    rng = random.Random(3)
    values = list(range(0, 70_000)) + [rng.randrange(0, 2**63) for _ in range(2000)]
    values += [2**k for k in range(64)] + [2**k - 1 for k in range(1, 64)]
    for n in values:
        assert big_int(n) == _java_to_byte_array(n), n


def test_big_int_is_minimal_for_negative_values() -> None:
    # BigInteger.valueOf(-128).toByteArray() is [0x80]: one byte, not two.
    values = list(range(-70_000, 0)) + [-(2**k) for k in range(64)]
    wrong = {n: big_int(n) for n in values if big_int(n) != _java_to_byte_array(n)}
    assert wrong == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (b"", None),
        ("", None),
        # short values are Spring's binary BigInteger bytes, even when they look like digits
        (b"1", 49),
        (b"42", 0x3432),
        # only a long all-digit value (older Spring's text timestamps) is read as text
        ("1764227700123", 1_764_227_700_123),
        (struct.pack(">i", 7), 7),
        (struct.pack(">i", 70_000), 70_000),
        (struct.pack(">q", NOW_MS), NOW_MS),
        (b"\x01", 1),
        (b"\x00\x80", 128),
        (b"\xff", -1),
        (struct.pack(">i", -1), -1),
    ],
)
def test_read_int_text_and_binary(value: bytes | str | None, expected: int | None) -> None:
    assert read_int(value) == expected


def test_read_int_reads_back_struct_encodings() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        p = rng.randrange(0, 2**31)
        assert read_int(struct.pack(">i", p)) == p
        q = rng.randrange(0, 2**63)
        assert read_int(struct.pack(">q", q)) == q


def test_read_int_reads_back_realistic_big_int_timestamps() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        ms = rng.randrange(1_500_000_000_000, 4_000_000_000_000)
        assert read_int(big_int(ms)) == ms


def test_read_int_round_trips_every_small_big_int() -> None:
    # Attempt counters are written with big_int; every one of them must read back. A single
    # byte 0x30..0x39 (48..57) is also an ASCII digit: it must not be taken for text.
    wrong = {n: read_int(big_int(n)) for n in range(0, 70_000) if read_int(big_int(n)) != n}
    assert wrong == {}


# -- failure_headers -------------------------------------------------------------------------------


def _first_hop(error: BaseException | None = None, **kw: object) -> list[tuple[str, bytes]]:
    route = route_failure(TIERS, "transient", 1, NOW_MS)
    args: dict[str, object] = {
        "topic": "erp.order",
        "partition": 3,
        "offset": 12_345_678_901,
        "timestamp_ms": NOW_MS - 5000,
        "group": "wms",
        "error": error if error is not None else TimeoutError("target timed out"),
        "attempts": 2,
        "route": route,
        "now_ms": NOW_MS,
    }
    args.update(kw)
    headers = kw.pop("headers", [("ce_id", b"ev-1"), ("ce_type", "order.created")])
    args.pop("headers", None)
    return failure_headers(headers, **args)  # type: ignore[arg-type]


def test_first_hop_records_the_original_position_in_spring_encodings() -> None:
    h = _first_hop()
    assert _one(h, names.ORIGINAL_TOPIC) == b"erp.order"
    partition = _one(h, names.ORIGINAL_PARTITION)
    assert len(partition) == 4
    assert struct.unpack(">i", partition)[0] == 3
    offset = _one(h, names.ORIGINAL_OFFSET)
    assert len(offset) == 8
    assert struct.unpack(">q", offset)[0] == 12_345_678_901
    ts = _one(h, names.ORIGINAL_TIMESTAMP)
    assert len(ts) == 8
    assert struct.unpack(">q", ts)[0] == NOW_MS - 5000
    assert _one(h, names.ORIGINAL_GROUP) == b"wms"
    assert _one(h, names.FIRST_FAILURE_TIMESTAMP) == _java_to_byte_array(NOW_MS)


def test_first_hop_keeps_the_events_own_headers_first_and_encodes_text() -> None:
    h = _first_hop(headers=[("ce_id", b"ev-1"), ("ce_type", "order.created"), ("empty", None)])
    assert h[:3] == [("ce_id", b"ev-1"), ("ce_type", b"order.created"), ("empty", b"")]
    assert all(isinstance(v, bytes) for _, v in h)


def test_retry_route_headers() -> None:
    h = _first_hop(attempts=2)
    assert _one(h, names.ATTEMPTS) == b"\x02"
    assert read_int(_one(h, names.BACKOFF_TIMESTAMP)) == NOW_MS + 1000
    assert _one(h, names.BACKOFF_TIMESTAMP) == _java_to_byte_array(NOW_MS + 1000)
    assert _one(h, names.RETRY_TIER) == b"1"


def test_dlq_route_has_no_backoff_or_tier() -> None:
    h = _first_hop(route=route_failure(TIERS, "permanent", 1, NOW_MS))
    got = _names(h)
    assert names.BACKOFF_TIMESTAMP not in got
    assert names.RETRY_TIER not in got
    assert names.ATTEMPTS in got


def test_exception_headers() -> None:
    h = _first_hop(error=ValueError("bad sku 'X'"))
    assert _one(h, names.EXCEPTION_FQCN) == b"builtins.ValueError"
    assert _one(h, names.EXCEPTION_MESSAGE) == b"bad sku 'X'"
    assert b"ValueError: bad sku 'X'" in _one(h, names.EXCEPTION_STACKTRACE)


class _Outer:
    class TargetRejected(Exception):
        target_error_body = '{"error": "unknown sku"}'


def test_exception_fqcn_uses_module_and_qualname_and_keeps_the_target_body() -> None:
    h = _first_hop(error=_Outer.TargetRejected("422"))
    assert _one(h, names.EXCEPTION_FQCN) == f"{__name__}._Outer.TargetRejected".encode()
    assert _one(h, names.TARGET_ERROR_BODY) == b'{"error": "unknown sku"}'


def test_raised_exception_carries_its_stacktrace() -> None:
    def boom() -> None:
        raise RuntimeError("deep failure")

    try:
        boom()
    except RuntimeError as exc:
        h = _first_hop(error=exc)
    trace = _one(h, names.EXCEPTION_STACKTRACE).decode()
    assert "boom" in trace
    assert "RuntimeError: deep failure" in trace


def test_long_exception_texts_are_capped() -> None:
    h = _first_hop(error=RuntimeError("x" * 10_000))
    assert len(_one(h, names.EXCEPTION_MESSAGE)) == 4000
    assert len(_one(h, names.EXCEPTION_STACKTRACE)) == 8000
    # The tail of the trace (the exception line) is what is kept.
    assert _one(h, names.EXCEPTION_STACKTRACE).endswith(b"x\n")


def test_no_error_means_no_exception_headers() -> None:
    h = failure_headers(
        [("ce_id", b"e")],
        topic="erp.order",
        partition=0,
        offset=1,
        timestamp_ms=NOW_MS,
        group="wms",
        error=None,
        attempts=1,
        route=route_failure(TIERS, "transient", 1, NOW_MS),
        now_ms=NOW_MS,
        blocked_by="ev-0",
    )
    got = _names(h)
    assert names.EXCEPTION_FQCN not in got
    assert names.EXCEPTION_MESSAGE not in got
    assert names.EXCEPTION_STACKTRACE not in got
    assert _one(h, names.BLOCKED_BY) == b"ev-0"


def test_decode_error_header() -> None:
    h = _first_hop(decode_error="bad magic byte", route=Route(TIERS.dlq_topic, 0, None))
    assert _one(h, names.DECODE_ERROR) == b"bad magic byte"


def test_second_hop_keeps_the_original_position_and_replaces_per_hop_headers() -> None:
    first = _first_hop(error=TimeoutError("first"), attempts=2, blocked_by="ev-0")
    second_route = route_failure(TIERS, "transient", 2, NOW_MS + 60_000)
    second = failure_headers(
        first,
        topic="erp.wms.retry.1",
        partition=0,
        offset=7,
        timestamp_ms=NOW_MS + 1000,
        group="wms",
        error=ConnectionError("second"),
        attempts=3,
        route=second_route,
        now_ms=NOW_MS + 60_000,
    )
    # Original position: still the main topic's, exactly once each.
    assert _one(second, names.ORIGINAL_TOPIC) == b"erp.order"
    assert struct.unpack(">i", _one(second, names.ORIGINAL_PARTITION))[0] == 3
    assert struct.unpack(">q", _one(second, names.ORIGINAL_OFFSET))[0] == 12_345_678_901
    assert struct.unpack(">q", _one(second, names.ORIGINAL_TIMESTAMP))[0] == NOW_MS - 5000
    assert _one(second, names.ORIGINAL_GROUP) == b"wms"
    # First failure time kept across hops.
    assert read_int(_one(second, names.FIRST_FAILURE_TIMESTAMP)) == NOW_MS
    # Per-hop headers replaced, never piled up.
    assert _one(second, names.EXCEPTION_FQCN) == b"builtins.ConnectionError"
    assert _one(second, names.EXCEPTION_MESSAGE) == b"second"
    assert b"first" not in _one(second, names.EXCEPTION_STACKTRACE)
    assert read_int(_one(second, names.ATTEMPTS)) == 3
    assert read_int(_one(second, names.BACKOFF_TIMESTAMP)) == NOW_MS + 60_000 + 10_000
    assert _one(second, names.RETRY_TIER) == b"2"
    assert names.BLOCKED_BY not in _names(second)
    # The event's own headers survive both hops.
    assert _one(second, "ce_id") == b"ev-1"
    assert _one(second, "ce_type") == b"order.created"


def test_many_hops_never_grow_the_header_list() -> None:
    headers: list[tuple[str, bytes]] = [("ce_id", b"ev-1")]
    sizes = []
    for hop in range(1, 5):  # tiers 1, 2, 3, then the DLQ
        route = route_failure(TIERS, "transient", hop, NOW_MS + hop)
        assert route.is_dlq == (hop == 4)
        headers = failure_headers(
            headers,
            topic=TIERS.retry_topic(hop - 1) if hop > 1 else "erp.order",
            partition=hop,
            offset=hop * 10,
            timestamp_ms=NOW_MS + hop,
            group="wms",
            error=TimeoutError(f"hop {hop}"),
            attempts=hop + 1,
            route=route,
            now_ms=NOW_MS + hop,
        )
        sizes.append(len(headers))
        assert len(_names(headers)) == len(set(_names(headers)))
    assert sizes[0] == sizes[1] == sizes[2]
    assert sizes[3] == sizes[2] - 2  # no backoff timestamp, no tier on the DLQ
    assert struct.unpack(">i", _one(headers, names.ORIGINAL_PARTITION))[0] == 1
    assert read_int(_one(headers, names.FIRST_FAILURE_TIMESTAMP)) == NOW_MS + 1
    assert _one(headers, names.EXCEPTION_MESSAGE) == b"hop 4"
