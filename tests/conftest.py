"""Shared fixtures: a real PostgreSQL database and a real Kafka-protocol broker per test.

* PostgreSQL: ``PIPELINE_TEST_DATABASE_URL`` or the machine's server at 127.0.0.1:5432 when it
  answers, else an embedded ``pgserver`` started once per session. Each test gets a fresh
  database.
* Kafka: the cluster named by ``KAFKA_BOOTSTRAP``, else an embedded broker started once per
  session on a free loopback port: Apache Kafka 4.4 (one KRaft node) where Java 17+ and the jars
  of ``make kafka`` are present, else tansu; ``PIPELINE_TEST_BROKER=kafka|tansu`` forces one.
  Each test gets its own random topic prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, load_config
from pipeline.embedded.broker import EmbeddedBroker
from pipeline.embedded.postgres import EmbeddedPostgres, admin_url, scratch_database

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.relay", "tests.fixtures.registry",
                  "tests.fixtures.mariadb"]


@pytest.fixture(autouse=True)
def _clean_pipeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's PIPELINE_* variables must not leak into tests.
    for key in list(os.environ):
        if key.startswith("PIPELINE_") and not key.startswith(("PIPELINE_TEST_", "PIPELINE_CACHE")):
            monkeypatch.delenv(key)
    # the brokers a test starts itself (and `pipeline up` in a subprocess) are of the suite's kind
    if os.environ.get("PIPELINE_TEST_BROKER"):
        monkeypatch.setenv("PIPELINE_BROKER", os.environ["PIPELINE_TEST_BROKER"])


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = admin_url()
    if url is not None:
        yield url
        return
    # Not under pytest's basetemp: every pytest session makes /tmp/pytest-of-<user> private
    # again (chmod 0700), and pgserver's postgres runs as another user when we are root, so a
    # second session (the tansu smoke set, a developer's run) would pull the floor away.
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pipeline-pgserver-"))
    pg = EmbeddedPostgres(base / "data").start()
    try:
        yield pg.url
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def database_url(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "pipeline_test") as url:
        yield url


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP")
    if env:
        yield env
        return
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log, kind=broker_kind()) as broker:
        yield broker.bootstrap


def broker_kind() -> str:
    """What the session's embedded broker is (``kafka`` or ``tansu``); ``external`` with
    ``KAFKA_BOOTSTRAP``."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        return "external"
    from pipeline.embedded.kafka import broker_kind as choose

    return choose(os.environ.get("PIPELINE_TEST_BROKER"))


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def make_settings(database_url: str, bootstrap: str, prefix: str, **sections: Any) -> Settings:
    base: dict[str, Any] = {
        "database": {"url": database_url},
        "kafka": {"bootstrap_servers": bootstrap},
        "topics": {"prefix": prefix, "partitions": 3},
        "relay": {"poll_interval_s": 0.2, "lock_retry_s": 0.2},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return load_config(Path(os.devnull), overrides=base)


@pytest.fixture
def settings(database_url: str, kafka_bootstrap: str, topic_prefix: str) -> Settings:
    return make_settings(database_url, kafka_bootstrap, topic_prefix)


@pytest.fixture
def installed(settings: Settings) -> Settings:
    import psycopg

    from pipeline.outbox.migrations import install

    with psycopg.connect(settings.database.url.get_secret_value(), autocommit=True) as conn:  # type: ignore[union-attr]
        install(conn, settings.database.schema_name)
    return settings


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A guarantee that only Apache Kafka has (transactions, compaction, SASL, a cluster) is
    # tested there; on the tansu path those tests say why they do not run.
    kafka_only = [i for i in items if i.get_closest_marker("kafka_only")]
    if not kafka_only:
        return
    from pipeline.embedded.kafka import java_binary, kafka_available

    if broker_kind() == "tansu" or not kafka_available():
        why = ("needs Apache Kafka: Java 17+ and `make kafka`" if java_binary() is None
               or not kafka_available() else "the suite runs on tansu (PIPELINE_TEST_BROKER)")
        for item in kafka_only:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A three-node Apache Kafka cluster (replication factor 3, min.insync.replicas 2) that the
    test may take nodes of down; one per session, started on first use."""
    from pipeline.embedded.kafka import KafkaCluster

    with KafkaCluster(3, base_dir=tmp_path_factory.mktemp("kafka3"), heap="512m") as cluster:
        yield cluster
