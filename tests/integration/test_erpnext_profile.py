"""``pipeline outbox capture --profile erpnext`` on ERPNext-15-shaped tables in a real MariaDB:
the statements Frappe's Document makes (insert: the parent row, then each child; submit: the
parent's update, then each child's; "Save & Submit": the parent inserted already submitted,
before its children) emit the catalogue's typed events with every line, in ERPNext's own
transaction, each payload valid against its schema and the money exact. A rolled-back submit
emits nothing, and lines written in a later transaction never rewrite a committed event."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder
from tests.fixtures.mariadb import MariaDbErp

pytestmark = pytest.mark.integration

# Frappe's standard columns, then a doctype's own: Data/Link/Select varchar(140), Currency and
# Float decimal(21,9) NOT NULL DEFAULT 0, Check int(1), Date date, Text Editor longtext.
STANDARD = ("`name` varchar(140) NOT NULL, `creation` datetime(6) DEFAULT NULL, "
            "`modified` datetime(6) DEFAULT NULL, `modified_by` varchar(140) DEFAULT NULL, "
            "`owner` varchar(140) DEFAULT NULL, `docstatus` int(1) NOT NULL DEFAULT 0, "
            "`idx` int(8) NOT NULL DEFAULT 0, ")
CHILD = ("`parent` varchar(140) DEFAULT NULL, `parentfield` varchar(140) DEFAULT NULL, "
         "`parenttype` varchar(140) DEFAULT NULL, ")
ENGINE = " ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
MONEY = "decimal(21,9) NOT NULL DEFAULT 0.000000000"
TABLES = {
    "tabSales Order": f"""`naming_series` varchar(140) DEFAULT NULL,
        `customer` varchar(140) DEFAULT NULL, `customer_name` varchar(140) DEFAULT NULL,
        `order_type` varchar(140) DEFAULT 'Sales', `amended_from` varchar(140) DEFAULT NULL,
        `company` varchar(140) DEFAULT NULL, `transaction_date` date DEFAULT NULL,
        `delivery_date` date DEFAULT NULL, `currency` varchar(140) DEFAULT NULL,
        `conversion_rate` {MONEY}, `total_qty` {MONEY}, `total` {MONEY}, `net_total` {MONEY},
        `total_taxes_and_charges` {MONEY}, `grand_total` {MONEY}, `rounded_total` {MONEY},
        `terms` longtext DEFAULT NULL, `status` varchar(140) DEFAULT 'Draft',
        `per_delivered` {MONEY}, `per_billed` {MONEY}""",
    "tabSales Order Item": f"""`item_code` varchar(140) DEFAULT NULL,
        `item_name` varchar(140) DEFAULT NULL, `description` longtext DEFAULT NULL,
        `qty` {MONEY}, `stock_uom` varchar(140) DEFAULT NULL, `uom` varchar(140) DEFAULT NULL,
        `conversion_factor` {MONEY}, `stock_qty` {MONEY}, `price_list_rate` {MONEY},
        `rate` {MONEY}, `amount` {MONEY}, `net_rate` {MONEY}, `stock_uom_rate` {MONEY},
        `warehouse` varchar(140) DEFAULT NULL, `delivered_qty` {MONEY}, `billed_amt` {MONEY},
        KEY `parent` (`parent`)""",
    "tabDelivery Note": f"""`customer` varchar(140) DEFAULT NULL,
        `posting_date` date DEFAULT NULL, `is_return` int(1) NOT NULL DEFAULT 0,
        `currency` varchar(140) DEFAULT NULL, `grand_total` {MONEY},
        `transporter` varchar(140) DEFAULT NULL, `transporter_name` varchar(140) DEFAULT NULL,
        `lr_no` varchar(140) DEFAULT NULL, `lr_date` date DEFAULT NULL,
        `status` varchar(140) DEFAULT 'Draft', `amended_from` varchar(140) DEFAULT NULL""",
    "tabDelivery Note Item": f"""`item_code` varchar(140) DEFAULT NULL,
        `qty` {MONEY}, `stock_qty` {MONEY}, `rate` {MONEY}, `stock_uom_rate` {MONEY},
        `against_sales_order` varchar(140) DEFAULT NULL, `so_detail` varchar(140) DEFAULT NULL,
        KEY `parent` (`parent`)""",
    "tabSales Invoice": f"""`customer` varchar(140) DEFAULT NULL,
        `posting_date` date DEFAULT NULL, `due_date` date DEFAULT NULL,
        `is_return` int(1) NOT NULL DEFAULT 0, `currency` varchar(140) DEFAULT NULL,
        `net_total` {MONEY}, `total_taxes_and_charges` {MONEY}, `grand_total` {MONEY},
        `rounded_total` {MONEY}, `outstanding_amount` {MONEY},
        `status` varchar(140) DEFAULT 'Draft'""",
    "tabSales Invoice Item": f"""`item_code` varchar(140) DEFAULT NULL,
        `qty` {MONEY}, `rate` {MONEY}, `amount` {MONEY},
        `sales_order` varchar(140) DEFAULT NULL, `so_detail` varchar(140) DEFAULT NULL,
        `delivery_note` varchar(140) DEFAULT NULL, KEY `parent` (`parent`)""",
    "tabPayment Entry": f"""`payment_type` varchar(140) DEFAULT 'Receive',
        `posting_date` date DEFAULT NULL, `mode_of_payment` varchar(140) DEFAULT NULL,
        `party_type` varchar(140) DEFAULT NULL, `party` varchar(140) DEFAULT NULL,
        `paid_from` varchar(140) DEFAULT NULL, `paid_from_account_currency` varchar(140),
        `paid_to` varchar(140) DEFAULT NULL, `paid_to_account_currency` varchar(140),
        `paid_amount` {MONEY}, `received_amount` {MONEY},
        `reference_no` varchar(140) DEFAULT NULL, `status` varchar(140) DEFAULT 'Draft'""",
    "tabPayment Entry Reference": f"""`reference_doctype` varchar(140) DEFAULT NULL,
        `reference_name` varchar(140) DEFAULT NULL, `total_amount` {MONEY},
        `outstanding_amount` {MONEY}, `allocated_amount` {MONEY}, KEY `parent` (`parent`)""",
    "tabMode of Payment": """`mode_of_payment` varchar(140) DEFAULT NULL,
        `enabled` int(1) NOT NULL DEFAULT 1, `type` varchar(140) DEFAULT NULL""",
    "tabCustomer": """`naming_series` varchar(140) DEFAULT NULL,
        `customer_name` varchar(140) DEFAULT NULL, `customer_type` varchar(140) DEFAULT 'Company',
        `customer_group` varchar(140) DEFAULT NULL, `territory` varchar(140) DEFAULT NULL,
        `default_currency` varchar(140) DEFAULT NULL, `email_id` varchar(140) DEFAULT NULL,
        `mobile_no` varchar(140) DEFAULT NULL,
        `customer_primary_address` varchar(140) DEFAULT NULL,
        `primary_address` text DEFAULT NULL, `disabled` int(1) NOT NULL DEFAULT 0""",
    "tabCustomer Credit Limit": f"""`company` varchar(140) DEFAULT NULL,
        `credit_limit` {MONEY}, `bypass_credit_limit_check` int(1) NOT NULL DEFAULT 0,
        KEY `parent` (`parent`)""",
    "tabAddress": """`address_title` varchar(140) DEFAULT NULL,
        `address_line1` varchar(140) DEFAULT NULL, `city` varchar(140) DEFAULT NULL,
        `country` varchar(140) DEFAULT NULL""",
    "tabCountry": """`country_name` varchar(140) DEFAULT NULL,
        `code` varchar(140) DEFAULT NULL""",
}
CHILDREN = {"tabSales Order Item", "tabDelivery Note Item", "tabSales Invoice Item",
            "tabPayment Entry Reference", "tabCustomer Credit Limit"}
SEED = [
    "INSERT INTO `tabCountry` (name, country_name, code) VALUES ('Germany', 'Germany', 'de')",
    "INSERT INTO `tabMode of Payment` (name, mode_of_payment, type) VALUES "
    "('Wire Transfer', 'Wire Transfer', 'Bank'), ('Cash', 'Cash', 'Cash'), "
    "('Credit Card', 'Credit Card', 'Bank')",
]


def cli(args: list[str], maria: MariaDbErp) -> Result:
    return CliRunner().invoke(main, ["--config", "/dev/null", *args], env={
        "PIPELINE_DATABASE__URL": maria.url, "PIPELINE_DATABASE__SCHEMA_NAME": maria.schema},
        catch_exceptions=False)


@pytest.fixture
def erpnext(maria: MariaDbErp) -> MariaDbErp:
    with maria.admin() as c, c.cursor() as cur:
        for table, cols in TABLES.items():
            std = STANDARD + (CHILD if table in CHILDREN else "")
            cur.execute(f"CREATE TABLE `{table}` ({std}{cols}, PRIMARY KEY (`name`)){ENGINE}")
        for s in SEED:
            cur.execute(s)
    assert cli(["outbox", "install"], maria).exit_code == 0
    return maria


def _capture(maria: MariaDbErp) -> None:
    r = cli(["outbox", "capture", "--profile", "erpnext"], maria)
    assert r.exit_code == 0, r.output
    assert (f"profile erpnext (ERPNext 15 (selling, stock, accounts)): capturing "
            f"{maria.erp}.tabSales Order, {maria.erp}.tabDelivery Note") in r.stdout
    assert ("as order.created, order.cancelled, shipment.created, invoice.issued, "
            "payment.completed, customer.upserted") in r.stdout


def _events(maria: MariaDbErp) -> list[tuple[str, int, str, dict[str, Any], dict[str, Any]]]:
    with maria.admin() as c, c.cursor() as cur:
        cur.execute(f"SELECT aggregate_id, aggregate_version, event_type, payload, headers "
                    f"FROM {maria.schema}.outbox ORDER BY id")
        return [(r[0], int(r[1]), r[2], json.loads(r[3]), json.loads(r[4]))
                for r in cur.fetchall()]


def _valid(events: list[tuple[str, int, str, dict[str, Any], dict[str, Any]]]) -> None:
    encoder = Encoder(Catalogue.load(None))
    for _a, _v, event_type, payload, _h in events:
        encoder.encode(event_type, payload, topic="")  # every event matches its schema


def _sales_order(cur: Any, name: str, docstatus: int, lines: list[tuple[str, str, str]],
                 total: str = "1350.30", amended_from: str | None = None) -> None:
    """Frappe's db_insert of a Sales Order: the parent row, then each item (idx 1..n)."""
    cur.execute(
        "INSERT INTO `tabSales Order` (name, creation, modified, owner, docstatus, "
        "naming_series, customer, customer_name, company, transaction_date, currency, "
        "total_qty, total, net_total, grand_total, terms, status, amended_from) VALUES "
        "(%s, now(6), now(6), 'Administrator', %s, 'SAL-ORD-.YYYY.-', 'CUST-0001', "
        "'Grant Plastics Ltd.', 'Wind Power LLC', curdate(), 'EUR', 3, %s, %s, %s, "
        "'Deliver to dock B', %s, %s)",
        (name, docstatus, total, total, total,
         "To Deliver and Bill" if docstatus == 1 else "Draft", amended_from))
    for idx, (code, qty, rate) in enumerate(lines, 1):
        cur.execute(
            "INSERT INTO `tabSales Order Item` (name, creation, modified, docstatus, idx, "
            "parent, parentfield, parenttype, item_code, item_name, qty, stock_uom, uom, "
            "conversion_factor, stock_qty, rate, amount, net_rate, stock_uom_rate) VALUES "
            "(%s, now(6), now(6), %s, %s, %s, 'items', 'Sales Order', %s, %s, %s, 'Nos', "
            "'Nos', 1, %s, %s, %s * %s, %s, %s)",
            (f"{name}-i{idx}", docstatus, idx, name, code, code, qty, qty, rate, qty, rate,
             rate, rate))


