"""Kafka transactions close the relay's zombie-leader window (Apache Kafka; tansu's
read_committed consumers do not hide aborted records). A leader that stalls between sending a
batch and committing it (a GC pause, a frozen VM) loses its database session and so its lock; the
new leader's ``init_transactions`` with the shard's transactional id aborts the stalled batch,
and the old leader's late commit is refused. Without transactions those records would stay in
the topic next to the new leader's copies: duplicates."""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg
import pytest

from pipeline.config import Settings
from pipeline.kafka.client import transactions_enabled
from pipeline.relay.relay import Relay
from tests.conftest import make_settings
from tests.fixtures.kafka import read_all
from tests.fixtures.relay import _url, assert_exactly_once_in_order, outbox_count, wait_for
from tests.integration.test_relay_operations import _emit_orders

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]


class StalledCommit:
    """The relay's producer, whose first ``commit_transaction`` waits until ``release``."""

    def __init__(self, producer: Any) -> None:
        self._p = producer
        self.reached = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self._first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._p, name)

    def commit_transaction(self, *args: Any) -> Any:
        if self._first:
            self._first = False
            self.reached.set()
            self.release.wait(120)
            try:
                return self._p.commit_transaction(*args)
            except BaseException as exc:
                self.error = exc
                raise
        return self._p.commit_transaction(*args)


def _settings(database_url: str, bootstrap: str, prefix: str, **kafka: Any) -> Settings:
    from pipeline.outbox.migrations import install

    s = make_settings(database_url, bootstrap, prefix, kafka=kafka,
                      topics={"aggregate_types": ["order"], "partitions": 3},
                      relay={"batch_size": 500})
    with psycopg.connect(_url(s), autocommit=True) as conn:
        install(conn, "pipeline")
    return s


def _kill_backends_of(url: str, pid_of_holder: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid_of_holder,))


def test_auto_means_on_for_apache_kafka(database_url: str, kafka_bootstrap: str,
                                        topic_prefix: str) -> None:
    assert transactions_enabled(_settings(database_url, kafka_bootstrap, topic_prefix))


def test_a_stalled_leader_is_fenced_and_its_batch_aborted(
        database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    s = _settings(database_url, kafka_bootstrap, topic_prefix, transactions="on")
    url = _url(s)
    ids = _emit_orders(url, 300, keys=12)
    old = Relay(s)
    old.producer  # noqa: B018 - created now, so that the stall can be put around it
    gate = StalledCommit(old._producer)
    old._producer = gate  # type: ignore[assignment]
    stop_old, stop_new = threading.Event(), threading.Event()
    t_old = threading.Thread(target=old.run, args=(stop_old,), daemon=True)
    t_old.start()
    new = Relay(s)
    t_new = threading.Thread(target=new.run, args=(stop_new,), daemon=True)
    try:
        assert gate.reached.wait(60), "the first leader never got to its commit"
        # the stalled leader's batch was sent (uncommitted); its session dies, so does its lock
        with psycopg.connect(url, autocommit=True) as conn:
            (pid,) = conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchone()
        _kill_backends_of(url, pid)
        t_new.start()
        wait_for(lambda: new.is_leader, 60, "the standby to take over")
        wait_for(lambda: outbox_count(url) == 0, 60, "the new leader to publish every row")
        gate.release.set()  # the old leader wakes up and tries to commit its stale batch
        wait_for(lambda: gate.error is not None, 30, "the stale commit to be refused")
    finally:
        gate.release.set()
        stop_old.set()
        stop_new.set()
        t_old.join(60)
        t_new.join(60)
    assert not t_old.is_alive() and not t_new.is_alive()
    assert "fenced" in str(gate.error).lower() or "epoch" in str(gate.error).lower(), gate.error

    topic = f"{topic_prefix}.order"
    committed = read_all(kafka_bootstrap, topic, expect=len(ids), timeout_s=60)
    assert_exactly_once_in_order(committed, expected_ids=ids)
    # the stale batch really was in the log, aborted: a read_uncommitted reader sees it too
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{topic_prefix}-ru",
                  "isolation.level": "read_uncommitted", "enable.auto.commit": False})
    try:
        seen = 0
        for p in range(3):
            lo, _hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            c.assign([TopicPartition(topic, p, lo)])
            while True:
                batch = c.consume(1000, timeout=2)
                seen += sum(1 for m in batch if m.error() is None)
                if not batch:
                    break
    finally:
        c.close()
    assert seen > len(ids), "the stalled leader's batch never reached the log: nothing was tested"
    assert new.stats.published == len(ids)


