"""``pipeline status``."""

from __future__ import annotations

import json
import time

import click

from pipeline.cli import Context, pass_ctx


@click.command("status")
@click.option("--group", "-g", "groups", multiple=True, help="only these worker groups")
@click.option("--json", "as_json", is_flag=True, help="one JSON object (stable field names)")
@click.option("--watch", type=float, default=None, metavar="SECONDS",
              help="refresh every SECONDS until Ctrl-C")
@pass_ctx
def status(ctx: Context, groups: tuple[str, ...], as_json: bool, watch: float | None) -> None:
    """The pipeline on one screen: outbox backlog and leaders, publish rate, and per worker
    group its lag (records, seconds), retry-tier depths, DLQ depth and newest error, parked keys
    and breaker. Exit 0 when healthy, 1 when a `status.*` threshold is crossed."""
    from pipeline.kafka.client import silence_client_logs
    from pipeline.status import collect, render

    silence_client_logs()
    s = ctx.settings
    while True:
        st = collect(s, list(groups) or None)
        if as_json:
            click.echo(json.dumps(st.as_json(), default=str))
        else:
            if watch:
                click.clear()
            click.echo("\n".join(render(st)))
        if not watch:
            break
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            break
    raise SystemExit(0 if st.healthy else 1)


COMMANDS = [status]
