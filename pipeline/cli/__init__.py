"""The ``pipeline`` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage/configuration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from pipeline.config import Settings, load_config
from pipeline.errors import ConfigError, PipelineError


class Context:
    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_config(self.config_path)
        return self._settings


pass_ctx = click.make_pass_decorator(Context)


class PipelineGroup(click.Group):
    """Turns the pipeline's errors into one clear line and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="PIPELINE_CONFIG",
    help="YAML configuration file [default: pipeline.yaml if present]",
)
@click.version_option(package_name="erp-pipeline")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Kafka-native ERP event pipeline: outbox relay, Avro events, DLQ tooling."""
    if config_path is not None and not config_path.exists():
        raise click.BadParameter(f"file {config_path} does not exist", param_hint="--config")
    ctx.obj = Context(config_path)
    from pipeline.gcpolicy import tune_gc

    tune_gc()


def _register() -> None:
    from pipeline.cli import (
        bench,
        bi,
        config_cmd,
        dlq,
        outbox,
        relay,
        run,
        schemas,
        status,
        topics,
        worker,
    )

    for mod in (config_cmd, outbox, schemas, topics, relay, worker, bi, dlq, status, bench, run):
        for cmd in mod.COMMANDS:
            main.add_command(cmd)


_register()
