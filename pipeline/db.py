"""ERP database connections: the one place that turns configuration into connections (psycopg
for PostgreSQL, PyMySQL for a ``mysql://`` URL: :mod:`pipeline.mariadb`) and their connection
failures into :class:`~pipeline.errors.DatabaseUnavailable`."""

from __future__ import annotations

from typing import Any

import psycopg

from pipeline.config import Settings, mask_url
from pipeline.errors import ConfigError, DatabaseUnavailable


def database_url(settings: Settings) -> str:
    if settings.database.url is None:
        raise ConfigError(
            "database.url is not set: point it at the ERP database "
            "(PIPELINE_DATABASE__URL=postgresql://user@host:5432/erp or database.url in "
            "pipeline.yaml), or use `pipeline up`, which starts an embedded PostgreSQL"
        )
    return settings.database.url.get_secret_value()


def is_mariadb(settings: Settings) -> bool:
    from pipeline.mariadb import is_mariadb_url

    return settings.database.url is not None and is_mariadb_url(
        settings.database.url.get_secret_value())


def connect(
    settings: Settings, *, autocommit: bool = True, **kwargs: Any
) -> Any:
    """A psycopg connection, or a PyMySQL one (multi-statement, UTC) for a ``mysql://`` URL."""
    url = database_url(settings)
    if is_mariadb(settings):
        from pipeline import mariadb

        return mariadb.connect(url, autocommit=autocommit, multi_statements=True,
                               connect_timeout=settings.database.connect_timeout_s)
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=max(1, int(settings.database.connect_timeout_s)),
            application_name=kwargs.pop("application_name", "erp-pipeline"),
            **kwargs,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {mask_url(url)}: {first_line(exc)}"
        ) from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
