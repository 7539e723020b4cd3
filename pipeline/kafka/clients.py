"""Where a consumer-group runtime gets its Kafka clients: the real ones here, an in-memory
broker in the loop tests (``tests/fixtures/memory_kafka.py``). The runtimes ask only for what
is below, so the same loop runs against either."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewPartitions  # type: ignore[attr-defined]

from pipeline.config import Settings
from pipeline.kafka.client import admin_config, wrap_kafka_error
from pipeline.kafka.tail import read_to_end
from pipeline.kafka.topics import TopicSpec, apply_topics


class Clients(Protocol):
    def consumer(self, conf: dict[str, Any]) -> Any: ...

    def producer(self, conf: dict[str, Any]) -> Any: ...

    def create_topics(self, specs: list[TopicSpec]) -> dict[str, int]:
        """Create the missing ones; returns every named topic's partition count."""
        ...

    def add_partitions(self, topic: str, total: int) -> None: ...

    def read(self, topics: list[str], partitions: set[int] | None, purpose: str) -> Iterator[Any]:
        """The records of ``topics`` up to their current end."""
        ...


class KafkaClients:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def consumer(self, conf: dict[str, Any]) -> Consumer:
        return Consumer(conf)

    def producer(self, conf: dict[str, Any]) -> Producer:
        return Producer(conf)

    def _admin(self) -> AdminClient:
        return AdminClient(admin_config(self.settings))

    def create_topics(self, specs: list[TopicSpec]) -> dict[str, int]:
        admin = self._admin()
        timeout = self.settings.kafka.request_timeout_s
        apply_topics(admin, specs, timeout_s=timeout, create_only=True)
        try:
            md = admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise wrap_kafka_error(exc, "listing topics", admin) from exc
        return {
            s.name: len(md.topics[s.name].partitions) for s in specs if s.name in md.topics
        }

    def add_partitions(self, topic: str, total: int) -> None:
        admin = self._admin()
        fut = admin.create_partitions(
            [NewPartitions(topic, total)], request_timeout=self.settings.kafka.request_timeout_s
        )[topic]
        try:
            fut.result()
        except KafkaException as exc:
            raise wrap_kafka_error(exc, f"raising {topic} to {total} partitions", admin) from exc

    def read(self, topics: list[str], partitions: set[int] | None, purpose: str) -> Iterator[Any]:
        return read_to_end(
            self.settings, topics, timeout_s=30, purpose=purpose, partitions=partitions
        )
