"""Rows their writer encoded (``pipeline.outbox.emit`` keeps the Avro bytes, migration 0004):
the relay sends those bytes as they are — byte for byte what it would have encoded itself — and
falls back to encoding the jsonb whenever the bytes are not exactly its own writer schema's."""

from __future__ import annotations

import datetime as dt
import json
import random

import psycopg
import pytest

from pipeline.claimcheck import claim_store
from pipeline.config import Settings
from pipeline.outbox import emit
from pipeline.relay.relay import Relay
from pipeline.schemas.catalogue import Catalogue
from pipeline.schemas.codec import Decoder, Encoder
from pipeline.simulator.payloads import payload_for
from tests.fixtures.relay import _url
from tests.integration.test_relay_basic import drain

pytestmark = [pytest.mark.integration]

NOW = dt.datetime(2026, 12, 2, 9, 0, tzinfo=dt.UTC)


def _payloads(n: int) -> list[dict[str, object]]:
    rng = random.Random(14)
    return [payload_for("order.created", rng, aggregate_id=f"SO-{i:05d}", now=NOW)
            for i in range(n)]


def test_emitted_bytes_are_passed_through_identical_to_what_the_relay_encodes(
        installed: Settings, read_topic) -> None:
    payloads = _payloads(20)
    with psycopg.connect(_url(installed)) as conn:
        for p in payloads:
            emit(conn, "order", str(p["order_id"]), "order.created", p)
        conn.commit()
        stored = conn.execute(
            "SELECT count(*) FILTER (WHERE encoded IS NOT NULL), count(*) FROM pipeline.outbox"
        ).fetchone()
    assert stored == (20, 20)
    relay = Relay(installed)
    fetched = relay.store
    fetched.connect()
    rows = fetched.fetch(100)
    fetched.close()
    assert all(r.encoded is not None and r.payload is None for r in rows), \
        "the relay fetched the payload of rows whose bytes it can send as they are"
    assert drain(relay) == 20
    recs = read_topic(f"{installed.topics.prefix}.order", expect=20)
    enc = Encoder(Catalogue.load())
    expected = {str(p["order_id"]).encode(): enc.encode("order.created", p, topic="x").value
                for p in payloads}
    assert {r.key: r.value for r in recs} == expected
    dec = Decoder(Catalogue.load())
    assert dec.decode(recs[0].value).value["order_id"] == recs[0].key.decode()


def test_bytes_not_of_the_relays_writer_schema_are_encoded_again_from_the_jsonb(
        installed: Settings, read_topic) -> None:
    """A writer on another catalogue (its fingerprint is not the relay's writer schema of the
    type), or bytes of another event type: the relay reads the jsonb, as for SQL emitters."""
    [p] = _payloads(1)
    cat = Catalogue.load()
    enc = Encoder(cat)
    good = enc.encode("order.created", p, topic="x").value
    other_type = enc.encode("customer.upserted", payload_for(
        "customer.upserted", random.Random(3), aggregate_id="C-1", now=NOW), topic="x").value
    unknown_fp = good[:2] + b"\x00" * 8 + good[10:]
    with psycopg.connect(_url(installed)) as conn:
        for i, blob in enumerate([other_type, unknown_fp]):
            conn.execute(
                "SELECT pipeline.outbox_emit('order', %s, 'order.created', %s::jsonb, '{}', "
                "gen_random_uuid(), %s)", (f"SO-X{i}", json.dumps(p), blob))
        conn.commit()
    relay = Relay(installed)
    assert drain(relay) == 2
    recs = read_topic(f"{installed.topics.prefix}.order", expect=2)
    assert [r.value for r in recs] == [good, good]


def test_outbox_emit_refuses_bytes_that_are_not_single_object_avro(installed: Settings) -> None:
    with psycopg.connect(_url(installed)) as conn, pytest.raises(
            psycopg.errors.InvalidParameterValue,
            match="encoded is not Avro single-object bytes"):
        conn.execute("SELECT pipeline.outbox_emit('order', 'SO-1', 'order.created', "
                     "'{}'::jsonb, '{}', gen_random_uuid(), '\\x0102'::bytea)")


def test_a_passed_through_row_that_is_dead_lettered_keeps_its_readable_payload(
        installed: Settings, read_topic) -> None:
    """The fetch left out the jsonb of a row it could pass through; when Kafka or a limit
    refuses the row, the outbox DLQ still gets the row with its payload as stored."""
    [p] = _payloads(1)
    with psycopg.connect(_url(installed)) as conn:
        emit(conn, "order", "SO-00000", "order.created", p)
        conn.commit()
    small = installed.model_copy(update={"relay": installed.relay.model_copy(
        update={"max_payload_bytes": 50, "max_inline_bytes": 40})})
    relay = Relay(small)
    assert drain(relay) == 1
    relay.claims.close()
    assert relay.stats.dead_lettered == 1
    [rec] = read_topic(small.topics.outbox_dlq, expect=1)
    stub = json.loads(rec.value)  # a row refused for its size travels by claim check
    store = claim_store(small)
    try:
        row = json.loads(store.get(stub["payload_claim_check"]["ref"]))
    finally:
        store.close()
    assert row["payload"] == json.loads(json.dumps(p))
    assert rec.headers["erp_error_class"].endswith("PayloadTooLarge")
