"""Dead-lettered records as the on-call engineer sees them (pure: no broker here).

A DLQ record is the failed event's bytes, untouched, with Spring Kafka's dead-letter headers
(see :mod:`pipeline.worker.routing`) and ours. Its position in the DLQ topic is written
``P:O`` (partition and offset); ``O`` alone is enough when the DLQ has one partition.
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pipeline.errors import UsageError
from pipeline.kafka import names
from pipeline.kafka.names import (
    EDIT_OF,
)
from pipeline.worker import routing


class FilterError(UsageError, ValueError):
    """A filter option or position the user gave cannot be understood (exit code 2)."""


@dataclass(frozen=True)
class Position:
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str, partitions: Sequence[int] | None = None) -> Position:
        """``P:O``, or ``O`` when the topic has a single partition."""
        m = re.fullmatch(r"\s*(?:(\d+):)?(\d+)\s*", text)
        if not m:
            raise FilterError(f"bad DLQ position {text!r}: give PARTITION:OFFSET, e.g. 0:42")
        if m.group(1) is None:
            if partitions is not None and len(partitions) > 1:
                raise FilterError(
                    f"the DLQ has {len(partitions)} partitions: give PARTITION:OFFSET "
                    f"(e.g. {partitions[0]}:{m.group(2)}), as `pipeline dlq ls` shows it"
                )
            return cls(partitions[0] if partitions else 0, int(m.group(2)))
        return cls(int(m.group(1)), int(m.group(2)))


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NOWHERE = Position(-1, -1)
_MICROSECOND = dt.timedelta(microseconds=1)


def _text(v: bytes | None) -> str | None:
    return v.decode("utf-8", "replace") if v is not None else None


@dataclass(slots=True)
class DlqRecord:
    """One dead letter: its position, time, key, value and headers (last value per name)."""

    topic: str
    position: Position
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)

    # -- what the headers say ---------------------------------------------------------------------
    def header(self, name: str) -> str | None:
        return _text(self.headers.get(name))

    @property
    def event_id(self) -> str | None:
        return self.header(names.CE_ID)

    @property
    def event_type(self) -> str | None:
        return self.header(names.CE_TYPE)

    @property
    def key_text(self) -> str:
        return _text(self.key) or ""

    @property
    def original_topic(self) -> str | None:
        return self.header(names.ORIGINAL_TOPIC)

    @property
    def original_partition(self) -> int | None:
        v = self.headers.get(names.ORIGINAL_PARTITION)
        return struct.unpack(">i", v)[0] if v is not None and len(v) == 4 else None

    @property
    def original_offset(self) -> int | None:
        v = self.headers.get(names.ORIGINAL_OFFSET)
        return struct.unpack(">q", v)[0] if v is not None and len(v) == 8 else None

    @property
    def outbox_row(self) -> int | None:
        """The outbox id of a row the relay dead-lettered (``<prefix>.outbox.dlq``), else None:
        such a record holds the stored row as JSON, not an Avro event."""
        if names.ERROR_CLASS not in self.headers:
            return None
        try:
            return int(self.header(names.OUTBOX_POSITION) or "")
        except ValueError:
            return -1

    @property
    def original(self) -> str:
        if self.outbox_row is not None:
            return f"outbox row {self.outbox_row}"
        if self.original_topic is None:
            return "?"
        return f"{self.original_topic}[{self.original_partition}]@{self.original_offset}"

    @property
    def attempts(self) -> int:
        try:
            return routing.read_int(self.headers.get(names.ATTEMPTS)) or 1
        except ValueError:
            return 1

    @property
    def error_fqcn(self) -> str:
        return self.header(names.EXCEPTION_FQCN) or self.header(names.ERROR_CLASS) or "?"

    @property
    def error_class(self) -> str:
        """The short class name: ``TargetRefused`` for ``connectors.rest.client.TargetRefused``;
        ``BlockedByDeadLetter`` for a strict-ordering follower."""
        if self.blocked_by and names.EXCEPTION_FQCN not in self.headers:
            return "BlockedByDeadLetter"
        return self.error_fqcn.rsplit(".", 1)[-1]

    @property
    def error_message(self) -> str:
        if self.blocked_by and names.EXCEPTION_MESSAGE not in self.headers:
            return f"waited behind {self.blocked_by}, which was dead-lettered"
        return self.header(names.EXCEPTION_MESSAGE) or self.header(names.ERROR_MESSAGE) or ""

    @property
    def blocked_by(self) -> str | None:
        return self.header(names.BLOCKED_BY)

    @property
    def edit_of(self) -> Position | None:
        v = self.header(EDIT_OF)
        try:
            return Position.parse(v) if v else None
        except FilterError:
            return None

    @property
    def when(self) -> dt.datetime:
        return _EPOCH + dt.timedelta(milliseconds=self.timestamp_ms)

    def age_s(self, now: dt.datetime) -> float:
        return max(0.0, (now - self.when).total_seconds())

    def summary(self, now: dt.datetime) -> dict[str, Any]:
        """The stable JSON form of a row of ``pipeline dlq ls``."""
        return {
            "position": str(self.position),
            "partition": self.position.partition,
            "offset": self.position.offset,
            "timestamp": self.when.isoformat(),
            "age_s": round(self.age_s(now), 1),
            "original_topic": self.original_topic,
            "original_partition": self.original_partition,
            "original_offset": self.original_offset,
            "key": self.key_text,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "attempts": self.attempts,
            "error_class": self.error_class,
            "error_message": self.error_message.splitlines()[0] if self.error_message else "",
            "blocked_by": self.blocked_by,
            "edit_of": str(self.edit_of) if self.edit_of else None,
            "outbox_row": self.outbox_row,
        }


# -- filters --------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: dt.datetime) -> dt.datetime:
    """``2h`` / ``30m`` / ``7d`` (ago), or an ISO-8601 time (UTC when no zone is given)."""
    t = text.strip()
    m = _DURATION.match(t)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise FilterError(
            f"bad time {text!r}: give a duration ago (30m, 2h, 7d) or an ISO-8601 time "
            "(2026-11-27T08:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Filter:
    original_topic: str | None = None
    event_type: str | None = None
    key: str | None = None
    error: str | None = None  # class name, full or dotted tail (case-insensitive)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, *, topic: str | None = None, event_type: str | None = None,
              key: str | None = None, error: str | None = None, since: str | None = None,
              until: str | None = None, header: Iterable[str] = (),
              now: dt.datetime | None = None) -> Filter:
        now = now or dt.datetime.now(dt.UTC)
        pairs = []
        for h in header:
            name, sep, value = h.partition("=")
            if not sep or not name:
                raise FilterError(f"bad --header {h!r}: give name=value, e.g. ce_source=/erp")
            pairs.append((name.strip(), value))
        f = cls(topic, event_type, key, error, parse_time(since, now) if since else None,
                parse_time(until, now) if until else None, tuple(pairs))
        if f.since and f.until and f.since > f.until:
            raise FilterError(f"--since ({since}) is after --until ({until})")
        return f

    def matches(self, r: DlqRecord) -> bool:
        if not self._matches_headers(r):
            return False
        if self.key is not None and r.key_text != self.key:
            return False
        if self.since is not None and r.when < self.since:
            return False
        return not (self.until is not None and r.when > self.until)

    def _matches_headers(self, r: DlqRecord) -> bool:
        """What :meth:`matches` asks of the headers (topic, type, error class, --header)."""
        if self.original_topic is not None and r.original_topic != self.original_topic:
            return False
        if self.event_type is not None and r.event_type != self.event_type:
            return False
        if self.error is not None:
            want = self.error.lower()
            fqcn = r.error_fqcn.lower()
            if r.error_class.lower() != want and fqcn != want and not fqcn.endswith("." + want):
                return False
        return all(r.header(name) == value for name, value in self.headers)

    def message_predicate(self) -> Callable[[bytes | None, int], bool] | None:
        """What :meth:`matches` asks of a record's key and timestamp (ms), as a test on the
        raw key and timestamp that needs no headers (a record it refuses is not built); None
        when the filter asks nothing of them."""
        if self.key is None and self.since is None and self.until is None:
            return None
        key_ok = _key_test(self.key)
        lo = _micros(self.since) if self.since is not None else None
        hi = _micros(self.until) if self.until is not None else None

        def test(key: bytes | None, ts_ms: int) -> bool:
            if key_ok is not None and not key_ok(key):
                return False
            us = ts_ms * 1000  # DlqRecord.when, exactly
            return (lo is None or us >= lo) and (hi is None or us <= hi)

        return test

    def headers_predicate(self) -> Callable[[Mapping[str, bytes | None]], bool] | None:
        """What :meth:`matches` asks of the headers, as a test on a record's headers (name →
        value; None: a header without a value, which a record reads as empty) that is worked
        out once per distinct value of the headers it reads (a DLQ holds few error classes,
        types and topics); None when the filter asks nothing of them."""
        names_read: list[str] = []
        if self.original_topic is not None:
            names_read.append(names.ORIGINAL_TOPIC)
        if self.event_type is not None:
            names_read.append(names.CE_TYPE)
        if self.error is not None:
            names_read += [names.EXCEPTION_FQCN, names.ERROR_CLASS]
        names_read += [name for name, _value in self.headers]
        read = tuple(dict.fromkeys(names_read))
        if not read:
            return None
        blocked = self.error is not None  # a follower's error class: whether it waited
        memo: dict[Any, bool] = {}

        def worked_out(seen: Any, h: Mapping[str, bytes | None]) -> bool:
            ok = memo[seen] = self._matches_headers(
                DlqRecord("", _NOWHERE, 0, None, None, _present(h)))
            return ok

        # the usual filters (--error, --type, --topic) read one or two headers: tests without
        # a loop (the test runs once per record)
        if len(read) == 1 and not blocked:
            (one,) = read

            def test_one(h: Mapping[str, bytes | None]) -> bool:
                seen = h.get(one, _ABSENT)
                ok = memo.get(seen)
                return worked_out(seen, h) if ok is None else ok

            return test_one
        if len(read) == 2 and blocked:
            one, two = read
            blocked_by = names.BLOCKED_BY

            def test_error(h: Mapping[str, bytes | None]) -> bool:
                get = h.get
                seen = (get(one, _ABSENT), get(two, _ABSENT), bool(get(blocked_by)))
                ok = memo.get(seen)
                return worked_out(seen, h) if ok is None else ok

            return test_error
        absent = (_ABSENT,) * len(read)

        def test(h: Mapping[str, bytes | None]) -> bool:
            seen: Any = tuple(map(h.get, read, absent))
            if blocked:
                seen = (seen, bool(h.get(names.BLOCKED_BY)))
            ok = memo.get(seen)
            return worked_out(seen, h) if ok is None else ok

        return test

    def predicate(self) -> Callable[[DlqRecord], bool]:
        """:meth:`matches` as one function, fast over many records."""
        on_message = self.message_predicate()
        on_headers = self.headers_predicate()

        def test(r: DlqRecord) -> bool:
            if on_message is not None and not on_message(r.key, r.timestamp_ms):
                return False
            return on_headers is None or on_headers(r.headers)

        return test


_ABSENT = object()


def _micros(when: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (``when`` with a zone)."""
    return (when - _EPOCH) // _MICROSECOND


