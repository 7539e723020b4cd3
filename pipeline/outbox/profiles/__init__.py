"""Capture profiles: triggers on an ERP's own tables that emit the catalogue's typed events
(``pipeline outbox capture --profile NAME``), instead of generic row changes.

A profile names the tables and columns its triggers read; installing checks every one of them
first and refuses, naming the missing table or column and the event that needs it, before any
trigger exists (an ERP of another version must not get a trigger that fails its writes). A
column of an optional module (Odoo's stock_delivery carrier) is read only when it is there:
``{if:table.column}A{else}B{end}`` in the SQL is resolved at install.

Built: ``odoo`` for Odoo 17 (sale, stock with sale_stock, account), each event at the COMMIT
of the Odoo transaction that made it true:

* ``sale_order`` into ``sale`` → ``order.created`` (lines from ``sale_order_line`` assembled at
  commit); cancels → ``order.cancelled``; reset and re-confirmation → ``order.status_changed``;
* ``res_partner`` with ``customer_rank`` > 0 → ``customer.upserted``;
* ``stock_picking`` of an outgoing operation type into ``done`` → ``shipment.created`` (lines from
  the move lines of its done moves, carrier and tracking from stock_delivery when installed);
* ``stock_move_line`` with a quantity on a move ``assigned`` / ``partially_available`` of an
  outgoing picking of an order → ``inventory.reserved``; unlinked, set to 0, its move done or
  cancelled → ``inventory.released`` (a changed quantity: both);
* ``account_move`` of type ``out_invoice`` into ``posted`` → ``invoice.issued`` (once);
* ``account_payment`` inbound from a customer, its move posted, settling an order (reconciled
  with the order's invoice, or paid online for it) → ``payment.completed`` (once).

Not built yet: the ``erpnext`` profile; Odoo 18's own ``account_payment.state`` (a payment
without a journal entry), multi-step deliveries' internal pickings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from pipeline.errors import ConfigError

_SCHEMA = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
# {if:table.column}present{else}absent{end}: an optional module's column
_OPTIONAL = re.compile(r"\{if:(\w+)\.(\w+)\}(.*?)\{else\}(.*?)\{end\}", re.S)


@dataclass(frozen=True)
class Profile:
    name: str
    erp: str  # what it is for, in messages
    # table -> (columns, what needs them)
    needs: dict[str, tuple[tuple[str, ...], str]]
    # (trigger name, table, columns of UPDATE OF, function)
    triggers: tuple[tuple[str, str, tuple[str, ...], str], ...]
    events: tuple[str, ...]
    # the SQL files creating the functions, in order (beside this module)
    sql_files: tuple[str, ...] = ()
    # triggers that fire on DELETE too (the row's end is an event: a reservation unlinked)
    on_delete: frozenset[str] = frozenset()


_ORDER = "order.created / cancelled / status_changed"
_SHIP = "shipment.created"
_RES = "inventory.reserved / released"
_INV = "invoice.issued"
_PAY = "payment.completed"

PROFILES = {
    "odoo": Profile(
        name="odoo",
        erp="Odoo 17/18 (sale, stock, account modules)",
        needs={
            "sale_order": (("id", "name", "state", "partner_id", "currency_id", "amount_total",
                            "date_order", "note"), _ORDER),
            "sale_order_line": (("id", "order_id", "sequence", "display_type", "product_id",
                                 "product_uom_qty", "price_unit"),
                                "order.created's lines and the order of a reservation, "
                                "an invoice, a payment"),
            "product_product": (("id", "default_code"), "the sku of order, shipment and "
                                "reservation lines"),
            "res_partner": (("id", "ref", "name", "email", "country_id", "customer_rank",
                             "company_id", "write_date"),
                            "order.created's customer and customer.upserted"),
            "res_currency": (("id", "name"), "the currency of orders, customers, invoices, "
                             "payments"),
            "res_country": (("id", "code"), "customer.upserted's country"),
            "res_company": (("id", "currency_id"), "customer.upserted's currency"),
            "stock_picking": (("id", "name", "state", "origin", "picking_type_id", "sale_id",
                               "date_done"), f"{_SHIP} and {_RES}"),
            "stock_picking_type": (("id", "code", "warehouse_id"), f"{_SHIP} and {_RES}"),
            "stock_warehouse": (("id", "code"), f"{_RES}'s warehouse"),
            "stock_move": (("id", "state", "picking_id", "sale_line_id"), f"{_SHIP} and {_RES}"),
            "stock_move_line": (("id", "move_id", "product_id", "quantity",
                                 "quantity_product_uom", "state"),
                                f"{_RES} and {_SHIP}'s lines"),
            "account_move": (("id", "name", "state", "move_type", "partner_id", "currency_id",
                              "amount_total", "amount_tax", "invoice_date", "invoice_date_due",
                              "invoice_origin", "date", "journal_id"), f"{_INV} and {_PAY}"),
            "account_move_line": (("id", "move_id"), f"the order of {_INV} and {_PAY}"),
            "sale_order_line_invoice_rel": (("invoice_line_id", "order_line_id"),
                                            f"the order of {_INV} and {_PAY}"),
            "account_partial_reconcile": (("id", "debit_move_id", "credit_move_id"),
                                          f"the order of {_PAY}"),
            "account_payment": (("id", "move_id", "payment_type", "partner_type", "amount",
                                 "currency_id", "payment_method_line_id",
                                 "payment_transaction_id"), _PAY),
            "account_payment_method_line": (("id", "payment_method_id"), f"{_PAY}'s method"),
            "account_payment_method": (("id", "code"), f"{_PAY}'s method"),
            "account_journal": (("id", "type"), f"{_PAY}'s method"),
            "sale_order_transaction_rel": (("sale_order_id", "transaction_id"),
                                           f"the order of an online {_PAY}"),
        },
        triggers=(
            ("pipeline_odoo_sale_order", "sale_order", ("state",), "odoo_sale_order"),
            ("pipeline_odoo_res_partner", "res_partner", (), "odoo_res_partner"),
            ("pipeline_odoo_stock_picking", "stock_picking", ("state",), "odoo_stock_picking"),
            ("pipeline_odoo_stock_move_line", "stock_move_line",
             ("move_id", "product_id", "quantity", "quantity_product_uom", "state"),
             "odoo_stock_move_line"),
            ("pipeline_odoo_account_move", "account_move", ("state",), "odoo_account_move"),
            ("pipeline_odoo_account_partial_reconcile", "account_partial_reconcile",
             ("debit_move_id", "credit_move_id"), "odoo_account_partial_reconcile"),
        ),
        events=("order.created", "order.cancelled", "order.status_changed",
                "customer.upserted", "shipment.created", "inventory.reserved",
                "inventory.released", "invoice.issued", "payment.completed"),
        sql_files=("odoo.sql", "odoo_stock.sql", "odoo_account.sql"),
        on_delete=frozenset({"pipeline_odoo_stock_move_line"}),
    ),
}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown capture profile {name!r}: built are {', '.join(sorted(PROFILES))} "
            "(erpnext is not built yet; capture its tables with --table instead)"
        ) from None


def check(conn: psycopg.Connection[Any], prof: Profile, erp_schema: str,
          optional: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """Refuse, naming what is missing, when the ERP's tables are not what the profile reads;
    the columns found (of the needed tables and of the ``optional`` ones)."""
    have: dict[str, set[str]] = {}
    for table, column in conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = ANY(%s)",
        (erp_schema, [*prof.needs, *optional]),
    ).fetchall():
        have.setdefault(table, set()).add(column)
    for table, (columns, why) in prof.needs.items():
        if table not in have:
            raise ConfigError(
                f"profile {prof.name} ({prof.erp}): table {erp_schema}.{table} does not exist "
                f"(needed for {why}); is this database that ERP, and is its module installed?"
            )
        missing = [c for c in columns if c not in have[table]]
        if missing:
            raise ConfigError(
                f"profile {prof.name} ({prof.erp}): table {erp_schema}.{table} has no column "
                f"{', '.join(missing)} (needed for {why}); another version of the ERP? "
                "Capture the table with --table instead, or tell us its version"
            )
    return have


def install(conn: psycopg.Connection[Any], name: str, schema: str,
            erp_schema: str = "public") -> Profile:
    """Check the ERP's tables, then create the profile's function and triggers, atomically."""
    prof = profile(name)
    if not _SCHEMA.match(erp_schema):
        raise ConfigError(f"--erp-schema {erp_schema!r} is not a schema name (letters, digits, _)")
    fn = conn.execute("SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                      "WHERE n.nspname = %s AND p.proname = 'outbox_emit'", (schema,)).fetchone()
    if fn is None:
        raise ConfigError(
            f"the outbox is not installed in schema {schema!r} of this database: run "
            "`pipeline outbox install` first, then capture"
        )
    files = prof.sql_files or (f"{prof.name}.sql",)
    texts = [resources.files(__package__).joinpath(f).read_text() for f in files]
    optional = tuple({m.group(1) for t in texts for m in _OPTIONAL.finditer(t)})
    have = check(conn, prof, erp_schema, optional)

    def resolve(m: re.Match[str]) -> str:
        return m.group(3) if m.group(2) in have.get(m.group(1), set()) else m.group(4)

    with conn.transaction():
        for text in texts:
            body = _OPTIONAL.sub(resolve, text)
            body = body.replace("{schema}", f'"{schema}"').replace("{erp}", f'"{erp_schema}"')
            conn.execute(body.encode())
        for trigger, table, columns, function in prof.triggers:
            target = sql.Identifier(erp_schema, table)
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(trigger), target))
            of = (sql.SQL(" OF ") + sql.SQL(", ").join(map(sql.Identifier, columns))
                  if columns else sql.SQL(""))
            delete = sql.SQL(" OR DELETE" if trigger in prof.on_delete else "")
            conn.execute(sql.SQL(
                "CREATE CONSTRAINT TRIGGER {} AFTER INSERT OR UPDATE{}{} ON {} "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}()"
            ).format(sql.Identifier(trigger), of, delete, target,
                     sql.Identifier(schema, function)))
    return prof


def drop(conn: psycopg.Connection[Any], name: str, erp_schema: str = "public") -> bool:
    prof = profile(name)
    existed = False
    with conn.transaction():
        for trigger, table, _cols, _fn in prof.triggers:
            if conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = %s AND tgrelid = "
                            "to_regclass(%s)", (trigger, f"{erp_schema}.{table}")).fetchone():
                existed = True
            if conn.execute("SELECT to_regclass(%s)", (f"{erp_schema}.{table}",)).fetchone() \
                    not in (None, (None,)):
                conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(trigger), sql.Identifier(erp_schema, table)))
    return existed
