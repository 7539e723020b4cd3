"""Which failures are worth retrying (pure).

    transient  → retry tiers: timeouts, connection errors, HTTP 5xx / 408 / 429, PostgreSQL
                 serialization failures, deadlocks, lost connections, and any error the rules
                 do not know (as Spring Kafka does: unknown errors are retried, then
                 dead-lettered when the tiers are exhausted)
    permanent  → DLQ at once: decode and schema errors, bad payloads, HTTP 4xx

A connector's own ``classify(exc)`` is asked first.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.errors import PermanentError, TransientError

TRANSIENT, PERMANENT = "transient", "permanent"


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def classify(
    exc: BaseException, connector_rule: Callable[[BaseException], str | None] | None = None
) -> str:
    if connector_rule is not None:
        verdict = connector_rule(exc)
        if verdict in (TRANSIENT, PERMANENT):
            return verdict
    if isinstance(exc, PermanentError):
        return PERMANENT
    if isinstance(exc, TransientError):
        return TRANSIENT
    if isinstance(exc, TimeoutError | ConnectionError):
        return TRANSIENT
    status = _http_status(exc)
    if status is not None:
        return TRANSIENT if status >= 500 or status in (408, 425, 429) else PERMANENT
    try:
        import httpx

        if isinstance(exc, httpx.TransportError):  # timeouts, connect errors, protocol errors
            return TRANSIENT
    except ImportError:  # pragma: no cover - httpx is a dependency
        pass
    try:
        import urllib3

        # connection, protocol and timeout errors (a malformed URL is a ValueError: permanent)
        if isinstance(exc, urllib3.exceptions.HTTPError) and not isinstance(exc, ValueError):
            return TRANSIENT
    except ImportError:  # pragma: no cover - urllib3 is a dependency
        pass
    try:
        import psycopg

        if isinstance(
            exc,
            psycopg.errors.SerializationFailure
            | psycopg.errors.DeadlockDetected
            | psycopg.OperationalError,
        ):
            return TRANSIENT
        if isinstance(exc, psycopg.errors.DataError | psycopg.errors.IntegrityError):
            return PERMANENT
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, ValueError | TypeError | KeyError | AttributeError):
        return PERMANENT  # a bug or bad data: retrying cannot fix it
    return TRANSIENT
