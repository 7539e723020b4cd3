"""The DLQ tool's logic, pure: positions, dead-letter records and their headers, filters, the
``ls`` table and ``stats``, replay planning and headers, and corrected copies (``dlq edit``)."""

from __future__ import annotations

import copy
import datetime as dt
import random
import re
import struct
from typing import Any

import pytest

from connectors.rest.client import TargetRefused
from pipeline.dlq.edit import corrected, merge_patch, set_path
from pipeline.dlq.records import (
    DlqRecord,
    Filter,
    FilterError,
    Position,
    from_message,
    human_age,
    parse_time,
    select,
    stats,
    table,
)
from pipeline.dlq.replay import parse_rate, plan, replay_headers
from pipeline.errors import UsageError
from pipeline.kafka import names
from pipeline.kafka.names import (
    EDIT_OF,
    EDITED_AT,
    EDITED_BY,
    REPLAY_ID,
    REPLAY_OF,
    REPLAYED_AT,
    REPLAYED_BY,
)
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder, Encoder
from pipeline.simulator.payloads import payload_for
from pipeline.worker.routing import Route, big_int, failure_headers, read_int

NOW = dt.datetime(2026, 11, 27, 7, 15, 0, tzinfo=dt.UTC)
NOW_MS = int(NOW.timestamp() * 1000)
DLQ = "erp.wms.dlq"
TO_DLQ = Route(DLQ, 0, None)
REFUSED = "connectors.rest.client.TargetRefused"


def _ms(ago: dt.timedelta) -> int:
    return int((NOW - ago).timestamp() * 1000)


def rec(pos: str = "0:1", *, ago: dt.timedelta = dt.timedelta(minutes=5), key: str = "SO-1",
        event_id: str | None = None, event_type: str | None = "order.created",
        topic: str | None = "erp.order", opart: int = 0, ooff: int = 7,
        fqcn: str | None = REFUSED, message: str | None = "HTTP 422: qty must be > 0",
        blocked_by: str | None = None, edit_of: str | None = None,
        extra: dict[str, bytes] | None = None, value: bytes | None = b"") -> DlqRecord:
    """A dead letter with the headers the worker writes (direct dict, name → bytes)."""
    h: dict[str, bytes] = {names.CE_ID: (event_id or f"ev-{pos}").encode()}
    if event_type is not None:
        h[names.CE_TYPE] = event_type.encode()
    if topic is not None:
        h[names.ORIGINAL_TOPIC] = topic.encode()
        h[names.ORIGINAL_PARTITION] = struct.pack(">i", opart)
        h[names.ORIGINAL_OFFSET] = struct.pack(">q", ooff)
    if fqcn is not None:
        h[names.EXCEPTION_FQCN] = fqcn.encode()
    if message is not None:
        h[names.EXCEPTION_MESSAGE] = message.encode()
    if blocked_by is not None:
        h[names.BLOCKED_BY] = blocked_by.encode()
    if edit_of is not None:
        h[EDIT_OF] = edit_of.encode()
    h.update(extra or {})
    return DlqRecord(DLQ, Position.parse(pos), _ms(ago), key.encode(), value, h)


def edit_rec(pos: str, of: DlqRecord, **kw: Any) -> DlqRecord:
    """A corrected copy of ``of`` as `dlq edit` writes it: same event id and headers."""
    return rec(pos, key=of.key_text, event_id=of.event_id, edit_of=str(of.position),
               blocked_by=of.blocked_by, **kw)


# -- Position -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parts", "want"), [
    ("0:42", None, Position(0, 42)),
    (" 3:7 ", [0, 1, 2, 3], Position(3, 7)),
    ("42", None, Position(0, 42)),
    ("42", [], Position(0, 42)),
    ("42", [5], Position(5, 42)),  # the one partition there is, whatever its number
])
def test_position_parse(text: str, parts: list[int] | None, want: Position) -> None:
    got = Position.parse(text, parts)
    assert got == want
    assert str(got) == f"{want.partition}:{want.offset}"


@pytest.mark.parametrize("parts", [[0, 1], [0, 1, 2]])
def test_position_offset_alone_needs_a_single_partition(parts: list[int]) -> None:
    with pytest.raises(FilterError) as e:
        Position.parse("42", parts)
    assert str(e.value) == (
        f"the DLQ has {len(parts)} partitions: give PARTITION:OFFSET (e.g. 0:42), as "
        "`pipeline dlq ls` shows it"
    )
    assert isinstance(e.value, UsageError)


@pytest.mark.parametrize("text", ["", "a:1", "1:", ":1", "-1", "0:-1", "0:1:2", "0 :1", "1.5"])
def test_position_malformed(text: str) -> None:
    with pytest.raises(FilterError) as e:
        Position.parse(text)
    assert str(e.value) == f"bad DLQ position {text!r}: give PARTITION:OFFSET, e.g. 0:42"


# -- DlqRecord ------------------------------------------------------------------------------------


