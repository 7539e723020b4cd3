"""``pipeline outbox capture --profile odoo`` on Odoo-shaped tables in a real PostgreSQL: the
write sequences Odoo's ORM makes (quotation with lines → sent → confirmed → cancelled → reset →
confirmed again, and a confirmation rolled back; confirmed → delivery reserved → delivered →
invoiced → paid; a cancel releasing the reservation) emit the catalogue's typed events, each one
valid against its Avro schema, assembled at commit and with the money exact."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Encoder

pytestmark = pytest.mark.integration

# The columns the profile reads, typed as Odoo 17's ORM creates them (id serial, Char/Selection
# varchar, Many2one int4 with a foreign key, Monetary and Float-with-digits numeric, Datetime
# timestamp without time zone, Html text, translatable Char jsonb), plus neighbours it ignores.
ODOO_TABLES = """
CREATE TABLE res_currency (id serial PRIMARY KEY, name varchar NOT NULL, symbol varchar NOT NULL,
    rounding numeric, decimal_places int4, active bool, create_date timestamp,
    write_date timestamp);
CREATE TABLE res_country (id serial PRIMARY KEY, name jsonb NOT NULL, code varchar(2) NOT NULL);
CREATE TABLE res_company (id serial PRIMARY KEY, name varchar NOT NULL,
    currency_id int4 NOT NULL REFERENCES res_currency(id));
CREATE TABLE res_partner (id serial PRIMARY KEY, name varchar, ref varchar, email varchar,
    country_id int4 REFERENCES res_country(id), customer_rank int4, supplier_rank int4,
    company_id int4 REFERENCES res_company(id), active bool, create_date timestamp,
    write_date timestamp);
CREATE TABLE product_template (id serial PRIMARY KEY, name jsonb NOT NULL, list_price numeric,
    active bool);
CREATE TABLE product_product (id serial PRIMARY KEY,
    product_tmpl_id int4 NOT NULL REFERENCES product_template(id), default_code varchar,
    active bool, create_date timestamp, write_date timestamp);
CREATE TABLE sale_order (id serial PRIMARY KEY, name varchar NOT NULL, state varchar,
    partner_id int4 NOT NULL REFERENCES res_partner(id),
    currency_id int4 REFERENCES res_currency(id), amount_untaxed numeric, amount_tax numeric,
    amount_total numeric, date_order timestamp NOT NULL, note text, locked bool,
    company_id int4 NOT NULL, create_date timestamp, write_date timestamp,
    CONSTRAINT sale_order_date_order_conditional_required
        CHECK ((state = 'sale' AND date_order IS NOT NULL) OR state != 'sale'));
CREATE TABLE sale_order_line (id serial PRIMARY KEY,
    order_id int4 NOT NULL REFERENCES sale_order(id) ON DELETE CASCADE, sequence int4,
    name text NOT NULL, display_type varchar, product_id int4 REFERENCES product_product(id),
    product_uom_qty numeric NOT NULL, price_unit numeric NOT NULL, price_subtotal numeric,
    create_date timestamp, write_date timestamp);
CREATE TABLE procurement_group (id serial PRIMARY KEY, name varchar NOT NULL,
    move_type varchar NOT NULL, sale_id int4 REFERENCES sale_order(id), partner_id int4);
CREATE TABLE stock_location (id serial PRIMARY KEY, name varchar NOT NULL, complete_name varchar,
    usage varchar NOT NULL, location_id int4 REFERENCES stock_location(id), warehouse_id int4,
    company_id int4, active bool);
CREATE TABLE stock_warehouse (id serial PRIMARY KEY, name varchar NOT NULL,
    code varchar(5) NOT NULL, company_id int4 NOT NULL,
    view_location_id int4 NOT NULL REFERENCES stock_location(id),
    lot_stock_id int4 NOT NULL REFERENCES stock_location(id), reception_steps varchar NOT NULL,
    delivery_steps varchar NOT NULL, active bool);
CREATE TABLE stock_picking_type (id serial PRIMARY KEY, name jsonb NOT NULL,
    code varchar NOT NULL, sequence_code varchar NOT NULL,
    warehouse_id int4 REFERENCES stock_warehouse(id), company_id int4 NOT NULL,
    default_location_src_id int4 NOT NULL, default_location_dest_id int4 NOT NULL,
    reservation_method varchar NOT NULL, create_backorder varchar NOT NULL, active bool);
CREATE TABLE delivery_carrier (id serial PRIMARY KEY, name jsonb NOT NULL,
    delivery_type varchar NOT NULL, product_id int4 NOT NULL, active bool);
CREATE TABLE stock_picking (id serial PRIMARY KEY, name varchar, origin varchar, state varchar,
    picking_type_id int4 NOT NULL REFERENCES stock_picking_type(id),
    location_id int4 NOT NULL REFERENCES stock_location(id),
    location_dest_id int4 NOT NULL REFERENCES stock_location(id), move_type varchar NOT NULL,
    partner_id int4 REFERENCES res_partner(id), company_id int4,
    group_id int4 REFERENCES procurement_group(id), sale_id int4 REFERENCES sale_order(id),
    scheduled_date timestamp NOT NULL, date_done timestamp,
    carrier_id int4 REFERENCES delivery_carrier(id), carrier_tracking_ref varchar,
    create_date timestamp, write_date timestamp);
CREATE TABLE stock_move (id serial PRIMARY KEY, name varchar NOT NULL, sequence int4,
    state varchar, product_id int4 NOT NULL REFERENCES product_product(id),
    product_uom_qty numeric NOT NULL, product_qty numeric, quantity numeric,
    product_uom int4 NOT NULL, location_id int4 NOT NULL REFERENCES stock_location(id),
    location_dest_id int4 NOT NULL REFERENCES stock_location(id),
    picking_id int4 REFERENCES stock_picking(id), picking_type_id int4,
    sale_line_id int4 REFERENCES sale_order_line(id), group_id int4, company_id int4 NOT NULL,
    date timestamp NOT NULL, procure_method varchar NOT NULL, picked bool, reference varchar);