def _key_test(want: str | None) -> Callable[[bytes | None], bool] | None:
    """``DlqRecord.key_text == want`` on the raw key."""
    if want is None:
        return None
    try:
        raw = want.encode()
    except UnicodeEncodeError:  # lone surrogates: no decoded key equals it
        raw = None
    if raw is None or "\ufffd" in want:  # a replaced byte may be anywhere: decode to compare
        return lambda key: (_text(key) or "") == want
    if not raw:
        return lambda key: not key
    return lambda key: key == raw


def select(records: Iterable[DlqRecord], flt: Filter, limit: int | None = None
           ) -> list[DlqRecord]:
    test = flt.predicate()
    if limit is None:
        return [r for r in records if test(r)]
    out = []
    for r in records:
        if test(r):
            out.append(r)
            if len(out) >= limit:
                break
    return out


# -- output ---------------------------------------------------------------------------------------


def human_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


LS_COLUMNS = ("POS", "AGE", "ORIGINAL", "KEY", "TYPE", "N", "ERROR")


# A ``pipeline dlq ls`` row's first six cells (the error apart: it is cut to the room left)
Cells = tuple[str, str, str, str, str, str]


def table(records: Sequence[DlqRecord], now: dt.datetime, width: int = 80) -> list[str]:
    """``pipeline dlq ls`` as lines no wider than ``width`` (the error takes what is left)."""
    return layout(*ls_cells(records, now), width)


