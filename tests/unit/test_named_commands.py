"""Every command a message or a document tells the user to run exists (`pipeline run` did not)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
NAMED = re.compile(r"`pipeline ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)")
SOURCES = [*sorted((ROOT / "pipeline").rglob("*.py")), *sorted((ROOT / "connectors").rglob("*.py")),
           ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _resolve(words: list[str]) -> bool:
    cmd: click.Command = main
    for i, w in enumerate(words):
        if not isinstance(cmd, click.Group):
            return i > 0  # extra words are arguments of a leaf command
        sub = cmd.get_command(click.Context(cmd), w)  # lazy: the module loads
        if sub is None:
            # "pipeline worker wms": a leaf's argument after it; else an unknown command
            return False
        cmd = sub
    return True


def _named() -> list[tuple[str, str]]:
    out = []
    for path in SOURCES:
        for m in NAMED.finditer(path.read_text(errors="replace")):
            out.append((str(path.relative_to(ROOT)), m.group(1)))
    return out


def test_the_sources_name_commands_at_all() -> None:
    assert len(_named()) > 50


@pytest.mark.parametrize(("where", "command"), sorted(set(_named())))
def test_every_named_command_exists(where: str, command: str) -> None:
    assert _resolve(command.split()), f"{where} names `pipeline {command}`, which does not exist"
