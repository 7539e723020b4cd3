"""The one place that turns :class:`~pipeline.config.Settings` into librdkafka configuration
dictionaries, and wraps confluent-kafka errors into the pipeline's exception tree."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, ConfigError


def bootstrap_servers(settings: Settings) -> str:
    if not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "kafka.bootstrap_servers is not set: name your cluster "
            "(PIPELINE_KAFKA__BOOTSTRAP_SERVERS=host:9092 or kafka.bootstrap_servers in "
            "pipeline.yaml), or use `pipeline run` which starts an embedded broker"
        )
    return settings.kafka.bootstrap_servers


_quiet: logging.Logger | None = None


def silence_client_logs() -> None:
    """For one-shot commands (``pipeline dlq``): librdkafka's own log lines (a connection
    refused, retried every 50 ms) are dropped; what fails reaches the user as one error."""
    global _quiet
    _quiet = logging.getLogger("pipeline.kafka.librdkafka")
    _quiet.setLevel(logging.CRITICAL + 1)
    _quiet.propagate = False


def common_config(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers(settings),
        "client.id": k.client_id,
        "security.protocol": k.security_protocol,
        "socket.connection.setup.timeout.ms": int(k.request_timeout_s * 1000),
    }
    if _quiet is not None:
        conf["logger"] = _quiet
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
        conf["sasl.username"] = k.sasl_username or ""
        conf["sasl.password"] = k.sasl_password.get_secret_value() if k.sasl_password else ""
    return conf


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, ordered, never-expiring delivery (DESIGN decisions 4 and 5).

    ``message.timeout.ms=0`` makes librdkafka retry a message until it is delivered instead of
    failing it after a deadline: a relay must wait out a broker outage, and an idempotent
    producer that let one message expire could let a later message of the same key overtake it.
    """
    conf = common_config(settings)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "message.timeout.ms": 0,
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500000,
        }
    )
    conf.update(settings.kafka.producer)
    conf.update(overrides)
    return conf


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    conf = common_config(settings)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    conf.update(settings.kafka.consumer)
    conf.update(overrides)
    return conf


def produce(
    producer: Any,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    *,
    headers: Any = None,
    on_delivery: Any = None,
) -> None:
    """``producer.produce`` that waits (serving delivery reports) while the local queue is
    full, instead of raising BufferError."""
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


def admin_config(settings: Settings) -> dict[str, Any]:
    return common_config(settings)


def wrap_kafka_error(err: Any, doing: str) -> BrokerUnavailable:
    """A KafkaError (or KafkaException) as BrokerUnavailable, keeping ``.code``."""
    inner = (
        err.args[0] if hasattr(err, "args") and err.args and hasattr(err.args[0], "code") else err
    )
    code = inner.code() if hasattr(inner, "code") else None
    text = inner.str() if hasattr(inner, "str") else str(inner)
    exc = BrokerUnavailable(f"Kafka error while {doing}: {text}", code=code)
    return exc