def test_record_reads_the_headers_the_worker_writes() -> None:
    err = TargetRefused("HTTP 422 from wms\nline two", status=422, body='{"error":"qty"}')
    heads = failure_headers(
        [(names.CE_ID, b"ev-1"), (names.CE_TYPE, b"order.created"), (names.CE_SOURCE, b"/erp")],
        topic="erp.order", partition=2, offset=3_000_000_000, timestamp_ms=NOW_MS - 1000,
        group="wms", error=err, attempts=4, route=TO_DLQ, now_ms=NOW_MS)
    r = DlqRecord(DLQ, Position(1, 9), NOW_MS, b"SO-1", b"", dict(heads))
    assert (r.event_id, r.event_type, r.key_text) == ("ev-1", "order.created", "SO-1")
    assert r.original_topic == "erp.order"
    assert r.original_partition == 2
    assert r.original_offset == 3_000_000_000  # past 2**31: needs the 8-byte long
    assert r.original == "erp.order[2]@3000000000"
    assert r.attempts == 4
    assert r.error_fqcn == REFUSED
    assert r.error_class == "TargetRefused"
    assert r.error_message == "HTTP 422 from wms\nline two"
    assert r.blocked_by is None and r.edit_of is None
    assert r.when == NOW


@pytest.mark.parametrize(("raw", "want"), [
    (big_int(1), 1), (big_int(3), 3), (big_int(128), 128), (big_int(70_000), 70_000),
    (struct.pack(">i", 5), 5),  # older Spring: a 4-byte int
    (big_int(0), 1), (b"", 1), (None, 1),  # absent or meaningless: counted as one attempt
])
def test_record_attempts(raw: bytes | None, want: int) -> None:
    extra = {} if raw is None else {names.ATTEMPTS: raw}
    assert rec(extra=extra).attempts == want


def test_record_original_position_needs_the_right_binary_lengths() -> None:
    r = rec(extra={names.ORIGINAL_PARTITION: struct.pack(">q", 2),
                   names.ORIGINAL_OFFSET: struct.pack(">i", 7)})
    assert (r.original_partition, r.original_offset) == (None, None)
    r = rec(opart=2**31 - 1, ooff=2**40)
    assert (r.original_partition, r.original_offset) == (2**31 - 1, 2**40)
    r = rec(opart=-1, ooff=-1)  # Java's int and long are signed
    assert (r.original_partition, r.original_offset) == (-1, -1)
    bare = rec(topic=None, fqcn=None, message=None)
    assert bare.original == "?"
    assert bare.original_partition is None and bare.original_offset is None
    assert (bare.error_fqcn, bare.error_class, bare.error_message) == ("?", "?", "")


def test_record_blocked_follower_reads_as_blocked_by_dead_letter() -> None:
    f = rec(fqcn=None, message=None, blocked_by="ev-head")
    assert f.error_class == "BlockedByDeadLetter"
    assert f.error_message == "waited behind ev-head, which was dead-lettered"
    # an exception of its own wins over the blocked-by explanation
    g = rec(blocked_by="ev-head", fqcn="pipeline.errors.PayloadError", message="bad qty")
    assert (g.error_class, g.error_message) == ("PayloadError", "bad qty")


@pytest.mark.parametrize(("raw", "want"), [
    ("1:9", Position(1, 9)), ("9", Position(0, 9)), ("garbage", None), ("", None),
])
def test_record_edit_of(raw: str, want: Position | None) -> None:
    assert rec(edit_of=raw).edit_of == want


def test_an_outbox_dead_letter_reads_as_the_row_it_holds() -> None:
    r = DlqRecord("erp.outbox.dlq", Position(0, 4), int(NOW.timestamp() * 1000), b"SO-1",
                  b'{"id":41,"payload":{"total":99999999999999.99}}',
                  {names.CE_ID: b"ev-41", names.OUTBOX_POSITION: b"41",
                   names.ERROR_CLASS: b"pipeline.errors.PayloadError",
                   names.ERROR_MESSAGE: b"lines[0].qty: expected an integer"})
    assert r.outbox_row == 41
    assert r.original == "outbox row 41"
    assert (r.error_class, r.error_message) == ("PayloadError",
                                                "lines[0].qty: expected an integer")
    assert r.summary(NOW)["outbox_row"] == 41
    assert rec().outbox_row is None


def test_record_summary_is_the_stable_json_row() -> None:
    r = rec("2:15", ago=dt.timedelta(seconds=90.04), opart=1, ooff=77,
            message="HTTP 422\nsecond line", edit_of="2:3",
            extra={names.ATTEMPTS: big_int(3)})
    assert r.summary(NOW) == {
        "position": "2:15", "partition": 2, "offset": 15,
        "timestamp": "2026-11-27T07:13:29.960000+00:00", "age_s": 90.0,
        "original_topic": "erp.order", "original_partition": 1, "original_offset": 77,
        "key": "SO-1", "event_id": "ev-2:15", "event_type": "order.created", "attempts": 3,
        "error_class": "TargetRefused", "error_message": "HTTP 422", "blocked_by": None,
        "edit_of": "2:3", "outbox_row": None,
    }
    assert rec(ago=-dt.timedelta(seconds=5)).summary(NOW)["age_s"] == 0.0  # clock skew


