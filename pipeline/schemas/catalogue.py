"""The event catalogue: Avro schemas in ``schemas/<event_type>/v<N>.avsc``.

The highest version of an event type is its *writer* schema; every version stays known so a
reader can decode data written before an upgrade. Each version is identified by the CRC-64-AVRO
fingerprint of its Parsing Canonical Form (the id used by Avro single-object encoding).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fastavro

from pipeline.errors import SchemaError, UnknownSchema

ROW_CHANGE = "pipeline.row_change"
CLAIM_CHECK = "pipeline.claim_check"
INTERNAL_TYPES = (ROW_CHANGE, CLAIM_CHECK)

_VERSION_FILE = re.compile(r"^v(\d+)\.avsc$")

# CRC-64-AVRO (Rabin fingerprint) as defined by the Avro specification.
_EMPTY = 0xC15D213AA4D7A795
_FP_TABLE: list[int] = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY & -(_fp & 1))
    _FP_TABLE.append(_fp)


def rabin_fingerprint(data: bytes) -> int:
    fp = _EMPTY
    for b in data:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ b) & 0xFF]
    return fp


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one event type's schema."""

    event_type: str
    version: int
    raw: dict[str, Any] = field(repr=False)
    parsed: Any = field(repr=False, compare=False)

    @property
    def fullname(self) -> str:
        name = str(self.raw["name"])
        ns = self.raw.get("namespace")
        return name if "." in name or not ns else f"{ns}.{name}"

    @cached_property
    def canonical(self) -> str:
        return str(fastavro.schema.to_parsing_canonical_form(self.parsed))

    @cached_property
    def fingerprint(self) -> int:
        return rabin_fingerprint(self.canonical.encode())

    @cached_property
    def fingerprint_le(self) -> bytes:
        """The 8 bytes written after 0xC3 0x01 in single-object encoding (little-endian)."""
        return struct.pack("<Q", self.fingerprint)


def default_catalogue_path() -> Path:
    """``schemas/`` of a source checkout, else the copy packaged into the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "schemas", here.parent / "_catalogue"):
        if candidate.is_dir():
            return candidate
    raise SchemaError(
        "no schema catalogue found: set schemas.path (PIPELINE_SCHEMAS__PATH) to the folder "
        "holding <event_type>/v<N>.avsc files"
    )


class Catalogue:
    """All known schema versions, by event type and by fingerprint."""

    def __init__(self, versions: list[SchemaVersion], path: Path | None = None) -> None:
        self.path = path
        self._by_type: dict[str, list[SchemaVersion]] = {}
        self._by_fp: dict[int, SchemaVersion] = {}
        self._by_fullname: dict[str, SchemaVersion] = {}
        for v in sorted(versions, key=lambda s: (s.event_type, s.version)):
            self._by_type.setdefault(v.event_type, []).append(v)
            self._by_fp[v.fingerprint] = v
            self._by_fullname[v.fullname] = v  # the highest version wins

    @classmethod
    def load(cls, path: Path | None = None) -> Catalogue:
        root = Path(path) if path is not None else default_catalogue_path()
        if not root.is_dir():
            raise SchemaError(f"schema catalogue folder {root} does not exist")
        versions: list[SchemaVersion] = []
        for type_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(type_dir.iterdir()):
                m = _VERSION_FILE.match(f.name)
                if not m:
                    continue
                versions.append(load_version(f, type_dir.name, int(m.group(1))))
        if not versions:
            raise SchemaError(f"schema catalogue folder {root} holds no <event_type>/v<N>.avsc")
        return cls(versions, root)

    @property
    def event_types(self) -> list[str]:
        return sorted(self._by_type)

    def has(self, event_type: str) -> bool:
        return event_type in self._by_type

    def versions(self, event_type: str) -> list[SchemaVersion]:
        return list(self._by_type.get(event_type, []))

    def writer(self, event_type: str) -> SchemaVersion:
        try:
            return self._by_type[event_type][-1]
        except KeyError:
            raise SchemaError(
                f"unknown event type {event_type!r}: no schema in the catalogue "
                f"({self.path}); add {event_type}/v1.avsc or fix the event type"
            ) from None

    def by_fingerprint(self, fp: int) -> SchemaVersion:
        try:
            return self._by_fp[fp]
        except KeyError:
            raise UnknownSchema(
                f"unknown schema fingerprint {fp:016x}: written with a schema this reader's "
                f"catalogue ({self.path}) does not hold; deploy the newer catalogue"
            ) from None

    def by_fullname(self, fullname: str) -> SchemaVersion | None:
        return self._by_fullname.get(fullname)


def load_version(path: Path, event_type: str, version: int) -> SchemaVersion:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SchemaError(f"{path}: not a readable JSON schema: {exc}") from exc
    return parse_version(raw, event_type, version, origin=str(path))


def parse_version(raw: Any, event_type: str, version: int, origin: str) -> SchemaVersion:
    if not isinstance(raw, dict) or raw.get("type") != "record":
        raise SchemaError(f"{origin}: an event schema must be an Avro record")
    try:
        parsed = fastavro.parse_schema(raw)
    except Exception as exc:  # fastavro raises several unrelated types
        raise SchemaError(f"{origin}: invalid Avro schema: {exc}") from exc
    return SchemaVersion(event_type=event_type, version=version, raw=raw, parsed=parsed)
