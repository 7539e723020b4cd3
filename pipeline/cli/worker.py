"""``pipeline worker NAME``."""

from __future__ import annotations

import logging

import click

from pipeline import logs
from pipeline.cli import Context, pass_ctx
from pipeline.cli.relay import stop_on_signals


@click.command("worker")
@click.argument("name")
@click.option("--connector", help="module:attribute, instead of workers.NAME.connector")
@pass_ctx
def worker(ctx: Context, name: str, connector: str | None) -> None:
    """Run the consumer worker NAME (its connector, retry tiers and DLQ)."""
    from pipeline.config import WorkerConfig
    from pipeline.worker.runtime import Worker

    s = ctx.settings
    logs.setup(f"worker-{name}", s.log.level, s.log.format)
    config = s.workers.get(name)
    if connector is not None:
        config = (config or WorkerConfig(connector=connector)).model_copy(
            update={"connector": connector}
        )
    w = Worker(s, name, config=config) if config is not None else Worker(s, name)
    stop = stop_on_signals()
    w.run(stop)
    st = w.stats
    logging.getLogger("pipeline.worker").info(
        "worker %s stopped: consumed %d, applied %d, skipped %d, retried %s, dead-lettered %d",
        name,
        st.consumed,
        st.applied,
        st.skipped,
        dict(st.retried),
        st.dead_lettered_total,
    )


COMMANDS = [worker]
