"""MariaDB URLs and the capture triggers' SQL pieces (pure)."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.mariadb import connect_args, describe, is_mariadb_url
from pipeline.outbox.mariadb import _key_expr, _lit, _row_json, trigger_names


@pytest.mark.parametrize(("url", "yes"), [
    ("mysql://u@h/db", True), ("mariadb://u@h/db", True), ("MySQL://u@h/db", True),
    ("mysql+pymysql://u@h/db", True), ("postgresql://u@h/db", False),
    ("host=/tmp dbname=x", False), ("", False),
])
def test_is_mariadb_url(url: str, yes: bool) -> None:
    assert is_mariadb_url(url) is yes


def test_connect_args_tcp_and_socket() -> None:
    assert connect_args("mysql://erp:p%40ss@db.local:3307/_site1") == {
        "user": "erp", "password": "p@ss", "database": "_site1", "charset": "utf8mb4",
        "host": "db.local", "port": 3307}
    a = connect_args("mariadb://root@localhost/?unix_socket=/run/mysqld/mysqld.sock")
    assert a["unix_socket"] == "/run/mysqld/mysqld.sock" and "host" not in a
    assert a["database"] is None and a["password"] == ""
    assert connect_args("mysql://u@h/d?connect_timeout=7")["connect_timeout"] == 7


def test_unknown_parameter_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown parameter\\(s\\) sslmode for MariaDB"):
        connect_args("mysql://u@h/d?sslmode=require")


def test_describe_hides_the_password() -> None:
    text = describe("mysql://erp:secret@db:3306/erp")
    assert text == "MariaDB at db:3306 (user erp, database erp)"


def test_trigger_sql_pieces() -> None:
    assert _lit("it's \\ here") == "'it''s \\\\ here'"
    assert _key_expr("NEW", ("name",)) == "cast(NEW.`name` AS char)"
    assert _key_expr("OLD", ("a", "b")) == \
        "json_array(cast(OLD.`a` AS char), cast(OLD.`b` AS char))"
    assert _row_json("NEW", [("id", "int"), ("img", "blob")], {"img"}) == \
        "json_object('id', NEW.`id`, 'img', to_base64(NEW.`img`))"
    names = trigger_names("erp.tabSales Order")
    assert [n.rsplit("_", 2)[0] for n in names] == ["pipeline_capture_tabsales_order"] * 3
    assert [n[-4:] for n in names] == ["_ins", "_upd", "_del"]
    assert set(names).isdisjoint(trigger_names("tabSales_Order")), "one table's triggers each"
    long = trigger_names("t" * 100)
    assert all(len(n) <= 64 for n in long) and len(set(long)) == 3


def test_lost_connections_are_told_from_setup_mistakes() -> None:
    import pymysql

    from pipeline.mariadb import is_lost

    assert is_lost(pymysql.err.OperationalError(2013, "Lost connection to server"))
    assert is_lost(pymysql.err.OperationalError(1927, "Connection was killed"))
    assert is_lost(pymysql.err.InterfaceError(0, ""))
    assert not is_lost(pymysql.err.OperationalError(1054, "Unknown column 'x'"))
    assert not is_lost(pymysql.err.OperationalError(1142, "command denied"))
    assert not is_lost(pymysql.err.ProgrammingError(1064, "syntax"))


def test_bad_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="port and connect_timeout are numbers"):
        connect_args("mysql://u@h:notaport/d")
