"""Fill in what the configuration leaves unset with embedded servers, for ``pipeline up`` and
``pipeline bench``: a PostgreSQL (the machine's local server in a fresh database, else pgserver)
and a broker (Apache Kafka where Java can run it, else tansu; ``broker`` chooses). What is
configured is used as is and nothing embedded starts for it."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pydantic import SecretStr

from pipeline.config import Settings
from pipeline.embedded.broker import EmbeddedBroker
from pipeline.embedded.postgres import EmbeddedPostgres, admin_url, scratch_database

log = logging.getLogger("pipeline.embedded")


@contextmanager
def local_stack(
    settings: Settings,
    *,
    fresh_database: bool = True,
    data_dir: Path | None = None,
    broker: str | None = None,
    used: dict[str, str] | None = None,
) -> Iterator[Settings]:
    """Settings with ``database.url`` and ``kafka.bootstrap_servers`` filled in; ``used``
    receives what serves as ``database`` and ``broker``, in words, for a banner."""
    used = used if used is not None else {}
    with ExitStack() as stack:
        update_db = settings.database
        if settings.database.url is None:
            admin = admin_url()
            if admin is None:
                base = data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
                pg = EmbeddedPostgres(base / "pg").start()
                stack.callback(pg.stop)
                admin = pg.url
                used["database"] = f"embedded PostgreSQL (pgserver) in {base / 'pg'}"
                log.info("started embedded PostgreSQL (pgserver) in %s", base / "pg")
            else:
                used["database"] = "the local PostgreSQL server"
            url = (
                stack.enter_context(scratch_database(admin, "pipeline_run"))
                if fresh_database
                else admin
            )
            update_db = settings.database.model_copy(update={"url": SecretStr(url)})
            log.info("using a fresh database %s", url.rsplit("/", 1)[-1].split("?")[0])
        update_kafka = settings.kafka
        if not settings.kafka.bootstrap_servers:
            embedded = stack.enter_context(EmbeddedBroker(kind=broker))
            update_kafka = settings.kafka.model_copy(
                update={"bootstrap_servers": embedded.bootstrap}
            )
            what = ("Apache Kafka 4.4.0 (embedded, KRaft)" if embedded.kind == "kafka"
                    else "tansu (embedded, Python-only fallback)")
            used["broker"] = f"{what} on {embedded.bootstrap}"
            log.info("started embedded broker (%s) on %s", embedded.kind, embedded.bootstrap)
        yield settings.model_copy(update={"database": update_db, "kafka": update_kafka})