def layout(rows: Sequence[Cells], errors: Sequence[str], width: int = 80) -> list[str]:
    """:func:`ls_cells`'s rows and errors as ``pipeline dlq ls`` lines, under the column
    names, no wider than ``width``."""
    head = LS_COLUMNS
    columns = list(zip(*rows, strict=True)) if rows else [()] * 6
    widths = [max(len(head[i]), max(map(len, columns[i]), default=0)) for i in range(6)]
    used = sum(widths) + 2 * 6
    room = max(10, width - used)
    cut = room - 1
    # the six cells padded in one format, then the error cut to the room left
    fmt = "  ".join(f"%-{w}s" for w in widths) + "  "
    out = [fmt % head[:6] + head[6]]
    out += [fmt % row + (e if len(e) <= room else e[:cut] + "…")
            for row, e in zip(rows, errors, strict=True)]
    if used + room <= width:  # every line fits
        return out
    return [line[:width] if len(line) > width else line for line in out]


# What many rows share: the original topic and partition, the type, the attempts, the error
# class (and whether the record is an outbox row: the relay's DLQ, which writes an error class)
_SHARED = (names.ORIGINAL_TOPIC, names.ORIGINAL_PARTITION, names.CE_TYPE, names.ATTEMPTS,
           names.EXCEPTION_FQCN, names.ERROR_CLASS)
