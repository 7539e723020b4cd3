"""Configuration loading: defaults, YAML, environment overrides, errors users read, masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DEFAULT_CONFIG_FILE, Settings, load_config, masked_dump
from pipeline.errors import ConfigError

MASK = "**********"


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every test in an empty directory: a developer's pipeline.yaml must not leak in."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def config_error(path: Path | None = None, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as ei:
        load_config(path, **kw)
    return str(ei.value)


# -- defaults and YAML ---------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    s = load_config()
    assert isinstance(s, Settings)
    assert s.database.url is None
    assert s.database.schema_name == "pipeline"
    assert s.kafka.bootstrap_servers is None
    assert s.kafka.security_protocol == "PLAINTEXT"
    assert s.kafka.client_id == "erp-pipeline"
    assert s.schema_registry.url is None
    assert s.topics.prefix == "erp"
    assert s.topics.partitions == 6
    assert s.topics.replication_factor == 1
    assert s.topics.config == {"retention.ms": "604800000"}
    assert s.topics.event_topic("order") == "erp.order"
    assert s.topics.outbox_dlq == "erp.outbox.dlq"
    assert s.relay.shards == 1
    assert s.relay.batch_size == 2000
    assert s.relay.on_invalid == "dlq"
    assert s.relay.max_inline_bytes == 256 * 1024
    assert s.relay.max_payload_bytes == 16 * 1024 * 1024
    assert s.relay.claim_check.store == "table"
    assert s.relay.source == "/erp/outbox"
    assert s.schemas.path is None
    assert s.log.level == "INFO"


def test_yaml_file_is_loaded(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
database:
  url: postgresql://erp@db.example:5432/erp
  schema_name: outbox_x
kafka:
  bootstrap_servers: k1:9092,k2:9092
  producer:
    linger.ms: 20
topics:
  prefix: acme.prod
  partitions: 12
  overrides:
    order: {partitions: 24}
relay:
  shards: 4
  batch_size: 500
  on_invalid: halt
log:
  level: DEBUG
""",
    )
    s = load_config(p)
    assert s.database.url is not None
    assert s.database.url.get_secret_value() == "postgresql://erp@db.example:5432/erp"
    assert s.database.schema_name == "outbox_x"
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert s.kafka.producer == {"linger.ms": 20}
    assert s.topics.prefix == "acme.prod"
    assert s.topics.partitions == 12
    assert s.topics.overrides["order"].partitions == 24
    assert s.topics.event_topic("order") == "acme.prod.order"
    assert s.relay.shards == 4
    assert s.relay.batch_size == 500
    assert s.relay.on_invalid == "halt"
    assert s.log.level == "DEBUG"
    # untouched sections keep their defaults
    assert s.relay.poll_interval_s == 1.0
    assert s.topics.replication_factor == 1


def test_pipeline_yaml_in_the_working_directory_is_picked_up(_empty_cwd: Path) -> None:
    (_empty_cwd / DEFAULT_CONFIG_FILE).write_text("topics:\n  prefix: from-cwd\n")
    assert load_config().topics.prefix == "from-cwd"


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).topics.prefix == "erp"


def test_overrides_argument_replaces_sections(tmp_path: Path) -> None:
    p = write(tmp_path, "topics:\n  prefix: from-yaml\n")
    s = load_config(p, overrides={"topics": {"prefix": "from-override"}})
    assert s.topics.prefix == "from-override"


# -- errors --------------------------------------------------------------------------------------


def test_unknown_top_level_key_is_rejected_with_its_name(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "relays:\n  shards: 2\n"))
    assert "relays: unknown key" in msg
    assert "check the spelling" in msg
    assert str(tmp_path / "conf.yaml") in msg  # the origin is named


def test_unknown_nested_key_is_rejected_with_the_dotted_path(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "relay:\n  batchsize: 100\n"))
    assert "relay.batchsize: unknown key" in msg
    assert "(got 100)" in msg


def test_shards_zero_names_the_field(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "relay:\n  shards: 0\n"))
    assert "relay.shards:" in msg
    assert "greater than or equal to 1" in msg
    assert "(got 0)" in msg


def test_bad_topic_prefix_names_the_field(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "topics:\n  prefix: 'bad prefix!'\n"))
    assert "topics.prefix:" in msg
    assert "pattern" in msg
    assert "'bad prefix!'" in msg


