"""The pipeline's compacted state topics under real log compaction (Apache Kafka; tansu has
none): ``<prefix>.<group>.parked`` (the worker's parked keys) and ``<prefix>.<group>.dlq-replays``
(what ``pipeline dlq replay`` has replayed) are created by the pipeline's own code with
``topics.state_config`` (a short ``segment.ms``, a low ``min.cleanable.dirty.ratio``), the
cleaner is seen to remove superseded records and tombstones, and the state read back right after
it is the latest of every key."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from confluent_kafka import Producer

from pipeline.dlq.store import GroupDlq
from pipeline.kafka.tail import read_to_end
from pipeline.worker.ordering import KeyState
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import SinkConnector
from tests.fixtures.relay import _url

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]

# the cleaner may run on a segment as soon as it is closed; segments close every 200 ms
STATE_CONFIG = {"segment.ms": "200", "min.cleanable.dirty.ratio": "0.01",
                "delete.retention.ms": "100", "min.compaction.lag.ms": "0",
                "max.compaction.lag.ms": "1000"}
GENERATIONS = 12


def _settings(database_url: str, bootstrap: str, prefix: str) -> Any:
    import psycopg

    from pipeline.outbox.migrations import install

    s = make_settings(database_url, bootstrap, prefix,
                      topics={"aggregate_types": ["order"], "partitions": 2,
                              "state_config": STATE_CONFIG},
                      workers={"sink": {"connector": "tests.fixtures.connectors:SinkConnector",
                                        "retry_delays_s": [0.5]}})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    return s


def _write_generations(bootstrap: str, topic: str, keys: list[str], value_of: Any,
                       tombstoned: set[str]) -> int:
    """GENERATIONS values per key, a pause between them so that each lands in a segment of its
    own; the last generation tombstones ``tombstoned``. Returns the records written."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    written = 0
    for gen in range(GENERATIONS):
        last = gen == GENERATIONS - 1
        for k in keys:
            value = None if last and k in tombstoned else value_of(k, gen)
            p.produce(topic, value, k.encode())
            written += 1
        assert p.flush(10) == 0
        time.sleep(0.25)
    return written


def _keep_rolling(bootstrap: str, topic: str, partitions: int, filler: bytes, until: Any,
                  timeout_s: float, what: str) -> None:
    """A segment only closes when a record arrives after segment.ms: write a filler key until
    ``until()`` holds (the filler's own older copies are compacted away too)."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"compaction did not run in {timeout_s}s: {what}"
        for part in range(partitions):
            p.produce(topic, filler, b"~filler", partition=part)
        p.flush(5)
        time.sleep(0.3)


def test_parked_keys_topic_is_compacted_and_reloads_the_latest_state(
        database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    s = _settings(database_url, kafka_bootstrap, topic_prefix)
    worker = Worker(s, "sink", SinkConnector(_url(s)))
    worker._ensure_topics()  # the worker's own topic creation, with topics.state_config
    topic = worker.tiers.parked_topic
    keys = [f"order|SO-{i}" for i in range(8)]
    released = set(keys[:3])

    def state(k: str, gen: int) -> bytes:
        return KeyState(f"head-{k}-{gen}", [f"f-{k}-{gen}-{j}" for j in range(gen % 3)]).to_json()

    written = _write_generations(kafka_bootstrap, topic, keys, state, released)

    def records() -> list[Any]:
        return [m for m in read_to_end(s, [topic], timeout_s=30) if m.key() != b"~filler"]

    _keep_rolling(kafka_bootstrap, topic, 2, KeyState("filler").to_json(),
                  lambda: len(records()) == len(keys) - len(released), 60,
                  f"{topic} still holds {len(records())} of {written} records")
    # superseded values and the released keys' tombstones are gone, not just hidden
    assert len(records()) == len(keys) - len(released)

    reloaded = Worker(s, "sink", SinkConnector(_url(s)))
    reloaded._load_parked([0, 1])  # both cells become this member's
    want = {k: KeyState.from_json(state(k, GENERATIONS - 1)) for k in keys if k not in released}
    got = {k: v for k, v in reloaded.ordering.keys.items() if k != "~filler"}

    def form(d: dict[str, KeyState]) -> dict[str, tuple[Any, ...]]:
        return {k: (v.head, v.followers, v.blocked_by) for k, v in d.items()}

    assert form(got) == form(want)


def test_dlq_replays_topic_is_compacted_and_replays_stay_idempotent(
        database_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    s = _settings(database_url, kafka_bootstrap, topic_prefix)
    Worker(s, "sink", SinkConnector(_url(s)))._ensure_topics()  # creates <prefix>.sink.dlq
    dlq = GroupDlq(s, "sink")
    dlq.ensure_replays_topic()
    positions = [f"{topic_prefix}.sink.dlq:0:{i}" for i in range(6)]
    undone = {positions[0]}

    def replay(k: str, gen: int) -> bytes:
        return json.dumps({"replayed_at": gen, "by": "on-call", "to": dlq.retry_topic}).encode()

    written = _write_generations(kafka_bootstrap, dlq.replays_topic, positions, replay, undone)

    def count() -> int:
        return sum(1 for m in read_to_end(s, [dlq.replays_topic], timeout_s=30)
                   if m.key() != b"~filler")

    _keep_rolling(kafka_bootstrap, dlq.replays_topic, 1, b"{}", lambda: count() <= len(positions),
                  60,
                  f"{dlq.replays_topic} still holds {count()} of {written} records")
    state = dlq.replayed()
    state.pop("~filler", None)
    assert state == {k: json.loads(replay(k, GENERATIONS - 1))
                     for k in positions if k not in undone}
    # a tombstone goes at a later cleaning, delete.retention.ms after the first
    _keep_rolling(kafka_bootstrap, dlq.replays_topic, 1, b"{}",
                  lambda: count() == len(positions) - len(undone), 60,
                  "the tombstone to be removed")