CREATE TABLE stock_move_line (id serial PRIMARY KEY, move_id int4 REFERENCES stock_move(id),
    picking_id int4 REFERENCES stock_picking(id), company_id int4 NOT NULL,
    product_id int4 REFERENCES product_product(id) ON DELETE CASCADE,
    product_uom_id int4 NOT NULL, quantity numeric, quantity_product_uom numeric, picked bool,
    location_id int4 NOT NULL REFERENCES stock_location(id),
    location_dest_id int4 NOT NULL REFERENCES stock_location(id), lot_id int4, package_id int4,
    state varchar, reference varchar, date timestamp NOT NULL);
CREATE TABLE stock_quant (id serial PRIMARY KEY, product_id int4 NOT NULL,
    location_id int4 NOT NULL, company_id int4, lot_id int4, quantity numeric,
    reserved_quantity numeric NOT NULL, in_date timestamp);
CREATE TABLE account_journal (id serial PRIMARY KEY, name jsonb NOT NULL, code varchar NOT NULL,
    type varchar NOT NULL, company_id int4 NOT NULL, currency_id int4);
CREATE TABLE account_account (id serial PRIMARY KEY, name jsonb NOT NULL,
    code varchar(64) NOT NULL, account_type varchar NOT NULL, company_id int4 NOT NULL);
CREATE TABLE account_move (id serial PRIMARY KEY, name varchar, ref varchar,
    state varchar NOT NULL, move_type varchar NOT NULL, date date NOT NULL,
    journal_id int4 NOT NULL REFERENCES account_journal(id), company_id int4,
    partner_id int4 REFERENCES res_partner(id), commercial_partner_id int4,
    currency_id int4 NOT NULL REFERENCES res_currency(id), amount_untaxed numeric,
    amount_tax numeric, amount_total numeric, amount_residual numeric, invoice_date date,
    invoice_date_due date, invoice_origin varchar, payment_state varchar,
    create_date timestamp, write_date timestamp);
CREATE TABLE account_move_line (id serial PRIMARY KEY,
    move_id int4 NOT NULL REFERENCES account_move(id) ON DELETE CASCADE,
    account_id int4 REFERENCES account_account(id), journal_id int4, company_id int4,
    partner_id int4, currency_id int4 NOT NULL, display_type varchar, name varchar,
    product_id int4, quantity numeric, price_unit numeric, debit numeric, credit numeric,
    balance numeric, amount_residual numeric, reconciled bool, date date,
    CONSTRAINT account_move_line_check_accountable_required_fields
        CHECK (coalesce(display_type IN ('line_section', 'line_note'), false)
               OR account_id IS NOT NULL));
CREATE TABLE sale_order_line_invoice_rel (
    order_line_id int4 NOT NULL REFERENCES sale_order_line(id) ON DELETE CASCADE,
    invoice_line_id int4 NOT NULL REFERENCES account_move_line(id) ON DELETE CASCADE,
    PRIMARY KEY (order_line_id, invoice_line_id));
CREATE TABLE account_partial_reconcile (id serial PRIMARY KEY,
    debit_move_id int4 NOT NULL REFERENCES account_move_line(id),
    credit_move_id int4 NOT NULL REFERENCES account_move_line(id), full_reconcile_id int4,
    amount numeric, debit_amount_currency numeric, credit_amount_currency numeric,
    company_id int4, max_date date);
CREATE TABLE account_payment_method (id serial PRIMARY KEY, name varchar NOT NULL,
    code varchar NOT NULL, payment_type varchar NOT NULL);
CREATE TABLE account_payment_method_line (id serial PRIMARY KEY, name varchar,
    payment_method_id int4 NOT NULL REFERENCES account_payment_method(id), journal_id int4,
    sequence int4);
CREATE TABLE payment_transaction (id serial PRIMARY KEY, reference varchar NOT NULL,
    provider_id int4 NOT NULL, amount numeric NOT NULL, currency_id int4 NOT NULL,
    partner_id int4 NOT NULL, state varchar NOT NULL);
CREATE TABLE sale_order_transaction_rel (
    sale_order_id int4 NOT NULL REFERENCES sale_order(id) ON DELETE CASCADE,
    transaction_id int4 NOT NULL REFERENCES payment_transaction(id) ON DELETE CASCADE,
    PRIMARY KEY (sale_order_id, transaction_id));
CREATE TABLE account_payment (id serial PRIMARY KEY,
    move_id int4 NOT NULL REFERENCES account_move(id) ON DELETE CASCADE,
    payment_type varchar NOT NULL, partner_type varchar NOT NULL, amount numeric,
    currency_id int4 REFERENCES res_currency(id), partner_id int4 REFERENCES res_partner(id),
    payment_method_line_id int4 REFERENCES account_payment_method_line(id),
    payment_transaction_id int4 REFERENCES payment_transaction(id), is_internal_transfer bool,
    destination_account_id int4, outstanding_account_id int4, create_date timestamp,
    write_date timestamp);
INSERT INTO res_currency (name, symbol) VALUES ('EUR', '€');
INSERT INTO res_country (name, code) VALUES ('{"en_US": "Belgium"}', 'BE');
INSERT INTO res_company (name, currency_id) VALUES ('YourCompany', 1);
INSERT INTO res_partner (name, ref, customer_rank) VALUES ('Azure Interior', 'CUST-0042', 1),
    ('No Ref', NULL, 1);
INSERT INTO product_template (name, list_price) VALUES ('{"en_US": "Desk"}', 450.0),
    ('{"en_US": "Chair"}', 120.5);
INSERT INTO product_product (product_tmpl_id, default_code) VALUES (1, 'FURN_0001'), (2, NULL);
INSERT INTO stock_location (name, usage) VALUES ('WH', 'view'), ('Stock', 'internal'),
    ('Customers', 'customer'), ('Vendors', 'supplier');
INSERT INTO stock_warehouse (name, code, company_id, view_location_id, lot_stock_id,
    reception_steps, delivery_steps) VALUES ('YourCompany', 'WH-BE', 1, 1, 2, 'one_step',
    'ship_only');
UPDATE stock_location SET warehouse_id = 1 WHERE id IN (1, 2);
INSERT INTO stock_picking_type (name, code, sequence_code, warehouse_id, company_id,
    default_location_src_id, default_location_dest_id, reservation_method, create_backorder)
    VALUES ('{"en_US": "Receipts"}', 'incoming', 'IN', 1, 1, 4, 2, 'at_confirm', 'ask'),
           ('{"en_US": "Delivery Orders"}', 'outgoing', 'OUT', 1, 1, 2, 3, 'at_confirm', 'ask');