def test_from_message_reads_a_consumer_message() -> None:
    class Msg:
        def headers(self) -> list[tuple[str, bytes | str | None]]:
            return [(names.CE_ID, b"first"), (names.CE_ID, b"last"),
                    (names.CE_TYPE, "order.created"),
                    (names.BLOCKED_BY, None)]

        def timestamp(self) -> tuple[int, int]:
            return (1, NOW_MS)

        def topic(self) -> str:
            return DLQ

        def partition(self) -> int:
            return 2

        def offset(self) -> int:
            return 40

        def key(self) -> bytes:
            return b"SO-1"

        def value(self) -> bytes:
            return b"\xc3\x01"

    r = from_message(Msg())
    assert (r.topic, r.position, r.timestamp_ms, r.key, r.value) == (
        DLQ, Position(2, 40), NOW_MS, b"SO-1", b"\xc3\x01")
    assert r.headers == {names.CE_ID: b"last", names.CE_TYPE: b"order.created",
                         names.BLOCKED_BY: b""}


# -- parse_time and Filter ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ago"), [
    ("30m", dt.timedelta(minutes=30)), ("2h", dt.timedelta(hours=2)),
    ("7d", dt.timedelta(days=7)), ("1w", dt.timedelta(weeks=1)), ("45s", dt.timedelta(seconds=45)),
    (" 1.5h ", dt.timedelta(minutes=90)), ("2 h", dt.timedelta(hours=2)),
])
def test_parse_time_durations_are_ago(text: str, ago: dt.timedelta) -> None:
    assert parse_time(text, NOW) == NOW - ago


