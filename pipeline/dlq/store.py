"""A consumer group's dead letters on the broker: the DLQ topic, the record of what was already
replayed (a compacted topic, so replays are idempotent across machines and operators), and
where a replay goes (the group's first retry tier: only that group sees the event again)."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import json
import logging
import operator
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient

from pipeline import forked
from pipeline.config import Settings
from pipeline.dlq.records import Cells, DlqRecord, Filter, Position, ls_cells, record, select
from pipeline.errors import UsageError
from pipeline.kafka import names
from pipeline.kafka.client import admin_config, consumer_config, wrap_kafka_error
from pipeline.kafka.tail import read_batches_to_end, read_to_end, watermarks
from pipeline.kafka.topics import TopicSpec, apply_topics

log = logging.getLogger(__name__)
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

    def listing(self, flt: Filter, now: dt.datetime, limit: int | None = None
                ) -> tuple[list[Cells], list[str]]:
        """``pipeline dlq ls``'s cells of the dead letters ``flt`` matches (rows, errors):
        ``records.ls_cells(self.select(flt, limit), now)``. When helper processes read the
        DLQ, each works out the cells of its own records and hands back only those (a
        hundred bytes a row, not the record)."""
        if self._records is not None:
            return ls_cells(select(self._records, flt, limit), now)
        listed: list[_Listed] = self._gather(flt, functools.partial(_listed, now=now),
                                             share=True)
        if limit is not None:
            del listed[limit:]
        return [cells for _p, _o, cells, _e in listed], [e for _p, _o, _c, e in listed]

    def _read(self, flt: Filter | None, limit: int | None) -> list[DlqRecord]:
        # in this process alone: whole records handed back by helpers would pass through
        # TMPDIR (~1 KB each: 100 MB for 100,000, past a pod's small emptyDir /tmp)
        out: list[DlqRecord] = self._gather(flt, _same, share=False)
        return out if limit is None else out[:limit]

    def _gather(self, flt: Filter | None, shape: Callable[[list[DlqRecord]], list[Any]], *,
                share: bool) -> list[Any]:
        """The DLQ's records that ``flt`` takes, in (partition, offset) order, given to
        ``shape`` (what is kept of them: the records, or their listing's cells). With
        ``share`` a large DLQ is read by helper processes too (:meth:`_spans`): ``shape``'s
        items are then plain data (a helper hands them back marshalled), tuples that begin
        with the record's partition and offset, and all readers' items are merged in that
        order."""
        on_headers = flt.headers_predicate() if flt is not None else None
        on_message = flt.message_predicate() if flt is not None else None
        topic = self.topic

        def read(span: dict[int, tuple[int, int | None]] | None) -> list[Any]:
            parts: dict[int, list[DlqRecord]] = {}
            for batch in read_batches(self.settings, topic, timeout_s=_READ_TIMEOUT_S,
                                      purpose=f"dlq-{self.group}", spans=span):
                _add(batch, topic, parts, on_message, on_headers)
            recs = [r for p in sorted(parts) for r in parts[p]]
            # in offset order per partition already (one sorted run): a check, nearly free
            recs.sort(key=_PLACE)
            return shape(recs)

        with _collector_paused():  # only acyclic records: nothing for the collector to find
            spans = self._spans() if share else [{}]
            if len(spans) < 2:
                return read(None)
            # the later spans in helper processes, the first one here meanwhile
            mine: list[Any] = []

            def here() -> None:
                mine.extend(read(spans[0]))

            tasks = [functools.partial(read, span) for span in spans[1:]]
            try:
                shared = forked.run_forked(tasks, here, timeout_s=_READ_TIMEOUT_S + 30,
                                           what=f"reading {topic}",
                                           alone=f"{READERS_ENV}=1")
            except forked.CannotShare as exc:
                log.warning("reading %s in this process alone: %s", topic, exc)
                return read(None)
            out = mine
            for items in shared:
                out += items
            out.sort(key=_FIRST_TWO)
            return out

    def _spans(self) -> list[dict[int, tuple[int, int | None]]]:
        """The DLQ's records cut into one share per reader (:func:`cut_spans`); one share (read
        here alone) for a small DLQ, on one core, where there is no fork, or when
        ``PIPELINE_DLQ_READERS`` says 1."""
        readers = min(_readers_wanted(), _MAX_READERS) if forked.can_fork() else 1
        if readers < 2:
            return [{}]
        consumer = Consumer(consumer_config(self.settings, f"pipeline-dlq-{self.group}-ends"))
        request = self.settings.kafka.request_timeout_s
        until = time.monotonic() + request
        try:
            md = consumer.list_topics(self.topic, timeout=request)
            tmd = md.topics.get(self.topic)
            if tmd is None or tmd.error is not None:
                return [{}]
            marks = {p: watermarks(consumer, self.topic, p, request, until)
                     for p in sorted(tmd.partitions)}
        except KafkaException as exc:
            raise wrap_kafka_error(exc, f"reading the offsets of {self.topic}",
                                   consumer) from exc
        finally:
            consumer.close()
        if sum(hi - lo for lo, hi in marks.values()) < _PARALLEL_FROM:
            return [{}]
        return cut_spans(marks, readers)

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


def cut_spans(marks: Mapping[int, tuple[int, int]], readers: int
              ) -> list[dict[int, tuple[int, int | None]]]:
    """Partitions' (low, high) watermarks cut into ``readers`` equal shares of records, as
    offset spans (partition → (first, stop); stop None: to the partition's end). The partitions
    are laid end to end and cut in ``readers`` pieces, so at most ``readers - 1`` partitions
    are split: a split costs reading on to the end of a producer's batch (a compressed batch is
    fetched whole), so the fewer the better. An empty partition goes to the last reader whole:
    its watermark may lie, and the read of a partition's end settles it."""
    total = sum(max(0, hi - lo) for lo, hi in marks.values())
    cuts = [total * j // readers for j in range(readers + 1)]
    spans: list[dict[int, tuple[int, int | None]]] = [{} for _ in range(readers)]
    at = 0
    for p in sorted(marks):
        lo, hi = marks[p]
        n = max(0, hi - lo)
        if n == 0:
            spans[-1][p] = (lo, None)
            continue
        for j in range(readers):
            a, b = max(at, cuts[j]), min(at + n, cuts[j + 1])
            if a < b:
                spans[j][p] = (lo + a - at, None if b == at + n else lo + b - at)
        at += n
    return [span for span in spans if span]


def _same(items: list[Any]) -> list[Any]:
    return items


def _listed(recs: list[DlqRecord], now: dt.datetime) -> list[_Listed]:
    rows, errors = ls_cells(recs, now)
    return [(r.position.partition, r.position.offset, cells, e)
            for r, cells, e in zip(recs, rows, errors, strict=True)]


_FIRST_TWO = operator.itemgetter(0, 1)
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
_READ_TIMEOUT_S = 120
# Reading a large DLQ is parsing records' headers, on one core: past this many records it is
# shared with helper processes, one per core (equal shares, :func:`cut_spans`). The
# fork and a reader's consumer cost ~50 ms; 100,000 records take ~1.3 s on one core here.
_PARALLEL_FROM = 20_000
_MAX_READERS = 4
READERS_ENV = "PIPELINE_DLQ_READERS"  # how many readers (1: this process alone)


def _readers_wanted() -> int:
    text = os.environ.get(READERS_ENV, "").strip()
    if not text:
        return forked.cores()
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{READERS_ENV}={text!r}: give a number of readers, 1 or more "
                         "(1 reads a DLQ in this process alone)")
    return int(text)

# (partition, offset, cells, error): a record's ``pipeline dlq ls`` line
_Listed = tuple[int, int, "Cells", str]


def read_batches(settings: Settings, topic: str, *, timeout_s: float, purpose: str,
                 settle_s: float = 0.3, spans: dict[int, tuple[int, int | None]] | None = None
                 ) -> Iterator[list[Message]]:
    """The records of ``topic`` up to its end (or of the offset ``spans`` given), in batches,
    with no settling wait on a broker whose watermarks are exact
    (:func:`pipeline.kafka.tail.read_batches_to_end`). A missing topic reads as empty."""
    return read_batches_to_end(settings, [topic], timeout_s=timeout_s, purpose=purpose,
                               settle_s=settle_s, settle_always=False, batch_size=_BATCH,
                               consumer_overrides=_READ_CONFIG, spans=spans or None)


def iter_groups(settings: Settings, group: str | None) -> Iterator[GroupDlq]:
    names = topic_names(settings)
    groups = [group] if group else dlq_groups(settings, names)
    for g in groups:
        yield GroupDlq(settings, g, names)
