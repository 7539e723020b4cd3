"""``pipeline config check``."""

from __future__ import annotations

import json

import click
import yaml

from pipeline.cli import Context, pass_ctx
from pipeline.config import masked_dump


@click.group("config")
def config() -> None:
    """Inspect the configuration."""


@config.command("check")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of YAML")
@pass_ctx
def check(ctx: Context, as_json: bool) -> None:
    """Print the resolved configuration (secrets masked), or every error with its field path."""
    dumped = masked_dump(ctx.settings)
    if as_json:
        click.echo(json.dumps(dumped, indent=2))
    else:
        click.echo(yaml.safe_dump(dumped, sort_keys=False).rstrip())
    click.echo("configuration ok", err=True)


@config.command("docs")
def docs() -> None:
    """Print the configuration reference (docs/configuration.md) as Markdown."""
    from pipeline.config import reference_markdown

    click.echo(reference_markdown(), nl=False)


COMMANDS = [config]