INSERT INTO delivery_carrier (name, delivery_type, product_id)
    VALUES ('{"en_US": "DHL Express", "fr_BE": "DHL Express"}', 'fixed', 1);
INSERT INTO stock_quant (product_id, location_id, quantity, reserved_quantity)
    VALUES (1, 2, 50, 0), (2, 2, 50, 0);
INSERT INTO account_journal (name, code, type, company_id) VALUES
    ('{"en_US": "Customer Invoices"}', 'INV', 'sale', 1), ('{"en_US": "Bank"}', 'BNK1', 'bank', 1),
    ('{"en_US": "Cash"}', 'CSH1', 'cash', 1), ('{"en_US": "Vendor Bills"}', 'BILL', 'purchase', 1);
INSERT INTO account_account (name, code, account_type, company_id) VALUES
    ('{"en_US": "Account Receivable"}', '121000', 'asset_receivable', 1),
    ('{"en_US": "Product Sales"}', '400000', 'income', 1),
    ('{"en_US": "Tax Received"}', '251000', 'liability_current', 1),
    ('{"en_US": "Outstanding Receipts"}', '101402', 'asset_current', 1);
INSERT INTO account_payment_method (name, code, payment_type) VALUES
    ('Manual Payment', 'manual', 'inbound'), ('Stripe', 'stripe', 'inbound');
INSERT INTO account_payment_method_line (name, payment_method_id, journal_id) VALUES
    ('Manual Payment', 1, 2), ('Stripe', 2, 2), ('Manual Payment', 1, 3);
"""


def cli(args: list[str], url: str) -> Result:
    return CliRunner().invoke(main, ["--config", "/dev/null", *args],
                              env={"PIPELINE_DATABASE__URL": url}, catch_exceptions=False)


@pytest.fixture
def odoo(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute(ODOO_TABLES)
    assert cli(["outbox", "install"], database_url).exit_code == 0
    return database_url


def _quotation(c: psycopg.Connection, name: str, partner: int = 1,
               total: str = "1672.46") -> int:
    """What Odoo's create() of a quotation writes: the order, its lines, then the totals."""
    row = c.execute(
        "INSERT INTO sale_order (name, state, partner_id, currency_id, date_order, company_id, "
        "note, create_date, write_date) VALUES (%s, 'draft', %s, 1, now(), 1, "
        "'<p>Deliver to dock B</p>', now(), now()) RETURNING id", (name, partner)).fetchone()
    assert row is not None
    oid = int(row[0])
    c.execute("INSERT INTO sale_order_line (order_id, sequence, name, display_type, product_id, "
              "product_uom_qty, price_unit, price_subtotal) VALUES "
              "(%s, 10, 'Furniture', 'line_section', NULL, 0, 0, 0), "
              "(%s, 11, 'Desk', NULL, 1, 2.00, 450.10, 900.20), "
              "(%s, 12, 'Chair', NULL, 2, 4, 120.5, 482.00)", (oid, oid, oid))
    c.execute("UPDATE sale_order SET amount_untaxed = 1382.20, amount_tax = 290.26, "
              "amount_total = %s::numeric, write_date = now() WHERE id = %s", (total, oid))
    return oid


def _events(url: str) -> list[tuple[str, int, str, dict[str, Any]]]:
    with psycopg.connect(url) as c:
        return [(r[0], r[1], r[2], json.loads(r[3])) for r in c.execute(
            "SELECT aggregate_id, aggregate_version, event_type, payload::text "
            "FROM pipeline.outbox ORDER BY id").fetchall()]


def test_an_odoo_order_lifecycle_emits_typed_events(odoo: str) -> None:
    r = cli(["outbox", "capture", "--profile", "odoo"], odoo)
    assert r.exit_code == 0, r.output
    assert "profile odoo (Odoo 17/18 (sale, stock, account modules)): capturing " \
        "public.sale_order, public.res_partner, public.stock_picking, public.stock_move_line, " \
        "public.account_move, public.account_partial_reconcile as order.created, " \
        "order.cancelled, order.status_changed, customer.upserted, shipment.created, " \
        "inventory.reserved, inventory.released, invoice.issued, payment.completed" in r.stdout
    with psycopg.connect(odoo) as c:
        # Odoo's cursors run REPEATABLE READ: the triggers run at that commit
        c.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        c.commit()
        oid = _quotation(c, "S00001")
        c.commit()
        c.execute("UPDATE sale_order SET state = 'sent' WHERE id = %s", (oid,))
        c.commit()
        assert _events(odoo) == [], "a quotation is not an order yet"
        # action_confirm: state, the confirmation date and write_date, in several statements
        c.execute("UPDATE sale_order SET state = 'sale', date_order = now() WHERE id = %s",
                  (oid,))
        # the totals recomputed after the state change, in the same transaction
        c.execute("UPDATE sale_order SET locked = false, amount_total = 1700.00, "
                  "write_date = now() WHERE id = %s", (oid,))
        c.commit()
        c.execute("UPDATE sale_order SET state = 'cancel' WHERE id = %s", (oid,))
        c.commit()
        c.execute("UPDATE sale_order SET state = 'draft' WHERE id = %s", (oid,))
        c.commit()
        c.execute("UPDATE sale_order SET state = 'sale' WHERE id = %s", (oid,))
        c.commit()
        c.execute("UPDATE sale_order SET state = 'cancel' WHERE id = %s", (oid,))
        c.commit()
        c.execute("UPDATE sale_order SET state = 'draft' WHERE id = %s", (oid,))
        c.commit()
        c.execute("UPDATE sale_order SET state = 'cancel' WHERE id = %s", (oid,))  # from draft
        c.commit()
        # a confirmation rolled back leaves nothing
        other = _quotation(c, "S00002", partner=2)
        c.commit()
        c.execute("UPDATE sale_order SET state = 'sale' WHERE id = %s", (other,))
        c.rollback()
    events = _events(odoo)
    assert [(a, v, t) for a, v, t, _p in events] == [
        (f"sale.order:{oid}", 1, "order.created"),
        (f"sale.order:{oid}", 2, "order.cancelled"),
        (f"sale.order:{oid}", 3, "order.status_changed"),
        (f"sale.order:{oid}", 4, "order.status_changed"),
        (f"sale.order:{oid}", 5, "order.cancelled"),
        (f"sale.order:{oid}", 6, "order.status_changed"),
        (f"sale.order:{oid}", 7, "order.cancelled"),
    ]
    created = events[0][3]
    assert created["order_id"] == "S00001" and created["customer"] == "CUST-0042"
    assert created["currency"] == "EUR"
    assert created["total"] == "1700.00", "the header as it is at commit"
    assert created["note"] == "<p>Deliver to dock B</p>"
    assert created["lines"] == [
        {"line_no": 1, "sku": "FURN_0001", "qty": 2, "unit_price": "450.10"},
        {"line_no": 2, "sku": "product.product:2", "qty": 4, "unit_price": "120.5"},
    ], "the section line is not an order line; whole quantities are integers"
    assert created["created_at"].endswith("+00:00")
    assert (events[2][3]["from_status"], events[2][3]["to_status"]) == ("CANCELLED", "DRAFT")
    assert (events[3][3]["from_status"], events[3][3]["to_status"]) == ("DRAFT", "CONFIRMED")
    encoder = Encoder(Catalogue.load(None))
    for _a, _v, event_type, payload in events:
        encoder.encode(event_type, payload, topic="")  # every event matches its schema


