"""Shared fixtures: a real PostgreSQL database and a real Kafka-protocol broker per test.

* PostgreSQL: ``PIPELINE_TEST_DATABASE_URL`` or the machine's server at 127.0.0.1:5432 when it
  answers, else an embedded ``pgserver`` started once per session. Each test gets a fresh
  database.
* Kafka: the cluster named by ``KAFKA_BOOTSTRAP``, else a ``tansu`` broker started once per
  session on a free loopback port. Each test gets its own random topic prefix.
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

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.relay", "tests.fixtures.registry"]


@pytest.fixture(autouse=True)
def _clean_pipeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's PIPELINE_* variables must not leak into tests.
    for key in list(os.environ):
        if key.startswith("PIPELINE_") and key != "PIPELINE_TEST_DATABASE_URL":
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = admin_url()
    if url is not None:
        yield url
        return
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pgserver")).start()
    try:
        yield pg.url
    finally:
        pg.stop()


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
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap


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
