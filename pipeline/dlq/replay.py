"""Replaying dead letters to the group that failed them.

What is sent: the event's bytes (or its corrected copy from ``pipeline dlq edit``), to the
group's first retry tier, due at once, attempts reset to 1, with the original-position headers
kept (so strict ordering knows the key) and provenance headers added. Per key, records go in
DLQ order — a corrected copy takes its original's place — and the events blocked behind a
selected head (strict ordering) come with it. What was replayed is recorded in a compacted topic
keyed by DLQ position: the same replay again sends nothing unless ``again``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Producer

from pipeline import telemetry
from pipeline.dlq.records import DlqRecord, FilterError
from pipeline.dlq.store import GroupDlq
from pipeline.errors import BrokerUnavailable
from pipeline.kafka import names
from pipeline.kafka.client import (
    producer_config,
    transactional_config,
    transactions_enabled,
    wrap_kafka_error,
)
from pipeline.kafka.forward import Forwarder, home_partition
from pipeline.kafka.names import REPLAY_ID, REPLAY_OF, REPLAYED_AT, REPLAYED_BY, TRACEPARENT
from pipeline.worker import routing

_DROP = {
    names.EXCEPTION_FQCN, names.EXCEPTION_MESSAGE, names.EXCEPTION_STACKTRACE,
    names.ATTEMPTS, names.BACKOFF_TIMESTAMP, names.RETRY_TIER, names.BLOCKED_BY,
    names.TARGET_ERROR_BODY, names.DECODE_ERROR, REPLAY_ID, REPLAY_OF, REPLAYED_BY,
    REPLAYED_AT,
}


def parse_rate(text: str | None) -> float | None:
    """``200/s``, ``200``, ``12000/m`` → events per second; None = unthrottled."""
    if text is None:
        return None
    t = text.strip().lower()
    unit = 1.0
    for suffix, seconds in (("/s", 1.0), ("/m", 60.0), ("/h", 3600.0)):
        if t.endswith(suffix):
            t, unit = t[: -len(suffix)], seconds
            break
    try:
        rate = float(t) / unit
    except ValueError:
        raise FilterError(f"bad --rate {text!r}: give events per second, e.g. 200/s") from None
    if not math.isfinite(rate) or rate <= 0:
        raise FilterError(f"bad --rate {text!r}: must be a positive number, e.g. 200/s")
    return rate


def operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class Plan:
    """What a replay sends, in order, and what it leaves out and why."""

    send: list[DlqRecord] = field(default_factory=list)
    already: list[DlqRecord] = field(default_factory=list)  # replayed before (no --again)
    superseded: list[DlqRecord] = field(default_factory=list)  # an edit replaces them
    followers_added: int = 0  # blocked events brought along with their head


def plan(selected: Sequence[DlqRecord], everything: Sequence[DlqRecord],
         replayed: Mapping[str, object], *, again: bool = False) -> Plan:
    p = Plan()
    latest_edit: dict[str, DlqRecord] = {}
    for r in everything:
        if r.edit_of is not None:
            latest_edit[str(r.edit_of)] = r  # DLQ order: the last edit wins
    chosen = {str(r.position): r for r in selected}
    ids = {r.event_id for r in selected if r.event_id}
    for r in everything:  # the followers a selected head blocked come along
        if r.blocked_by in ids and str(r.position) not in chosen:
            chosen[str(r.position)] = r
            p.followers_added += 1
    effective: list[tuple[tuple[int, int], DlqRecord]] = []
    seen: set[str] = set()
    for pos, r in chosen.items():
        if r.edit_of is not None:
            orig_pos = str(r.edit_of)
            if latest_edit.get(orig_pos) is not r:
                p.superseded.append(r)
                continue
            place = (r.edit_of.partition, r.edit_of.offset)
            ident = orig_pos
        else:
            edit = latest_edit.get(pos)
            if edit is not None:
                p.superseded.append(r)
                r, place, ident = edit, (r.position.partition, r.position.offset), pos
            else:
                place, ident = (r.position.partition, r.position.offset), pos
        if ident in seen:
            continue
        seen.add(ident)
        if not again and (ident in replayed or str(r.position) in replayed):
            p.already.append(r)
            continue
        effective.append((place, r))
    effective.sort(key=lambda pr: pr[0])
    p.send = [r for _place, r in effective]
    return p


def replay_headers(r: DlqRecord, *, dlq_topic: str, replay_id: str, by: str, now_ms: int
                   ) -> list[tuple[str, bytes]]:
    out = [(k, v) for k, v in r.headers.items() if k not in _DROP]
    out += [
        (names.ATTEMPTS, routing.big_int(1)),
        (names.BACKOFF_TIMESTAMP, routing.big_int(now_ms)),
        (names.RETRY_TIER, b"1"),
        (REPLAY_ID, replay_id.encode()),
        (REPLAY_OF, f"{dlq_topic}/{r.edit_of or r.position}".encode()),
        (REPLAYED_BY, by.encode()),
        (REPLAYED_AT, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000)).encode()),
    ]
    return out


@dataclass
class Result:
    replay_id: str
    sent: int
    seconds: float
    target: str

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


# A replay commits (or, without transactions, records) its progress in chunks: a throttled
# replay of many records must not outlive the transaction timeout.
_CHUNK_RECORDS = 1000
_CHUNK_SECONDS = 5.0


def send(dlq: GroupDlq, records: Sequence[DlqRecord], *, rate: float | None,
         progress: Callable[[int], None] | None = None) -> Result:
    """Send ``records`` in order to the group's first retry tier, at most ``rate`` per second,
    and record them as replayed. With Kafka transactions (``kafka.transactions``) each chunk of
    records and its replay records are one transaction: a record the workers see is recorded
    as replayed, and one that is not recorded was never seen (read_committed). Raises
    BrokerUnavailable when Kafka does not take a chunk; the chunks before it stand."""
    if dlq.group == OUTBOX_GROUP:
        return send_to_outbox(dlq, records, rate=rate, progress=progress)
    dlq.ensure_replays_topic()
    replay_id = str(uuid.uuid4())
    by = operator()
    errors: list[str] = []
    settings = dlq.settings
    timeout = settings.kafka.request_timeout_s

    def delivered(err: KafkaError | None, _m: object) -> None:
        if err is not None:
            errors.append(err.str())

    def sent(err: str | None, _m: object) -> None:
        if err is not None:
            errors.append(err)

    txn = transactions_enabled(settings)
    extra = (transactional_config(settings, f"{settings.topics.prefix}.dlq-replay.{replay_id}")
             if txn else {})
    producer = Producer(producer_config(settings, **extra))
    forwarder = Forwarder(producer, dlq.group)
    if txn:
        try:
            producer.init_transactions(timeout * 3)
        except KafkaException as exc:
            raise wrap_kafka_error(exc, f"starting replay {replay_id}'s transaction") from exc
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = 0
    chunk: list[DlqRecord] = []
    chunk_started = time.monotonic()

    def aborted(exc: KafkaException) -> BrokerUnavailable:
        with contextlib.suppress(KafkaException):
            producer.purge(in_queue=True, in_flight=False)  # never sent: abort waits for it
            producer.poll(0)
            producer.abort_transaction(timeout)
        return BrokerUnavailable(
            f"replay {replay_id}: Kafka did not take {len(chunk)} records to "
            f"{dlq.retry_topic} with their replay records ({exc.args[0].str()}"
            f"{'; ' + errors[0] if errors else ''}); the transaction was aborted, so no "
            f"worker sees them; the {done} records before them were replayed: fix the cause "
            "and run the replay again for the rest"
        )

    def settle() -> None:
        """Record the chunk as replayed, and commit it (or wait for its acknowledgements)."""
        nonlocal done, chunk, chunk_started
        if not chunk:
            return
        if not txn and (producer.flush(timeout) or errors):
            raise BrokerUnavailable(
                f"replay {replay_id}: Kafka did not acknowledge every record to "
                f"{dlq.retry_topic} ({errors[0] if errors else 'timed out'}); the {done} "
                "records before them were sent and recorded, these were not: running the "
                "replay again re-sends them (the target's idempotency keys make that safe)"
            )
        for r in chunk:
            for pos in {str(r.position), str(r.edit_of) if r.edit_of else str(r.position)}:
                producer.produce(dlq.replays_topic, json.dumps(
                    {"replay_id": replay_id, "by": by, "at": stamp, "sent_to": dlq.retry_topic,
                     "event_id": r.event_id, "copy_of": str(r.position)}).encode(),
                    pos.encode(), on_delivery=delivered)
        if txn:
            # wait for the acknowledgements first: after a refusal the transaction sends
            # nothing more, and a commit would wait out its timeout for the queued records
            waited_until = time.monotonic() + settings.kafka.transaction_timeout_s
            while producer.flush(0.2) and not errors and time.monotonic() < waited_until:
                pass
            try:
                if errors:
                    raise KafkaException(KafkaError(KafkaError._STATE, errors[0]))
                producer.commit_transaction(settings.kafka.transaction_timeout_s)
            except KafkaException as exc:
                raise aborted(exc) from exc
        elif producer.flush(timeout) or errors:
            raise BrokerUnavailable(
                f"replay {replay_id} sent {len(chunk)} records but could not record them in "
                f"{dlq.replays_topic}: a second replay would send them again"
            )
        done += len(chunk)
        chunk = []
        chunk_started = time.monotonic()

    started = time.monotonic()
    try:
        for i, r in enumerate(records):
            if rate:
                due = started + i / rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            if txn and not chunk:
                producer.begin_transaction()
            now_ms = int(time.time() * 1000)
            headers = replay_headers(r, dlq_topic=dlq.topic, replay_id=replay_id, by=by,
                                     now_ms=now_ms)
            hop = telemetry.send_span(dlq.retry_topic, r.header(TRACEPARENT),
                                      {"messaging.message.id": r.event_id or "", "erp.replay_id":
                                       replay_id, "erp.replay_of": str(r.edit_of or r.position)})
            if hop is not None:  # the event's trace goes on through the replay
                headers = [(k, v) for k, v in headers if k != TRACEPARENT]
                headers.append((TRACEPARENT, hop.encode()))
            chunk.append(r)
            try:
                # at the event's own partition number: the worker that owns its key's retry
                # state reads it (pipeline.worker.ownership)
                forwarder.send(dlq.retry_topic, home_partition(headers, r.position.partition),
                               r.key, r.value, headers, on_done=sent)
                producer.poll(0)
            except KafkaException as exc:  # a transaction made abortable by an earlier refusal
                if not txn:
                    raise wrap_kafka_error(exc, f"replaying {r.position}") from exc
                raise aborted(exc) from exc
            if progress is not None:
                progress(1)
            if len(chunk) >= _CHUNK_RECORDS or time.monotonic() - chunk_started >= _CHUNK_SECONDS:
                settle()
        settle()
    except BrokerUnavailable:
        raise
    except BaseException as exc:
        # anything else (a KafkaException outside a produce, Ctrl-C): no chunk stays open to
        # hold back what read_committed consumers of the retry tier may read
        if txn and chunk:
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(timeout)
        if isinstance(exc, KafkaException):
            raise wrap_kafka_error(exc, f"replay {replay_id} (after {done} records)") from exc
        raise
    elapsed = time.monotonic() - started
    return Result(replay_id, len(records), elapsed, dlq.retry_topic)


OUTBOX_GROUP = "outbox"


def send_to_outbox(dlq: GroupDlq, records: Sequence[DlqRecord], *, rate: float | None,
                   progress: Callable[[int], None] | None = None) -> Result:
    """Replay rows the relay dead-lettered (``--group outbox``) into the outbox itself, through
    ``outbox_emit`` (a new version of the aggregate, after the ones published meanwhile), in
    DLQ order — which is the aggregate's order, the outbox DLQ being keyed by aggregate — with
    the payload exactly as stored or corrected. Each chunk is one database transaction; its
    replay records follow its commit (a crash in between replays those rows again)."""
    from psycopg import sql

    from pipeline import exactjson
    from pipeline.db import connect

    dlq.ensure_replays_topic()
    settings = dlq.settings
    schema = settings.database.schema_name
    replay_id = str(uuid.uuid4())
    by = operator()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    emit = sql.SQL("SELECT {}.outbox_emit(%s, %s, %s, %s::jsonb, %s::jsonb, %s::uuid)").format(
        sql.Identifier(schema))
    producer = Producer(producer_config(settings))
    errors: list[str] = []

    def delivered(err: KafkaError | None, _m: object) -> None:
        if err is not None:
            errors.append(err.str())

    started = time.monotonic()
    done = 0
    target = f"{schema}.outbox"
    with connect(settings) as conn:
        for lo in range(0, len(records), _CHUNK_RECORDS):
            chunk = records[lo:lo + _CHUNK_RECORDS]
            with conn.transaction():
                for i, r in enumerate(chunk):
                    if rate:
                        wait = started + (done + i) / rate - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    if not r.value:
                        raise FilterError(
                            f"{r.position} is in the claim-check store: export it and emit it "
                            "by hand; nothing of this chunk was replayed")
                    row = exactjson.loads(r.value)
                    conn.execute(emit, (
                        row["aggregate_type"], row["aggregate_id"], row["event_type"],
                        exactjson.dumps(row.get("payload")),
                        exactjson.dumps(row.get("headers") or {}), row["event_id"]))
            for r in chunk:
                for pos in {str(r.position), str(r.edit_of) if r.edit_of else str(r.position)}:
                    producer.produce(dlq.replays_topic, json.dumps(
                        {"replay_id": replay_id, "by": by, "at": stamp, "sent_to": target,
                         "event_id": r.event_id, "copy_of": str(r.position)}).encode(),
                        pos.encode(), on_delivery=delivered)
            if producer.flush(settings.kafka.request_timeout_s) or errors:
                raise BrokerUnavailable(
                    f"replay {replay_id} wrote {len(chunk)} rows into {target} but could not "
                    f"record them in {dlq.replays_topic}: a second replay would emit them again")
            done += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return Result(replay_id, done, time.monotonic() - started, target)
