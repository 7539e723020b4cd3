"""The command line loads a command's module only when that command runs: the table of names
in pipeline.cli matches every module's commands, and importing pipeline.cli alone pulls in
none of the heavy libraries."""

from __future__ import annotations

import importlib
import subprocess
import sys

from click.testing import CliRunner

from pipeline import cli


def test_every_command_is_found_under_its_name() -> None:
    for name, module in cli._COMMANDS.items():
        mod = importlib.import_module(f"pipeline.cli.{module}")
        assert [c.name for c in mod.COMMANDS] == [name]
        assert cli.main.get_command(None, name) is mod.COMMANDS[0]  # type: ignore[arg-type]
    assert cli.main.get_command(None, "nope") is None  # type: ignore[arg-type]


def test_every_module_with_commands_is_in_the_table() -> None:
    from pathlib import Path

    here = Path(cli.__file__).parent
    with_commands = {p.stem for p in here.glob("*.py") if "\nCOMMANDS = " in p.read_text()}
    assert with_commands == set(cli._COMMANDS.values())


def test_help_lists_every_command() -> None:
    out = CliRunner().invoke(cli.main, ["--help"]).output
    for name in cli._COMMANDS:
        assert f"\n  {name} " in out


def test_importing_the_cli_loads_no_command() -> None:
    code = ("import sys, pipeline.cli; "
            "print(sorted(m for m in ('pipeline.config', 'psycopg', 'confluent_kafka', "
            "'opentelemetry.sdk', 'pipeline.cli.dlq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
