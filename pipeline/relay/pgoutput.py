"""Reading ``pgoutput`` (protocol version 1) as the SQL decoding functions return it.

``pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version', '1', 'publication_names',
P, 'messages', 'true')`` yields one row per protocol message: (lsn, xid, data). This module
turns those rows into the outbox events of the WAL engine, in commit order, without I/O:

* ``M`` (a transactional logical decoding message) with the prefix ``<schema>.outbox``: an event
  ``outbox_emit`` wrote while the engine was ``wal`` (no row);
* ``I`` (an insert into ``<schema>.outbox``, described by an earlier ``R``): a row
  ``outbox_emit`` inserted while the engine was ``poll``;
* ``C`` (commit): the transaction's end LSN, the position a slot may be advanced to once every
  event of the transaction (and of those before it) is in Kafka.

Every other message (types, origins, truncates, messages of other prefixes, inserts into other
tables) is passed over. Message layouts: PostgreSQL's "Logical Replication Message Formats".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import orjson

from pipeline.errors import PermanentError

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I16 = struct.Struct(">h")

# the columns of <schema>.outbox a decoded insert is read by (migrations 0001 and 0004)
_ROW_COLUMNS = ("id", "event_id", "aggregate_type", "aggregate_id", "aggregate_version",
                "event_type", "payload", "headers", "occurred_at", "encoded")


class DecodeError(PermanentError):
    """A pgoutput message this reader cannot read (a protocol it does not know): the relay
    stops there, naming the LSN, rather than pass over an event."""


def lsn_text(lsn: int) -> str:
    """PostgreSQL's form of an LSN: ``16/B374D848``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    if not lo:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


@dataclass(slots=True)
class WalEvent:
    """One outbox event read from the WAL, as the fields of an outbox row.

    ``from_table``: an insert into the outbox table (the row exists until the relay deletes
    it), else a message (no row). ``commit_lsn``: the end LSN of the event's transaction."""

    id: int
    event_id: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    event_type: str
    payload_text: str
    headers_text: str
    occurred_at: str
    encoded: bytes | None
    from_table: bool
    commit_lsn: int = 0


@dataclass(slots=True)
class Transaction:
    """The outbox events of one committed transaction, in the order they were written."""

    xid: int
    commit_lsn: int  # end LSN of the commit record: where a slot stands after this transaction
    events: list[WalEvent] = field(default_factory=list)


