"""The pipeline's one exception tree.

Every error the pipeline raises or wraps descends from :class:`PipelineError`. The first split
decides what happens to an event: a *transient* error is worth retrying (the target or a server
may recover), a *permanent* one is not (the event itself is wrong and goes to a dead-letter topic).

    PipelineError
    ├── ConfigError                  bad or missing configuration; fix the config and restart
    ├── TransientError               retry with backoff
    │   ├── BrokerUnavailable        Kafka cannot be reached / timed out (wraps KafkaError)
    │   ├── DatabaseUnavailable      PostgreSQL cannot be reached (wraps psycopg.OperationalError)
    │   └── RegistryUnavailable      the Schema Registry cannot be reached or failed (5xx)
    └── PermanentError               the event is bad; dead-letter it, never retry
        ├── SchemaError              no schema for an event type, or an invalid schema
        ├── PayloadError             a payload does not match its event type's schema
        ├── PayloadTooLarge          a payload is over the configured hard limit
        └── DecodeError              bytes that cannot be decoded
            └── UnknownSchema        unknown schema id or fingerprint

Foreign errors are wrapped with the original kept as ``__cause__`` (and ``.code`` for Kafka).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error raised by the pipeline."""


class ConfigError(PipelineError):
    """The configuration is invalid; the message lists each offending field."""


class UsageError(ConfigError):
    """A command was given something it cannot use: an unknown group, a malformed filter, an
    offset out of range (exit code 2, like a configuration error)."""


class TransientError(PipelineError):
    """A failure worth retrying: the same operation may succeed later."""


class BrokerUnavailable(TransientError):
    """Kafka is unreachable or did not answer in time."""

    def __init__(self, message: str, code: object | None = None) -> None:
        super().__init__(message)
        self.code = code


class DatabaseUnavailable(TransientError):
    """PostgreSQL is unreachable or the connection broke."""


class RegistryUnavailable(TransientError):
    """The Schema Registry is unreachable or answered with a server error."""


class PermanentError(PipelineError):
    """A failure that retrying cannot fix: the event goes to a dead-letter topic."""


class SchemaError(PermanentError):
    """No usable Avro schema for an event type."""


class PayloadError(PermanentError):
    """A payload does not match its event type's schema."""

    def __init__(self, message: str, *, event_type: str, path: str = "") -> None:
        super().__init__(message)
        self.event_type = event_type
        self.path = path


class PayloadTooLarge(PermanentError):
    """A payload is over the configured hard size limit."""


class DecodeError(PermanentError):
    """Bytes that cannot be decoded into an event."""


class UnknownSchema(DecodeError):
    """The record names a schema (registry id or fingerprint) this reader does not know."""
