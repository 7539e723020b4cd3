"""Configuration: pydantic models that reject unknown keys, loaded from YAML with environment
overrides in the pydantic-settings convention (``PIPELINE_KAFKA__BOOTSTRAP_SERVERS`` …).

Precedence, highest first: environment variables, the YAML file, defaults. A missing database URL
or bootstrap server means "embedded": ``make run`` and the tests start a local server.
"""

from __future__ import annotations

import json
import re
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
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.errors import ConfigError
from pipeline.kafka import names

DEFAULT_CONFIG_FILE = Path("pipeline.yaml")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Model):
    url: SecretStr | None = Field(
        default=None,
        description="the ERP database: a libpq URL (PostgreSQL), or mysql://user:pw@host:3306/db"
        " (MariaDB / MySQL); unset = embedded PostgreSQL",
    )
    schema_name: str = Field(
        default="pipeline",
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="schema holding the outbox table, counters and functions",
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="seconds to wait for a connection"
    )


class KafkaConfig(_Model):
    bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port]; unset = embedded broker"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="librdkafka security.protocol"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism when security_protocol is SASL_*"
    )
    sasl_username: str | None = Field(default=None, description="SASL user")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password (secret)")
    ssl_ca_location: Path | None = Field(
        default=None,
        description="PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL); "
        "unset = the system's trust store",
    )
    client_id: str = Field(default="erp-pipeline", description="Kafka client.id")
    producer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra librdkafka producer properties"
    )
    consumer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra librdkafka consumer properties"
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="timeout of metadata/admin requests and connection setup"
    )
    transactions: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Kafka transactions (relay batches with their dead letters, a fenced "
        "transactional id per shard; DLQ replays with their replay records): auto = on where "
        "the broker has a transaction coordinator",
    )
    transaction_timeout_s: float = Field(
        default=60.0, ge=1, le=900, description="transaction.timeout.ms of those producers"
    )


    @field_validator("ssl_ca_location")
    @classmethod
    def _ca_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"no CA file at {v}")
        return v.resolve() if v is not None else None

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL_") and not self.sasl_mechanism:
            raise ValueError(
                f"security_protocol {self.security_protocol} needs kafka.sasl_mechanism "
                "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512) with sasl_username and sasl_password"
            )
        return self


class SchemaRegistryConfig(_Model):
    url: str | None = Field(
        default=None,
        description="Confluent-compatible Schema Registry; unset = Avro single-object encoding",
    )
    basic_auth_user: str | None = Field(default=None, description="registry basic-auth user")
    basic_auth_password: SecretStr | None = Field(
        default=None, description="registry basic-auth password (secret)"
    )


class TopicOverride(_Model):
    partitions: int | None = Field(default=None, ge=1, description="partitions of this topic")
    config: dict[str, str] = Field(default_factory=dict, description="topic configs")


class TopicsConfig(_Model):
    prefix: str = Field(
        default="erp",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="topics are <prefix>.<aggregate_type>; the outbox DLQ <prefix>.outbox.dlq",
    )
    partitions: int = Field(default=6, ge=1, description="partitions of each event topic")
    replication_factor: int = Field(
        default=1, ge=1, description="replication factor (3 in production)"
    )
    config: dict[str, str] = Field(
        default_factory=lambda: {"retention.ms": str(7 * 24 * 3600 * 1000)},
        description="topic configs applied to every event topic",
    )
    aggregate_types: list[str] = Field(
        default_factory=lambda: [
            "customer",
            "order",
            "inventory",
            "payment",
            "invoice",
            "shipment",
        ],
        description="aggregate types whose topics `topics apply` creates",
    )
    overrides: dict[str, TopicOverride] = Field(
        default_factory=dict, description="per aggregate type: partitions, config"
    )
    state_config: dict[str, str] = Field(
        default_factory=dict,
        description="topic configs of the compacted state topics (<prefix>.<group>.parked, "
        "<prefix>.<group>.dlq-replays), on top of cleanup.policy=compact",
    )

    def event_topic(self, aggregate_type: str) -> str:
        return names.event_topic(self.prefix, aggregate_type)

    @property
    def outbox_dlq(self) -> str:
        return names.outbox_dlq_topic(self.prefix)

    @property
    def compacted_config(self) -> dict[str, str]:
        """Topic configs of a compacted state topic."""
        return {**self.state_config, "cleanup.policy": "compact"}