def test_the_total_keeps_its_digits_and_a_scale_too_fine_is_refused_by_the_relay(
        odoo: str) -> None:
    """The catalogue's total has scale 2; Odoo's numeric holds what it holds. The trigger sends
    the digits as stored (never rounding the ERP's money): 1672.462 is refused by the encoder
    naming the field, which is what the relay dead-letters, while Odoo's write succeeded."""
    assert cli(["outbox", "capture", "--profile", "odoo"], odoo).exit_code == 0
    with psycopg.connect(odoo) as c:
        oid = _quotation(c, "S00009", total="1672.462")
        c.execute("UPDATE sale_order SET state = 'sale' WHERE id = %s", (oid,))
        c.commit()
    (_a, _v, event_type, payload), = _events(odoo)
    assert payload["total"] == "1672.462"
    with pytest.raises(Exception, match="total"):
        Encoder(Catalogue.load(None)).encode(event_type, payload, topic="")
    payload["total"] = str(Decimal("1672.46"))
    Encoder(Catalogue.load(None)).encode(event_type, payload, topic="")


def test_a_customer_written_in_several_statements_is_one_upsert(odoo: str) -> None:
    assert cli(["outbox", "capture", "--profile", "odoo"], odoo).exit_code == 0
    with psycopg.connect(odoo) as c:
        # what res.partner create() + the rank bump of a first sale order look like
        row = c.execute("INSERT INTO res_partner (name, email, country_id, company_id, "
                        "customer_rank, write_date) VALUES ('Deco Addict', 'deco@example.com', "
                        "1, 1, 0, now()) RETURNING id").fetchone()
        assert row is not None
        c.execute("UPDATE res_partner SET customer_rank = 1 WHERE id = %s", row)
        c.execute("UPDATE res_partner SET ref = 'CUST-0077', write_date = now() WHERE id = %s",
                  row)
        c.commit()
        # a vendor (not a customer) emits nothing
        c.execute("INSERT INTO res_partner (name, customer_rank, supplier_rank) "
                  "VALUES ('Wood Corner', 0, 1)")
        c.commit()
        c.execute("UPDATE res_partner SET email = 'sales@deco.example' WHERE id = %s", row)
        c.commit()
    events = _events(odoo)
    key = f"res.partner:{row[0]}"  # the record, whatever its ref: set in the first transaction
    assert [(a, v, t) for a, v, t, _p in events] == [
        (key, 1, "customer.upserted"), (key, 2, "customer.upserted")]
    first = events[0][3]
    assert first == {**first, "customer_id": "CUST-0077", "name": "Deco Addict",
                     "email": "deco@example.com", "country": "BE", "currency": "EUR",
                     "credit_limit": None}
    assert events[1][3]["email"] == "sales@deco.example"
    encoder = Encoder(Catalogue.load(None))
    for _a, _v, event_type, payload in events:
        encoder.encode(event_type, payload, topic="")


@pytest.mark.parametrize(("change", "message"), [
    ("ALTER TABLE sale_order DROP COLUMN currency_id",
     "table public.sale_order has no column currency_id (needed for order.created / "
     "cancelled / status_changed); another version of the ERP?"),
    ("DROP TABLE sale_order_line CASCADE",
     "table public.sale_order_line does not exist (needed for order.created's lines"),
    ("ALTER TABLE stock_move_line DROP COLUMN quantity_product_uom",
     "table public.stock_move_line has no column quantity_product_uom (needed for "
     "inventory.reserved / released and shipment.created's lines); another version of the ERP?"),
    ("ALTER TABLE account_payment DROP COLUMN payment_type",
     "table public.account_payment has no column payment_type (needed for payment.completed)"),
])
def test_a_table_of_another_version_is_refused_with_the_column(odoo: str, change: str,
                                                               message: str) -> None:
    with psycopg.connect(odoo, autocommit=True) as c:
        c.execute(change)
    r = cli(["outbox", "capture", "--profile", "odoo"], odoo)
    assert r.exit_code == 2, r.output
    assert message in r.stderr, r.stderr
    with psycopg.connect(odoo) as c:
        assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pipeline_odoo%'"
                         ).fetchone() == (0,), "nothing was installed"


def test_unknown_profile_and_drop(odoo: str) -> None:
    r = cli(["outbox", "capture", "--profile", "sap"], odoo)
    assert r.exit_code == 2
    assert "unknown capture profile 'sap': built are odoo" in r.stderr
    assert cli(["outbox", "capture", "--profile", "odoo"], odoo).exit_code == 0
    r = cli(["outbox", "capture", "--profile", "odoo", "--drop"], odoo)
    assert r.stdout.strip() == "profile odoo: triggers removed"
    with psycopg.connect(odoo) as c:
        oid = _quotation(c, "S00003")
        c.execute("UPDATE sale_order SET state = 'sale' WHERE id = %s", (oid,))
        c.commit()
    assert _events(odoo) == []


# --- deliveries, reservations, invoices, payments ------------------------------------------------

TIMES = ("at", "shipped_at", "issued_at", "completed_at")


