"""The docs stay true: the configuration reference is generated from the models, and the
README's CLI reference names every command the CLI has."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli import main
from pipeline.config import reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text == reference_markdown(), "run: pipeline config docs > docs/configuration.md"


def _commands(group: click.Group, prefix: str = "pipeline") -> list[str]:
    out = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # lazy: every command's module loads
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        if isinstance(cmd, click.Group):
            out += _commands(cmd, f"{prefix} {name}")
        else:
            out.append(f"{prefix} {name}")
    return out


def test_readme_cli_reference_names_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in _commands(main) if f"`{c}" not in readme]
    assert not missing, f"README's CLI reference lacks {missing}"