def test_bad_schema_name_and_literal_name_their_fields(tmp_path: Path) -> None:
    msg = config_error(
        write(tmp_path, "database:\n  schema_name: Bad-Name\nrelay:\n  on_invalid: ignore\n")
    )
    assert "database.schema_name:" in msg
    assert "relay.on_invalid:" in msg


def test_every_error_is_listed_on_its_own_line(tmp_path: Path) -> None:
    msg = config_error(
        write(
            tmp_path,
            "relay:\n  batchsize: 3\n  shards: 0\ntopics:\n  prefix: 'a b'\nnope: 1\n",
        )
    )
    lines = msg.splitlines()
    assert "4 error(s)" in lines[0]
    paths = sorted(line.strip().split(":")[0] for line in lines[1:])
    assert paths == ["nope", "relay.batchsize", "relay.shards", "topics.prefix"]


def test_missing_file_gives_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = config_error(missing)
    assert msg.startswith(f"cannot read configuration file {missing}")
    assert "No such file or directory" in msg


def test_invalid_yaml_gives_a_clear_error(tmp_path: Path) -> None:
    p = write(tmp_path, "relay:\n  shards: [1, 2\n")
    msg = config_error(p)
    assert f"configuration file {p} is not valid YAML" in msg


def test_non_mapping_yaml_gives_a_clear_error(tmp_path: Path) -> None:
    p = write(tmp_path, "- relay\n- kafka\n")
    msg = config_error(p)
    assert f"configuration file {p} must hold a mapping of sections, got list" in msg


def test_scalar_yaml_gives_a_clear_error(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "just a string\n"))
    assert "must hold a mapping of sections, got str" in msg


def test_section_that_is_not_a_mapping_names_the_section(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "relay: 5\n"))
    assert "relay:" in msg.splitlines()[1]


# -- environment ---------------------------------------------------------------------------------


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA__BOOTSTRAP_SERVERS", "env-broker:9092")
    monkeypatch.setenv("PIPELINE_RELAY__SHARDS", "3")
    monkeypatch.setenv("PIPELINE_DATABASE__URL", "postgresql://u@h/db")
    s = load_config()
    assert s.kafka.bootstrap_servers == "env-broker:9092"
    assert s.relay.shards == 3
    assert s.database.url is not None
    assert s.database.url.get_secret_value() == "postgresql://u@h/db"


def test_environment_overrides_yaml_and_merges_deeply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write(
        tmp_path,
        """
kafka:
  bootstrap_servers: yaml-broker:9092
  client_id: from-yaml
  request_timeout_s: 3
relay:
  shards: 2
  batch_size: 77
  source: /from/yaml
""",
    )
    monkeypatch.setenv("PIPELINE_KAFKA__BOOTSTRAP_SERVERS", "env-broker:9092")
    monkeypatch.setenv("PIPELINE_RELAY__SHARDS", "5")
    s = load_config(p)
    # the environment wins …
    assert s.kafka.bootstrap_servers == "env-broker:9092"
    assert s.relay.shards == 5
    # … and the other keys of the same YAML sections survive
    assert s.kafka.client_id == "from-yaml"
    assert s.kafka.request_timeout_s == 3.0
    assert s.relay.batch_size == 77
    assert s.relay.source == "/from/yaml"


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_RELAY__SHARDS", "0")
    msg = config_error()
    assert "relay.shards:" in msg
    assert "greater than or equal to 1" in msg


def test_non_numeric_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_RELAY__BATCH_SIZE", "lots")
    msg = config_error()
    assert "relay.batch_size:" in msg
    assert "'lots'" in msg


# -- masking -------------------------------------------------------------------------------------


def test_masked_dump_hides_database_password_and_sasl_password() -> None:
    s = load_config(
        overrides={
            "database": {"url": "postgresql://erp:s3cretpw@db.example:5432/erp"},
            "kafka": {
                "bootstrap_servers": "k:9092",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "svc",
                "sasl_password": "kafka-pw-123",
            },
            "schema_registry": {"url": "http://sr:8081", "basic_auth_user": "sr",
                                "basic_auth_password": "sr-pw-456"},
        }
    )
    d = masked_dump(s)
    assert d["database"]["url"] == f"postgresql://erp:{MASK}@db.example:5432/erp"
    assert d["kafka"]["sasl_password"] == MASK
    assert d["kafka"]["sasl_username"] == "svc"
    assert d["schema_registry"]["basic_auth_password"] == MASK
    text = repr(d)
    for secret in ("s3cretpw", "kafka-pw-123", "sr-pw-456"):
        assert secret not in text
        assert secret not in repr(s)
    # the real values stay available to the code that connects
    assert s.database.url is not None
    assert s.database.url.get_secret_value().endswith(":s3cretpw@db.example:5432/erp")
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "kafka-pw-123"


