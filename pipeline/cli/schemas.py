"""``pipeline schemas check | list``."""

from __future__ import annotations

import click

from pipeline.cli import Context, pass_ctx
from pipeline.schemas.catalogue import INTERNAL_TYPES, Catalogue
from pipeline.schemas.check import check_catalogue


@click.group("schemas")
def schemas() -> None:
    """The Avro event catalogue."""


@schemas.command("check")
@click.option(
    "--path",
    type=click.Path(file_okay=False, exists=True),
    help="catalogue folder [default: schemas.path or the built-in catalogue]",
)
@pass_ctx
def check_cmd(ctx: Context, path: str | None) -> None:
    """Validate every schema and check BACKWARD compatibility of each version (exit 1 if not)."""
    from pathlib import Path

    settings = ctx.settings
    cat = Catalogue.load(Path(path) if path else settings.schemas.path)
    registry = None
    if settings.schema_registry.url:
        from pipeline.relay.relay import _registry

        registry = _registry(settings)
    try:
        findings = check_catalogue(
            cat, registry, lambda t: settings.topics.event_topic(t.split(".")[0])
        )
    finally:
        if registry is not None:
            registry.close()
    for f in findings:
        click.echo(f"INCOMPATIBLE {f}", err=True)
    n = sum(len(cat.versions(t)) for t in cat.event_types)
    if findings:
        click.echo(f"{len(findings)} problem(s) in {cat.path}", err=True)
        raise SystemExit(1)
    click.echo(
        f"{len(cat.event_types)} event types, {n} schema versions in {cat.path}: all valid "
        "and BACKWARD compatible"
    )


@schemas.command("list")
@pass_ctx
def list_cmd(ctx: Context) -> None:
    """List event types with their writer version, record name and fingerprint."""
    cat = Catalogue.load(ctx.settings.schemas.path)
    for t in cat.event_types:
        w = cat.writer(t)
        kind = " (internal)" if t in INTERNAL_TYPES else ""
        click.echo(f"{t:24} v{w.version}  {w.fullname:36} {w.fingerprint:016x}{kind}")


COMMANDS = [schemas]
