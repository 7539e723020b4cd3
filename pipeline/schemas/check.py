"""``pipeline schemas check``: every schema parses, and each version is BACKWARD compatible with
the one before it, with what git's HEAD holds for the same file, and (when a registry is
configured) with the registry's latest version of each subject."""

from __future__ import annotations

import itertools
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SchemaError
from pipeline.schemas.catalogue import Catalogue, SchemaVersion
from pipeline.schemas.compat import check_backward


@dataclass(frozen=True)
class Finding:
    event_type: str
    version: int
    against: str  # "v1", "git HEAD", "registry <subject>"
    path: str
    message: str

    def __str__(self) -> str:
        where = f" field {self.path}:" if self.path else ""
        return (
            f"{self.event_type} v{self.version} is not BACKWARD compatible with "
            f"{self.against}:{where} {self.message}"
        )


def _git_previous(file: Path) -> dict[str, Any] | None:
    """The committed content of ``file`` at HEAD, or None (untracked, no git, new file)."""
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=file.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        rel = file.resolve().relative_to(Path(top).resolve())
        out = subprocess.run(
            ["git", "show", f"HEAD:{rel.as_posix()}"],
            cwd=top,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None
    try:
        loaded = json.loads(out)
    except ValueError:
        return None
    return loaded if isinstance(loaded, dict) else None


def check_catalogue(
    catalogue: Catalogue, registry: Any = None, topic_of: Any = None
) -> list[Finding]:
    findings: list[Finding] = []
    for event_type in catalogue.event_types:
        versions = catalogue.versions(event_type)
        numbers = [v.version for v in versions]
        if numbers != list(range(1, len(numbers) + 1)):
            findings.append(
                Finding(
                    event_type,
                    numbers[-1],
                    "its own history",
                    "",
                    f"versions must be v1..vN without gaps, found {numbers}",
                )
            )
        for prev, cur in itertools.pairwise(versions):
            findings += _compare(cur, prev.raw, f"v{prev.version}")
        if catalogue.path is not None:
            for v in versions:
                committed = _git_previous(catalogue.path / event_type / f"v{v.version}.avsc")
                if committed is not None and committed != v.raw:
                    findings += _compare(
                        v,
                        committed,
                        "git HEAD (a published version was edited; add a new version instead)",
                    )
        if registry is not None and topic_of is not None:
            findings += _registry_check(registry, versions[-1], topic_of(event_type))
    return findings


def _compare(cur: SchemaVersion, old: Any, against: str) -> list[Finding]:
    try:
        problems = check_backward(old, cur.raw)
    except SchemaError as exc:
        return [Finding(cur.event_type, cur.version, against, "", f"cannot compare: {exc}")]
    return [Finding(cur.event_type, cur.version, against, p.path, p.message) for p in problems]


def _registry_check(registry: Any, cur: SchemaVersion, topic: str) -> list[Finding]:
    subject = f"{topic}-{cur.fullname}"
    try:
        latest = registry.get_latest_version(subject)
    except Exception:  # subject not registered yet: nothing to compare with
        return []
    return _compare(cur, json.loads(latest.schema.schema_str), f"registry subject {subject}")