@pytest.mark.parametrize(("text", "want"), [
    ("2026-11-27T08:00:00Z", dt.datetime(2026, 11, 27, 8, tzinfo=dt.UTC)),
    ("2026-11-27T08:00:00", dt.datetime(2026, 11, 27, 8, tzinfo=dt.UTC)),  # UTC by default
    ("2026-11-27", dt.datetime(2026, 11, 27, tzinfo=dt.UTC)),
    ("2026-11-27T10:00:00+02:00",
     dt.datetime(2026, 11, 27, 10, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
])
def test_parse_time_iso(text: str, want: dt.datetime) -> None:
    got = parse_time(text, NOW)
    assert got == want
    assert got.utcoffset() == want.utcoffset()


@pytest.mark.parametrize("text", ["yesterday", "2x", "-2h", "h", "2026-13-01"])
def test_parse_time_bad(text: str) -> None:
    with pytest.raises(FilterError) as e:
        parse_time(text, NOW)
    assert str(e.value) == (
        f"bad time {text!r}: give a duration ago (30m, 2h, 7d) or an ISO-8601 time "
        "(2026-11-27T08:00:00Z)"
    )


@pytest.mark.parametrize(("kw", "message"), [
    ({"header": ["ce_source"]}, "bad --header 'ce_source': give name=value, e.g. ce_source=/erp"),
    ({"header": ["=/erp"]}, "bad --header '=/erp': give name=value, e.g. ce_source=/erp"),
    ({"since": "1h", "until": "2h"}, "--since (1h) is after --until (2h)"),
    ({"since": "soon"}, "bad time 'soon'"),
])
def test_filter_build_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(FilterError) as e:
        Filter.build(now=NOW, **kw)
    assert str(e.value).startswith(message)


def test_filter_build_parses_times_and_headers() -> None:
    f = Filter.build(topic="erp.order", since="2h", until="2026-11-27T07:00:00",
                     header=[" ce_source=/erp", "x=a=b"], now=NOW)
    assert f.original_topic == "erp.order"
    assert f.since == NOW - dt.timedelta(hours=2)
    assert f.until == dt.datetime(2026, 11, 27, 7, tzinfo=dt.UTC)
    assert f.headers == (("ce_source", "/erp"), ("x", "a=b"))
    assert Filter.build(now=NOW) == Filter()


def test_filter_matches_topic_type_key() -> None:
    a = rec("0:1", topic="erp.order", event_type="order.created", key="SO-1")
    b = rec("0:2", topic="erp.customer", event_type="customer.upserted", key="CUST-1")
    c = rec("0:3", topic=None, event_type=None, key="SO-1")
    recs = [a, b, c]
    assert select(recs, Filter(original_topic="erp.order")) == [a]
    assert select(recs, Filter(event_type="customer.upserted")) == [b]
    assert select(recs, Filter(key="SO-1")) == [a, c]
    assert select(recs, Filter(key="SO-1", event_type="order.created")) == [a]
    assert select(recs, Filter(key="so-1")) == []  # keys are exact
    assert select(recs, Filter()) == recs


@pytest.mark.parametrize(("error", "hit"), [
    ("TargetRefused", True), ("targetrefused", True), (REFUSED, True),
    (REFUSED.upper(), True), ("client.TargetRefused", True), ("PayloadError", False),
    ("connectors.rest.client", False), ("BlockedByDeadLetter", False),
])
def test_filter_error_by_short_name_or_fqcn(error: str, hit: bool) -> None:
    assert Filter(error=error).matches(rec()) is hit


def test_filter_error_finds_blocked_followers() -> None:
    follower = rec(fqcn=None, message=None, blocked_by="ev-head")
    assert Filter(error="blockedbydeadletter").matches(follower)
    assert not Filter(error="TargetRefused").matches(follower)


def test_filter_since_until_are_inclusive() -> None:
    r = rec(ago=dt.timedelta(hours=1))
    at = NOW - dt.timedelta(hours=1)
    second = dt.timedelta(seconds=1)
    assert Filter(since=at, until=at).matches(r)
    assert not Filter(since=at + second).matches(r)
    assert not Filter(until=at - second).matches(r)
    assert Filter.build(since="2h", until="30m", now=NOW).matches(r)
    assert not Filter.build(since="30m", now=NOW).matches(r)


def test_filter_headers_must_all_match() -> None:
    r = rec(extra={names.CE_SOURCE: b"/erp", "tenant": b"a=b"})
    assert Filter(headers=(("ce_source", "/erp"),)).matches(r)
    assert Filter(headers=(("ce_source", "/erp"), ("tenant", "a=b"))).matches(r)
    assert not Filter(headers=(("ce_source", "/erp"), ("tenant", "a"))).matches(r)
    assert not Filter(headers=(("missing", ""),)).matches(r)


def test_select_keeps_order_and_stops_at_limit() -> None:
    recs = [rec(f"0:{i}", key="SO-1" if i % 2 else "SO-2") for i in range(10)]
    odd = [r for r in recs if r.key_text == "SO-1"]
    assert select(recs, Filter(key="SO-1")) == odd
    assert select(recs, Filter(key="SO-1"), limit=3) == odd[:3]
    assert select(recs, Filter(key="SO-1"), limit=1) == odd[:1]
    assert select(recs, Filter(key="SO-1"), limit=50) == odd
    assert select(iter(recs), Filter(key="none")) == []


# -- table, stats, human_age ----------------------------------------------------------------------


def test_table_header_and_rows() -> None:
    a = rec("0:12", ago=dt.timedelta(minutes=5), opart=2, ooff=77,
            message="HTTP 422: qty\nstack…", extra={names.ATTEMPTS: big_int(4)})
    b = rec("1:3", ago=dt.timedelta(seconds=30), key="SO-2", fqcn=None, message=None,
            blocked_by="ev-0:12")
    lines = table([a, b], NOW, width=200)
    assert re.match(r"POS\s+AGE\s+ORIGINAL\s+KEY\s+TYPE\s+N\s+ERROR$", lines[0])
    assert lines[1].split() == ["0:12", "5m", "order[2]@77", "SO-1", "order.created", "4",
                                "TargetRefused:", "HTTP", "422:", "qty"]
    assert lines[2].split()[:6] == ["1:3", "30s", "order[0]@7", "SO-2", "order.created", "1"]
    assert lines[2].endswith("BlockedByDeadLetter: waited behind ev-0:12, which was "
                             "dead-lettered")
    error_at = lines[0].index("ERROR")  # the columns line up
    assert lines[1][error_at:].startswith("TargetRefused")
    assert lines[2][error_at:].startswith("BlockedByDeadLetter")


@pytest.mark.parametrize("width", [None, 40, 60, 80, 100, 132, 200])
def test_table_never_wider_than_the_terminal(width: int | None) -> None:
    long = rec("11:123456789", ago=dt.timedelta(days=400), key="K" * 300,
               event_type="com.example.erp." + "very_long_event_type" * 5,
               topic="erp." + "t" * 200, opart=123, ooff=2**40,
               fqcn="a.b." + "VeryLongExceptionName" * 10, message="m" * 5000)
    short = rec("0:1", ago=dt.timedelta(seconds=3), key="", event_type=None, fqcn=None,
                message=None)
    lines = table([long, short], NOW) if width is None else table([long, short], NOW, width)
    assert len(lines) == 3
    assert max(map(len, lines)) <= (width or 80)
    assert lines[0].startswith("POS")


def test_table_cuts_long_cells_with_an_ellipsis() -> None:
    r = rec(key="SO-" + "9" * 30, event_type="order.created.with.a.long.name",
            message="x" * 500 + "\nsecond line")
    head, row = table([r], NOW, width=160)
    assert len(row) <= 160
    cells = row.split()
    assert cells[3] == "SO-99999999…" and len(cells[3]) == 12
    assert cells[4] == "order.created.with.…" and len(cells[4]) == 20
    assert row.endswith("…") and "second line" not in row
    assert head.split() == ["POS", "AGE", "ORIGINAL", "KEY", "TYPE", "N", "ERROR"]


def test_stats_by_error_sorted_by_count_then_name() -> None:
    recs = [
        rec("0:1", ago=dt.timedelta(hours=3), fqcn="pipeline.errors.PayloadError"),
        rec("0:2", ago=dt.timedelta(hours=2)),
        rec("0:3", ago=dt.timedelta(hours=1)),
        rec("0:4", ago=dt.timedelta(minutes=5)),
        rec("0:5", ago=dt.timedelta(minutes=4), fqcn=None, message=None, blocked_by="ev-0:4"),
        rec("0:6", ago=dt.timedelta(minutes=3), fqcn=None, message=None, blocked_by="ev-0:4"),
    ]
    assert stats(recs, "error") == [
        {"error": "TargetRefused", "count": 3,
         "oldest": (NOW - dt.timedelta(hours=2)).isoformat(),
         "newest": (NOW - dt.timedelta(minutes=5)).isoformat()},
        {"error": "BlockedByDeadLetter", "count": 2,
         "oldest": (NOW - dt.timedelta(minutes=4)).isoformat(),
         "newest": (NOW - dt.timedelta(minutes=3)).isoformat()},
        {"error": "PayloadError", "count": 1,
         "oldest": (NOW - dt.timedelta(hours=3)).isoformat(),
         "newest": (NOW - dt.timedelta(hours=3)).isoformat()},
    ]


def test_stats_by_type_topic_hour() -> None:
    recs = [
        rec("0:1", ago=dt.timedelta(minutes=5), event_type="order.created", topic="erp.order"),
        rec("0:2", ago=dt.timedelta(minutes=10), event_type=None, topic=None),
        rec("0:3", ago=dt.timedelta(hours=2), event_type=None, topic="erp.customer"),
    ]
    assert [(g["type"], g["count"]) for g in stats(recs, "type")] == [("?", 2),
                                                                      ("order.created", 1)]
    assert [(g["topic"], g["count"]) for g in stats(recs, "topic")] == [
        ("?", 1), ("erp.customer", 1), ("erp.order", 1)]  # ties: by name
    assert [(g["hour"], g["count"]) for g in stats(recs, "hour")] == [
        ("2026-11-27T07:00Z", 2), ("2026-11-27T05:00Z", 1)]
    assert stats([], "error") == []
    with pytest.raises(FilterError, match=r"^bad --by 'key': give error, type, topic or hour$"):
        stats(recs, "key")


@pytest.mark.parametrize(("seconds", "want"), [
    (0, "0s"), (45, "45s"), (60, "1m"), (120, "2m"), (3540, "59m"), (3600, "1.0h"),
    (5400, "1.5h"), (86400, "1.0d"), (172800, "2.0d"), (30 * 86400, "30.0d"),
])
def test_human_age(seconds: float, want: str) -> None:
    assert human_age(seconds) == want


# -- replay: rate, plan, headers -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "per_s"), [
    (None, None), ("200/s", 200.0), ("200", 200.0), ("12000/m", 200.0), ("1/h", 1 / 3600),
    (" 50/S ", 50.0), ("0.5", 0.5),
])
def test_parse_rate(text: str | None, per_s: float | None) -> None:
    assert parse_rate(text) == per_s


