"""``read_to_end`` (the relay's read-back, the parked-keys reload, ``pipeline status`` and
``pipeline up``'s verification) reads every record that is there, on Apache Kafka's exact high
watermarks and on tansu's, which lie low after a batched produce."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.config import load_config
from pipeline.kafka.tail import read_to_end

pytestmark = [pytest.mark.integration, pytest.mark.tansu_smoke]


def _batched(bootstrap: str, topic: str, n: int, partitions: int = 2) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result(15)
    # one producer, a long linger: the records go out in a few large batches
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 200, "batch.num.messages": 10000})
    for i in range(n):
        p.produce(topic, f"v{i}".encode(), f"k{i % 17}".encode(), partition=i % partitions)
    assert p.flush(30) == 0


def _settings(bootstrap: str):  # type: ignore[no-untyped-def]
    return load_config(Path(os.devnull), overrides={"kafka": {"bootstrap_servers": bootstrap}})


def test_every_batched_record_is_read(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.tail"
    _batched(kafka_bootstrap, topic, 1016)
    got = [(m.partition(), m.offset()) for m in
           read_to_end(_settings(kafka_bootstrap), [topic], timeout_s=30)]
    assert len(got) == 1016 and len(set(got)) == 1016
    assert {p for p, _ in got} == {0, 1}
    for part in (0, 1):
        assert sorted(o for p, o in got if p == part) == list(range(508))


def test_the_last_n_include_the_newest_record(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.tail"
    _batched(kafka_bootstrap, topic, 600, partitions=1)
    values = [m.value() for m in
              read_to_end(_settings(kafka_bootstrap), [topic], last=5, timeout_s=30)]
    # at least the last 5 (more where a lying watermark put the start earlier), the newest last
    assert len(values) >= 5 and values[-5:] == [f"v{i}".encode() for i in range(595, 600)]


def test_an_empty_and_a_missing_topic_end_at_once(kafka_bootstrap: str,
                                                 topic_prefix: str) -> None:
    topic = f"{topic_prefix}.empty"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for f in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        f.result(15)
    s = _settings(kafka_bootstrap)
    assert list(read_to_end(s, [topic, f"{topic_prefix}.missing"], timeout_s=10)) == []
