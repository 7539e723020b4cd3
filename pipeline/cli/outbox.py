"""``pipeline outbox install | status | capture | engine``."""

from __future__ import annotations

import json

import click

from pipeline.cli import Context, pass_ctx
from pipeline.db import connect, is_mariadb
from pipeline.outbox import mariadb as mariadb_outbox
from pipeline.outbox.capture import EVENTS, CaptureSpec, drop_capture, install_capture
from pipeline.outbox.migrations import install
from pipeline.outbox.status import outbox_status
from pipeline.schemas.catalogue import Catalogue


@click.group("outbox")
def outbox() -> None:
    """Install and inspect the transactional outbox in the ERP database."""


@outbox.command("install")
@pass_ctx
def install_cmd(ctx: Context) -> None:
    """Create or upgrade the outbox schema (idempotent, versioned migrations)."""
    schema = ctx.settings.database.schema_name
    with connect(ctx.settings) as conn:
        applied = (mariadb_outbox.install(conn, schema) if is_mariadb(ctx.settings)
                   else install(conn, schema))
    if applied:
        for m in applied:
            click.echo(f"applied migration {m.version:04d}_{m.name} to schema {schema}")
    else:
        click.echo(f"outbox schema {schema} is up to date")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


@outbox.command("status")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
def status_cmd(ctx: Context, as_json: bool) -> None:
    """Backlog rows, oldest unpublished age, current leader and last publish per shard."""
    schema = ctx.settings.database.schema_name
    with connect(ctx.settings) as conn:
        st = outbox_status(conn, schema)
    if as_json:
        click.echo(json.dumps(st.as_json(), indent=2))
        return
    if st.installed_version is None:
        click.echo(f"outbox not installed in schema {schema}: run `pipeline outbox install`")
        raise SystemExit(1)
    click.echo(f"schema            {schema} (migration {st.installed_version:04d})")
    click.echo(f"backlog rows      {st.backlog_rows}")
    click.echo(f"oldest unpublished {_age(st.oldest_unpublished_age_s)}")
    click.echo(f"engine            {st.engine}"
               + (" (outbox_emit writes WAL messages)" if st.engine == "wal" else ""))
    for slot in st.slots:
        click.echo(slot.line())
    if not st.shards:
        click.echo("leaders           none yet (no relay has run)")
    for s in st.shards:
        stale = " (STALE: no heartbeat)" if s.heartbeat_age_s > 30 else ""
        last = s.last_publish.isoformat(timespec="seconds") if s.last_publish else "never"
        click.echo(
            f"shard {s.shard}: leader {s.leader}{stale}, since "
            f"{s.since.isoformat(timespec='seconds')}, last publish {last}, "
            f"published {s.published}, dead-lettered {s.dead_lettered}"
        )


@outbox.command("capture")
@click.option("--table", help="ERP table, e.g. sale_order or public.sale_order")
@click.option("--profile", "profile_name", help="instead of --table: the ERP's own tables as "
              "the catalogue's typed events (built: odoo on PostgreSQL, erpnext on MariaDB)")
@click.option("--erp-schema", default="public", show_default=True,
              help="with --profile: the PostgreSQL schema of the ERP's tables; on MariaDB the "
                   "ERP's database (default: the one of database.url)")
@click.option("--aggregate-type", help="aggregate type (topic <prefix>.<type>)")
@click.option("--key-column", help="key column(s), comma-separated, NOT NULL [default: the "
              "primary key]")
@click.option(
    "--events",
    default=None,
    help="comma-separated subset of insert,update,delete,truncate [default: all; MariaDB: "
    "insert,update,delete (it fires no TRUNCATE trigger)]",
)
@click.option(
    "--event-type-prefix",
    help="event types <prefix>.created/.updated/.deleted [default: the table name]",
)
@click.option("--drop", is_flag=True, help="remove the capture trigger instead")
@pass_ctx
def capture_cmd(
    ctx: Context,
    table: str | None,
    profile_name: str | None,
    erp_schema: str,
    aggregate_type: str | None,
    key_column: str | None,
    events: str | None,
    event_type_prefix: str | None,
    drop: bool,
) -> None:
    """Install a trigger that turns an ERP table's row changes into outbox events, or with
    --profile the triggers that turn an ERP's own tables into the catalogue's typed events."""
    schema = ctx.settings.database.schema_name
    on_mariadb = is_mariadb(ctx.settings)
    if profile_name is not None:
        _capture_profile(ctx, profile_name, erp_schema, drop, on_mariadb)
        return
    if not table:
        raise click.UsageError("--table is required (or --profile)")
    with connect(ctx.settings) as conn:
        if drop:
            dropped = (mariadb_outbox.drop_capture(conn, table) if on_mariadb
                       else drop_capture(conn, table))
            if dropped:
                click.echo(f"capture trigger on {table} removed")
            else:
                click.echo(f"no capture trigger on {table}; nothing to remove")
            return
        if not aggregate_type:
            raise click.UsageError("--aggregate-type is required (unless --drop)")
        spec = CaptureSpec(
            table=table,
            aggregate_type=aggregate_type,
            key_columns=tuple(c.strip() for c in (key_column or "").split(",") if c.strip()),
            events=tuple(e.strip().lower() for e in events.split(",") if e.strip())
            if events is not None else tuple(e for e in EVENTS
                                             if not (on_mariadb and e == "truncate")),
            event_type_prefix=event_type_prefix,
        )
        catalogue = Catalogue.load(ctx.settings.schemas.path)
        got = (mariadb_outbox.install_capture(conn, spec, schema, catalogue) if on_mariadb
               else install_capture(conn, spec, schema, catalogue))
    kind = "binary" if on_mariadb else "bytea"
    binary = f", {kind} as base64: {', '.join(got.bytea_columns)}" if got.bytea_columns else ""
    click.echo(
        f"capturing {', '.join(spec.events)} on {table} as {', '.join(spec.event_types())} "
        f"(aggregate {aggregate_type}, key {', '.join(got.key_columns)}{binary}) → topic "
        f"{ctx.settings.topics.event_topic(aggregate_type)}"
    )


