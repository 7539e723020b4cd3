"""A consumer group's dead letters on the broker: the DLQ topic, the record of what was already
replayed (a compacted topic, so replays are idempotent across machines and operators), and
where a replay goes (the group's first retry tier: only that group sees the event again)."""

from __future__ import annotations

import contextlib
import gc
import json
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from confluent_kafka import KafkaException, Message
from confluent_kafka.admin import AdminClient

from pipeline.config import Settings
from pipeline.dlq.records import DlqRecord, Filter, Position, record, select
from pipeline.errors import UsageError
from pipeline.kafka import names
from pipeline.kafka.client import admin_config, wrap_kafka_error
from pipeline.kafka.tail import read_batches_to_end, read_to_end
from pipeline.kafka.topics import TopicSpec, apply_topics

_SUFFIX = names.DLQ_SUFFIX
_NOT_WORKER_GROUPS = {"outbox"}  # the relay's DLQ holds outbox rows, not events


def topic_names(settings: Settings) -> set[str]:
    admin = AdminClient(admin_config(settings))
    try:
        md = admin.list_topics(timeout=settings.kafka.request_timeout_s)
    except KafkaException as exc:
        raise wrap_kafka_error(
            exc, f"listing topics at {settings.kafka.bootstrap_servers} (is the broker up?)", admin
        ) from exc
    return set(md.topics)


def dlq_groups(settings: Settings, topics: set[str] | None = None) -> list[str]:
    """Groups that have a dead-letter topic ``<prefix>.<group>.dlq``."""
    prefix = f"{settings.topics.prefix}."
    names = topic_names(settings) if topics is None else topics
    out = []
    for t in names:
        if t.startswith(prefix) and t.endswith(_SUFFIX):
            group = t[len(prefix) : -len(_SUFFIX)]
            if group and "." not in group:
                out.append(group)
    # the relay's (outbox rows it could not publish) last: a first-class DLQ like the others
    return sorted(out, key=lambda g: (g in _NOT_WORKER_GROUPS, g))


class GroupDlq:
    """The dead letters of one group."""

    def __init__(self, settings: Settings, group: str, topics: set[str] | None = None) -> None:
        self.settings = settings
        self.group = group
        prefix = settings.topics.prefix
        gt = names.GroupTopics(prefix, group)
        self.topic = gt.dlq_topic
        self.replays_topic = gt.replays_topic
        # a replay goes to the first tier, whatever the group's delays
        self.retry_topic = gt.replay_topic
        # where a replay goes: the outbox DLQ's rows back into the outbox table
        self.replay_target = (
            f"{settings.database.schema_name}.outbox (through outbox_emit)"
            if group in _NOT_WORKER_GROUPS else self.retry_topic
        )
        existing = topic_names(settings) if topics is None else topics
        if self.topic not in existing:
            known = ", ".join(dlq_groups(settings, existing)) or "none yet"
            raise UsageError(
                f"no dead-letter topic {self.topic}: is {group!r} a worker group? groups with "
                f"a DLQ under prefix {prefix!r}: {known}"
            )
        self._records: list[DlqRecord] | None = None

    def records(self) -> list[DlqRecord]:
        """Every dead letter, in (partition, offset) order; read once, then kept."""
        if self._records is None:
            self._records = self._read(None, None)
        return self._records

    def select(self, flt: Filter, limit: int | None = None) -> list[DlqRecord]:
        """The dead letters ``flt`` matches, in (partition, offset) order, at most ``limit``:
        ``records.select(self.records(), flt, limit)``, without building or keeping the
        others when ``records()`` was not read yet (``ls`` and ``export`` need no more)."""
        if self._records is not None:
            return select(self._records, flt, limit)
        return self._read(flt, limit)

    def _read(self, flt: Filter | None, limit: int | None) -> list[DlqRecord]:
        on_headers = flt.headers_predicate() if flt is not None else None
        on_message = flt.message_predicate() if flt is not None else None
        topic = self.topic
        parts: dict[int, list[DlqRecord]] = {}
        with _collector_paused():  # only acyclic records: nothing for the collector to find
            for batch in read_batches(self.settings, topic, timeout_s=120,
                                      purpose=f"dlq-{self.group}"):
                _add(batch, topic, parts, on_message, on_headers)
            out = [r for p in sorted(parts) for r in parts[p]]
            # in offset order per partition already (one sorted run): a check, nearly free
            out.sort(key=_PLACE)
        return out if limit is None else out[:limit]

    def partitions(self) -> list[int]:
        admin = AdminClient(admin_config(self.settings))
        md = admin.list_topics(self.topic, timeout=self.settings.kafka.request_timeout_s)
        return sorted(md.topics[self.topic].partitions)

    def get(self, position: str) -> DlqRecord:
        pos = Position.parse(position, self.partitions())
        for r in self.records():
            if r.position == pos:
                return r
        offsets = [r.position.offset for r in self.records()
                   if r.position.partition == pos.partition]
        span = f"{min(offsets)}..{max(offsets)}" if offsets else "none"
        raise UsageError(
            f"no record at {pos} in {self.topic} (offsets in partition {pos.partition}: {span}); "
            "`pipeline dlq ls --group " + self.group + "` lists them"
        )

    def blocked_behind(self, event_id: str | None) -> list[DlqRecord]:
        if not event_id:
            return []
        return [r for r in self.records() if r.blocked_by == event_id]

    # -- replay bookkeeping ----------------------------------------------------------------------
    def ensure_replays_topic(self) -> None:
        t = self.settings.topics
        apply_topics(
            AdminClient(admin_config(self.settings)),
            [
                TopicSpec(self.replays_topic, 1, t.replication_factor,
                          t.compacted_config),
                TopicSpec(self.retry_topic, t.partitions, t.replication_factor, dict(t.config)),
            ],
            timeout_s=self.settings.kafka.request_timeout_s,
            create_only=True,
        )

    def replayed(self) -> dict[str, dict[str, Any]]:
        """DLQ position → the latest replay record of it (``{}`` when none)."""
        out: dict[str, dict[str, Any]] = {}
        for m in read_to_end(self.settings, [self.replays_topic], timeout_s=60,
                             purpose=f"dlq-replays-{self.group}"):
            key = (m.key() or b"").decode()
            value = m.value()
            if value is None:
                out.pop(key, None)
            else:
                try:
                    out[key] = json.loads(value)
                except ValueError:
                    continue
        return out