class ClaimCheckConfig(_Model):
    store: Literal["table", "dir"] = Field(
        default="table", description="table: <schema>.claim_check; dir: files under path"
    )
    path: Path | None = Field(default=None, description="directory for store: dir")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.resolve() if v is not None else None


class RelayConfig(_Model):
    shards: int = Field(
        default=1, ge=1, le=1024, description="aggregates split by hash of id; one leader each"
    )
    engine: Literal["poll", "wal"] = Field(
        default="poll",
        description="poll: read the outbox table; wal: read a logical replication slot per "
        "shard (PostgreSQL, wal_level=logical; outbox_emit then writes WAL messages, no rows)",
    )
    wal_slot_prefix: str | None = Field(
        default=None, pattern=r"^[a-z0-9_]{1,48}$",
        description="relay.engine wal: slot names <prefix>_<shard>of<shards> (default: "
        "<database>_<schema>)",
    )
    batch_size: int = Field(default=2000, ge=1, le=100_000, description="rows per publish batch")
    poll_interval_s: float = Field(default=1.0, gt=0, description="backstop when no NOTIFY")
    lock_retry_s: float = Field(default=1.0, gt=0, description="standby's leadership check")
    on_invalid: Literal["dlq", "halt"] = Field(
        default="dlq", description="a row that cannot be encoded: outbox DLQ, or stop the relay"
    )
    max_inline_bytes: int = Field(
        default=256 * 1024, ge=1024, description="larger encoded events go to the claim-check store"
    )
    max_payload_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="larger payloads are rejected (outbox DLQ)"
    )
    claim_check: ClaimCheckConfig = Field(
        default_factory=ClaimCheckConfig, description="where oversized events are stored"
    )
    source: str = Field(default="/erp/outbox", description="CloudEvents ce_source of the events")
    dedupe_window: int = Field(
        default=0,
        ge=0,
        description="records read back per partition on start to skip already-published rows "
        "(0 = 2 x batch_size x shards)",
    )
    flush_timeout_s: float = Field(
        default=30.0, gt=0, description="on stop, how long to wait for unacknowledged records"
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="port of /healthz, /readyz and /metrics (0 = any; unset = none)",
    )


class BreakerConfig(_Model):
    threshold: int = Field(
        default=5, ge=1, description="consecutive transient failures that open the breaker"
    )
    probe_initial_s: float = Field(default=1.0, gt=0, description="first probe after opening")
    probe_max_s: float = Field(default=30.0, gt=0, description="longest wait between probes")


