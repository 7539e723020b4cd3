"""Avro encoding of events (DESIGN decision 6) and the one decoder that reads every form.

Two wire forms:

* **single-object encoding** (no Schema Registry): ``C3 01`` + 8-byte little-endian
  CRC-64-AVRO fingerprint + Avro body, resolved against the local catalogue;
* **Confluent wire format** (Schema Registry configured): ``00`` + 4-byte big-endian schema id +
  Avro body, subjects named by TopicRecordNameStrategy (``<topic>-<record fullname>``), since one
  topic carries several event types.

:class:`Decoder` accepts both; an unknown fingerprint or schema id raises
:class:`~pipeline.errors.UnknownSchema`.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import fastavro

from pipeline import exactjson
from pipeline.errors import (
    DecodeError,
    PayloadError,
    PipelineError,
    RegistryUnavailable,
    SchemaError,
)
from pipeline.schemas.catalogue import (
    CLAIM_CHECK,
    ROW_CHANGE,
    Catalogue,
    SchemaVersion,
    parse_version,
)
from pipeline.schemas.jsonform import compile_encoder

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0


class ClaimFetcher(Protocol):
    """Where claim-checked event bodies are read from (see ``pipeline.claimcheck``)."""

    def get(self, ref: str) -> bytes: ...


class RegistryClient(Protocol):
    """The part of confluent-kafka's SchemaRegistryClient the codec uses."""

    def register_schema(self, subject_name: str, schema: Any) -> int: ...

    def get_schema(self, schema_id: int) -> Any: ...


@dataclass(frozen=True)
class Encoded:
    value: bytes
    schema: SchemaVersion


@dataclass(frozen=True)
class Decoded:
    event_type: str
    schema: SchemaVersion
    value: dict[str, Any]
    wire_form: str  # "single-object" | "confluent"


class Encoder:
    """Turns a JSON-form payload into Avro bytes with the event type's writer schema."""

    def __init__(self, catalogue: Catalogue, registry: RegistryClient | None = None) -> None:
        self.catalogue = catalogue
        self.registry = registry
        self._encoders: dict[str, Callable[[Any], bytes]] = {}
        self._registry_ids: dict[tuple[str, int], int] = {}


    def close(self) -> None:
        """Close the Schema Registry client's connections (if any)."""
        close = getattr(self.registry, "close", None)
        if close is not None:
            close()
    def schema_for(self, event_type: str, headers: dict[str, Any] | None = None) -> SchemaVersion:
        """The writer schema, or the generic row-change record for captured table rows."""
        if self.catalogue.has(event_type):
            return self.catalogue.writer(event_type)
        if headers and headers.get("erp_capture"):
            return self.catalogue.writer(ROW_CHANGE)
        return self.catalogue.writer(event_type)  # raises the unknown-type SchemaError

    def _body(
        self, event_type: str, payload: Any, headers: dict[str, Any] | None
    ) -> tuple[SchemaVersion, bytes]:
        sv = self.schema_for(event_type, headers)
        if sv.event_type == ROW_CHANGE and event_type != ROW_CHANGE:
            payload = row_change_payload(payload, event_type)
        enc = self._encoders.get(sv.event_type)
        if enc is None:
            enc = self._encoders[sv.event_type] = compile_encoder(sv.parsed, sv.event_type)
        return sv, enc(payload)

    def validate(
        self, event_type: str, payload: Any, headers: dict[str, Any] | None = None
    ) -> None:
        """Raise SchemaError / PayloadError (naming the field) unless the payload encodes."""
        self._body(event_type, payload, headers)

    def encode(
        self, event_type: str, payload: Any, *, topic: str, headers: dict[str, Any] | None = None
    ) -> Encoded:
        sv, body = self._body(event_type, payload, headers)
        if self.registry is None:
            return Encoded(SINGLE_OBJECT_MAGIC + sv.fingerprint_le + body, sv)
        return Encoded(struct.pack(">bI", CONFLUENT_MAGIC, self._registry_id(sv, topic)) + body, sv)

    def pass_through(self, event_type: str, encoded: bytes, *, topic: str) -> Encoded:
        """Bytes its writer encoded (single-object, with the writer schema of ``event_type``:
        the relay's fetch checked the fingerprint) as this encoder would have written them:
        as they are, or under the Schema Registry's id instead of the fingerprint."""
        sv = self.catalogue.writer(event_type)
        if encoded[:2] != SINGLE_OBJECT_MAGIC or encoded[2:10] != sv.fingerprint_le:
            raise SchemaError(
                f"pre-encoded {event_type} bytes do not carry the fingerprint of its writer "
                f"schema v{sv.version}"
            )
        if self.registry is None:
            return Encoded(encoded, sv)
        prefix = struct.pack(">bI", CONFLUENT_MAGIC, self._registry_id(sv, topic))
        return Encoded(prefix + encoded[10:], sv)

    def writer_fingerprints(self) -> dict[str, bytes]:
        """Event type → the fingerprint bytes of the schema written for it."""
        return {t: self.catalogue.writer(t).fingerprint_le for t in self.catalogue.event_types}

    def _registry_id(self, sv: SchemaVersion, topic: str) -> int:
        key = (topic, sv.fingerprint)
        sid = self._registry_ids.get(key)
        if sid is None:
            from confluent_kafka.schema_registry import Schema

            assert self.registry is not None
            subject = f"{topic}-{sv.fullname}"
            schema = Schema(json.dumps(sv.raw), "AVRO")  # type: ignore[call-arg,unused-ignore]
            try:
                sid = self.registry.register_schema(subject, schema)
            except Exception as exc:
                raise registry_error(
                    exc, f"registering {sv.event_type} v{sv.version} as subject {subject}"
                ) from exc
            self._registry_ids[key] = sid
        return sid