_PLACE = operator.attrgetter("position.partition", "position.offset")


def _add(batch: list[Message], topic: str, parts: dict[int, list[DlqRecord]],
         on_message: Callable[[bytes | None, int], bool] | None,
         on_headers: Callable[[Mapping[str, bytes | None]], bool] | None) -> None:
    """The records of ``batch`` that the filter takes, appended to their partition's list: a
    record is built only when its key and timestamp (before the headers are read), then its
    headers pass."""
    for m in batch:
        if m.error() is not None:
            continue
        if on_message is not None:
            ts = m.timestamp()[1]
            if not on_message(m.key(), ts if ts > 0 else 0):
                continue
        raw: Any = m.headers()  # as message_headers(m) reads them, inline
        heads: dict[str, bytes | None] = dict(raw) if raw else {}
        if on_headers is not None and not on_headers(heads):
            continue
        r = record(m, topic, heads)
        p = r.position.partition
        if p in parts:
            parts[p].append(r)
        else:
            parts[p] = [r]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a DLQ is read, and what is alive then moved out
    of its sight afterwards (``gc.freeze()``, as :func:`pipeline.gcpolicy.tune_gc` does at
    start): the records hold no cycles and refcounting frees them, while young collections
    over a hundred thousand new records (during the read, or the first one after it) cost a
    quarter of the read (measured on 100,000 dead letters)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()
            gc.enable()


# Reading a whole DLQ: librdkafka's default fetch sizes (larger ones bring the first records
# later), a prefetch queue that holds a large DLQ, and a short pause when it is full anyway
# (1 s by default: as long as reading the whole DLQ).
_READ_CONFIG: dict[str, Any] = {
    "enable.auto.offset.store": False,
    "fetch.wait.max.ms": 50,
    "queued.max.messages.kbytes": 256 << 10,
    "fetch.queue.backoff.ms": 10,
}
_BATCH = 10_000


def read_batches(settings: Settings, topic: str, *, timeout_s: float, purpose: str,
                 settle_s: float = 0.3) -> Iterator[list[Message]]:
    """The records of ``topic`` up to its end, in batches, with no settling wait on a broker
    whose watermarks are exact (:func:`pipeline.kafka.tail.read_batches_to_end`). A missing
    topic reads as empty."""
    return read_batches_to_end(settings, [topic], timeout_s=timeout_s, purpose=purpose,
                               settle_s=settle_s, settle_always=False, batch_size=_BATCH,
                               consumer_overrides=_READ_CONFIG)


def iter_groups(settings: Settings, group: str | None) -> Iterator[GroupDlq]:
    names = topic_names(settings)
    groups = [group] if group else dlq_groups(settings, names)
    for g in groups:
        yield GroupDlq(settings, g, names)