def _submit(cur: Any, table: str, child: str, name: str, to: int = 1) -> None:
    """Frappe's submit (or cancel) of a saved document: db_update() of the parent, then
    update_children(): each child row written again with the new docstatus; then on_submit's
    db_set of the status."""
    cur.execute(f"UPDATE `{table}` SET docstatus = %s, modified = now(6) WHERE name = %s",
                (to, name))
    cur.execute(f"SELECT name FROM `{child}` WHERE parent = %s ORDER BY idx", (name,))
    for (row,) in cur.fetchall():
        cur.execute(f"UPDATE `{child}` SET docstatus = %s, modified = now(6) WHERE name = %s",
                    (to, row))
    cur.execute(f"UPDATE `{table}` SET status = %s WHERE name = %s",
                ("Cancelled" if to == 2 else "Submitted", name))


def test_an_erpnext_order_to_cash_emits_typed_events(erpnext: MariaDbErp) -> None:
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        # a draft order (parent, then items), saved: not an order yet
        _sales_order(cur, "SAL-ORD-2026-00001", 0,
                     [("SKU-DESK", "2.000000000", "450.100000000"),
                      ("SKU-CHAIR", "1.000000000", "449.100000000"),
                      ("SKU-LAMP", "5.000000000", "9.990000000")])
        c.commit()
        assert _events(erpnext) == []
        # edited, then submitted: the lamp line removed and the chair's rate changed in the
        # form; Frappe writes the parent, then the children, then deletes the removed row
        cur.execute("UPDATE `tabSales Order` SET docstatus = 1, grand_total = 1350.30, "
                    "modified = now(6) WHERE name = 'SAL-ORD-2026-00001'")
        cur.execute("UPDATE `tabSales Order Item` SET docstatus = 1 "
                    "WHERE name = 'SAL-ORD-2026-00001-i1'")
        cur.execute("UPDATE `tabSales Order Item` SET docstatus = 1, rate = 450.1, "
                    "stock_uom_rate = 450.1 WHERE name = 'SAL-ORD-2026-00001-i2'")
        cur.execute("DELETE FROM `tabSales Order Item` WHERE parent = 'SAL-ORD-2026-00001' "
                    "AND name NOT IN ('SAL-ORD-2026-00001-i1', 'SAL-ORD-2026-00001-i2')")
        cur.execute("UPDATE `tabSales Order` SET status = 'To Deliver and Bill' "
                    "WHERE name = 'SAL-ORD-2026-00001'")
        c.commit()
        # "Save & Submit" of a new order: the parent inserted with docstatus 1, then its items
        _sales_order(cur, "SAL-ORD-2026-00002", 1,
                     [("SKU-DESK", "3.000000000", "450.000000000"),
                      ("SKU-CHAIR", "12.000000000", "0.250000000")], total="1353.00")
        cur.execute("UPDATE `tabSales Order` SET per_delivered = 0 "
                    "WHERE name = 'SAL-ORD-2026-00002'")
        c.commit()
        # a later transaction changes submitted lines (Update Items): the committed event is
        # not rewritten
        cur.execute("UPDATE `tabSales Order Item` SET stock_qty = 7, qty = 7 "
                    "WHERE name = 'SAL-ORD-2026-00002-i1'")
        c.commit()
        # a delivery made from the order and submitted at once: the parent first (no order
        # known yet), then its items against the order
        cur.execute("INSERT INTO `tabDelivery Note` (name, docstatus, customer, posting_date, "
                    "currency, grand_total, transporter, transporter_name, lr_no, status) VALUES "
                    "('MAT-DN-2026-00001', 1, 'CUST-0001', curdate(), 'EUR', 1350.30, "
                    "'SUP-DHL', 'DHL Express', 'JD0141234567', 'To Bill')")
        for idx, (code, qty) in enumerate([("SKU-DESK", 1), ("SKU-CHAIR", 1), ("SKU-DESK", 1)],
                                          1):
            cur.execute("INSERT INTO `tabDelivery Note Item` (name, docstatus, idx, parent, "
                        "parentfield, parenttype, item_code, qty, stock_qty, "
                        "against_sales_order) VALUES (%s, 1, %s, 'MAT-DN-2026-00001', 'items', "
                        "'Delivery Note', %s, %s, %s, 'SAL-ORD-2026-00001')",
                        (f"dni{idx}", idx, code, qty, qty))
        c.commit()
        # an invoice: a draft saved, then submitted
        cur.execute("INSERT INTO `tabSales Invoice` (name, docstatus, customer, posting_date, "
                    "due_date, currency, net_total, total_taxes_and_charges, grand_total) "
                    "VALUES ('ACC-SINV-2026-00001', 0, 'CUST-0001', '2026-03-01', '2026-03-31', "
                    "'EUR', 1350.30, 256.56, 1606.86)")
        cur.execute("INSERT INTO `tabSales Invoice Item` (name, docstatus, idx, parent, "
                    "parentfield, parenttype, item_code, qty, rate, sales_order) VALUES "
                    "('sii1', 0, 1, 'ACC-SINV-2026-00001', 'items', 'Sales Invoice', "
                    "'SKU-DESK', 2, 450.1, 'SAL-ORD-2026-00001')")
        c.commit()
        _submit(cur, "tabSales Invoice", "tabSales Invoice Item", "ACC-SINV-2026-00001")
        c.commit()
        # a payment received for that invoice, saved and submitted at once
        cur.execute("INSERT INTO `tabPayment Entry` (name, docstatus, payment_type, "
                    "posting_date, mode_of_payment, party_type, party, "
                    "paid_from_account_currency, paid_to_account_currency, paid_amount, "
                    "received_amount) VALUES ('ACC-PAY-2026-00001', 1, 'Receive', curdate(), "
                    "'Wire Transfer', 'Customer', 'CUST-0001', 'EUR', 'EUR', 1606.86, 1606.86)")
        cur.execute("INSERT INTO `tabPayment Entry Reference` (name, docstatus, idx, parent, "
                    "parentfield, parenttype, reference_doctype, reference_name, "
                    "allocated_amount) VALUES ('per1', 1, 1, 'ACC-PAY-2026-00001', "
                    "'references', 'Payment Entry', 'Sales Invoice', 'ACC-SINV-2026-00001', "
                    "1606.86)")
        c.commit()
    events = _events(erpnext)
    assert [(a, v, t) for a, v, t, _p, _h in events] == [
        ("Sales Order:SAL-ORD-2026-00001", 1, "order.created"),
        ("Sales Order:SAL-ORD-2026-00002", 1, "order.created"),
        ("Delivery Note:MAT-DN-2026-00001", 1, "shipment.created"),
        ("Sales Invoice:ACC-SINV-2026-00001", 1, "invoice.issued"),
        ("Payment Entry:ACC-PAY-2026-00001", 1, "payment.completed"),
    ]
    first, second, shipment, invoice, payment = (p for _a, _v, _t, p, _h in events)
    assert first == {**first, "order_id": "SAL-ORD-2026-00001", "customer": "CUST-0001",
                     "currency": "EUR", "total": "1350.30", "note": "Deliver to dock B"}
    assert first["lines"] == [
        {"line_no": 1, "sku": "SKU-DESK", "qty": 2, "unit_price": "450.10"},
        {"line_no": 2, "sku": "SKU-CHAIR", "qty": 1, "unit_price": "450.10"},
    ], "the lines as submitted: the removed line gone, the changed rate in"
    assert second["lines"] == [
        {"line_no": 1, "sku": "SKU-DESK", "qty": 3, "unit_price": "450.00"},
        {"line_no": 2, "sku": "SKU-CHAIR", "qty": 12, "unit_price": "0.25"},
    ], "Save & Submit: the items written after the submitted parent are in, and a later " \
       "transaction's change is not"
    assert second["total"] == "1353.00"
    assert shipment == {**shipment, "shipment_id": "MAT-DN-2026-00001",
                        "order_id": "SAL-ORD-2026-00001", "carrier": "DHL Express",
                        "tracking_number": "JD0141234567",
                        "lines": [{"sku": "SKU-DESK", "qty": 2}, {"sku": "SKU-CHAIR", "qty": 1}]}
    assert invoice == {**invoice, "invoice_id": "ACC-SINV-2026-00001",
                       "order_id": "SAL-ORD-2026-00001", "customer": "CUST-0001",
                       "amount": "1606.86", "tax": "256.56", "currency": "EUR",
                       "due_date": "2026-03-31"}
    assert payment == {**payment, "payment_id": "ACC-PAY-2026-00001",
                       "order_id": "SAL-ORD-2026-00001", "amount": "1606.86",
                       "currency": "EUR", "method": "BANK_TRANSFER"}
    assert events[0][4] == {"erp_profile": "erpnext",
                            "erp_record": "Sales Order,SAL-ORD-2026-00001"}
    assert all(p[k].endswith("+00:00") for p, k in [
        (first, "created_at"), (shipment, "shipped_at"), (invoice, "issued_at"),
        (payment, "completed_at")])
    _valid(events)


