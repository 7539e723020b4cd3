"""The worker loop (``pipeline worker NAME``): one consumer group per connector.

    consume (event topics + own retry tiers, range-assigned: co-partitioned) ─▶ ingest
      ingest: a cell not held whole → rewind and wait; a retry record not due → pause that
              partition until due; undecodable → DLQ; else → the key's FIFO
    admit (decide.admit: strict ordering) ─▶ run the handler (pool or inline) ─▶ settle
      settle (decide.decide): done · hold (breaker open, Retry-After) · retry tier n · DLQ
    commit every commit_interval_s: the highest contiguous finished offset per partition

Who owns what (:mod:`pipeline.worker.ownership`): a key's events, its retry copies, its DLQ
copies and its parked state all sit in one partition number, its *cell*; a member works on a
cell only while it holds all of it, so one member at a time owns a key's retry state.

Everything that changes state runs on the loop's thread; handlers run on a pool of
``max_in_flight`` threads and hand their outcome back through a queue. An event routed to a
retry tier or the DLQ counts as finished only when Kafka acknowledged the routed copy.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from pipeline import telemetry
from pipeline.config import Settings, WorkerConfig
from pipeline.errors import DecodeError, PipelineError
from pipeline.kafka import names
from pipeline.kafka.client import consumer_config, membership_config, resume_fetching
from pipeline.kafka.clients import Clients
from pipeline.kafka.forward import Forwarder, Source
from pipeline.worker import decide as d
from pipeline.worker import routing
from pipeline.worker.breaker import CircuitBreaker
from pipeline.worker.classify import TRANSIENT, classify
from pipeline.worker.connector import Dispatch, Event, dispatch_of, load_connector
from pipeline.worker.group import GroupRuntime
from pipeline.worker.handlers import HandlerThreads
from pipeline.worker.offsets import PartitionOffsets
from pipeline.worker.ordering import KeyState, Ordering
from pipeline.worker.ownership import Cells
from pipeline.worker.ratelimit import TokenBucket
from pipeline.worker.records import event_of, headers_of
from pipeline.worker.scheduler import KeyScheduler

log = logging.getLogger("pipeline.worker")

TP = tuple[str, int]
OK, SKIPPED, FAILED = d.OK, d.SKIPPED, d.FAILED
_NEVER = math.inf


@dataclass(slots=True)
class Work:
    msg: Message
    event: Event
    tp: TP
    key: str  # ordering key: original topic + aggregate key
    gen: int  # the partition's assignment generation when the record was consumed
    trace: Any = None  # the SpanContext of its last ``process`` span (tracing on)


@dataclass
class WorkerStats:
    consumed: int = 0
    applied: int = 0
    skipped: int = 0
    retried: dict[int, int] = field(default_factory=dict)  # by tier
    followed: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)  # by error class
    undecodable: int = 0
    held: int = 0
    breaker_opens: int = 0
    moved: int = 0  # retry copies found outside their home partition and moved there
    stalled: int = 0  # keys seen stalled (each key and head once)

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())


Observer = Callable[[Event, str], None]


class Worker(GroupRuntime):
    """Runs one connector. ``run(stop)`` returns when ``stop`` is set (after a graceful stop)."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        connector: object | None = None,
        *,
        config: WorkerConfig | None = None,
        observer: Observer | None = None,
        clients: Clients | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(settings, name, config, given=connector is not None, clients=clients)
        wc = self.cfg
        self.tiers = names.GroupTopics(settings.topics.prefix, self.group, wc.retry_delays_s)
        self.connector = (
            connector if connector is not None else load_connector(wc.connector, wc.options)
        )
        self.dispatch: Dispatch = dispatch_of(self.connector)
        self.observer = observer
        self.clock = clock
        self.ordering = Ordering(strict=wc.ordering == "strict", clock=clock)
        self.cells = Cells([*self.main_topics, *self.tiers.retry_topics])
        self.breaker = CircuitBreaker(
            wc.breaker.threshold, wc.breaker.probe_initial_s, wc.breaker.probe_max_s
        )
        self.bucket = TokenBucket(wc.rate_limit_per_s, wc.rate_limit_burst)
        self.scheduler: KeyScheduler[Work] = KeyScheduler(wc.max_in_flight, _record_bytes)
        self.stats = WorkerStats()
        self.offsets: dict[TP, PartitionOffsets] = {}
        self.forwarder: Forwarder | None = None
        self.partitions = 0  # of every co-partitioned topic (known after _ensure_topics)
        self._due_pauses: dict[TP, float] = {}  # partition → resume time (epoch s; inf: cell)
        self._rewound: dict[TP, int] = {}  # partition → offset it was rewound to
        # partition → the offset its fetch restarts at when it is resumed (its last rewind)
        self._seek_on_resume: dict[TP, int] = {}
        self._held: deque[Work] = deque()  # failed while the breaker is open / Retry-After
        self._paused_all = False
        # the handler threads' outcomes; SimpleQueue: put and get are C code, no Condition
        self._completions: queue.SimpleQueue[tuple[Work, str, BaseException | None]] = (
            queue.SimpleQueue())
        self._running = 0
        self._last_commit = 0.0
        self._broker_down_since: float | None = None
        self._pool: HandlerThreads[Work] | None = None
        self._routing_pending = 0
        self._pace = _Pace()
        self._tier_of: dict[str, int] = {}
        self._gen: dict[TP, int] = {}  # assignment generation per partition
        self._generation = 0
        self._fatal: PipelineError | None = None
        self._busy_tp: collections.Counter[TP] = collections.Counter()
        self._recorders: dict[tuple[str, str], Callable[[float], None]] = {}
        self._group_attrs = {"messaging.consumer.group.name": self.group_id}
        self._record_end_to_end = self._m.end_to_end.bound(self._group_attrs)
        self._consumed: collections.Counter[str] = collections.Counter()
        self._parked_pending = 0
        self._stalled: dict[str, tuple[str, int]] = {}  # stalled key → (its head, its cell)
        self._hops_reported: set[str] = set()
        self._reconcile_pauses = False  # set by an assignment: pause states are set again
        self.stall_after_ms = int(wc.stall_after * 1000)
        # a follower that went round more often than the head's whole wait allows is stuck too
        self.max_hops = int(wc.stall_after / min(wc.retry_delays_s or [1.0])) + 2 * len(
            wc.retry_delays_s
        )

    # -- lifecycle --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._start()
        try:
            while not stop.is_set():
                self.loop_once()
            self._graceful_stop()
        finally:
            self._close()

    def _start(self) -> None:
        self._ensure_topics()
        self._open_clients()
        assert self._producer is not None
        self.forwarder = Forwarder(self._producer, self.group_id)
        self._pool = HandlerThreads(self.cfg.max_in_flight, self._execute_async,
                                    f"{self.name}-handler")
        conf = consumer_config(
            self.settings,
            self.group_id,
            **{
                **membership_config(
                    self.cfg.group_protocol,
                    session_timeout_ms=self.cfg.session_timeout_ms,
                    # co-partitioned topics' partitions together (both protocols): one owner
                    # per cell (pipeline.worker.ownership)
                    assignor="range",
                ),
                "enable.auto.offset.store": False,
                # a resumed retry partition is fetched again promptly
                "fetch.wait.max.ms": 100,
                "error_cb": self._on_kafka_error,
            },
        )
        self._consumer = self.clients.consumer(conf)
        self._consumer.subscribe(
            list(self.cells.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        group = {"messaging.consumer.group.name": self.group_id}
        self._unobserve += [
            self._m.observe("pipeline.parked_keys", lambda: [(self.ordering.parked, group)]),
            self._m.observe("pipeline.stalled_keys", lambda: [(len(self._stalled), group)]),
            self._m.observe(
                "pipeline.breaker.state",
                lambda: [({"closed": 0, "half-open": 1, "open": 2}.get(self.breaker.state, 2),
                          group)],
            ),
        ]
        self._start_health(self._readyz)
        if self._health is not None:
            log.info("worker %s health endpoints on port %d", self.name, self._health.port)
        log.info(
            "worker %s started: group %s, topics %s (%d partitions each), retry tiers %s, "
            "ordering %s",
            self.name,
            self.group_id,
            ", ".join(self.main_topics),
            self.partitions,
            ", ".join(f"{x:g}s" for x in self.cfg.retry_delays_s),
            self.cfg.ordering,
        )

    def _ensure_topics(self) -> None:
        self.partitions = self._ensure_group_topics(
            [*self.tiers.retry_topics, self.tiers.dlq_topic],
            compacted=[self.tiers.parked_topic],
            same_event_partitions=True,
        )

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._close_clients()
        self.dispatch.close()

    def _graceful_stop(self) -> None:
        """Stop fetching, hand back queued work, let running handlers finish within the grace
        period, commit, leave the group."""
        assert self._consumer is not None
        self._pause_all()
        handed_back = self.scheduler.drop(lambda w: True)
        held = len(self._held)
        self._held.clear()
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        self._settle_until(deadline, lambda: bool(self._running or self._routing_pending))
        self._flush(max(1.0, deadline - time.monotonic()))
        self._drain_completions(timeout=0)
        self._commit(asynchronous=False)
        # what is left was handed back: the revocation at close has nothing to wait for
        self.assigned.clear()
        self.offsets.clear()
        self.cells.clear()
        log.info(
            "worker %s stopped: %d queued and %d held events handed back (redelivered to "
            "the group), %d still running at the deadline",
            self.name,
            len(handed_back),
            held,
            self._running,
        )

    def _settle_until(self, deadline: float, busy: Callable[[], bool]) -> None:
        """Serve completions and delivery reports while ``busy()``, until ``deadline``."""
        while busy() and time.monotonic() < deadline:
            self._drain_completions(timeout=0.05)
            if self._producer is not None:
                self._producer.poll(0)

    def _flush(self, timeout: float) -> None:
        if self._producer is not None:
            self._producer.flush(timeout)

    # -- the loop -----------------------------------------------------------------------------
    def loop_once(self) -> None:
        assert self._consumer is not None and self._producer is not None
        if self._fatal is not None:
            raise self._fatal
        now = self.clock()
        self._heartbeat = time.monotonic()
        if self._reconcile_pauses:
            self._set_pauses()
        self._resume_due(now)
        idle = not (self.scheduler.queued or self._running or self._held)
        wait = 0.0
        if idle:  # sleep in consume, but wake for the next retry partition that comes due
            wait = min([0.1, *(max(0.0, at - now) for at in self._due_pauses.values())])
        msgs = self._consumer.consume(1000, timeout=wait)
        if msgs:
            self._broker_down_since = None
        if msgs:
            self._ingest_batch(msgs, now)
        self._backpressure()
        self._dispatch()
        # Block for outcomes only when nothing else can start: handlers' completions wake
        # the loop at once, and an idle loop does not spin.
        stalled = self._running >= self.cfg.max_in_flight or not self.scheduler.has_ready
        self._drain_completions(timeout=0.005 if self._running and stalled else 0)
        self._dispatch()
        self._producer.poll(0)
        if time.monotonic() - self._last_commit >= self.cfg.commit_interval_s:
            self._commit(asynchronous=True)
            self._check_stalls()
            self._flush_metrics()

    def _ingest_batch(self, msgs: list[Message], now: float) -> None:
        """Each record to its key's queue; or, while handlers run inline and nothing waits on
        the target (no held event, breaker closed, no rate limit), straight through its handler
        when its key has nothing queued or running and no retry state: the decisions the
        scheduler's round trip would make (admit: run; may call: yes), without the round trip.
        The outcome takes the one path every outcome takes (:meth:`_complete`)."""
        inline = self._inline_now()
        keys, scheduler, pace = self.ordering.keys, self.scheduler, self._pace
        ingest, execute, complete = self._ingest, self._execute, self._complete
        for msg in msgs:
            work = ingest(msg, now)
            if work is None:
                continue
            if inline and work.key not in keys and scheduler.claim(work.key):
                done = execute(work)
                complete(*done)
                # what _inline_now reads changes only on a failure or a slow call
                if done[1] is not OK or not pace.inline:
                    inline = self._inline_now()
            else:
                scheduler.submit(work.key, work)

    def _inline_now(self) -> bool:
        return (
            self._pace.inline
            and not self._held
            and not self.breaker.is_open
            and not self.bucket.rate
            and self.bucket.blocked_until <= self.clock()  # a Retry-After still running
            and self._fatal is None
        )

    def _ingest(self, msg: Message, now: float) -> Work | None:
        """The record's work, or None when it was dealt with here (an error, a record to wait
        for, one moved home, an undecodable one dead-lettered)."""
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", err.str())
            return None
        tp = (str(msg.topic()), int(msg.partition() or 0))
        offset = int(msg.offset() or 0)
        rewound = self._rewound.get(tp)
        if rewound is not None and offset >= rewound:
            return None  # fetched before the rewind took effect: it comes again when due
        if not self.cells.owns(tp[1]):
            # part of a cell this member does not hold whole (an incremental assignment half
            # way): its keys may have state elsewhere; wait, rewound, until the cell is whole
            self._hold_partition(tp, offset, _NEVER)
            return None
        tracker = self.offsets.get(tp)
        if tracker is None:
            tracker = self.offsets[tp] = PartitionOffsets()
        tier = self._tier_of.get(tp[0])
        if tier is None:
            tier = self._tier_of[tp[0]] = self.tiers.tier_of(tp[0])
        raw = headers_of(msg)  # name → bytes; the last of a repeated name wins
        if tier:
            src = Source.of(msg)
            if src.home != tp[1]:
                self._move_home(src, tp, offset)
                return None
            due_ms = routing.read_int(raw.get(names.BACKOFF_TIMESTAMP))
            if due_ms is not None and due_ms > now * 1000:
                self._hold_partition(tp, offset, due_ms / 1000)
                return None
        self.stats.consumed += 1
        self._consumed[tp[0]] += 1
        self._last_ts[tp] = msg.timestamp()[1]
        tracker.started(offset)
        try:
            # the decoder is set by _open_clients, before the first consume
            event = event_of(self._decoder, msg, tp, offset, raw)  # type: ignore[arg-type]
        except PipelineError as exc:
            self.stats.undecodable += 1
            log.error(
                "undecodable record %s[%d]@%d sent to %s: %s",
                tp[0],
                tp[1],
                offset,
                self.tiers.dlq_topic,
                exc,
                extra={"topic": tp[0], "partition": tp[1], "offset": offset},
            )
            self._route(
                msg,
                tp,
                None,
                routing.Route(self.tiers.dlq_topic, 0, None),
                exc,
                attempts=1,
                decode_error=str(exc),
            )
            return None
        original = raw.get(names.ORIGINAL_TOPIC)
        key = f"{(original.decode() if isinstance(original, bytes) else tp[0])}|{event.key}"
        return Work(msg, event, tp, key, self._gen.get(tp, 0))

    def _move_home(self, src: Source, tp: TP, offset: int) -> None:
        """A retry copy outside its home partition (written before retry copies were
        co-partitioned, or by another tool): moved there unchanged; its home cell's owner
        runs it."""
        assert self.forwarder is not None
        self.offsets[tp].started(offset)
        self.stats.moved += 1
        done = self._on_copy_acked(
            tp, offset, self._gen.get(tp, 0),
            f"move the retry record {tp[0]}[{tp[1]}]@{offset} to its home partition {src.home}",
        )
        self.forwarder.move(src, tp[0], done)

    def _flush_metrics(self) -> None:
        """Counters summed since the last call; lag read from the consumer's cached watermarks
        (no request to the broker) at most every second."""
        for topic, n in self._consumed.items():
            self._m.consumed.add(n, {"messaging.system": "kafka",
                                     "messaging.consumer.group.name": self.group_id,
                                     "messaging.destination.name": topic})
        self._consumed.clear()
        self._refresh_lag()

    # -- stuck keys ---------------------------------------------------------------------------
    def _check_stalls(self) -> None:
        """Name every key whose head has waited too long, once per key and head."""
        now_ms = int(self.clock() * 1000)
        current = {}
        for key, st in self.ordering.stalled(self.stall_after_ms):
            current[key] = (st.head, st.partition)
            if self._stalled.get(key) != current[key]:
                self.stats.stalled += 1
                log.error(
                    "key %s is stalled: its head event %s has waited %.0fs (more than the "
                    "%.0fs its retry tiers allow), %d event(s) behind it (%s); check the "
                    "target, then `pipeline dlq ls --group %s` and the worker's logs for %s",
                    key,
                    st.head,
                    st.waited_ms(now_ms) / 1000,
                    self.stall_after_ms / 1000,
                    len(st.followers),
                    ", ".join(st.followers[:5]) + (" …" if len(st.followers) > 5 else ""),
                    self.group,
                    st.head,
                    extra={"event_id": st.head, "key": key},
                )
        for key in [k for k in self._stalled if k not in current]:
            log.info("key %s is moving again", key, extra={"key": key})
        self._stalled = current

    # -- pausing ------------------------------------------------------------------------------
    def _hold_partition(self, tp: TP, offset: int, resume_at: float) -> None:
        """Pause a partition and rewind it to ``offset``: a retry record that is not due yet,
        or (``resume_at`` inf) part of a cell not held whole."""
        assert self._consumer is not None
        part = TopicPartition(tp[0], tp[1], offset)
        self._consumer.pause([part])
        self._consumer.seek(part)
        self._rewound[tp] = offset
        self._seek_on_resume[tp] = offset
        self._due_pauses[tp] = resume_at

    def _resume_due(self, now: float) -> None:
        if self._paused_all:
            return
        due = [tp for tp, at in self._due_pauses.items() if at <= now]
        if due:
            self._resume(due)

    def _resume(self, tps: list[TP]) -> None:
        assert self._consumer is not None
        for tp in tps:
            self._due_pauses.pop(tp, None)
            self._rewound.pop(tp, None)
        parts = [TopicPartition(t, p) for t, p in tps if (t, p) in self.assigned]
        if parts and not self._paused_all:
            self._resume_fetching(parts)

    def _resume_fetching(self, parts: list[TopicPartition]) -> None:
        """Resume ``parts``, each fetched again at once from its last rewind, or else from
        where the consumer stands (:func:`~pipeline.kafka.client.resume_fetching`)."""
        assert self._consumer is not None
        at = {}
        for part in parts:
            offset = self._seek_on_resume.pop((part.topic, part.partition), None)
            if offset is not None:
                at[(part.topic, part.partition)] = offset
        resume_fetching(self._consumer, parts, at)

    def _set_pauses(self) -> None:
        """Every assigned partition paused or running as our bookkeeping says, set once more
        after an assignment has taken effect (what a rebalance callback sets may apply to a
        partition before the client has taken it up)."""
        self._reconcile_pauses = False
        self._apply_pauses(list(self.assigned))

    def _apply_pauses(self, tps: list[TP]) -> None:
        """Pause or resume each of ``tps`` as the bookkeeping says: paused while held (not due,
        its cell not whole) or while everything is paused, running otherwise."""
        if self._consumer is None or not tps:
            return
        run = [TopicPartition(t, p) for t, p in tps
               if (t, p) not in self._due_pauses and not self._paused_all]
        wait = [TopicPartition(t, p) for t, p in tps
                if (t, p) in self._due_pauses or self._paused_all]
        if run:
            self._resume_fetching(run)
        if wait:
            self._consumer.pause(wait)

    def _pause_all(self) -> None:
        if not self._paused_all and self._consumer is not None and self.assigned:
            self._consumer.pause([TopicPartition(t, p) for t, p in self.assigned])
        self._paused_all = True

    def _resume_all(self) -> None:
        if self._paused_all and self._consumer is not None:
            parts = [
                TopicPartition(t, p) for t, p in self.assigned if (t, p) not in self._due_pauses
            ]
            self._resume_fetching(parts)
        self._paused_all = False

    def _backpressure(self) -> None:
        """Stop fetching while the queue is deep (``max_queued`` events or
        ``max_queued_bytes``) or the target is down; resume below half.

        Pausing is dear (librdkafka drops what it fetched ahead for a paused partition), so
        the bounds are wide: at the old bound, max(1000, 20 x max_in_flight), every start
        paused (handlers begin on the pool) and a slow target paused every few hundred ms."""
        sched, cfg = self.scheduler, self.cfg
        must_pause = (
            (self.breaker.is_open and bool(self._held or sched.queued))
            or sched.queued > cfg.max_queued
            or sched.queued_size > cfg.max_queued_bytes
            or self.bucket.blocked_until > self.clock()
        )
        if must_pause:
            self._pause_all()
        elif (self._paused_all and sched.queued <= cfg.max_queued // 2
              and sched.queued_size <= cfg.max_queued_bytes // 2):
            self._resume_all()

    # -- dispatch -----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        now = self.clock()
        while self._held:
            if not self._may_call(now):
                return
            self._start_work(self._held.popleft())
            if self.breaker.state == "half-open":
                return  # one probe at a time
        while self.scheduler.has_ready:
            if not self._may_call(now):
                return
            nxt = self.scheduler.next_ready()
            if nxt is None:  # at the in-flight cap
                self._unused_call(now)
                return
            _key, work = nxt
            ev = work.event
            action = d.admit(
                self.ordering,
                work.key,
                ev.event_id,
                replay=names.REPLAY_ID in ev.raw_headers,
                attempts=ev.attempt,
                tiers=self.tiers,
                now_ms=int(now * 1000),
            )
            if action.verb == d.RUN:
                self._start_work(work)
                if self.breaker.state == "half-open":
                    return
                continue
            self._unused_call(now)  # routing it does not call the target
            if action.verb == d.FOLLOW_HEAD:
                self.stats.followed += 1
                self._check_hops(work, action.blocked_by)
            self._carry_out(work, action, None)

    def _check_hops(self, work: Work, head: str | None) -> None:
        hops = routing.read_int(work.event.raw_headers.get(names.HOPS)) or 0
        ev = work.event
        if hops > self.max_hops and ev.event_id not in self._hops_reported:
            self._hops_reported.add(ev.event_id)
            log.error(
                "event %s (%s %s v%d) has gone round the retry path %d times behind %s (key "
                "%s): the key is stalled; check why %s does not finish",
                ev.event_id,
                ev.event_type,
                ev.aggregate_id,
                ev.aggregate_version,
                hops,
                head,
                work.key,
                head,
                extra={"event_id": ev.event_id, "key": work.key},
            )

    def _may_call(self, now: float) -> bool:
        """A token from the rate limit and leave from the breaker (a probe when it is open)."""
        if self.bucket.take(now) > 0:
            return False
        if not self.breaker.allow(now):
            self._give_back_token()
            return False
        return True

    def _unused_call(self, now: float) -> None:
        """What :meth:`_may_call` granted was not used for a call: give it back."""
        self._give_back_token()
        self.breaker.cancel_probe(now)

    def _give_back_token(self) -> None:
        if self.bucket.rate:
            self.bucket.tokens = min(self.bucket.capacity, self.bucket.tokens + 1)

    def _start_work(self, work: Work) -> None:
        if self._pace.inline:
            # A handler that takes microseconds costs less than handing it to a thread: run it
            # here (same key order, same outcome path).
            self._complete(*self._execute(work))
            return
        self._running += 1
        self._busy_tp[work.tp] += 1
        assert self._pool is not None
        self._pool.submit(work)

    def _execute_async(self, work: Work) -> None:
        try:
            outcome = self._execute(work)
        except BaseException as exc:  # outside the handler (metrics, tracing): still an outcome
            outcome = (work, FAILED, exc)
        self._completions.put(outcome)

    def _execute(self, work: Work) -> tuple[Work, str, BaseException | None]:
        handler = self.dispatch.handler_for(work.event.event_type)
        if handler is None:
            return work, SKIPPED, None
        ev = work.event
        started = time.perf_counter()
        outcome, error = OK, None
        if telemetry.tracing():
            attrs = self._span_attributes(ev)
            with telemetry.process_span(ev.topic, ev.traceparent, attrs) as span:
                try:
                    handler(ev)
                except BaseException as exc:
                    telemetry.fail(span, exc)
                    outcome, error = FAILED, exc
                if span is not None:
                    work.trace = span.get_span_context()
        else:
            try:
                handler(ev)
            except BaseException as exc:
                outcome, error = FAILED, exc
        elapsed = time.perf_counter() - started
        self._pace.observe(elapsed)
        self._process_recorder(ev.topic, outcome)(elapsed)
        return work, outcome, error

    def _span_attributes(self, ev: Event) -> dict[str, Any]:
        return {
            "messaging.consumer.group.name": self.group_id,
            "messaging.destination.partition.id": str(ev.partition),
            "messaging.kafka.offset": ev.offset,
            "messaging.kafka.message.key": ev.aggregate_id,
            "messaging.message.id": ev.event_id,
            "erp.event_type": ev.event_type,
            "erp.aggregate_version": ev.aggregate_version,
            "erp.attempt": ev.attempt,
        }

    def _process_recorder(self, topic: str, outcome: str) -> Callable[[float], None]:
        """The handler-duration histogram's series of a topic and outcome, found once."""
        key = (topic, outcome)
        record = self._recorders.get(key)
        if record is None:
            record = self._recorders[key] = self._m.process_duration.bound({
                "messaging.system": "kafka",
                "messaging.consumer.group.name": self.group_id,
                "messaging.destination.name": topic,
                "outcome": outcome,
            })
        return record

    # -- outcomes -----------------------------------------------------------------------------
    def _drain_completions(self, timeout: float) -> None:
        try:
            item = (
                self._completions.get(timeout=timeout)
                if timeout
                else self._completions.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            self._running -= 1
            self._busy_tp[item[0].tp] -= 1
            self._complete(*item)
            try:
                item = self._completions.get_nowait()
            except queue.Empty:
                return

    def _complete(self, work: Work, outcome: str, exc: BaseException | None) -> None:
        if not self._current(work.tp, work.gen):
            # The partition was revoked (and maybe given back) while this ran: its new owner
            # redoes the event from the last commit. Route nothing, record nothing.
            self.scheduler.done(work.key)
            return
        if outcome == OK:  # most events: decide()'s first rule, without the call
            self._settle(work, d.APPLIED, None)
            return
        kind = None
        if outcome == FAILED:
            assert exc is not None
            try:
                kind = classify(exc, self.dispatch.classify)
            except Exception:  # a connector's classify() that fails: retrying is the safe side
                log.exception(
                    "connector classify() failed on event %s; treating the error as transient",
                    work.event.event_id,
                    extra={"event_id": work.event.event_id},
                )
                kind = TRANSIENT
        now = self.clock()
        retry_after = getattr(exc, "retry_after_s", None)
        action = d.decide(
            outcome,
            kind=kind,
            attempt=work.event.attempt,
            tiers=self.tiers,
            now_ms=int(now * 1000),
            retry_after_s=retry_after if isinstance(retry_after, int | float) else None,
            target_alive=bool(getattr(exc, "target_alive", False)),
        )
        self._settle(work, action, exc)

    def _settle(self, work: Work, action: d.Action, exc: BaseException | None) -> None:
        """Tell the breaker what the outcome says, then carry the action out."""
        now = self.clock()
        was_open = self.breaker.is_open
        for effect in action.breaker:
            if effect == d.SUCCESS:
                self.breaker.success()
            elif effect == d.FAILURE:
                self.breaker.failure(now)
            else:
                self.breaker.cancel_probe(now)
        if action.unless_open and self.breaker.is_open:
            if not was_open:
                self.stats.breaker_opens += 1
                log.error(
                    "circuit breaker OPEN for worker %s after %d consecutive transient "
                    "failures (last: %s); consumption paused, probing",
                    self.name,
                    self.breaker.failures,
                    exc,
                )
            action = d.Action(d.HOLD)
        self._carry_out(work, action, exc)

    def _carry_out(self, work: Work, action: d.Action, exc: BaseException | None) -> None:
        """The one place an action changes state: ordering, offsets, copies, the key's turn."""
        ev = work.event
        verb = action.verb
        if verb == d.HOLD:
            if action.hold_s:
                self.bucket.hold_until(self.clock() + action.hold_s)
                log.warning(
                    "target asked to wait %.1fs (Retry-After) on event %s; pausing",
                    action.hold_s,
                    ev.event_id,
                    extra={"event_id": ev.event_id},
                )
            self._held.append(work)  # the key stays busy: its next event waits behind
            self.stats.held += 1
            return
        if verb == d.DONE:
            if action.applied:
                self.stats.applied += 1
                if ev.occurred_at is not None:
                    self._record_end_to_end(max(0.0, self.clock() - ev.occurred_at.timestamp()))
            else:
                self.stats.skipped += 1
            self.ordering.succeeded(work.key, ev.event_id)
            self._persist_ordering()
            self._finished(work.tp, ev.offset, work.gen)
            self.scheduler.done(work.key)
            if self.observer is not None:
                try:
                    self.observer(ev, OK if action.applied else SKIPPED)
                except Exception:  # an observer must never stop the worker
                    log.exception("observer failed on event %s", ev.event_id)
            return
        assert action.route is not None
        if verb == d.RETRY:
            self.ordering.retrying(work.key, ev.event_id, work.tp[1])
            tier = action.route.tier
            self.stats.retried[tier] = self.stats.retried.get(tier, 0) + 1
            self._m.retries.add(
                1, {"messaging.consumer.group.name": self.group_id, "tier": str(tier)}
            )
            log.warning(
                "event %s (%s %s v%d) failed (%s: %s); retry %d in %gs",
                ev.event_id,
                ev.event_type,
                ev.aggregate_id,
                ev.aggregate_version,
                type(exc).__name__,
                exc,
                tier,
                self.cfg.retry_delays_s[tier - 1],
                extra={"event_id": ev.event_id, "attempt": ev.attempt},
            )
        elif verb == d.DEAD_LETTER:
            self._count_dead_letter(work, exc, action.blocked_by)
        # the state first, then the copy: a crash keeps both or redoes both
        self._persist_ordering()
        self._route(
            work.msg,
            work.tp,
            work,
            action.route,
            exc,
            attempts=action.attempts,
            blocked_by=action.blocked_by,
            decode_error=str(exc) if isinstance(exc, DecodeError) else None,
        )
        self.scheduler.done(work.key)

    def _count_dead_letter(
        self, work: Work, exc: BaseException | None, blocked_by: str | None
    ) -> None:
        ev = work.event
        reason = type(exc).__name__ if exc is not None else "BlockedByDeadLetter"
        self.stats.dead_lettered[reason] = self.stats.dead_lettered.get(reason, 0) + 1
        self._m.dead_lettered.add(
            1, {"messaging.consumer.group.name": self.group_id, "error.type": reason}
        )
        self.ordering.dead_lettered(work.key, ev.event_id)
        if blocked_by:
            log.error(
                "event %s (%s %s v%d) sent to %s: it waited behind %s, which was "
                "dead-lettered (strict ordering); replay that one first",
                ev.event_id,
                ev.event_type,
                ev.aggregate_id,
                ev.aggregate_version,
                self.tiers.dlq_topic,
                blocked_by,
                extra={"event_id": ev.event_id},
            )
        else:
            log.error(
                "event %s (%s %s v%d) sent to %s after %d attempt(s): %s: %s",
                ev.event_id,
                ev.event_type,
                ev.aggregate_id,
                ev.aggregate_version,
                self.tiers.dlq_topic,
                ev.attempt,
                type(exc).__name__,
                exc,
                extra={"event_id": ev.event_id},
            )

    def _route(
        self,
        msg: Message,
        tp: TP,
        work: Work | None,
        route: routing.Route,
        exc: BaseException | None,
        *,
        attempts: int,
        blocked_by: str | None = None,
        decode_error: str | None = None,
    ) -> None:
        """Send the record, bytes untouched, to a retry tier or the DLQ (at its home partition);
        its offset finishes when Kafka acknowledged the copy."""
        assert self.forwarder is not None
        offset = int(msg.offset() or 0)
        traceparent = None
        if work is not None and work.trace is not None:
            traceparent = telemetry.send_span(
                route.topic,
                work.trace,
                {"messaging.message.id": work.event.event_id, "erp.retry_tier": route.tier},
            )
        event_id = work.event.event_id if work is not None else "(undecodable)"
        delivered = self._on_copy_acked(
            tp, offset, work.gen if work is not None else self._gen.get(tp, 0),
            f"write event {event_id} ({tp[0]}[{tp[1]}]@{offset}) to {route.topic}",
        )
        self.forwarder.copy(
            Source.of(msg),
            route,
            error=exc,
            attempts=attempts,
            blocked_by=blocked_by,
            decode_error=decode_error,
            traceparent=traceparent,
            on_done=delivered,
        )

    def _on_copy_acked(self, tp: TP, offset: int, gen: int, doing: str
                       ) -> Callable[[str | None, Any], None]:
        """Count a copy as under way; the record's offset finishes when Kafka acknowledged it.
        A refused copy stops the worker: its offset must not be committed, and later events of
        its key must not go on without it; the group redelivers from the last commit."""
        self._routing_pending += 1
        self._busy_tp[tp] += 1

        def done(err: str | None, _m: Any) -> None:
            self._routing_pending -= 1
            self._busy_tp[tp] -= 1
            if err is not None:
                self._fatal = PipelineError(
                    f"could not {doing}: {err}; the worker stops so that it is consumed again "
                    "from the last committed offset — check the topic and the broker"
                )
                return
            self._finished(tp, offset, gen)

        return done

    def _current(self, tp: TP, gen: int) -> bool:
        """Is the partition still assigned as it was when this work was consumed?"""
        return tp in self.assigned and self._gen.get(tp) == gen

    def _finished(self, tp: TP, offset: int, gen: int) -> None:
        tracker = self.offsets.get(tp)
        if tracker is not None and self._current(tp, gen):
            tracker.finished(offset)

    # -- strict ordering state ----------------------------------------------------------------
    def _persist_ordering(self) -> None:
        if not self.ordering.changes:
            return
        assert self.forwarder is not None
        for key, (partition, state) in self.ordering.take_placed_changes().items():
            self._parked_pending += 1
            self.forwarder.send(
                self.tiers.parked_topic,
                partition,
                key.encode(),
                state.to_json() if state else None,
                on_done=self._parked_delivered,
            )

    def _parked_delivered(self, err: str | None, msg: Any) -> None:
        self._parked_pending -= 1
        if err is not None:
            self._fatal = PipelineError(
                f"could not record the ordering state of key {msg.key()!r} in "
                f"{self.tiers.parked_topic}: {err}; the worker stops so that strict "
                "ordering is not broken — check the topic and the broker"
            )

    def _load_parked(self, cells: list[int]) -> None:
        """Read the parked keys of ``cells`` (partitions of the compacted topic)."""
        for m in self.clients.read(
            [self.tiers.parked_topic], set(cells), purpose=f"{self.group}-parked"
        ):
            value, key = m.value(), (m.key() or b"").decode()
            part = int(m.partition() or 0)
            try:
                # a state written before states named their partition: the one it sits in
                state = KeyState.from_json(value, partition=part) if value else None
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "skipping malformed parked-key record %s[%d]@%s (key %r): %s",
                    self.tiers.parked_topic,
                    part,
                    m.offset(),
                    key,
                    exc,
                )
                continue
            self.ordering.load(key, state)
        mine = set(cells)
        log.info(
            "worker %s owns cell(s) %s: %d keys parked behind retried or dead-lettered events",
            self.name,
            ",".join(map(str, cells)),
            sum(1 for st in self.ordering.keys.values() if st.partition in mine),
        )

    # -- offsets and rebalances ---------------------------------------------------------------
    def _commit(self, asynchronous: bool) -> None:
        self._last_commit = time.monotonic()
        if self._consumer is None:
            return
        if self._parked_pending and self._producer is not None:
            # offsets never get ahead of the ordering state they depend on
            self._producer.flush(5)
            if self._parked_pending:
                return
        parts = []
        for tp, tracker in self.offsets.items():
            off = tracker.committable()
            if off is not None and tp in self.assigned:
                parts.append(TopicPartition(tp[0], tp[1], off))
        if not parts:
            return
        try:
            if asynchronous:
                self._consumer.commit(offsets=parts, asynchronous=True)
            else:
                self._consumer.commit(offsets=parts, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("offset commit failed (it is retried): %s", exc.args[0].str())

    def _on_assign(self, _consumer: Any, parts: list[TopicPartition]) -> None:
        self._generation += 1
        tps = [(str(p.topic), int(p.partition)) for p in parts]
        for tp in tps:
            self.assigned.add(tp)
            self.offsets[tp] = PartitionOffsets()
            self._gen[tp] = self._generation
        whole = self.cells.assign(tps)
        if whole:
            # A cell's keys may come from another member: read their state after our own
            # pending changes reached the topic.
            self._flush(10)
            try:
                self._load_parked(whole)
            except PipelineError as exc:
                self._fatal = PipelineError(
                    f"could not read {self.tiers.parked_topic} for cell(s) {whole} ({exc}); "
                    "the worker stops rather than run those keys without their retry state"
                )
        assert self._consumer is not None
        partial = [tp for tp in tps if not self.cells.owns(tp[1])]
        for tp in partial:
            self._due_pauses[tp] = _NEVER
        # librdkafka keeps a partition's pause across a revocation and a new assignment: a
        # retry partition paused until due, then revoked and given back, would stay paused
        # for good. Set every assigned partition's state here, explicitly.
        self._apply_pauses(tps)
        self._reconcile_pauses = True
        now_whole = [tp for c in whole for tp in self.cells.partitions(c)
                     if self._due_pauses.get(tp) == _NEVER]
        if now_whole:
            self._resume(now_whole)  # waited for the rest of their cell
        log.info(
            "worker %s assigned %s%s",
            self.name,
            _fmt(parts),
            f" (cells waiting for the rest of their partitions: {sorted({p for _, p in partial})})"
            if partial else "",
        )

    def _on_revoke(self, _consumer: Any, parts: list[TopicPartition]) -> None:
        """Let go of whole cells: hand back their queued work, let running handlers finish
        (within the grace period), write their state and copies, commit, forget their keys."""
        revoked = {(str(p.topic), int(p.partition)) for p in parts}
        broken = self.cells.affected(revoked)
        # every partition of a broken cell stops, including those the member keeps for now
        stopping = revoked | {tp for c in broken for tp in self.cells.partitions(c)}
        self.cells.revoke(revoked)
        dropped = self.scheduler.drop(lambda w: w.tp in stopping)
        for w in [w for w in self._held if w.tp in stopping]:
            self._held.remove(w)
            self.scheduler.done(w.key)  # its key ran (and failed); it is no longer ours
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        # wait for what is really under way: running handlers and unacknowledged copies
        self._settle_until(deadline, lambda: any(self._busy_tp[tp] > 0 for tp in stopping))
        self._flush(max(1.0, deadline - time.monotonic()))  # parked state before the offsets
        self._commit(asynchronous=False)
        kept = stopping - revoked
        # back to the first record not finished, or to its last rewind if that is earlier (a
        # held retry record with nothing unfinished before it; kept until the partition really
        # resumes, so also one resumed while everything was paused)
        resume_at = {tp: _earliest(self.offsets[tp].oldest_unfinished(),
                                   self._seek_on_resume.get(tp))
                     for tp in kept if tp in self.offsets}
        for tp in stopping:
            self._due_pauses.pop(tp, None)
            self._rewound.pop(tp, None)
            self._seek_on_resume.pop(tp, None)
        for tp in revoked:
            self.assigned.discard(tp)
            self.offsets.pop(tp, None)
        if kept:
            # still ours but not whole: paused, and back to the first record not finished
            self._generation += 1
            assert self._consumer is not None
            for tp in kept:
                self._gen[tp] = self._generation
                self.offsets[tp] = PartitionOffsets()
                at = resume_at.get(tp)
                if at is not None:
                    self._hold_partition(tp, at, _NEVER)
                else:
                    self._consumer.pause([TopicPartition(*tp)])
                    self._due_pauses[tp] = _NEVER
        forgotten = self.ordering.forget(set(broken))
        for key in [k for k, (_h, cell) in self._stalled.items() if cell in broken]:
            del self._stalled[key]
        log.info(
            "worker %s revoked %s (%d queued events handed back; cell(s) %s let go with %d "
            "parked keys)",
            self.name,
            _fmt(parts),
            len(dropped),
            broken or "none",
            forgotten,
        )

    def _on_kafka_error(self, err: KafkaError) -> None:
        down = (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT)
        if err.code() in down and self._broker_down_since is None:
            self._broker_down_since = time.monotonic()
        log.warning("kafka consumer: %s", err.str())

    # -- health -------------------------------------------------------------------------------
    def _readyz(self) -> tuple[bool, dict[str, Any]]:
        down = self._broker_down_since
        if down is not None and self._consumer is not None and time.monotonic() - down > 5:
            try:  # still down? a metadata request answers it
                self._consumer.list_topics(timeout=1)
                self._broker_down_since = down = None
            except KafkaException:
                pass
        ok = bool(self.assigned) and down is None
        return ok, {
            "broker_reachable": down is None,
            "assigned_partitions": len(self.assigned),
            "cells": len(self.cells.whole),
            "breaker": self.breaker.state,
            "parked_keys": self.ordering.parked,
            "stalled_keys": len(self._stalled),
        }


class _Pace:
    """Chooses between running handlers on the pool and inline on the loop thread.

    Handlers start on the pool. When the recent mean call time is under ``inline_below_s``
    they run inline; one call slower than ``pool_above_s`` sends them back to the pool, so a
    target that slows down gets its concurrency back at once.
    """

    inline_below_s = 0.0002
    pool_above_s = 0.002

    def __init__(self) -> None:
        self.inline = False
        self.mean = 0.0
        self.samples = 0

    def observe(self, seconds: float) -> None:
        # No lock: handler threads and the loop call this at once only in pool mode, and a
        # sample lost there moves a moving average by a little; a lock per event cost more.
        self.samples += 1
        self.mean += (seconds - self.mean) * 0.05
        if seconds > self.pool_above_s:
            self.inline = False
            self.mean = max(self.mean, seconds)
        elif self.samples >= 200 and self.mean < self.inline_below_s:
            self.inline = True


def _earliest(*offsets: int | None) -> int | None:
    known = [o for o in offsets if o is not None]
    return min(known) if known else None


def _record_bytes(work: Work) -> int:
    """What a queued record weighs: its value and key (headers and the decoded event aside)."""
    return len(work.msg.value() or b"") + len(work.msg.key() or b"")


def _fmt(parts: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in parts) or "nothing"
