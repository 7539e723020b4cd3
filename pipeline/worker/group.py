"""What both runtimes of a consumer group share (the per-event :class:`~pipeline.worker.runtime.
Worker` and the batch :class:`~pipeline.sink.runtime.SinkWorker`): names, the producer, claim
store and decoder, the lag gauges, the health server, and closing it all."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, Producer

from pipeline import telemetry
from pipeline.claimcheck import ClaimStore, claim_store
from pipeline.config import Settings, WorkerConfig
from pipeline.errors import ConfigError
from pipeline.kafka.client import producer_config
from pipeline.kafka.clients import Clients, KafkaClients
from pipeline.kafka.lag import lag_figures
from pipeline.kafka.topics import TopicSpec, desired_topics
from pipeline.relay.relay import _registry
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder
from pipeline.worker.health import Check, HealthServer, loop_alive
from pipeline.worker.ownership import copartition_problems

log = logging.getLogger("pipeline.worker")

TP = tuple[str, int]


class GroupRuntime:
    def __init__(self, settings: Settings, name: str, config: WorkerConfig | None,
                 *, given: bool, clients: Clients | None = None) -> None:
        wc = config or settings.worker_config(name, given=given)
        self.settings = settings
        self.clients: Clients = clients if clients is not None else KafkaClients(settings)
        self.name = name
        self.cfg = wc
        self.group = wc.group or name
        self.group_id = f"{settings.topics.prefix}.{self.group}"
        self.main_topics = settings.event_topics(wc)
        self.catalogue = Catalogue.load(settings.schemas.path)
        self.assigned: set[TP] = set()
        self._heartbeat = time.monotonic()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._claims: ClaimStore | None = None
        self._decoder: Decoder | None = None
        self._health: HealthServer | None = None
        self._m = telemetry.metrics()
        self._last_ts: dict[TP, int] = {}  # timestamp (ms) of the last record consumed
        self._lag: list[tuple[float, dict[str, Any]]] = []
        self._lag_age: list[tuple[float, dict[str, Any]]] = []
        self._lag_at = 0.0
        self._unobserve: list[Callable[[], None]] = []

    def _open_clients(self) -> None:
        """The producer (retry copies, dead letters), the claim store and the decoder, and the
        lag gauges."""
        self._producer = self.clients.producer(
            producer_config(
                self.settings,
                **{"error_cb": lambda err: log.warning("kafka producer: %s", err.str())},
            )
        )
        self._claims = claim_store(self.settings) if self.settings.database.url else None
        self._decoder = Decoder(self.catalogue, _registry(self.settings), self._claims)
        self._unobserve += [
            self._m.observe("pipeline.consumer.lag", lambda: self._lag),
            self._m.observe("pipeline.consumer.lag_age", lambda: self._lag_age),
        ]

    def _ensure_group_topics(
        self, own: list[str], *, compacted: Sequence[str] = (), same_event_partitions: bool = False
    ) -> int:
        """Create what is missing and make the group's own topics (``own``, ``compacted``)
        co-partitioned with its event topics: as many partitions as the most any event topic
        has (raised when fewer; refused when more), since every copy of an event goes to the
        event's own partition number (:mod:`pipeline.kafka.forward`). With
        ``same_event_partitions`` the event topics must agree too (a worker's retry state:
        :mod:`pipeline.worker.ownership`). Returns the partition count."""
        t = self.settings.topics
        # the event topics as `pipeline topics apply` makes them (overrides included)
        types = self.cfg.aggregate_types or t.aggregate_types
        counts = self.clients.create_topics(
            [spec for spec in desired_topics(self.settings, types) if spec.name != t.outbox_dlq]
        )
        if same_event_partitions:
            problems = copartition_problems(dict(counts), self.main_topics)
            if problems:
                raise ConfigError(f"worker {self.name}: {problems[0]}")
        n = max(counts.values(), default=t.partitions)
        specs = [TopicSpec(x, n, t.replication_factor, dict(t.config)) for x in own]
        specs += [TopicSpec(x, n, t.replication_factor, t.compacted_config) for x in compacted]
        have = self.clients.create_topics(specs)
        for spec in specs:
            got = have.get(spec.name, n)
            if got < n:
                log.warning(
                    "raising %s from %d to %d partitions, to match the group's event topics "
                    "(a copy of an event sits at the event's own partition number)",
                    spec.name,
                    got,
                    n,
                )
                self.clients.add_partitions(spec.name, n)
            elif got > n and same_event_partitions:
                raise ConfigError(
                    f"worker {self.name}: {spec.name} has {got} partitions but the worker's "
                    f"event topics have {n}; a key's retry copies and state must sit at its "
                    "own partition number, and Kafka cannot lower a partition count. Drain "
                    f"and delete {spec.name} (it is created again with {n}), or raise the event "
                    f"topics to {got} partitions (`pipeline topics apply`)"
                )
        return n

    def _start_health(self, readyz: Check) -> None:
        if self.cfg.health_port is not None:
            self._health = HealthServer(self.cfg.health_port, self._healthz, readyz).start()

    @property
    def health_port(self) -> int | None:
        return self._health.port if self._health else None

    def _refresh_lag(self) -> None:
        """Lag from the consumer's cached watermarks (no request to the broker), at most once a
        second."""
        if time.monotonic() - self._lag_at < 1.0 or self._consumer is None:
            return
        self._lag_at = time.monotonic()
        self._lag, self._lag_age = lag_figures(
            self._consumer, self.assigned, self._last_ts, self.group_id
        )

    def _close_clients(self) -> None:
        for remove in self._unobserve:
            remove()
        if self._health is not None:
            self._health.stop()
        if self._producer is not None:
            self._producer.flush(10)
        if self._consumer is not None:
            self._consumer.close()  # leaves the group
            self._consumer = None
        if self._claims is not None:
            self._claims.close()
        if self._decoder is not None:
            self._decoder.close()

    def _healthz(self) -> tuple[bool, dict[str, Any]]:
        return loop_alive(self._heartbeat)
