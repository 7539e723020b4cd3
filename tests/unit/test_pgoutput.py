"""pgoutput protocol rows → outbox events (pipeline/relay/pgoutput.py), on hand-made rows laid
out as PostgreSQL's "Logical Replication Message Formats" (protocol version 1) describe."""

from __future__ import annotations

import struct

import pytest

from pipeline.relay.pgoutput import DecodeError, Decoder, lsn_text, message_event, parse_lsn


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def begin(xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", 0x100, 0, xid)


def commit(end: int) -> bytes:
    return b"C" + struct.pack(">bQQq", 0, end - 8, end, 0)


def relation(oid: int, ns: str, name: str, cols: list[str]) -> bytes:
    out = b"R" + struct.pack(">I", oid) + _s(ns) + _s(name) + b"d" + struct.pack(">h", len(cols))
    for c in cols:
        out += b"\0" + _s(c) + struct.pack(">Ii", 25, -1)
    return out


def insert(oid: int, values: list[bytes | None]) -> bytes:
    out = b"I" + struct.pack(">I", oid) + b"N" + struct.pack(">h", len(values))
    for v in values:
        out += b"n" if v is None else b"t" + struct.pack(">i", len(v)) + v
    return out


def message(prefix: str, content: bytes, transactional: bool = True) -> bytes:
    return (b"M" + bytes([1 if transactional else 0]) + struct.pack(">Q", 0x200) + _s(prefix)
            + struct.pack(">i", len(content)) + content)


ENVELOPE = b'[7,"0b5b8c1e-0000-4000-8000-000000000007","order","SO-1",3,"order.created",' \
           b'"2026-12-02T10:00:00.5+00:00"]'
AVRO = b"\xc3\x01" + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\n\x00body"  # bytes may hold \n


def rows(*msgs: bytes) -> list[tuple[str, str, bytes]]:
    return [("0/1", "1", m) for m in msgs]


def test_a_message_event_with_its_writers_bytes_kept_exactly():
    ev = message_event(ENVELOPE + b'\n{"total": 140.00}\n{"traceparent": "00-ab"}\n' + AVRO)
    assert (ev.id, ev.aggregate_id, ev.aggregate_version, ev.event_type) == \
        (7, "SO-1", 3, "order.created")
    assert ev.payload_text == '{"total": 140.00}'  # the digits as stored
    assert ev.headers_text == '{"traceparent": "00-ab"}'
    assert ev.encoded == AVRO and not ev.from_table
    bare = message_event(ENVELOPE + b"\n{}\n{}\n")
    assert bare.encoded is None


def test_transactions_carry_their_end_lsn_and_only_the_outbox_events():
    d = Decoder("pipeline")
    content = ENVELOPE + b"\n{}\n{}\n"
    txns = list(d.transactions(rows(
        begin(700), message("pipeline.outbox", content), message("other", b"x"),
        message("pipeline.outbox", content, transactional=False),
        message("pipeline.outbox.heartbeat", b""), commit(0x5000),
        begin(701), commit(0x6000),
        begin(702), message("pipeline.outbox", content),  # cut off: not yet committed
    )))
    assert [(t.commit_lsn, len(t.events)) for t in txns] == [(0x5000, 1), (0x6000, 0)]
    assert txns[0].events[0].commit_lsn == 0x5000


def test_inserts_into_the_outbox_table_are_read_by_the_relation_described():
    cols = ["id", "event_id", "aggregate_type", "aggregate_id", "aggregate_version",
            "event_type", "payload", "headers", "occurred_at", "encoded"]
    d = Decoder("pipeline")
    (txn,) = d.transactions(rows(
        begin(9), relation(16400, "pipeline", "outbox", cols),
        relation(16500, "public", "sale_order", ["id"]),
        insert(16500, [b"1"]),
        insert(16400, [b"42", b"0b5b8c1e-0000-4000-8000-000000000042", b"order", b"SO-9",
                       b"1", b"order.created", b'{"a": 1.10}', b"{}",
                       b"2026-12-02 10:00:00.123456+00", b"\\xc3010102"]),
        commit(0x7000)))
    (ev,) = txn.events
    assert ev.from_table and ev.id == 42 and ev.payload_text == '{"a": 1.10}'
    assert ev.occurred_at == "2026-12-02T10:00:00.123456+00:00"
    assert ev.encoded == bytes.fromhex("c3010102")


def test_an_insert_before_its_relation_or_in_binary_is_refused_by_name():
    with pytest.raises(DecodeError, match="before describing it"):
        list(Decoder("pipeline").transactions(rows(begin(1), insert(1, [b"1"]), commit(10))))
    d = Decoder("pipeline")
    bad = b"I" + struct.pack(">I", 5) + b"N" + struct.pack(">h", 1) + b"b"
    with pytest.raises(DecodeError, match="binary"):
        list(d.transactions(rows(relation(5, "pipeline", "outbox", ["id"]), begin(1), bad,
                                 commit(10))))
    with pytest.raises(DecodeError, match="not what outbox_emit writes"):
        message_event(b"not an event")


def test_a_transaction_ending_before_the_cursor_is_not_read():
    broken = message("pipeline.outbox", b"not an event")
    d = Decoder("pipeline")
    # a batch in flight decoded again: passed over without reading its events
    assert list(d.transactions(rows(begin(1), broken, commit(0x100)), after=0x100)) == []
    with pytest.raises(DecodeError, match="LSN 0/1"):
        list(d.transactions(rows(begin(1), broken, commit(0x100)), after=0xFF))


def test_lsn_text_round_trip():
    assert lsn_text(parse_lsn("16/B374D848")) == "16/B374D848"
    assert parse_lsn("0/1") == 1
    with pytest.raises(ValueError):
        parse_lsn("nope")