def test_cancel_amend_and_rollback(erpnext: MariaDbErp) -> None:
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        _sales_order(cur, "SAL-ORD-2026-00010", 1, [("SKU-DESK", "1.000000000", "100.000000000")],
                     total="100.00")
        c.commit()
        _submit(cur, "tabSales Order", "tabSales Order Item", "SAL-ORD-2026-00010", to=2)
        c.commit()
        # Amend: a new draft named <name>-1, amended_from the cancelled one, then submitted
        _sales_order(cur, "SAL-ORD-2026-00010-1", 0,
                     [("SKU-DESK", "2.000000000", "100.000000000"),
                      ("SKU-LAMP", "1.000000000", "9.990000000")],
                     total="209.99", amended_from="SAL-ORD-2026-00010")
        c.commit()
        _submit(cur, "tabSales Order", "tabSales Order Item", "SAL-ORD-2026-00010-1")
        c.commit()
        # an amendment of the amendment keeps the root's key
        _submit(cur, "tabSales Order", "tabSales Order Item", "SAL-ORD-2026-00010-1", to=2)
        c.commit()
        _sales_order(cur, "SAL-ORD-2026-00010-2", 1, [("SKU-LAMP", "3.000000000", "9.990000000")],
                     total="29.97", amended_from="SAL-ORD-2026-00010-1")
        c.commit()
        # a submit rolled back emits nothing; nor do lines written for that document in the
        # next transaction of the same connection (its pending entry is stale)
        _sales_order(cur, "SAL-ORD-2026-00011", 1, [("SKU-DESK", "1.000000000", "1.000000000")])
        c.rollback()
        cur.execute("INSERT INTO `tabDelivery Note` (name, docstatus, customer) VALUES "
                    "('MAT-DN-2026-00009', 1, 'CUST-0001')")
        c.rollback()
        cur.execute("INSERT INTO `tabDelivery Note Item` (name, docstatus, idx, parent, "
                    "parenttype, item_code, qty, stock_qty, against_sales_order) VALUES "
                    "('x1', 1, 1, 'MAT-DN-2026-00009', 'Delivery Note', 'SKU-DESK', 1, 1, "
                    "'SAL-ORD-2026-00010-2')")
        c.commit()
    events = _events(erpnext)
    key = "Sales Order:SAL-ORD-2026-00010"
    assert [(a, v, t) for a, v, t, _p, _h in events] == [
        (key, 1, "order.created"), (key, 2, "order.cancelled"), (key, 3, "order.created"),
        (key, 4, "order.cancelled"), (key, 5, "order.created")]
    assert events[1][3] == {**events[1][3], "order_id": "SAL-ORD-2026-00010",
                            "reason": "cancelled in ERPNext"}
    amended = events[2][3]
    assert amended["order_id"] == "SAL-ORD-2026-00010-1" and amended["total"] == "209.99"
    assert amended["lines"] == [
        {"line_no": 1, "sku": "SKU-DESK", "qty": 2, "unit_price": "100.00"},
        {"line_no": 2, "sku": "SKU-LAMP", "qty": 1, "unit_price": "9.99"}]
    assert events[2][4] == {"erp_profile": "erpnext",
                            "erp_record": "Sales Order,SAL-ORD-2026-00010-1",
                            "erp_amended_from": "SAL-ORD-2026-00010"}
    assert events[4][3]["order_id"] == "SAL-ORD-2026-00010-2"
    assert events[4][3]["lines"] == [
        {"line_no": 1, "sku": "SKU-LAMP", "qty": 3, "unit_price": "9.99"}]
    _valid(events)


