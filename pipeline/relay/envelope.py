"""Pure logic of the relay: an outbox row in, a Kafka record (or a dead letter) out.

No I/O here: encoding is handed an :class:`~pipeline.schemas.codec.Encoder`; storing a
claim-checked body is the caller's job (:func:`build_record` says when one is needed).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from pipeline import exactjson
from pipeline.errors import PayloadError, PayloadTooLarge
from pipeline.kafka import names
from pipeline.schemas.catalogue import CLAIM_CHECK
from pipeline.schemas.codec import Encoder

# Row headers that become record headers verbatim (W3C trace context and user headers);
# the ones the relay sets itself are not overridable by the row.
_RESERVED = frozenset(
    {
        names.CE_SPECVERSION,
        names.CE_ID,
        names.CE_TYPE,
        names.CE_SOURCE,
        names.CE_SUBJECT,
        names.CE_TIME,
        names.CONTENT_TYPE,
        names.AGGREGATE_TYPE,
        names.AGGREGATE_VERSION,
        names.OUTBOX_POSITION,
        names.CLAIM_CHECK,
    }
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    event_id: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    event_type: str
    payload: Any
    headers: dict[str, Any]
    occurred_at: str  # ISO-8601 with offset, as the CloudEvents ce_time header wants it
    payload_text: str | None = None  # the payload as stored (jsonb text): kept for the DLQ
    unreadable: str | None = None  # why the stored payload or headers could not be read
    # the payload as its writer encoded it (Avro single-object bytes), passed through as is;
    # then ``payload`` and ``payload_text`` are not fetched (None)
    encoded: bytes | None = None

    @classmethod
    def from_stored(
        cls,
        id: int,
        event_id: str,
        aggregate_type: str,
        aggregate_id: str,
        aggregate_version: int,
        event_type: str,
        payload_text: str | None,
        headers_text: str | None,
        occurred_at: str,
        encoded_b64: str | bytes | None = None,
    ) -> OutboxRow:
        """A row as the relay fetches it: payload and headers as their stored text, read here
        with exact numbers; a row that cannot be read is kept, to be dead-lettered whole. A row
        its writer encoded comes as those bytes (base64 text from PostgreSQL's JSON batch, raw
        bytes from MariaDB) instead of its payload text."""
        payload: Any = None
        headers: dict[str, Any] = {}
        unreadable = None
        encoded = None
        if isinstance(encoded_b64, bytes):
            encoded = encoded_b64
        elif encoded_b64 is not None:
            encoded = base64.b64decode(encoded_b64)
        else:
            try:
                payload = exactjson.loads(payload_text or "")
            except exactjson.JsonError as exc:
                unreadable = f"its payload cannot be read: {exc}"
        try:
            got = exactjson.loads(headers_text) if headers_text and headers_text != "{}" else {}
            headers = got if isinstance(got, dict) else {}
        except exactjson.JsonError as exc:
            unreadable = unreadable or f"its headers cannot be read: {exc}"
        return cls(id, event_id, aggregate_type, aggregate_id, aggregate_version, event_type,
                   payload, headers, occurred_at, payload_text, unreadable, encoded)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "aggregate_version": self.aggregate_version,
            "event_type": self.event_type,
            "payload": self.payload,
            "headers": self.headers,
            "occurred_at": self.occurred_at,
        }


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Oversized:
    """The encoded event is over ``max_inline_bytes``: store ``body``, then call
    :func:`claim_check_record` with the reference."""

    body: bytes
    event_type: str


def event_headers(row: OutboxRow, source: str) -> list[tuple[str, str | bytes | None]]:
    hdrs: list[tuple[str, str | bytes | None]] = [
        (names.CE_SPECVERSION, b"1.0"),
        (names.CE_ID, row.event_id.encode()),
        (names.CE_TYPE, row.event_type.encode()),
        (names.CE_SOURCE, source.encode()),
        (names.CE_SUBJECT, row.aggregate_id.encode()),
        (names.CE_TIME, row.occurred_at.encode()),
        (names.CONTENT_TYPE, b"application/avro"),
        (names.AGGREGATE_TYPE, row.aggregate_type.encode()),
        (names.AGGREGATE_VERSION, str(row.aggregate_version).encode()),
        (names.OUTBOX_POSITION, str(row.id).encode()),
    ]
    for name, value in row.headers.items():
        if name in _RESERVED or name == "erp_capture":
            continue
        hdrs.append((name, (value if isinstance(value, str) else json.dumps(value)).encode()))
    return hdrs


def build_record(
    row: OutboxRow,
    encoder: Encoder,
    *,
    topic: str,
    source: str,
    max_inline_bytes: int,
    max_payload_bytes: int,
) -> Record | Oversized:
    """Encode a row; raises PermanentError (SchemaError, PayloadError, PayloadTooLarge)."""
    if row.unreadable is not None:
        raise PayloadError(f"outbox row {row.id} (event {row.event_id}): {row.unreadable}",
                           event_type=row.event_type)
    if row.encoded is not None:
        enc = encoder.pass_through(row.event_type, row.encoded, topic=topic)
    else:
        enc = encoder.encode(row.event_type, row.payload, topic=topic, headers=row.headers)
    size = len(enc.value)
    if size > max_payload_bytes:
        raise PayloadTooLarge(
            f"event {row.event_id} ({row.event_type}) encodes to {size} bytes, over "
            f"relay.max_payload_bytes={max_payload_bytes}"
        )
    if size > max_inline_bytes:
        return Oversized(enc.value, row.event_type)
    return Record(topic, row.aggregate_id.encode(), enc.value, event_headers(row, source))


def claim_check_record(
    row: OutboxRow,
    encoder: Encoder,
    oversized: Oversized,
    *,
    topic: str,
    source: str,
    store: str,
    ref: str,
    sha256: str,
) -> Record:
    ref_payload = {
        "event_type": oversized.event_type,
        "store": store,
        "ref": ref,
        "size_bytes": len(oversized.body),
        "sha256": sha256,
    }
    enc = encoder.encode(CLAIM_CHECK, ref_payload, topic=topic)
    hdrs = event_headers(row, source)
    hdrs.append((names.CLAIM_CHECK, store.encode()))
    return Record(topic, row.aggregate_id.encode(), enc.value, hdrs)


def dead_letter_record(
    row: OutboxRow, error: BaseException, *, topic: str, source: str, max_inline_bytes: int
) -> tuple[Record, bytes | None]:
    """The outbox DLQ record of a row the relay cannot publish: the raw row as JSON, the error
    in headers. When the JSON is over ``max_inline_bytes``, or the row failed for its size, the
    second element is the body to claim-check (the record's value is then a stub naming the
    row, to be completed by the caller with :func:`dead_letter_stub`)."""
    body = row_json(row).encode()
    hdrs = event_headers(row, source)
    hdrs.append((names.ERROR_CLASS, _error_class(error).encode()))
    hdrs.append((names.ERROR_MESSAGE, str(error)[:4000].encode()))
    hdrs = [(n, v) for n, v in hdrs if n != names.CONTENT_TYPE] + [
        (names.CONTENT_TYPE, b"application/json")
    ]
    if len(body) > max_inline_bytes or isinstance(error, PayloadTooLarge):
        return Record(topic, row.aggregate_id.encode(), b"", hdrs), body
    return Record(topic, row.aggregate_id.encode(), body, hdrs), None


def row_json(row: OutboxRow) -> str:
    """The row as JSON, its payload exactly as stored (every digit, whatever it holds)."""
    meta = row.as_json()
    if row.payload_text is None:
        return exactjson.dumps(meta)
    del meta["payload"]
    head = exactjson.dumps(meta)
    return f'{head[:-1]},"payload":{row.payload_text}}}'


def dead_letter_stub(record: Record, row: OutboxRow, store: str, ref: str, size: int) -> Record:
    meta = row.as_json()
    del meta["payload"]
    meta["payload_claim_check"] = {"store": store, "ref": ref, "size_bytes": size}
    value = exactjson.dumps(meta).encode()
    return Record(
        record.topic, record.key, value, [*record.headers, (names.CLAIM_CHECK, store.encode())]
    )


def _error_class(error: BaseException) -> str:
    cls = type(error)
    return f"{cls.__module__}.{cls.__qualname__}"
