"""resume_fetching: a resumed partition's fetch restarted by a seek to where it stands."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.kafka.client import resume_fetching


class Consumer:
    def __init__(self, positions: dict[tuple[str, int], int],
                 refuse: frozenset[int] = frozenset()) -> None:
        self.positions = positions
        self.refuse = refuse
        self.calls: list[tuple[str, Any]] = []

    def resume(self, parts: list[TopicPartition]) -> None:
        self.calls.append(("resume", [(p.topic, p.partition) for p in parts]))

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.positions.get((p.topic, p.partition),
                                                                        -1001)) for p in parts]

    def seek(self, part: TopicPartition) -> None:
        if part.partition in self.refuse:
            raise KafkaException(KafkaError(KafkaError._STATE, "Erroneous state"))
        self.calls.append(("seek", (part.topic, part.partition, part.offset)))


def parts(*ps: int) -> list[TopicPartition]:
    return [TopicPartition("t", p) for p in ps]


def test_a_rewound_partition_restarts_at_its_rewind_the_others_where_they_stand() -> None:
    c = Consumer({("t", 0): 50, ("t", 1): 7})  # 0 read on past its rewind: the rewind wins
    resume_fetching(c, parts(0, 1, 2), {("t", 0): 40})
    assert c.calls[0] == ("resume", [("t", 0), ("t", 1), ("t", 2)])
    assert sorted(x for _, x in c.calls[1:]) == [("t", 0, 40), ("t", 1, 7)]  # 2: no position


def test_a_refused_seek_leaves_the_partition_to_the_resume() -> None:
    c = Consumer({("t", 0): 5, ("t", 1): 9}, refuse={0})
    resume_fetching(c, parts(0, 1))
    assert c.calls == [("resume", [("t", 0), ("t", 1)]), ("seek", ("t", 1, 9))]


def test_nothing_to_resume_calls_nothing() -> None:
    c = Consumer({})
    resume_fetching(c, [])
    assert c.calls == []
