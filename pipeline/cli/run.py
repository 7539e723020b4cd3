"""``pipeline run``: the pipeline on embedded defaults (or the configured servers), with the ERP
simulator, a live progress line and a verdict at the end."""

from __future__ import annotations

import logging
import threading
import time

import click

from pipeline import logs
from pipeline.cli import Context, pass_ctx
from pipeline.cli.relay import stop_on_signals


@click.command("up")
@click.option(
    "--rate",
    type=float,
    default=200.0,
    show_default=True,
    help="simulated ERP events per second (0 = as fast as possible)",
)
@click.option(
    "--writers", type=int, default=4, show_default=True, help="concurrent simulated ERP writers"
)
@click.option(
    "--duration",
    type=float,
    default=None,
    help="stop after this many seconds [default: until Ctrl-C]",
)
@click.option("--no-simulator", is_flag=True, help="relay only: publish what the ERP writes")
@pass_ctx
def run(
    ctx: Context, rate: float, writers: int, duration: float | None, no_simulator: bool
) -> None:
    """Run the outbox relay with the ERP simulator; Ctrl-C stops and prints a verdict."""
    import psycopg

    from pipeline.db import database_url
    from pipeline.embedded.stack import local_stack
    from pipeline.kafka.topics import ensure_topics
    from pipeline.outbox.migrations import install
    from pipeline.outbox.status import outbox_status
    from pipeline.relay.relay import Relay
    from pipeline.simulator.erp import ErpSimulator, SimulatorConfig
    from pipeline.verify import verify_topics

    settings = ctx.settings
    logs.setup(
        "run",
        "WARNING" if settings.log.level == "INFO" else settings.log.level,
        settings.log.format,
    )
    log = logging.getLogger("pipeline.run")
    stop = stop_on_signals()
    embedded_note = []
    if settings.database.url is None:
        embedded_note.append("local PostgreSQL (fresh database; pgserver when none answers)")
    if not settings.kafka.bootstrap_servers:
        embedded_note.append("embedded broker")
    click.echo(f"starting: {', '.join(embedded_note) or 'configured servers'} …")
    with local_stack(settings, fresh_database=settings.database.url is None) as s:
        url = database_url(s)
        schema = s.database.schema_name
        with psycopg.connect(url, autocommit=True) as conn:
            install(conn, schema)
        ensure_topics(s, list(s.topics.aggregate_types))
        click.echo(
            f"database ready, broker {s.kafka.bootstrap_servers}, topics "
            f"{s.topics.prefix}.*; Ctrl-C to stop"
        )
        relay = Relay(s)
        relay_stop = threading.Event()
        relay_thread = threading.Thread(target=relay.run, args=(relay_stop,), name="relay")
        relay_thread.start()
        sim = None
        sim_stop = threading.Event()
        sim_thread = None
        if not no_simulator:
            sim = ErpSimulator(url, schema, SimulatorConfig(writers=writers, rate=rate))
            sim_thread = threading.Thread(
                target=sim.run, args=(sim_stop,), name="simulator", daemon=True
            )
            sim_thread.start()
        started = time.monotonic()
        last_pub, last_t = 0, started
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.wait(2.0):
                now = time.monotonic()
                st = outbox_status(conn, schema)
                pub = relay.stats.published
                click.echo(
                    f"[{now - started:6.0f}s] written {sim.stats.written if sim else '-':>7} "
                    f"published {pub:>7} ({(pub - last_pub) / (now - last_t):7.0f}/s) "
                    f"backlog {st.backlog_rows:>5} dead-lettered {relay.stats.dead_lettered} "
                    f"{'leader' if relay.is_leader else 'standby'}"
                )
                last_pub, last_t = pub, now
                if duration is not None and now - started >= duration:
                    break
            sim_stop.set()
            if sim_thread is not None:
                sim_thread.join(10)  # the last transactions commit before the backlog check
            click.echo("stopping: waiting for the relay to publish the backlog …")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and outbox_status(conn, schema).backlog_rows:
                time.sleep(0.2)
            relay_stop.set()
            relay_thread.join(60)
            backlog = outbox_status(conn, schema).backlog_rows
        written = sim.stats.written if sim else None
        report = verify_topics(s, written_ids=None)
        click.echo("")
        click.echo("summary")
        click.echo(f"  events written (committed)   {written if written is not None else '-'}")
        click.echo(f"  rolled back (never sent)     {sim.stats.rolled_back if sim else '-'}")
        click.echo(f"  published                    {relay.stats.published}")
        click.echo(f"  dead-lettered (outbox DLQ)   {relay.stats.dead_lettered}")
        click.echo(f"  still in outbox              {backlog}")
        click.echo(f"  in Kafka                     {report.records}")
        click.echo(f"  duplicates in Kafka          {report.duplicates}")
        click.echo(f"  order violations             {report.order_violations}")
        lost = None if written is None else written - report.records - backlog
        click.echo(f"  lost                         {lost if lost is not None else '-'}")
        ok = report.duplicates == 0 and report.order_violations == 0 and not lost
        click.echo(f"verdict: {'OK' if ok else 'FAILED'}")
        log.debug("run finished")
        if not ok:
            raise SystemExit(1)


COMMANDS = [run]