def test_a_replay_chunk_that_fails_is_neither_seen_nor_recorded(
        database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from pipeline.dlq.replay import send
    from pipeline.dlq.store import GroupDlq
    from pipeline.errors import BrokerUnavailable

    # one record per request, so that the first is written before the second is refused
    s = _settings(database_url, kafka_bootstrap, topic_prefix, transactions="on",
                  producer={"linger.ms": 0, "batch.num.messages": 1})
    dlq_topic, retry = f"{topic_prefix}.sink.dlq", f"{topic_prefix}.sink.retry.1"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # the retry tier takes records of 20 kB at most: the second dead letter is refused by the
    # broker after the first was sent, inside the same transaction
    for f in admin.create_topics([NewTopic(dlq_topic, 1, 1),
                                  NewTopic(retry, 1, 1, config={"max.message.bytes": "20000"})
                                  ]).values():
        f.result(15)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for i, size in enumerate((100, 60_000, 100)):  # random bytes: lz4 cannot shrink them
        p.produce(dlq_topic, os.urandom(size), f"K{i}".encode(),
                  headers=[("ce_id", f"e{i}".encode())])
    assert p.flush(10) == 0
    dlq = GroupDlq(s, "sink")
    records = list(dlq.records())
    assert len(records) == 3
    with pytest.raises(BrokerUnavailable, match="transaction was aborted"):
        send(dlq, records, rate=None)
    assert dlq.replayed() == {}, "an aborted replay was recorded as done"
    assert read_all(kafka_bootstrap, retry, timeout_s=10) == [], "a worker would see it"
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{topic_prefix}-ru",
                  "isolation.level": "read_uncommitted", "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(retry, 0, 0)])
        seen = [m for m in c.consume(100, timeout=3) if m.error() is None]
    finally:
        c.close()
    assert b"K0" in [m.key() for m in seen]  # it was written, and aborted


def test_a_record_refused_mid_batch_aborts_and_resends_the_rest_in_order(
        database_url: str, kafka_bootstrap: str, topic_prefix: str, read_topic) -> None:
    """A record the broker refuses after it was sent (over the topic's max.message.bytes) makes
    the transaction abortable, and every later produce of the batch fails: the batch is aborted
    and sent again without that record, which goes to the outbox DLQ; no other row is
    dead-lettered and every key stays in order."""
    import base64
    import datetime as dt
    import random

    from confluent_kafka.admin import AdminClient, NewTopic

    from pipeline.outbox.emit import emit
    from pipeline.simulator.payloads import payload_for

    # one record per request, so that records after the refused one are produced into a
    # transaction that can no longer take them
    s = _settings(database_url, kafka_bootstrap, topic_prefix, transactions="on",
                  producer={"linger.ms": 0, "batch.num.messages": 1})
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for f in admin.create_topics([NewTopic(f"{topic_prefix}.order", 3, 1,
                                           config={"max.message.bytes": "20000"})]).values():
        f.result(15)
    rng = random.Random(4)
    ids, big = [], None
    with psycopg.connect(_url(s)) as conn:
        for i in range(120):
            key = f"SO-{i % 6:05d}"
            p = payload_for("order.created", rng, aggregate_id=key, now=dt.datetime.now(dt.UTC))
            if i == 30:  # random text, so that compression cannot bring it under the limit
                p["note"] = base64.b64encode(os.urandom(40_000)).decode()
            eid = f"00000000-0000-4000-8000-{i:012d}"
            emit(conn, "order", key, "order.created", p, event_id=eid)
            if i == 30:
                big = eid
            else:
                ids.append(eid)
        conn.commit()
    relay = Relay(s)
    relay.store.connect()
    assert relay.store.try_lead()
    try:
        while relay.step():
            pass
    finally:
        relay._shutdown()
    assert relay.stats.dead_lettered == 1 and relay.stats.published == len(ids)
    dlq = read_topic(s.topics.outbox_dlq, expect=1)
    assert dlq[0].headers["ce_id"] == big or big in (dlq[0].value or b"").decode()
    recs = read_topic(f"{topic_prefix}.order", expect=len(ids))
    assert sorted(r.headers["ce_id"] for r in recs) == sorted(ids)  # each once
    versions: dict[bytes, list[int]] = {}
    for r in sorted(recs, key=lambda r: (r.partition, r.offset)):
        versions.setdefault(r.key or b"", []).append(int(r.headers["erp_aggregate_version"]))
    for key, vs in versions.items():
        # in order; the dead-lettered v6 of SO-00000 is the one gap (it is in the outbox DLQ)
        want = [v for v in range(1, 21) if not (key == b"SO-00000" and v == 6)]
        assert vs == want, (key, vs)