_SHARED_ABSENT = (_ABSENT,) * len(_SHARED)


def ls_cells(records: Sequence[DlqRecord], now: dt.datetime
             ) -> tuple[list[Cells], list[str]]:
    """The cells of ``pipeline dlq ls`` rows (the first six, and the errors apart), as
    :class:`DlqRecord`'s properties give them; what many records share (a topic, a type, an
    error class, an age, a key) is worked out once."""
    now_us = _micros(now)
    shared: dict[tuple[Any, ...], tuple[str | None, str, str, str]] = {}
    ages: dict[int, str] = {}
    keys: dict[bytes | None, str] = {}
    blocked_by, exc_message, err_message = (names.BLOCKED_BY, names.EXCEPTION_MESSAGE,
                                            names.ERROR_MESSAGE)
    original_offset, unpack = names.ORIGINAL_OFFSET, _INT64.unpack
    out = []
    errors = []
    for r in records:
        h = r.headers
        get = h.get
        blocked = bool(get(blocked_by))
        seen = (*map(get, _SHARED, _SHARED_ABSENT), blocked)
        common = shared.get(seen)
        if common is None:
            common = shared[seen] = _shared_cells(r)
        prefix, kind, attempts, error = common
        if prefix is None:  # an outbox row
            original = _cut(r.original, 18)
        else:
            raw = get(original_offset)
            original = f"{prefix}{unpack(raw)[0] if raw is not None and len(raw) == 8 else None}"
            if len(original) > 18:
                original = original[:17] + "…"
        ts = r.timestamp_ms
        age = ages.get(ts)
        if age is None:
            seconds = (now_us - ts * 1000) / 1_000_000  # DlqRecord.age_s, exactly
            age = ages[ts] = human_age(seconds if seconds > 0.0 else 0.0)
        key = keys.get(r.key)
        if key is None:
            key = keys[r.key] = _cut(r.key.decode("utf-8", "replace") if r.key else "", 12)
        if blocked and exc_message not in h:
            message = r.error_message
        else:
            raw = get(exc_message) or get(err_message)
            message = raw.decode("utf-8", "replace") if raw else ""
        if message:
            first = message.splitlines()[0]
            if first:
                error = f"{error}: {first}"
        pos = r.position
        out.append((f"{pos.partition}:{pos.offset}", age, original, key, kind, attempts))
        errors.append(error)
    return out, errors


def _shared_cells(r: DlqRecord) -> tuple[str | None, str, str, str]:
    """(what the ORIGINAL cell starts with, or None for an outbox row; the TYPE cell; the N
    cell; the error class)."""
    prefix = (None if r.outbox_row is not None else
              f"{(r.original_topic or '?').rsplit('.', 1)[-1]}[{r.original_partition}]@")
    return prefix, _cut(r.event_type or "?", 20), str(r.attempts), r.error_class


_INT64 = struct.Struct(">q")


# What many summaries share (with whether the record waited behind another)
_SUMMARY_SHARED = (names.ORIGINAL_TOPIC, names.ORIGINAL_PARTITION, names.CE_TYPE,
                   names.ATTEMPTS, names.EXCEPTION_FQCN, names.ERROR_CLASS,
                   names.OUTBOX_POSITION)
_SUMMARY_ABSENT = (_ABSENT,) * len(_SUMMARY_SHARED)


