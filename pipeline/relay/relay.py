"""The relay loop (``pipeline relay``): one leader per shard publishes outbox rows in id order.

    connect ─▶ try lock ──no──▶ standby: retry every lock_retry_s
                 │yes
                 ▼
            skip rows already in Kafka (read back each partition's tail: decision 4)
                 ▼
       ┌──▶ fetch ≤ batch_size rows ORDER BY id ──none──▶ wait for NOTIFY or poll_interval
       │         ▼
       │    encode each row (bad row → outbox DLQ, or halt) ─▶ produce ─▶ wait for every ack
       └─── delete the acknowledged rows in one transaction

A row is deleted only after Kafka acknowledged it, so a crash at any point loses nothing; what
was acknowledged but not deleted is found again by the read-back on the next start.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from pipeline import exactjson, telemetry
from pipeline.claimcheck import ClaimStore, claim_store, sha256
from pipeline.config import Settings
from pipeline.db import database_url, first_line
from pipeline.errors import (
    BrokerUnavailable,
    DatabaseUnavailable,
    PayloadTooLarge,
    PermanentError,
    PipelineError,
    TransientError,
)
from pipeline.kafka import names
from pipeline.kafka.client import (
    producer_config,
    transactional_config,
    transactions_enabled,
    wrap_kafka_error,
)
from pipeline.kafka.tail import read_to_end
from pipeline.kafka.topics import ensure_topics
from pipeline.outbox.status import BacklogProbe
from pipeline.relay.envelope import (
    OutboxRow,
    Oversized,
    Record,
    build_record,
    claim_check_record,
    dead_letter_record,
    dead_letter_stub,
)
from pipeline.relay.store import leader_name, relay_store
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder
from pipeline.worker.health import HealthServer

log = logging.getLogger("pipeline.relay")

# Delivery errors that retrying cannot fix: the row goes to the outbox DLQ.
_PERMANENT_DELIVERY = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.RECORD_LIST_TOO_LARGE,
}


# transactions a batch may take when Kafka refuses some of its records after sending them
_MAX_TXN_ROUNDS = 5

# what a producer fenced by a newer one of its transactional id answers
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}

# an idle leader's heartbeat (relay_state.heartbeat): `pipeline status` calls one older than 30 s
# stale
_HEARTBEAT_S = 1.0

# Kafka timestamps come from the producer's clock, the heartbeat from the database's.
_CLOCK_MARGIN_MS = 30 * 1000


class RelayHalted(PipelineError):
    """``relay.on_invalid: halt`` met a bad row; the message names it."""


@dataclass
class RelayStats:
    published: int = 0
    dead_lettered: int = 0
    claim_checked: int = 0
    skipped_duplicates: int = 0
    batches: int = 0
    leader_since: float | None = None
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


Observer = Callable[[list[OutboxRow], float], None]


@dataclass(slots=True)
class _Prepared:
    """A fetched batch, encoded: its rows in id order, their records, and the rows that cannot
    be published (to be dead-lettered, or to halt the relay, when the batch's turn comes)."""

    rows: list[OutboxRow]
    records: list[tuple[OutboxRow, Record]]
    failed: list[tuple[OutboxRow, BaseException]]


class Relay:
    """Publishes one shard's outbox rows. ``run(stop)`` returns when ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        shard: int = 0,
        *,
        catalogue: Catalogue | None = None,
        observer: Observer | None = None,
    ) -> None:
        if not 0 <= shard < settings.relay.shards:
            raise ValueError(
                f"shard {shard} is out of range: relay.shards is {settings.relay.shards}"
            )
        self.settings = settings
        self.cfg = settings.relay
        self.shard = shard
        self.catalogue = catalogue or Catalogue.load(settings.schemas.path)
        self.encoder = Encoder(self.catalogue, _registry(settings))
        self.observer = observer
        self.name = leader_name()
        self.stats = RelayStats()
        self.store = relay_store(
            database_url(settings), settings.database.schema_name, shard, settings.relay.shards,
            writer_fingerprints=self.encoder.writer_fingerprints(),
            engine=settings.relay.engine, slot_prefix=settings.relay.wal_slot_prefix,
        )
        self.is_leader = False
        # set once a leader has finished its start (topics, producer, read-back) and publishes
        self.ready = threading.Event()
        self.health_port: int | None = None
        self._producer: Producer | None = None
        self._claims: ClaimStore | None = None
        self._claims_lock = threading.Lock()
        self._known_topics: set[str] = set()
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix=f"relay-fetch-{shard}")
        self._prefetch: Future[_Prepared] | None = None
        # the delete of the last published batch, on the fetcher's thread: the next batch is
        # encoded and sent meanwhile
        self._completing: Future[None] | None = None
        self._delivery_errors: list[tuple[KafkaError, bytes, tuple[Any, Any, Any]]] = []
        # Kafka transactions (kafka.transactions): decided once, on the first leadership
        self._txn: bool | None = None
        self._txn_ready = False  # init_transactions done on the current producer
        self._txn_open = False
        self._must_abort = False  # the current transaction cannot take more records

    # -- lifecycle --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Lead (or stand by) until ``stop`` is set; rides out database and broker outages."""
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait_exponential_jitter(multiplier=0.5, max=10.0),
            stop=lambda _: stop.is_set(),
            sleep=_interruptible_sleep(stop),
            before_sleep=self._log_retry,
            reraise=True,
        )
        m = telemetry.metrics()
        backlog = BacklogProbe(database_url(self.settings), self.settings.database.schema_name)
        removers = [
            m.observe("pipeline.relay.leader", self._gauges),
            m.observe("pipeline.outbox.backlog", backlog.rows),
            m.observe("pipeline.outbox.oldest_age", backlog.oldest_age),
            m.observe("pipeline.relay.wal.retained", backlog.slot_retained_bytes),
            m.observe("pipeline.relay.wal.lag", backlog.slot_lag_bytes),
        ]
        health = self._health_server()
        try:
            for attempt in retrying:
                with attempt:
                    if stop.is_set():
                        return
                    self._session(stop)
        except TransientError:
            if not stop.is_set():
                raise
        finally:
            for remove in removers:
                remove()
            if health is not None:
                health.stop()
            self._shutdown()

    def _health_server(self) -> HealthServer | None:
        if self.cfg.health_port is None:
            return None
        server = HealthServer(
            self.cfg.health_port,
            lambda: (True, {"leader": self.is_leader, "shard": self.shard}),
            lambda: (True, {"leader": self.is_leader, "shard": self.shard}),
        ).start()
        self.health_port = server.port
        log.info("relay health and metrics on port %d", server.port)
        return server

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "relay waiting for a dependency: %s; retrying in %.1fs",
            exc,
            state.upcoming_sleep,
            extra={"shard": self.shard, "attempt": state.attempt_number},
        )

    def _session(self, stop: threading.Event) -> None:
        try:
            self.store.connect()
            announced = False
            while not self.store.try_lead():
                if not announced:
                    log.info(
                        "relay is standby for shard %d/%d: leader is %s",
                        self.shard,
                        self.cfg.shards,
                        self.store.current_leader() or "unknown",
                        extra={"shard": self.shard},
                    )
                    announced = True
                if stop.wait(self.cfg.lock_retry_s):
                    return
            self.is_leader = True
            self.stats.leader_since = time.time()
            log.info(
                "relay is leader for shard %d/%d",
                self.shard,
                self.cfg.shards,
                extra={"shard": self.shard, "leader": self.name},
            )
            # the engine the outbox is written for is the one this relay runs
            self.store.check_engine()
            # before our first heartbeat overwrites it: when the previous leader was last seen
            previous_activity_ms = self.store.last_activity_ms()
            self.store.complete([], self.name, 0, 0)
            # Topics of the configured aggregate types up front: creating one mid-stream
            # stalls the batch that first needs it.
            self._ensure_topics(set(self.settings.topics.aggregate_types))
            self._warm_producer()
            self._skip_already_published(previous_activity_ms)
            self.ready.set()
            beat = time.monotonic()
            while not stop.is_set():
                if self.step(stop) == 0:
                    self.store.wait(self.cfg.poll_interval_s)
                    # every published batch beats too; an idle one once a second at most (a
                    # heartbeat per wake-up was a transaction per few events at low rates)
                    if time.monotonic() - beat >= _HEARTBEAT_S:
                        self.store.complete([], self.name, 0, 0)
                        beat = time.monotonic()
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"PostgreSQL connection lost: {first_line(exc)}") from exc
        finally:
            self._discard_prefetch()
            self._settle(raise_errors=False)
            # Whatever is in flight must land (or be abandoned) before another session's
            # read-back, or a record could arrive after a new leader looked.
            self._drain(timeout=self.cfg.flush_timeout_s)
            self.ready.clear()
            self.is_leader = False
            self.store.close()

    def _discard_prefetch(self) -> None:
        fut, self._prefetch = self._prefetch, None
        if fut is not None:
            try:
                fut.result(timeout=30)
            except Exception:
                log.debug("discarded look-ahead fetch failed", exc_info=True)

    def _settle(self, *, raise_errors: bool = True) -> None:
        """Wait for the last batch's delete. A failed delete leaves its rows in the outbox: the
        session ends, and the next one's read-back finds them in Kafka (never sent twice)."""
        fut, self._completing = self._completing, None
        if fut is None:
            return
        try:
            fut.result()
        except psycopg.OperationalError as exc:
            if raise_errors:
                raise DatabaseUnavailable(
                    f"PostgreSQL connection lost deleting published rows: {first_line(exc)}; "
                    "they stay in the outbox and are found in Kafka by the next read-back"
                ) from exc
            log.warning("deleting a published batch failed: %s; its rows are found in Kafka "
                        "by the next read-back", first_line(exc))
        except Exception:
            if raise_errors:
                raise
            log.warning("deleting a published batch failed", exc_info=True)

    def _complete(self, ids: list[int], published: int, dead_lettered: int) -> None:
        """Delete a published batch's rows; only then are they counted as published."""
        self.store.complete(ids, self.name, published, dead_lettered)
        self.stats.published += published
        self.stats.dead_lettered += dead_lettered
        self.stats.batches += 1

    def _fetch_after_delete(
        self, delete: Future[None] | None, limit: int, exclude: list[int]
    ) -> _Prepared:
        """The look-ahead fetch, queued behind the previous batch's ``delete`` on the same
        thread (so done by now): had it failed, its rows would come again, so this fails too.
        The rows are encoded here too."""
        if delete is not None:
            delete.result()
        return self._prepare(self.store.fetch(limit, exclude))

    def _shutdown(self) -> None:
        self._settle(raise_errors=False)
        self._fetcher.shutdown(wait=True)
        self.encoder.close()
        self._drain(timeout=self.cfg.flush_timeout_s)
        self._producer = None  # closes the client now, not whenever it is collected
        if self._claims is not None:
            self._claims.close()
        self.store.close()

    def _drain(self, timeout: float) -> None:
        if self._producer is not None and self._txn_open:
            # a batch that did not commit is aborted: its rows stay in the outbox, and no
            # read_committed consumer (the next leader's read-back included) sees its records
            self._abort("the relay stopped mid-batch")
        if self._producer is not None:
            left = self._producer.flush(timeout)
            if left:
                log.error(
                    "relay exits with %d records unacknowledged; their rows stay in the "
                    "outbox and are checked against Kafka on the next start",
                    left,
                )
                self._producer.purge()
                self._producer = None
                self._txn_ready = False

    # -- clients ----------------------------------------------------------------------------
    @property
    def transactional_id(self) -> str:
        """Shared by every relay of this shard, so that a new leader's ``init_transactions``
        fences the one before it."""
        return f"{self.settings.topics.prefix}.relay.shard-{self.shard}-of-{self.cfg.shards}"

    @property
    def transactional(self) -> bool:
        if self._txn is None:
            self._txn = transactions_enabled(self.settings)
        return self._txn

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            extra = (
                transactional_config(self.settings, self.transactional_id)
                if self.transactional
                else {}
            )
            self._producer = Producer(
                producer_config(
                    self.settings,
                    **{
                        "error_cb": _log_kafka_error,
                        "on_delivery": self._on_delivery,
                        "delivery.report.only.error": True,
                        **extra,
                    },
                )
            )
            self._txn_ready = False
        return self._producer

    # -- transactions -------------------------------------------------------------------------
    def _init_transactions(self) -> None:
        """Register our transactional id: the broker aborts whatever a previous leader of this
        shard left open and refuses its later writes (fencing)."""
        try:
            self.producer.init_transactions(self.settings.kafka.request_timeout_s * 3)
        except KafkaException as exc:
            self._drop_producer_if_fatal(exc)
            raise wrap_kafka_error(exc, f"registering transactional id {self.transactional_id}") \
                from exc
        self._txn_ready = True
        log.info(
            "relay publishes in Kafka transactions (transactional id %s): a deposed leader's "
            "unfinished batch is aborted and its later writes refused",
            self.transactional_id,
            extra={"shard": self.shard},
        )

    def _begin(self) -> None:
        if not self._txn_ready:  # a producer replaced after a failed abort
            self._init_transactions()
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            self._drop_producer_if_fatal(exc)
            raise wrap_kafka_error(exc, "beginning a transaction") from exc
        self._txn_open = True

    def _commit(self, stop: threading.Event | None) -> None:
        producer = self.producer
        while True:
            try:
                producer.commit_transaction(self.settings.kafka.transaction_timeout_s)
                self._txn_open = False
                return
            except KafkaException as exc:
                err = exc.args[0]
                fenced = err.code() in _FENCED
                if self._drop_producer_if_fatal(exc):
                    raise BrokerUnavailable(
                        f"relay's transactional id {self.transactional_id} was fenced: another "
                        f"relay has taken over shard {self.shard} ({err.str()}); this batch is "
                        "aborted, its rows stay in the outbox for the leader"
                        if fenced else
                        f"relay's producer met a fatal error committing a batch "
                        f"({err.name()}: {err.str()}); a new producer is made, the batch's "
                        "rows stay in the outbox and are sent again",
                        code=err.code(),
                    ) from exc
                if err.txn_requires_abort() or not err.retriable() or (stop and stop.is_set()):
                    self._abort(err.str())
                    raise wrap_kafka_error(
                        exc, "committing a batch (not confirmed: its rows stay in the outbox; "
                        "if it did land, the next read-back finds it)") from exc
                log.warning("relay retrying the commit of a batch: %s", err.str())

    def _abort(self, why: str) -> None:
        self._txn_open = False
        if self._producer is None:
            return
        try:
            # what an abortable transaction still queues is never sent: purge it and serve
            # the reports, which abort_transaction waits for
            self._producer.purge(in_queue=True, in_flight=False)
            self._producer.poll(0)
            self._producer.abort_transaction(self.settings.kafka.transaction_timeout_s)
            log.warning("relay aborted a transaction (%s); its rows are sent again", why,
                        extra={"shard": self.shard})
        except KafkaException as exc:
            # A producer whose abort failed cannot begin again: drop it. The next one's
            # init_transactions (same transactional id) makes the broker abort what is open.
            log.warning("relay could not abort a transaction (%s): %s; the producer is "
                        "replaced", why, exc.args[0].str(), extra={"shard": self.shard})
            self._drop_producer()

    def _drop_producer_if_fatal(self, exc: KafkaException) -> bool:
        """A fatal error (fenced) leaves the producer unusable: the next session makes another."""
        err = exc.args[0]
        if err.fatal() or err.code() in _FENCED:
            self._drop_producer()
            return True
        return False

    def _drop_producer(self) -> None:
        if self._producer is not None:
            self._producer.purge()
        self._producer = None
        self._txn_ready = self._txn_open = self._must_abort = False

    @property
    def claims(self) -> ClaimStore:
        # both threads store bodies (encoding on the fetch thread, dead letters on the main)
        with self._claims_lock:
            if self._claims is None:
                self._claims = claim_store(self.settings)
            return self._claims

    def _ensure_topics(self, aggregate_types: set[str]) -> None:
        topics = {self.settings.topics.event_topic(a): a for a in aggregate_types}
        missing = [a for t, a in topics.items() if t not in self._known_topics]
        if not missing:
            return
        ensure_topics(self.settings, sorted(missing))
        self._known_topics.update(topics)
        self._known_topics.add(self.settings.topics.outbox_dlq)

    def _warm_producer(self) -> None:
        """Connect and load topic metadata now, so the first events do not pay for it."""
        try:
            self.producer.list_topics(timeout=self.settings.kafka.request_timeout_s)
        except KafkaException as exc:
            raise wrap_kafka_error(exc, "connecting the relay's producer", self.producer) \
                from exc
        if self.transactional and not self._txn_ready:
            self._init_transactions()

    # -- decision 4: no duplicates after a crash ---------------------------------------------
    def _skip_already_published(self, previous_activity_ms: int | None = None) -> None:
        """Delete outbox rows that are already in Kafka. Read back the last ``window`` records
        of each partition, and further back to the previous leader's last activity (minus a
        margin for clock differences): other shards' leaders keep writing into the same
        partitions and could push a dead leader's unconfirmed records out of a count window."""
        types = set(self.store.pending_aggregate_types())
        if self.cfg.engine == "wal":
            # a slot's head may hold events of any type not yet confirmed: read every topic
            types |= set(self.settings.topics.aggregate_types)
        if not types:
            return
        self._ensure_topics(set(types))
        window = self.cfg.dedupe_window or 2 * self.cfg.batch_size * self.cfg.shards
        topics = [self.settings.topics.event_topic(t) for t in types]
        topics.append(self.settings.topics.outbox_dlq)
        since_ms = (
            previous_activity_ms - _CLOCK_MARGIN_MS if previous_activity_ms is not None else None
        )
        positions = read_back_positions(
            self.settings,
            topics,
            window,
            self.cfg.source,
            timeout_s=self.settings.kafka.request_timeout_s,
            since_ms=since_ms,
        )
        published = self.store.forget_published(positions, self.name)
        if published:
            self.stats.skipped_duplicates += published
            log.warning(
                "relay found %d outbox rows already in Kafka (acknowledged before the "
                "last stop but not deleted): removed without publishing again",
                published,
                extra={"shard": self.shard},
            )

    # -- one batch --------------------------------------------------------------------------
    def step(self, stop: threading.Event | None = None) -> int:
        """Publish one batch; returns the number of rows handled (0 when the outbox is empty).

        While this batch is encoded and sent, the next one is fetched in the background (rows
        of this batch excluded): the database's work overlaps the encoding. Order is safe: any
        row the look-ahead sees of an aggregate in this batch has a later version.
        """
        batch = self._take_prefetched()
        if batch is None:
            self._settle()  # a fetch of our own must not see rows whose delete is queued
            batch = self._prepare(self.store.fetch(self.cfg.batch_size))
        if not batch.rows:
            self._settle()
            return 0
        self._prefetch = self._fetcher.submit(
            self._fetch_after_delete, self._completing, self.cfg.batch_size,
            [r.id for r in batch.rows],
        )
        try:
            return self._publish_batch(batch, stop)
        except BaseException:
            # The look-ahead assumed this batch would be deleted: it must not outlive it.
            self._discard_prefetch()
            raise

    def _prepare(self, rows: list[OutboxRow]) -> _Prepared:
        """Encode a batch (no I/O but claim-check stores): on the fetch thread for the
        look-ahead, so that it overlaps the previous batch's wait for Kafka."""
        topics = self.settings.topics
        records: list[tuple[OutboxRow, Record]] = []
        failed: list[tuple[OutboxRow, BaseException]] = []
        for row in rows:
            topic = topics.event_topic(row.aggregate_type)
            try:
                rec = build_record(
                    row,
                    self.encoder,
                    topic=topic,
                    source=self.cfg.source,
                    max_inline_bytes=self.cfg.max_inline_bytes,
                    max_payload_bytes=self.cfg.max_payload_bytes,
                )
                if isinstance(rec, Oversized):
                    rec = self._claim_check(row, rec, topic)
                records.append((row, rec))
            except PermanentError as exc:
                failed.append((row, exc))
        return _Prepared(rows, records, failed)

    def _publish_batch(self, batch: _Prepared, stop: threading.Event | None) -> int:
        rows = batch.rows
        self._ensure_topics({r.aggregate_type for r in rows})
        topics = self.settings.topics
        records = batch.records
        dead: list[tuple[OutboxRow, BaseException]] = []
        for row, exc in batch.failed:
            self._invalid(row, exc)  # halts here (relay.on_invalid: halt) before any send
            dead.append((row, exc))
        if telemetry.tracing():
            records = [(row, self._traced(row, rec)) for row, rec in records]
        started = time.perf_counter()
        txn = self.transactional
        if txn:
            if not self._txn_ready:
                self._init_transactions()
            self._begin()
        refused = self._publish(records, stop)
        rounds = 1
        while txn and (self._must_abort or (refused and self._delivery_errors)):
            # A record refused after it was sent makes the transaction abortable (and every
            # later produce fails): abort, and send the batch again without the records
            # refused so far. Each round names at least one more, or ends.
            if rounds >= _MAX_TXN_ROUNDS:
                self._abort("too many refused records")
                raise BrokerUnavailable(
                    f"Kafka kept refusing records of a batch after {rounds} transactions "
                    f"(e.g. {refused[0][1] if refused else 'no record named'}); the batch is "
                    "sent again later"
                )
            self._abort(f"{len(refused)} record(s) refused")
            self._begin()
            gone = {id(r) for r, _ in refused}
            refused += self._publish([(r, rec) for r, rec in records if id(r) not in gone], stop)
            rounds += 1
        for failed_row, error in refused:
            self._invalid(failed_row, error)
            dead.append((failed_row, error))
        if dead:
            dlq_failures = self._publish([(r, self._dead_letter(r, e)) for r, e in dead], stop)
            if dlq_failures:
                lost_row, error = dlq_failures[0]
                raise RelayHalted(
                    f"cannot write event {lost_row.event_id} (outbox id {lost_row.id}) to the "
                    f"outbox DLQ {topics.outbox_dlq}: {error}; the relay stops so that nothing "
                    "is lost"
                )
        if txn:
            self._commit(stop)
        ack = time.time()
        self._measure(records, dead, time.perf_counter() - started)
        # Deleted while the next batch is encoded and sent: the look-ahead already left these
        # rows out, and every later fetch is queued behind this delete on the same thread.
        self._completing = self._fetcher.submit(
            self._complete, [r.id for r in rows], len(rows) - len(dead), len(dead)
        )
        if self.observer is not None:
            self.observer(rows, ack)
        return len(rows)

    def _traced(self, row: OutboxRow, rec: Record) -> Record:
        """The record under a ``send <topic>`` span that continues the ERP's trace."""
        parent = row.headers.get(names.TRACEPARENT)
        tp = telemetry.send_span(
            rec.topic,
            parent if isinstance(parent, str) else None,
            {
                "messaging.message.id": row.event_id,
                "messaging.kafka.message.key": row.aggregate_id,
                "erp.event_type": row.event_type,
                "erp.aggregate_version": row.aggregate_version,
                "erp.outbox_id": row.id,
            },
        )
        if tp is None:
            return rec
        headers = [(k, v) for k, v in rec.headers if k != names.TRACEPARENT]
        headers.append((names.TRACEPARENT, tp.encode()))
        return dataclasses.replace(rec, headers=headers)

    def _measure(
        self,
        records: list[tuple[OutboxRow, Record]],
        dead: list[tuple[OutboxRow, BaseException]],
        seconds: float,
    ) -> None:
        m = telemetry.metrics()
        failed = {r.id for r, _e in dead}
        per_topic = collections.Counter(rec.topic for row, rec in records if row.id not in failed)
        for topic, n in per_topic.items():
            m.sent.add(n, {"messaging.system": "kafka", "messaging.destination.name": topic})
        if records:
            m.operation_duration.record(
                seconds, {"messaging.system": "kafka", "messaging.operation.name": "send"}
            )

    def _gauges(self) -> list[tuple[float, dict[str, object]]]:
        return [(1.0 if self.is_leader else 0.0, {"shard": self.shard})]

    def _take_prefetched(self) -> _Prepared | None:
        fut, self._prefetch = self._prefetch, None
        if fut is None:
            return None
        try:
            return fut.result()
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"PostgreSQL connection lost: {first_line(exc)}") from exc

    def _claim_check(self, row: OutboxRow, over: Oversized, topic: str) -> Record:
        ref = self.claims.put(row.event_id, over.body)
        self.stats.claim_checked += 1
        log.info(
            "event %s (%s) is %d bytes encoded: stored in the %s claim-check store as %s",
            row.event_id,
            row.event_type,
            len(over.body),
            self.claims.name,
            ref,
            extra={"event_id": row.event_id},
        )
        return claim_check_record(
            row,
            self.encoder,
            over,
            topic=topic,
            source=self.cfg.source,
            store=self.claims.name,
            ref=ref,
            sha256=sha256(over.body),
        )

    def _dead_letter(self, row: OutboxRow, exc: BaseException) -> Record:
        if row.payload_text is None and row.encoded is not None:
            # a passed-through row came without its readable form: the DLQ keeps that
            text = self.store.payload_text(row.id)
            row = dataclasses.replace(row, payload_text=text,
                                      payload=exactjson.loads(text) if text else None)
        rec, body = dead_letter_record(
            row,
            exc,
            topic=self.settings.topics.outbox_dlq,
            source=self.cfg.source,
            max_inline_bytes=self.cfg.max_inline_bytes,
        )
        if body is not None:
            ref = self.claims.put(row.event_id, body)
            rec = dead_letter_stub(rec, row, self.claims.name, ref, len(body))
        return rec

    def _invalid(self, row: OutboxRow, exc: BaseException) -> None:
        where = (
            f"event {row.event_id} (outbox id {row.id}, {row.event_type}, "
            f"{row.aggregate_type} {row.aggregate_id} v{row.aggregate_version})"
        )
        if self.cfg.on_invalid == "halt":
            raise RelayHalted(
                f"relay halted on a bad row ({self.cfg.on_invalid=}): {where}: {exc}. Fix or "
                f"delete the row in {self.settings.database.schema_name}.outbox, or set "
                "relay.on_invalid: dlq to dead-letter such rows and keep going"
            )
        reason = type(exc).__name__
        self.stats.dead_letter_reasons[reason] = self.stats.dead_letter_reasons.get(reason, 0) + 1
        log.error(
            "%s cannot be published: %s; sent to %s",
            where,
            exc,
            self.settings.topics.outbox_dlq,
            extra={"event_id": row.event_id, "outbox_id": row.id, "error_class": reason},
        )

    def _publish(
        self, records: list[tuple[OutboxRow, Record]], stop: threading.Event | None
    ) -> list[tuple[OutboxRow, BaseException]]:
        """Produce and wait for every acknowledgement. Returns the rows Kafka refused for good;
        waits out transient trouble (librdkafka retries forever: message.timeout.ms=0).

        Only failed deliveries are reported back (``delivery.report.only.error``): a Python
        callback per acknowledged record would cost more than the rest of its trip.
        """
        if not records:
            return []
        producer = self.producer
        self._delivery_errors.clear()
        self._must_abort = False
        produce = producer.produce
        refused: list[tuple[OutboxRow, BaseException]] = []
        for row, rec in records:
            while True:
                try:
                    produce(rec.topic, rec.value, rec.key, headers=rec.headers)
                    break
                except BufferError:
                    producer.poll(0.05)
                except KafkaException as exc:
                    err = exc.args[0]
                    if self._txn_open and (err.code() == KafkaError._STATE
                                           or err.txn_requires_abort()):
                        # an earlier record's refusal made the transaction abortable: the
                        # rest of the batch is not refused, it is sent again after the abort
                        self._must_abort = True
                        break
                    # refused before sending, e.g. over the size
                    refused.append((row, _delivery_failure(err, row)))
                    break
            if self._must_abort:
                break
        waited_since = time.monotonic()
        warned = 0.0
        while (left := producer.flush(0.2 if self._txn_open else 1.0)) > 0:
            if self._txn_open and (self._delivery_errors or self._must_abort):
                # an abortable transaction sends nothing more: what is queued would only wait
                # for its timeout; the abort discards it and the batch is sent again
                self._must_abort = True
                break
            waited = time.monotonic() - waited_since
            if waited - warned >= 10:
                warned = waited
                log.warning(
                    "relay waiting %.0fs for Kafka to acknowledge %d records "
                    "(broker unreachable?); nothing is lost, rows stay in the outbox",
                    waited,
                    left,
                    extra={"shard": self.shard},
                )
            if stop is not None and stop.is_set() and waited > self.cfg.flush_timeout_s:
                raise BrokerUnavailable(
                    f"stopping with {left} records unacknowledged after {waited:.0f}s; "
                    "their rows stay in the outbox"
                )
        if not self._delivery_errors:
            return refused
        by_position = {str(row.id).encode(): row for row, _ in records}
        # a failed message may come back without its headers: then its bytes say which it was
        by_bytes = {(rec.topic, rec.key, rec.value): row for row, rec in records}
        out = list(refused)
        for err, pos, ident in self._delivery_errors:
            if self._txn_open and err.code() not in _PERMANENT_DELIVERY:
                # a record that failed only because its transaction became abortable (another
                # record was refused) is not at fault: it is sent again after the abort
                self._must_abort = True
                continue
            found = by_position.get(pos) or by_bytes.get(ident)
            if found is None:
                raise BrokerUnavailable(
                    f"Kafka refused a record of this batch that cannot be told apart "
                    f"({err.str()}); the batch is sent again"
                )
            out.append((found, _delivery_failure(err, found)))
        return out

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            position = next((v for k, v in msg.headers() or [] if k == names.OUTBOX_POSITION), b"")
            self._delivery_errors.append((err, position, (msg.topic(), msg.key(), msg.value())))


