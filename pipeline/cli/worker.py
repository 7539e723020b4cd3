"""``pipeline worker NAME``."""

from __future__ import annotations

import logging

import click

from pipeline import logs, telemetry
from pipeline.cli import Context, pass_ctx
from pipeline.cli.relay import stop_on_signals


@click.command("worker")
@click.argument("name")
@click.option("--connector", help="module:attribute, instead of workers.NAME.connector")
@pass_ctx
def worker(ctx: Context, name: str, connector: str | None) -> None:
    """Run the consumer worker NAME (its connector, retry tiers and DLQ).

    A connector that is a batch target (the BI worker's PostgreSQL or Parquet target) runs on
    the batch-sink runtime instead: events landed in bulk, exactly once, positions kept in the
    target."""
    from pipeline.config import WorkerConfig
    from pipeline.sink import is_batch_target
    from pipeline.sink.runtime import SinkWorker
    from pipeline.worker.connector import load_connector
    from pipeline.worker.runtime import Worker

    s = ctx.settings
    logs.setup(f"worker-{name}", s.log.level, s.log.format)
    telemetry.setup(f"worker-{name}")
    config = s.workers.get(name)
    if connector is not None:
        config = (config or WorkerConfig(connector=connector)).model_copy(
            update={"connector": connector}
        )
    if config is None:
        config = s.worker_config(name)  # raises: names the configured workers
    target = load_connector(config.connector, config.options)
    stop = stop_on_signals()
    if is_batch_target(target):
        sink = SinkWorker(s, name, target, config=config)  # type: ignore[arg-type]
        try:
            sink.run(stop)
        finally:
            telemetry.shutdown()
        ss = sink.stats
        logging.getLogger("pipeline.sink").info(
            "sink %s stopped: consumed %d, landed %d in %d batches, dead-lettered %d, "
            "position conflicts %d",
            name,
            ss.consumed,
            ss.landed,
            ss.batches,
            ss.dead_lettered_total,
            ss.conflicts,
        )
        return
    w = Worker(s, name, target, config=config)
    try:
        w.run(stop)
    finally:
        telemetry.shutdown()
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
