"""MariaDB / MySQL as the ERP database (ERPNext's default): URLs, connections, error mapping.

``database.url: mysql://user:password@host:3306/erp`` (or ``mariadb://``; ``?unix_socket=`` for
a local socket). The outbox lives in the database named by ``database.schema_name`` on the same
server (MariaDB's databases are PostgreSQL's schemas): the ERP's triggers and code call
``CALL pipeline.outbox_emit(...)`` in their own transaction.

The driver is PyMySQL: pure Python (Python alone installs it, no C client library to build as
mysqlclient and MariaDB Connector/Python need), maintained, and fast enough for a relay that
moves a batch per round trip.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import pymysql
import pymysql.constants.CLIENT

from pipeline.errors import ConfigError, DatabaseUnavailable

SCHEMES = ("mysql", "mariadb", "mysql+pymysql")


def is_mariadb_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES if "://" in url else False


def connect_args(url: str) -> dict[str, Any]:
    """PyMySQL's connect() arguments from a ``mysql://`` URL."""
    u = urllib.parse.urlsplit(url)
    if u.scheme.lower() not in SCHEMES:
        raise ConfigError(f"not a MariaDB/MySQL URL (mysql://user:pw@host:3306/db): {u.scheme}://…")
    q = dict(urllib.parse.parse_qsl(u.query))
    args: dict[str, Any] = {
        "user": urllib.parse.unquote(u.username or "root"),
        "password": urllib.parse.unquote(u.password or ""),
        "database": urllib.parse.unquote(u.path.lstrip("/")) or None,
        "charset": "utf8mb4",
    }
    if "unix_socket" in q:
        args["unix_socket"] = q.pop("unix_socket")
    else:
        args["host"] = u.hostname or "127.0.0.1"
    unknown = sorted(set(q) - {"connect_timeout"})
    if unknown:
        raise ConfigError(
            f"database.url: unknown parameter(s) {', '.join(unknown)} for MariaDB "
            "(known: unix_socket, connect_timeout)"
        )
    try:
        if "connect_timeout" in q:
            args["connect_timeout"] = int(q["connect_timeout"])
        if "unix_socket" not in args:
            args["port"] = u.port or 3306
    except ValueError as exc:
        raise ConfigError(f"database.url: {exc} (port and connect_timeout are numbers)") from None
    return args


def describe(url: str) -> str:
    """Where a URL points, without its password (for error messages)."""
    a = connect_args(url)
    where = a.get("unix_socket") or f"{a.get('host')}:{a.get('port')}"
    return f"MariaDB at {where} (user {a['user']}, database {a['database'] or '-'})"


def connect(url: str, *, autocommit: bool = True, connect_timeout: float = 5.0,
            multi_statements: bool = False, read_timeout: float | None = None,
            write_timeout: float | None = None,
            session_wait_timeout_s: int | None = None) -> pymysql.connections.Connection[Any]:
    """A connection in UTC (``time_zone = '+00:00'``: the outbox's datetimes are UTC) and READ
    COMMITTED (each statement of the relay sees every commit so far)."""
    args = connect_args(url)
    args.setdefault("connect_timeout", max(1, int(connect_timeout)))
    if multi_statements:
        args["client_flag"] = pymysql.constants.CLIENT.MULTI_STATEMENTS
    settings = "time_zone = '+00:00'"
    if session_wait_timeout_s is not None:
        settings += f", wait_timeout = {int(session_wait_timeout_s)}"
    try:
        conn = pymysql.connect(autocommit=autocommit, init_command=f"SET {settings}",
                               read_timeout=read_timeout, write_timeout=write_timeout, **args)
    except pymysql.err.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to {describe(url)}: {message(exc)}") from exc
    try:
        with conn.cursor() as cur:  # this form works on MariaDB and MySQL alike
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    except BaseException:
        conn.close()
        raise
    return conn


def message(exc: BaseException) -> str:
    """``(2003, "Can't connect …")`` as ``Can't connect … (MariaDB error 2003)``."""
    if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) == 2:
        return f"{exc.args[1]} (MariaDB error {exc.args[0]})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Errors that mean the connection is gone (or never was), or a transient conflict: the
# operation may succeed on a new connection. PyMySQL raises OperationalError for most server
# errors too (an unknown column, access denied, a CHECK failed): those are a bug or a setup
# mistake, and retrying them would hide it.
LOST = (pymysql.err.OperationalError, pymysql.err.InterfaceError)
Error = pymysql.err.Error
# 1053 server shutdown, 1077 normal shutdown, 1152/1158-1161 aborted or broken packets, 1205
# lock wait timeout, 1213 deadlock, 1927 connection killed, 4031 disconnected for inactivity;
# 2000-2999 are the client's own (2003 cannot connect, 2006 gone away, 2013 lost, ...)
_LOST_CODES = {1053, 1077, 1152, 1158, 1159, 1160, 1161, 1205, 1213, 1927, 4031}


def is_lost(exc: BaseException) -> bool:
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    if not isinstance(exc, pymysql.err.OperationalError):
        return False
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    return code in _LOST_CODES or 2000 <= code < 3000 or code == 0
