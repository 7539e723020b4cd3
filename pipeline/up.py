"""``pipeline up``: every component in one process, supervised, with a live view and a verdict.

Components: ``simulator`` (ERP activity), ``relay``, and one per worker (``wms``, ``crm``, ``bi``
by default). With no configuration, PostgreSQL and the broker are embedded (local server or
pgserver; tansu), the three workers are configured against reference WMS and CRM servers started
here, with a few injected failures so retries and the DLQ are visibly exercised. With a
configuration, the configured servers and workers are used and nothing embedded starts.

The verdict compares what the ERP committed (the simulator's ledger) with what each target saw:
every event applied (or skipped, or dead-lettered) once, each entity's versions in order.
"""

from __future__ import annotations

import collections
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

from pipeline.config import Settings, WorkerConfig
from pipeline.errors import ConfigError
from pipeline.worker.connector import Event

DEMO_WORKERS = ("wms", "crm", "bi")


@dataclass
class Tracker:
    """What one worker did with each event (its observer): applied/skipped counts per event id,
    versions per entity in apply order, and end-to-end latencies."""

    name: str
    applied: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: set[str] = field(default_factory=set)
    last_version: dict[tuple[str, str], int] = field(default_factory=dict)
    order_violations: int = 0
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=5000)
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, event: Event, outcome: str) -> None:
        with self.lock:
            if outcome == "ok":
                self.applied[event.event_id] += 1
                if event.occurred_at is not None:
                    self.latencies.append(time.time() - event.occurred_at.timestamp())
            else:
                self.skipped.add(event.event_id)
            key = (event.aggregate_type, event.aggregate_id)
            prev = self.last_version.get(key)
            if prev is not None and event.aggregate_version <= prev:
                self.order_violations += 1
            self.last_version[key] = max(prev or 0, event.aggregate_version)

    @property
    def handled(self) -> int:
        with self.lock:
            return len(self.applied) + len(self.skipped)

    @property
    def twice(self) -> int:
        with self.lock:
            return sum(1 for n in self.applied.values() if n > 1)


def demo_workers(settings: Settings, wms_url: str, crm_url: str) -> dict[str, WorkerConfig]:
    """The three workers `up` runs on embedded defaults (short retry delays for a demo)."""
    rest = {"retry_delays_s": [1.0, 5.0, 15.0], "session_timeout_ms": 6000,
            "commit_interval_s": 0.5}
    return {
        "wms": WorkerConfig(connector="connectors.wms.connector:WmsConnector",
                            options={"base_url": wms_url}, **rest),
        "crm": WorkerConfig(connector="connectors.crm.connector:CrmConnector",
                            options={"base_url": crm_url}, **rest),
        "bi": WorkerConfig(connector="connectors.bi.postgres:PostgresTarget",
                           options={"schema": "bi"}, batch_size=2000, batch_max_wait_s=0.5,
                           session_timeout_ms=6000),
    }


def parse_components(text: str | None, workers: list[str], simulator: bool) -> list[str]:
    known = ["simulator", "relay", *workers]
    if text is None:
        return (["simulator"] if simulator else []) + ["relay", *workers]
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in known]
    if unknown or not wanted:
        raise ConfigError(
            f"--components: unknown {', '.join(unknown) or '(none given)'}; known: "
            f"{', '.join(known)}"
        )
    return wanted


def preflight(settings: Settings, components: list[str]) -> list[str]:
    """Every missing or unreachable dependency of the chosen components, with what to do."""
    problems: list[str] = []
    needs_db = any(c in ("simulator", "relay") for c in components) or any(
        settings.workers[c].connector.startswith("connectors.bi.postgres")
        for c in components if c in settings.workers)
    from pipeline.db import is_mariadb

    if is_mariadb(settings):
        return [
            "pipeline up runs on PostgreSQL only (its simulator, drain check and BI demo speak "
            "PostgreSQL): with a MariaDB ERP (database.url mysql://…) run `pipeline outbox "
            "install`, `pipeline relay` and `pipeline worker <name>` instead"
        ]
    if needs_db:
        import psycopg

        from pipeline.config import mask_url
        from pipeline.db import database_url

        try:
            url = database_url(settings)
            with psycopg.connect(url, connect_timeout=3):
                pass
        except ConfigError as exc:
            problems.append(str(exc))
        except psycopg.Error as exc:
            problems.append(
                f"database {mask_url(url)} unreachable ({str(exc).strip().splitlines()[0]}): "
                "start PostgreSQL or fix database.url (PIPELINE_DATABASE__URL)"
            )
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from pipeline.kafka.client import admin_config

    try:
        AdminClient(admin_config(settings)).list_topics(timeout=5)
    except ConfigError as exc:
        problems.append(str(exc))
    except KafkaException:
        problems.append(
            f"Kafka at {settings.kafka.bootstrap_servers} unreachable: start the cluster or fix "
            "kafka.bootstrap_servers (PIPELINE_KAFKA__BOOTSTRAP_SERVERS)"
        )
    if settings.schema_registry.url:
        import httpx

        try:
            httpx.get(f"{settings.schema_registry.url.rstrip('/')}/subjects", timeout=3)
        except httpx.HTTPError as exc:
            problems.append(f"Schema Registry at {settings.schema_registry.url} unreachable "
                            f"({type(exc).__name__}): start it or fix schema_registry.url")
    for c in components:
        wc = settings.workers.get(c)
        base = (wc.options.get("base_url") if wc is not None else None) or None
        if isinstance(base, str) and not _reachable(base):
            problems.append(f"worker {c}: its target {base} does not answer: start it or fix "
                            f"workers.{c}.options.base_url")
    return problems


def _reachable(url: str) -> bool:
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "localhost", port), timeout=2):
            return True
    except OSError:
        return False


class Supervisor:
    """Runs components in threads; a component that dies is reported (not restarted: a crash
    in a demo is a finding) and the others go on."""

    def __init__(self) -> None:
        self.threads: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self.errors: dict[str, BaseException] = {}

    def start(self, name: str, run: Callable[[threading.Event], None]) -> None:
        stop = threading.Event()

        def target() -> None:
            try:
                run(stop)
            except BaseException as exc:  # reported in the live view and the verdict
                self.errors[name] = exc

        t = threading.Thread(target=target, name=name, daemon=True)
        self.threads[name] = (t, stop)
        t.start()

    def stop(self, name: str, timeout: float = 60.0) -> None:
        entry = self.threads.get(name)
        if entry is not None:
            entry[1].set()
            entry[0].join(timeout)

    def dead(self) -> list[str]:
        return [n for n, (t, stop) in self.threads.items()
                if not t.is_alive() and not stop.is_set()]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]
