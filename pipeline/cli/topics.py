"""``pipeline topics apply``."""

from __future__ import annotations

import json

import click
from confluent_kafka.admin import AdminClient

from pipeline.cli import Context, pass_ctx
from pipeline.kafka.client import admin_config
from pipeline.kafka.topics import apply_topics, desired_topics


@click.group("topics")
def topics() -> None:
    """Kafka topics of the pipeline."""


@topics.command("apply")
@click.option("--dry-run", is_flag=True, help="report what would change, change nothing")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def apply_cmd(ctx: Context, dry_run: bool, as_json: bool) -> None:
    """Create or update the event topics from the configuration and report drift."""
    s = ctx.settings
    reports = apply_topics(
        AdminClient(admin_config(s)),
        desired_topics(s),
        timeout_s=s.kafka.request_timeout_s,
        dry_run=dry_run,
    )
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in reports], indent=2))
    else:
        for r in reports:
            click.echo(f"{r.name:32} {r.action:22} {r.detail}")
    if any(r.action == "drift" for r in reports):
        raise SystemExit(1)


COMMANDS = [topics]