@pytest.mark.parametrize(("text", "message"), [
    ("fast", "bad --rate 'fast': give events per second, e.g. 200/s"),
    ("", "bad --rate '': give events per second, e.g. 200/s"),
    ("/s", "bad --rate '/s': give events per second, e.g. 200/s"),
    ("200/d", "bad --rate '200/d': give events per second, e.g. 200/s"),
])
def test_parse_rate_bad(text: str, message: str) -> None:
    with pytest.raises(FilterError) as e:
        parse_rate(text)
    assert str(e.value) == message


@pytest.mark.parametrize("text", ["0", "0/s", "-5/m", "-inf", "nan", "nan/s", "inf", "1e999/h"])
def test_parse_rate_must_be_a_positive_number(text: str) -> None:
    # float() also parses "nan" and "inf": NaN <= 0 is False, so a NaN rate used to be accepted
    # and then silently disabled throttling in send() (``i / nan`` never makes ``wait > 0``).
    with pytest.raises(FilterError) as e:
        parse_rate(text)
    msg = str(e.value)
    assert msg.startswith(f"bad --rate {text!r}: must be ")
    assert "positive" in msg


def _positions(rs: list[DlqRecord]) -> list[str]:
    return [str(r.position) for r in rs]


def test_plan_latest_edit_takes_the_originals_place() -> None:
    o1 = rec("0:1", event_id="ev-1")
    o2 = rec("0:2", event_id="ev-2")
    e1 = edit_rec("0:5", o1)
    e2 = edit_rec("0:7", o1)  # the last edit of 0:1 wins
    everything = [o1, o2, e1, e2]
    p = plan([o1, o2], everything, {})
    assert _positions(p.send) == ["0:7", "0:2"]  # 0:7 goes where 0:1 was, before 0:2
    assert _positions(p.superseded) == ["0:1"]
    assert p.already == [] and p.followers_added == 0
    # selecting every copy sends the event once, still in the original's place
    p = plan(everything, everything, {})
    assert _positions(p.send) == ["0:7", "0:2"]
    assert sorted(_positions(p.superseded)) == ["0:1", "0:5"]
    # selecting the latest edit alone sends it in the original's place too
    assert _positions(plan([o2, e2], everything, {}).send) == ["0:7", "0:2"]