def _confirm_and_reserve(c: psycopg.Connection, oid: int) -> int:
    """What action_confirm writes with sale_stock and a one-step delivery reserved at
    confirmation, in one transaction: the order's state, its procurement group and delivery, a
    move per order line (draft, then confirmed), then _action_assign: a move line per move
    reserving its quantity, the quants' reserved_quantity, the moves' quantity and state, the
    state stored on the move lines (a related field), the picking's state."""
    c.execute("UPDATE sale_order SET state = 'sale', date_order = now() WHERE id = %s", (oid,))
    row = c.execute("SELECT name FROM sale_order WHERE id = %s", (oid,)).fetchone()
    assert row is not None
    name = row[0]
    row = c.execute("INSERT INTO procurement_group (name, move_type, sale_id) "
                    "VALUES (%s, 'direct', %s) RETURNING id", (name, oid)).fetchone()
    assert row is not None
    gid = row[0]
    row = c.execute(
        "INSERT INTO stock_picking (name, origin, state, picking_type_id, location_id, "
        "location_dest_id, move_type, partner_id, company_id, group_id, sale_id, "
        "scheduled_date) VALUES ('WH/OUT/' || lpad(%s::text, 5, '0'), %s, 'draft', 2, 2, 3, "
        "'direct', 1, 1, %s, %s, now()) RETURNING id", (oid, name, gid, oid)).fetchone()
    assert row is not None
    pid = int(row[0])
    c.execute(
        "INSERT INTO stock_move (name, sequence, state, product_id, product_uom_qty, "
        "product_qty, quantity, product_uom, location_id, location_dest_id, picking_id, "
        "picking_type_id, sale_line_id, group_id, company_id, date, procure_method, reference) "
        "SELECT sl.name, sl.sequence, 'draft', sl.product_id, sl.product_uom_qty, "
        "sl.product_uom_qty, 0, 1, 2, 3, %s, 2, sl.id, %s, 1, now(), 'make_to_stock', 'WH/OUT' "
        "FROM sale_order_line sl WHERE sl.order_id = %s AND sl.display_type IS NULL "
        "ORDER BY sl.sequence", (pid, gid, oid))
    c.execute("UPDATE stock_move SET state = 'confirmed' WHERE picking_id = %s", (pid,))
    c.execute("UPDATE stock_picking SET state = 'confirmed' WHERE id = %s", (pid,))
    c.execute(
        "INSERT INTO stock_move_line (move_id, picking_id, company_id, product_id, "
        "product_uom_id, quantity, quantity_product_uom, picked, location_id, location_dest_id, "
        "state, reference, date) SELECT m.id, m.picking_id, 1, m.product_id, 1, m.product_qty, "
        "m.product_qty, false, 2, 3, m.state, m.reference, now() FROM stock_move m "
        "WHERE m.picking_id = %s ORDER BY m.id", (pid,))
    c.execute("UPDATE stock_quant q SET reserved_quantity = q.reserved_quantity + m.product_qty "
              "FROM stock_move m WHERE m.picking_id = %s AND q.product_id = m.product_id "
              "AND q.location_id = 2", (pid,))
    c.execute("UPDATE stock_move SET quantity = product_qty, state = 'assigned' "
              "WHERE picking_id = %s", (pid,))
    c.execute("UPDATE stock_move_line ml SET state = m.state FROM stock_move m "
              "WHERE m.id = ml.move_id AND m.picking_id = %s", (pid,))
    c.execute("UPDATE stock_picking SET state = 'assigned' WHERE id = %s", (pid,))
    return pid


def _validate(c: psycopg.Connection, pid: int, tracking: str | None = None) -> None:
    """button_validate: the lines picked, the quants moved and unreserved, the moves and their
    lines done, the picking done; stock_delivery's send_to_shipper then sets the carrier's
    tracking number, after the state, in the same transaction."""
    c.execute("UPDATE stock_move_line SET picked = true WHERE picking_id = %s", (pid,))
    c.execute("UPDATE stock_move SET picked = true WHERE picking_id = %s", (pid,))
    c.execute("UPDATE stock_quant q SET quantity = q.quantity - ml.quantity_product_uom, "
              "reserved_quantity = q.reserved_quantity - ml.quantity_product_uom "
              "FROM stock_move_line ml WHERE ml.picking_id = %s "
              "AND q.product_id = ml.product_id AND q.location_id = ml.location_id", (pid,))
    c.execute("UPDATE stock_move SET state = 'done' WHERE picking_id = %s", (pid,))
    c.execute("UPDATE stock_move_line SET state = 'done' WHERE picking_id = %s", (pid,))
    c.execute("UPDATE stock_picking SET state = 'done', date_done = now() WHERE id = %s", (pid,))
    if tracking is not None:
        c.execute("UPDATE stock_picking SET carrier_id = 1, carrier_tracking_ref = %s "
                  "WHERE id = %s", (tracking, pid))


def _invoice(c: psycopg.Connection, oid: int | None, move_type: str = "out_invoice",
             journal: int = 1) -> tuple[int, int]:
    """A draft invoice of the order's lines as _create_invoices writes it (lines linked to the
    order lines by sale_order_line_invoice_rel, the tax and receivable lines, the totals);
    the invoice and its receivable line."""
    row = c.execute(
        "INSERT INTO account_move (name, state, move_type, date, journal_id, company_id, "
        "partner_id, commercial_partner_id, currency_id, invoice_origin, payment_state) "
        "VALUES ('/', 'draft', %s, current_date, %s, 1, 1, 1, 1, "
        "(SELECT name FROM sale_order WHERE id = %s), 'not_paid') RETURNING id",
        (move_type, journal, oid)).fetchone()
    assert row is not None
    mid = int(row[0])
    if oid is not None:
        c.execute(
            "INSERT INTO account_move_line (move_id, account_id, currency_id, display_type, "
            "name, product_id, quantity, price_unit, credit, balance) SELECT %s, 2, 1, "
            "'product', sl.name, sl.product_id, sl.product_uom_qty, sl.price_unit, "
            "sl.price_subtotal, -sl.price_subtotal FROM sale_order_line sl "
            "WHERE sl.order_id = %s AND sl.display_type IS NULL ORDER BY sl.sequence",
            (mid, oid))
        c.execute("INSERT INTO sale_order_line_invoice_rel (order_line_id, invoice_line_id) "
                  "SELECT sl.id, aml.id FROM sale_order_line sl JOIN account_move_line aml "
                  "ON aml.move_id = %s AND aml.product_id = sl.product_id "
                  "WHERE sl.order_id = %s", (mid, oid))
    else:
        c.execute("INSERT INTO account_move_line (move_id, account_id, currency_id, "
                  "display_type, name, quantity, price_unit, credit, balance) VALUES "
                  "(%s, 2, 1, 'product', 'Consulting', 1, 1382.20, 1382.20, -1382.20)", (mid,))
    c.execute("INSERT INTO account_move_line (move_id, account_id, currency_id, display_type, "
              "name, credit, balance) VALUES (%s, 3, 1, 'tax', 'VAT 21%%', 290.26, -290.26)",
              (mid,))
    row = c.execute(
        "INSERT INTO account_move_line (move_id, account_id, currency_id, display_type, name, "
        "debit, balance, amount_residual) VALUES (%s, 1, 1, 'payment_term', '', 1672.46, "
        "1672.46, 1672.46) RETURNING id", (mid,)).fetchone()
    assert row is not None
    c.execute("UPDATE account_move SET amount_untaxed = 1382.20, amount_tax = 290.26, "
              "amount_total = 1672.46, amount_residual = 1672.46 WHERE id = %s", (mid,))
    return mid, int(row[0])