def test_a_customer_written_in_several_statements_is_one_upsert(erpnext: MariaDbErp) -> None:
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        # Customer quick entry: the customer, its credit limit rows, then its address and the
        # customer updated with the primary address
        cur.execute("INSERT INTO `tabCustomer` (name, customer_name, customer_group, territory, "
                    "default_currency, email_id) VALUES ('CUST-0001', 'Grant Plastics Ltd.', "
                    "'Commercial', 'Germany', 'EUR', 'buyer@grant.example')")
        cur.execute("INSERT INTO `tabCustomer Credit Limit` (name, idx, parent, parentfield, "
                    "parenttype, company, credit_limit) VALUES ('ccl1', 1, 'CUST-0001', "
                    "'credit_limits', 'Customer', 'Wind Power LLC', 25000), ('ccl2', 2, "
                    "'CUST-0001', 'credit_limits', 'Customer', 'Other Co', 0)")
        cur.execute("INSERT INTO `tabAddress` (name, address_title, city, country) VALUES "
                    "('CUST-0001-Billing', 'Grant Plastics Ltd.', 'Berlin', 'Germany')")
        cur.execute("UPDATE `tabCustomer` SET customer_primary_address = 'CUST-0001-Billing', "
                    "modified = now(6) WHERE name = 'CUST-0001'")
        c.commit()
        cur.execute("UPDATE `tabCustomer` SET modified = now(6) WHERE name = 'CUST-0001'")
        c.commit()  # nothing the event carries changed: no event
        cur.execute("UPDATE `tabCustomer` SET email_id = NULL WHERE name = 'CUST-0001'")
        c.commit()
    events = _events(erpnext)
    assert [(a, v, t) for a, v, t, _p, _h in events] == [
        ("Customer:CUST-0001", 1, "customer.upserted"),
        ("Customer:CUST-0001", 2, "customer.upserted")]
    first = events[0][3]
    assert first == {**first, "customer_id": "CUST-0001", "name": "Grant Plastics Ltd.",
                     "email": "buyer@grant.example", "country": "DE",
                     "credit_limit": "25000.00", "currency": "EUR"}
    assert events[1][3]["email"] is None
    _valid(events)