def registry_error(exc: Exception, doing: str) -> PipelineError:
    """A Schema Registry failure in the exception tree: a refused schema (409 incompatible,
    422 invalid) is permanent; anything else (unreachable, 5xx) is transient."""
    status = getattr(exc, "http_status_code", None)
    message = getattr(exc, "error_message", None) or str(exc)
    if status in (409, 422):
        return SchemaError(
            f"Schema Registry refused {doing} (HTTP {status}): {message}; "
            "make the change BACKWARD compatible or add a new event type"
        )
    return RegistryUnavailable(f"Schema Registry unavailable while {doing}: {message}")


def row_change_payload(payload: Any, event_type: str) -> dict[str, Any]:
    """The generic record's JSON form, from the payload a capture trigger wrote."""
    if not isinstance(payload, dict) or "table" not in payload:
        raise PayloadError(
            f"captured event {event_type} lacks the capture trigger's payload "
            "(table, operation, key, row, old_row)",
            event_type=event_type,
        )
    row, old = payload.get("row"), payload.get("old_row")
    table = str(payload.get("table"))  # schema-qualified, as the capture trigger writes it
    schema_name = table.rpartition(".")[0]
    return {
        "table": table,
        "operation": payload.get("operation"),
        "key": None if payload.get("key") is None else str(payload.get("key")),
        # the row images as JSON text with every number as written (numeric stays exact)
        "row": None if row is None else exactjson.dumps(row),
        "old_row": None if old is None else exactjson.dumps(old),
        "schema_name": schema_name or "public",
    }


