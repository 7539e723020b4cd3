"""The ``pipeline`` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage/configuration."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from pipeline.config import Settings


class Context:
    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from pipeline.config import load_config

            self._settings = load_config(self.config_path)
        return self._settings


pass_ctx = click.make_pass_decorator(Context)


# Each command's module, imported when the command runs (or help lists it): importing them all
# took ~0.5 s of every command's start (pydantic-settings, psycopg, the OTel SDK, …)
_COMMANDS = {
    "bench": "bench", "bi": "bi", "config": "config_cmd", "dlq": "dlq", "outbox": "outbox",
    "relay": "relay", "schemas": "schemas", "status": "status", "topics": "topics",
    "up": "run", "worker": "worker",
}


class PipelineGroup(click.Group):
    """Turns the pipeline's errors into one clear line and the right exit code; loads a
    command's module only when the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            module = importlib.import_module(f"pipeline.cli.{_COMMANDS[cmd_name]}")
            for cmd in module.COMMANDS:
                self.add_command(cmd)
        return super().get_command(ctx, cmd_name)

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