def test_money_a_scale_too_fine_is_sent_as_stored(erpnext: MariaDbErp) -> None:
    """decimal(21,9) holds what it holds; the catalogue's total has scale 2. The digits go as
    stored (never through a float, never rounded), and the encoder refuses them naming the
    field, which is what the relay dead-letters, while ERPNext's write succeeded."""
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        _sales_order(cur, "SAL-ORD-2026-00020", 1,
                     [("SKU-BOX", "1.500000000", "0.833333333")], total="1672.462")
        c.commit()
    (_a, _v, event_type, payload, _h), = _events(erpnext)
    assert payload["total"] == "1672.462000000"
    assert payload["lines"] == [{"line_no": 1, "sku": "SKU-BOX", "qty": "1.500000000",
                                 "unit_price": "0.833333333"}]
    encoder = Encoder(Catalogue.load(None))
    with pytest.raises(Exception, match=r"lines\[0\]\.qty"):
        encoder.encode(event_type, payload, topic="")
    payload["lines"][0]["qty"] = 2
    with pytest.raises(Exception, match=r"lines\[0\]\.unit_price"):
        encoder.encode(event_type, payload, topic="")
    payload["lines"][0]["unit_price"] = "0.83"
    with pytest.raises(Exception, match="total"):
        encoder.encode(event_type, payload, topic="")
    payload["total"] = "1672.46"
    encoder.encode(event_type, payload, topic="")