def test_plan_brings_the_followers_of_a_selected_head() -> None:
    head = rec("0:10", event_id="ev-h", key="SO-1")
    f1 = rec("0:11", key="SO-1", fqcn=None, message=None, blocked_by="ev-h")
    f2 = rec("0:12", key="SO-1", fqcn=None, message=None, blocked_by="ev-h")
    other = rec("0:13", key="SO-9", fqcn=None, message=None, blocked_by="ev-x")
    everything = [head, f1, f2, other]
    p = plan([head], everything, {})
    assert _positions(p.send) == ["0:10", "0:11", "0:12"]
    assert p.followers_added == 2
    p = plan([head, f2], everything, {})  # a follower already selected is not "added"
    assert _positions(p.send) == ["0:10", "0:11", "0:12"]
    assert p.followers_added == 1
    p = plan([f1], everything, {})  # a follower does not bring its head
    assert _positions(p.send) == ["0:11"]


def test_plan_skips_what_was_replayed_unless_again() -> None:
    o1 = rec("0:1")
    o2 = rec("0:2")
    o3 = rec("0:3")
    e3 = edit_rec("0:9", o3)
    everything = [o1, o2, o3, e3]
    replayed: dict[str, object] = {"0:1": {"replay_id": "r1"}, "0:9": {"replay_id": "r1"}}
    p = plan([o1, o2, o3], everything, replayed)
    assert _positions(p.send) == ["0:2"]
    assert _positions(p.already) == ["0:1", "0:9"]  # 0:3 went as its correction 0:9
    p = plan([o1, o2, o3], everything, replayed, again=True)
    assert _positions(p.send) == ["0:1", "0:2", "0:9"]
    assert p.already == []
    # recorded under the original's position (as send() also records it): same answer
    p = plan([o3], everything, {"0:3": {}})
    assert p.send == [] and _positions(p.already) == ["0:9"]


def test_plan_orders_by_partition_then_offset_of_the_effective_place() -> None:
    a = rec("1:5", key="A")
    b = rec("0:20", key="B")
    c = rec("0:3", key="C")
    d = rec("1:2", key="D")
    c_edit = edit_rec("0:30", c)
    d_edit = edit_rec("0:31", d)  # a correction on another partition keeps d's place
    everything = [c, b, c_edit, d_edit, d, a]
    p = plan([a, b, c, d], everything, {})
    assert _positions(p.send) == ["0:30", "0:20", "0:31", "1:5"]
    assert [r.key_text for r in p.send] == ["C", "B", "D", "A"]


def test_replay_headers() -> None:
    heads = failure_headers(
        [(names.CE_ID, b"ev-1"), (names.CE_TYPE, b"order.created"), (names.CE_SOURCE, b"/erp"),
         (REPLAY_ID, b"old-replay"), (REPLAY_OF, b"erp.wms.dlq/0:1"),
         (REPLAYED_BY, b"bob@h"), (REPLAYED_AT, b"2026-01-01T00:00:00Z")],
        topic="erp.order", partition=2, offset=40, timestamp_ms=NOW_MS - 5000, group="wms",
        error=TargetRefused("HTTP 422", status=422, body="{}"), attempts=4, route=TO_DLQ,
        now_ms=NOW_MS - 1000, blocked_by="ev-0", decode_error="x")
    heads += [(names.BACKOFF_TIMESTAMP, big_int(1)), (names.RETRY_TIER, b"3")]
    r = DlqRecord(DLQ, Position(0, 12), NOW_MS, b"SO-1", b"v", dict(heads))
    now_ms = 1_764_227_700_123
    out = replay_headers(r, dlq_topic=DLQ, replay_id="rid-1", by="alice@host", now_ms=now_ms)
    got_names = [n for n, _ in out]
    assert len(got_names) == len(set(got_names)), "a header name twice"
    got = dict(out)
    for gone in (names.EXCEPTION_FQCN, names.EXCEPTION_MESSAGE, names.EXCEPTION_STACKTRACE,
                 names.BLOCKED_BY, names.TARGET_ERROR_BODY, names.DECODE_ERROR):
        assert gone not in got, gone
    for kept in (names.CE_ID, names.CE_TYPE, names.CE_SOURCE, names.ORIGINAL_TOPIC,
                 names.ORIGINAL_PARTITION, names.ORIGINAL_OFFSET, names.ORIGINAL_TIMESTAMP,
                 names.ORIGINAL_GROUP):
        assert got[kept] == r.headers[kept], kept
    assert read_int(got[names.ATTEMPTS]) == 1
    assert read_int(got[names.BACKOFF_TIMESTAMP]) == now_ms
    assert got[names.RETRY_TIER] == b"1"
    assert got[REPLAY_ID] == b"rid-1"
    assert got[REPLAY_OF] == b"erp.wms.dlq/0:12"
    assert got[REPLAYED_BY] == b"alice@host"
    assert got[REPLAYED_AT] == b"2025-11-27T07:15:00Z"
    assert r.headers[names.EXCEPTION_FQCN] == REFUSED.encode()  # the record is not changed


def test_replay_headers_of_a_correction_name_the_original() -> None:
    o = rec("3:40")
    e = edit_rec("3:77", o, extra={EDITED_BY: b"alice@host"})
    got = dict(replay_headers(e, dlq_topic=DLQ, replay_id="r", by="b", now_ms=NOW_MS))
    assert got[REPLAY_OF] == b"erp.wms.dlq/3:40"
    assert got[EDIT_OF] == b"3:40"  # provenance kept
    assert got[EDITED_BY] == b"alice@host"


