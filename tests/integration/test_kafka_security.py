"""SASL/SCRAM-SHA-512 over TLS on Apache Kafka (tansu has no SASL): a listener with SCRAM users
and a certificate signed by a CA the fixture makes. The relay, a worker and ``pipeline dlq``
connect with credentials; a wrong password and a missing CA each fail with one line that names
the listener and what to check, and no secret is printed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Settings
from pipeline.embedded.kafka import KafkaCluster, ScramListener, TlsFiles, make_tls
from pipeline.relay.relay import Relay
from pipeline.worker.runtime import Worker
from tests.conftest import make_settings
from tests.fixtures.connectors import SinkConnector, applied_rows
from tests.fixtures.relay import _url, outbox_count, wait_for
from tests.fixtures.sink import Running, cli

pytestmark = [pytest.mark.integration, pytest.mark.kafka_only]

USER, PASSWORD = "pipeline-relay", "s3cret-Scram-pw"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KafkaCluster, TlsFiles]]:
    tls = make_tls(tmp_path_factory.mktemp("tls"))
    cluster = KafkaCluster(1, scram=ScramListener({USER: PASSWORD}, tls), heap="512m",
                           base_dir=tmp_path_factory.mktemp("kafka-sasl"))
    with cluster:
        yield cluster, tls


def _kafka(cluster: KafkaCluster, tls: TlsFiles | None, password: str = PASSWORD
           ) -> dict[str, Any]:
    conf: dict[str, Any] = {"bootstrap_servers": cluster.sasl_bootstrap,
                            "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                            "sasl_username": USER, "sasl_password": password,
                            "request_timeout_s": 3.0}
    if tls is not None:
        conf["ssl_ca_location"] = str(tls.ca)
    return conf


def _settings(database_url: str, prefix: str, kafka: dict[str, Any]) -> Settings:
    import psycopg

    from pipeline.outbox.migrations import install

    s = make_settings(database_url, kafka["bootstrap_servers"], prefix, kafka=kafka,
                      topics={"aggregate_types": ["order"], "partitions": 2},
                      workers={"sink": {"connector": "tests.fixtures.connectors:SinkConnector",
                                        "retry_delays_s": [0.5], "session_timeout_ms": 6000}})
    with psycopg.connect(database_url, autocommit=True) as conn:
        install(conn, "pipeline")
    return s


def _config_file(tmp_path: Path, database_url: str, prefix: str, kafka: dict[str, Any]) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": database_url}, "kafka": kafka,
                                    "topics": {"prefix": prefix}}))
    return path


def test_relay_worker_and_dlq_cli_work_with_scram_over_tls(
        secured, database_url: str, topic_prefix: str, tmp_path: Path) -> None:
    import threading

    from tests.integration.test_relay_operations import _emit_orders

    cluster, tls = secured
    s = _settings(database_url, topic_prefix, _kafka(cluster, tls))
    ids = _emit_orders(_url(s), 40, keys=8)
    relay, stop = Relay(s), threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_for(lambda: outbox_count(_url(s)) == 0, 60, "the relay to publish over SASL_SSL")
        with Running(Worker(s, "sink", SinkConnector(_url(s)))):
            wait_for(lambda: len(applied_rows(_url(s))) == 40, 60,
                     "the worker to apply over SASL_SSL")
    finally:
        stop.set()
        t.join(30)
    assert {r[0] for r in applied_rows(_url(s))} == ids
    r = cli(_config_file(tmp_path, database_url, topic_prefix, _kafka(cluster, tls)),
            "dlq", "ls", "--group", "sink")
    assert r.returncode == 0, r.stderr[-2000:]


def _one_line_failure(r: Any) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert len(lines) == 1, r.stderr
    assert PASSWORD not in r.stderr + r.stdout and "wrong-" not in r.stderr + r.stdout
    return lines[0]


def test_a_wrong_password_is_one_line_naming_the_listener(
        secured, database_url: str, topic_prefix: str, tmp_path: Path) -> None:
    cluster, tls = secured
    kafka = _kafka(cluster, tls, password="wrong-" + PASSWORD)
    line = _one_line_failure(cli(_config_file(tmp_path, database_url, topic_prefix, kafka),
                                 "dlq", "ls", "--group", "sink"))
    assert cluster.sasl_bootstrap in line
    assert f"as user '{USER}'" in line and "kafka.sasl_password" in line


def test_a_missing_ca_is_one_line_naming_the_listener(
        secured, database_url: str, topic_prefix: str, tmp_path: Path) -> None:
    cluster, _tls = secured
    line = _one_line_failure(cli(_config_file(tmp_path, database_url, topic_prefix,
                                              _kafka(cluster, None)),
                                 "dlq", "ls", "--group", "sink"))
    assert cluster.sasl_bootstrap in line
    assert "TLS handshake failed" in line and "kafka.ssl_ca_location" in line


def test_the_relay_names_a_refused_login_and_keeps_every_row(
        secured, database_url: str, topic_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from tests.integration.test_relay_operations import _emit_orders

    cluster, tls = secured
    s = _settings(database_url, topic_prefix, _kafka(cluster, tls, password="wrong-" + PASSWORD))
    _emit_orders(_url(s), 10)
    relay, stop = Relay(s), threading.Event()
    t = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    with caplog.at_level("WARNING", logger="pipeline.relay"):
        t.start()
        try:
            wait_for(lambda: "refused the login" in caplog.text, 40,
                     "the relay to say its login was refused")
        finally:
            stop.set()
            t.join(30)
    assert outbox_count(_url(s)) == 10  # nothing published, nothing lost
    assert PASSWORD not in caplog.text
    assert "kafka.sasl_password" in caplog.text