@pytest.mark.parametrize(("change", "message"), [
    ("ALTER TABLE `tabSales Order Item` DROP COLUMN stock_uom_rate",
     ".tabSales Order Item has no column stock_uom_rate (needed for order.created's lines)"),
    ("DROP TABLE `tabPayment Entry Reference`",
     ".tabPayment Entry Reference does not exist (needed for the order of payment.completed)"),
    ("ALTER TABLE `tabDelivery Note` DROP COLUMN lr_no",
     ".tabDelivery Note has no column lr_no (needed for shipment.created)"),
])
def test_a_table_of_another_version_is_refused_before_anything(erpnext: MariaDbErp, change: str,
                                                                message: str) -> None:
    with erpnext.admin() as c, c.cursor() as cur:
        cur.execute(change)
    r = cli(["outbox", "capture", "--profile", "erpnext"], erpnext)
    assert r.exit_code == 2, r.output
    assert message in r.stderr, r.stderr
    assert "profile erpnext (ERPNext 15 (selling, stock, accounts)): table erp_" in r.stderr
    assert erpnext.scalar("SELECT count(*) FROM information_schema.triggers "
                          "WHERE trigger_schema = %s", (erpnext.erp,)) == 0
    assert erpnext.scalar("SELECT count(*) FROM information_schema.routines "
                          "WHERE routine_schema = %s AND routine_name LIKE 'erpnext%%'",
                          (erpnext.schema,)) == 0