@dataclass
class Decoder:
    """Reads peeked rows into :class:`Transaction` objects. ``table``: ``(schema, "outbox")``;
    ``prefix``: the message prefix ``outbox_emit`` writes (``<schema>.outbox``). One decoder
    per decoding session (a peek): pgoutput describes a table (``R``) before its first insert
    in each session."""

    schema: str
    prefix: bytes = b""
    _relations: dict[int, tuple[str, str, list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prefix:
            self.prefix = f"{self.schema}.outbox".encode()

    def transactions(self, rows: Iterable[tuple[str, object, bytes]], after: int = 0
                     ) -> Iterator[Transaction]:
        """The committed transactions in ``rows`` (lsn, xid, data) that end after the LSN
        ``after``, each with its outbox events (possibly none: a transaction of other tables'
        inserts). A transaction cut off by the end of ``rows`` is not yielded. Events are read
        at their commit, so those of a transaction ending before ``after`` (a batch in flight,
        decoded again because the slot stands before it) cost nothing."""
        current: Transaction | None = None
        changes: list[tuple[object, bytes]] = []
        lsn: object = None
        xid: object = None
        try:
            for lsn, xid, raw in rows:
                kind = raw[:1]
                if kind == b"B":
                    current = Transaction(int(str(xid)) if xid is not None else 0, 0)
                    changes = []
                elif kind == b"C":
                    # Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit timestamp
                    end = _U64.unpack_from(raw, 10)[0]
                    if current is not None and end > after:
                        current.commit_lsn = end
                        for at, data in changes:
                            lsn = at
                            ev = (self._message(data) if data[:1] == b"M"
                                  else self._insert(data))
                            if ev is not None:
                                ev.commit_lsn = end
                                current.events.append(ev)
                        yield current
                    current = None
                elif kind in (b"M", b"I"):
                    if current is not None:
                        changes.append((lsn, bytes(raw)))
                elif kind == b"R":
                    # described before its first insert of each decoding session
                    self._relation(bytes(raw))
                # Y (type), O (origin), T (truncate), U/D (not published): nothing to do
        except (DecodeError, ValueError, IndexError, struct.error) as exc:
            raise DecodeError(f"the change at LSN {lsn} (xid {xid}): {exc}") from exc

    # -- messages ---------------------------------------------------------------------------
    def _message(self, data: bytes) -> WalEvent | None:
        # Byte1 'M', Int8 flags, Int64 lsn, String prefix, Int32 length, Byte[n] content
        flags = data[1]
        end = data.index(b"\0", 10)
        if data[10:end] != self.prefix or not flags & 1:
            return None  # another prefix, or a non-transactional message (never ours)
        (n,) = _I32.unpack_from(data, end + 1)
        content = data[end + 5 : end + 5 + n]
        return message_event(content)

    # -- inserts ----------------------------------------------------------------------------
    def _relation(self, data: bytes) -> None:
        # Int32 oid, String namespace, String name, Int8 replica identity, Int16 ncols,
        # per column: Int8 flags, String name, Int32 type oid, Int32 type modifier
        (oid,) = _U32.unpack_from(data, 1)
        pos = 5
        ns, pos = _string(data, pos)
        name, pos = _string(data, pos)
        pos += 1
        (ncols,) = _I16.unpack_from(data, pos)
        pos += 2
        cols = []
        for _ in range(ncols):
            col, pos = _string(data, pos + 1)
            pos += 8
            cols.append(col)
        self._relations[oid] = (ns, name, cols)

    def _insert(self, data: bytes) -> WalEvent | None:
        (oid,) = _U32.unpack_from(data, 1)
        rel = self._relations.get(oid)
        if rel is None:
            raise DecodeError(f"pgoutput sent an insert into relation {oid} before describing it")
        ns, name, cols = rel
        if ns != self.schema or name != "outbox":
            return None
        if data[5:6] != b"N":
            raise DecodeError(f"pgoutput insert into {ns}.{name} without a new tuple")
        values = _tuple(data, 6)
        row = dict(zip(cols, values, strict=False))
        missing = [c for c in _ROW_COLUMNS[:9] if c not in row]
        if missing:
            raise DecodeError(f"{ns}.outbox as decoded has no column {', '.join(missing)}")
        encoded = row.get("encoded")
        return WalEvent(
            id=int(_text(row["id"])),
            event_id=_text(row["event_id"]),
            aggregate_type=_text(row["aggregate_type"]),
            aggregate_id=_text(row["aggregate_id"]),
            aggregate_version=int(_text(row["aggregate_version"])),
            event_type=_text(row["event_type"]),
            payload_text=_text(row["payload"]),
            headers_text=_text(row["headers"]) if row["headers"] is not None else "{}",
            occurred_at=_iso(_text(row["occurred_at"])),
            encoded=_bytea(encoded) if encoded is not None else None,
            from_table=True,
        )


def message_event(content: bytes) -> WalEvent:
    """An event as ``outbox_emit`` writes it in a message (migration 0005): the envelope as one
    JSON array line, a line of the payload's jsonb text, one of the headers', then the Avro
    bytes its writer made (nothing when it made none)."""
    try:
        envelope, payload, headers, encoded = content.split(b"\n", 3)
        (id_, event_id, aggregate_type, aggregate_id, version, event_type,
         occurred_at) = orjson.loads(envelope)
    except ValueError as exc:
        raise DecodeError(f"an outbox message that is not what outbox_emit writes: {exc}") \
            from exc
    return WalEvent(
        int(id_), event_id, aggregate_type, aggregate_id, int(version), event_type,
        payload.decode(), headers.decode(), occurred_at, encoded or None, False,
    )


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\0", pos)
    return data[pos:end].decode(), end + 1


def _tuple(data: bytes, pos: int) -> list[bytes | None]:
    (n,) = _I16.unpack_from(data, pos)
    pos += 2
    out: list[bytes | None] = []
    for _ in range(n):
        kind = data[pos : pos + 1]
        pos += 1
        if kind == b"t":
            (length,) = _I32.unpack_from(data, pos)
            out.append(data[pos + 4 : pos + 4 + length])
            pos += 4 + length
        elif kind in (b"n", b"u"):
            out.append(None)
        else:
            raise DecodeError(f"pgoutput tuple column of kind {kind!r} (binary mode is not used)")
    return out


def _text(value: bytes | None) -> str:
    if value is None:
        raise DecodeError("a NOT NULL outbox column decoded as null")
    return value.decode()


def _bytea(value: bytes) -> bytes:
    """bytea in its text output (hex format, ``\\x…``)."""
    if value.startswith(b"\\x"):
        return bytes.fromhex(value[2:].decode())
    raise DecodeError("outbox.encoded is not in bytea's hex output format (bytea_output=hex)")


def _iso(ts: str) -> str:
    """timestamptz text output (``2026-12-02 14:55:00.123456+00``, DateStyle ISO) as
    ISO-8601 with a full offset, as the polling relay's to_json() gives it."""
    date, _, rest = ts.partition(" ")
    if not rest:
        return ts
    for sign in ("+", "-"):
        idx = rest.rfind(sign)
        if idx > 0:
            clock, off = rest[:idx], rest[idx:]
            if len(off) == 3:
                off += ":00"
            elif len(off) == 6 and off[3] != ":":  # +0530
                off = off[:3] + ":" + off[3:]
            return f"{date}T{clock}{off}"
    return f"{date}T{rest}"