# -- edit: set_path, merge_patch, corrected -------------------------------------------------------


def _doc() -> dict[str, Any]:
    return {"order_id": "SO-1", "note": "x", "lines": [{"qty": 1, "sku": "A"}, {"qty": 2}],
            "meta": {"tags": ["a"]}}


@pytest.mark.parametrize(("assignment", "path", "value"), [
    ("lines[0].qty=3", ("lines", 0, "qty"), 3),
    ("lines[1].qty=-2.5", ("lines", 1, "qty"), -2.5),
    ("note=hello world", ("note",), "hello world"),
    ('note="42"', ("note",), "42"),  # JSON string: how to force text that looks like a number
    ("note=42", ("note",), 42),
    ("note=", ("note",), ""),
    ("note=null", ("note",), None),
    ("note=true", ("note",), True),
    ("note=a=b", ("note",), "a=b"),
    ('meta={"tags": []}', ("meta",), {"tags": []}),
    ("meta.tags[0]=[1, 2]", ("meta", "tags", 0), [1, 2]),
    ("lines[1]={}", ("lines", 1), {}),
    (" lines[0].sku =B", ("lines", 0, "sku"), "B"),
])
def test_set_path(assignment: str, path: tuple[str | int, ...], value: Any) -> None:
    doc = _doc()
    set_path(doc, assignment)
    node: Any = doc
    for step in path:
        node = node[step]
    assert node == value
    assert len(doc["lines"]) == 2


@pytest.mark.parametrize(("assignment", "message"), [
    ("lines[0].qty", "bad --set 'lines[0].qty': give path=value, e.g. lines[0].qty=3"),
    ("=3", "bad --set path '': use field.sub[0].name"),
    ("lines..qty=3", "bad --set path 'lines..qty': use field.sub[0].name"),
    ("lines[x]=3", "bad --set path 'lines[x]': use field.sub[0].name"),
    ("lines[-1]=3", "bad --set path 'lines[-1]': use field.sub[0].name"),
    ("lines[0=3", "bad --set path 'lines[0': use field.sub[0].name"),
    ("note.=3", "bad --set path 'note.': use field.sub[0].name"),
    ("customer.name=3", "--set customer.name: the payload has no customer"),
    ("lines[0].unit.price=3", "--set lines[0].unit.price: the payload has no lines.0.unit"),
    ("lines[5].qty=3", "--set lines[5].qty: the payload has no lines.5"),
    ("lines[2]=3", "--set lines[2]: index 2 is past the end (2 items)"),
    ("note.x=3", "--set note.x: cannot set 'x' on a str"),
    ("lines.qty=3", "--set lines.qty: cannot set 'qty' on a list"),
    ("meta[0]=3", "--set meta[0]: cannot set 0 on a dict"),
])
def test_set_path_errors(assignment: str, message: str) -> None:
    doc = _doc()
    with pytest.raises(UsageError) as e:
        set_path(doc, assignment)
    assert str(e.value) == message
    assert doc == _doc()  # nothing changed


# RFC 7386, appendix A (plus two of ours).
@pytest.mark.parametrize(("target", "patch", "want"), [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ({"a": {"b": 1, "c": {"d": 2}}}, {"a": {"c": {"e": 3}}},
     {"a": {"b": 1, "c": {"d": 2, "e": 3}}}),
    ({"a": 1}, {}, {"a": 1}),
])
def test_merge_patch(target: Any, patch: Any, want: Any) -> None:
    before = copy.deepcopy(target)
    assert merge_patch(target, patch) == want
    assert target == before  # the target is not modified


@pytest.fixture(scope="module")
def codec() -> tuple[Decoder, Encoder]:
    cat = Catalogue.load()
    return Decoder(cat), Encoder(cat)


def _order_record(encoder: Encoder, pos: str = "0:5", **kw: Any
                  ) -> tuple[DlqRecord, dict[str, Any]]:
    payload = payload_for("order.created", random.Random(1), aggregate_id="SO-1", now=NOW)
    value = encoder.encode("order.created", payload, topic="t").value
    return rec(pos, value=value, **kw), payload


