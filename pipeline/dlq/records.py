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
from typing import Any

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


def _text(v: bytes | None) -> str | None:
    return v.decode("utf-8", "replace") if v is not None else None


@dataclass
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
        return dt.datetime.fromtimestamp(self.timestamp_ms / 1000, dt.UTC)

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
        if self.original_topic is not None and r.original_topic != self.original_topic:
            return False
        if self.event_type is not None and r.event_type != self.event_type:
            return False
        if self.key is not None and r.key_text != self.key:
            return False
        if self.error is not None:
            want = self.error.lower()
            fqcn = r.error_fqcn.lower()
            if r.error_class.lower() != want and fqcn != want and not fqcn.endswith("." + want):
                return False
        if self.since is not None and r.when < self.since:
            return False
        if self.until is not None and r.when > self.until:
            return False
        return all(r.header(name) == value for name, value in self.headers)


def select(records: Iterable[DlqRecord], flt: Filter, limit: int | None = None
           ) -> list[DlqRecord]:
    out = []
    for r in records:
        if flt.matches(r):
            out.append(r)
            if limit is not None and len(out) >= limit:
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


def table(records: Sequence[DlqRecord], now: dt.datetime, width: int = 80) -> list[str]:
    """``pipeline dlq ls`` as lines no wider than ``width`` (the error takes what is left)."""
    rows = []
    for r in records:
        msg = r.error_message.splitlines()[0] if r.error_message else ""
        rows.append((str(r.position), human_age(r.age_s(now)),
                     _cut(r.original if r.outbox_row is not None else
                          f"{(r.original_topic or '?').rsplit('.', 1)[-1]}"
                          f"[{r.original_partition}]@{r.original_offset}", 18),
                     _cut(r.key_text, 12), _cut(r.event_type or "?", 20), str(r.attempts),
                     f"{r.error_class}: {msg}" if msg else r.error_class))
    head = LS_COLUMNS
    widths = [max([len(head[i])] + [len(row[i]) for row in rows]) for i in range(6)]
    used = sum(widths) + 2 * 6
    out = ["  ".join(h.ljust(w) for h, w in zip(head[:6], widths, strict=True)) + "  " + head[6]]
    for row in rows:
        left = "  ".join(c.ljust(w) for c, w in zip(row[:6], widths, strict=True))
        out.append(left + "  " + _cut(row[6], max(10, width - used)))
    return [line[:width] if len(line) > width else line for line in out]


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
