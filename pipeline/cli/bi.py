"""``pipeline bi …``: the BI worker's maintenance commands."""

from __future__ import annotations

import json
import logging
import time

import click

from pipeline import logs
from pipeline.cli import Context, pass_ctx
from pipeline.cli.relay import stop_on_signals


@click.group("bi")
def bi() -> None:
    """BI landing (the batch-target workers: PostgreSQL tables, Parquet files)."""


@bi.command("backfill")
@click.option(
    "--worker",
    "name",
    default="bi",
    show_default=True,
    help="the BI worker (workers.NAME) whose target is rebuilt",
)
@click.option(
    "--from-beginning",
    is_flag=True,
    help="empty the target (tables/files and stored positions) and land every event "
    "from the start of the topics; without it, catch up from the stored positions",
)
@click.option("--yes", is_flag=True, help="do not ask before emptying the target")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=3600.0,
    show_default=True,
    help="give up after this many seconds",
)
@pass_ctx
def backfill(ctx: Context, name: str, from_beginning: bool, yes: bool, timeout_s: float) -> None:
    """Land the topics into a BI target up to their current end, then exit.

    Stop the running BI worker of the same group first: partitions it holds are not landed by
    the backfill (which then runs into --timeout). Prints a JSON summary; exit code 1 when the
    end was not reached."""
    from pipeline.errors import ConfigError
    from pipeline.sink import is_batch_target
    from pipeline.sink.runtime import SinkWorker
    from pipeline.worker.connector import load_connector

    s = ctx.settings
    logs.setup(f"bi-backfill-{name}", s.log.level, s.log.format)
    config = s.worker_config(name)
    target = load_connector(config.connector, config.options)
    if not is_batch_target(target):
        raise ConfigError(
            f"worker {name!r} ({config.connector}) is not a BI batch target: backfill rebuilds "
            "connectors.bi.postgres:PostgresTarget or connectors.bi.parquet:ParquetTarget"
        )
    sink = SinkWorker(s, name, target, config=config)  # type: ignore[arg-type]
    if from_beginning:
        if not yes:
            click.confirm(
                f"Empty {sink.target.name} target of worker {name!r} (group {sink.group_id}) and "
                "land every event again from the beginning of "
                f"{', '.join(sink.main_topics)}?",
                abort=True,
                err=True,
            )
        sink.target.open(s, sink.group_id)
        sink.target.reset(sink.group_id)
        logging.getLogger("pipeline.sink").info("target of %s emptied; backfilling", name)
    started = time.monotonic()
    done = sink.run_until_caught_up(stop_on_signals(), timeout_s=timeout_s)
    st = sink.stats
    click.echo(
        json.dumps(
            {
                "worker": name,
                "group": sink.group_id,
                "from_beginning": from_beginning,
                "caught_up": done,
                "landed": st.landed,
                "dead_lettered": st.dead_lettered_total,
                "batches": st.batches,
                "seconds": round(time.monotonic() - started, 2),
            }
        )
    )
    if not done:
        raise SystemExit(1)


COMMANDS = [bi]
