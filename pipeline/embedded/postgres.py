"""PostgreSQL for development and tests: the machine's server when one answers (the
``PIPELINE_TEST_DATABASE_URL`` / 127.0.0.1:5432 convention), else an embedded server from the
``pgserver`` wheel, in a data directory of our own."""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


# Logical decoding for capture engines reading the WAL (and Debezium in ``bench relay --vs
# debezium``): pgserver's default ``replica`` level has none.
_SERVER_OPTIONS = "-c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=20"


class EmbeddedPostgres:
    """A pgserver instance; ``url`` is a libpq URL over its Unix socket, ``tcp_url`` the same
    server on a loopback port (for JDBC clients, which cannot use the socket)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None
        self.port: int | None = None

    def start(self) -> EmbeddedPostgres:
        try:
            with warnings.catch_warnings():
                # platformdirs warns that XDG_RUNTIME_DIR is unset (root on a bare machine)
                # when pgserver asks where its runtime files go; /tmp/runtime-<uid> serves.
                warnings.simplefilter("ignore")
                import pgserver  # type: ignore[attr-defined,unused-ignore]
        except ImportError as exc:
            raise RuntimeError(
                "no PostgreSQL answers and the embedded one needs the pgserver wheel: "
                "pip install 'erp-pipeline[embedded]' (make install does)"
            ) from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(  # type: ignore[attr-defined,unused-ignore]
            self.data_dir, cleanup_mode="stop"
        )
        self._restart_with_options()
        return self

    def _restart_with_options(self) -> None:
        """pgserver starts the server on its socket only (``-h ""``) at ``wal_level=replica``;
        restart it once on the same socket, on a loopback port too, with logical decoding.
        Command-line options, because the command line's ``-h`` outranks postgresql.conf."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined,import-not-found,unused-ignore]
        from pgserver.utils import PostmasterInfo  # type: ignore[attr-defined,import-not-found,unused-ignore]

        info = PostmasterInfo.read_from_pgdata(self.data_dir)
        if info is None or info.socket_dir is None:
            raise RuntimeError(f"embedded PostgreSQL in {self.data_dir} did not start")
        # the same data directory keeps its port, so URLs handed out stay valid over a restart
        port_file = self.data_dir / "pipeline.port"
        port = int(port_file.read_text()) if port_file.exists() else _free_port()
        port_file.write_text(str(port))
        pg_ctl(
            ["-w", "-o", f"-h 127.0.0.1 -p {port} -k {info.socket_dir} {_SERVER_OPTIONS}",
             "-l", str(self.data_dir / "log"), "restart"],
            pgdata=self.data_dir, user=self._server.system_user, timeout=60,
        )
        # pgserver stops the server it knows by its postmaster's pid at cleanup
        self._server._postmaster_info = PostmasterInfo.read_from_pgdata(self.data_dir)
        self.port = port

    @property
    def url(self) -> str:
        # the socket's name carries the port (.s.PGSQL.<port>), which pgserver's URI leaves out
        return f"{self._server.get_uri()}&port={self.port}"

    @property
    def tcp_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin_url() -> str | None:
    """A superuser URL of a server that answers now, or None."""
    url = os.environ.get("PIPELINE_TEST_DATABASE_URL") or LOCAL_SERVER
    return url if reachable(url) else None


def with_database(url: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    params["dbname"] = dbname
    return make_conninfo("", **params)


def create_database(admin: str, prefix: str = "pipeline") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(admin: str, name: str) -> None:
    """Drop ``name`` and its logical replication slots (the WAL engine's, Debezium's), which
    would refuse the drop and keep holding WAL."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", (name,))
        for _ in range(50):
            try:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                             "pg_replication_slots WHERE database = %s", (name,))
                break
            except psycopg.errors.ObjectInUse:  # a terminated backend not gone yet
                time.sleep(0.1)
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextmanager
def scratch_database(admin: str, prefix: str = "pipeline") -> Iterator[str]:
    """A fresh database for the duration of the block, dropped afterwards."""
    name = create_database(admin, prefix)
    try:
        yield with_database(admin, name)
    finally:
        drop_database(admin, name)
