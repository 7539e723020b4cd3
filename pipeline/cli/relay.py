"""``pipeline relay``."""

from __future__ import annotations

import logging
import signal
import threading

import click

from pipeline import logs, telemetry
from pipeline.cli import Context, pass_ctx


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (a second SIGINT interrupts at once)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.getLogger("pipeline").info(
            "received %s: finishing in-flight work", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@click.command("relay")
@click.option(
    "--shard",
    type=int,
    default=0,
    show_default=True,
    help="which shard of relay.shards this process leads (or stands by for)",
)
@pass_ctx
def relay(ctx: Context, shard: int) -> None:
    """Publish outbox rows to Kafka (leader per shard; a second process waits as standby)."""
    from pipeline.relay.relay import Relay

    s = ctx.settings
    logs.setup("relay", s.log.level, s.log.format)
    telemetry.setup("relay")
    r = Relay(s, shard)
    stop = stop_on_signals()
    try:
        r.run(stop)
    finally:
        telemetry.shutdown()
    logging.getLogger("pipeline.relay").info(
        "relay stopped: published %d, dead-lettered %d, duplicates skipped %d",
        r.stats.published,
        r.stats.dead_lettered,
        r.stats.skipped_duplicates,
    )


COMMANDS = [relay]