class Decoder:
    """Reads single-object and Confluent-framed Avro against the catalogue (and registry)."""

    def __init__(
        self,
        catalogue: Catalogue,
        registry: RegistryClient | None = None,
        claims: ClaimFetcher | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.registry = registry
        self.claims = claims
        self._by_id: dict[int, SchemaVersion] = {}


    def close(self) -> None:
        """Close the Schema Registry client's connections (if any)."""
        close = getattr(self.registry, "close", None)
        if close is not None:
            close()
    def decode(self, data: bytes | None) -> Decoded:
        """Decode a record value; claim-check references are resolved when a store is given."""
        decoded = self._decode(data)
        if decoded.event_type == CLAIM_CHECK and self.claims is not None:
            return self.resolve_claim(decoded)
        return decoded

    def resolve_claim(self, ref: Decoded) -> Decoded:
        """Fetch the event a ``pipeline.claim_check`` record points to and decode it."""
        assert self.claims is not None
        v = ref.value
        body = self.claims.get(str(v["ref"]))
        digest = hashlib.sha256(body).hexdigest()
        if digest != v["sha256"] or len(body) != v["size_bytes"]:
            raise DecodeError(
                f"claim-check body {v['ref']} ({v['store']}) does not match its reference: "
                f"sha256 {digest[:12]}… size {len(body)}, expected {str(v['sha256'])[:12]}… "
                f"size {v['size_bytes']}"
            )
        inner = self._decode(body)
        if inner.event_type != v["event_type"]:
            raise DecodeError(
                f"claim-check body {v['ref']} holds {inner.event_type}, reference says "
                f"{v['event_type']}"
            )
        return inner

    def schema_of(self, data: bytes | None) -> SchemaVersion:
        """The writer schema a record names, from its framing alone (the body is not read):
        raises DecodeError / UnknownSchema like :meth:`decode`."""
        return self._frame(data)[0]

    def _frame(self, data: bytes | None) -> tuple[SchemaVersion, int, str]:
        """(writer schema, offset of the Avro body, wire form) of a record value."""
        if not data:
            raise DecodeError("empty record value: no Avro payload to decode")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise DecodeError(f"truncated single-object header ({len(data)} bytes)")
            (fp,) = struct.unpack_from("<Q", data, 2)
            return self.catalogue.by_fingerprint(fp), 10, "single-object"
        if data[0] == CONFLUENT_MAGIC and len(data) >= 5:
            (sid,) = struct.unpack_from(">I", data, 1)
            return self._registry_schema(sid), 5, "confluent"
        raise DecodeError(
            f"not an Avro event: starts with {data[:4].hex()} (expected c301 single-object "
            "or 00 Confluent framing)"
        )

    def _decode(self, data: bytes | None) -> Decoded:
        sv, offset, form = self._frame(data)
        assert data is not None
        return Decoded(sv.event_type, sv, self._read(sv, data, offset), form)

    def _read(self, sv: SchemaVersion, data: bytes, offset: int) -> dict[str, Any]:
        try:
            buf = io.BytesIO(data)
            buf.seek(offset)
            value = fastavro.schemaless_reader(buf, sv.parsed, None)
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError…
            raise DecodeError(
                f"corrupt Avro body for {sv.event_type} v{sv.version}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(value, dict):
            raise DecodeError(f"{sv.event_type}: decoded a non-record value")
        return value

    def _registry_schema(self, sid: int) -> SchemaVersion:
        sv = self._by_id.get(sid)
        if sv is not None:
            return sv
        from pipeline.errors import UnknownSchema

        if self.registry is None:
            raise UnknownSchema(
                f"record is framed for Schema Registry id {sid} but no registry is configured "
                "(set schema_registry.url)"
            )
        try:
            schema = self.registry.get_schema(sid)
        except Exception as exc:
            raise UnknownSchema(f"Schema Registry has no schema id {sid}: {exc}") from exc
        raw = json.loads(schema.schema_str)
        local = self.catalogue.by_fullname(_fullname(raw))
        event_type = local.event_type if local else _fullname(raw)
        try:
            sv = parse_version(raw, event_type, -sid, origin=f"registry id {sid}")
        except SchemaError as exc:
            raise UnknownSchema(str(exc)) from exc
        self._by_id[sid] = sv
        return sv


def _fullname(raw: dict[str, Any]) -> str:
    name = str(raw.get("name", ""))
    ns = raw.get("namespace")
    return name if "." in name or not ns else f"{ns}.{name}"
