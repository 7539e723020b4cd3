"""The batch-sink loop (``pipeline worker bi``): one consumer group landing events in bulk.

    consume main topics (+ the replay input) ─▶ decode (header + body) ─▶ buffer per partition
        │ undecodable: kept aside, dead-lettered with the batch
        ▼
    flush when ``batch_size`` events or ``batch_max_wait_s`` passed:
        target.write(batch)  — rows and each partition's new position in one atomic write;
                               rejected rows dead-lettered (acknowledged) before it commits
        ok ─────────────▶ positions advanced; offsets also committed to Kafka (for lag tools)
        conflict ───────▶ the partition was landed by someone else (or reset by a backfill):
                          its buffered events dropped, the consumer seeks to the stored position
        transient ──────▶ fetching paused, the same batch written again after a backoff

Positions live in the target, not in Kafka: on assignment the consumer seeks to the target's
stored position (the beginning when none is stored), so a crash at any moment neither loses nor
duplicates a row. The group's committed Kafka offsets only mirror them for monitoring.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline import telemetry
from pipeline.config import Settings, WorkerConfig
from pipeline.errors import ConfigError, PipelineError, TransientError
from pipeline.kafka import names
from pipeline.kafka.client import consumer_config, membership_config, resume_fetching
from pipeline.kafka.forward import Forwarder, Source
from pipeline.kafka.tail import watermarks
from pipeline.sink.target import TP, Batch, BatchTarget, PositionConflict, Rejected
from pipeline.worker import routing
from pipeline.worker.connector import Event, load_connector
from pipeline.worker.group import GroupRuntime
from pipeline.worker.records import event_of, headers_of

log = logging.getLogger("pipeline.sink")


@dataclass
class SinkStats:
    consumed: int = 0
    landed: int = 0
    batches: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)  # by error class
    conflicts: int = 0
    write_failures: int = 0
    last_batch_s: float = 0.0
    first_consumed_at: float | None = None  # monotonic
    last_landed_at: float | None = None

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())


@dataclass
class _Partition:
    """What is buffered of one partition: events, undecodable records, and the position."""

    stored: int | None  # the target's position when the buffer started
    events: list[tuple[Event, Message]] = field(default_factory=list)
    bad: list[tuple[Message, PipelineError]] = field(default_factory=list)
    next: int | None = None  # offset after the last buffered record


class SinkWorker(GroupRuntime):
    """Runs one batch target. ``run(stop)`` returns after a graceful stop; ``run_until_caught_up``
    stops once every assigned partition reached its end (a backfill)."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        target: BatchTarget | None = None,
        *,
        config: WorkerConfig | None = None,
    ) -> None:
        super().__init__(settings, name, config, given=target is not None)
        wc = self.cfg
        tiers = names.GroupTopics(settings.topics.prefix, self.group, [1.0])
        self.dlq_topic = tiers.dlq_topic
        # KIP-848's protocol hands partitions over incrementally, never all at once
        self._incremental = wc.group_protocol == "consumer"
        # `pipeline dlq replay` sends corrected or retried dead letters here; landed like the rest
        self.replay_topic = tiers.replay_topic
        self.topics = [*self.main_topics, self.replay_topic]
        obj = target if target is not None else load_connector(wc.connector, wc.options)
        if not isinstance(obj, BatchTarget):
            raise ConfigError(f"{wc.connector} is not a batch target (open/positions/write/reset)")
        self.target: BatchTarget = obj
        self.stats = SinkStats()
        self.parts: dict[TP, _Partition] = {}
        self.buffered = 0
        self._oldest: float | None = None  # monotonic time the buffer got its first record
        self._retry_at = 0.0
        self._backoff = 0.0
        self._paused = False
        self._dlq_error: str | None = None
        self._forwarder: Forwarder | None = None
        self._stop: threading.Event | None = None
        self._ends: dict[TP, int] = {}  # high watermarks, for run_until_caught_up
        self._idle_polls = 0

    # -- lifecycle --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self._start()
        try:
            while not stop.is_set():
                self.loop_once()
            self._graceful_stop()
        finally:
            self._close()

    def run_until_caught_up(self, stop: threading.Event, timeout_s: float = 3600.0) -> bool:
        """Consume until every partition of the topics is landed up to the end it had when the
        call began (True), or ``stop``/``timeout_s`` came first (False)."""
        self._stop = stop
        self._start()
        deadline = time.monotonic() + timeout_s
        try:
            self._ends = self._high_watermarks()
            while not stop.is_set() and time.monotonic() < deadline:
                self.loop_once()
                if self._caught_up():
                    self._graceful_stop()
                    return True
            self._graceful_stop()
            return False
        finally:
            self._close()

    def _start(self) -> None:
        self._ensure_topics()
        self._open_clients()
        self.target.open(self.settings, self.group_id)
        self._consumer = Consumer(
            consumer_config(
                self.settings,
                self.group_id,
                **{
                    # classic: eager assignment, positions looked up once per assignment;
                    # consumer (KIP-848): incremental, looked up for the partitions added
                    **membership_config(
                        self.cfg.group_protocol,
                        session_timeout_ms=self.cfg.session_timeout_ms,
                        assignor="range",
                    ),
                    "enable.auto.offset.store": False,
                    "error_cb": lambda err: log.warning("kafka consumer: %s", err.str()),
                },
            )
        )
        self._consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._start_health(self._readyz)
        log.info(
            "sink %s started: group %s, target %s, topics %s, batches of %d events or %gs",
            self.name,
            self.group_id,
            self.target.name,
            ", ".join(self.main_topics),
            self.cfg.batch_size,
            self.cfg.batch_max_wait_s,
        )

    def _ensure_topics(self) -> None:
        self._ensure_group_topics([self.replay_topic, self.dlq_topic])

    def _graceful_stop(self) -> None:
        """Land what is buffered (retrying transient failures within the grace period)."""
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        while self.buffered or any(p.bad for p in self.parts.values()):
            if self._flush() or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, self._retry_at - time.time())))
        if self.buffered:
            log.warning(
                "sink %s stopped with %d events not landed: they are consumed again from "
                "the stored positions",
                self.name,
                self.buffered,
            )
        self.assigned.clear()
        self.parts.clear()

    def _close(self) -> None:
        self._close_clients()
        self.target.close()

    # -- the loop -----------------------------------------------------------------------------
    def loop_once(self) -> None:
        assert self._consumer is not None and self._producer is not None
        self._heartbeat = time.monotonic()
        room = self.cfg.batch_size - self.buffered
        if self._retry_at > time.time() or room <= 0:
            self._pause(True)
        else:
            self._pause(False)
        msgs = self._consumer.consume(max(1, min(room, 5000)), timeout=0.1)
        self._idle_polls = 0 if msgs else self._idle_polls + 1
        for msg in msgs:
            self._ingest(msg)
        self._producer.poll(0)
        now = time.monotonic()
        due = self.buffered >= self.cfg.batch_size or (
            self._oldest is not None and now - self._oldest >= self.cfg.batch_max_wait_s
        )
        if due and time.time() >= self._retry_at:
            self._flush()
        self._refresh_lag()

    def _pause(self, paused: bool) -> None:
        if paused == self._paused or self._consumer is None:
            return
        parts = [TopicPartition(t, p) for t, p in self.assigned]
        if parts and paused:
            self._consumer.pause(parts)
        elif parts:  # on after what is buffered (never a position a seek has not yet moved)
            at = {tp: part.next for tp, part in self.parts.items()
                  if part.next is not None and tp in self.assigned}
            resume_fetching(self._consumer, parts, at)
        self._paused = paused

    def _ingest(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", err.str())
            return
        tp = (str(msg.topic()), int(msg.partition() or 0))
        part = self.parts.get(tp)
        if part is None or tp not in self.assigned:
            return  # a record of a partition revoked meanwhile
        offset = int(msg.offset() or 0)
        if part.next is not None and offset < part.next:
            return  # fetched before a seek took effect
        assert self._decoder is not None
        self.stats.consumed += 1
        self._last_ts[tp] = msg.timestamp()[1]
        if self.stats.first_consumed_at is None:
            self.stats.first_consumed_at = time.monotonic()
        part.next = offset + 1
        if self._oldest is None:
            self._oldest = time.monotonic()
        try:
            event = event_of(self._decoder, msg, tp, offset, headers_of(msg))
            event.payload  # noqa: B018  (decode the body now: a corrupt one is rejected here)
        except PipelineError as exc:
            part.bad.append((msg, exc))
            return
        part.events.append((event, msg))
        self.buffered += 1

    # -- landing ------------------------------------------------------------------------------
    def _flush(self) -> bool:
        """Write the buffer; True when it is landed (or dropped after a conflict)."""
        positions = {tp: (p.stored, p.next) for tp, p in self.parts.items() if p.next is not None}
        if not positions:
            self._oldest = None
            return True
        batch = Batch(
            events=[e for p in self.parts.values() for e, _m in p.events],
            positions=positions,
            consumer=self.group_id,
            undecodable=sum(len(p.bad) for p in self.parts.values()),
        )
        started = time.perf_counter()
        try:
            with telemetry.batch_span(
                f"process {self.group_id}", [e.traceparent for e in batch.events],
                {"messaging.consumer.group.name": self.group_id,
                 "messaging.batch.message_count": len(batch.events),
                 "erp.target": self.target.name},
            ):
                self.target.write(batch, self._dead_letter)
        except PositionConflict as exc:
            return self._resolve_conflict(batch, exc)
        except TransientError as exc:
            self._failed(exc)
            return False
        self._landed(batch, time.perf_counter() - started)
        return True

    def _landed(self, batch: Batch, seconds: float) -> None:
        per_topic = collections.Counter(e.topic for e in batch.events)
        for topic, n in per_topic.items():
            self._m.consumed.add(n, {"messaging.system": "kafka",
                                     "messaging.consumer.group.name": self.group_id,
                                     "messaging.destination.name": topic})
        self._m.process_duration.record(seconds, {"messaging.system": "kafka",
                                                  "messaging.consumer.group.name": self.group_id,
                                                  "messaging.operation.name": "write_batch"})
        self.stats.batches += 1
        self.stats.landed += len(batch.events) - len(batch.rejected)
        self.stats.last_batch_s = seconds
        self.stats.last_landed_at = time.monotonic()
        self._backoff = 0.0
        self._retry_at = 0.0
        commits = []
        for tp, (_exp, new) in batch.positions.items():
            part = self.parts.get(tp)
            if part is not None:
                self.parts[tp] = _Partition(stored=new, next=new)
            commits.append(TopicPartition(tp[0], tp[1], new))
        self.buffered = 0
        self._oldest = None
        log.debug("sink %s landed %d events in %.3fs", self.name, len(batch.events), seconds)
        if commits and self._consumer is not None:
            try:  # a mirror for lag tools; the target's positions are what counts
                self._consumer.commit(offsets=commits, asynchronous=True)
            except KafkaException as exc:
                log.debug("offset mirror commit failed: %s", exc)

    def _failed(self, exc: BaseException) -> None:
        self.stats.write_failures += 1
        self._backoff = min(30.0, max(0.5, self._backoff * 2))
        self._retry_at = time.time() + self._backoff
        log.warning(
            "sink %s could not land a batch of %d events (%s: %s); fetching paused, retrying "
            "the same batch in %.1fs",
            self.name,
            self.buffered,
            type(exc).__name__,
            exc,
            self._backoff,
        )

    def _resolve_conflict(self, batch: Batch, exc: PositionConflict) -> bool:
        """Someone else moved the positions: an earlier attempt of this very batch (its
        commit's answer was lost), another instance, or a backfill reset."""
        try:
            stored = self.target.positions(self.group_id, list(batch.positions))
        except TransientError as err:
            self._failed(err)
            return False
        if all(stored.get(tp) == new for tp, (_e, new) in batch.positions.items()):
            log.info("sink %s: batch was already landed (its commit answer was lost)", self.name)
            self._landed(batch, 0.0)
            return True
        self.stats.conflicts += 1
        moved = [tp for tp, (exp, _n) in batch.positions.items() if stored.get(tp) != exp]
        log.warning(
            "sink %s: stored position of %s moved under it (%s); dropping its buffered events "
            "and continuing from the stored position",
            self.name,
            ", ".join(f"{t}[{p}]" for t, p in moved),
            exc,
        )
        for tp in moved:
            part = self.parts.get(tp)
            if part is None:
                continue
            self.buffered -= len(part.events)
            pos = stored.get(tp)
            self.parts[tp] = _Partition(stored=pos, next=pos)
            if self._consumer is not None and tp in self.assigned:
                self._consumer.seek(
                    TopicPartition(tp[0], tp[1], pos if pos is not None else OFFSET_BEGINNING)
                )
        if self.buffered == 0 and not any(p.bad for p in self.parts.values()):
            self._oldest = None
        return False

    def _dead_letter(self, rejected: Sequence[Rejected]) -> None:
        """Called by the target before it commits: the undecodable records and the rejected
        rows go to the DLQ and Kafka acknowledges them, or the batch is not committed."""
        assert self._producer is not None
        self._dlq_error = None
        sent: list[tuple[Message, BaseException]] = [
            (msg, exc) for p in self.parts.values() for msg, exc in p.bad
        ]
        by_pos = (
            {(e.topic, e.partition, e.offset): m for p in self.parts.values() for e, m in p.events}
            if rejected
            else {}
        )
        for r in rejected:
            msg = by_pos.get((r.event.topic, r.event.partition, r.event.offset))
            if msg is not None:
                sent.append((msg, r.error))
        if not sent:
            return
        for msg, exc in sent:
            self._produce_dlq(msg, exc)
        remaining = self._producer.flush(self.settings.kafka.request_timeout_s)
        if remaining or self._dlq_error:
            raise TransientError(
                f"could not dead-letter {len(sent)} event(s) to {self.dlq_topic}: "
                f"{self._dlq_error or f'{remaining} not acknowledged'}; the batch is not "
                "committed and is written again"
            )
        for msg, exc in sent:
            cls = type(exc).__name__
            self.stats.dead_lettered[cls] = self.stats.dead_lettered.get(cls, 0) + 1
            self._m.dead_lettered.add(
                1, {"messaging.consumer.group.name": self.group_id, "error.type": cls}
            )
            log.error(
                "record %s[%s]@%s sent to %s: %s: %s",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                self.dlq_topic,
                cls,
                exc,
                extra={"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()},
            )

    def _produce_dlq(self, msg: Message, exc: BaseException) -> None:
        assert self._producer is not None
        if self._forwarder is None:
            self._forwarder = Forwarder(self._producer, self.group_id)

        def delivered(err: str | None, _m: Any) -> None:
            if err is not None:
                self._dlq_error = err

        self._forwarder.copy(
            Source.of(msg),
            routing.Route(self.dlq_topic, 0, None),
            error=exc,
            attempts=1,
            decode_error=str(exc) if isinstance(exc, PipelineError) else None,
            on_done=delivered,
        )

    # -- assignment -----------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        tps = [(str(p.topic), int(p.partition)) for p in parts]
        stored = self._positions_retrying(tps)
        placed = []
        for tp in tps:
            pos = stored.get(tp)
            self.parts[tp] = _Partition(stored=pos, next=pos)
            self.assigned.add(tp)
            placed.append(
                TopicPartition(tp[0], tp[1], pos if pos is not None else OFFSET_BEGINNING)
            )
        if self._incremental:
            # the partitions kept stay as they were; the added ones join a paused sink paused
            consumer.incremental_assign(placed)
            if self._paused:
                consumer.pause(placed)
        else:
            consumer.assign(placed)
            if self._paused:  # librdkafka keeps an application's pause across assignments
                consumer.resume(placed)
            self._paused = False
        log.info(
            "sink %s assigned %s",
            self.name,
            ", ".join(
                f"{t}[{p}]@{'start' if stored.get((t, p)) is None else stored[(t, p)]}"
                for t, p in tps
            )
            or "nothing",
        )

    def _positions_retrying(self, tps: list[TP]) -> dict[TP, int | None]:
        delay = 0.5
        while True:
            try:
                return self.target.positions(self.group_id, tps)
            except TransientError as exc:
                if self._stop is not None and self._stop.is_set():
                    raise
                log.warning(
                    "sink %s cannot read its stored positions (%s); retrying in %.1fs",
                    self.name,
                    exc,
                    delay,
                )
                time.sleep(delay)
                delay = min(30.0, delay * 2)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        """Land what is buffered (once; on failure the new owner re-reads it), forget."""
        if self.buffered or any(p.bad for p in self.parts.values()):
            self._flush()
        self._forget(parts)
        if self._incremental:
            consumer.incremental_unassign(parts)
        else:
            consumer.unassign()

    def _on_lost(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._forget(parts)  # not ours any more: writing them could race the new owner

    def _forget(self, parts: list[TopicPartition]) -> None:
        for p in parts:
            tp = (str(p.topic), int(p.partition))
            part = self.parts.pop(tp, None)
            if part is not None:
                self.buffered -= len(part.events)
            self.assigned.discard(tp)
        if not self.parts:
            self.buffered = 0
            self._oldest = None
        log.info(
            "sink %s revoked %s",
            self.name,
            ", ".join(f"{p.topic}[{p.partition}]" for p in parts) or "nothing",
        )

    # -- backfill -------------------------------------------------------------------------------
    def _high_watermarks(self) -> dict[TP, int]:
        assert self._consumer is not None
        ends: dict[TP, int] = {}
        request = self.settings.kafka.request_timeout_s
        md = self._consumer.list_topics(timeout=request)
        # a topic just created may not have its leaders settled yet: ride that out
        until = time.monotonic() + max(30.0, request)
        for topic in self.topics:
            t = md.topics.get(topic)
            for pid in t.partitions if t is not None else {}:
                _lo, hi = watermarks(self._consumer, topic, pid, request, until)
                ends[(topic, pid)] = hi
        return ends

    def _caught_up(self) -> bool:
        # fetches have come back empty a few times too (a broker's watermark may lag behind
        # what it serves: tansu reports a batch's base offset + 1)
        if not self.assigned or self.buffered or self._idle_polls < 3:
            return False
        assert self._consumer is not None
        for tp, end in self._ends.items():
            if end <= 0:
                continue
            part = self.parts.get(tp)
            if part is None or part.stored is None:
                return False
            if part.stored < end:
                # brokers whose offsets are not dense: the consumer's own position tells
                position = self._consumer.position([TopicPartition(*tp)])[0].offset
                if position < end or part.next != part.stored:
                    return False
        return True

    # -- health -------------------------------------------------------------------------------
    def _readyz(self) -> tuple[bool, dict[str, Any]]:
        ok = bool(self.assigned) and self._retry_at <= time.time()
        return ok, {
            "assigned_partitions": len(self.assigned),
            "buffered": self.buffered,
            "write_failures": self.stats.write_failures,
        }