def test_masked_dump_keeps_url_without_password_and_unset_secrets() -> None:
    s = load_config(overrides={"database": {"url": "postgresql://erp@db:5432/erp"}})
    d = masked_dump(s)
    assert d["database"]["url"] == "postgresql://erp@db:5432/erp"
    assert d["kafka"]["sasl_password"] is None
    assert masked_dump(load_config())["database"]["url"] is None


def test_masked_dump_hides_password_given_as_url_query_parameter() -> None:
    # libpq accepts the password as a query parameter too: postgresql://u@h/db?password=…
    s = load_config(
        overrides={"database": {"url": "postgresql://erp@db:5432/erp?password=qp-s3cret"}}
    )
    assert "qp-s3cret" not in repr(masked_dump(s))


def test_masking_a_short_password_masks_only_the_password():
    from pipeline.config import mask_url

    assert mask_url("postgresql://u:p@h/db") == "postgresql://u:**********@h/db"
    assert mask_url("postgres://u@h/db?password=p&x=1") == "postgres://u@h/db?password=**********&x=1"
    assert mask_url("host=h password='a b' user=u") == "host=h password=********** user=u"
    assert mask_url("postgresql://h/db") == "postgresql://h/db"


def test_connector_options_that_hold_secrets_are_masked(tmp_path):
    from pipeline.config import load_config, masked_dump

    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "workers:\n  wms:\n    connector: connectors.wms.connector:WmsConnector\n"
        "    options:\n      base_url: https://user:hunter2@wms.example.com/api\n"
        "      bearer_token: tok-123\n      headers: {Authorization: Basic abc, X-Team: ops}\n"
        "      timeout_s: 5\n")
    opts = masked_dump(load_config(cfg))["workers"]["wms"]["options"]
    assert opts["base_url"] == "https://user:**********@wms.example.com/api"
    assert opts["bearer_token"] == "**********"
    assert opts["headers"] == {"Authorization": "**********", "X-Team": "ops"}
    assert opts["timeout_s"] == 5
    assert "hunter2" not in str(opts) and "tok-123" not in str(opts)


# -- Kafka security, transactions, group protocol ------------------------------------------------
def test_a_missing_ca_file_names_the_field_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None,
                    overrides={"kafka": {"ssl_ca_location": str(tmp_path / "ca.pem")}})
    msg = str(e.value)
    assert "kafka.ssl_ca_location" in msg and str(tmp_path / "ca.pem") in msg


def test_sasl_without_a_mechanism_says_what_to_add() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides={"kafka": {"security_protocol": "SASL_SSL"}})
    assert "kafka.sasl_mechanism" in str(e.value)


def test_transactions_and_group_protocol_accept_only_their_words() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides={"kafka": {"transactions": "yes"}})
    assert "kafka.transactions" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides={"workers": {"w": {"connector": "m:a",
                                                       "group_protocol": "kip848"}}})
    assert "workers.w.group_protocol" in str(e.value)


def test_the_kafka_client_config_carries_the_ca_and_no_session_settings_under_consumer(
        tmp_path: Path) -> None:
    from pipeline.kafka.client import common_config, membership_config

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = load_config(None, overrides={"kafka": {"bootstrap_servers": "k:9093",
                                               "ssl_ca_location": str(ca)}})
    assert common_config(s)["ssl.ca.location"] == str(ca.resolve())
    # the session and heartbeat are the broker's; the assignor is named to it (KIP-848's range
    # assignor co-partitions, which a worker's ownership of a key's retry state relies on)
    assert membership_config("consumer", session_timeout_ms=6000, assignor="range") == {
        "group.protocol": "consumer", "group.remote.assignor": "range"}
    assert membership_config("consumer", session_timeout_ms=6000,
                             assignor="cooperative-sticky") == {"group.protocol": "consumer"}
    classic = membership_config("classic", session_timeout_ms=6000, assignor="range")
    assert classic["session.timeout.ms"] == 6000 and classic["heartbeat.interval.ms"] == 1200