def test_drop_and_the_wrong_database(erpnext: MariaDbErp) -> None:
    _capture(erpnext)
    r = cli(["outbox", "capture", "--profile", "odoo"], erpnext)
    assert r.exit_code == 2 and "profile odoo (Odoo 17/18" in r.stderr
    assert "runs on PostgreSQL" in r.stderr
    r = cli(["outbox", "capture", "--profile", "erpnext", "--drop"], erpnext)
    assert r.stdout.strip() == "profile erpnext: triggers removed"
    r = cli(["outbox", "capture", "--profile", "erpnext", "--drop"], erpnext)
    assert r.stdout.strip() == "profile erpnext: no triggers installed; nothing to remove"
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        _sales_order(cur, "SAL-ORD-2026-00030", 1, [("SKU-DESK", "1.000000000", "1.000000000")])
        c.commit()
    assert _events(erpnext) == []


def _delivery(cur: Any, name: str, items: list[tuple[str, str, int]]) -> None:
    """Frappe's Save & Submit of a delivery: the parent (no order known yet), then each item
    (name, sku, qty) against SAL-ORD-2026-00040."""
    cur.execute("INSERT INTO `tabDelivery Note` (name, docstatus, customer, lr_no) VALUES "
                "(%s, 1, 'CUST-0001', 'T1')", (name,))
    for row, code, qty in items:
        _delivery_item(cur, name, row, code, qty)


def _delivery_item(cur: Any, name: str, row: str, code: str, qty: int) -> None:
    cur.execute("INSERT INTO `tabDelivery Note Item` (name, docstatus, idx, parent, parentfield, "
                "parenttype, item_code, qty, stock_qty, against_sales_order) VALUES (%s, 1, 1, "
                "%s, 'items', 'Delivery Note', %s, %s, %s, 'SAL-ORD-2026-00040')",
                (row, name, code, qty, qty))


def test_set_autocommit_commits_and_a_committed_event_is_never_rewritten(
        erpnext: MariaDbErp) -> None:
    """SET autocommit = 1 commits the pending transaction (bumping only Com_set_option); after
    SET autocommit = 0 a child write of that document is a new transaction: the committed row
    is not rewritten, not deleted, and its version is not handed out again."""
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        _delivery(cur, "MAT-DN-2026-00040", [("dn40a", "SKU-DESK", 1)])
        _sales_order(cur, "SAL-ORD-2026-00040", 1, [("SKU-DESK", "1.000000000", "1.000000000")])
        cur.execute("SET autocommit = 1")
        cur.execute("SET autocommit = 0")
        before = _events(erpnext)
        # the delivery's only item removed, another one added; the order's line changed
        cur.execute("DELETE FROM `tabDelivery Note Item` WHERE name = 'dn40a'")
        _delivery_item(cur, "MAT-DN-2026-00040", "dn40b", "SKU-LAMP", 9)
        cur.execute("UPDATE `tabSales Order Item` SET stock_qty = 7 "
                    "WHERE name = 'SAL-ORD-2026-00040-i1'")
        c.commit()
    events = _events(erpnext)
    assert [(a, v, t) for a, v, t, _p, _h in before] == [
        ("Delivery Note:MAT-DN-2026-00040", 1, "shipment.created"),
        ("Sales Order:SAL-ORD-2026-00040", 1, "order.created")]
    assert events == before
    assert erpnext.scalar(f"SELECT version FROM {erpnext.schema}.aggregate_versions "
                          "WHERE aggregate_id = 'Delivery Note:MAT-DN-2026-00040'") == 1


