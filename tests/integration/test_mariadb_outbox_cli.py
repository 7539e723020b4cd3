"""``pipeline outbox install | status | capture`` with ``database.url: mysql://…`` on a real
MariaDB: what an ERPNext operator types, what they see, and that a captured ERP write lands in
the outbox exactly as written (money exact, binary as base64), or fails with the reason."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.outbox.migrations import migrations
from tests.fixtures.mariadb import MariaDbErp

pytestmark = pytest.mark.integration

NOCONF = ["--config", "/dev/null"]

# ERPNext 15's tabSales Order, as Frappe creates it (a subset of its columns, same types):
# name varchar(140) primary key, docstatus int(1), money as decimal(21,9).
SALES_ORDER = """CREATE TABLE `tabSales Order` (
  `name` varchar(140) NOT NULL,
  `creation` datetime(6) DEFAULT NULL,
  `modified` datetime(6) DEFAULT NULL,
  `docstatus` int(1) NOT NULL DEFAULT 0,
  `customer` varchar(140) DEFAULT NULL,
  `transaction_date` date DEFAULT NULL,
  `currency` varchar(140) DEFAULT NULL,
  `grand_total` decimal(21,9) NOT NULL DEFAULT 0.000000000,
  `status` varchar(140) DEFAULT 'Draft',
  `amended_from` varchar(140) DEFAULT NULL,
  `_attachment` blob DEFAULT NULL,
  PRIMARY KEY (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"""


def cli(args: list[str], maria: MariaDbErp, **env: str) -> Result:
    return CliRunner().invoke(main, NOCONF + args, env={
        "PIPELINE_DATABASE__URL": maria.url, "PIPELINE_DATABASE__SCHEMA_NAME": maria.schema,
        **env}, catch_exceptions=False)


def test_install_twice_then_status(maria: MariaDbErp) -> None:
    r = cli(["outbox", "install"], maria)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines() == [
        f"applied migration {m.version:04d}_{m.name} to schema {maria.schema}"
        for m in migrations("migrations_mariadb")
    ]
    r = cli(["outbox", "install"], maria)
    assert r.stdout.strip() == f"outbox schema {maria.schema} is up to date"
    r = cli(["outbox", "status", "--json"], maria)
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["installed_version"] == 1 and st["backlog_rows"] == 0 and st["shards"] == []


def test_status_before_install_says_what_to_run(maria: MariaDbErp) -> None:
    r = cli(["outbox", "status"], maria)
    assert r.exit_code == 1
    assert f"outbox not installed in schema {maria.schema}: run `pipeline outbox install`" \
        in r.stdout


def test_capture_an_erpnext_table_emits_exact_rows(maria: MariaDbErp) -> None:
    assert cli(["outbox", "install"], maria).exit_code == 0
    with maria.admin() as c, c.cursor() as cur:
        cur.execute(SALES_ORDER)
    r = cli(["outbox", "capture", "--table", "tabSales Order", "--aggregate-type", "order",
             "--event-type-prefix", "sales_order"], maria)
    assert r.exit_code == 0, r.output
    assert ("capturing insert, update, delete on tabSales Order as sales_order.created, "
            "sales_order.updated, sales_order.deleted (aggregate order, key name, binary as "
            "base64: _attachment)") in r.stdout
    with maria.admin(autocommit=False) as c, c.cursor() as cur:
        cur.execute("INSERT INTO `tabSales Order` (name, docstatus, customer, grand_total, "
                    "_attachment) VALUES ('SAL-ORD-2026-00001', 0, 'ACME', 1234.567891234, "
                    "x'00ff')")
        cur.execute("UPDATE `tabSales Order` SET docstatus = 1, status = 'To Deliver and Bill'")
        cur.execute("UPDATE `tabSales Order` SET docstatus = 1")  # no change: no event
        c.commit()
        cur.execute("INSERT INTO `tabSales Order` (name) VALUES ('SAL-ORD-2026-00002')")
        c.rollback()  # the ERP's rollback takes its event with it
        cur.execute("DELETE FROM `tabSales Order`")
        c.commit()
        cur.execute(f"SELECT aggregate_id, aggregate_version, event_type, payload "
                    f"FROM {maria.schema}.outbox ORDER BY id")
        rows = cur.fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("SAL-ORD-2026-00001", 1, "sales_order.created"),
        ("SAL-ORD-2026-00001", 2, "sales_order.updated"),
        ("SAL-ORD-2026-00001", 3, "sales_order.deleted"),
    ]
    created = rows[0][3]
    assert '"grand_total": 1234.567891234' in created  # the decimal's digits, not a float
    assert json.loads(created)["row"]["_attachment"] == "AP8="
    updated = json.loads(rows[1][3])
    assert (updated["old_row"]["docstatus"], updated["row"]["docstatus"]) == (0, 1)
    assert json.loads(rows[2][3])["operation"] == "DELETE"

    r = cli(["outbox", "capture", "--table", "tabSales Order", "--drop"], maria)
    assert r.stdout.strip() == "capture trigger on tabSales Order removed"
    with maria.admin() as c, c.cursor() as cur:
        cur.execute("INSERT INTO `tabSales Order` (name) VALUES ('SAL-ORD-2026-00003')")
    assert maria.outbox_count() == 3


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("CREATE TABLE nokey (a int)", ["--table", "nokey"], "has no primary key: name its key"),
    ("CREATE TABLE t (id int PRIMARY KEY, code varchar(9))",
     ["--table", "t", "--key-column", "code"], "key column(s) code of"),
    ("CREATE TABLE t (id int PRIMARY KEY)", ["--table", "t", "--key-column", "nope"],
     "has no column(s) 'nope' (columns: id)"),
    ("", ["--table", "missing"], "does not exist on this server"),
    ("CREATE TABLE t (id int PRIMARY KEY)", ["--table", "t", "--events", "insert,truncate"],
     "MariaDB/MySQL fire no trigger on TRUNCATE TABLE"),
    ("CREATE TABLE t (id int PRIMARY KEY)", ["--table", "t", "--event-type-prefix", "order"],
     "already have a dedicated schema"),
])
def test_capture_refuses_what_would_break_the_erp_writes(maria: MariaDbErp, setup: str,
                                                        args: list[str], message: str) -> None:
    assert cli(["outbox", "install"], maria).exit_code == 0
    if setup:
        with maria.admin() as c, c.cursor() as cur:
            cur.execute(setup)
    r = cli(["outbox", "capture", "--aggregate-type", "order", *args], maria)
    assert r.exit_code == 2, r.output
    assert message in r.stderr, r.stderr


def test_capture_before_install_says_what_to_run(maria: MariaDbErp) -> None:
    with maria.admin() as c, c.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY)")
    r = cli(["outbox", "capture", "--table", "t", "--aggregate-type", "order"], maria)
    assert r.exit_code == 2
    assert "run `pipeline outbox install` first" in r.stderr


def test_unreachable_server_names_it(maria: MariaDbErp, unused_tcp_port: Any = None) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(main, [*NOCONF, "outbox", "status"], env={
        "PIPELINE_DATABASE__URL": f"mysql://erp:secret@127.0.0.1:{port}/erp",
        "PIPELINE_DATABASE__CONNECT_TIMEOUT_S": "2"})
    assert r.exit_code != 0
    assert f"cannot connect to MariaDB at 127.0.0.1:{port} (user erp, database erp)" in r.stderr
    assert "secret" not in r.stderr


def test_bad_url_parameter_is_a_config_error(maria: MariaDbErp) -> None:
    r = CliRunner().invoke(main, [*NOCONF, "outbox", "status"], env={
        "PIPELINE_DATABASE__URL": maria.url.split("?")[0] + "?sslmode=require"})
    assert r.exit_code == 2, r.output
    assert "unknown parameter(s) sslmode for MariaDB" in r.stderr


def test_pipeline_up_says_it_needs_postgresql(maria: MariaDbErp) -> None:
    from pipeline.up import preflight

    problems = preflight(maria.settings("127.0.0.1:1", "t"), ["relay"])
    assert problems and "pipeline up runs on PostgreSQL only" in problems[0]
    assert "run `pipeline outbox install`, `pipeline relay`" in problems[0]