def _post(c: psycopg.Connection, mid: int, name: str) -> None:
    """action_post: the state, the dates, then the number (computed once posted)."""
    c.execute("UPDATE account_move SET state = 'posted', invoice_date = current_date, "
              "invoice_date_due = '2025-07-31' WHERE id = %s", (mid,))
    c.execute("UPDATE account_move SET name = %s WHERE id = %s", (name, mid))


def _reconcile(c: psycopg.Connection, invoice_line: int, payment_line: int) -> None:
    c.execute("INSERT INTO account_partial_reconcile (debit_move_id, credit_move_id, amount, "
              "company_id, max_date) VALUES (%s, %s, 1672.46, 1, current_date)",
              (invoice_line, payment_line))
    c.execute("UPDATE account_move_line SET amount_residual = 0, reconciled = true "
              "WHERE id IN (%s, %s)", (invoice_line, payment_line))
    c.execute("UPDATE account_move SET payment_state = 'paid', amount_residual = 0 "
              "WHERE id = (SELECT move_id FROM account_move_line WHERE id = %s)",
              (invoice_line,))


def _payment(c: psycopg.Connection, name: str, *, journal: int = 2, method_line: int = 1,
             payment_type: str = "inbound", partner_type: str = "customer",
             transaction: int | None = None, reconcile: int | None = None) -> tuple[int, int]:
    """The payment register's writes: the payment's journal entry and the payment (Odoo 17's
    account.payment _inherits account.move), its lines, the posting and its number, then the
    reconciliation with the invoice's receivable line; the payment and its receivable line."""
    row = c.execute("INSERT INTO account_move (name, state, move_type, date, journal_id, "
                    "company_id, partner_id, currency_id) VALUES ('/', 'draft', 'entry', "
                    "current_date, %s, 1, 1, 1) RETURNING id", (journal,)).fetchone()
    assert row is not None
    mid = int(row[0])
    row = c.execute("INSERT INTO account_payment (move_id, payment_type, partner_type, amount, "
                    "currency_id, partner_id, payment_method_line_id, payment_transaction_id) "
                    "VALUES (%s, %s, %s, 1672.46, 1, 1, %s, %s) RETURNING id",
                    (mid, payment_type, partner_type, method_line, transaction)).fetchone()
    assert row is not None
    pay = int(row[0])
    c.execute("INSERT INTO account_move_line (move_id, account_id, currency_id, name, debit, "
              "balance) VALUES (%s, 4, 1, 'Customer Payment', 1672.46, 1672.46)", (mid,))
    row = c.execute("INSERT INTO account_move_line (move_id, account_id, currency_id, name, "
                    "credit, balance, amount_residual) VALUES (%s, 1, 1, 'Customer Payment', "
                    "1672.46, -1672.46, -1672.46) RETURNING id", (mid,)).fetchone()
    assert row is not None
    line = int(row[0])
    c.execute("UPDATE account_move SET state = 'posted' WHERE id = %s", (mid,))
    c.execute("UPDATE account_move SET name = %s WHERE id = %s", (name, mid))
    if reconcile is not None:
        _reconcile(c, reconcile, line)
    return pay, line


def _move_lines(url: str, pid: int) -> list[int]:
    with psycopg.connect(url) as c:
        return [r[0] for r in c.execute("SELECT id FROM stock_move_line WHERE picking_id = %s "
                                        "ORDER BY id", (pid,)).fetchall()]