class WorkerConfig(_Model):
    connector: str = Field(description="module:attribute of the connector (object or class)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for a connector class or factory"
    )
    group: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="consumer group name (topics <prefix>.<group>.retry.N); default: the "
        "worker's name",
    )
    aggregate_types: list[str] | None = Field(
        default=None, description="event topics to consume; default: topics.aggregate_types"
    )
    max_in_flight: int = Field(
        default=64, ge=1, le=10_000, description="events of different keys handled at once"
    )
    max_queued: int = Field(
        default=10_000, ge=1,
        description="events consumed and waiting for their key's turn: above this many the "
        "worker pauses fetching, and resumes below half",
    )
    max_queued_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1,
        description="the same bound in the waiting records' bytes (values and keys)",
    )
    retry_delays_s: list[float] = Field(
        default_factory=lambda: [5.0, 60.0, 600.0],
        description="one retry tier per delay; then the DLQ",
    )
    stall_after_s: float | None = Field(
        default=None,
        gt=0,
        description="a key whose head event has waited longer than this is stalled (logged, "
        "counted in pipeline_stalled_keys, named by `pipeline status`); default: twice the "
        "sum of retry_delays_s plus 60 s",
    )
    ordering: Literal["strict", "relaxed"] = Field(
        default="strict",
        description="strict: a key's later events wait behind one in retry; relaxed: overtake",
    )
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="circuit breaker")
    rate_limit_per_s: float | None = Field(
        default=None, gt=0, description="calls per second to the target (token bucket)"
    )
    rate_limit_burst: int | None = Field(default=None, ge=1, description="token bucket size")
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long in-flight handlers may finish"
    )
    commit_interval_s: float = Field(default=1.0, gt=0, description="offset commit interval")
    session_timeout_ms: int = Field(
        default=10_000, ge=1000,
        description="consumer session (classic protocol; the broker's "
        "group.consumer.session.timeout.ms under consumer)",
    )
    group_protocol: Literal["classic", "consumer"] = Field(
        default="classic",
        description="consumer group protocol: classic, or consumer (KIP-848, Kafka 4.0+: "
        "the broker assigns partitions incrementally)",
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="port of /healthz, /readyz and /metrics (0 = any; unset = none)",
    )
    batch_size: int = Field(
        default=5000, ge=1, le=1_000_000,
        description="batch targets (BI): events landed per write at most",
    )
    batch_max_wait_s: float = Field(
        default=1.0, gt=0, description="batch targets (BI): a partial batch is landed after this"
    )

    @property
    def stall_after(self) -> float:
        return self.stall_after_s or 2 * sum(self.retry_delays_s) + 60.0

    @field_validator("retry_delays_s")
    @classmethod
    def _delays(cls, v: list[float]) -> list[float]:
        if any(d <= 0 for d in v):
            raise ValueError("retry delays must be positive seconds")
        return v


class StatusConfig(_Model):
    """Thresholds of `pipeline status`: crossing one makes it exit 1 (for cron and scripts)."""

    max_backlog_rows: int | None = Field(
        default=None, ge=0, description="outbox rows not yet published (unset = no limit)"
    )
    max_backlog_age_s: float | None = Field(
        default=300.0, ge=0, description="age of the oldest unpublished outbox row"
    )
    max_lag_records: int | None = Field(
        default=None, ge=0, description="records a group is behind, per group (unset = no limit)"
    )
    max_lag_s: float | None = Field(
        default=600.0, ge=0, description="age of the oldest record a group has not consumed"
    )
    max_dlq: int | None = Field(
        default=None, ge=0, description="dead letters in a group's DLQ (unset = no limit)"
    )
    require_leader: bool = Field(
        default=True, description="every relay shard must have a leader with a fresh heartbeat"
    )
    max_slot_retained_bytes: int | None = Field(
        default=1024**3, ge=0,
        description="WAL a WAL-engine replication slot may hold back (unset = no limit)",
    )


class SchemasConfig(_Model):
    path: Path | None = Field(default=None, description="catalogue folder; unset = built in")


class LogConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="log level"
    )
    format: Literal["auto", "json", "text"] = Field(
        default="auto", description="json lines; text; auto = text on a terminal, else json"
    )


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
    status: StatusConfig = Field(default_factory=StatusConfig)
    workers: dict[str, WorkerConfig] = Field(
        default_factory=dict, description="consumer workers by name (`pipeline worker NAME`)"
    )

    def worker_config(self, name: str, *, given: bool = False) -> WorkerConfig:
        """``workers.NAME``; when absent, defaults if a connector object was given in code,
        else a ConfigError naming the configured workers."""
        wc = self.workers.get(name)
        if wc is not None:
            return wc
        if given:
            return WorkerConfig(connector="<given>")
        known = ", ".join(sorted(self.workers)) or "none configured"
        raise ConfigError(
            f"no worker named {name!r} in the configuration (workers: {known}); add "
            f"workers.{name}.connector: module:attribute (e.g. connectors.wms:WmsConnector or "
            "connectors.bi.postgres:PostgresTarget)"
        )

    def event_topics(self, wc: WorkerConfig) -> list[str]:
        """The event topics a worker consumes: its aggregate types, else all of them."""
        return [self.topics.event_topic(a) for a in (wc.aggregate_types
                                                     or self.topics.aggregate_types)]

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
        lines.append(
            f"  {path}: {msg} (got {e.get('input')!r})"
            if e["type"] != "missing"
            else f"  {path}: {msg}"
        )
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


_SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|token|api_?key|authorization)")


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The resolved configuration as plain data, secrets shown as ``**********``: SecretStr
    fields, passwords inside URLs, and connector options whose name says secret (``password``,
    ``token``, ``bearer_token``, ``api_key`` …)."""
    dumped: dict[str, Any] = settings.model_dump(mode="json")
    url = settings.database.url
    dumped["database"]["url"] = mask_url(url.get_secret_value()) if url else None
    for worker in dumped.get("workers", {}).values():
        worker["options"] = _mask_options(worker.get("options") or {})
    return dumped


def _mask_options(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask_options(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_options(v, key) for v in value]
    if value is not None and _SECRET_KEY.search(key):
        return "**********"
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*:)([^@/?#]*)(@)")
_PARAM_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)")


def mask_url(url: str) -> str:
    """A URL or libpq key=value string with its password (user info or parameter) masked."""
    url = _URL_PASSWORD.sub(r"\1**********\3", url, count=1)
    return _PARAM_PASSWORD.sub(r"\1**********", url)


def _is_section(ann: Any) -> bool:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return True
    args: tuple[Any, ...] = getattr(ann, "__args__", ())
    return len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], BaseModel)


def reference_markdown() -> str:
    """docs/configuration.md, generated from the models (a test keeps the file in step)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `pipeline/config.py` by `pipeline config docs`; do not edit by hand.",
        "",
        "Every key of `pipeline.yaml`. Environment variables override the file:",
        "`PIPELINE_<SECTION>__<KEY>` (nested keys joined by `__`), e.g.",
        "`PIPELINE_RELAY__BATCH_SIZE=5000`. Unknown keys are rejected. Secrets are masked in every",
        "output.",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        # plain keys first, then nested sections, so each table holds its own keys only
        fields = sorted(model.model_fields.items(), key=lambda kv: _is_section(kv[1].annotation))
        for name, f in fields:
            ann = f.annotation
            path = f"{prefix}{name}"
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.extend(
                    [
                        "",
                        f"## `{path}`",
                        "",
                        "| key | type | default | meaning |",
                        "|---|---|---|---|",
                    ]
                )
                walk(ann, path + ".")
                continue
            args: tuple[Any, ...] = getattr(ann, "__args__", ())
            if len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], BaseModel):
                # a mapping of named sections, e.g. workers.<name>
                lines.extend(
                    [
                        "",
                        f"## `{path}.<name>`",
                        "",
                        f"{f.description or ''}",
                        "",
                        "| key | type | default | meaning |",
                        "|---|---|---|---|",
                    ]
                )
                walk(args[1], f"{path}.<name>.")
                continue
            default = f.get_default(call_default_factory=True)
            shown = "(required)" if f.is_required() else json.dumps(default, default=str)
            kind = (
                str(ann)
                .replace("typing.", "")
                .replace("pydantic.types.", "")
                .replace("<class '", "")
                .replace("'>", "")
                .replace("pathlib.", "")
                .replace("Optional[", "")
                .replace("|", "or")
            )
            lines.append(f"| `{path}` | {kind} | `{shown}` | {f.description or ''} |")

    walk(Settings, "")
    return "\n".join(lines) + "\n"
