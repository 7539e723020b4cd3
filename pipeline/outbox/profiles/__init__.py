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

And ``erpnext`` for ERPNext 15 on MariaDB (:func:`install_mariadb`; ``erpnext.sql`` says how
the lines Frappe writes after their document reach the event without a deferred trigger):

* ``tabSales Order`` submitted → ``order.created`` (lines from ``tabSales Order Item``);
  cancelled → ``order.cancelled``; an amendment submitted → ``order.created`` again under the
  key of the first order of its ``amended_from`` chain;
* ``tabDelivery Note`` submitted, not a return, against an order → ``shipment.created``;
* ``tabSales Invoice`` submitted, not a return, of an order → ``invoice.issued``;
* ``tabPayment Entry`` submitted, received from a customer, for an order (or an invoice of one)
  → ``payment.completed``;
* ``tabCustomer`` inserted or changed → ``customer.upserted``, once per transaction.

Not built yet: Odoo 18's own ``account_payment.state`` (a payment without a journal entry),
multi-step deliveries' internal pickings.
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
        if name in MARIADB_PROFILES:
            raise ConfigError(
                f"profile {name} ({MARIADB_PROFILES[name].erp}) runs on MariaDB / MySQL: "
                "point database.url at the ERP's database (mysql://…/<site database>)"
            ) from None
        raise ConfigError(
            f"unknown capture profile {name!r}: built are {', '.join(sorted(PROFILES))} "
            f"(on MariaDB / MySQL: {', '.join(sorted(MARIADB_PROFILES))})"
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
    return _refuse_missing(prof, erp_schema, have)


def _refuse_missing(prof: Profile | MariaDbProfile, erp_schema: str,
                    have: dict[str, set[str]]) -> dict[str, set[str]]:
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


# -- MariaDB / MySQL: ERPNext ----------------------------------------------------------------------
# Frappe's tables: `tab<DocType>`, name varchar(140) the primary key, docstatus int(1) (0 draft,
# 1 submitted, 2 cancelled); child rows carry parent / parenttype / parentfield and idx.
_SO, _SOI = "tabSales Order", "tabSales Order Item"
_DN, _DNI = "tabDelivery Note", "tabDelivery Note Item"
_SI, _SII = "tabSales Invoice", "tabSales Invoice Item"
_PE, _PER = "tabPayment Entry", "tabPayment Entry Reference"
_CU, _CCL = "tabCustomer", "tabCustomer Credit Limit"
_CHILD = ("parent", "parenttype", "idx")


@dataclass(frozen=True)
class Parent:
    """A document's table: the event its submit makes and the trigger's condition on NEW."""

    table: str
    doctype: str
    aggregate_type: str
    event: str | None  # None: customer.upserted on every change of ``watched``
    qualifies: str = "TRUE"  # a condition on NEW besides docstatus
    watched: tuple[str, ...] = ()


@dataclass(frozen=True)
class Child:
    """A child table whose rows the parent's pending event is rebuilt from."""

    table: str
    parent_doctype: str
    watched: tuple[str, ...]  # the columns the payload reads: other changes rebuild nothing


ERPNEXT_PARENTS = (
    Parent(_SO, "Sales Order", "order", "order.created"),
    Parent(_DN, "Delivery Note", "shipment", "shipment.created",
           "coalesce(NEW.is_return, 0) = 0"),
    Parent(_SI, "Sales Invoice", "invoice", "invoice.issued", "coalesce(NEW.is_return, 0) = 0"),
    Parent(_PE, "Payment Entry", "payment", "payment.completed",
           "NEW.payment_type = 'Receive' AND NEW.party_type = 'Customer'"),
    Parent(_CU, "Customer", "customer", None,
           watched=("name", "customer_name", "email_id", "customer_primary_address",
                    "default_currency")),
)
ERPNEXT_CHILDREN = (
    Child(_SOI, "Sales Order", ("item_code", "stock_qty", "stock_uom_rate", *_CHILD)),
    Child(_DNI, "Delivery Note", ("item_code", "stock_qty", "against_sales_order", *_CHILD)),
    Child(_SII, "Sales Invoice", ("sales_order", *_CHILD)),
    Child(_PER, "Payment Entry", ("reference_doctype", "reference_name", *_CHILD)),
    Child(_CCL, "Customer", ("credit_limit", *_CHILD)),
)


@dataclass(frozen=True)
class MariaDbProfile:
    name: str
    erp: str
    needs: dict[str, tuple[tuple[str, ...], str]]
    parents: tuple[Parent, ...]
    children: tuple[Child, ...]
    events: tuple[str, ...]
    sql_file: str

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple([p.table for p in self.parents] + [c.table for c in self.children])


_E_ORDER = "order.created / cancelled"
MARIADB_PROFILES = {
    "erpnext": MariaDbProfile(
        name="erpnext",
        erp="ERPNext 15 (selling, stock, accounts)",
        needs={
            _SO: (("name", "docstatus", "customer", "currency", "grand_total", "terms",
                   "amended_from"), _E_ORDER),
            _SOI: (("name", "parent", "parenttype", "idx", "item_code", "stock_qty",
                    "stock_uom_rate"), "order.created's lines"),
            _DN: (("name", "docstatus", "is_return", "transporter", "transporter_name",
                   "lr_no"), _SHIP),
            _DNI: (("name", "parent", "parenttype", "idx", "item_code", "stock_qty",
                    "against_sales_order"), f"{_SHIP}'s lines and order"),
            _SI: (("name", "docstatus", "is_return", "customer", "currency", "grand_total",
                   "total_taxes_and_charges", "due_date", "posting_date"), _INV),
            _SII: (("name", "parent", "parenttype", "idx", "sales_order"),
                   f"the order of {_INV} and {_PAY}"),
            _PE: (("name", "docstatus", "payment_type", "party_type", "paid_amount",
                   "paid_from_account_currency", "mode_of_payment"), _PAY),
            _PER: (("name", "parent", "parenttype", "idx", "reference_doctype",
                    "reference_name"), f"the order of {_PAY}"),
            "tabMode of Payment": (("name", "type"), f"{_PAY}'s method"),
            _CU: (("name", "customer_name", "email_id", "customer_primary_address",
                   "default_currency"), "customer.upserted"),
            _CCL: (("name", "parent", "parenttype", "idx", "credit_limit"),
                   "customer.upserted's credit_limit"),
            "tabAddress": (("name", "country"), "customer.upserted's country"),
            "tabCountry": (("name", "code"), "customer.upserted's country"),
        },
        parents=ERPNEXT_PARENTS,
        children=ERPNEXT_CHILDREN,
        events=("order.created", "order.cancelled", "shipment.created", "invoice.issued",
                "payment.completed", "customer.upserted"),
        sql_file="erpnext.sql",
    ),
}


def mariadb_profile(name: str) -> MariaDbProfile:
    try:
        return MARIADB_PROFILES[name]
    except KeyError:
        built = ", ".join(sorted(MARIADB_PROFILES))
        if name in PROFILES:
            raise ConfigError(
                f"profile {name} ({PROFILES[name].erp}) runs on PostgreSQL; on MariaDB / MySQL "
                f"the built profiles are {built}") from None
        raise ConfigError(f"unknown capture profile {name!r}: on MariaDB / MySQL built are "
                          f"{built} (on PostgreSQL: {', '.join(sorted(PROFILES))})") from None


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _lit(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _trigger_name(table: str, op: str) -> str:
    # "tabSales Order Item" -> pipeline_erpnext_sales_order_item_ins (64 characters at most)
    slug = table.removeprefix("tab").lower().replace(" ", "_")
    return f"pipeline_erpnext_{slug}"[:59] + f"_{op}"


def _changed(cols: tuple[str, ...]) -> str:
    return " OR ".join(f"NOT (NEW.{_q(c)} <=> OLD.{_q(c)})" for c in cols)


def _parent_triggers(p: Parent, schema: str, erp: str) -> list[tuple[str, str, str]]:
    """(trigger name, event, body) of a document table's triggers."""
    s = _q(schema)
    record = f"concat({_lit(p.doctype + ',')}, NEW.name)"
    headers = f"json_object('erp_profile', 'erpnext', 'erp_record', {record})"
    key = f"concat({_lit(p.doctype + ':')}, NEW.name)"
    if p.event is None:  # a customer: every change that the payload reads
        call = (f"CALL {s}.erpnext_document({_lit(p.doctype)}, NEW.name, 'customer.upserted', "
                f"'upsert', {_lit(p.aggregate_type)}, {key}, {headers})")
        return [(_trigger_name(p.table, "ins"), "INSERT", f"BEGIN {call}; END"),
                (_trigger_name(p.table, "upd"), "UPDATE",
                 f"BEGIN IF {_changed(p.watched)} THEN {call}; END IF; END")]
    if p.table == _SO:
        # An amendment (Cancel, then Amend: a new order named <name>-1, amended_from the
        # cancelled one) is the same business order changed: order.created again under the key
        # of the first order of the chain, so consumers see one entity's versions in order
        # (created, cancelled, created) and the replacement's full lines and total, which an
        # order.status_changed could not carry; its order_id is the new name, the one the
        # deliveries and invoices that follow name. The header erp_amended_from says so.
        key = f"concat('Sales Order:', {s}.erpnext_order_root(NEW.name))"
        headers = (f"IF(coalesce(NEW.amended_from, '') = '', {headers}, json_object("
                   f"'erp_profile', 'erpnext', 'erp_record', {record}, 'erp_amended_from', "
                   "NEW.amended_from))")

    def emit(event: str) -> str:
        return (f"CALL {s}.erpnext_document({_lit(p.doctype)}, NEW.name, {_lit(event)}, "
                f"'emit', {_lit(p.aggregate_type)}, {key}, {headers})")

    touch = (f"CALL {s}.erpnext_document({_lit(p.doctype)}, NEW.name, NULL, 'touch', NULL, "
             "NULL, NULL)")
    ins = f"BEGIN IF NEW.docstatus = 1 AND {p.qualifies} THEN {emit(p.event)}; END IF; END"
    cancel = (f" ELSEIF OLD.docstatus = 1 AND NEW.docstatus = 2 THEN {emit('order.cancelled')};"
              if p.table == _SO else "")
    upd = (f"BEGIN IF OLD.docstatus = 0 AND NEW.docstatus = 1 AND {p.qualifies} THEN "
           f"{emit(p.event)};{cancel} ELSEIF @pipeline_erpnext IS NOT NULL THEN {touch}; "
           "END IF; END")
    return [(_trigger_name(p.table, "ins"), "INSERT", ins),
            (_trigger_name(p.table, "upd"), "UPDATE", upd)]


def _child_triggers(c: Child, schema: str) -> list[tuple[str, str, str]]:
    s = _q(schema)

    def call(img: str) -> str:
        return (f"IF {img}.parenttype = {_lit(c.parent_doctype)} THEN CALL "
                f"{s}.erpnext_child({_lit(c.parent_doctype)}, {img}.parent); END IF")

    # nothing pending on this connection: nothing to do; but a credit limit changed alone is the
    # customer's change (customer.upserted even with nothing pending)
    guard = "TRUE" if c.parent_doctype == "Customer" else "@pipeline_erpnext IS NOT NULL"
    return [
        (_trigger_name(c.table, "ins"), "INSERT", f"BEGIN IF {guard} THEN {call('NEW')}; END IF; "
         "END"),
        (_trigger_name(c.table, "upd"), "UPDATE",
         f"BEGIN IF {guard} AND ({_changed(c.watched)}) THEN {call('NEW')}; "
         f"IF NOT (NEW.parent <=> OLD.parent) THEN {call('OLD')}; END IF; END IF; END"),
        (_trigger_name(c.table, "del"), "DELETE", f"BEGIN IF {guard} THEN {call('OLD')}; END IF; "
         "END"),
    ]


def _mariadb_triggers(prof: MariaDbProfile, schema: str,
                      erp: str) -> list[tuple[str, str, str, str]]:
    """(table, trigger name, event, body) of every trigger the profile installs."""
    out = [(p.table, *t) for p in prof.parents for t in _parent_triggers(p, schema, erp)]
    out += [(c.table, *t) for c in prof.children for t in _child_triggers(c, schema)]
    return out


def sql_statements(prof: MariaDbProfile, schema: str, erp: str) -> list[str]:
    """The profile's functions and procedures (its SQL file, placeholders resolved), one
    statement each."""
    text = resources.files(__package__).joinpath(prof.sql_file).read_text()
    text = text.replace("{schema}", _q(schema)).replace("{erp}", _q(erp))
    parts = re.split(r"^\$\$\s*$", text, flags=re.M)
    return [p.strip() for p in parts if p.strip() and not all(
        line.strip().startswith("--") or not line.strip() for line in p.splitlines())]


def check_mariadb(conn: Any, prof: MariaDbProfile, erp: str) -> dict[str, set[str]]:
    """Refuse, naming the table, the column and the event, when the ERP's tables are not what
    the profile reads (information_schema.COLUMNS of the site's database)."""
    tables = list(prof.needs)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            f"WHERE table_schema = %s AND table_name IN ({', '.join(['%s'] * len(tables))})",
            (erp, *tables))
        have: dict[str, set[str]] = {}
        for table, column in cur.fetchall():
            have.setdefault(str(table), set()).add(str(column))
    return _refuse_missing(prof, erp, have)


def _current_database(conn: Any) -> str | None:
    with conn.cursor() as cur:
        cur.execute("SELECT database()")
        row = cur.fetchone()
    return None if row is None or row[0] is None else str(row[0])


def resolve_erp_database(conn: Any, erp_schema: str | None) -> str:
    erp = erp_schema or _current_database(conn)
    if not erp:
        raise ConfigError("--erp-schema names no database and database.url names none: give "
                          "the site's database (--erp-schema _1bd3e0294da19198) or put it in "
                          "the URL (mysql://…/<site database>)")
    if not _SCHEMA.match(erp):
        raise ConfigError(f"--erp-schema {erp!r} is not a database name (letters, digits, _)")
    return erp


# The session status counters erpnext_generation() cannot do without (it reads more where the
# server has them): MariaDB's information_schema.SESSION_STATUS and @@in_transaction.
ERPNEXT_STATUS = ("COM_COMMIT", "COM_ROLLBACK", "COM_BEGIN", "COM_SET_OPTION",
                  "COM_XA_COMMIT", "COM_XA_ROLLBACK")


def check_transaction_boundaries(conn: Any, prof: MariaDbProfile) -> None:
    """Refuse, before anything exists, a server where the profile cannot tell one transaction
    from the next (every in-transaction submit would then fail ERPNext's write)."""
    import pymysql

    with conn.cursor() as cur:
        cur.execute("SELECT version()")
        row = cur.fetchone()
        version = str(row[0]) if row else "unknown"
        server = f"MySQL {version}" if "mariadb" not in version.lower() else f"MariaDB {version}"
        try:
            cur.execute("SELECT @@in_transaction")
            cur.fetchall()
            marks = ", ".join(["%s"] * len(ERPNEXT_STATUS))
            cur.execute("SELECT upper(variable_name) FROM information_schema.SESSION_STATUS "
                        f"WHERE upper(variable_name) IN ({marks})", ERPNEXT_STATUS)
            have = {str(r[0]) for r in cur.fetchall()}
        except pymysql.Error as exc:
            raise ConfigError(
                f"the {prof.name} profile needs MariaDB (information_schema.SESSION_STATUS and "
                f"@@in_transaction tell it where a transaction ends); this server is {server}: "
                f"{exc.args[-1] if exc.args else exc}") from None
    missing = [v for v in ERPNEXT_STATUS if v not in have]
    if missing:
        raise ConfigError(
            f"the {prof.name} profile needs MariaDB's session status counters "
            f"{', '.join(missing)} (information_schema.SESSION_STATUS); this server ({server}) "
            "has none of that name")


def install_mariadb(conn: Any, name: str, schema: str,
                    erp_schema: str | None = None) -> MariaDbProfile:
    """Check the ERP's tables (refusing before anything exists), then create the profile's
    functions, procedures and triggers; each trigger is replaced in one statement (``CREATE OR
    REPLACE``), so re-running it never leaves ERPNext's writes uncaptured."""
    from pipeline.outbox import mariadb as outbox

    prof = mariadb_profile(name)
    erp = resolve_erp_database(conn, erp_schema)
    if outbox.installed_version(conn, schema) is None:
        raise ConfigError(
            f"the outbox is not installed in database {schema!r} of this server: run "
            "`pipeline outbox install` first, then capture"
        )
    check_mariadb(conn, prof, erp)
    check_transaction_boundaries(conn, prof)
    with conn.cursor() as cur:
        for statement in sql_statements(prof, schema, erp):
            cur.execute(statement)
        # the generation's counters, run once: a server where they cannot be read is refused
        # here, before any trigger exists
        cur.execute(f"SELECT {_q(schema)}.erpnext_counters(), {_q(schema)}.erpnext_generation()")
        got = cur.fetchone()
        if got is None or got[0] is None:
            raise ConfigError(f"the {prof.name} profile needs MariaDB's session status counters "
                              "(information_schema.SESSION_STATUS): none could be read here")
        # MariaDB resolves a routine's columns when it first runs: run every payload once (on
        # no document) now, so a mistake fails here and not in ERPNext's writes
        for event in prof.events:
            cur.execute(f"SELECT {_q(schema)}.erpnext_payload(%s, '', '')", (event,))
            cur.fetchall()
        for table, trigger, event, body in _mariadb_triggers(prof, schema, erp):
            cur.execute(f"CREATE OR REPLACE TRIGGER {_q(erp)}.{_q(trigger)} AFTER {event} ON "
                        f"{_q(erp)}.{_q(table)} FOR EACH ROW {body}")
    return prof


def drop_mariadb(conn: Any, name: str, erp_schema: str | None = None) -> bool:
    """Remove the profile's triggers (the functions stay: nothing calls them then)."""
    prof = mariadb_profile(name)
    erp = resolve_erp_database(conn, erp_schema)
    names = [t[1] for t in _mariadb_triggers(prof, "pipeline", erp)]
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM information_schema.triggers WHERE trigger_schema = %s AND "
            f"trigger_name IN ({', '.join(['%s'] * len(names))})", (erp, *names))
        row = cur.fetchone()
        existed = bool(row and int(row[0]) > 0)
        for trigger in names:
            cur.execute(f"DROP TRIGGER IF EXISTS {_q(erp)}.{_q(trigger)}")
    return existed
