"""``pipeline outbox capture --profile odoo`` on Odoo-shaped tables in a real PostgreSQL: the
write sequence Odoo's ORM makes (quotation with lines → sent → confirmed → cancelled → reset →
confirmed again, and a confirmation rolled back) emits the catalogue's typed order events, each
one valid against its Avro schema, with the lines assembled at commit and the money exact."""

from __future__ import annotations

import json
from decimal import Decimal

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
INSERT INTO res_currency (name, symbol) VALUES ('EUR', '€');
INSERT INTO res_country (name, code) VALUES ('{"en_US": "Belgium"}', 'BE');
INSERT INTO res_company (name, currency_id) VALUES ('YourCompany', 1);
INSERT INTO res_partner (name, ref, customer_rank) VALUES ('Azure Interior', 'CUST-0042', 1),
    ('No Ref', NULL, 1);
INSERT INTO product_template (name, list_price) VALUES ('{"en_US": "Desk"}', 450.0),
    ('{"en_US": "Chair"}', 120.5);
INSERT INTO product_product (product_tmpl_id, default_code) VALUES (1, 'FURN_0001'), (2, NULL);
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


def _events(url: str) -> list[tuple[str, int, str, dict]]:
    with psycopg.connect(url) as c:
        return [(r[0], r[1], r[2], json.loads(r[3])) for r in c.execute(
            "SELECT aggregate_id, aggregate_version, event_type, payload::text "
            "FROM pipeline.outbox ORDER BY id").fetchall()]


def test_an_odoo_order_lifecycle_emits_typed_events(odoo: str) -> None:
    r = cli(["outbox", "capture", "--profile", "odoo"], odoo)
    assert r.exit_code == 0, r.output
    assert "profile odoo (Odoo 17/18 (sale module)): capturing public.sale_order, " \
        "public.res_partner as order.created, order.cancelled, order.status_changed, " \
        "customer.upserted" in r.stdout
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
    ("DROP TABLE sale_order_line",
     "table public.sale_order_line does not exist (needed for order.created's lines)"),
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