def read_back_positions(
    settings: Settings,
    topics: list[str],
    window: int,
    source: str,
    *,
    timeout_s: float,
    since_ms: int | None = None,
) -> set[tuple[int, str]]:
    """(outbox position, event id) of the records found in the last ``window`` records of every
    partition of ``topics`` that carry our ``ce_source``. The event id as well: positions are
    unique per outbox only, and two outboxes (two ERP databases, or schemas) left with the same
    ``relay.source`` may write into the same topics; a row is taken as published only if its
    event id is the one found at its position."""
    src = source.encode()
    positions: set[tuple[int, str]] = set()
    for msg in read_to_end(
        settings,
        topics,
        last=window,
        since_ms=since_ms,
        timeout_s=max(60.0, timeout_s * 6),
        purpose="relay-readback",
    ):
        pos = msrc = eid = None
        for item in msg.headers() or []:
            if item[0] == names.OUTBOX_POSITION:
                pos = item[1]
            elif item[0] == names.CE_SOURCE:
                msrc = item[1]
            elif item[0] == names.CE_ID:
                eid = item[1]
        if pos is not None and msrc == src and eid is not None:
            positions.add((int(pos), eid.decode(errors="replace") if isinstance(eid, bytes)
                           else str(eid)))
    return positions


def _delivery_failure(err: KafkaError, row: OutboxRow) -> BaseException:
    """What a refused record means for its row: permanent (dead-letter it) or not (raise)."""
    what = f"Kafka refused event {row.event_id} ({row.event_type}, outbox id {row.id})"
    if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return PayloadTooLarge(
            f"{what}: {err.str()}; raise the topic's max.message.bytes and "
            "the producer's message.max.bytes, or lower "
            "relay.max_inline_bytes so it travels by claim check"
        )
    if err.code() in _PERMANENT_DELIVERY or not err.retriable():
        return wrap_kafka_error(err, what)
    # only reachable with a finite message.timeout.ms from the user's producer settings
    raise BrokerUnavailable(f"{what}: {err.str()}", code=err.code())


def _interruptible_sleep(stop: threading.Event) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


def _log_kafka_error(err: KafkaError) -> None:
    log.warning("kafka: %s", err.str())


def _registry(settings: Settings) -> Any:
    if not settings.schema_registry.url:
        return None
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf: dict[str, Any] = {"url": settings.schema_registry.url}
    sr = settings.schema_registry
    if sr.basic_auth_user:
        pw = sr.basic_auth_password.get_secret_value() if sr.basic_auth_password else ""
        conf["basic.auth.user.info"] = f"{sr.basic_auth_user}:{pw}"
    return SchemaRegistryClient(conf)
