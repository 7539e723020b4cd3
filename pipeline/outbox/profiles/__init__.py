"""Capture profiles: triggers on an ERP's own tables that emit the catalogue's typed events
(``pipeline outbox capture --profile NAME``), instead of generic row changes.

A profile names the tables and columns its triggers read; installing checks every one of them
first and refuses, naming the missing table or column and the event that needs it, before any
trigger exists (an ERP of another version must not get a trigger that fails its writes).

Built: ``odoo`` for Odoo 17/18: sales orders (``sale_order`` with ``sale_order_line``,
``product_product``, ``res_partner``, ``res_currency``) → ``order.created`` (lines assembled at
commit), ``order.cancelled``, ``order.status_changed``; customers (``res_partner`` with
``customer_rank`` > 0) → ``customer.upserted``. Not built yet: Odoo's pickings, stock
reservations, invoices and payments, and the ``erpnext`` profile.
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


@dataclass(frozen=True)
class Profile:
    name: str
    erp: str  # what it is for, in messages
    # table -> (columns, what needs them)
    needs: dict[str, tuple[tuple[str, ...], str]]
    # (trigger name, table, columns of UPDATE OF, function)
    triggers: tuple[tuple[str, str, tuple[str, ...], str], ...]
    events: tuple[str, ...]


PROFILES = {
    "odoo": Profile(
        name="odoo",
        erp="Odoo 17/18 (sale module)",
        needs={
            "sale_order": (("id", "name", "state", "partner_id", "currency_id", "amount_total",
                            "date_order", "note"), "order.created / cancelled / status_changed"),
            "sale_order_line": (("id", "order_id", "sequence", "display_type", "product_id",
                                 "product_uom_qty", "price_unit"), "order.created's lines"),
            "product_product": (("id", "default_code"), "order.created's line sku"),
            "res_partner": (("id", "ref", "name", "email", "country_id", "customer_rank",
                             "company_id", "write_date"),
                            "order.created's customer and customer.upserted"),
            "res_currency": (("id", "name"), "order.created's and customer.upserted's currency"),
            "res_country": (("id", "code"), "customer.upserted's country"),
            "res_company": (("id", "currency_id"), "customer.upserted's currency"),
        },
        triggers=(
            ("pipeline_odoo_sale_order", "sale_order", ("state",), "odoo_sale_order"),
            ("pipeline_odoo_res_partner", "res_partner", (), "odoo_res_partner"),
        ),
        events=("order.created", "order.cancelled", "order.status_changed",
                "customer.upserted"),
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


def check(conn: psycopg.Connection[Any], prof: Profile, erp_schema: str) -> None:
    """Refuse, naming what is missing, when the ERP's tables are not what the profile reads."""
    have: dict[str, set[str]] = {}
    for table, column in conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = ANY(%s)", (erp_schema, list(prof.needs)),
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
    check(conn, prof, erp_schema)
    body = resources.files(__package__).joinpath(f"{prof.name}.sql").read_text()
    body = body.replace("{schema}", f'"{schema}"').replace("{erp}", f'"{erp_schema}"')
    with conn.transaction():
        conn.execute(body.encode())
        for trigger, table, columns, function in prof.triggers:
            target = sql.Identifier(erp_schema, table)
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(trigger), target))
            of = (sql.SQL(" OF ") + sql.SQL(", ").join(map(sql.Identifier, columns))
                  if columns else sql.SQL(""))
            conn.execute(sql.SQL(
                "CREATE CONSTRAINT TRIGGER {} AFTER INSERT OR UPDATE{} ON {} "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}()"
            ).format(sql.Identifier(trigger), of, target, sql.Identifier(schema, function)))
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