def test_corrected_applies_the_patch_then_the_sets(codec: tuple[Decoder, Encoder]) -> None:
    decoder, encoder = codec
    r, payload = _order_record(encoder, extra={names.CE_SOURCE: b"/erp"})
    value, headers, doc = corrected(
        r, decoder, encoder, sets=["lines[0].qty=42", "customer=CUST-9"],
        patch={"note": None, "customer": "CUST-from-patch", "lines": [
            {"line_no": 1, "sku": "Z-1", "qty": 1, "unit_price": "10.00"}]},
        by="alice@host")
    decoded = decoder.decode(value)
    assert decoded.event_type == "order.created"
    v = decoded.value
    assert v["customer"] == "CUST-9"  # --set after --patch
    assert [(ln["sku"], ln["qty"]) for ln in v["lines"]] == [("Z-1", 42)]
    assert v["note"] is None
    assert v["order_id"] == payload["order_id"] and v["total"] is not None
    assert doc["customer"] == "CUST-9" and doc["lines"][0]["qty"] == 42 and "note" not in doc
    got = dict(headers)
    assert len(got) == len(headers)
    assert got[EDIT_OF] == b"0:5"
    assert got[EDITED_BY] == b"alice@host"
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", got[EDITED_AT])
    for name in (names.CE_ID, names.CE_TYPE, names.CE_SOURCE, names.ORIGINAL_TOPIC,
                 names.ORIGINAL_OFFSET, names.EXCEPTION_FQCN):
        assert got[name] == r.headers[name], name
    # the copy reads back as a correction of the original
    copy_ = DlqRecord(DLQ, Position(0, 9), NOW_MS, r.key, value, got)
    assert copy_.edit_of == Position(0, 5)


def test_corrected_without_changes_keeps_the_bytes(codec: tuple[Decoder, Encoder]) -> None:
    decoder, encoder = codec
    r, _ = _order_record(encoder)
    value, _headers, _doc = corrected(r, decoder, encoder, sets=[], patch=None, by="me")
    assert value == r.value


@pytest.mark.parametrize(("sets", "patch", "field"), [
    (["lines[0].qty=many"], None, "lines[0].qty: expected an integer, got str 'many'"),
    (["qtty=3"], None, "qtty"),
    ([], {"lines": None}, "lines: required field is missing"),
])
def test_corrected_invalid_names_the_field_and_writes_nothing(
        codec: tuple[Decoder, Encoder], sets: list[str], patch: Any, field: str) -> None:
    decoder, encoder = codec
    r, _ = _order_record(encoder)
    with pytest.raises(UsageError) as e:
        corrected(r, decoder, encoder, sets=sets, patch=patch, by="me")
    msg = str(e.value)
    assert msg.startswith("the corrected order.created does not match its schema: ")
    assert field in msg
    assert msg.endswith("; nothing was written")


def test_corrected_refuses_to_edit_a_correction(codec: tuple[Decoder, Encoder]) -> None:
    decoder, encoder = codec
    r, _ = _order_record(encoder, pos="1:9", edit_of="1:5")
    with pytest.raises(UsageError) as e:
        corrected(r, decoder, encoder, sets=["note=x"], patch=None, by="me")
    assert str(e.value) == "1:9 is itself a correction of 1:5: edit the original (1:5) instead"


@pytest.mark.parametrize("value", [b"", None, b"{\"order_id\": 1}", b"\xc3\x01\x00\x00"])
def test_corrected_refuses_an_undecodable_record(codec: tuple[Decoder, Encoder],
                                                 value: bytes | None) -> None:
    decoder, encoder = codec
    r = rec("0:3", value=value)
    with pytest.raises(UsageError) as e:
        corrected(r, decoder, encoder, sets=["note=x"], patch=None, by="me")
    msg = str(e.value)
    assert msg.startswith("cannot edit 0:3: its payload cannot be decoded (")
    assert msg.endswith("); such a record can only be exported and re-published by hand")


def test_corrected_replaces_stale_edit_headers(codec: tuple[Decoder, Encoder]) -> None:
    decoder, encoder = codec
    # an unreadable edit-of header does not make the record a correction, and is replaced
    r, _ = _order_record(encoder, pos="2:8", edit_of="junk",
                         extra={EDITED_BY: b"mallory", EDITED_AT: b"long ago"})
    _value, headers, _doc = corrected(r, decoder, encoder, sets=["note=ok"], patch=None,
                                      by="alice")
    names = [n for n, _ in headers]
    for name in (EDIT_OF, EDITED_BY, EDITED_AT):
        assert names.count(name) == 1, name
    got = dict(headers)
    assert (got[EDIT_OF], got[EDITED_BY]) == (b"2:8", b"alice")
    assert got[EDITED_AT] != b"long ago"


@pytest.mark.parametrize("path", ["lines[0]qty", ".note", "lines.[0].qty", "a..b", "note."])
def test_set_path_refuses_malformed_paths(path: str) -> None:
    doc = {"note": "x", "lines": [{"qty": 1}]}
    with pytest.raises(UsageError, match="bad --set path"):
        set_path(doc, f"{path}=1")
    assert doc == {"note": "x", "lines": [{"qty": 1}]}


def test_error_filter_matches_a_class_name_not_any_suffix() -> None:
    from pipeline.dlq.records import DlqRecord, Filter, Position

    def rec(fqcn: str) -> DlqRecord:
        return DlqRecord("t", Position(0, 0), 0, b"k", b"",
                         {names.EXCEPTION_FQCN: fqcn.encode()})

    target = rec("connectors.rest.client.TargetRefused")
    row = rec("connectors.bi.postgres.RowRefused")
    assert Filter.build(error="TargetRefused").matches(target)
    assert not Filter.build(error="TargetRefused").matches(row)
    assert not Filter.build(error="Refused").matches(target)
    assert Filter.build(error="client.targetrefused").matches(target)
    assert Filter.build(error="connectors.bi.postgres.RowRefused").matches(row)