def _capture_profile(ctx: Context, name: str, erp_schema: str, drop: bool,
                     on_mariadb: bool) -> None:
    from pipeline.outbox import profiles

    schema = ctx.settings.database.schema_name
    # --erp-schema's default names PostgreSQL's schema; on MariaDB the site's database is the
    # URL's unless given
    erp: str | None = (None if erp_schema == "public" else erp_schema) if on_mariadb \
        else erp_schema
    with connect(ctx.settings) as conn:
        if drop:
            gone = (profiles.drop_mariadb(conn, name, erp) if on_mariadb
                    else profiles.drop(conn, name, erp_schema))
            click.echo(f"profile {name}: triggers removed" if gone
                       else f"profile {name}: no triggers installed; nothing to remove")
            return
        if on_mariadb:
            mprof = profiles.install_mariadb(conn, name, schema, erp)
            where = profiles.resolve_erp_database(conn, erp)
            what, events, tables = mprof.erp, mprof.events, list(mprof.tables)
        else:
            prof = profiles.install(conn, name, schema, erp_schema)
            where, what, events = erp_schema, prof.erp, prof.events
            tables = [t for _n, t, _c, _f in prof.triggers]
    topics = ", ".join(ctx.settings.topics.event_topic(a)
                       for a in sorted({e.split(".")[0] for e in events}))
    click.echo(f"profile {name} ({what}): capturing {', '.join(f'{where}.{t}' for t in tables)} "
               f"as {', '.join(events)} → {topics}")


@outbox.command("engine")
@click.argument("switch_to", required=False, type=click.Choice(["poll", "wal"]))
@click.option("--wait", "wait_s", default=60.0, show_default=True,
              help="poll: seconds to wait for the WAL relays to drain the slots")
@click.option("--force", is_flag=True,
              help="poll: drop the slots even if they still hold events (those are lost)")
@pass_ctx
def engine_cmd(ctx: Context, switch_to: str | None, wait_s: float, force: bool) -> None:
    """Show or switch what the outbox is written for: poll (rows) or wal (WAL messages).

    \b
    pipeline outbox engine        what outbox_emit writes, and each slot's WAL
    pipeline outbox engine wal    make every shard's slot (relay.shards), then write messages
    pipeline outbox engine poll   write rows again now; drop the slots once drained

    The WAL relay (relay.engine: wal) switches to wal by itself on first start; after
    `engine poll` it does not, until `engine wal`."""
    from pipeline.outbox import engine

    settings = ctx.settings
    schema = settings.database.schema_name
    if is_mariadb(settings):
        if switch_to == "wal":
            raise click.ClickException(
                "the WAL engine reads PostgreSQL's WAL; on MariaDB / MySQL the outbox table "
                "is polled (relay.engine: poll)")
        click.echo("engine poll (MariaDB / MySQL: the outbox table is polled)")
        return
    with connect(settings) as conn:
        conn.autocommit = True
        if switch_to == "wal":
            names = engine.slot_names(conn, schema, settings.relay.shards,
                                      settings.relay.wal_slot_prefix)
            engine.switch_to_wal(conn, schema, names)
            click.echo(f"outbox_emit now writes WAL messages into slot(s) {', '.join(names)}; "
                       "run the relays with relay.engine: wal")
        elif switch_to == "poll":
            shown: set[str] = set()

            def progress(waiting: dict[str, int]) -> None:
                line = ", ".join(f"{what}: {n}" for what, n in sorted(waiting.items()))
                if line not in shown:  # once each, not every half second
                    shown.add(line)
                    click.echo(f"waiting for {line}", err=True)

            held = engine.switch_to_poll(conn, schema, wait_s=wait_s, progress=progress,
                                         force=force)
            if held and not force:
                raise click.ClickException(
                    "outbox_emit writes rows again, but the slots still hold events the WAL "
                    "relays have not published, or may get them: " + ", ".join(
                        f"{what}: {n}" for what, n in sorted(held.items()))
                    + ". Keep the relays (relay.engine: wal) running (and let those "
                    "transactions end), then run this again; --force drops the slots and "
                    "loses the events still in them")
            if held:
                click.echo("dropped the slots with events still in them (--force): " + ", ".join(
                    f"{slot}: {n} lost" for slot, n in sorted(held.items())), err=True)
            click.echo("outbox_emit writes rows; the slots are dropped. Run the relays with "
                       "relay.engine: poll")
        mode, pinned = engine.current_engine(conn, schema)
        click.echo(f"engine {mode}" + (" (chosen with `pipeline outbox engine poll`)"
                                       if pinned and mode == "poll" else ""))
        for slot in engine.slot_states(conn, schema):
            click.echo(slot.line())


COMMANDS = [outbox]