def test_a_pending_row_undone_by_a_savepoint_is_emitted_again(erpnext: MariaDbErp) -> None:
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        _delivery(cur, "MAT-DN-2026-00041", [])
        cur.execute("SAVEPOINT s1")
        _delivery_item(cur, "MAT-DN-2026-00041", "dn41a", "SKU-DESK", 1)  # emits it
        cur.execute("ROLLBACK TO SAVEPOINT s1")  # the item and the outbox row undone
        _delivery_item(cur, "MAT-DN-2026-00041", "dn41b", "SKU-LAMP", 2)
        c.commit()
    events = _events(erpnext)
    assert [(a, v, t) for a, v, t, _p, _h in events] == [
        ("Delivery Note:MAT-DN-2026-00041", 1, "shipment.created")]
    assert events[0][3]["lines"] == [{"sku": "SKU-LAMP", "qty": 2}]
    _valid(events)


def test_a_credit_limit_changed_alone_is_an_upsert(erpnext: MariaDbErp) -> None:
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        cur.execute("INSERT INTO `tabCustomer` (name, customer_name, default_currency) VALUES "
                    "('CUST-0002', 'Acme', 'EUR')")
        cur.execute("INSERT INTO `tabCustomer Credit Limit` (name, idx, parent, parentfield, "
                    "parenttype, company, credit_limit) VALUES ('ccl21', 1, 'CUST-0002', "
                    "'credit_limits', 'Customer', 'A', 25000), ('ccl22', 2, 'CUST-0002', "
                    "'credit_limits', 'Customer', 'B', 0)")
        c.commit()
        # Frappe's save: the customer's row (nothing the event reads changed), then each limit
        cur.execute("UPDATE `tabCustomer` SET modified = now(6) WHERE name = 'CUST-0002'")
        cur.execute("UPDATE `tabCustomer Credit Limit` SET credit_limit = 30000 "
                    "WHERE name = 'ccl21'")
        cur.execute("UPDATE `tabCustomer Credit Limit` SET credit_limit = 20000 "
                    "WHERE name = 'ccl22'")
        c.commit()
    events = _events(erpnext)
    assert [(a, v, t) for a, v, t, _p, _h in events] == [
        ("Customer:CUST-0002", 1, "customer.upserted"),
        ("Customer:CUST-0002", 2, "customer.upserted")]
    assert events[0][3]["credit_limit"] == "25000.00"
    assert events[1][3]["credit_limit"] == "20000.00"
    assert events[1][4] == {"erp_profile": "erpnext", "erp_record": "Customer,CUST-0002"}
    _valid(events)


def test_a_server_without_the_session_counters_is_refused(
        erpnext: MariaDbErp, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.outbox import profiles

    monkeypatch.setattr(profiles, "ERPNEXT_STATUS",
                        (*profiles.ERPNEXT_STATUS, "COM_NO_SUCH_COUNTER"))
    r = cli(["outbox", "capture", "--profile", "erpnext"], erpnext)
    assert r.exit_code == 2, r.output
    assert "the erpnext profile needs MariaDB's session status counters COM_NO_SUCH_COUNTER" \
        in r.stderr, r.stderr
    assert erpnext.scalar("SELECT count(*) FROM information_schema.triggers "
                          "WHERE trigger_schema = %s", (erpnext.erp,)) == 0
    assert erpnext.scalar("SELECT count(*) FROM information_schema.routines "
                          "WHERE routine_schema = %s AND routine_name LIKE 'erpnext%%'",
                          (erpnext.schema,)) == 0


def test_lines_beyond_group_concat_max_len_are_valid_json(erpnext: MariaDbErp) -> None:
    """json_arrayagg stops at group_concat_max_len (1 MiB by default): 6000 lines of long SKUs
    are more, and the payload is still whole (else outbox_emit refused ERPNext's submit)."""
    _capture(erpnext)
    with erpnext.admin(autocommit=False) as c, c.cursor() as cur:
        _sales_order(cur, "SAL-ORD-2026-00050", 0, [])
        cur.execute("INSERT INTO `tabSales Order Item` (name, docstatus, idx, parent, "
                    "parentfield, parenttype, item_code, stock_qty, stock_uom_rate) SELECT "
                    "concat('l', seq), 0, seq, 'SAL-ORD-2026-00050', 'items', 'Sales Order', "
                    "concat('SKU-', lpad(seq, 136, '0')), 1, 1 FROM seq_1_to_6000")
        c.commit()
        cur.execute("UPDATE `tabSales Order` SET docstatus = 1 WHERE name = 'SAL-ORD-2026-00050'")
        c.commit()
    (_a, _v, _t, payload, _h), = _events(erpnext)
    assert len(payload["lines"]) == 6000
    assert payload["lines"][-1]["sku"] == "SKU-" + "6000".rjust(136, "0")