def _untimed(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload without its moments (checked to be UTC), to compare exactly."""
    for name in TIMES:
        if name in payload:
            assert payload[name].endswith("+00:00"), payload
    return {k: v for k, v in payload.items() if k not in TIMES}


def _valid(events: list[tuple[str, int, str, dict[str, Any]]]) -> None:
    encoder = Encoder(Catalogue.load(None))
    for _a, _v, event_type, payload in events:
        encoder.encode(event_type, payload, topic="")  # every event matches its schema


def _repeatable_read(c: psycopg.Connection) -> None:
    c.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    c.commit()


def test_an_order_reserved_delivered_invoiced_and_paid(odoo: str) -> None:
    assert cli(["outbox", "capture", "--profile", "odoo"], odoo).exit_code == 0
    with psycopg.connect(odoo) as c:
        _repeatable_read(c)
        oid = _quotation(c, "S00010")
        c.commit()
        pid = _confirm_and_reserve(c, oid)
        c.commit()
        _validate(c, pid, tracking="JD014600006281230")
        c.commit()
        inv, receivable = _invoice(c, oid)
        c.commit()
        assert len(_events(odoo)) == 6, "a draft invoice is not issued"
        _post(c, inv, "INV/2025/00001")
        c.commit()
        pay, _line = _payment(c, "PBNK1/2025/00001", reconcile=receivable)
        c.commit()
        row = c.execute("SELECT name, to_char(date_done, 'YYYY-MM-DD\"T\"HH24:MI:SS.US') "
                        "FROM stock_picking WHERE id = %s", (pid,)).fetchone()
        assert row is not None
        picking, done_at = row
        assert c.execute("SELECT count(*) FROM pipeline.odoo_reservation").fetchone() == (0,)
        headers = c.execute("SELECT aggregate_id, headers::text FROM pipeline.outbox "
                            "ORDER BY id").fetchall()
    desk, chair = _move_lines(odoo, pid)
    events = _events(odoo)
    assert [(a, v, t) for a, v, t, _p in events] == [
        (f"sale.order:{oid}", 1, "order.created"),
        (f"stock.move.line:{desk}", 1, "inventory.reserved"),
        (f"stock.move.line:{chair}", 1, "inventory.reserved"),
        (f"stock.move.line:{desk}", 2, "inventory.released"),
        (f"stock.move.line:{chair}", 2, "inventory.released"),
        (f"stock.picking:{pid}", 1, "shipment.created"),
        (f"account.move:{inv}", 1, "invoice.issued"),
        (f"account.payment:{pay}", 1, "payment.completed"),
    ]
    payloads = [_untimed(p) for _a, _v, _t, p in events]
    desk_res = {"reservation_id": f"stock.move.line:{desk}-1", "order_id": "S00010",
                "sku": "FURN_0001", "qty": 2, "warehouse": "WH-BE"}
    chair_res = {"reservation_id": f"stock.move.line:{chair}-1", "order_id": "S00010",
                 "sku": "product.product:2", "qty": 4, "warehouse": "WH-BE"}
    assert payloads[1:5] == [desk_res, chair_res, desk_res, chair_res], \
        "a release names the reservation it ends"
    assert payloads[5] == {
        "shipment_id": picking, "order_id": "S00010", "carrier": "DHL Express",
        "tracking_number": "JD014600006281230",
        "lines": [{"sku": "FURN_0001", "qty": 2}, {"sku": "product.product:2", "qty": 4}],
    }, "the tracking number written after the state is read at commit"
    assert events[5][3]["shipped_at"] == f"{done_at}+00:00"
    assert payloads[6] == {
        "invoice_id": "INV/2025/00001", "order_id": "S00010", "customer": "CUST-0042",
        "amount": "1672.46", "tax": "290.26", "currency": "EUR", "due_date": "2025-07-31",
    }, "the number given after the state is read at commit"
    assert payloads[7] == {"payment_id": "PBNK1/2025/00001", "order_id": "S00010",
                           "amount": "1672.46", "currency": "EUR", "method": "BANK_TRANSFER"}
    records = ["sale.order", "stock.move.line", "stock.move.line", "stock.move.line",
               "stock.move.line", "stock.picking", "account.move", "account.payment"]
    for (aggregate, text), model in zip(headers, records, strict=True):
        assert json.loads(text) == {"erp_profile": "odoo",
                                    "erp_record": aggregate.replace(":", ",")}
        assert aggregate.startswith(model + ":")
    _valid(events)


def test_a_cancel_releases_the_reservation_and_a_changed_quantity_is_a_new_one(
        odoo: str) -> None:
    assert cli(["outbox", "capture", "--profile", "odoo"], odoo).exit_code == 0
    with psycopg.connect(odoo) as c:
        _repeatable_read(c)
        cancelled = _quotation(c, "S00011")
        changed = _quotation(c, "S00012")
        c.commit()
        p1 = _confirm_and_reserve(c, cancelled)
        c.commit()
        p2 = _confirm_and_reserve(c, changed)
        c.commit()
        # action_cancel: the delivery cancelled, its moves unreserved (move lines unlinked,
        # quants released), then the order's state
        c.execute("UPDATE stock_quant q SET reserved_quantity = q.reserved_quantity - "
                  "ml.quantity_product_uom FROM stock_move_line ml WHERE ml.picking_id = %s "
                  "AND q.product_id = ml.product_id AND q.location_id = ml.location_id", (p1,))
        c.execute("DELETE FROM stock_move_line WHERE picking_id = %s", (p1,))
        c.execute("UPDATE stock_move SET quantity = 0, state = 'cancel' WHERE picking_id = %s",
                  (p1,))
        c.execute("UPDATE stock_picking SET state = 'cancel' WHERE id = %s", (p1,))
        c.execute("UPDATE sale_order SET state = 'cancel' WHERE id = %s", (cancelled,))
        c.commit()
    assert _move_lines(odoo, p1) == [], "the cancelled delivery's move lines are gone"
    desk, chair = _move_lines(odoo, p2)
    with psycopg.connect(odoo) as c:
        _repeatable_read(c)
        # Odoo 17: the quantity a user sets on a move line before validating is its reservation
        c.execute("UPDATE stock_move_line SET quantity = 3, quantity_product_uom = 3 "
                  "WHERE id = %s", (chair,))
        c.execute("UPDATE stock_quant SET reserved_quantity = reserved_quantity - 1 "
                  "WHERE product_id = 2 AND location_id = 2")
        c.execute("UPDATE stock_move SET quantity = 3, state = 'partially_available' "
                  "WHERE id = (SELECT move_id FROM stock_move_line WHERE id = %s)", (chair,))
        c.execute("UPDATE stock_move_line SET state = 'partially_available' WHERE id = %s",
                  (chair,))
        c.commit()
        # a statement that changes nothing of the reservation emits nothing
        c.execute("UPDATE stock_move_line SET quantity = 3 WHERE id = %s", (chair,))
        c.commit()
        _validate(c, p2)
        c.commit()
    events = _events(odoo)
    kinds = [(a, v, t) for a, v, t, _p in events]
    with psycopg.connect(odoo) as c:
        gone = [r[0] for r in c.execute(
            "SELECT aggregate_id FROM pipeline.outbox WHERE event_type = 'inventory.released' "
            "AND payload->>'order_id' = 'S00011' ORDER BY id").fetchall()]
    assert len(gone) == 2
    r1, r2 = gone
    assert kinds == [
        (f"sale.order:{cancelled}", 1, "order.created"),
        (r1, 1, "inventory.reserved"), (r2, 1, "inventory.reserved"),
        (f"sale.order:{changed}", 1, "order.created"),
        (f"stock.move.line:{desk}", 1, "inventory.reserved"),
        (f"stock.move.line:{chair}", 1, "inventory.reserved"),
        (r1, 2, "inventory.released"), (r2, 2, "inventory.released"),
        (f"sale.order:{cancelled}", 2, "order.cancelled"),
        (f"stock.move.line:{chair}", 2, "inventory.released"),
        (f"stock.move.line:{chair}", 3, "inventory.reserved"),
        (f"stock.move.line:{desk}", 2, "inventory.released"),
        (f"stock.move.line:{chair}", 4, "inventory.released"),
        (f"stock.picking:{p2}", 1, "shipment.created"),
    ]
    payloads = [_untimed(p) for _a, _v, _t, p in events]
    assert payloads[6] == payloads[1] and payloads[7] == payloads[2]
    assert payloads[6]["order_id"] == "S00011"
    assert payloads[9] == {"reservation_id": f"stock.move.line:{chair}-1", "order_id": "S00012",
                           "sku": "product.product:2", "qty": 4, "warehouse": "WH-BE"}
    assert payloads[10] == {**payloads[9], "reservation_id": f"stock.move.line:{chair}-3",
                            "qty": 3}, "a new reservation, never the released one's id"
    assert payloads[12] == payloads[10]
    assert payloads[13]["lines"] == [{"sku": "FURN_0001", "qty": 2},
                                     {"sku": "product.product:2", "qty": 3}]
    assert (payloads[13]["carrier"], payloads[13]["tracking_number"]) == ("", "")
    _valid(events)


def test_invoices_and_payments_once_and_only_for_orders(odoo: str) -> None:
    assert cli(["outbox", "capture", "--profile", "odoo"], odoo).exit_code == 0
    with psycopg.connect(odoo) as c:
        _repeatable_read(c)
        oid = _quotation(c, "S00020")
        c.commit()
        c.execute("UPDATE sale_order SET state = 'sale' WHERE id = %s", (oid,))
        c.commit()
        inv, receivable = _invoice(c, oid)
        _post(c, inv, "INV/2025/00007")
        c.commit()
        # reset to draft, corrected, posted again: the same invoice, issued once
        c.execute("UPDATE account_move SET state = 'draft' WHERE id = %s", (inv,))
        c.commit()
        c.execute("UPDATE account_move SET state = 'posted' WHERE id = %s", (inv,))
        c.commit()
        # a payment on account settles no order yet: emitted when it is reconciled
        cash, line = _payment(c, "CSH1/2025/00001", journal=3, method_line=3)
        c.commit()
        assert [t for _a, _v, t, _p in _events(odoo)] == ["order.created", "invoice.issued"]
        _reconcile(c, receivable, line)
        c.commit()
        # paid online (a Stripe transaction of the order), before any invoice
        other = _quotation(c, "S00021")
        c.execute("UPDATE sale_order SET state = 'sale' WHERE id = %s", (other,))
        row = c.execute("INSERT INTO payment_transaction (reference, provider_id, amount, "
                        "currency_id, partner_id, state) VALUES ('S00021-1', 1, 1672.46, 1, 1, "
                        "'done') RETURNING id").fetchone()
        assert row is not None
        c.execute("INSERT INTO sale_order_transaction_rel (sale_order_id, transaction_id) "
                  "VALUES (%s, %s)", (other, row[0]))
        card, _l = _payment(c, "PBNK1/2025/00002", method_line=2, transaction=row[0])
        c.commit()
        # not the catalogue's: a vendor bill, a payment to a vendor, an invoice of no order,
        # a posting rolled back
        bill, _r = _invoice(c, None, move_type="in_invoice", journal=4)
        _post(c, bill, "BILL/2025/00001")
        _payment(c, "PBNK1/2025/00003", payment_type="outbound", partner_type="supplier")
        service, _r = _invoice(c, None)
        _post(c, service, "INV/2025/00008")
        c.commit()
        late, _r = _invoice(c, oid)
        c.commit()
        _post(c, late, "INV/2025/00009")
        c.rollback()
    events = _events(odoo)
    assert [(a, v, t) for a, v, t, _p in events] == [
        (f"sale.order:{oid}", 1, "order.created"),
        (f"account.move:{inv}", 1, "invoice.issued"),
        (f"account.payment:{cash}", 1, "payment.completed"),
        (f"sale.order:{other}", 1, "order.created"),
        (f"account.payment:{card}", 1, "payment.completed"),
    ]
    assert _untimed(events[2][3]) == {"payment_id": "CSH1/2025/00001", "order_id": "S00020",
                                      "amount": "1672.46", "currency": "EUR", "method": "CASH"}
    assert _untimed(events[4][3]) == {"payment_id": "PBNK1/2025/00002", "order_id": "S00021",
                                      "amount": "1672.46", "currency": "EUR", "method": "CARD"}
    _valid(events)


def test_without_stock_delivery_and_with_a_fractional_quantity(odoo: str) -> None:
    """An Odoo without stock_delivery has no carrier columns: the profile installs and sends
    empty carrier and tracking. A quantity in kg (1.5) is sent as it is stored: the encoder
    refuses it naming qty (the relay dead-letters it) while Odoo's writes all succeeded."""
    with psycopg.connect(odoo, autocommit=True) as c:
        c.execute("ALTER TABLE stock_picking DROP COLUMN carrier_id, "
                  "DROP COLUMN carrier_tracking_ref")
    r = cli(["outbox", "capture", "--profile", "odoo"], odoo)
    assert r.exit_code == 0, r.output
    with psycopg.connect(odoo) as c:
        oid = _quotation(c, "S00030")
        c.execute("UPDATE sale_order_line SET product_uom_qty = 1.5 WHERE order_id = %s "
                  "AND product_id = 1", (oid,))
        c.commit()
        pid = _confirm_and_reserve(c, oid)
        c.commit()
        _validate(c, pid)
        c.commit()
    events = _events(odoo)
    reserved = next(p for _a, _v, t, p in events if t == "inventory.reserved")
    assert reserved["qty"] == "1.5"
    with pytest.raises(Exception, match="qty"):
        Encoder(Catalogue.load(None)).encode("inventory.reserved", reserved, topic="")
    shipment = next(p for _a, _v, t, p in events if t == "shipment.created")
    assert (shipment["carrier"], shipment["tracking_number"]) == ("", "")
    assert shipment["lines"] == [{"sku": "FURN_0001", "qty": "1.5"},
                                 {"sku": "product.product:2", "qty": 4}]
