"""Configuration: pydantic models that reject unknown keys, loaded from YAML with environment
overrides in the pydantic-settings convention (``PIPELINE_KAFKA__BOOTSTRAP_SERVERS`` …).

Precedence, highest first: environment variables, the YAML file, defaults. A missing database URL
or bootstrap server means "embedded": ``make run`` and the tests start a local server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("pipeline.yaml")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Model):
    url: SecretStr | None = Field(
        default=None,
        description="libpq URL of the ERP database; unset = embedded PostgreSQL",
    )
    schema_name: str = Field(
        default="pipeline",
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="schema holding the outbox table, counters and functions",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)


class KafkaConfig(_Model):
    bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port]; unset = embedded broker"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    client_id: str = "erp-pipeline"
    producer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra librdkafka producer properties"
    )
    consumer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra librdkafka consumer properties"
    )
    request_timeout_s: float = Field(default=10.0, gt=0)


class SchemaRegistryConfig(_Model):
    url: str | None = Field(
        default=None,
        description="Confluent-compatible Schema Registry; unset = Avro single-object encoding",
    )
    basic_auth_user: str | None = None
    basic_auth_password: SecretStr | None = None


class TopicOverride(_Model):
    partitions: int | None = Field(default=None, ge=1)
    config: dict[str, str] = Field(default_factory=dict)


class TopicsConfig(_Model):
    prefix: str = Field(default="erp", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    config: dict[str, str] = Field(
        default_factory=lambda: {"retention.ms": str(7 * 24 * 3600 * 1000)},
        description="topic configs applied to every event topic",
    )
    aggregate_types: list[str] = Field(
        default_factory=lambda: [
            "customer", "order", "inventory", "payment", "invoice", "shipment",
        ],
        description="aggregate types whose topics `topics apply` creates",
    )
    overrides: dict[str, TopicOverride] = Field(
        default_factory=dict, description="per aggregate type: partitions, config"
    )

    def event_topic(self, aggregate_type: str) -> str:
        return f"{self.prefix}.{aggregate_type}"

    @property
    def outbox_dlq(self) -> str:
        return f"{self.prefix}.outbox.dlq"


class ClaimCheckConfig(_Model):
    store: Literal["table", "dir"] = "table"
    path: Path | None = Field(default=None, description="directory for store: dir")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.resolve() if v is not None else None


class RelayConfig(_Model):
    shards: int = Field(default=1, ge=1, le=1024)
    batch_size: int = Field(default=2000, ge=1, le=100_000)
    poll_interval_s: float = Field(default=1.0, gt=0, description="backstop when no NOTIFY")
    lock_retry_s: float = Field(default=1.0, gt=0, description="standby's leadership check")
    on_invalid: Literal["dlq", "halt"] = "dlq"
    max_inline_bytes: int = Field(
        default=256 * 1024, ge=1024, description="larger encoded events go to the claim-check store"
    )
    max_payload_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="larger payloads are rejected (outbox DLQ)"
    )
    claim_check: ClaimCheckConfig = Field(default_factory=ClaimCheckConfig)
    source: str = Field(default="/erp/outbox", description="CloudEvents ce_source of the events")
    dedupe_window: int = Field(
        default=0,
        ge=0,
        description="records read back per partition on start to skip already-published rows "
        "(0 = 2 x batch_size x shards)",
    )
    flush_timeout_s: float = Field(default=30.0, gt=0)


class SchemasConfig(_Model):
    path: Path | None = Field(default=None, description="catalogue folder; unset = built in")


class LogConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class Settings(BaseSettings):
    """The whole configuration. Sections mirror the YAML file's top-level keys."""

    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    schema_registry: SchemaRegistryConfig = Field(default_factory=SchemaRegistryConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    schemas: SchemasConfig = Field(default_factory=SchemasConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}): {err.error_count()} error(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a configuration option; check the spelling)"
        lines.append(f"  {path}: {msg} (got {e.get('input')!r})" if e["type"] != "missing"
                     else f"  {path}: {msg}")
    return "\n".join(lines)


def load_config(path: Path | None = None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the configuration from ``path`` (or ``pipeline.yaml`` when present) plus environment.

    Raises :class:`ConfigError` naming every bad field.
    """
    data: dict[str, Any] = {}
    origin = "defaults + environment"
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"configuration file {path} must hold a mapping of sections, "
                f"got {type(loaded).__name__}"
            )
        data = loaded or {}
        origin = f"{path} + environment"
    for key, value in (overrides or {}).items():
        data[key] = value
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from exc


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The resolved configuration as plain data, secrets shown as ``**********``."""
    dumped: dict[str, Any] = settings.model_dump(mode="json")
    # SecretStr dumps as '**********' already in json mode; URLs may embed passwords.
    url = settings.database.url
    dumped["database"]["url"] = _mask_url(url.get_secret_value()) if url else None
    return dumped


def _mask_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":**********@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def env_bootstrap() -> str | None:
    """The broker named by ``KAFKA_BOOTSTRAP`` (tests and benchmarks honour it)."""
    return os.environ.get("KAFKA_BOOTSTRAP") or None