def summaries(records: Sequence[DlqRecord], now: dt.datetime, group: str | None = None
              ) -> list[dict[str, Any]]:
    """``[r.summary(now) for r in records]`` (each led by ``"group": group`` when given), with
    what many records share (a topic, a type, an error class, a time) worked out once."""
    shared: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    times: dict[int, tuple[str, float]] = {}
    keys: dict[bytes | None, str] = {}
    blocked_by, exc_message, err_message = (names.BLOCKED_BY, names.EXCEPTION_MESSAGE,
                                            names.ERROR_MESSAGE)
    ce_id, edit_of, original_offset, unpack = (names.CE_ID, EDIT_OF, names.ORIGINAL_OFFSET,
                                               _INT64.unpack)
    out = []
    for r in records:
        h = r.headers
        get = h.get
        blocked = get(blocked_by)
        seen = (*map(get, _SUMMARY_SHARED, _SUMMARY_ABSENT), bool(blocked))
        common = shared.get(seen)
        if common is None:
            common = shared[seen] = (r.original_topic, r.original_partition, r.event_type,
                                     r.attempts, r.error_class, r.outbox_row)
        topic, partition, kind, attempts, error, outbox_row = common
        ts = r.timestamp_ms
        when = times.get(ts)
        if when is None:
            when = times[ts] = (r.when.isoformat(), round(r.age_s(now), 1))
        key = keys.get(r.key)
        if key is None:
            key = keys[r.key] = r.key_text
        raw = get(original_offset)
        offset = unpack(raw)[0] if raw is not None and len(raw) == 8 else None
        if blocked and exc_message not in h:
            message = r.error_message
        else:
            raw = get(exc_message) or get(err_message)
            message = raw.decode("utf-8", "replace") if raw else ""
        raw = get(ce_id)
        event_id = raw.decode("utf-8", "replace") if raw is not None else None
        edit = r.edit_of if get(edit_of) else None
        pos = r.position
        row = {
            "group": group,
            "position": f"{pos.partition}:{pos.offset}",
            "partition": pos.partition,
            "offset": pos.offset,
            "timestamp": when[0],
            "age_s": when[1],
            "original_topic": topic,
            "original_partition": partition,
            "original_offset": offset,
            "key": key,
            "event_id": event_id,
            "event_type": kind,
            "attempts": attempts,
            "error_class": error,
            "error_message": message.splitlines()[0] if message else "",
            "blocked_by": blocked.decode("utf-8", "replace") if blocked is not None else None,
            "edit_of": str(edit) if edit else None,
            "outbox_row": outbox_row,
        }
        if group is None:
            del row["group"]  # the others keep their order
        out.append(row)
    return out


def stats(records: Sequence[DlqRecord], by: str) -> list[dict[str, Any]]:
    """Counts with oldest and newest per group (``error``, ``type``, ``topic`` or ``hour``)."""
    keys: dict[str, Callable[[DlqRecord], str]] = {
        "error": lambda r: r.error_class,
        "type": lambda r: r.event_type or "?",
        "topic": lambda r: r.original_topic or "?",
        "hour": lambda r: r.when.strftime("%Y-%m-%dT%H:00Z"),
    }
    keyf = keys.get(by)
    if keyf is None:
        raise FilterError(f"bad --by {by!r}: give error, type, topic or hour")
    groups: dict[str, list[DlqRecord]] = {}
    for r in records:
        groups.setdefault(keyf(r), []).append(r)
    out = []
    for name, rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        out.append({by: name, "count": len(rs),
                    "oldest": min(r.when for r in rs).isoformat(),
                    "newest": max(r.when for r in rs).isoformat()})
    return out


def message_headers(msg: Any) -> dict[str, bytes | None]:
    """A confluent-kafka Message's headers by name (the last value of each; None: no value)."""
    raw = msg.headers()
    return dict(raw) if raw else {}


def _present(heads: Mapping[str, bytes | None]) -> dict[str, bytes]:
    """Headers as a record holds them (``heads`` itself when it can): a header without a
    value reads as empty."""
    if None in heads.values():
        return {k: b"" if v is None else v for k, v in heads.items()}
    return cast("dict[str, bytes]", heads) if type(heads) is dict else dict(
        cast("Mapping[str, bytes]", heads))


def record(msg: Any, topic: str, heads: dict[str, bytes | None] | None = None) -> DlqRecord:
    """A confluent-kafka Message read from ``topic`` (its headers: a list of (name, bytes or
    None), or ``heads`` when :func:`message_headers` read them already), as
    :func:`from_message` reads it, faster."""
    ts = msg.timestamp()[1]
    return DlqRecord(topic, Position(msg.partition() or 0, msg.offset() or 0),
                     ts if ts > 0 else 0, msg.key(), msg.value(),
                     _present(message_headers(msg) if heads is None else heads))


def from_message(msg: Any) -> DlqRecord:
    """A confluent-kafka Message from a DLQ topic."""
    raw = msg.headers() or []
    items = raw.items() if isinstance(raw, Mapping) else raw
    heads: dict[str, bytes] = {}
    for name, value in items:
        heads[name] = value if isinstance(value, bytes) else (value or "").encode()
    ts = msg.timestamp()
    return DlqRecord(str(msg.topic()), Position(int(msg.partition()), int(msg.offset())),
                     int(ts[1]) if ts and ts[1] > 0 else 0, msg.key(), msg.value(), heads)
