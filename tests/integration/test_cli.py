"""The ``pipeline`` command line on a real PostgreSQL (and, for topics, the real broker)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner, Result
from confluent_kafka.admin import AdminClient

from pipeline.cli import main
from pipeline.outbox.migrations import migrations
from pipeline.schemas.catalogue import Catalogue

pytestmark = [pytest.mark.integration, pytest.mark.tansu_smoke]

NOCONF = ["--config", "/dev/null"]


@pytest.fixture(autouse=True)
def _tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # no pipeline.yaml of the checkout may be picked up
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``pipeline relay`` reconfigures the root logger; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pl_level = logging.getLogger("pipeline").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pipeline").setLevel(pl_level)


def cli(args: list[str], env: dict[str, str] | None = None, config: bool = True) -> Result:
    return CliRunner().invoke(main, (NOCONF if config else []) + args, env=env or {},
                              catch_exceptions=False)


@pytest.fixture
def db_env(database_url: str) -> dict[str, str]:
    return {"PIPELINE_DATABASE__URL": database_url}


def stderr_lines(r: Result) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


# -- config check --------------------------------------------------------------------------------


def test_config_check_prints_yaml_with_masked_password() -> None:
    env = {
        "PIPELINE_DATABASE__URL": "postgresql://erp:s3cret-pw@db.example:5432/erp",
        "PIPELINE_KAFKA__BOOTSTRAP_SERVERS": "k1:9092",
        "PIPELINE_KAFKA__SASL_PASSWORD": "kafka-s3cret",
        "PIPELINE_TOPICS__PREFIX": "acme",
    }
    r = cli(["config", "check"], env)
    assert r.exit_code == 0, r.output
    assert "s3cret-pw" not in r.output
    assert "kafka-s3cret" not in r.output
    dumped = yaml.safe_load(r.stdout)
    assert dumped["database"]["url"] == "postgresql://erp:**********@db.example:5432/erp"
    assert dumped["kafka"]["sasl_password"] == "**********"
    assert dumped["kafka"]["bootstrap_servers"] == "k1:9092"
    assert dumped["topics"]["prefix"] == "acme"
    assert dumped["relay"]["shards"] == 1
    assert "configuration ok" in r.stderr


def test_config_check_json() -> None:
    r = cli(["config", "check", "--json"],
            {"PIPELINE_DATABASE__URL": "postgresql://u:pw123456@h/db"})
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["database"]["url"] == "postgresql://u:**********@h/db"
    assert "pw123456" not in r.output


def test_config_check_reads_the_given_file(tmp_path: Path) -> None:
    p = tmp_path / "conf.yaml"
    p.write_text("topics:\n  prefix: from-file\nrelay:\n  shards: 3\n")
    r = cli(["--config", str(p), "config", "check"], config=False)
    assert r.exit_code == 0, r.output
    d = yaml.safe_load(r.stdout)
    assert d["topics"]["prefix"] == "from-file"
    assert d["relay"]["shards"] == 3


def test_bad_config_file_lists_every_error_with_its_path(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("relay:\n  batchsize: 5\n  shards: 0\ntopics:\n  prefix: 'no spaces'\n"
                 "kafak: {}\n")
    r = cli(["--config", str(p), "config", "check"], config=False)
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = stderr_lines(r)
    assert lines[0].startswith("error: invalid configuration (")
    assert "4 error(s)" in lines[0]
    assert str(p) in lines[0]
    body = "\n".join(lines[1:])
    for path in ("relay.batchsize: unknown key", "relay.shards:", "topics.prefix:",
                 "kafak: unknown key"):
        assert path in body, f"{path!r} missing in:\n{r.stderr}"
    assert len(lines) == 5


def test_invalid_yaml_config_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("relay: [\n")
    r = cli(["--config", str(p), "config", "check"], config=False)
    assert r.exit_code == 2
    assert f"error: configuration file {p} is not valid YAML" in r.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    r = cli(["--config", str(tmp_path / "nope.yaml"), "config", "check"], config=False)
    assert r.exit_code == 2
    assert "nope.yaml does not exist" in r.stderr


def test_bad_environment_value_exits_2_naming_the_field() -> None:
    r = cli(["config", "check"], {"PIPELINE_RELAY__SHARDS": "0"})
    assert r.exit_code == 2
    assert "relay.shards:" in r.stderr


# -- outbox install / status ---------------------------------------------------------------------


def test_outbox_install_twice(db_env: dict[str, str], database_url: str) -> None:
    r = cli(["outbox", "install"], db_env)
    assert r.exit_code == 0, r.output
    applied = r.stdout.strip().splitlines()
    assert applied[:4] == [
        "applied migration 0001_outbox to schema pipeline",
        "applied migration 0002_inbox to schema pipeline",
        "applied migration 0003_capture_keys to schema pipeline",
        "applied migration 0004_encoded_payload to schema pipeline",
    ]
    assert applied == [
        f"applied migration {m.version:04d}_{m.name} to schema pipeline" for m in migrations()
    ]
    r = cli(["outbox", "install"], db_env)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "outbox schema pipeline is up to date"
    with psycopg.connect(database_url) as c:
        assert c.execute("SELECT version FROM pipeline.schema_migrations ORDER BY version"
                         ).fetchall() == [(m.version,) for m in migrations()]


def test_outbox_install_into_configured_schema(db_env: dict[str, str]) -> None:
    env = {**db_env, "PIPELINE_DATABASE__SCHEMA_NAME": "erp_events"}
    r = cli(["outbox", "install"], env)
    assert r.exit_code == 0, r.output
    assert "to schema erp_events" in r.stdout


def test_outbox_status_not_installed(db_env: dict[str, str]) -> None:
    r = cli(["outbox", "status"], db_env)
    assert r.exit_code == 1
    assert "outbox not installed in schema pipeline: run `pipeline outbox install`" in r.output


def test_outbox_status_shows_backlog(db_env: dict[str, str], database_url: str) -> None:
    from pipeline.outbox import emit
    from pipeline.simulator.payloads import payload_for

    assert cli(["outbox", "install"], db_env).exit_code == 0
    r = cli(["outbox", "status"], db_env)
    assert r.exit_code == 0, r.output
    assert "backlog rows      0" in r.stdout
    assert "leaders           none yet (no relay has run)" in r.stdout

    import datetime as dt

    rng = random.Random(2)
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(database_url) as c:
        for i in range(5):
            emit(c, "order", f"SO-{i:06d}", "order.created",
                 payload_for("order.created", rng, aggregate_id=f"SO-{i:06d}", now=now))
        c.commit()

    r = cli(["outbox", "status"], db_env)
    assert r.exit_code == 0, r.output
    assert f"schema            pipeline (migration {migrations()[-1].version:04d})" in r.stdout
    assert "backlog rows      5" in r.stdout
    oldest = next(line for line in r.stdout.splitlines() if line.startswith("oldest"))
    assert oldest.split()[-1].endswith("s")  # e.g. "0.1s"
    assert oldest.split()[-1] != "-"

    r = cli(["outbox", "status", "--json"], db_env)
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["installed_version"] == migrations()[-1].version
    assert st["backlog_rows"] == 5
    assert st["oldest_unpublished_age_s"] >= 0
    assert st["shards"] == []


# -- outbox capture ------------------------------------------------------------------------------


@pytest.fixture
def sale_order(db_env: dict[str, str], database_url: str) -> dict[str, str]:
    assert cli(["outbox", "install"], db_env).exit_code == 0
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("CREATE TABLE sale_order (id int PRIMARY KEY, name text, amount numeric)")
    return db_env


def test_outbox_capture_and_drop(sale_order: dict[str, str], database_url: str) -> None:
    env = {**sale_order, "PIPELINE_TOPICS__PREFIX": "acme"}
    r = cli(["outbox", "capture", "--table", "sale_order", "--aggregate-type", "order"], env)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == (
        "capturing insert, update, delete, truncate on sale_order as sale_order.created, "
        "sale_order.updated, sale_order.deleted, sale_order.truncated (aggregate order, key id) "
        "→ topic acme.order"
    )
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO sale_order VALUES (1, 'a', 2.5)")
        rows = c.execute("SELECT aggregate_type, aggregate_id, event_type FROM pipeline.outbox"
                         ).fetchall()
    assert rows == [("order", "1", "sale_order.created")]

    r = cli(["outbox", "capture", "--table", "sale_order", "--drop"], env)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "capture trigger on sale_order removed"
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO sale_order VALUES (2, 'b', 1)")
        assert c.execute("SELECT count(*) FROM pipeline.outbox").fetchone() == (1,)

    r = cli(["outbox", "capture", "--table", "sale_order", "--drop"], env)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "no capture trigger on sale_order; nothing to remove"


def test_outbox_capture_missing_table(sale_order: dict[str, str]) -> None:
    r = cli(["outbox", "capture", "--table", "no_such_table", "--aggregate-type", "order"],
            sale_order)
    assert r.exit_code == 2
    assert stderr_lines(r) == ["error: table no_such_table does not exist in this database"]
    assert "Traceback" not in r.output


def test_outbox_capture_missing_key_column(sale_order: dict[str, str]) -> None:
    r = cli(["outbox", "capture", "--table", "sale_order", "--aggregate-type", "order",
             "--key-column", "code"], sale_order)
    assert r.exit_code == 2
    assert stderr_lines(r) == [
        "error: table sale_order has no column(s) 'code' (columns: amount, id, name)"
    ]


def test_outbox_capture_prefix_clash(sale_order: dict[str, str]) -> None:
    r = cli(["outbox", "capture", "--table", "sale_order", "--aggregate-type", "order",
             "--event-type-prefix", "order"], sale_order)
    assert r.exit_code == 2
    (line,) = stderr_lines(r)
    assert line.startswith("error: event type(s) order.created already have a dedicated schema")


def test_outbox_capture_requires_aggregate_type(sale_order: dict[str, str]) -> None:
    r = cli(["outbox", "capture", "--table", "sale_order"], sale_order)
    assert r.exit_code == 2
    assert "--aggregate-type is required" in r.stderr


# -- schemas -------------------------------------------------------------------------------------


def test_schemas_check_real_catalogue() -> None:
    r = cli(["schemas", "check"])
    assert r.exit_code == 0, r.output
    cat = Catalogue.load()
    assert f"{len(cat.event_types)} event types" in r.stdout
    assert "all valid and BACKWARD compatible" in r.stdout
    assert "INCOMPATIBLE" not in r.output


def _schema(*fields: dict[str, Any]) -> str:
    return json.dumps({"type": "record", "name": "ThingHappened", "namespace": "test.thing",
                       "fields": list(fields)})


def test_schemas_check_reports_required_field_added_without_default(tmp_path: Path) -> None:
    cat = tmp_path / "catalogue"
    (cat / "thing.happened").mkdir(parents=True)
    (cat / "thing.happened" / "v1.avsc").write_text(
        _schema({"name": "id", "type": "string"}))
    (cat / "thing.happened" / "v2.avsc").write_text(
        _schema({"name": "id", "type": "string"}, {"name": "priority", "type": "int"}))
    r = cli(["schemas", "check", "--path", str(cat)])
    assert r.exit_code == 1
    assert ("INCOMPATIBLE thing.happened v2 is not BACKWARD compatible with v1: field priority:"
            in r.stderr)
    assert "'priority' was added without a default" in r.stderr
    assert f"1 problem(s) in {cat}" in r.stderr


def test_schemas_check_accepts_optional_field_added_with_default(tmp_path: Path) -> None:
    cat = tmp_path / "catalogue"
    (cat / "thing.happened").mkdir(parents=True)
    (cat / "thing.happened" / "v1.avsc").write_text(_schema({"name": "id", "type": "string"}))
    (cat / "thing.happened" / "v2.avsc").write_text(
        _schema({"name": "id", "type": "string"},
                {"name": "priority", "type": ["null", "int"], "default": None}))
    r = cli(["schemas", "check", "--path", str(cat)])
    assert r.exit_code == 0, r.output
    assert "1 event types, 2 schema versions" in r.stdout


def test_schemas_list() -> None:
    r = cli(["schemas", "list"])
    assert r.exit_code == 0, r.output
    cat = Catalogue.load()
    lines = r.stdout.splitlines()
    assert len(lines) == len(cat.event_types)
    by_type = {line.split()[0]: line for line in lines}
    assert set(by_type) == set(cat.event_types)
    w = cat.writer("order.created")
    line = by_type["order.created"]
    assert line.split()[1:4] == [f"v{w.version}", "erp.order.OrderCreated", f"{w.fingerprint:016x}"]
    assert "(internal)" not in line
    assert by_type["pipeline.row_change"].endswith("(internal)")
    assert by_type["pipeline.claim_check"].endswith("(internal)")


# -- topics --------------------------------------------------------------------------------------


def test_topics_apply_creates_then_reports_unchanged(kafka_bootstrap: str,
                                                    topic_prefix: str) -> None:
    env = {"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "PIPELINE_TOPICS__PREFIX": topic_prefix,
           "PIPELINE_TOPICS__PARTITIONS": "2"}
    aggregates = ["customer", "order", "inventory", "payment", "invoice", "shipment"]
    expected = {f"{topic_prefix}.{a}" for a in aggregates} | {f"{topic_prefix}.outbox.dlq"}

    r = cli(["topics", "apply"], env)
    assert r.exit_code == 0, r.output
    actions = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()}
    assert actions == dict.fromkeys(expected, "created")
    assert f"{topic_prefix}.order" in r.stdout

    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert expected <= set(md.topics)
    assert len(md.topics[f"{topic_prefix}.order"].partitions) == 2
    assert len(md.topics[f"{topic_prefix}.outbox.dlq"].partitions) == 1

    r = cli(["topics", "apply", "--json"], env)
    assert r.exit_code == 0, r.output
    reports = json.loads(r.stdout)
    assert {rep["name"]: rep["action"] for rep in reports} == dict.fromkeys(expected, "unchanged")


def test_topics_apply_dry_run_lists_a_partition_drift_and_a_config_drift_together(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    env = {"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "PIPELINE_TOPICS__PREFIX": topic_prefix, "PIPELINE_TOPICS__PARTITIONS": "2"}
    assert cli(["topics", "apply"], env).exit_code == 0
    # the configuration now wants more partitions and another retention
    env2 = {**env, "PIPELINE_TOPICS__PARTITIONS": "4",
            "PIPELINE_TOPICS__CONFIG": '{"retention.ms": "3600000"}'}
    r = cli(["topics", "apply", "--dry-run", "--json"], env2)
    assert r.exit_code == 0, r.output
    order = [rep for rep in json.loads(r.stdout) if rep["name"] == f"{topic_prefix}.order"]
    assert sorted(rep["action"] for rep in order) == ["would-configure",
                                                      "would-raise-partitions"], order
    assert any("2 -> 4" in rep["detail"] for rep in order)
    assert any("retention.ms" in rep["detail"] for rep in order)
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert len(md.topics[f"{topic_prefix}.order"].partitions) == 2  # a dry run changes nothing


def test_topics_apply_without_bootstrap_servers() -> None:
    r = cli(["topics", "apply"])
    assert r.exit_code == 2
    assert "kafka.bootstrap_servers is not set" in r.stderr
    assert "PIPELINE_KAFKA__BOOTSTRAP_SERVERS" in r.stderr


# -- relay and unreachable servers ---------------------------------------------------------------


def test_relay_without_database_url() -> None:
    r = cli(["relay"], {"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert r.exit_code == 2
    assert "database.url is not set" in r.stderr
    assert "PIPELINE_DATABASE__URL" in r.stderr


def test_unreachable_database_gives_one_line_error() -> None:
    env = {"PIPELINE_DATABASE__URL": "postgresql://postgres:hunter2pw@127.0.0.1:1/x"}
    r = cli(["outbox", "install"], env)
    assert r.exit_code == 1
    lines = stderr_lines(r)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cannot connect to PostgreSQL at ")
    assert "127.0.0.1" in lines[0]
    assert "hunter2pw" not in r.output
    assert "Traceback" not in r.output


def test_outbox_commands_without_database_url() -> None:
    r = cli(["outbox", "status"])
    assert r.exit_code == 2
    assert "database.url is not set" in r.stderr
